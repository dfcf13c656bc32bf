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
``lbclient.demand.tokens``, ...) as observable instruments read at collection time.  With
``spans=True`` every call is a span with a child span per attempt (its endpoint, outcome,
and whether it was a retry or a hedge).  Recording per call with attributes costs what
the OpenTelemetry SDK costs (a few µs): it is opt-in.

Prometheus::

    from prometheus_client import REGISTRY, start_http_server
    from lbclient.metrics import PrometheusCollector

    REGISTRY.register(PrometheusCollector(lb, balancer="chat"))
    start_http_server(9100)

Everything is read from the balancer at scrape time -- nothing is added to a call but a
histogram bucket increment (about 0.2 µs).  Several balancers in one process are told
apart by the ``balancer`` label.  The families (all prefixed ``lbclient_``):

=====================================  ==========  ======================================
name                                   type        labels / meaning
=====================================  ==========  ======================================
``calls_total``                        counter     ``outcome``: ok, failed
``calls_failed_total``                 counter     ``reason``: error, attempts exhausted,
                                                   deadline, no endpoint, shed: ..., ...
``call_duration_seconds``              histogram   whole calls (GenAI buckets to 81.92 s,
                                                   extended to ~22 min)
``time_to_first_token_seconds``        histogram   streams' first chunk
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

**Scale on demand.**  ``lbclient_demand_calls`` (and ``_tokens``) is what the
application wants to run right now -- queued and in flight -- measured where the calls
are made, so it exists even when every replica is gone: the signal for scaling from zero
(``python -m lbclient manifests`` writes a KEDA ScaledObject on it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .observe.histogram import Recorder

if TYPE_CHECKING:
    from ._balancer import Balancer

__all__ = ["OpenTelemetry", "PrometheusCollector", "demand", "recorder_of"]

_BREAKER_STATES = ("closed", "half_open", "open")


def recorder_of(lb: Balancer) -> Recorder:
    """The balancer's per-call recorder, attached on first use (exporters share it)."""
    engine = lb._engine
    if engine.recorder is None:
        engine.recorder = Recorder()
    return engine.recorder


class PrometheusCollector:
    """A ``prometheus_client`` custom collector for one :class:`lbclient.Balancer`:
    ``registry.register(PrometheusCollector(lb))``.  ``balancer`` labels its series
    (default ``"default"``); ``prefix`` starts every name (default ``"lbclient"``)."""

    def __init__(
        self, lb: Balancer, *, balancer: str = "default", prefix: str = "lbclient"
    ) -> None:
        import prometheus_client  # noqa: F401 - fail here, clearly, without the extra

        from ._balancer import Balancer
        from ._errors import ConfigError

        if not isinstance(lb, Balancer):
            raise ConfigError(f"PrometheusCollector needs an lbclient.Balancer, got {lb!r}")
        if not isinstance(balancer, str) or not balancer:
            raise ConfigError(
                f"PrometheusCollector balancer must be a non-empty str, got {balancer!r}"
            )
        self._lb = lb
        self._name = balancer
        self._prefix = prefix
        self._recorder = recorder_of(lb)

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only (no duplicate-name checks at register)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        lb, p, name = self._lb, self._prefix, self._name
        engine = lb._engine
        pool = lb._pool
        c = engine.counters
        now = pool.now()
        if now >= pool.next_refresh and not pool.closed:
            pool.refresh()  # pickable reflects what already happened

        def counter(metric: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return CounterMetricFamily(f"{p}_{metric}", doc, labels=("balancer", *labels))

        def gauge(metric: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return GaugeMetricFamily(f"{p}_{metric}", doc, labels=("balancer", *labels))

        calls = counter("calls", "Calls through the balancer, by how they ended.", ("outcome",))
        calls.add_metric([name, "ok"], c.ok)
        calls.add_metric([name, "failed"], c.calls_failed)
        yield calls
        failed = counter("calls_failed", "Failed calls, by reason.", ("reason",))
        for reason, n in sorted(c.failed_by.items()):
            failed.add_metric([name, reason], n)
        yield failed
        rec = self._recorder
        for metric, doc, hist in (
            ("call_duration_seconds", "Whole-call latency.", rec.duration),
            ("time_to_first_token_seconds", "Streams' time to first chunk.", rec.ttft),
        ):
            family = HistogramMetricFamily(f"{p}_{metric}", doc, labels=("balancer",))
            buckets = [(_le(bound), float(n)) for bound, n in hist.cumulative()]
            family.add_metric([name], buckets, hist.sum)
            yield family
        retries = counter("retries", "Retries sent, by the kind of error retried.", ("reason",))
        for reason, n in sorted(c.retries_by.items()):
            retries.add_metric([name, reason], n)
        yield retries
        denied = counter("retries_denied", "Retries the retry budget refused.")
        denied.add_metric([name], c.retries_denied)
        yield denied
        hedges = counter("hedges", "Backup requests, by result.", ("result",))
        hedges.add_metric([name, "sent"], c.hedges_sent)
        hedges.add_metric([name, "won"], c.hedges_won)
        hedges.add_metric([name, "denied"], c.hedges_denied)
        yield hedges
        cooldowns = counter("cooldowns", "Retry-After cooldowns started.")
        cooldowns.add_metric([name], c.cooldowns)
        yield cooldowns
        gate = engine.gate
        shed = counter("shed", "Calls shed at admission, by reason.", ("reason",))
        if gate is not None:
            for reason, n in sorted(gate.shed_total.items()):
                shed.add_metric([name, reason], n)
        yield shed

        ep = ("endpoint",)
        attempts = counter(
            "attempts", "Attempts sent to each endpoint, by outcome.", (*ep, "outcome")
        )
        in_flight = gauge("endpoint_in_flight", "Attempts running on each endpoint.", ep)
        tokens = gauge("endpoint_tokens_in_flight", "Estimated tokens of those attempts.", ep)
        pickable = gauge("endpoint_pickable", "1 if new calls may go to the endpoint.", ep)
        breaker = gauge(
            "endpoint_breaker_state", "1 for the breaker's current state.", (*ep, "state")
        )
        queue = gauge("endpoint_server_queue_depth", "Queue depth the server reported.", ep)
        ewma = gauge("endpoint_latency_ewma_seconds", "The picker's latency estimate.", ep)
        cooling = gauge("endpoint_cooling_seconds", "Seconds of Retry-After cooldown left.", ep)
        for s in pool.members.values():
            url = s.url
            for outcome, n in (
                ("success", s.successes),
                ("failure", s.failures - s.cut),
                ("deadline", s.cut),
                ("ignored", s.ignored),
                ("cancelled", s.cancelled - s.lost),
                ("lost", s.lost),
            ):
                attempts.add_metric([name, url, outcome], n)
            in_flight.add_metric([name, url], s.inflight)
            tokens.add_metric([name, url], s.tokens)
            pickable.add_metric([name, url], 1.0 if s.available and not s.draining else 0.0)
            state = "closed" if s.breaker is None else s.breaker.state
            for st in _BREAKER_STATES:
                breaker.add_metric([name, url, st], 1.0 if st == state else 0.0)
            if s.server_load is not None:
                queue.add_metric([name, url], s.server_load)
            if s.count:
                ewma.add_metric([name, url], s.ewma(now))
            cooling.add_metric([name, url], max(0.0, s.cooldown_until - now))
        yield from (attempts, in_flight, tokens, pickable, breaker, queue, ewma, cooling)

        panic = gauge("panic", "1 while panic mode serves ejected endpoints.")
        panic.add_metric([name], 1.0 if pool.panic else 0.0)
        yield panic
        limit = gauge("admission_limit", "The admission concurrency limit.")
        queued = gauge("admission_queued", "Callers waiting for an admission slot.")
        if gate is not None:
            limit.add_metric([name], gate.limit)
            queued.add_metric([name], gate.queue.size)
        yield limit
        yield queued
        demand_calls, demand_tokens = demand(lb)
        d_calls = gauge("demand_calls", "Calls queued + in flight: what the application wants.")
        d_calls.add_metric([name], demand_calls)
        yield d_calls
        d_tokens = gauge("demand_tokens", "Estimated tokens of the calls queued + in flight.")
        d_tokens.add_metric([name], demand_tokens)
        yield d_tokens


def demand(lb: Balancer) -> tuple[float, float]:
    """``(calls, tokens)`` queued + in flight: with admission, the gate's own count
    (admitted and waiting); without, the attempts in flight."""
    gate = lb._engine.gate
    if gate is not None:
        queued_tokens = sum(
            w.tokens
            for band in gate.queue._bands.values()
            for q in band.queues.values()
            for w in q
            if not w.gone
        )
        return float(gate.in_flight + gate.queue.size), gate.tokens_in_flight + queued_tokens
    totals = lb._pool.totals
    return float(totals.inflight), totals.tokens


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class OpenTelemetry:
    """OpenTelemetry metrics (and, with ``spans=True``, traces) for one balancer.

    * ``meter_provider`` / ``tracer_provider`` -- default: the global ones.
    * ``operation`` -- ``gen_ai.operation.name`` (default ``"chat"``).
    * ``provider`` -- ``gen_ai.provider.name`` (default ``"openai"``: what lbclient's
      OpenAI-compatible replicas speak; name yours).
    * ``balancer`` -- the ``lbclient.balancer`` attribute telling balancers apart.
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
        from .observe.histogram import DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS

        if not isinstance(lb, Balancer):
            raise ConfigError(f"OpenTelemetry needs an lbclient.Balancer, got {lb!r}")
        self._lb = lb
        provider_ = meter_provider or otel_metrics.get_meter_provider()
        meter = provider_.get_meter("lbclient", __version__)
        self._base = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": provider,
            "lbclient.balancer": balancer,
        }
        self._attrs: dict[str | None, dict[str, Any]] = {}
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=list(DURATION_BUCKETS),
        )
        self._ttft = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to receive the first chunk of a streamed answer.",
            explicit_bucket_boundaries_advisory=list(TTFT_BUCKETS),
        )
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=list(TOKEN_BUCKETS),
        )
        rec = recorder_of(lb)
        rec.hooks.append(self._on_call)
        rec.usage_hooks.append(self._on_usage)
        self._observables(meter, balancer)
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
            a = dict(self._base)
            if url is not None:
                from urllib.parse import urlsplit

                parts = urlsplit(url)
                if parts.hostname:
                    a["server.address"] = parts.hostname
                a["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
            self._attrs[url] = a
        return a

    def _on_call(
        self, seconds: float, ok: bool, endpoint: str | None, error: str | None, stream: bool
    ) -> None:
        attrs = self._server(endpoint)
        if error is not None:
            attrs = {**attrs, "error.type": error}
        (self._ttft if stream else self._duration).record(seconds, attrs)

    def _on_usage(self, usage: tuple[float, float], endpoint: str | None) -> None:
        attrs = self._server(endpoint)
        self._tokens.record(usage[0], {**attrs, "gen_ai.token.type": "input"})
        self._tokens.record(usage[1], {**attrs, "gen_ai.token.type": "output"})

    def _observables(self, meter: Any, balancer: str) -> None:
        from opentelemetry.metrics import Observation

        lb = self._lb
        base = {"lbclient.balancer": balancer}

        def per_endpoint(read: Any) -> Any:
            def callback(_options: Any) -> list[Any]:
                return [
                    Observation(read(s), {**base, "server.address": s.url})
                    for s in lb._pool.members.values()
                ]

            return callback

        def totals(read: Any, label: str = "") -> Any:
            def callback(_options: Any) -> list[Any]:
                value = read()
                if isinstance(value, dict):
                    return [Observation(n, {**base, label: k}) for k, n in value.items()]
                return [Observation(value, base)]

            return callback

        c = lb._engine.counters
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
            [totals(lambda: {"ok": c.ok, "failed": c.calls_failed}, "outcome")],
            "{call}",
            "Calls, by how they ended.",
        )
        meter.create_observable_counter(
            "lbclient.retries",
            [totals(lambda: dict(c.retries_by), "reason")],
            "{request}",
            "Retries sent, by the kind of error retried.",
        )
        meter.create_observable_counter(
            "lbclient.hedges",
            [
                totals(
                    lambda: {"sent": c.hedges_sent, "won": c.hedges_won, "denied": c.hedges_denied},
                    "result",
                )
            ],
            "{request}",
            "Backup requests, by result.",
        )
        meter.create_observable_counter(
            "lbclient.shed",
            [totals(lambda: dict(lb._engine.gate.shed_total) if lb._engine.gate else {}, "reason")],
            "{call}",
            "Calls shed at admission, by reason.",
        )
        meter.create_observable_gauge(
            "lbclient.demand.calls",
            [totals(lambda: demand(lb)[0])],
            "{call}",
            "Calls queued + in flight: what the application wants to run.",
        )
        meter.create_observable_gauge(
            "lbclient.demand.tokens",
            [totals(lambda: demand(lb)[1])],
            "{token}",
            "Estimated tokens of the calls queued + in flight.",
        )


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
                span.set_attribute("error.type", type(error).__name__)
                span.record_exception(error)
            if outcome not in ("ok", "cancelled", "lost"):
                span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
            span.end()

        return done
