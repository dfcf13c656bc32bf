"""``lbclient.metrics.OpenTelemetry`` with the real OpenTelemetry SDK (an
``InMemoryMetricReader`` and an ``InMemorySpanExporter``), against fake replicas on
loopback: the GenAI semantic-convention histograms (names, units, bucket boundaries,
attributes, ``error.type``), token usage by ``gen_ai.token.type``, time to first chunk for
streams only, lbclient's observable instruments, and the opt-in spans -- one per call,
a child per attempt, with its endpoint, outcome and retry/hedge flags."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

import lbclient
from lbclient.http import ChatClient
from lbclient.observe.histogram import DURATION_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS
from lbclient.testing import FakeClock, ReplicaConfig, ReplicaFleet

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from lbclient.metrics import OpenTelemetry

MESSAGES = [{"role": "user", "content": "hi"}]
FAST: dict[str, Any] = {"base_latency": 0.005, "sigma": 0.0, "token_delay": 0.001, "tokens": 4}
BASE = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai"}


class Otel:
    """A meter provider with an in-memory reader and a tracer provider with an in-memory
    exporter, and what they collected."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.exporter = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.exporter))

    def attach(self, lb: lbclient.Balancer, **kwargs: Any) -> OpenTelemetry:
        return OpenTelemetry(lb, meter_provider=self.meters, tracer_provider=self.tracers, **kwargs)

    def metrics(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        out: dict[str, Any] = {}
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                assert sm.scope.name == "lbclient"
                for m in sm.metrics:
                    out[m.name] = m
        return out

    def points(self, name: str, **attrs: Any) -> list[Any]:
        m = self.metrics().get(name)
        if m is None:
            return []
        return [
            p for p in m.data.data_points if all(p.attributes.get(k) == v for k, v in attrs.items())
        ]

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def close(self) -> None:
        self.meters.shutdown()
        self.tracers.shutdown()


@pytest.fixture
def otel() -> Any:
    o = Otel()
    yield o
    o.close()


def server(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {"server.address": parts.hostname, "server.port": parts.port}


def in_order() -> Any:
    """The first endpoint not excluded: the first attempt goes to endpoint 0, a retry
    or a backup to endpoint 1."""

    class Picker:
        def __init__(self, states: Any) -> None:
            self.states = tuple(states)

        def pick(self, key: object, exclude: Any) -> Any:
            for s in self.states:
                if not exclude or s not in exclude:
                    return s
            return None

    class InOrder:
        name = "in_order"

        def picker(self, states: Any, ctx: Any) -> Picker:
            return Picker(states)

    return InOrder()


# -- GenAI histograms ---------------------------------------------------------------------


async def test_genai_histograms_have_their_names_units_buckets_and_attributes(
    fleet_factory: Any, otel: Otel
) -> None:
    fleet: ReplicaFleet = await fleet_factory([ReplicaConfig(**FAST)] * 2)
    lb = lbclient.Balancer(
        fleet.urls,
        strategy=in_order(),
        retry=lbclient.Retry(attempts=2, backoff=0.001, max_backoff=0.001),
    )
    otel.attach(lb, balancer="chat")
    first, second = fleet.urls
    async with ChatClient(lb, timeout=5.0) as chat:
        for _ in range(3):
            await chat.create(messages=MESSAGES)
        fleet[0].set(error_rate=1.0)
        await chat.create(messages=MESSAGES)  # 500 on endpoint 0, retried on endpoint 1
        fleet[1].set(error_rate=1.0)
        with pytest.raises(lbclient.AttemptsExhausted):
            await chat.create(messages=MESSAGES)  # both fail
        fleet.set_all(error_rate=0.0)
        for _ in range(2):
            assert [t async for t in chat.stream(messages=MESSAGES)] == [
                f"tok{i} " for i in range(4)
            ]

    metrics = otel.metrics()
    duration = metrics["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    assert duration.description == "GenAI operation duration."
    points = duration.data.data_points
    assert all(tuple(p.explicit_bounds) == DURATION_BUCKETS for p in points)
    by_server = {
        (p.attributes.get("server.port"), p.attributes.get("error.type")): p for p in points
    }
    ok_first = by_server[(server(first)["server.port"], None)]
    ok_second = by_server[(server(second)["server.port"], None)]
    failed = by_server[(None, "AttemptsExhausted")]
    assert set(by_server) == {(ok_first.attributes["server.port"], None),
                              (ok_second.attributes["server.port"], None),
                              (None, "AttemptsExhausted")}  # fmt: skip
    # 3 calls and 2 whole streams on the first endpoint, the retried call on the second
    assert (ok_first.count, ok_second.count, failed.count) == (5, 1, 1)
    assert dict(ok_first.attributes) == {**BASE, "lbclient.balancer": "chat", **server(first)}
    assert dict(failed.attributes) == {
        **BASE,
        "lbclient.balancer": "chat",
        "error.type": "AttemptsExhausted",
    }
    assert 0 < ok_first.sum < 5 * 1.0
    assert sum(ok_first.bucket_counts) == 5
    assert len(ok_first.bucket_counts) == len(DURATION_BUCKETS) + 1

    # Streams: time to first chunk (and only streams report it).
    ttft = metrics["gen_ai.client.operation.time_to_first_chunk"]
    assert ttft.unit == "s"
    (stream_point,) = ttft.data.data_points
    assert tuple(stream_point.explicit_bounds) == TTFT_BUCKETS
    assert stream_point.count == 2
    assert dict(stream_point.attributes) == {**BASE, "lbclient.balancer": "chat", **server(first)}

    # Tokens: the fake replicas report prompt_tokens=1, completion_tokens=4 per answer.
    usage = metrics["gen_ai.client.token.usage"]
    assert usage.unit == "{token}"
    kinds = {
        (p.attributes["gen_ai.token.type"], p.attributes["server.port"]): p
        for p in usage.data.data_points
    }
    assert all(tuple(p.explicit_bounds) == TOKEN_BUCKETS for p in kinds.values())
    port1, port2 = server(first)["server.port"], server(second)["server.port"]
    assert (kinds["input", port1].count, kinds["input", port1].sum) == (3, 3)
    assert (kinds["output", port1].count, kinds["output", port1].sum) == (3, 12)
    assert (kinds["output", port2].count, kinds["output", port2].sum) == (1, 4)
    await lb.aclose()


# Was a defect: engine/streaming.py never hands a stream's settled usage (call.usage, set
# by report_usage from the stream's include_usage chunk) to recorder.usage: only
# route._recorded (non-streaming calls) does, so gen_ai.client.token.usage misses streams
async def test_a_streams_token_usage_is_recorded(fleet_factory: Any, otel: Otel) -> None:
    fleet: ReplicaFleet = await fleet_factory([ReplicaConfig(**FAST)])
    lb = lbclient.Balancer(fleet.urls)
    otel.attach(lb)
    async with ChatClient(lb, timeout=5.0) as chat:
        opts = {"include_usage": True}
        tokens = [t async for t in chat.stream(messages=MESSAGES, stream_options=opts)]
        assert len(tokens) == 4
    outputs = otel.points("gen_ai.client.token.usage", **{"gen_ai.token.type": "output"})
    assert [(p.count, p.sum) for p in outputs] == [(1, 4)]
    await lb.aclose()


# Was a defect: engine/streaming.py calls recorder.call(..., stream=True) once, at the
# first chunk (a TTFT), and never when the stream ends: a successful stream is never in
# gen_ai.client.operation.duration (nor lbclient_call_duration_seconds), though the GenAI
# conventions measure the whole operation, streamed or not
async def test_a_streams_whole_duration_is_an_operation_duration(
    clock: FakeClock, otel: Otel
) -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"], clock=clock)
    otel.attach(lb)

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
        clock.advance(0.5)
        yield "a"
        await asyncio.sleep(0.01)  # the next chunk is awaited, as from a socket
        clock.advance(20.0)
        yield "b"

    assert [c async for c in gen()] == ["a", "b"]
    (ttft,) = otel.points("gen_ai.client.operation.time_to_first_chunk")
    assert (ttft.count, ttft.sum) == (1, 0.5)
    durations = otel.points("gen_ai.client.operation.duration")
    assert [(p.count, p.sum) for p in durations] == [(1, 20.5)]
    await lb.aclose()


async def test_a_stream_failing_before_its_first_chunk_is_a_failed_operation(
    clock: FakeClock, otel: Otel
) -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"], clock=clock)
    otel.attach(lb)

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
        clock.advance(3.0)
        raise ConnectionResetError("gone")
        yield "never"

    with pytest.raises(ConnectionResetError):
        [c async for c in gen()]
    assert otel.points("gen_ai.client.operation.time_to_first_chunk") == []
    (point,) = otel.points("gen_ai.client.operation.duration")
    assert point.attributes["error.type"] == "ConnectionResetError"
    assert (point.count, point.sum) == (1, 3.0)
    await lb.aclose()


# -- observable instruments ---------------------------------------------------------------


async def test_observable_instruments_read_the_balancer_at_collection(otel: Otel) -> None:
    urls = ["http://10.0.0.1:8000", "http://10.0.0.2:9000"]
    lb = lbclient.Balancer(
        urls,
        strategy=in_order(),
        retry=lbclient.Retry(attempts=2, backoff=0.001, max_backoff=0.001),
        breaker=lbclient.Breaker(failures=1, cooldown=60.0),
        admission=lbclient.Admission(limit=1, max_queue=0, throttle=None),
    )
    otel.attach(lb, balancer="chat")
    release = asyncio.Event()
    fail_first = True

    async def work(ep: lbclient.Endpoint) -> str:
        nonlocal fail_first
        if ep.url == urls[0] and fail_first:
            fail_first = False
            raise ConnectionError("refused")
        await release.wait()
        return ep.url

    held = asyncio.create_task(lb.call(work, tokens=120.0))
    await asyncio.sleep(0.02)
    with pytest.raises(lbclient.Overloaded):
        await lb.call(work)  # limit 1, no queue: shed at once

    def value(name: str, **attrs: Any) -> Any:
        (point,) = otel.points(name, **attrs)
        return point.value

    a, b = ({"lbclient.endpoint.url": u, **server(u)} for u in urls)
    # The first attempt failed on endpoint 0 (its breaker opened); the retry runs on 1.
    assert value("lbclient.endpoint.in_flight", **b) == 1
    assert value("lbclient.endpoint.in_flight", **a) == 0
    assert value("lbclient.endpoint.tokens_in_flight", **b) == 120
    assert value("lbclient.endpoint.breaker_state", **a) == 2  # open
    assert value("lbclient.endpoint.breaker_state", **b) == 0  # closed
    assert value("lbclient.endpoint.pickable", **a) == 0
    assert value("lbclient.endpoint.pickable", **b) == 1
    assert value("lbclient.retries", reason="connection") == 1
    assert value("lbclient.shed", reason="queue full") == 1
    assert value("lbclient.calls", outcome="failed") == 1
    assert value("lbclient.calls", outcome="ok") == 0
    assert value("lbclient.demand.calls") == 1
    assert value("lbclient.demand.tokens") == 120
    assert {p.attributes["lbclient.balancer"] for p in otel.points("lbclient.calls")} == {"chat"}
    metrics = otel.metrics()
    assert metrics["lbclient.endpoint.in_flight"].unit == "{request}"
    assert metrics["lbclient.endpoint.tokens_in_flight"].unit == "{token}"
    assert metrics["lbclient.calls"].data.is_monotonic
    assert server(urls[1]) == {"server.address": "10.0.0.2", "server.port": 9000}

    release.set()
    assert await held == urls[1]
    assert value("lbclient.calls", outcome="ok") == 1
    assert value("lbclient.demand.calls") == 0
    assert value("lbclient.endpoint.in_flight", **b) == 0
    assert value("lbclient.hedges", result="sent") == 0
    await lb.aclose()


async def test_two_balancers_share_the_instruments_told_apart(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    chat = lbclient.Balancer(["http://10.0.0.1:8000"])
    embed = lbclient.Balancer(["http://10.0.1.1:8000"])
    otel.attach(chat, balancer="chat")
    otel.attach(embed, balancer="embed", operation="embeddings")
    with pytest.raises(lbclient.ConfigError, match="already reports"):
        otel.attach(chat, balancer="again")  # it would count every call twice

    @chat.route
    async def ask(ep: lbclient.Endpoint) -> None:
        return None

    @embed.route
    async def vec(ep: lbclient.Endpoint) -> None:
        return None

    await ask()
    await vec()
    await vec()
    counts = {
        (p.attributes["lbclient.balancer"], p.attributes["gen_ai.operation.name"]): p.count
        for p in otel.points("gen_ai.client.operation.duration")
    }
    assert counts == {("chat", "chat"): 1, ("embed", "embeddings"): 2}
    calls = {
        p.attributes["lbclient.balancer"]: p.value
        for p in otel.points("lbclient.calls", outcome="ok")
    }
    assert calls == {"chat": 1, "embed": 2}
    # Every observable instrument reports both (a second registration of a name would
    # have its callbacks dropped by the SDK, with a warning).
    pickable = {
        (p.attributes["lbclient.balancer"], p.attributes["server.address"]): p.value
        for p in otel.points("lbclient.endpoint.pickable")
    }
    assert pickable == {("chat", "10.0.0.1"): 1, ("embed", "10.0.1.1"): 1}
    assert [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")] == []
    await chat.aclose()
    await embed.aclose()


# -- spans --------------------------------------------------------------------------------


def children_of(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
        key=lambda s: s.attributes["lbclient.attempt.number"],  # type: ignore[index]
    )


async def test_a_retried_stream_is_a_span_with_a_child_per_attempt(
    fleet_factory: Any, otel: Otel
) -> None:
    fleet: ReplicaFleet = await fleet_factory(
        [ReplicaConfig(**{**FAST, "error_rate": 1.0}), ReplicaConfig(**FAST)]
    )
    lb = lbclient.Balancer(
        fleet.urls,
        strategy=in_order(),
        retry=lbclient.Retry(attempts=2, backoff=0.001, max_backoff=0.001),
    )
    otel.attach(lb, spans=True)
    async with ChatClient(lb, timeout=5.0) as chat:
        assert len([t async for t in chat.stream(messages=MESSAGES)]) == 4
    spans = otel.spans()
    (call,) = [s for s in spans if s.parent is None]
    assert call.name == "chat"
    assert call.kind == SpanKind.CLIENT
    assert call.attributes["lbclient.attempts"] == 2  # type: ignore[index]
    assert call.attributes["lbclient.served_by"] == fleet.urls[1]  # type: ignore[index]
    assert call.status.status_code == StatusCode.UNSET
    first, second = children_of(spans, call)
    assert len(spans) == 3
    for child in (first, second):
        assert child.name == "attempt"
        assert child.context.trace_id == call.context.trace_id
        assert call.start_time <= child.start_time <= child.end_time <= call.end_time  # type: ignore[operator]
    assert {k: first.attributes[k] for k in first.attributes} == {  # type: ignore[index]
        **BASE,
        "lbclient.balancer": "default",
        **server(fleet.urls[0]),
        "lbclient.attempt.number": 1,
        "lbclient.attempt.hedge": False,
        "lbclient.attempt.retry": False,
        "lbclient.attempt.outcome": "failed",
        "error.type": "500",
    }
    assert first.status.status_code == StatusCode.ERROR
    assert [e.name for e in first.events] == ["exception"]
    assert second.attributes["lbclient.attempt.retry"] is True  # type: ignore[index]
    assert second.attributes["lbclient.attempt.outcome"] == "ok"  # type: ignore[index]
    assert second.attributes["server.port"] == server(fleet.urls[1])["server.port"]  # type: ignore[index]
    assert second.status.status_code == StatusCode.UNSET
    await lb.aclose()


async def test_a_hedged_stream_marks_the_backup_and_the_loser(
    fleet_factory: Any, otel: Otel
) -> None:
    fleet: ReplicaFleet = await fleet_factory(
        [ReplicaConfig(**{**FAST, "base_latency": 0.5}), ReplicaConfig(**FAST)]
    )
    lb = lbclient.Balancer(
        fleet.urls, strategy=in_order(), hedge=lbclient.Hedge(delay=0.05, max_extra=0.9)
    )
    otel.attach(lb, spans=True)
    async with ChatClient(lb, timeout=5.0) as chat:
        assert len([t async for t in chat.stream(messages=MESSAGES)]) == 4
    await asyncio.sleep(0.05)  # the losing attempt's span ends when its pump stops
    spans = otel.spans()
    (call,) = [s for s in spans if s.parent is None]
    primary, backup = children_of(spans, call)
    assert primary.attributes["lbclient.attempt.outcome"] == "lost"  # type: ignore[index]
    assert primary.attributes["lbclient.attempt.hedge"] is False  # type: ignore[index]
    assert backup.attributes["lbclient.attempt.hedge"] is True  # type: ignore[index]
    assert backup.attributes["lbclient.attempt.retry"] is False  # type: ignore[index]
    assert backup.attributes["lbclient.attempt.outcome"] == "ok"  # type: ignore[index]
    assert primary.status.status_code == StatusCode.UNSET  # losing a race is no error
    assert call.attributes["lbclient.served_by"] == fleet.urls[1]  # type: ignore[index]
    (sent,) = otel.points("lbclient.hedges", result="sent")
    assert sent.value == 1
    await lb.aclose()


async def test_a_failed_stream_span_records_the_error(otel: Otel) -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"])
    otel.attach(lb, spans=True)

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
        raise ValueError("the caller's bug")
        yield "never"

    with pytest.raises(ValueError):
        [c async for c in gen()]
    spans = otel.spans()
    (call,) = [s for s in spans if s.parent is None]
    (attempt,) = children_of(spans, call)
    assert call.status.status_code == StatusCode.ERROR
    assert call.attributes["error.type"] == "ValueError"  # type: ignore[index]
    assert attempt.attributes["lbclient.attempt.outcome"] == "ignored"  # type: ignore[index]
    await lb.aclose()


# Was a defect: spans=True sets engine.tracer and the decorated fast paths defer to
# route.run_call, but run_call/_run_call never call engine.tracer.call(call) nor set
# call.tracer (only streaming.make_stream_route does): a non-streaming call gets no span
# and its attempts none either
@pytest.mark.parametrize("how", ["route", "lb.call"])
async def test_a_retried_call_is_a_span_with_a_child_per_attempt(how: str, otel: Otel) -> None:
    urls = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    lb = lbclient.Balancer(
        urls,
        strategy=in_order(),
        retry=lbclient.Retry(attempts=2, backoff=0.001, max_backoff=0.001),
    )
    otel.attach(lb, spans=True)

    async def work(ep: lbclient.Endpoint) -> str:
        if ep.url == urls[0]:
            raise ConnectionError("refused")
        return ep.url

    if how == "route":
        assert await lb.route(work)() == urls[1]
    else:
        assert await lb.call(work) == urls[1]
    spans = otel.spans()
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, f"call spans: {[s.name for s in roots]}"
    first, second = children_of(spans, roots[0])
    assert first.attributes["lbclient.attempt.outcome"] == "failed"  # type: ignore[index]
    assert second.attributes["lbclient.attempt.retry"] is True  # type: ignore[index]
    await lb.aclose()


async def test_spans_are_off_unless_asked_for(otel: Otel) -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"])
    otel.attach(lb)
    assert lb._engine.tracer is None

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
        yield "a"

    @lb.route
    async def call(ep: lbclient.Endpoint) -> str:
        return "b"

    assert [c async for c in gen()] == ["a"]
    assert await call() == "b"
    assert otel.spans() == []
    (ttft,) = otel.points("gen_ai.client.operation.time_to_first_chunk")
    (duration,) = otel.points("gen_ai.client.operation.duration")
    assert (ttft.count, duration.count) == (1, 2)  # the stream's whole duration too
    await lb.aclose()


def test_a_non_balancer_is_a_config_error(otel: Otel) -> None:
    with pytest.raises(lbclient.ConfigError):
        OpenTelemetry(object(), meter_provider=otel.meters)  # type: ignore[arg-type]
