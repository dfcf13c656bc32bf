"""``random``: a weighted random endpoint per pick (O(log n) by bisection).

Stateless and coordination-free, so many processes spread evenly without talking; but,
like round robin, blind to load.  Weights are honoured in expectation.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from ..pool.state import EndpointState
from ._base import PickContext

if TYPE_CHECKING:
    from .._context import CallContext

NAME = "random"


class _RandomPicker:
    __slots__ = ("_cum", "_n", "_random", "_states", "_total", "_uniform")

    def __init__(self, states: Sequence[EndpointState], ctx: PickContext) -> None:
        self._states = tuple(states)
        self._n = len(self._states)
        weights = [s.weight for s in self._states]
        self._uniform = len(set(weights)) == 1
        self._cum = list(itertools.accumulate(weights))
        self._total = self._cum[-1]
        self._random = ctx.rng.random

    def _draw(self) -> int:
        if self._uniform:
            return int(self._random() * self._n)
        i = bisect.bisect_right(self._cum, self._random() * self._total)
        return i if i < self._n else self._n - 1

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        s = self._states[self._draw()]
        if not exclude or s not in exclude:
            return s
        for _ in range(8):  # a few more draws, then an exact answer
            s = self._states[self._draw()]
            if s not in exclude:
                return s
        rest = [(s, s.weight) for s in self._states if s not in exclude]
        if not rest:
            return None
        total = sum(w for _, w in rest)
        x = self._random() * total
        for s, w in rest:
            x -= w
            if x < 0:
                return s
        return rest[-1][0]


@attrs.frozen
class Random:
    """A weighted random pick (weights honoured in expectation)."""

    name: str = attrs.field(default=NAME, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _RandomPicker:
        return _RandomPicker(states, ctx)
