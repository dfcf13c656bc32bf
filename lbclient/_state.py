"""Per-endpoint runtime state: mutable, slotted, kept apart from the immutable `Endpoint`.

One :class:`EndpointState` lives as long as its endpoint is a member of the pool; when
membership changes, survivors keep theirs (statistics, EWMA, breaker).  Only the
balancer mutates it, always on the event loop thread, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from ._endpoint import Endpoint

if TYPE_CHECKING:
    from ._breaker import BreakerState

__all__ = ["EndpointState"]

PENALTY_DECAY = 2.0
"""Seconds for a failure penalty to fade by 1/e (a 4x penalty is back to 1x in ~3 s)."""

_RING = 256  # recent latencies kept per endpoint for p50/p99 (power of two)
_exp = math.exp


class EndpointState:
    """What the balancer knows about one endpoint right now.

    ``cost`` is the peak-EWMA latency estimate in seconds (Finagle's ``PeakEwma``): a
    sample above the estimate replaces it at once (peak-sensitive), a sample below is
    blended in with weight ``1 - exp(-dt/decay)`` (time-decayed, so it does not matter
    how many samples arrive per second).  Reading it decays it towards zero with idle
    time, so a slow endpoint that got no traffic is eventually tried again.
    """

    __slots__ = (
        "_lat",
        "_lat_i",
        "available",
        "breaker",
        "cap_seen",
        "chunks",
        "cost",
        "decay",
        "draining",
        "endpoint",
        "failures",
        "health_down",
        "hedges_sent",
        "hedges_won",
        "idle",
        "inflight",
        "last_failure",
        "peak_inflight",
        "penalty",
        "penalty_at",
        "ramp_from",
        "requests",
        "retries_denied",
        "retries_sent",
        "server_load",
        "server_load_at",
        "stamp",
        "started",
        "stream_time",
        "ttft",
        "url",
        "weight",
    )

    def __init__(self, endpoint: Endpoint, *, now: float, decay: float, cost: float) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        self.weight = endpoint.weight  # effective weight (slow start scales it)
        self.inflight = 0
        self.peak_inflight = 0
        self.cap_seen = 1  # most concurrent calls seen completing without slowing down
        self.requests = 0
        self.failures = 0
        self.retries_sent = 0
        self.retries_denied = 0
        self.hedges_sent = 0
        self.hedges_won = 0
        self.cost = cost
        self.stamp = now
        self.decay = decay
        self.started = now
        self.last_failure = -math.inf
        self.penalty = 0.0  # failure penalty in seconds, fading (see penalize)
        self.penalty_at = 0.0
        self.draining = False
        self.health_down = False
        self.ramp_from: float | None = None  # slow start: when the ramp began
        self.available = True
        self.breaker: BreakerState | None = None
        self.server_load: float | None = None
        self.server_load_at = 0.0
        self.ttft: float | None = None
        self.chunks = 0
        self.stream_time = 0.0
        self.idle: asyncio.Event | None = None
        self._lat = [0.0] * _RING
        self._lat_i = 0

    # -- load metrics (read on every pick: keep them tiny) -------------------------------

    def ewma(self, now: float) -> float:
        """Peak-EWMA latency in seconds, decayed for the time since the last sample."""
        dt = now - self.stamp
        cost = self.cost if dt <= 0.0 else self.cost * _exp(-dt / self.decay)
        if self.penalty:
            p = self.penalty * _exp(-(now - self.penalty_at) / PENALTY_DECAY)
            if p > cost:
                return p
        return cost

    # -- outcomes ------------------------------------------------------------------------

    def observe(self, rtt: float, now: float) -> None:
        """Record one latency sample (seconds) into the EWMA and the recent-latency ring."""
        cost = self.cost
        if self.inflight > self.cap_seen and rtt <= 2.0 * cost:
            self.cap_seen = self.inflight
        if rtt > cost:
            self.cost = rtt
        else:
            dt = now - self.stamp
            # Even back-to-back samples must move the estimate a little: w is clamped at
            # 0.97, which exp(-dt/decay) exceeds whenever dt < 0.0304 decay.
            w = 0.97 if dt < 0.0304 * self.decay else _exp(-dt / self.decay)
            self.cost = cost * w + rtt * (1.0 - w)
        self.stamp = now
        i = self._lat_i
        self._lat[i & (_RING - 1)] = rtt
        self._lat_i = i + 1

    @property
    def sampled(self) -> bool:
        """Has at least one latency been measured (not just a pick made)?"""
        return self._lat_i > 0

    def penalize(self, rtt: float, now: float, cap: float = 10.0) -> None:
        """Price a failure as a response that took ``rtt`` seconds.

        The penalty sits beside the latency estimate (which stays a true latency) and
        fades with its own, short time constant (:data:`PENALTY_DECAY`), so a replica
        that failed once is avoided for a few seconds, then tried again -- it must not
        wait for the 10 s latency EWMA to forget.  A failure within ~8 s of the last one
        doubles the last penalty (up to ``cap``): a replica failing half its calls stays
        priced out, one that failed once comes back within seconds.  Successes do not clear it
        (they would, every other call, on a brownout); a breaker closing does.
        """
        if self.penalty and now - self.penalty_at < 4.0 * PENALTY_DECAY:
            # Failing again within ~8 s of the last failure: double the last penalty.
            doubled = 2.0 * self.penalty if 2.0 * self.penalty < cap else cap
            if doubled > rtt:
                rtt = doubled
        self.penalty = rtt
        self.penalty_at = now

    def reset_cost(self, cost: float, now: float) -> None:
        """Start the estimate afresh (an endpoint back from ejection)."""
        self.cost = cost
        self.stamp = now
        self.penalty = 0.0

    def recent_latencies(self) -> list[float]:
        """The most recent latency samples (up to 256), oldest first is not guaranteed."""
        n = min(self._lat_i, _RING)
        return self._lat[:n] if self._lat_i <= _RING else list(self._lat)

    def __repr__(self) -> str:
        return f"<EndpointState {self.url} inflight={self.inflight} cost={self.cost * 1e3:.1f}ms>"
