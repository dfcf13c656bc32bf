"""The waiting room: who gets the next free slot.

Priority first (a higher ``priority=`` is always served before a lower one), then, with
``fair=True``, the virtual token counter (VTC, "Fairness in Serving Large Language
Models", Sheng et al., OSDI 2024): every tenant has a counter of the service it has
received, in weighted tokens (``input + 2 x output``, divided by the tenant's weight);
the backlogged tenant with the smallest counter goes next.  A tenant that becomes
backlogged after being idle is lifted to the smallest counter of the backlogged ones --
or, when nobody is queued, to the counter of the tenant served last -- so idleness banks
no credit.  The guarantee (the paper's Theorem): two tenants backlogged
over the same interval differ in service received by at most a bound of the order of the
largest single request's cost -- see ``tests/unit/test_admission.py``.  Within a tenant,
first come, first served.  With ``fair=False``, first come, first served across tenants.

Removal (a waiter that timed out or was cancelled) is lazy: it is marked and skipped when
it reaches the head, so nothing is ever scanned on the caller's path.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Mapping
from typing import Any

__all__ = ["FairQueue", "Waiter"]

_NOBODY = object()


class Waiter:
    """One caller waiting for a slot."""

    __slots__ = ("cost", "future", "gone", "priority", "seq", "tenant", "tokens")

    def __init__(self, tenant: object, priority: int, cost: float, tokens: float) -> None:
        self.tenant = tenant
        self.priority = priority
        self.cost = cost  # weighted tokens charged to the tenant's counter when served
        self.tokens = tokens
        self.seq = 0
        self.future: Any = None  # the asyncio future the caller awaits (set by the gate)
        self.gone = False  # timed out or cancelled: skip it


class _Band:
    __slots__ = ("queues", "size")

    def __init__(self) -> None:
        self.queues: dict[object, collections.deque[Waiter]] = {}
        self.size = 0


class FairQueue:
    """Waiters by priority band, then VTC (or FIFO) within a band."""

    def __init__(self, fair: bool, weights: Mapping[object, float]) -> None:
        self.fair = fair
        self._weights = weights
        self._bands: dict[int, _Band] = {}
        self._seq = itertools.count()
        self.counters: dict[object, float] = {}  # VTC: weighted service received
        self.size = 0  # live waiters
        self.tokens = 0.0  # their estimated tokens
        self.last: object = _NOBODY  # the tenant served last (the gate sets it)

    def __len__(self) -> int:
        return self.size

    def weight(self, tenant: object) -> float:
        return self._weights.get(tenant, 1.0)

    def unit(self, tenant: object) -> float:
        """One unweighted unit of service, in ``tenant``'s weighted counter."""
        weights = self._weights
        return 1.0 / weights.get(tenant, 1.0) if weights else 1.0

    def _lift(self, tenant: object) -> None:
        """VTC: a tenant joining the backlog starts no lower than the least backlogged
        counter -- or, with nobody queued, than the tenant served last -- so time spent
        idle is not banked as credit."""
        floor = None
        for band in self._bands.values():
            for t, q in band.queues.items():
                while q and q[0].gone:  # lazily removed waiters do not make a backlog
                    q.popleft()
                if q:
                    c = self.counters.get(t, 0.0)
                    floor = c if floor is None or c < floor else floor
        if floor is None and self.last is not _NOBODY and self.last != tenant:
            floor = self.counters.get(self.last)
        if floor is not None and self.counters.get(tenant, 0.0) < floor:
            self.counters[tenant] = floor

    def push(self, w: Waiter) -> None:
        w.seq = next(self._seq)
        band = self._bands.get(w.priority)
        if band is None:
            band = self._bands[w.priority] = _Band()
        key = w.tenant if self.fair else None
        q = band.queues.get(key)
        if q is None or not q:
            if self.fair:
                self._lift(w.tenant)
            if q is None:
                q = band.queues[key] = collections.deque()
        q.append(w)
        band.size += 1
        self.size += 1
        self.tokens += w.tokens

    def pop(self) -> Waiter | None:
        """The next waiter to serve (None if nobody waits).  The gate charges its tenant
        when it grants the slot."""
        while self.size:
            live = [p for p, b in self._bands.items() if b.size > 0]
            if not live:  # only dead waiters were counted: nothing to serve
                self.size = 0
                self.tokens = 0.0
                return None
            band = self._bands[max(live)]
            best_key: object = None
            best: collections.deque[Waiter] | None = None
            best_c = (0.0, 0)
            for key, q in band.queues.items():
                while q and q[0].gone:
                    q.popleft()
                if not q:
                    continue
                # Least service first; among equals (a tenant just lifted), the oldest.
                c = (self.counters.get(key, 0.0) if self.fair else 0.0, q[0].seq)
                if best is None or c < best_c:
                    best_key, best, best_c = key, q, c
            if best is None:
                band.size = 0  # only dead waiters were left in it
                continue
            w = best.popleft()
            w.gone = True  # out of the queue: a later discard() must not count it again
            band.size -= 1
            self.size -= 1
            self.tokens -= w.tokens
            if not best:
                del band.queues[best_key]
            return w
        return None

    def discard(self, w: Waiter) -> None:
        """A waiter left (timed out, cancelled): forget it, lazily."""
        if not w.gone:
            w.gone = True
            band = self._bands.get(w.priority)
            if band is not None:
                band.size -= 1
            self.size -= 1
            self.tokens -= w.tokens

    def charge(self, tenant: object, cost: float) -> None:
        """Add ``cost`` weighted tokens of service to ``tenant``'s counter (a call
        admitted, or the settlement of its estimate: may be negative)."""
        self.counters[tenant] = self.counters.get(tenant, 0.0) + cost / self.weight(tenant)
