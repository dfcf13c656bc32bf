"""Metrics for an operator: Prometheus (``[prometheus]`` extra) and OpenTelemetry
(``[otel]`` extra).  Importing this module imports neither library; each exporter does
when it is created.

OpenTelemetry::

    from lbclient.metrics import OpenTelemetry

    OpenTelemetry(lb)                        # the global meter provider
    OpenTelemetry(lb, meter_provider=mp, tracer_provider=tp, spans=True)

It follows the GenAI semantic conventions -- ``gen_ai.client.operation.duration``
(s), ``gen_ai.client.operation.time_to_first_chunk`` (s) and
``gen_ai.client.token.usage`` ({token}, by ``gen_ai.token.type``), with their buckets
and the attributes ``gen_ai.operation.name``, ``gen_ai.provider.name``,
``server.address``, ``server.port`` and ``error.type`` -- and adds lbclient's own
(``lbclient.endpoint.in_flight``, ``lbclient.endpoint.breaker_state``,
``lbclient.retries``, ``lbclient.hedges``, ``lbclient.shed``, ``lbclient.demand.calls``,
``lbclient.demand.tokens``, ...) as observable instruments read at collection time (per
endpoint: ``server.address``, ``server.port`` and ``lbclient.endpoint.url``).  With
``spans=True`` every call is a span with a child span per attempt (its endpoint, outcome,
and whether it was a retry or a hedge).  A stream that fails before its first chunk is
recorded in the duration histogram (with its ``error.type``), not as a time to first
chunk.  Recording per call with attributes costs what the OpenTelemetry SDK costs (its
``Histogram.record`` with attributes: about 8-10 µs a call in CPython 3.11): it is
opt-in.

Prometheus::

    from prometheus_client import REGISTRY, start_http_server
    from lbclient.metrics import PrometheusCollector

    REGISTRY.register(PrometheusCollector(lb, balancer="chat"))
    start_http_server(9100)

Everything is read from the balancer at scrape time -- nothing is added to a call but a
histogram bucket increment (about 0.2 µs).  Several balancers in one process go into one
collector, told apart by the ``balancer`` label:
``PrometheusCollector(a, balancer="chat").add(b, balancer="embed")``.  The families (all
prefixed ``lbclient_``):

=====================================  ==========  ======================================
name                                   type        labels / meaning
=====================================  ==========  ======================================
``calls_total``                        counter     ``outcome``: ok, failed
``calls_failed_total``                 counter     ``reason``: error, attempts exhausted,
                                                   deadline, no endpoint, shed: ..., ...
``call_duration_seconds``              histogram   whole calls (GenAI buckets to 81.92 s,
                                                   extended to ~22 min); a stream only
                                                   when it failed before a first chunk
``time_to_first_token_seconds``        histogram   streams' first chunk (to 160 s)
``attempts_total``                     counter     ``endpoint``, ``outcome``: success,
                                                   failure, deadline, ignored, cancelled,
                                                   lost
``retries_total``                      counter     ``reason``: the kind of error retried
``retries_denied_total``               counter     by the retry budget
``hedges_total``                       counter     ``result``: sent, won, denied
``cooldowns_total``                    counter     Retry-After cooldowns started
``shed_total``                         counter     ``reason``: queue full, wait exceeded,
                                                   throttled, quota
``endpoint_in_flight``                 gauge       ``endpoint``: attempts running
``endpoint_tokens_in_flight``          gauge       ``endpoint``: their estimated tokens
``endpoint_pickable``                  gauge       ``endpoint``: 1 if new calls may go there
``endpoint_breaker_state``             gauge       ``endpoint``, ``state``: 1 for the
                                                   current of closed/half_open/open
``endpoint_server_queue_depth``        gauge       ``endpoint``: what the server reported
``endpoint_latency_ewma_seconds``      gauge       ``endpoint``: the picker's estimate
``endpoint_cooling_seconds``           gauge       ``endpoint``: Retry-After left
``panic``                              gauge       1 while panic mode serves ejected ones
``admission_limit``                    gauge       the concurrency limit (adaptive or not)
``admission_queued``                   gauge       callers waiting for a slot
``demand_calls``                       gauge       calls queued + in flight
``demand_tokens``                      gauge       their estimated tokens
=====================================  ==========  ======================================

``examples/service.py`` serves these on ``/metrics`` (with ``/ready`` and ``/health``);
``examples/grafana-dashboard.json`` charts them.

**Scale on demand.**  ``lbclient_demand_calls`` (and ``_tokens``) is what the
application wants to run right now -- queued and in flight -- measured where the calls
are made, so it exists even when every replica is gone: the signal for scaling from zero
(``python -m lbclient manifests`` writes a KEDA ScaledObject on it).
"""

from __future__ import annotations

import asyncio
import re
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from .observe.histogram import Recorder
from .pool.load import SERVER_LOAD_TTL

if TYPE_CHECKING:
    from ._balancer import Balancer

__all__ = ["OpenTelemetry", "PrometheusCollector", "demand", "recorder_of", "render"]

_BREAKER_STATES = ("closed", "half_open", "open")
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def recorder_of(lb: Balancer) -> Recorder:
    """The balancer's per-call recorder, attached on first use (exporters share it)."""
    engine = lb._engine
    if engine.recorder is None:
        engine.recorder = Recorder()
    return engine.recorder


class PrometheusCollector:
    """A ``prometheus_client`` custom collector: ``registry.register(PrometheusCollector(lb))``.

    ``balancer`` labels the balancer's series (default ``"default"``); ``prefix`` starts
    every name (default ``"lbclient"``).  Several balancers in one process go into *one*
    collector, told apart by that label::

        collector = PrometheusCollector(chat_lb, balancer="chat").add(embed_lb, balancer="embed")
        REGISTRY.register(collector)

    (Two collectors of the same ``prefix`` in one registry would each write every family,
    which the exposition formats forbid -- Prometheus rejects such a scrape -- so the
    registry refuses the second one: :meth:`describe` names the families.)

    Thread-safe to scrape from another thread (``prometheus_client.start_http_server``
    serves scrapes on its own thread): it only reads the balancer there.  Scraped on the
    balancer's event loop (an aiohttp handler), it first lets time-driven state changes
    happen (a breaker's cooldown ending), as ``lb.stats()`` does."""

    def __init__(
        self, lb: Balancer, *, balancer: str = "default", prefix: str = "lbclient"
    ) -> None:
        import prometheus_client  # noqa: F401 - fail here, clearly, without the extra

        from ._errors import ConfigError

        if not isinstance(prefix, str) or not _METRIC_NAME.fullmatch(prefix):
            raise ConfigError(
                f"PrometheusCollector prefix must be a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*), "
                f"got {prefix!r}"
            )
        self._prefix = prefix
        self._members: list[tuple[str, Balancer, Recorder]] = []
        self.add(lb, balancer=balancer)

    def add(self, lb: Balancer, *, balancer: str) -> PrometheusCollector:
        """Export another balancer too, its series labelled ``balancer=`` (which must be
        new to this collector).  Returns the collector."""
        from ._balancer import Balancer
        from ._errors import ConfigError

        if not isinstance(lb, Balancer):
            raise ConfigError(f"PrometheusCollector needs an lbclient.Balancer, got {lb!r}")
        if not isinstance(balancer, str) or not balancer:
            raise ConfigError(
                f"PrometheusCollector balancer must be a non-empty str, got {balancer!r}"
            )
        for name, other, _ in self._members:
            if name == balancer:
                raise ConfigError(f"PrometheusCollector already has a balancer {balancer!r}")
            if other is lb:
                raise ConfigError(f"PrometheusCollector already exports {lb!r} as {name!r}")
        self._members.append((balancer, lb, recorder_of(lb)))
        return self

    @property
    def balancers(self) -> dict[str, Balancer]:
        """The exported balancers, by their ``balancer`` label."""
        return {name: lb for name, lb, _ in self._members}

    def describe(self) -> list[Any]:
        """Every family, without samples: lets the registry refuse a clashing collector."""
        return self._families(())

    def collect(self) -> list[Any]:
        return self._families(self._members)

    def _families(self, members: Iterable[tuple[str, Balancer, Recorder]]) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p = self._prefix

        def counter(metric: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return CounterMetricFamily(f"{p}_{metric}", doc, labels=("balancer", *labels))

        def gauge(metric: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return GaugeMetricFamily(f"{p}_{metric}", doc, labels=("balancer", *labels))

        def histogram(metric: str, doc: str) -> Any:
            return HistogramMetricFamily(f"{p}_{metric}", doc, labels=("balancer",))

        ep = ("endpoint",)
        f = _Families(
            calls=counter("calls", "Calls through the balancer, by how they ended.", ("outcome",)),
            failed=counter("calls_failed", "Failed calls, by reason.", ("reason",)),
            duration=histogram("call_duration_seconds", "Whole-call latency."),
            ttft=histogram("time_to_first_token_seconds", "Streams' time to first chunk."),
            retries=counter("retries", "Retries sent, by the kind of error retried.", ("reason",)),
            denied=counter("retries_denied", "Retries the retry budget refused."),
            hedges=counter("hedges", "Backup requests, by result.", ("result",)),
            cooldowns=counter("cooldowns", "Retry-After cooldowns started."),
            shed=counter("shed", "Calls shed at admission, by reason.", ("reason",)),
            attempts=counter(
                "attempts", "Attempts sent to each endpoint, by outcome.", (*ep, "outcome")
            ),
            in_flight=gauge("endpoint_in_flight", "Attempts running on each endpoint.", ep),
            tokens=gauge("endpoint_tokens_in_flight", "Estimated tokens of those attempts.", ep),
            pickable=gauge("endpoint_pickable", "1 if new calls may go to the endpoint.", ep),
            breaker=gauge(
                "endpoint_breaker_state", "1 for the breaker's current state.", (*ep, "state")
            ),
            queue=gauge("endpoint_server_queue_depth", "Queue depth the server reported.", ep),
            ewma=gauge("endpoint_latency_ewma_seconds", "The picker's latency estimate.", ep),
            cooling=gauge("endpoint_cooling_seconds", "Seconds of Retry-After cooldown left.", ep),
            panic=gauge("panic", "1 while panic mode serves ejected endpoints."),
            limit=gauge("admission_limit", "The admission concurrency limit."),
            queued=gauge("admission_queued", "Callers waiting for an admission slot."),
            demand_calls=gauge(
                "demand_calls", "Calls queued + in flight: what the application wants."
            ),
            demand_tokens=gauge(
                "demand_tokens", "Estimated tokens of the calls queued + in flight."
            ),
        )
        on_loop = _on_a_loop()
        for name, lb, rec in members:
            _collect_one(f, name, lb, rec, on_loop)
        return list(attrs.astuple(f, recurse=False))


@attrs.define
class _Families:
    """One of each family, in the order they are written."""

    calls: Any
    failed: Any
    duration: Any
    ttft: Any
    retries: Any
    denied: Any
    hedges: Any
    cooldowns: Any
    shed: Any
    attempts: Any
    in_flight: Any
    tokens: Any
    pickable: Any
    breaker: Any
    queue: Any
    ewma: Any
    cooling: Any
    panic: Any
    limit: Any
    queued: Any
    demand_calls: Any
    demand_tokens: Any


def _on_a_loop() -> bool:
    """Is this thread running an event loop (the balancer's: a balancer lives on one
    loop thread)?  Elsewhere -- ``prometheus_client``'s HTTP server thread, an
    OpenTelemetry reader's thread -- an exporter only reads."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _collect_one(f: _Families, name: str, lb: Balancer, rec: Recorder, on_loop: bool) -> None:
    """Add one balancer's samples to the families.  Collections the event loop may
    change meanwhile are copied first, in one C-level step each (atomic under the GIL)."""
    engine = lb._engine
    pool = lb._pool
    c = engine.counters
    now = pool.now()
    if on_loop and now >= pool.next_refresh and not pool.closed:
        pool.refresh()  # pickable reflects what already happened
    f.calls.add_metric([name, "ok"], c.ok)
    f.calls.add_metric([name, "failed"], c.calls_failed)
    for reason, n in sorted(c.failed_by.items()):
        f.failed.add_metric([name, reason], n)
    for family, hist in ((f.duration, rec.duration), (f.ttft, rec.ttft)):
        buckets = [(_number(bound), float(n)) for bound, n in hist.cumulative()]
        family.add_metric([name], buckets, hist.sum)
    for reason, n in sorted(c.retries_by.items()):
        f.retries.add_metric([name, reason], n)
    f.denied.add_metric([name], c.retries_denied)
    f.hedges.add_metric([name, "sent"], c.hedges_sent)
    f.hedges.add_metric([name, "won"], c.hedges_won)
    f.hedges.add_metric([name, "denied"], c.hedges_denied)
    f.cooldowns.add_metric([name], c.cooldowns)
    gate = engine.gate
    if gate is not None:
        for reason, n in sorted(gate.shed_total.items()):
            f.shed.add_metric([name, reason], n)
    _endpoint_samples(f, name, list(pool.members.values()), now)
    f.panic.add_metric([name], 1.0 if pool.panic else 0.0)
    if gate is not None:
        f.limit.add_metric([name], gate.limit)
        f.queued.add_metric([name], gate.queue.size)
    demand_calls, demand_tokens = demand(lb)
    f.demand_calls.add_metric([name], demand_calls)
    f.demand_tokens.add_metric([name], demand_tokens)


def _endpoint_samples(f: _Families, name: str, members: list[Any], now: float) -> None:
    """The per-endpoint series: most of a scrape (10 samples an endpoint when quiet: the
    rare attempt outcomes appear once they happen), so built as
    ``Sample`` tuples directly, the endpoint's label dict shared by its gauges (nothing
    mutates a sample's labels) -- about 4x cheaper than ``add_metric``."""
    from prometheus_client.samples import Sample

    attempts, attempts_name = f.attempts.samples.append, f.attempts.name + "_total"
    in_flight, in_flight_name = f.in_flight.samples.append, f.in_flight.name
    tokens, tokens_name = f.tokens.samples.append, f.tokens.name
    pickable, pickable_name = f.pickable.samples.append, f.pickable.name
    breaker, breaker_name = f.breaker.samples.append, f.breaker.name
    queue, queue_name = f.queue.samples.append, f.queue.name
    ewma, ewma_name = f.ewma.samples.append, f.ewma.name
    cooling, cooling_name = f.cooling.samples.append, f.cooling.name
    for s in members:
        url = s.url
        labels = {"balancer": name, "endpoint": url}
        attempts(Sample(attempts_name, {**labels, "outcome": "success"}, s.successes))
        attempts(Sample(attempts_name, {**labels, "outcome": "failure"}, s.failures - s.cut))
        for outcome, n in (
            ("deadline", s.cut),
            ("ignored", s.ignored),
            ("cancelled", s.cancelled - s.lost),
            ("lost", s.lost),
        ):
            if n:  # a counter series may start when its first event happens
                attempts(Sample(attempts_name, {**labels, "outcome": outcome}, n))
        in_flight(Sample(in_flight_name, labels, s.inflight))
        tokens(Sample(tokens_name, labels, s.tokens))
        pickable(Sample(pickable_name, labels, 1.0 if s.available and not s.draining else 0.0))
        state = "closed" if s.breaker is None else s.breaker.state
        for st in _BREAKER_STATES:
            breaker(Sample(breaker_name, {**labels, "state": st}, 1.0 if st == state else 0.0))
        if s.server_load is not None and now - s.server_load_at < SERVER_LOAD_TTL:
            queue(Sample(queue_name, labels, s.server_load))  # while the pickers use it
        if s.count:
            ewma(Sample(ewma_name, labels, s.ewma(now)))
        cooling(Sample(cooling_name, labels, max(0.0, s.cooldown_until - now)))


def render(*collectors: Any) -> bytes:
    """The Prometheus text format (0.0.4) of ``collectors``' families -- what
    ``prometheus_client.generate_latest`` writes for them, about 4x faster: a scrape of
    1,000 endpoints is ~10,000 samples, and the generic writer spends most of its time
    sorting and escaping the same endpoint labels again for every sample.  For a
    ``/metrics`` handler serving lbclient's collector (``examples/service.py``)."""
    out: list[str] = []
    add = out.append
    # label text by the labels dict's identity (an endpoint's gauges share one dict),
    # holding the dict so its id stays its own for the whole render
    cache: dict[int, tuple[dict[str, str], str]] = {}
    for collector in collectors:
        for metric in collector.collect():
            name = metric.name
            mtype = metric.type
            if mtype == "counter":
                name += "_total"
            elif mtype == "unknown":
                mtype = "untyped"
            doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            add(f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n")
            created = []
            for s in metric.samples:
                labels = s.labels
                if labels:
                    hit = cache.get(id(labels))
                    if hit is not None and hit[0] is labels:
                        text = hit[1]
                    else:
                        pairs = sorted(labels.items())
                        text = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"
                        cache[id(labels)] = (labels, text)
                else:
                    text = ""
                line = f"{s.name}{text} {_number(s.value)}\n"
                if s.name == metric.name + "_created":
                    created.append(line)
                else:
                    add(line)
            if created:
                add(f"# HELP {metric.name}_created {doc}\n# TYPE {metric.name}_created gauge\n")
                out.extend(created)
    return "".join(out).encode()


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _number(value: float) -> str:
    if value == _INF:
        return "+Inf"
    if value == -_INF:
        return "-Inf"
    if value != value:
        return "NaN"
    return repr(float(value))


_INF = float("inf")


def demand(lb: Balancer) -> tuple[float, float]:
    """``(calls, tokens)`` queued + in flight: with admission, the gate's own count
    (admitted and waiting); without, the attempts in flight."""
    gate = lb._engine.gate
    if gate is not None:
        queue = gate.queue
        return float(gate.in_flight + queue.size), gate.tokens_in_flight + queue.tokens
    totals = lb._pool.totals
    return float(totals.inflight), totals.tokens


class OpenTelemetry:
    """OpenTelemetry metrics (and, with ``spans=True``, traces) for one balancer.

    * ``meter_provider`` / ``tracer_provider`` -- default: the global ones.
    * ``operation`` -- ``gen_ai.operation.name`` (default ``"chat"``).
    * ``provider`` -- ``gen_ai.provider.name`` (default ``"openai"``: what lbclient's
      OpenAI-compatible replicas speak; name yours).
    * ``balancer`` -- the ``lbclient.balancer`` attribute telling balancers apart.

    Several balancers may report to one meter provider (one ``OpenTelemetry`` each, with
    their own ``balancer``): they share its instruments, and every observable instrument
    reports every balancer.  Attaching one balancer twice to one provider is a
    :class:`lbclient.ConfigError` (it would count each call twice).
    """

    def __init__(
        self,
        lb: Balancer,
        meter_provider: Any = None,
        tracer_provider: Any = None,
        *,
        spans: bool = False,
        operation: str = "chat",
        provider: str = "openai",
        balancer: str = "default",
    ) -> None:
        from opentelemetry import metrics as otel_metrics

        from . import __version__
        from ._balancer import Balancer
        from ._errors import ConfigError

        if not isinstance(lb, Balancer):
            raise ConfigError(f"OpenTelemetry needs an lbclient.Balancer, got {lb!r}")
        self._lb = lb
        provider_ = meter_provider or otel_metrics.get_meter_provider()
        self._base = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "lbclient.balancer": balancer,
        }
        self._attrs: dict[str | None, dict[str, Any]] = {}
        shared = _instruments_of(provider_)
        shared.add(lb, balancer)
        self._duration = shared.duration
        self._ttft = shared.ttft
        self._tokens = shared.tokens
        rec = recorder_of(lb)
        rec.hooks.append(self._on_call)
        rec.usage_hooks.append(self._on_usage)
        self._tracer = None
        if spans:
            from opentelemetry import trace

            tp = tracer_provider or trace.get_tracer_provider()
            self._tracer = tp.get_tracer("lbclient", __version__)
            lb._engine.tracer = _Spans(self._tracer, self._base, self._server)

    def _server(self, url: str | None) -> dict[str, Any]:
        """The per-endpoint attributes (``server.address``, ``server.port``), cached."""
        a = self._attrs.get(url)
        if a is None:
            a = {**self._base, **_server_attributes(url)}
            self._attrs[url] = a
        return a

    def _on_call(
        self, seconds: float, ok: bool, endpoint: str | None, error: str | None, stream: bool
    ) -> None:
        attrs = self._server(endpoint)
        if error is not None:
            attrs = {**attrs, "error.type": error}
        # A stream's first chunk is its time to first chunk; a stream that failed before
        # it never had one: its time is an operation's duration, with its error.type.
        (self._ttft if stream and ok else self._duration).record(seconds, attrs)

    def _on_usage(self, usage: tuple[float, float], endpoint: str | None) -> None:
        attrs = self._server(endpoint)
        self._tokens.record(usage[0], {**attrs, "gen_ai.token.type": "input"})
        self._tokens.record(usage[1], {**attrs, "gen_ai.token.type": "output"})


def _server_attributes(url: str | None) -> dict[str, Any]:
    """``server.address`` (the host) and ``server.port`` of an endpoint URL."""
    if url is None:
        return {}
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    a: dict[str, Any] = {}
    if parts.hostname:
        a["server.address"] = parts.hostname
    a["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    return a


class _Member:
    """One balancer reporting to a meter provider's shared instruments (held weakly:
    a balancer dropped by the application stops being reported)."""

    __slots__ = ("base", "endpoints", "ref")

    def __init__(self, lb: Balancer, balancer: str) -> None:
        self.ref = weakref.ref(lb)
        self.base = {"lbclient.balancer": balancer}
        self.endpoints: dict[str, dict[str, Any]] = {}

    def attributes(self, url: str) -> dict[str, Any]:
        a = self.endpoints.get(url)
        if a is None:
            a = {**self.base, "lbclient.endpoint.url": url, **_server_attributes(url)}
            self.endpoints[url] = a
        return a


class _Instruments:
    """A meter provider's lbclient instruments, created once (the SDK keeps the first
    registration of a name and drops a later one's callbacks): the GenAI histograms,
    and observable instruments whose callbacks read every member balancer."""

    def __init__(self, meter: Any) -> None:
        from .observe.histogram import DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS

        self.members: list[_Member] = []
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self.ttft = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to receive the first chunk of a streamed answer.",
            explicit_bucket_boundaries_advisory=list(TTFT_BUCKETS),
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
        )
        self._observables(meter)

    def add(self, lb: Balancer, balancer: str) -> None:
        from ._errors import ConfigError

        self.members = [m for m in self.members if m.ref() is not None]
        for m in self.members:
            if m.ref() is lb:
                raise ConfigError(
                    f"{lb!r} already reports to this meter provider "
                    f"(as {m.base['lbclient.balancer']!r})"
                )
        self.members.append(_Member(lb, balancer))

    def _live(self) -> list[tuple[_Member, Balancer]]:
        out = []
        for m in list(self.members):
            lb = m.ref()
            if lb is not None:
                out.append((m, lb))
        return out

    def _observables(self, meter: Any) -> None:
        from opentelemetry.metrics import Observation

        def per_endpoint(read: Any) -> Any:
            # Read at collection time, maybe on a reader's own thread: copy the members
            # (one C-level step, atomic under the GIL) and only read them.
            def callback(_options: Any) -> list[Any]:
                return [
                    Observation(read(s), m.attributes(s.url))
                    for m, lb in self._live()
                    for s in list(lb._pool.members.values())
                ]

            return callback

        def totals(read: Any, label: str = "") -> Any:
            def callback(_options: Any) -> list[Any]:
                out = []
                for m, lb in self._live():
                    value = read(lb)
                    if isinstance(value, dict):
                        out += [Observation(n, {**m.base, label: k}) for k, n in value.items()]
                    else:
                        out.append(Observation(value, m.base))
                return out

            return callback

        def calls(lb: Balancer) -> dict[str, int]:
            c = lb._engine.counters
            return {"ok": c.ok, "failed": c.calls_failed}

        def hedges(lb: Balancer) -> dict[str, int]:
            c = lb._engine.counters
            return {"sent": c.hedges_sent, "won": c.hedges_won, "denied": c.hedges_denied}

        def shed(lb: Balancer) -> dict[str, int]:
            gate = lb._engine.gate
            return dict(gate.shed_total) if gate is not None else {}

        meter.create_observable_gauge(
            "lbclient.endpoint.in_flight",
            [per_endpoint(lambda s: s.inflight)],
            "{request}",
            "Attempts running on each endpoint.",
        )
        meter.create_observable_gauge(
            "lbclient.endpoint.tokens_in_flight",
            [per_endpoint(lambda s: s.tokens)],
            "{token}",
            "Estimated tokens of the attempts running on each endpoint.",
        )
        meter.create_observable_gauge(
            "lbclient.endpoint.breaker_state",
            [per_endpoint(lambda s: _BREAKER_STATES.index(s.breaker.state) if s.breaker else 0)],
            "1",
            "0 closed, 1 half-open, 2 open.",
        )
        meter.create_observable_gauge(
            "lbclient.endpoint.pickable",
            [per_endpoint(lambda s: 1 if s.available and not s.draining else 0)],
            "1",
            "1 if new calls may go to the endpoint.",
        )
        meter.create_observable_counter(
            "lbclient.calls",
            [totals(calls, "outcome")],
            "{call}",
            "Calls, by how they ended.",
        )
        meter.create_observable_counter(
            "lbclient.retries",
            [totals(lambda lb: dict(lb._engine.counters.retries_by), "reason")],
            "{request}",
            "Retries sent, by the kind of error retried.",
        )
        meter.create_observable_counter(
            "lbclient.hedges",
            [totals(hedges, "result")],
            "{request}",
            "Backup requests, by result.",
        )
        meter.create_observable_counter(
            "lbclient.shed",
            [totals(shed, "reason")],
            "{call}",
            "Calls shed at admission, by reason.",
        )
        meter.create_observable_gauge(
            "lbclient.demand.calls",
            [totals(lambda lb: demand(lb)[0])],
            "{call}",
            "Calls queued + in flight: what the application wants to run.",
        )
        meter.create_observable_gauge(
            "lbclient.demand.tokens",
            [totals(lambda lb: demand(lb)[1])],
            "{token}",
            "Estimated tokens of the calls queued + in flight.",
        )


_INSTRUMENTS: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_INSTRUMENTS_BY_ID: dict[int, tuple[Any, _Instruments]] = {}  # providers without weakrefs
_INSTRUMENTS_LOCK = threading.Lock()


def _instruments_of(provider: Any) -> _Instruments:
    """The lbclient instruments of ``provider``'s ``"lbclient"`` meter, made on first use."""
    from . import __version__

    with _INSTRUMENTS_LOCK:
        try:
            found = _INSTRUMENTS.get(provider)
        except TypeError:  # not weak-referenceable: keep it alive with its instruments
            entry = _INSTRUMENTS_BY_ID.get(id(provider))
            found = entry[1] if entry is not None else None
        if found is None:
            found = _Instruments(provider.get_meter("lbclient", __version__))
            try:
                _INSTRUMENTS[provider] = found
            except TypeError:
                _INSTRUMENTS_BY_ID[id(provider)] = (provider, found)
        return found


class _Spans:
    """The engine's tracer: a span per call, a child span per attempt."""

    def __init__(self, tracer: Any, base: dict[str, Any], server: Any) -> None:
        self._tracer = tracer
        self._base = base
        self._server = server

    def call(self, call: Any) -> Any:
        import contextlib

        from opentelemetry import trace

        tracer = self._tracer
        base = self._base

        @contextlib.contextmanager
        def span() -> Iterator[None]:
            name = f"{base['gen_ai.operation.name']}"
            with tracer.start_as_current_span(
                name,
                kind=trace.SpanKind.CLIENT,
                attributes=base,
                end_on_exit=True,
                record_exception=True,
                set_status_on_exception=True,
            ) as s:
                call.span = s
                try:
                    yield
                except BaseException as exc:
                    s.set_attribute("error.type", type(exc).__name__)
                    raise
                finally:
                    s.set_attribute("lbclient.attempts", call.sent)
                    if call.served_by is not None:
                        s.set_attribute("lbclient.served_by", call.served_by)

        return span()

    def attempt(self, call: Any, lease: Any) -> Any:
        from opentelemetry import trace

        from .engine.route import error_type

        parent = call.span
        ctx = trace.set_span_in_context(parent) if parent is not None else None
        attrs = dict(self._server(lease.state.url))
        attrs["lbclient.attempt.number"] = lease.number
        attrs["lbclient.attempt.hedge"] = bool(lease.hedge)
        attrs["lbclient.attempt.retry"] = bool(lease.number > 1 and not lease.hedge)
        span = self._tracer.start_span(
            "attempt", context=ctx, kind=trace.SpanKind.CLIENT, attributes=attrs
        )

        def done(outcome: str, error: BaseException | None) -> None:
            span.set_attribute("lbclient.attempt.outcome", outcome)
            if error is not None:
                span.set_attribute("error.type", error_type(error))
                span.record_exception(error)
            if outcome not in ("ok", "cancelled", "lost"):
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
            span.end()

        return done
