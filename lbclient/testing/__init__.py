"""The lbclient test kit: a fake clock, a fleet of fake OpenAI-compatible replicas, and
a real ``redis-server`` for the fleet-shared state (:class:`RedisServer`).

Use it to test your own configuration against real HTTP faults on loopback::

    from lbclient.testing import ReplicaFleet, ReplicaConfig

    async with ReplicaFleet([ReplicaConfig(speed=1.0), ReplicaConfig(speed=0.3)]) as fleet:
        lb = lbclient.Balancer(fleet.urls)
        fleet[1].set(error_rate=0.5)      # a brownout, while it runs
        await fleet[0].down()             # connection refused

:func:`set_testing` turns off retry backoff sleeps for fast tests.
"""

from __future__ import annotations

from ._clock import FakeClock
from ._fleet import Replica, ReplicaConfig, ReplicaCounters, ReplicaFleet
from ._kvcache import PrefixCache
from ._redis import RedisServer, free_port

__all__ = [
    "FakeClock",
    "PrefixCache",
    "RedisServer",
    "Replica",
    "ReplicaConfig",
    "ReplicaCounters",
    "ReplicaFleet",
    "free_port",
]
