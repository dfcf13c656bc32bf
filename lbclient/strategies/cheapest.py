"""Cost-aware picking: the cheapest endpoint whose latency stays close to the best.

``Balancer(cost=lbclient.CostPolicy(latency_factor=1.5))`` wraps the balancer's strategy
in :class:`Cheapest`.  On each pick, among the candidates (pickable, not excluded):

1. each one's *expected latency* is estimated: the mean of its last 16 latencies
   (streams: times to first chunk), or its failure penalty while that is higher, times
   ``max(1, (outstanding + 1) / parallelism)``, the parallelism being what the endpoint
   has been seen to sustain (``cap_seen``) or its ``slots``.  Not the peak EWMA: that
   one comes down from a spike (or from its prior) over ~10 s by design, which would
   keep a cheap endpoint out long after it recovered.  The estimate fades with idle
   time, as ``peak_ewma``'s does, so an endpoint left aside (a dear one, or a cheap one
   that was slow for a while) is tried again now and then and measured afresh;
2. the candidates within ``latency_factor`` of the best expected latency are kept;
3. of those, the ones with the lowest expected cost for this call (its tokens and
   expected duration at each endpoint's price, see :class:`~lbclient.CostPolicy`);
   an endpoint with no latency sample yet gets one call first (one at a time): its
   prior is no measure of it;
4. the wrapped strategy picks among them (so load still decides between equally
   cheap endpoints, and affinity, locality... still apply).

When every candidate costs the same (or none has a price) this is the wrapped
strategy unchanged.  A pick costs O(n) in the candidates: meant for pools of up to a
few dozen endpoints, typical of priced ones.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

from ..policies.cost import CostPolicy, Price, PriceBook
from ..pool.load import outstanding
from ..pool.state import EndpointState
from ._base import PickContext, Picker, Strategy

if TYPE_CHECKING:
    from .._context import CallContext

__all__ = ["RECENT", "Cheapest", "expected_latency"]

_exp = math.exp


RECENT = 16
"""Samples the expected latency averages (see :func:`expected_latency`)."""


def expected_latency(s: EndpointState, now: float, stream: bool, slots: int = 1) -> float:
    """Seconds a new call is expected to take at ``s`` (see the module docstring)."""
    est = s.ttft if stream else s.call
    lat = est.last_mean(RECENT)
    if lat is None:
        lat = est.at(now)  # never measured: the prior
    else:
        dt = now - est.stamp
        if dt > 0:
            lat *= _exp(-dt / est.decay)  # idle: fade, so it is tried again
    penalized = s.ttft_ewma(now) if stream else s.ewma(now)
    if penalized > est.at(now) and penalized > lat:
        lat = penalized  # a recent failure
    parallel = max(s.ttft.cap_seen if stream else s.cap_seen, slots)
    q = (outstanding(s, now) + 1.0) / parallel
    return lat * q if q > 1.0 else lat


class _CheapestPicker:
    __slots__ = ("_book", "_inner", "_now", "_policy", "_prices", "_states", "_uniform")

    def __init__(
        self,
        states: Sequence[EndpointState],
        ctx: PickContext,
        inner: Picker,
        policy: CostPolicy,
        book: PriceBook,
    ) -> None:
        self._states = tuple(states)
        self._inner = inner
        self._policy = policy
        self._now = ctx.clock.now
        self._book = book
        self._prices: tuple[Price | None, ...] = tuple(book.get(s.endpoint) for s in states)
        first = self._prices[0] if self._prices else None
        self._uniform = all(p == first for p in self._prices)  # nothing to choose on price

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        if self._uniform:
            return self._inner.pick(call, exclude)
        prices = self._prices
        policy = self._policy
        factor = policy.latency_factor
        assert factor is not None
        now = self._now()
        stream = call is not None and call.stream
        tokens = policy.estimate_tokens
        if call is not None and call.tokens is not None:
            tokens = call.tokens
        cands: list[tuple[EndpointState, Price | None, float]] = []
        best = float("inf")
        for s, p in zip(self._states, prices, strict=True):
            if exclude and s in exclude:
                continue
            lat = expected_latency(s, now, stream, p.slots if p is not None else 1)
            cands.append((s, p, lat))
            if lat < best:
                best = lat
        if not cands:
            return None
        # An endpoint never measured has only a prior for a latency: measure it once
        # (one call at a time) before its price or its prior decides anything.
        fresh = {s for s, _, _ in cands if not s.sampled and not s.inflight}
        if fresh and len(fresh) < len(cands):
            out = set(exclude) if exclude else set()
            out.update(s for s, _, _ in cands if s not in fresh)
            chosen = self._inner.pick(call, out)
            if chosen is not None:
                return chosen
        limit = best * factor
        costs: list[tuple[float, EndpointState]] = []
        cheapest = float("inf")
        for s, p, lat in cands:
            if lat > limit:
                continue
            c = 0.0 if p is None else p.expected(tokens, lat, policy.output_share)
            costs.append((c, s))
            if c < cheapest:
                cheapest = c
        keep = {s for c, s in costs if c <= cheapest * (1.0 + 1e-9)}
        if len(keep) == len(cands):
            return self._inner.pick(call, exclude)
        out = set(exclude) if exclude else set()
        out.update(s for s, _, _ in cands if s not in keep)
        chosen = self._inner.pick(call, out)
        if chosen is None or chosen not in keep:
            # A strategy that ignores exclude (or found none): the least loaded cheap one.
            return min(keep, key=lambda s: expected_latency(s, now, stream))
        return chosen


class Cheapest:
    """``strategy`` made cost-aware under ``policy`` (see the module docstring)."""

    def __init__(self, strategy: Strategy, policy: CostPolicy) -> None:
        if policy.latency_factor is None:
            raise ValueError("Cheapest needs a CostPolicy with a latency_factor")
        self.inner = strategy
        self.policy = policy
        self.name = strategy.name
        self.book = PriceBook()

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> Picker:
        return _CheapestPicker(states, ctx, self.inner.picker(states, ctx), self.policy, self.book)

    def __repr__(self) -> str:
        return f"<Cheapest {self.inner!r} within x{self.policy.latency_factor:g}>"
