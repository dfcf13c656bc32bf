"""``geo``: the endpoint with the lowest estimated total latency for this client.

    score = network(client region, endpoint region)
            + processing x (1 + utilization) / weight

``network`` comes from the balancer's :class:`~lbclient.GeoTable` (the playbook's
cross-region table by default) and is refined by measurement: it is never taken to be
more than the latency actually observed for that endpoint.  ``processing`` is the
endpoint's peak-EWMA latency less the network part (before any sample: the pool's
median). ``utilization`` is outstanding requests (ours, or the server-reported load if
higher) over the endpoint's capacity: ``Endpoint.metadata["capacity"]`` when you give it
(concurrent requests the replica serves without queueing, e.g. its batch size), else the
highest concurrency at which it was seen to finish a call without slowing down (at most
twice its latency estimate) -- a lower bound that grows as the replica proves itself.
This is the playbook's utilization penalty in time units: a replica at full utilization
costs twice its processing time, and a replica that queues beyond it shows the queueing
in its measured latency. (Multiplying by outstanding + 1, as ``peak_ewma`` does, would
assume every replica serves one request at a time and spill out of the local region long
before it is busy.)

So the local region wins while it is healthy and unsaturated; as its queues grow, the
next-closest region becomes cheaper and takes the overflow; a dead region's endpoints
are ejected (breaker) or score their failures, and traffic fails over whole.

Cost per pick: one P2C draw inside each region, then the best across regions -- O(number
of regions), not O(endpoints).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from ..policies.geo import GeoTable
from ..pool.load import outstanding
from ..pool.state import EndpointState
from ._base import PickContext

if TYPE_CHECKING:
    from .._context import CallContext

NAME = "geo"
_UNMEASURED = 0.05  # seconds of processing assumed before any endpoint was measured


def _capacity(s: EndpointState) -> int:
    """``metadata["capacity"]`` if it is a positive number, else 0 (learn it)."""
    value = s.endpoint.metadata.get("capacity")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 1:
        return int(value)
    return 0


class _GeoPicker:
    __slots__ = ("_cap", "_groups", "_net", "_now", "_picks", "_prior", "_random", "_states")

    def __init__(self, states: Sequence[EndpointState], ctx: PickContext) -> None:
        table = ctx.geo or GeoTable.default()
        groups: dict[str | None, list[EndpointState]] = defaultdict(list)
        for s in states:
            groups[s.endpoint.region].append(s)
        self._groups = [tuple(g) for _, g in sorted(groups.items(), key=lambda kv: str(kv[0]))]
        if ctx.region is None:  # no client region: geography is unknown, only latency counts
            self._net = {id(s): 0.0 for s in states}
        else:
            self._net = {id(s): table.latency(ctx.region, s.endpoint.region) for s in states}
        self._states = tuple(states)
        self._cap = {id(s): _capacity(s) for s in states}
        self._now: Callable[[], float] = ctx.clock.now
        self._random = ctx.rng.random
        self._picks = 0
        self._prior = 0.0
        self._refresh_prior(self._now())

    def _refresh_prior(self, now: float) -> None:
        """Processing latency assumed for endpoints with no sample yet: the median of the
        sampled ones' processing part (refreshed every 64 picks from a sample of at most
        about 64 endpoints, so its cost does not grow with the pool)."""
        procs = []
        states = self._states
        step = max(1, len(states) // 64)  # a sample of <= ~64: O(1) per pick at any size
        for s in states[::step]:
            if s.sampled:
                total = s.ewma(now)
                procs.append(total - min(self._net[id(s)], total))
        # With nothing measured yet, assume the balancer's default latency prior.
        self._prior = statistics.median(procs) if procs else _UNMEASURED

    def score(self, s: EndpointState, now: float, stream: bool = False) -> float:
        net = self._net[id(s)]
        if s.sampled:
            total = s.ttft_ewma(now) if stream else s.ewma(now)
            if (s.ttft.cost if stream else s.cost) < net:
                # The endpoint answered faster than the table's network time: the table
                # is wrong for it.  Take half the measurement as network, so its queue
                # still counts.
                net = (s.ttft.cost if stream else s.cost) / 2
            if total < net:  # decayed while idle: the estimate is stale, not the table
                net = total
            proc = total - net
        else:
            proc = self._prior
        q = outstanding(s, now)
        cap = self._cap[id(s)] or s.cap_seen
        return net + proc * (1.0 + q / (cap if cap > 1 else 1)) / s.weight

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        now = self._now()
        stream = call is not None and call.stream
        self._picks += 1
        if self._picks & 63 == 0:
            self._refresh_prior(now)
        rnd = self._random
        best: EndpointState | None = None
        best_score = 0.0
        for group in self._groups:
            cands = [s for s in group if s not in exclude] if exclude else group
            n = len(cands)
            if n == 0:
                continue
            if n == 1:
                c = cands[0]
                sc = self.score(c, now, stream)
            else:
                i = int(rnd() * n)
                j = int(rnd() * (n - 1))
                if j >= i:
                    j += 1
                a, b = cands[i], cands[j]
                sa, sb = self.score(a, now, stream), self.score(b, now, stream)
                c, sc = (b, sb) if sb < sa else (a, sa)
            if best is None or sc < best_score:
                best, best_score = c, sc
        return best


@attrs.frozen
class Geo:
    """Lowest estimated total latency: network distance + processing x queue."""

    name: str = attrs.field(default=NAME, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _GeoPicker:
        return _GeoPicker(states, ctx)
