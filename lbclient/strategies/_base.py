"""The two protocols every strategy implements, and what a picker may read."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from .._clock import Clock
from ..pool.state import EndpointState

if TYPE_CHECKING:
    from .._context import CallContext
    from ..policies.geo import GeoTable

__all__ = ["PickContext", "Picker", "Strategy", "Totals"]


class Totals:
    """Pool-wide counters the pool keeps current (read by bounded-load hashing and the
    token-aware load metrics): calls in flight, estimated tokens in flight (calls that
    gave ``tokens=``) and the running mean of such calls' tokens.

    ``scored`` is set by a picker that reads
    :attr:`~lbclient.pool.state.EndpointState.score` (``peak_ewma``'s): from then on the
    pool keeps every state's score current; other pools skip that work."""

    __slots__ = ("inflight", "mean_tokens", "scored", "tokens")

    def __init__(self) -> None:
        self.inflight = 0
        self.tokens = 0.0
        self.mean_tokens = 0.0  # running mean of the calls that gave tokens=
        self.scored = False


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

    ``call`` is the call being placed (:class:`lbclient.CallContext`: its affinity
    ``key``, ``tenant``, estimated ``tokens``, ``prefix``, whether it is a ``stream``), or
    ``None`` for a call that carries nothing (the decorator's fast path).  ``exclude``
    holds endpoints this call should avoid (already tried, recently failed); return
    ``None`` if every candidate is excluded (the pool then decides what to do).

    A picker may also offer ``updated(states, ctx) -> Picker``: the pool then calls it
    instead of ``strategy.picker`` when the pickable set changes, so a picker with
    expensive state (the hash ring) can update it incrementally.
    """

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None: ...


@runtime_checkable
class Strategy(Protocol):
    """A replica-picking policy: builds a :class:`Picker` over an immutable snapshot.

    The pool calls ``picker()`` whenever membership or availability changes; the states
    it passes are the pickable ones (never empty).  Picks read live load from them
    (``inflight``, ``tokens``, ``ewma(now)``, ``ttft_ewma(now)``, ``weight``,
    ``server_load``, ``score``) but never mutate them.  (A picker that reads ``score``
    sets :attr:`Totals.scored` when it is built and refreshes the scores of its states
    once, the first time: from then on the pool keeps them current.)
    """

    name: str

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> Picker: ...
