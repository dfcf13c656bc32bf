"""Fleet scale: many processes share what they learn, with Redis off the hot path.

::

    policy.py    RedisState: where and what to share (frozen configuration)
    protocol.py  Shared: what the pool and the gate call (sync, memory only)
    link.py      FleetLink: the process side -- the outbox, the remote evidence applied
    evidence.py  Evidence: what other processes report, weighed (eject / suspect / none)
    lease.py     leased quota buckets: slices of fleet-wide token buckets
    counter.py   FleetCounter: a fleet-wide sum per window (endpoint limits)
    budget.py    FleetBudget: a cost ceiling's allowance, leased (never granted past it)
    redis_io.py  Syncer: the background task -- scripts, pub/sub, heartbeats, breaker

Only ``policy`` is imported by ``import lbclient``; the rest (and redis-py) load when a
balancer is built with ``shared=``.
"""

from __future__ import annotations

from .policy import RedisState

__all__ = ["RedisState"]
