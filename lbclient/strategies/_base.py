"""The two protocols every strategy implements, and what a picker may read."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from .._clock import Clock
from .._state import EndpointState

if TYPE_CHECKING:
    from .._geo import GeoTable

__all__ = ["PickContext", "Picker", "Strategy", "Totals"]


class Totals:
    """Pool-wide counters the balancer keeps current (read by bounded-load hashing)."""

    __slots__ = ("inflight",)

    def __init__(self) -> None:
        self.inflight = 0


@attrs.frozen(kw_only=True)
class PickContext:
    """What a strategy may use besides the endpoint states: time, randomness, geography."""

    clock: Clock
    rng: random.Random
    totals: Totals
    region: str | None = None
    geo: GeoTable | None = None


@runtime_checkable
class Picker(Protocol):
    """Picks one endpoint from the snapshot it was built over.  Synchronous: never awaits.

    ``exclude`` holds endpoints this call already tried; return ``None`` if every
    candidate is excluded (the balancer then decides what to do).
    """

    def pick(
        self, key: object, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None: ...


@runtime_checkable
class Strategy(Protocol):
    """A replica-picking policy: builds a :class:`Picker` over an immutable snapshot.

    The balancer calls ``picker()`` whenever membership or availability changes; the
    states it passes are the pickable ones (never empty).  Picks read live load from
    them (``inflight``, ``ewma(now)``, ``weight``, ``server_load``) but never mutate them.
    """

    name: str

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> Picker: ...
