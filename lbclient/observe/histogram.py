"""Fixed-bucket histograms, cheap enough for every call: a bisect and two additions.

The engine records each call's duration and each stream's time to first chunk into a
:class:`Recorder` -- but only once an exporter (:mod:`lbclient.metrics`) attached one;
until then a call pays one ``is None`` check.  Exporters read the histograms at scrape
time.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._context import CallContext

__all__ = [
    "DURATION_BUCKETS",
    "TOKEN_BUCKETS",
    "TTFT_BUCKETS",
    "Histogram",
    "Recorder",
    "TrafficSink",
]

DURATION_BUCKETS: tuple[float, ...] = (
    *(0.01 * 2**k for k in range(14)),  # OpenTelemetry GenAI: 0.01, 0.02 ... 81.92 s
    163.84,
    327.68,
    655.36,
    1310.72,  # reasoning models think for minutes: the tail must not land in +Inf
)
"""Seconds: the GenAI semantic conventions' call-duration buckets, extended to ~22 min."""

TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
"""Seconds: the GenAI conventions' time-to-first-chunk buckets, extended to ~3 min."""

TOKEN_BUCKETS: tuple[float, ...] = tuple(float(4**k) for k in range(14))
"""Tokens: 1, 4, 16 ... 67,108,864 (the GenAI ``gen_ai.client.token.usage`` buckets)."""


class Histogram:
    """Counts per bucket (``buckets`` are upper bounds; one more for +Inf), the sum and
    the count.  Not thread-safe: like all balancer state it lives on the event loop."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        if not self.bounds or any(not a < b for a, b in itertools.pairwise(self.bounds)):
            raise ValueError(f"histogram bounds must increase strictly, got {self.bounds!r}")
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    @property
    def count(self) -> int:
        """Observations so far (the +Inf bucket's cumulative count)."""
        return sum(self.counts)

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose upper bound is >= it (``le``)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper bound, calls <= it), ..., (inf, count)]``, as Prometheus wants."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


CallHook = Callable[[float, bool, str | None, str | None, bool], None]


class TrafficSink(Protocol):
    """Told about every call with its context (tenant, tokens, usage), for a traffic
    recording (:class:`lbclient.ops.TrafficRecorder`).  Runs on the event loop, inside
    the call's path: it must only append to a buffer."""

    def call(
        self,
        seconds: float,
        ok: bool,
        endpoint: str | None,
        error: str | None,
        stream: bool,
        call: CallContext | None,
    ) -> None:
        """As :meth:`Recorder.call`; ``call`` is the call's context when it has one (the
        plain fast path has none: no tenant, no tokens).  A stream is told twice: at its
        first chunk (``stream`` and ``ok``) and when it ends (``call.stream``)."""


class Recorder:
    """Per-call measurements: ``duration`` (whole calls), ``ttft`` (streams), and hooks
    other exporters add (OpenTelemetry records per call with attributes; a traffic
    recording adds a :class:`TrafficSink`)."""

    __slots__ = ("duration", "hooks", "traffic", "ttft", "usage_hooks")

    def __init__(self) -> None:
        self.duration = Histogram(DURATION_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.hooks: list[CallHook] = []
        self.usage_hooks: list[Callable[[tuple[float, float], str | None], None]] = []
        self.traffic: list[TrafficSink] = []

    def call(
        self,
        seconds: float,
        ok: bool,
        endpoint: str | None = None,
        error: str | None = None,
        stream: bool = False,
        call: CallContext | None = None,
    ) -> None:
        """A call ended after ``seconds`` (for a stream: its first chunk came then).

        A stream that failed before its first chunk (``stream`` and not ``ok``) had no
        first chunk: its time goes to ``duration``, not ``ttft``.  ``call``: the call's
        context, when it has one (for traffic sinks)."""
        h = self.ttft if stream and ok else self.duration
        h.counts[bisect_left(h.bounds, seconds)] += 1  # Histogram.observe, inlined: per call
        h.sum += seconds
        if self.hooks:
            for hook in self.hooks:
                hook(seconds, ok, endpoint, error, stream)
        if self.traffic:
            for sink in self.traffic:
                sink.call(seconds, ok, endpoint, error, stream, call)

    def traffic_only(
        self,
        seconds: float,
        ok: bool,
        endpoint: str | None,
        error: str | None,
        stream: bool,
        call: CallContext | None,
    ) -> None:
        """Tell only the traffic sinks (the histograms do not count it): a call shed
        before the path that records the others, a stream closed by its consumer."""
        for sink in self.traffic:
            sink.call(seconds, ok, endpoint, error, stream, call)

    def usage(self, usage: tuple[float, float], endpoint: str | None) -> None:
        """A call's real ``(input, output)`` token use (from ``report_usage``)."""
        for hook in self.usage_hooks:
            hook(usage, endpoint)
