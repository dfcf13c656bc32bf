"""Per-endpoint runtime state: mutable, slotted, kept apart from the immutable `Endpoint`.

One :class:`EndpointState` lives as long as its endpoint is a member of the pool; when
membership changes, survivors keep theirs (statistics, EWMAs, breaker).  Everyone may read
it; only the pool writes it (:mod:`lbclient.pool.pool` for membership and health,
:mod:`lbclient.pool.lease` for call outcomes), always on the event loop thread, so no
locks are needed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .._endpoint import Endpoint, max_context

if TYPE_CHECKING:
    import asyncio

    from ..policies.breaker import BreakerState
    from ..shared.protocol import Shared
    from .limits import LimitState

__all__ = ["PENALTY_DECAY", "EndpointState", "Latency", "ln1"]

PENALTY_DECAY = 2.0
"""Seconds for a failure penalty to fade by 1/e (a 4x penalty is back to 1x in ~3 s)."""

_RING = 256  # recent latencies kept per endpoint for p50/p99 (power of two)
_exp = math.exp
_log = math.log
_NEG_INF = -math.inf
LN1 = tuple(math.log(n + 1.0) for n in range(1024))
"""``LN1[n] == log(n + 1)``: the in-flight term of :attr:`EndpointState.score`, looked up."""


def ln1(n: int) -> float:
    """``log(n + 1)``, from :data:`LN1` when it is there."""
    return LN1[n] if 0 <= n < 1024 else _log(n + 1.0 if n > 0 else 1.0)


class Latency:
    """A peak-EWMA latency estimate (Finagle's ``PeakEwma``) and the recent samples.

    ``cost`` is the estimate in seconds: a sample above it replaces it at once
    (peak-sensitive), a sample below is blended in with weight ``1 - exp(-dt/decay)``
    (time-decayed, so it does not matter how many samples arrive per second).  Reading it
    with :meth:`at` decays it towards zero with idle time, so a slow endpoint that got no
    traffic is eventually tried again.  ``cap_seen`` is the most concurrent calls seen
    finishing without slowing down (at most twice the estimate): a learned lower bound
    of the replica's parallelism.
    """

    __slots__ = ("_i", "_ring", "cap_seen", "cost", "decay", "stamp")

    def __init__(self, cost: float, now: float, decay: float) -> None:
        self.cost = cost
        self.stamp = now
        self.decay = decay
        self.cap_seen = 1
        self._ring: list[float] = []  # grows to _RING samples, then wraps
        self._i = 0

    def at(self, now: float) -> float:
        """The estimate, decayed for the time since the last sample."""
        dt = now - self.stamp
        return self.cost if dt <= 0.0 else self.cost * _exp(-dt / self.decay)

    def sample(self, rtt: float, now: float, inflight: int) -> None:
        """One sample (seconds), taken with ``inflight`` calls running on the endpoint."""
        cost = self.cost
        if inflight > self.cap_seen and rtt <= 2.0 * cost:
            self.cap_seen = inflight
        if rtt > cost:
            self.cost = rtt
        else:
            dt = now - self.stamp
            # Even back-to-back samples must move the estimate a little: w is clamped at
            # 0.97, which exp(-dt/decay) exceeds whenever dt < 0.0304 decay.
            w = 0.97 if dt < 0.0304 * self.decay else _exp(-dt / self.decay)
            self.cost = cost * w + rtt * (1.0 - w)
        self.stamp = now
        i = self._i
        if i < _RING:
            self._ring.append(rtt)
        else:
            self._ring[i & (_RING - 1)] = rtt
        self._i = i + 1

    @property
    def count(self) -> int:
        """Samples observed so far."""
        return self._i

    def last_mean(self, k: int) -> float | None:
        """The mean of the last ``k`` samples (fewer if there are fewer), or None.  Unlike
        the estimate it forgets a prior and a past spike within ``k`` samples."""
        n = self._i
        if n == 0:
            return None
        ring = self._ring
        k = min(k, n, _RING)
        total = 0.0
        for j in range(1, k + 1):
            total += ring[(n - j) & (_RING - 1)]
        return total / k

    def recent(self) -> list[float]:
        """The most recent samples (up to 256), in no particular order."""
        return list(self._ring)


class EndpointState(Latency):
    """What the pool knows about one endpoint right now.

    Latency is kept twice: the state itself is the peak-EWMA estimate of *whole calls*
    (``cost``, ``stamp``, ``cap_seen``, recent samples; ``call`` names it), and ``ttft`` a
    second :class:`Latency` for the time to the first chunk of streams, so a pool serving
    both compares like with like (a stream's first token and a whole answer differ by
    orders of magnitude).  A failure adds a ``penalty`` beside them (see :meth:`ewma`).

    ``score`` is ``peak_ewma``'s load in a form that does not change with time:
    ``log(cost / weight) + stamp / decay + log(inflight + 1)``.  The decay for idle time
    multiplies every endpoint's load by the same ``exp(-now / decay)``, so comparing
    scores compares loads at any ``now`` -- and a pick reads one slot per endpoint, with
    no clock arithmetic.  It is ``-inf`` while the plain formula does not hold
    (a failure penalty, a server-reported load): the picker then computes the load in
    full.  Whoever writes ``cost``, ``stamp``, ``weight``, ``penalty`` or
    ``server_load`` calls :meth:`rekey`; whoever writes ``inflight`` refreshes
    ``score`` (``key + ln1(inflight)``).  Only the pool does either.
    """

    __slots__ = (
        "_idle",
        "available",
        "breaker",
        "cancelled",
        "chunks",
        "cooldown_until",
        "cut",
        "draining",
        "endpoint",
        "failures",
        "health_down",
        "hedges_sent",
        "hedges_won",
        "ignored",
        "inflight",
        "key",
        "last_failure",
        "limit",
        "lost",
        "max_context",
        "peak_inflight",
        "penalty",
        "penalty_at",
        "ramp_from",
        "remove_when_idle",
        "requests",
        "retries_denied",
        "retries_sent",
        "score",
        "server_load",
        "server_load_at",
        "started",
        "stream_time",
        "successes",
        "tokens",
        "ttft",
        "url",
        "weight",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        now: float,
        decay: float,
        cost: float,
        ttft_cost: float | None = None,
    ) -> None:
        super().__init__(cost, now, decay)
        self.endpoint = endpoint
        self.url = endpoint.url
        self.weight = endpoint.weight  # effective weight (slow start scales it)
        self.inflight = 0
        self.tokens = 0.0  # estimated tokens in flight (calls that gave tokens=)
        self.peak_inflight = 0
        self.requests = 0  # attempts sent here (first tries, retries, hedges)
        self.successes = 0
        self.failures = 0  # attempts that failed and counted against the endpoint
        self.ignored = 0  # attempts that failed, not the endpoint's fault (4xx, user bugs)
        self.cancelled = 0  # attempts cancelled (caller gave up, hedge lost)
        self.cut = 0  # attempts cut by the call's deadline (counted in failures too)
        self.lost = 0  # hedge losers that had run far longer than expected
        self.retries_sent = 0
        self.retries_denied = 0
        self.hedges_sent = 0
        self.hedges_won = 0
        self.ttft = Latency(cost if ttft_cost is None else ttft_cost, now, decay)
        self.started = now
        self.last_failure = -math.inf
        self.penalty = 0.0  # failure penalty in seconds, fading (see penalize)
        self.penalty_at = 0.0
        self.cooldown_until = -math.inf  # Retry-After: no picks before this clock time
        self.draining = False
        self.remove_when_idle = False
        self.health_down = False
        self.ramp_from: float | None = None  # slow start: when the ramp began
        self.available = True
        self.breaker: BreakerState | None = None
        self.server_load: float | None = None
        self.server_load_at = 0.0
        self.chunks = 0
        self.stream_time = 0.0
        self._idle: list[asyncio.Event] = []
        self.limit: LimitState | None = None
        self.max_context: float | None = None
        self.key = 0.0
        self.score = 0.0
        self.rekey()
        self.configure(endpoint)

    def configure(self, endpoint: Endpoint, shared: Shared | None = None) -> None:
        """Take the limits and context window of ``endpoint`` (a new member, or a
        survivor whose attributes changed: its windows are kept when the limits change).
        With ``shared``, the per-minute limits count across the fleet."""
        self.max_context = max_context(endpoint)
        limits = endpoint.limits
        if limits is None:
            self.limit = None
        elif self.limit is None or self.limit.limits != limits:
            from .limits import LimitState

            old = self.limit
            self.limit = LimitState(limits)
            if shared is not None:
                self.limit.share(shared, self.url)
            if old is not None:
                self.limit.carry(old)

    @property
    def call(self) -> Latency:
        """The whole-call latency estimate (the state itself)."""
        return self

    # -- load metrics (read on every pick: keep them tiny) -------------------------------

    def ewma(self, now: float) -> float:
        """Peak-EWMA call latency in seconds, decayed for idle time, or the failure
        penalty while that is higher."""
        dt = now - self.stamp
        cost = self.cost if dt <= 0.0 else self.cost * _exp(-dt / self.decay)
        if self.penalty:
            p = self.penalty * _exp(-(now - self.penalty_at) / PENALTY_DECAY)
            if p > cost:
                return p
        return cost

    def ttft_ewma(self, now: float) -> float:
        """:meth:`ewma` for streams: peak-EWMA time to first chunk, or the penalty."""
        cost = self.ttft.at(now)
        if self.penalty:
            p = self.penalty * _exp(-(now - self.penalty_at) / PENALTY_DECAY)
            if p > cost:
                return p
        return cost

    @property
    def sampled(self) -> bool:
        """Has at least one latency been measured (not just a pick made)?"""
        return self._i > 0 or self.ttft._i > 0

    # -- written by the pool only ---------------------------------------------------------

    def rekey(self, now: float | None = None) -> None:
        """Recompute ``key`` and ``score`` (see the class docstring) after ``cost``,
        ``stamp``, ``weight``, ``penalty`` or ``server_load`` changed.  Given ``now``, a
        penalty that has faded to nothing (20 s after the failure, under 0.1% of the
        latency estimate) is dropped first, so the endpoint is back on the plain formula."""
        if self.penalty and now is not None and now - self.penalty_at >= 10.0 * PENALTY_DECAY:
            p = self.penalty * _exp(-(now - self.penalty_at) / PENALTY_DECAY)
            if p < 1e-3 * self.ewma(now):
                self.penalty = 0.0
        cost = self.cost
        if self.penalty or self.server_load is not None or not cost > 0.0:
            self.key = _NEG_INF
        else:
            self.key = _log(cost / self.weight) + self.stamp / self.decay
        self.score = self.key + ln1(self.inflight)

    def observe(self, rtt: float, now: float) -> None:
        """Record one whole-call latency sample (seconds).

        The estimate is first decayed to when the call started (``now - rtt``) -- the
        value its pick compared, as Finagle's ``PeakEwma`` decays it on every read --
        so a sample after idle time is measured against what had been forgotten, not
        against a stale peak.  (Skipped for under 1% of the decay time.)"""
        t0 = now - rtt
        if t0 - self.stamp >= 0.01 * self.decay:
            self.cost *= _exp((self.stamp - t0) / self.decay)
            self.stamp = t0
        self.sample(rtt, now, self.inflight)
        self.rekey(now)

    def observe_ttft(self, ttft: float, now: float) -> None:
        """Record one time-to-first-chunk sample (seconds)."""
        self.ttft.sample(ttft, now, self.inflight)

    def penalize(self, rtt: float, now: float, cap: float = 10.0) -> None:
        """Price a failure as a response that took ``rtt`` seconds.

        The penalty sits beside the latency estimates (which stay true latencies) and
        fades with its own, short time constant (:data:`PENALTY_DECAY`), so a replica
        that failed once is avoided for a few seconds, then tried again -- it must not
        wait for the 10 s latency EWMA to forget.  A failure within ~8 s of the last one
        doubles the last penalty (up to ``cap``): a replica failing half its calls stays
        priced out, one that failed once comes back within seconds.  Successes do not
        clear it (they would, every other call, on a brownout); a breaker closing does.
        """
        if self.penalty and now - self.penalty_at < 4.0 * PENALTY_DECAY:
            doubled = 2.0 * self.penalty if 2.0 * self.penalty < cap else cap
            if doubled > rtt:
                rtt = doubled
        self.penalty = rtt
        self.penalty_at = now
        self.rekey()

    def reset_cost(self, cost: float, now: float) -> None:
        """Start the call estimate afresh (an endpoint back from ejection)."""
        self.cost = cost
        self.stamp = now
        self.penalty = 0.0
        self.rekey()

    def set_weight(self, weight: float) -> None:
        """The effective weight (slow start ramps it; a changed endpoint rescales it)."""
        self.weight = weight
        self.rekey()

    def set_server_load(self, value: float, now: float) -> None:
        """The server's own report of its queue depth, at ``now``."""
        self.server_load = value
        self.server_load_at = now
        self.rekey()

    def recent_latencies(self) -> list[float]:
        """The most recent whole-call latencies (up to 256), in no particular order."""
        return self.recent()

    def idle_event(self) -> asyncio.Event:
        """A fresh event set when no call is in flight here any more (``drain``).  Made
        per wait, in the waiter's own event loop, so a balancer outlives its loops."""
        import asyncio

        event = asyncio.Event()
        if self.inflight <= 0:
            event.set()
        else:
            self._idle.append(event)
        return event

    def wake_idle(self) -> None:
        """In-flight reached zero: wake every drain waiting for it."""
        waiters, self._idle = self._idle, []
        for event in waiters:
            event.set()

    def __repr__(self) -> str:
        return f"<EndpointState {self.url} inflight={self.inflight} cost={self.cost * 1e3:.1f}ms>"
