"""``power_of_two`` and ``peak_ewma``: power of two choices (P2C) over a load metric.

Draw two distinct endpoints at random, send to the less loaded.  O(1) per pick, and
exponentially better balance than one random choice ("The Power of Two Choices in
Randomized Load Balancing", Mitzenmacher 2001); randomness also keeps many independent
clients from herding onto the same replica.  This is the picker of Finagle
(``P2CPeakEwma``), Linkerd and gRPC's ``least_request``.

* ``power_of_two`` compares in-flight requests (per unit of weight).
* ``peak_ewma`` compares peak-EWMA latency x (in-flight + 1): it learns that a replica
  is slow *before* its queue builds up, and reacts at once to a latency spike.  The
  default, because LLM replicas differ wildly in speed (GPU type, batch size, context
  length) and latency is what users feel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import attrs

from .._load import LoadMetric, inflight_load, peak_ewma_load
from .._state import EndpointState
from ._base import PickContext

_exp = math.exp

POWER_OF_TWO = "power_of_two"
PEAK_EWMA = "peak_ewma"


class P2CPicker:
    """Two random distinct candidates, the lower ``load`` wins (ties: the first drawn)."""

    __slots__ = ("_load", "_n", "_now", "_random", "_states")

    def __init__(self, states: Sequence[EndpointState], ctx: PickContext, load: LoadMetric):
        self._states = tuple(states)
        self._n = len(self._states)
        self._load = load
        self._now: Callable[[], float] = ctx.clock.now
        self._random = ctx.rng.random

    def pick(self, key: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        n = self._n
        states = self._states
        if n == 1:
            s = states[0]
            return None if exclude and s in exclude else s
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
                return self._fallback(exclude)
        now = self._now()
        load = self._load
        return b if load(b, now) < load(a, now) else a

    def _fallback(self, exclude: Collection[EndpointState]) -> EndpointState | None:
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
        return b if self._load(b, now) < self._load(a, now) else a


class _P2CInflight(P2CPicker):
    """P2C on in-flight per weight, with the metric inlined on the common path."""

    __slots__ = ()

    def pick(self, key: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        if exclude or self._n == 1:
            return super().pick(key, exclude)
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


class _P2CPeakEwma(P2CPicker):
    """P2C on peak-EWMA x (in-flight + 1) per weight, inlined on the common path."""

    __slots__ = ()

    def pick(self, key: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        if exclude or self._n == 1:
            return super().pick(key, exclude)
        return self.pick_now(self._now())

    def pick_now(self, now: float) -> EndpointState:
        """``pick(None, None)`` at a time the caller already read (the decorator's fast
        path): one clock read per call instead of two."""
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
        if a.server_load is not None or b.server_load is not None or a.penalty or b.penalty:
            return b if peak_ewma_load(b, now) < peak_ewma_load(a, now) else a
        # peak_ewma_load inlined: cost decayed for idle time, x (in-flight + 1) / weight.
        # A gap under 1% of the decay time changes the cost by under 1%: skip the exp.
        dt = now - a.stamp
        la = (
            (a.cost if dt < 0.01 * a.decay else a.cost * _exp(-dt / a.decay))
            * (a.inflight + 1)
            / a.weight
        )
        dt = now - b.stamp
        lb = (
            (b.cost if dt < 0.01 * b.decay else b.cost * _exp(-dt / b.decay))
            * (b.inflight + 1)
            / b.weight
        )
        return b if lb < la else a


@attrs.frozen
class PowerOfTwo:
    """P2C on in-flight requests per unit of weight."""

    name: str = attrs.field(default=POWER_OF_TWO, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> P2CPicker:
        return _P2CInflight(states, ctx, inflight_load)


@attrs.frozen
class PeakEwma:
    """P2C on peak-EWMA latency x (in-flight + 1) per unit of weight (Finagle, Linkerd)."""

    name: str = attrs.field(default=PEAK_EWMA, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> P2CPicker:
        return _P2CPeakEwma(states, ctx, peak_ewma_load)
