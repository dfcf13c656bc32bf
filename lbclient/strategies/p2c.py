"""``power_of_two`` and ``peak_ewma``: the least loaded of a few random choices.

Draw two distinct endpoints at random, send to the less loaded.  O(1) per pick, and
exponentially better balance than one random choice ("The Power of Two Choices in
Randomized Load Balancing", Mitzenmacher 2001); randomness also keeps many independent
clients from herding onto the same replica.  This is the picker of Finagle
(``P2CPeakEwma``), Linkerd and gRPC's ``least_request``.

* ``power_of_two`` compares in-flight requests (per unit of weight).
* ``peak_ewma`` compares peak-EWMA latency x (in-flight + 1): it learns that a replica
  is slow *before* its queue builds up, and reacts at once to a latency spike.  The
  default, because LLM replicas differ wildly in speed (GPU type, batch size, context
  length) and latency is what users feel.  Streams compare time to first chunk.

  It compares more than two: every endpoint in pools of up to :data:`SCAN_WINDOW`, a
  window of that many from a random start in larger ones.  Two random candidates of
  three miss the best one a third of the time, and with replicas of mixed speeds that
  is what the tail is made of: against an oracle that knows every queue and speed
  (``benchmarks/sim.py``), P2C on peak-EWMA measured 2.0-2.3x the oracle's p99 on ten
  and twenty single-slot replicas of mixed speeds (loads 50-85%), the window of 16
  1.1-1.3x (1.34-1.55x on 64 replicas, where scanning all 64 gives 1.31-1.44x).  The
  random start keeps independent clients from all comparing the same endpoints.  A
  pick reads one number per endpoint, kept up to date by the pool
  (:attr:`~lbclient.pool.state.EndpointState.score`, peak-EWMA load in a form that does
  not move with time): about 0.03 us per endpoint compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from ..pool.load import LoadMetric, inflight_load, peak_ewma_load, peak_ewma_ttft_load, token_loads
from ..pool.state import EndpointState
from ._base import PickContext

if TYPE_CHECKING:
    from .._context import CallContext

_INF = math.inf
_NEG_INF = -math.inf

POWER_OF_TWO = "power_of_two"
PEAK_EWMA = "peak_ewma"
SCAN_WINDOW = 16
"""``peak_ewma`` compares this many endpoints per pick (all of them in smaller pools)."""


class P2CPicker:
    """Two random distinct candidates, the lower load wins (ties: the first drawn).

    ``load`` is the metric for plain calls, ``stream_load`` for streams (default: the
    same); calls that gave ``tokens=`` use the token-aware version of either
    (:func:`~lbclient.pool.load.token_loads`)."""

    __slots__ = ("_load", "_n", "_now", "_random", "_states", "_stream_load", "_tokens")

    def __init__(
        self,
        states: Sequence[EndpointState],
        ctx: PickContext,
        load: LoadMetric,
        stream_load: LoadMetric | None = None,
    ):
        self._states = tuple(states)
        self._n = len(self._states)
        self._load = load
        self._stream_load = stream_load or load
        self._now: Callable[[], float] = ctx.clock.now
        self._random = ctx.rng.random
        inflight_t, peak_t, ttft_t = token_loads(ctx.totals)
        if load is inflight_load:
            self._tokens = (inflight_t, inflight_t)
        else:
            self._tokens = (peak_t, ttft_t if stream_load is peak_ewma_ttft_load else peak_t)

    def _load_for(self, call: CallContext | None) -> LoadMetric:
        if call is None:
            return self._load
        if call.tokens:
            return self._tokens[1] if call.stream else self._tokens[0]
        return self._stream_load if call.stream else self._load

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        n = self._n
        states = self._states
        if n == 1:
            s = states[0]
            return None if exclude and s in exclude else s
        load = self._load_for(call)
        rnd = self._random
        i = int(rnd() * n)
        j = int(rnd() * (n - 1))
        if j >= i:
            j += 1
        a, b = states[i], states[j]
        if exclude:
            a_out, b_out = a in exclude, b in exclude
            if a_out or b_out:
                if not a_out:
                    return a
                if not b_out:
                    return b
                return self._fallback(exclude, load)
        now = self._now()
        return b if load(b, now) < load(a, now) else a

    def _fallback(
        self, exclude: Collection[EndpointState], load: LoadMetric
    ) -> EndpointState | None:
        rest = [s for s in self._states if s not in exclude]
        if not rest:
            return None
        if len(rest) == 1:
            return rest[0]
        rnd = self._random
        i = int(rnd() * len(rest))
        j = int(rnd() * (len(rest) - 1))
        if j >= i:
            j += 1
        now = self._now()
        a, b = rest[i], rest[j]
        return b if load(b, now) < load(a, now) else a


class _P2CInflight(P2CPicker):
    """P2C on in-flight per weight, with the metric inlined on the common path."""

    __slots__ = ()

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        if exclude or self._n == 1 or (call is not None and call.tokens):
            return super().pick(call, exclude)
        return self.pick_now(0.0)

    def pick_now(self, now: float) -> EndpointState:
        """``pick(None, None)`` for the decorator's fast path."""
        n = self._n
        states = self._states
        if n == 1:
            return states[0]
        rnd = self._random
        i = int(rnd() * n)
        j = int(rnd() * (n - 1))
        if j >= i:
            j += 1
        a, b = states[i], states[j]
        if a.server_load is not None or b.server_load is not None:
            now = self._now()  # server-reported load expires: needs the real time
            return b if inflight_load(b, now) < inflight_load(a, now) else a
        return b if b.inflight * a.weight < a.inflight * b.weight else a


class _PeakEwma(P2CPicker):
    """The least peak-EWMA x (in-flight + 1) per weight among a random window of up to
    :data:`SCAN_WINDOW` endpoints (all of them in smaller pools)."""

    __slots__ = ("_ring", "_window")

    def __init__(
        self,
        states: Sequence[EndpointState],
        ctx: PickContext,
        load: LoadMetric,
        stream_load: LoadMetric | None = None,
    ):
        super().__init__(states, ctx, load, stream_load)
        if not ctx.totals.scored:  # from now on the pool keeps the scores read here current
            ctx.totals.scored = True
            for s in self._states:
                s.rekey()
        self._window = min(self._n, SCAN_WINDOW)
        # The states twice over: a window from any start is one slice.
        self._ring = self._states + self._states[: self._window - 1]

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        if self._n == 1:
            return super().pick(call, exclude)
        if not exclude and (call is None or not (call.stream or call.tokens)):
            return self.pick_now(self._now())
        start = int(self._random() * self._n)
        best = self._scan(start, self._now(), exclude, self._load_for(call))
        if best is None and exclude and self._window < self._n:
            # every endpoint in the window was excluded: look at the others too
            return self._fallback(exclude, self._load_for(call))
        return best

    def pick_now(self, now: float) -> EndpointState:
        """``pick(None, None)`` at a time the caller already read (the decorator's fast
        path).  The least :attr:`~lbclient.pool.state.EndpointState.score` of the window
        is the least load (ties: the first from a random start); a score of ``-inf``
        means some endpoint there needs the full formula (a penalty, a server-reported
        load), and the window is scanned with it."""
        if self._n == 1:
            return self._states[0]
        start = int(self._random() * self._n)
        best = None
        least = _INF
        for s in self._ring[start : start + self._window]:
            v = s.score
            if v < least:
                best, least = s, v
        if best is None or least == _NEG_INF:
            return self._scan(start, now, None, peak_ewma_load)  # type: ignore[return-value]
        return best

    def _scan(
        self,
        start: int,
        now: float,
        exclude: Collection[EndpointState] | None,
        load: LoadMetric,
    ) -> EndpointState | None:
        """The least ``load`` of the window from ``start`` (ties: the first)."""
        best: EndpointState | None = None
        best_load = _INF
        for s in self._ring[start : start + self._window]:
            if exclude and s in exclude:
                continue
            v = load(s, now)
            if best is None or v < best_load:
                best, best_load = s, v
        return best


@attrs.frozen
class PowerOfTwo:
    """P2C on in-flight requests per unit of weight."""

    name: str = attrs.field(default=POWER_OF_TWO, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> P2CPicker:
        return _P2CInflight(states, ctx, inflight_load)


@attrs.frozen
class PeakEwma:
    """Peak-EWMA latency x (in-flight + 1) per unit of weight (Finagle, Linkerd), the
    least of a random window of up to :data:`SCAN_WINDOW` endpoints."""

    name: str = attrs.field(default=PEAK_EWMA, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> P2CPicker:
        return _PeakEwma(states, ctx, peak_ewma_load, peak_ewma_ttft_load)
