"""The adaptive concurrency limit: a gradient limiter on latency that does not depend on
output length.

Each call that finishes gives a sample of one *kind*: ``"ttft"`` (a stream's time to
first chunk), ``"per_token"`` (latency divided by the call's estimated tokens) or
``"latency"`` (plain latency, for calls that give neither).  Each kind keeps its own
no-load baseline, so a balancer serving streams and batch calls compares like with like,
and a long generation never reads as congestion.

Every window (>= 8 samples and >= 20 ms, or 256 samples, or 1 s with at least one) the
window's median
``short`` is compared with the baseline ``base``::

    gradient = clamp(tolerance x base / short, 0.5, 1.0)     # tolerance 1.5
    limit    = limit x gradient                               # shrink at once
             + sqrt(limit)    if gradient == 1 and the limit was in use  # probe up

(Netflix concurrency-limits' Gradient2 and Envoy's adaptive concurrency filter.)  Their
known failures are avoided here: the baseline may only drift *up* in windows that ran
well below the limit, so sustained queueing cannot raise it (Vegas' ``rtt_noload``
drift); growth needs no congestion at all (``gradient == 1``) and a limit that was
actually used, so modest overload cannot grow it without bound (Gradient2 PR 134); and
it shrinks at once but grows by half steps.  An explicit overload signal -- a replica
answering 429 or 503 -- multiplies the limit by 0.9 at the end of its window whatever
the latencies say.
"""

from __future__ import annotations

import math

__all__ = ["KINDS", "GradientLimiter"]

KINDS = ("ttft", "per_token", "latency")
TOLERANCE = 1.5  # latency up to this multiple of the baseline is not congestion
MIN_SAMPLES = 8
MAX_SAMPLES = 256  # a busy client closes a window at this many (its median is plenty)
MIN_WINDOW = 0.02  # seconds
MAX_WINDOW = 1.0  # seconds: a window closes by then with at least one sample
BACKOFF = 0.9  # multiplicative decrease on an explicit overload signal
DRIFT = 0.1  # how fast a quiet window may raise the baseline
SMOOTHING = 0.2  # each window moves the limit this share of the way to its new value


class _Signal:
    __slots__ = ("base", "peak", "samples", "start")

    def __init__(self, now: float) -> None:
        self.base: float | None = None
        self.samples: list[float] = []
        self.start = now
        self.peak = 0  # most calls in flight seen during the window


class GradientLimiter:
    """The adaptive limit (a float; the gate admits while ``in_flight < limit``)."""

    __slots__ = ("_overload", "_signals", "changed_at", "limit", "max_limit", "min_limit")

    def __init__(self, initial: float, min_limit: float, max_limit: float, now: float) -> None:
        self.limit = float(initial)
        self.min_limit = float(min_limit)
        self.max_limit = float(max_limit)
        self._signals = {kind: _Signal(now) for kind in KINDS}
        self._overload = False
        self.changed_at = now

    def sample(self, kind: str, value: float, inflight: int, now: float) -> bool:
        """One finished call's latency sample of ``kind`` (seconds, or seconds per token),
        taken with ``inflight`` calls running.  Returns whether the limit changed."""
        sig = self._signals[kind]
        sig.samples.append(value)
        if inflight > sig.peak:
            sig.peak = inflight
        n = len(sig.samples)
        age = now - sig.start
        if (n >= MIN_SAMPLES and age >= MIN_WINDOW) or n >= MAX_SAMPLES or age >= MAX_WINDOW:
            return self._close(sig, now)
        return False

    def overload(self) -> None:
        """A replica answered 429/503: back off at the end of the current window."""
        self._overload = True

    def _close(self, sig: _Signal, now: float) -> bool:
        samples = sorted(sig.samples)
        short = samples[len(samples) // 2]
        peak = sig.peak
        sig.samples = []
        sig.start = now
        sig.peak = 0
        before = self.limit
        if sig.base is None or short < sig.base:
            sig.base = short
        elif peak <= self.limit / 3 and short > 0:
            # A quiet window: what it measured is no-load latency, so the baseline may
            # follow a real change (a slower model, a farther region).  Never under load.
            sig.base += DRIFT * (short - sig.base)
        base = sig.base
        gradient = 1.0 if short <= 0 else max(0.5, min(1.0, TOLERANCE * base / short))
        limit = self.limit
        if gradient < 1.0:
            new = limit * gradient
        elif peak >= limit / 2:
            new = limit + math.sqrt(limit)  # probe upwards
        else:
            new = limit  # not used: nothing learned about more concurrency
        new = limit + SMOOTHING * (new - limit)
        if self._overload:
            new = min(new, limit * BACKOFF)
            self._overload = False
        self.limit = max(self.min_limit, min(self.max_limit, new))
        if self.limit != before:
            self.changed_at = now
            return True
        return False

    def base(self, kind: str) -> float | None:
        """The no-load baseline of one kind of sample (None before any)."""
        return self._signals[kind].base
