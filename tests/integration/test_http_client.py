"""The built-in ``lbclient.http.ChatClient`` against fake replicas on loopback: answers,
exact token streams, retries on 500 and 429 (Retry-After cooldowns), headers sent, load reported,
TTFT recorded, SSE parsing of awkward streams, session ownership and bad configuration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import lbclient
from lbclient.http import ChatClient
from lbclient.pool.state import EndpointState
from lbclient.strategies import PickContext
from lbclient.testing import ReplicaConfig, ReplicaFleet

MESSAGES = [{"role": "user", "content": "hi"}]
FAST: dict[str, Any] = {"base_latency": 0.005, "sigma": 0.0, "token_delay": 0.001}


def tokens(n: int) -> list[str]:
    return [f"tok{i} " for i in range(n)]


class _InOrderPicker:
    def __init__(self, states: Sequence[EndpointState]) -> None:
        self._states = tuple(states)

    def pick(self, key: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        for s in self._states:
            if not exclude or s not in exclude:
                return s
        return None


class InOrder:
    """The first endpoint not excluded: the first attempt always goes to replica 0, a
    retry to replica 1 -- so each test knows which replica saw what."""

    name = "in_order"

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _InOrderPicker:
        return _InOrderPicker(states)


async def fleet_of(fleet_factory: Any, *configs: ReplicaConfig) -> ReplicaFleet:
    fleet: ReplicaFleet = await fleet_factory(list(configs))
    return fleet


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def tiny_server(handler: Handler) -> AsyncIterator[str]:
    """An aiohttp server of our own on 127.0.0.1, for what the fake fleet cannot show
    (request headers, hand-made event streams); yields its base URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def completion(content: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def delta(content: str | None) -> dict[str, Any]:
    d = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": d, "finish_reason": None}]}


# -- answers ------------------------------------------------------------------------------


async def test_create_and_text_return_the_replica_answer(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, ReplicaConfig(tokens=4, **FAST))
    lb = lbclient.Balancer(fleet.urls)
    async with ChatClient(lb) as chat:
        reply = await chat.create(messages=MESSAGES, model="m-1", max_tokens=4)
        assert reply["model"] == "m-1"
        assert reply["choices"][0]["message"]["content"] == "replica-0: tok0 tok1 tok2 tok3 "
        assert await chat.text(messages=MESSAGES) == "replica-0: tok0 tok1 tok2 tok3 "
    st = lb.stats()
    assert (st.calls, st.calls_failed) == (2, 0)
    assert fleet.total_served == 2


async def test_stream_yields_the_exact_tokens_and_records_ttft(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, ReplicaConfig(tokens=12, **FAST))
    lb = lbclient.Balancer(fleet.urls)
    async with ChatClient(lb) as chat:
        assert lb.stats().endpoint(fleet.urls[0]).ttft_ms is None
        got = [t async for t in chat.stream(messages=MESSAGES, model="m")]
        assert got == tokens(12)  # role-only first delta and the finish chunk are skipped
        # include_usage adds a chunk with no choices: skipped too.
        opts = {"include_usage": True}
        assert [t async for t in chat.stream(messages=MESSAGES, stream_options=opts)] == tokens(12)
    ep = lb.stats().endpoint(fleet.urls[0])
    assert ep.ttft_ms is not None and ep.ttft_ms > 0
    assert ep.chunks_per_s is not None
    assert fleet.total_served == 2


async def test_concurrent_streams_do_not_mix(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, *[ReplicaConfig(tokens=8, **FAST)] * 3)
    lb = lbclient.Balancer(fleet.urls)
    async with ChatClient(lb) as chat:

        async def collect() -> list[str]:
            return [t async for t in chat.stream(messages=MESSAGES)]

        for got in await asyncio.gather(*(collect() for _ in range(12))):
            assert got == tokens(8)
    assert lb.stats().calls_failed == 0


# -- failures: classified like any aiohttp call -------------------------------------------


async def test_a_500_is_retried_on_another_replica(fleet_factory: Any) -> None:
    fleet = await fleet_of(
        fleet_factory, ReplicaConfig(error_rate=1.0, **FAST), ReplicaConfig(tokens=2, **FAST)
    )
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=2))
    async with ChatClient(lb) as chat:
        assert await chat.text(messages=MESSAGES) == "replica-1: tok0 tok1 "
        assert [t async for t in chat.stream(messages=MESSAGES)] == tokens(2)
    assert fleet[0].counters.errors == 2
    st = lb.stats()
    assert (st.retries, st.calls_failed) == (2, 0)


async def test_an_http_error_is_a_client_response_error_with_the_server_message(
    fleet_factory: Any,
) -> None:
    fleet = await fleet_of(fleet_factory, ReplicaConfig(error_rate=1.0, **FAST))
    lb = lbclient.Balancer(fleet.urls)  # no retry: the error reaches us as it is
    async with ChatClient(lb) as chat:
        with pytest.raises(aiohttp.ClientResponseError) as info:
            await chat.create(messages=MESSAGES)
        assert info.value.status == 500
        assert "injected failure on replica-0" in info.value.message
        assert info.value.headers is not None and info.value.headers["x-replica"] == "replica-0"
        with pytest.raises(aiohttp.ClientResponseError) as info:
            _ = [t async for t in chat.stream(messages=MESSAGES)]
        assert info.value.status == 500


async def test_a_429_cools_the_replica_and_the_retry_goes_elsewhere_at_once(
    fleet_factory: Any,
) -> None:
    # retry_after=0.5 is sent as "Retry-After: 1" (whole seconds, rounded up).
    fleet = await fleet_of(
        fleet_factory,
        ReplicaConfig(rate_limit_rate=1.0, retry_after=0.5, **FAST),
        ReplicaConfig(tokens=1, **FAST),
    )
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=2))
    async with ChatClient(lb) as chat:
        t0 = time.monotonic()
        assert await chat.text(messages=MESSAGES) == "replica-1: tok0 "
        assert time.monotonic() - t0 < 0.9  # no sleep for the Retry-After (1 s)
        stats = lb.stats()
        assert (stats.retries, stats.cooldowns) == (1, 1)
        limited = stats.endpoint(fleet.urls[0])
        assert limited.pickable is False
        assert 0.0 < limited.cooling_s <= 1.0  # so the header reached the balancer
        # While it cools, even a first attempt skips it (in order it would go there).
        assert await chat.text(messages=MESSAGES) == "replica-1: tok0 "
    assert fleet[0].counters.rejected_429 == 1
    assert fleet[0].counters.received == 1


async def test_a_retry_after_beyond_the_policy_limit_is_capped(
    fleet_factory: Any,
) -> None:
    fleet = await fleet_of(
        fleet_factory,
        ReplicaConfig(rate_limit_rate=1.0, retry_after=5.0, **FAST),
        ReplicaConfig(tokens=1, **FAST),
    )
    retry = lbclient.Retry(attempts=2, max_retry_after=1.0)
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=retry)
    async with ChatClient(lb) as chat:
        assert await chat.text(messages=MESSAGES) == "replica-1: tok0 "
        # Cooling for max_retry_after (1 s), not the 5 s the replica asked for.
        assert 0.0 < lb.stats().endpoint(fleet.urls[0]).cooling_s <= 1.0

    # Alone, the limited replica makes the retry wait out the capped cooldown, no more.
    solo = lbclient.Balancer([fleet.urls[0]], retry=retry)
    async with ChatClient(solo) as chat:
        t0 = time.monotonic()
        with pytest.raises(lbclient.AttemptsExhausted) as info:
            await chat.create(messages=MESSAGES)
        assert 0.9 <= time.monotonic() - t0 < 3.0
    err = info.value.last_error
    assert isinstance(err, aiohttp.ClientResponseError) and err.status == 429
    assert len(info.value.attempts) == 2
    assert fleet[0].counters.rejected_429 == 3
    assert fleet[1].counters.received == 1


async def test_a_stream_broken_after_the_first_token_is_not_retried(fleet_factory: Any) -> None:
    fleet = await fleet_of(
        fleet_factory,
        ReplicaConfig(tokens=6, error_after_tokens=2, **FAST),
        ReplicaConfig(tokens=6, **FAST),
    )
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=3))
    got: list[str] = []
    async with ChatClient(lb) as chat:
        with pytest.raises(aiohttp.ClientPayloadError):
            async for t in chat.stream(messages=MESSAGES):
                got.append(t)
    assert got == tokens(2)
    assert fleet[1].counters.received == 0
    assert lb.stats().retries == 0


async def _noop(endpoint: lbclient.Endpoint) -> None:
    return None


async def test_a_slow_first_token_is_hedged(fleet_factory: Any) -> None:
    fleet = await fleet_of(
        fleet_factory,
        ReplicaConfig(ttft=0.5, tokens=5, token_delay=0.002),  # the primary: slow TTFT
        ReplicaConfig(ttft=0.01, tokens=5, token_delay=0.002),
    )
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), hedge=lbclient.Hedge(delay=0.05))
    for _ in range(60):  # the hedge budget starts empty and grows with calls
        await lb.call(_noop)
    async with ChatClient(lb) as chat:
        t0 = time.monotonic()
        assert [t async for t in chat.stream(messages=MESSAGES)] == tokens(5)
        assert time.monotonic() - t0 < 0.4  # well before the primary's first token
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_won, st.calls_failed) == (1, 1, 0)


async def test_the_timeout_bounds_each_attempt_and_a_timeout_is_retried(
    fleet_factory: Any,
) -> None:
    fleet = await fleet_of(
        fleet_factory,
        ReplicaConfig(ttft=2.0, base_latency=2.0, sigma=0.0, tokens=3),  # silent for 2 s
        ReplicaConfig(tokens=3, **FAST),
    )
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), retry=lbclient.Retry(attempts=2))
    async with ChatClient(lb, timeout=0.2) as chat:
        t0 = time.monotonic()
        assert [t async for t in chat.stream(messages=MESSAGES)] == tokens(3)
        assert await chat.text(messages=MESSAGES) == "replica-1: tok0 tok1 tok2 "
        assert time.monotonic() - t0 < 1.5
    st = lb.stats()
    assert (st.retries, st.calls_failed) == (2, 0)
    assert st.endpoint(fleet.urls[0]).failures == 2


# -- what is sent and what is read --------------------------------------------------------


async def test_api_key_headers_and_body_are_sent() -> None:
    seen: list[tuple[dict[str, str], dict[str, Any]]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((dict(request.headers), await request.json()))
        return web.json_response(completion("ok"))

    async with tiny_server(handler) as url:
        lb = lbclient.Balancer([url])
        extra = {"X-Tenant": "blue"}
        async with ChatClient(lb, api_key="sk-test", headers=extra) as chat:
            assert await chat.text(messages=MESSAGES, model="m", temperature=0.5) == "ok"
            assert await chat.text(messages=MESSAGES) == "ok"
    (headers, body), (_, bare) = seen
    assert headers["Authorization"] == "Bearer sk-test"
    assert headers["X-Tenant"] == "blue"
    assert headers["Content-Type"] == "application/json"
    assert body == {"model": "m", "messages": MESSAGES, "temperature": 0.5}
    assert bare == {"messages": MESSAGES}  # model=None is left out


async def test_no_authorization_header_without_api_key() -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        return web.json_response(completion("ok"))

    async with tiny_server(handler) as url, ChatClient(lbclient.Balancer([url])) as chat:
        await chat.create(messages=MESSAGES)
    assert seen == [None]


async def test_sse_split_across_tcp_chunks_with_comments_and_crlf() -> None:
    first = sse(delta("héllo ")).replace(b"\n", b"\r\n")
    cut = first.index("é".encode()) + 1  # inside the two-byte UTF-8 character

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        parts = [
            b": keep-alive\n\n",
            sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}),
            first[:cut],
            first[cut:-1],  # the last "\n" of the final CRLF comes in the next segment
            first[-1:] + b'data: {"choices": [{"index": 0, ',
            b'"delta": {"content": "wor',
            b'ld"}}]}\r',
            b"\r",
            sse(delta("")) + sse(delta(None)) + sse({"choices": [], "usage": {}}),
            b"event: message\nid: 7\ndata: " + json.dumps(delta("!")).encode() + b"\n\n",
            b"data: [DONE]\n\n",
            sse(delta("after done")),
        ]
        for part in parts:
            await resp.write(part)
            await asyncio.sleep(0.005)  # separate TCP segments, not one coalesced write
        await resp.write_eof()
        return resp

    async with tiny_server(handler) as url:
        lb = lbclient.Balancer([url])
        async with ChatClient(lb) as chat:
            got = [t async for t in chat.stream(messages=MESSAGES)]
    assert got == ["héllo ", "world", "!"]
    assert lb.stats().calls_failed == 0


async def test_an_error_event_inside_a_stream_is_a_status_error() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse({"error": {"message": "engine died", "code": 503}}))
        await resp.write_eof()
        return resp

    async with tiny_server(handler) as url, ChatClient(lbclient.Balancer([url])) as chat:
        with pytest.raises(aiohttp.ClientResponseError) as info:
            _ = [t async for t in chat.stream(messages=MESSAGES)]
    assert info.value.status == 503
    assert "engine died" in info.value.message


async def test_the_load_header_is_reported(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, ReplicaConfig(**FAST), ReplicaConfig(**FAST))
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder())
    async with ChatClient(lb) as chat:
        await chat.create(messages=MESSAGES)
    assert lb.stats().endpoint(fleet.urls[0]).server_load == 0.0  # an idle replica says 0

    lb2 = lbclient.Balancer(fleet.urls, strategy=InOrder())
    async with ChatClient(lb2, load_header=None) as chat:
        await chat.create(messages=MESSAGES)
        _ = [t async for t in chat.stream(messages=MESSAGES)]
    assert lb2.stats().endpoint(fleet.urls[0]).server_load is None


async def test_key_gives_affinity_under_consistent_hash(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, *[ReplicaConfig(**FAST)] * 3)
    lb = lbclient.Balancer(fleet.urls, strategy="consistent_hash")
    async with ChatClient(lb) as chat:
        names = {
            (await chat.create(messages=MESSAGES, key="conversation-42"))["system_fingerprint"]
            for _ in range(6)
        }
        for _ in range(3):
            _ = [t async for t in chat.stream(messages=MESSAGES, key="conversation-42")]
    assert len(names) == 1
    served = [r.counters.served for r in fleet]
    assert sorted(served) == [0, 0, 9]


async def test_bad_arguments_fail_before_any_endpoint_is_picked(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, ReplicaConfig(**FAST))
    lb = lbclient.Balancer(fleet.urls)
    async with ChatClient(lb) as chat:
        with pytest.raises(TypeError, match="stream"):
            await chat.create(messages=MESSAGES, stream=True)
        with pytest.raises(TypeError, match="messages"):
            await chat.create(messages="hi")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="JSON serializable"):
            await chat.create(messages=MESSAGES, temperature=object())
        with pytest.raises(TypeError, match="stream"):
            chat.stream(messages=MESSAGES, stream=False)
    assert lb.stats().calls == 0
    assert fleet.totals().received == 0


# -- lifecycle and configuration ----------------------------------------------------------


async def test_aclose_closes_the_owned_session_only(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_of(fleet_factory, ReplicaConfig(**FAST))
    lb = lbclient.Balancer(fleet.urls)
    chat = ChatClient(lb)
    assert chat._session is None  # created lazily, inside the running loop
    await chat.create(messages=MESSAGES)
    owned = chat._session
    assert owned is not None and not owned.closed
    await chat.aclose()
    await chat.aclose()  # idempotent
    assert owned.closed and chat.closed
    with pytest.raises(lbclient.BalancerClosed, match="ChatClient is closed"):
        await chat.create(messages=MESSAGES)
    with pytest.raises(lbclient.BalancerClosed):
        chat.stream(messages=MESSAGES)
    assert not lb.closed  # the balancer is the caller's

    async with ChatClient(lb, session=session) as borrowed:
        await borrowed.create(messages=MESSAGES)
    assert not session.closed  # a session handed in is never closed here
    assert "closed" in repr(borrowed) and "sk-" not in repr(borrowed)


async def test_stream_closed_early_frees_the_slot(fleet_factory: Any) -> None:
    fleet = await fleet_of(fleet_factory, ReplicaConfig(tokens=50, **FAST))
    lb = lbclient.Balancer(fleet.urls)
    async with ChatClient(lb) as chat:
        async with contextlib.aclosing(chat.stream(messages=MESSAGES)) as stream:
            async for token in stream:
                assert token == "tok0 "
                break
        assert lb.stats().in_flight == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"timeout": "60"}, "timeout"),
        ({"path": "v1/chat/completions"}, "path"),
        ({"path": "/v1/chat completions"}, "path"),
        ({"api_key": ""}, "api_key"),
        ({"api_key": 123}, "api_key"),
        ({"api_key": "sk-1\nX-Evil: 1"}, "api_key"),
        ({"headers": {"X-A": 1}}, "headers"),
        ({"headers": ["X-A"]}, "headers"),
        ({"api_key": "sk-1", "headers": {"authorization": "Bearer x"}}, "api_key"),
        ({"load_header": ""}, "load_header"),
        ({"session": object()}, "session"),
    ],
)
def test_bad_configuration_is_a_config_error(kwargs: dict[str, Any], match: str) -> None:
    lb = lbclient.Balancer(["http://127.0.0.1:9"])
    with pytest.raises(lbclient.ConfigError, match=match) as info:
        ChatClient(lb, **kwargs)
    assert "sk-1" not in str(info.value)  # a key never ends up in a message


def test_a_balancer_is_required() -> None:
    with pytest.raises(lbclient.ConfigError, match="Balancer"):
        ChatClient(["http://127.0.0.1:9"])  # type: ignore[arg-type]


def test_importing_lbclient_does_not_import_the_http_client() -> None:
    import subprocess
    import sys

    code = "import sys, lbclient; print('lbclient.http' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_sse_decoder_survives_any_split() -> None:
    from lbclient.http import _SSEDecoder

    stream = (
        b": ping\r\n\r\n"
        b'data: {"a": "\xc3\xa9"}\r\n\r\n'
        b"event: x\rdata:one\rdata\rdata: two\r\r"
        b"data: [DONE]\n\n"
        b"data: tail"  # no line end at all: still read at the end of the stream
    )
    want = ['{"a": "é"}', "one\n\ntwo", "[DONE]", "tail"]
    for size in (1, 2, 3, 7, len(stream)):
        decoder = _SSEDecoder()
        got: list[str] = []
        for i in range(0, len(stream), size):
            got += decoder.feed(stream[i : i + size])
        got += decoder.close()
        assert got == want, size
