"""``weighted_round_robin``: weights honoured exactly, picks interleaved (EDF scheduling).

Each endpoint has a virtual deadline that advances by ``1/weight`` per pick; the earliest
deadline goes next (the earliest-deadline-first scheduler of Envoy's weighted round
robin).  Over any window an endpoint of weight 3 gets 3x the picks of weight 1, spread
out rather than in bursts, like nginx's smooth WRR -- but O(log n) per pick instead of
O(n).  When every weight is equal (the common case, and what slow start returns to) the
schedule is plain round robin, O(1) per pick.  Blind to load, like ``round_robin``.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from ..pool.state import EndpointState
from ._base import PickContext

if TYPE_CHECKING:
    from .._context import CallContext

NAME = "weighted_round_robin"


class _EdfPicker:
    __slots__ = ("_heap", "_i", "_n", "_random", "_states", "_step", "_uniform")

    def __init__(self, states: Sequence[EndpointState], ctx: PickContext) -> None:
        self._states = tuple(states)
        self._n = len(self._states)
        self._random = ctx.rng.random
        # Equal weights: EDF degenerates to a fixed cycle, so run the cycle directly.
        self._uniform = len({s.weight for s in self._states}) == 1
        self._i = ctx.rng.randrange(self._n)
        self._step = [1.0 / s.weight for s in self._states]
        # A random phase per endpoint in [0, 1/w): processes do not all start on the same
        # replica, and equal weights still get exact round-robin spacing.
        self._heap = [(ctx.rng.random() * st, i) for i, st in enumerate(self._step)]
        heapq.heapify(self._heap)

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        if self._uniform:
            i = self._i
            s = self._states[i]
            if exclude and s in exclude:
                return self._excluding(exclude)
            self._i = i + 1 if i + 1 < self._n else 0
            return s
        heap = self._heap
        deadline, i = heap[0]
        s = self._states[i]
        if exclude and s in exclude:
            return self._excluding(exclude)
        heapq.heapreplace(heap, (deadline + self._step[i], i))
        return s

    def _excluding(self, exclude: Collection[EndpointState]) -> EndpointState | None:
        # Retries and hedges only (rare): a weighted random choice among the rest, which
        # leaves the schedule of everyone else untouched.
        rest = [s for s in self._states if s not in exclude]
        if not rest:
            return None
        x = self._random() * sum(s.weight for s in rest)
        for s in rest:
            x -= s.weight
            if x < 0:
                return s
        return rest[-1]


@attrs.frozen
class WeightedRoundRobin:
    """Smooth weighted round robin by earliest deadline first: exact shares, interleaved."""

    name: str = attrs.field(default=NAME, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _EdfPicker:
        return _EdfPicker(states, ctx)
