"""``least_connections`` and ``least_response_time``: the global argmin of a load metric.

They look at *every* pickable endpoint on each pick, so a pick costs O(n): about a
microsecond per 10 endpoints in CPython.  That is the right trade for small pools
(up to a few dozen replicas, typical of LLM serving) where the exact best choice matters;
for large pools prefer ``power_of_two`` / ``peak_ewma``, which get nearly the same
tail latency from two random samples at O(1), and avoid the herd effect of many clients
all choosing the same "least loaded" replica at once ("The Power of Two Choices in
Randomized Load Balancing", Mitzenmacher 2001).  Ties are broken at random.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from ..pool.load import inflight_load, peak_ewma_load, peak_ewma_ttft_load
from ..pool.state import EndpointState
from ._base import PickContext
from .p2c import P2CPicker

if TYPE_CHECKING:
    from .._context import CallContext

LEAST_CONNECTIONS = "least_connections"
LEAST_RESPONSE_TIME = "least_response_time"


class _ArgminPicker(P2CPicker):
    """The least loaded of every endpoint (the metric chosen per call as for P2C)."""

    __slots__ = ()

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        states, n = self._states, self._n
        load = self._load_for(call)
        now = self._now()
        start = int(self._random() * n)  # random start: random tie-breaking
        best: EndpointState | None = None
        best_load = 0.0
        for i in range(start, start + n):
            s = states[i % n] if i >= n else states[i]
            if exclude and s in exclude:
                continue
            v = load(s, now)
            if best is None or v < best_load:
                best, best_load = s, v
        return best


@attrs.frozen
class LeastConnections:
    """The endpoint with the fewest in-flight requests per unit of weight (O(n) per pick)."""

    name: str = attrs.field(default=LEAST_CONNECTIONS, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _ArgminPicker:
        return _ArgminPicker(states, ctx, inflight_load)


@attrs.frozen
class LeastResponseTime:
    """The endpoint with the lowest peak-EWMA latency x (in-flight + 1) (O(n) per pick)."""

    name: str = attrs.field(default=LEAST_RESPONSE_TIME, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _ArgminPicker:
        return _ArgminPicker(states, ctx, peak_ewma_load, peak_ewma_ttft_load)
