"""``lbclient.HTTPTransport`` with the real OpenAI SDK (and Anthropic's, and plain httpx)
against fake replicas on loopback: balanced, retried on 500s and refused connections,
429 + Retry-After as a cooldown, hangs hedged or cut per attempt, streams retried and
hedged before their first chunk and never after, 4xx passed through, the last answer
passed through when retries run out, usage and load read on the way, one connection
pool per endpoint closed when it leaves, fallback pools."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from strategies import InOrder

import lbclient
from lbclient.pool.state import EndpointState
from lbclient.strategies import PickContext
from lbclient.testing import ReplicaConfig, ReplicaFleet
from lbclient.transport import request_json

FAST: dict[str, Any] = {"base_latency": 0.005, "sigma": 0.0, "token_delay": 0.001}
MESSAGES = [{"role": "user", "content": "hi"}]
TOKENS = "".join(f"tok{i} " for i in range(8))


async def fleet_of(fleet_factory: Any, *configs: dict[str, Any]) -> ReplicaFleet:
    fleet: ReplicaFleet = await fleet_factory([ReplicaConfig(**{**FAST, **c}) for c in configs])
    return fleet


@contextlib.asynccontextmanager
async def sdk(lb: lbclient.Balancer, **options: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    """The OpenAI SDK balanced by ``lb``: one base URL, no SDK retries."""
    transport = lbclient.HTTPTransport(lb, **options)
    http = httpx.AsyncClient(transport=transport)
    client = openai.AsyncOpenAI(
        base_url="http://lbclient/v1", api_key="test-key", max_retries=0, http_client=http
    )
    try:
        yield client
    finally:
        await client.close()
        await lb.aclose()


def lb_error(exc: BaseException) -> BaseException | None:
    """lbclient's own error behind what the SDK raised: the SDK passes errors that are
    not httpx's through as they are (openai 3.x, built on httpx2), older SDKs wrap them
    in ``APIConnectionError`` (``__cause__``)."""
    if isinstance(exc, lbclient.LBError):
        return exc
    return exc.__cause__


async def ask(client: openai.AsyncOpenAI) -> tuple[str, str]:
    """One chat completion: (its text, the endpoint that served it)."""
    raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    text = raw.parse().choices[0].message.content or ""
    return text, raw.headers["x-lbclient-endpoint"]


# =========================================================================================
# Plain answers
# =========================================================================================


async def test_the_openai_sdk_is_balanced_over_the_fleet(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {}, {}, {})
    lb = lbclient.Balancer(fleet.urls, strategy="round_robin")
    async with sdk(lb) as client:
        answers = [await ask(client) for _ in range(9)]
    assert {url for _, url in answers} == set(fleet.urls)
    for text, url in answers:
        replica = fleet.urls.index(url)
        assert text == f"replica-{replica}: {TOKENS}"
    assert [r.counters.served for r in fleet] == [3, 3, 3]


async def test_500s_are_retried_on_another_replica(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"error_rate": 1.0}, {})
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=3))
    async with sdk(lb) as client:
        for _ in range(4):
            text, url = await ask(client)
            assert url == fleet.urls[1] and text.startswith("replica-1: ")
        stats = lb.stats()
    assert fleet[0].counters.errors == 4
    assert stats.retries_by == {"status 500": 4}
    assert stats.endpoint(fleet.urls[0]).failures == 4


async def test_a_429_with_retry_after_cools_the_replica_down(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"rate_limit_rate": 1.0, "retry_after": 30.0}, {})
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=3))
    async with sdk(lb) as client:
        for _ in range(5):
            _, url = await ask(client)
            assert url == fleet.urls[1]
        stats = lb.stats()
    assert fleet[0].counters.rejected_429 == 1  # then out for 30 s: no more picks
    assert stats.cooldowns == 1
    assert 29 < stats.endpoint(fleet.urls[0]).cooling_s <= 30


async def test_a_replica_down_is_retried_elsewhere(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {}, {})
    await fleet[0].down()
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=3))
    async with sdk(lb) as client:
        for _ in range(3):
            _, url = await ask(client)
            assert url == fleet.urls[1]
        stats = lb.stats()
    assert stats.retries_by.get("connection", 0) == 3


async def test_a_hung_replica_is_hedged_around(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"hang": True}, {})
    lb = lbclient.Balancer(
        fleet.urls, strategy=InOrder(), hedge=lbclient.Hedge(delay=0.05, max_extra=0.5)
    )
    async with sdk(lb) as client:
        _, url = await asyncio.wait_for(ask(client), 5.0)
        assert url == fleet.urls[1]
        stats = lb.stats()
    assert stats.hedges_sent == 1 and stats.hedges_won == 1
    await asyncio.sleep(0.05)
    assert fleet[0].counters.cancelled == 1  # the loser's connection was closed


async def test_the_sdk_timeout_bounds_each_attempt_not_the_call(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"hang": True}, {})
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=2))
    async with sdk(lb) as client:
        fast = client.with_options(timeout=0.2)
        raw = await fast.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        assert raw.headers["x-lbclient-endpoint"] == fleet.urls[1]
        stats = lb.stats()
    assert stats.retries_by == {"timeout": 1}


async def test_a_straggler_is_hedged(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"base_latency": 2.0}, {})
    lb = lbclient.Balancer(
        fleet.urls, strategy=InOrder(), hedge=lbclient.Hedge(delay=0.05, max_extra=0.5)
    )
    async with sdk(lb) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        _, url = await ask(client)
        assert loop.time() - start < 1.0 and url == fleet.urls[1]


@contextlib.asynccontextmanager
async def tiny_server(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def test_a_4xx_is_passed_through_at_once(fleet_factory: Any) -> None:
    hits: list[str] = []

    async def bad_request(request: web.Request) -> web.Response:
        hits.append(request.path)
        body = {"error": {"message": "model 'm' does not exist", "type": "invalid_request"}}
        return web.json_response(body, status=404)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", bad_request)
    fleet = await fleet_of(fleet_factory, {})
    async with tiny_server(app) as url:
        lb = lbclient.Balancer(
            [url, *fleet.urls],
            strategy=InOrder(),
            retry=lbclient.Retry(attempts=3),
            breaker=lbclient.Breaker(failures=1),
        )
        async with sdk(lb) as client:
            with pytest.raises(openai.NotFoundError, match="model 'm' does not exist"):
                await client.chat.completions.create(model="m", messages=MESSAGES)
            stats = lb.stats()
    assert hits == ["/v1/chat/completions"]  # once: not retried
    assert fleet[0].counters.received == 0
    ep = stats.endpoint(url)
    assert (ep.ignored, ep.failures, ep.breaker) == (1, 0, "closed")  # not held against it


async def test_when_retries_run_out_the_last_answer_is_passed_through(
    fleet_factory: Any,
) -> None:
    fleet = await fleet_of(fleet_factory, {"error_rate": 1.0}, {"error_rate": 1.0})
    lb = lbclient.Balancer(fleet.urls, retry=lbclient.Retry(attempts=3, backoff=0))
    async with sdk(lb) as client:
        with pytest.raises(openai.InternalServerError, match="injected failure") as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    response = info.value.response
    assert response.headers["x-lbclient-attempts"] == "3"
    error = response.extensions["lbclient.error"]
    assert isinstance(error, lbclient.AttemptsExhausted) and len(error.attempts) == 3
    assert fleet.total_errors == 3


async def test_rate_limited_everywhere_gives_the_sdk_its_rate_limit_error(
    fleet_factory: Any,
) -> None:
    fleet = await fleet_of(fleet_factory, *[{"rate_limit_rate": 1.0, "retry_after": 60.0}] * 2)
    retry = lbclient.Retry(attempts=3, max_retry_after=0.1)
    lb = lbclient.Balancer(fleet.urls, retry=retry)
    async with sdk(lb) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "60"
    # Both cool down (for max_retry_after); the third attempt waits for the first back.
    assert fleet.total_rejected_429 == 3


async def test_nothing_to_pick_raises_lbclients_error_through_the_sdk(
    fleet_factory: Any,
) -> None:
    fleet = await fleet_of(fleet_factory, {})
    lb = lbclient.Balancer(fleet.urls)
    lb.drain(fleet.urls[0])
    async with sdk(lb) as client:
        with pytest.raises((lbclient.NoEndpointAvailable, openai.APIConnectionError)) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert isinstance(lb_error(info.value), lbclient.NoEndpointAvailable)


# =========================================================================================
# Streams
# =========================================================================================


async def stream_text(client: openai.AsyncOpenAI, **extra: Any) -> tuple[str, Any]:
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, **extra
    )
    parts: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(parts), usage


async def test_a_stream_is_retried_before_its_first_chunk(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"error_rate": 1.0}, {})
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=3))
    async with sdk(lb) as client:
        text, usage = await stream_text(client, stream_options={"include_usage": True})
        stats = lb.stats()
    assert text == TOKENS
    assert usage is not None and usage.completion_tokens == 8
    assert fleet[0].counters.errors == 1 and fleet[1].counters.served == 1
    assert stats.endpoint(fleet.urls[1]).ttft_p50_ms is not None


async def test_a_stream_is_hedged_on_its_first_chunk(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"ttft": 3.0}, {})
    lb = lbclient.Balancer(
        fleet.urls, strategy=InOrder(), hedge=lbclient.Hedge(delay=0.05, max_extra=0.5)
    )
    async with sdk(lb) as client:
        text, _ = await asyncio.wait_for(stream_text(client), 2.0)
        stats = lb.stats()
    assert text == TOKENS
    assert stats.hedges_won == 1
    await asyncio.sleep(0.05)
    assert fleet[0].counters.cancelled == 1


async def test_a_stream_is_never_retried_after_its_first_chunk(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"error_after_tokens": 3}, {})
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=3))
    parts: list[str] = []
    async with sdk(lb) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(Exception) as info:
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
    assert "".join(parts) == "tok0 tok1 tok2 "  # what replica 0 sent, nothing duplicated
    assert isinstance(info.value, httpx.TransportError | openai.APIError)
    assert fleet[1].counters.received == 0


async def test_closing_a_stream_early_frees_its_connection(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"tokens": 200, "token_delay": 0.01})
    lb = lbclient.Balancer(fleet.urls)
    async with sdk(lb) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async for _ in stream:
            break
        await stream.close()
        await asyncio.sleep(0.05)
        assert lb.stats().in_flight == 0
    assert fleet[0].counters.cancelled == 1


# =========================================================================================
# Usage, load, limits, eligibility
# =========================================================================================


async def test_usage_settles_the_estimate_in_a_tokens_per_minute_window(
    fleet_factory: Any,
) -> None:
    fleet = await fleet_of(fleet_factory, {})
    limited = lbclient.Endpoint(fleet.urls[0], limits=lbclient.Limits(tokens_per_minute=1_000_000))
    lb = lbclient.Balancer([limited])
    window = lb._pool.members[limited.url].limit.tokens  # type: ignore[union-attr]
    assert window is not None
    async with sdk(lb) as client:
        await ask(client)
        assert window.total == 9  # prompt 1 + completion 8, not the estimate of ~257
        await stream_text(client, stream_options={"include_usage": True})
        assert window.total == 18


async def test_the_server_load_header_is_reported(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {})
    lb = lbclient.Balancer(fleet.urls)
    async with sdk(lb) as client:
        await ask(client)
        assert lb.stats().endpoint(fleet.urls[0]).server_load == 0.0


async def test_eligible_routes_requests_by_model(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {}, {})
    lb = lbclient.Balancer(
        [
            lbclient.Endpoint(fleet.urls[0], metadata={"models": ["small"]}),
            lbclient.Endpoint(fleet.urls[1], metadata={"models": ["big"]}),
        ]
    )

    def serves(endpoint: lbclient.Endpoint, request: httpx.Request) -> bool:
        return request_json(request)["model"] in endpoint.metadata["models"]

    async with sdk(lb, eligible=serves) as client:
        for model, replica in [("big", 1), ("small", 0), ("big", 1)]:
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=MESSAGES
            )
            assert raw.headers["x-lbclient-endpoint"] == fleet.urls[replica]
        with pytest.raises((lbclient.NoEndpointAvailable, openai.APIConnectionError)) as info:
            await client.chat.completions.create(model="huge", messages=MESSAGES)
    error = lb_error(info.value)
    assert isinstance(error, lbclient.NoEndpointAvailable)
    assert "refused by the call's eligible=" in str(error)


async def test_the_sdks_own_retries_are_flagged(
    fleet_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = await fleet_of(fleet_factory, {"error_rate": 1.0})
    lb = lbclient.Balancer(fleet.urls)
    http = httpx.AsyncClient(transport=lbclient.HTTPTransport(lb))
    client = openai.AsyncOpenAI(
        base_url="http://lbclient/v1", api_key="k", max_retries=1, http_client=http
    )
    with (
        caplog.at_level(logging.WARNING, logger="lbclient"),
        pytest.raises(openai.InternalServerError),
    ):
        await client.with_options(max_retries=1).chat.completions.create(
            model="m", messages=MESSAGES
        )
    await client.close()
    warnings = [r.message for r in caplog.records if "max_retries=0" in r.message]
    assert len(warnings) == 1


# =========================================================================================
# Plain httpx: paths, bodies, headers, models, connection pools
# =========================================================================================


async def test_plain_httpx_with_a_base_path(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {})
    lb = lbclient.Balancer([url + "/v1" for url in fleet.urls])
    transport = lbclient.HTTPTransport(lb, base_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://llm/api") as http:
        models = await http.get("/models")
        assert models.status_code == 200
        assert models.json()["data"][0]["id"] == "fake-model"
        r = await http.post("/chat/completions", json={"messages": MESSAGES})
        assert r.json()["choices"][0]["message"]["content"].endswith(TOKENS)
        assert r.headers["x-lbclient-endpoint"] == fleet.urls[0] + "/v1"
    with pytest.raises(lbclient.ConfigError, match="base_path"):
        lbclient.HTTPTransport(lb, base_path="api")


async def test_a_streaming_upload_is_sent_once(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"error_rate": 1.0}, {})
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=3))

    async def upload() -> AsyncIterator[bytes]:
        yield b'{"messages": '
        yield json.dumps(MESSAGES).encode() + b"}"

    async with httpx.AsyncClient(transport=lbclient.HTTPTransport(lb)) as http:
        r = await http.post("http://x/v1/chat/completions", content=upload())
        assert r.status_code == 500  # the one attempt's answer, passed through
        ok = await http.post("http://x/v1/chat/completions", json={"messages": MESSAGES})
        assert ok.status_code == 200  # a bytes body is retried
    assert fleet[0].counters.received == 2 and fleet[1].counters.received == 1


async def test_per_endpoint_headers_and_model_names(fleet_factory: Any) -> None:
    seen: list[tuple[str | None, str | None, Any]] = []

    async def echo(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.headers.get("Authorization"), request.headers.get("Host"), body))
        return web.json_response(
            {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    async with tiny_server(app) as url:
        vendor = lbclient.Endpoint(url, metadata={"model": "vendor-model-2025"})
        lb = lbclient.Balancer([vendor])
        keys = {url: "Bearer vendor-key"}
        transport = lbclient.HTTPTransport(lb, headers=lambda ep: {"Authorization": keys[ep.url]})
        async with httpx.AsyncClient(transport=transport) as http:
            r = await http.post(
                "http://lbclient/v1/chat/completions",
                json={"model": "llama", "messages": MESSAGES},
                headers={"Authorization": "Bearer self-hosted"},
            )
            assert r.status_code == 200
    auth, host, body = seen[0]
    assert auth == "Bearer vendor-key"
    assert host == url.removeprefix("http://")
    assert body == {"model": "vendor-model-2025", "messages": MESSAGES}


class Recording(httpx.AsyncHTTPTransport):
    closed: list[str]

    def __init__(self, url: str, closed: list[str]) -> None:
        super().__init__()
        self.url = url
        self.closed = closed

    async def aclose(self) -> None:
        self.closed.append(self.url)
        await super().aclose()


async def test_one_pool_per_endpoint_closed_when_it_leaves(fleet_factory: Any) -> None:
    slow_stream = {"tokens": 500, "token_delay": 0.02}  # 10 s
    fleet = await fleet_of(fleet_factory, slow_stream, slow_stream)
    lb = lbclient.Balancer(fleet.urls, strategy="round_robin")
    closed: list[str] = []
    made: list[str] = []

    def pool(endpoint: lbclient.Endpoint) -> httpx.AsyncBaseTransport:
        made.append(endpoint.url)
        return Recording(endpoint.url, closed)

    transport = lbclient.HTTPTransport(lb, transport=pool)
    async with httpx.AsyncClient(transport=transport) as http:
        for _ in range(4):
            await http.post("http://x/v1/chat/completions", json={"messages": MESSAGES})
        assert sorted(made) == sorted(fleet.urls)  # one each, reused
        body = {"messages": MESSAGES, "stream": True}
        async with http.stream("POST", "http://x/v1/chat/completions", json=body) as r:
            served = r.headers["x-lbclient-endpoint"]
            body_chunks = r.aiter_bytes()  # kept: garbage collecting it would close it
            await anext(body_chunks)
            lb.remove(served)  # it leaves while its response is still being read (10 s)
            await asyncio.sleep(0.05)
            assert closed == []
            await body_chunks.aclose()
        await asyncio.sleep(0.01)  # closing the response frees the pool's last user
        assert closed == [served]
        lb.add(served)
        await http.post("http://x/v1/chat/completions", json={"messages": MESSAGES})
        await http.post("http://x/v1/chat/completions", json={"messages": MESSAGES})
        assert made.count(served) == 2  # back: a fresh pool
    assert sorted(closed) == sorted([served, *fleet.urls])  # the client's close: all
    with pytest.raises(lbclient.BalancerClosed):
        await transport.handle_async_request(httpx.Request("GET", "http://x/v1/models"))
    assert lb._pool.on_remove == []


def test_bad_configuration_is_refused() -> None:
    lb = lbclient.Balancer(["http://a"])
    with pytest.raises(lbclient.ConfigError, match=r"needs an lbclient\.Balancer"):
        lbclient.HTTPTransport("http://a")  # type: ignore[arg-type]
    with pytest.raises(lbclient.ConfigError, match="buffer_limit"):
        lbclient.HTTPTransport(lb, buffer_limit=0)
    with pytest.raises(lbclient.ConfigError, match="key must be a callable"):
        lbclient.HTTPTransport(lb, key="user")  # type: ignore[arg-type]
    assert repr(lbclient.HTTPTransport(lb)).startswith("<lbclient.HTTPTransport lb=")


async def test_a_long_plain_answer_is_committed_at_the_buffer_limit(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {"tokens": 2000})
    lb = lbclient.Balancer(fleet.urls)
    transport = lbclient.HTTPTransport(lb, buffer_limit=1024)
    async with httpx.AsyncClient(transport=transport) as http:
        r = await http.post("http://x/v1/chat/completions", json={"messages": MESSAGES})
        assert r.json()["usage"]["completion_tokens"] == 2000
    assert lb.stats().in_flight == 0


# =========================================================================================
# Fallback pools through the SDK
# =========================================================================================


async def test_the_primary_pool_down_sends_every_call_to_the_fallback(
    fleet_factory: Any,
) -> None:
    primary = await fleet_of(fleet_factory, {}, {})
    vendor = await fleet_of(fleet_factory, {})
    for replica in primary:
        await replica.down()
    fallback = lbclient.Balancer(vendor.urls, name="vendor")
    lb = lbclient.Balancer(
        primary.urls,
        name="self-hosted",
        fallback=fallback,
        retry=lbclient.Retry(attempts=2, backoff=0),
        breaker=lbclient.Breaker(failures=2, cooldown=60.0),
    )
    async with sdk(lb) as client:
        for _ in range(6):  # until both breakers are open
            await ask(client)
        before = lb.stats().attempts
        served = [await ask(client) for _ in range(20)]
        extra = lb.stats().attempts - before
        stats = lb.stats()
    assert {url for _, url in served} == set(vendor.urls)
    assert extra <= 20  # at most one attempt per call on the dead pool (panic mode's)
    assert all(e.breaker == "open" for e in stats.endpoints)
    await fallback.aclose()


async def test_a_request_can_opt_out_of_the_fallback(fleet_factory: Any) -> None:
    primary = await fleet_of(fleet_factory, {})
    vendor = await fleet_of(fleet_factory, {})
    fallback = lbclient.Balancer(vendor.urls)
    lb = lbclient.Balancer(primary.urls, fallback=fallback)
    lb.drain(primary.urls[0])

    def allowed(request: httpx.Request) -> bool:
        return request.headers.get("x-no-fallback") is None

    async with sdk(lb, fallback=allowed) as client:
        _, url = await ask(client)
        assert url == vendor.urls[0]
        with pytest.raises((lbclient.NoEndpointAvailable, openai.APIConnectionError)) as info:
            await client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-no-fallback": "1"}
            )
    assert isinstance(lb_error(info.value), lbclient.NoEndpointAvailable)
    await fallback.aclose()


# =========================================================================================
# Anthropic's SDK
# =========================================================================================


def _anthropic_app(hits: list[str]) -> web.Application:
    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        hits.append(request.host)
        if len(hits) == 1:  # the first request of the test fails: retried elsewhere
            return web.json_response(
                {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
                status=529,
            )
        usage = {"input_tokens": 12, "output_tokens": 3}
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": "Hello there"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_2",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 12, "output_tokens": 1},
            },
        }
        events = [
            ("message_start", start),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": "Hello"},
                },
            ),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 5},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    return app


async def test_the_anthropic_sdk_through_the_transport() -> None:
    anthropic = pytest.importorskip("anthropic")
    httpx2 = pytest.importorskip("httpx2")  # what Anthropic's SDK is built on
    hits: list[str] = []
    async with (
        tiny_server(_anthropic_app(hits)) as one,
        tiny_server(_anthropic_app(hits)) as two,
    ):
        urls = [one, two]
        lb = lbclient.Balancer(
            [lbclient.Endpoint(u, limits=lbclient.Limits(tokens_per_minute=10_000)) for u in urls],
            retry=lbclient.Retry(attempts=3),
        )
        http = httpx2.AsyncClient(transport=lbclient.HTTPTransport(lb))
        client = anthropic.AsyncAnthropic(
            base_url="http://lbclient", api_key="k", max_retries=0, http_client=http
        )
        message = await client.messages.create(
            model="claude", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content[0].text == "Hello there"
        text = ""
        async with client.messages.stream(
            model="claude", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async for part in stream.text_stream:
                text += part
        assert text == "Hello"
        await client.close()
    assert len(hits) == 3  # the 529 was retried
    totals = [s.limit.tokens.total for s in lb._pool.members.values()]  # type: ignore[union-attr]
    # The answers settle their estimates: 12 + 3, then 12 + 5 (on one endpoint, or one
    # each); the 529 keeps its estimate (max_tokens 64 and the prompt: a failed attempt
    # may have cost something).
    low, high = sorted(totals)
    assert (low == 32 and high > 64) or (low == 15 and high > 64 + 17)


async def test_usage_settles_admission_fairness_and_quotas(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {})
    quota = lbclient.Quota(tokens_per_minute=100_000)
    lb = lbclient.Balancer(fleet.urls, admission=lbclient.Admission(limit=8, quotas={"*": quota}))
    async with sdk(lb, tenant=lambda request: request.headers.get("x-user")) as client:
        await client.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-user": "ann"}
        )
        admission = lb.stats().admission
        assert admission is not None
        # Fair queueing charged the estimate at admission, then the real cost:
        # 1 prompt token + 2 x 8 completion tokens.
        assert admission.tenant("ann").service == 17
        assert admission.tenant("ann").tokens_in_flight == 0


async def test_every_pool_failing_passes_the_last_pools_answer_through(
    fleet_factory: Any,
) -> None:
    primary = await fleet_of(fleet_factory, {"error_rate": 1.0})
    vendor = await fleet_of(fleet_factory, {"rate_limit_rate": 1.0, "retry_after": 30.0})
    fallback = lbclient.Balancer(vendor.urls, name="vendor")  # no retry: its one answer
    lb = lbclient.Balancer(
        primary.urls, name="self-hosted", fallback=fallback, retry=lbclient.Retry(attempts=2)
    )
    async with sdk(lb) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    error = info.value.response.extensions["lbclient.error"]
    assert isinstance(error, lbclient.PoolsExhausted)
    assert [p.pool for p in error.pools] == ["self-hosted", "vendor"]
    assert "pool 'vendor': 429 Too Many Requests from http://127.0.0.1:" in str(error)
    await fallback.aclose()


class PrefixSeen(InOrder):
    """In order, recording the prompt text each pick gets (a prefix-aware strategy)."""

    uses_prefix = True

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> Any:
        inner = super().picker(states, ctx)
        seen = self.seen

        class Picker:
            def pick(self, call: Any, exclude: Any) -> EndpointState | None:
                seen.append(None if call is None else call.prefix)
                return inner.pick(call, exclude)

        return Picker()


async def test_a_prefix_aware_strategy_gets_the_prompt_text(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, {})
    strategy = PrefixSeen()
    lb = lbclient.Balancer(fleet.urls, strategy=strategy)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    async with sdk(lb) as client:
        await client.chat.completions.create(model="m", messages=messages)
        await (
            await client.chat.completions.create(model="m", messages=messages, stream=True)
        ).close()
    assert strategy.seen == [lbclient.prompt_text(messages)] * 2
