"""Load metrics: the numbers pickers compare.  Lower is better; all are divided by weight.

A load metric is a plain function ``(state, now) -> float``; pick algorithms (P2C,
argmin) take one as a parameter, so "what is load" and "how to choose" stay separate
axes (Finagle's ``Balancer`` x ``Load`` split).  Latency-based metrics come in two
flavours: whole-call latency for plain calls, time to first chunk for streams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .state import EndpointState

if TYPE_CHECKING:
    from ..strategies import Totals

__all__ = [
    "SERVER_LOAD_TTL",
    "LoadMetric",
    "inflight_load",
    "outstanding",
    "peak_ewma_load",
    "peak_ewma_ttft_load",
    "token_loads",
    "token_outstanding",
]

LoadMetric = Callable[[EndpointState, float], float]

SERVER_LOAD_TTL = 2.0
"""Seconds a server-reported load (e.g. ``x-queue-depth``) is trusted after it arrived."""


def outstanding(s: EndpointState, now: float) -> float:
    """In-flight requests, or the server-reported queue depth if fresher and higher."""
    q: float = s.inflight
    sl = s.server_load
    # The server's own queue depth counts every client's requests, ours included.
    if sl is not None and sl > q and now - s.server_load_at < SERVER_LOAD_TTL:
        q = sl
    return q


def inflight_load(s: EndpointState, now: float) -> float:
    """Outstanding requests per unit of weight (``least_connections``, ``power_of_two``)."""
    return outstanding(s, now) / s.weight


def peak_ewma_load(s: EndpointState, now: float) -> float:
    """Expected wait: peak-EWMA latency x (outstanding + 1), per unit of weight.

    The ``+ 1`` prices the request being placed, so an idle slow replica still costs
    its latency (Finagle ``PeakEwma``, Linkerd's ``PeakEwma`` load).
    """
    return s.ewma(now) * (outstanding(s, now) + 1.0) / s.weight


def peak_ewma_ttft_load(s: EndpointState, now: float) -> float:
    """:func:`peak_ewma_load` for streams: on the time to first chunk."""
    return s.ttft_ewma(now) * (outstanding(s, now) + 1.0) / s.weight


def token_outstanding(s: EndpointState, now: float, mean_tokens: float) -> float:
    """Outstanding work in *calls of average size*: the estimated tokens in flight
    divided by the pool's mean call size (a 30,000-token prompt weighs 60 calls of 500),
    or the plain count when that is higher (calls that gave no estimate)."""
    q = outstanding(s, now)
    if mean_tokens > 0:
        t = s.tokens / mean_tokens
        if t > q:
            return t
    return q


def token_loads(totals: Totals) -> tuple[LoadMetric, LoadMetric, LoadMetric]:
    """The token-aware versions of ``(inflight_load, peak_ewma_load,
    peak_ewma_ttft_load)``, for calls that gave ``tokens=``: load is counted in tokens
    in flight, not requests."""

    def inflight_tokens(s: EndpointState, now: float) -> float:
        return token_outstanding(s, now, totals.mean_tokens) / s.weight

    def peak_ewma_tokens(s: EndpointState, now: float) -> float:
        return s.ewma(now) * (token_outstanding(s, now, totals.mean_tokens) + 1.0) / s.weight

    def peak_ewma_ttft_tokens(s: EndpointState, now: float) -> float:
        return s.ttft_ewma(now) * (token_outstanding(s, now, totals.mean_tokens) + 1.0) / s.weight

    return inflight_tokens, peak_ewma_tokens, peak_ewma_ttft_tokens
