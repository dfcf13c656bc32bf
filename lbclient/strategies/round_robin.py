"""``round_robin``: each endpoint in turn, ignoring weights and load.

Cheap (O(1) per pick) and fair in counts, but blind: a slow replica gets the same share
as a fast one, so its queue -- and your p99 -- grows.  Use it as a baseline or when
replicas are identical and uniformly loaded.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from ..pool.state import EndpointState
from ._base import PickContext

if TYPE_CHECKING:
    from .._context import CallContext

NAME = "round_robin"


class _RoundRobinPicker:
    __slots__ = ("_i", "_n", "_states")

    def __init__(self, states: Sequence[EndpointState], start: int) -> None:
        self._states = tuple(states)
        self._n = len(self._states)
        self._i = start

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        states, n = self._states, self._n
        for _ in range(n):
            i = self._i
            self._i = i + 1 if i + 1 < n else 0
            s = states[i]
            if not exclude or s not in exclude:
                return s
        return None


@attrs.frozen
class RoundRobin:
    """Each endpoint in turn (starting at a random one so processes do not synchronise)."""

    name: str = attrs.field(default=NAME, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _RoundRobinPicker:
        return _RoundRobinPicker(states, ctx.rng.randrange(len(states)))
