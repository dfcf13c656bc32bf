"""Streaming through ``@lb.route`` on an async generator, against real SSE replicas on
loopback: exact token sequences, first-token hedging, no retry after the first chunk,
retry before it, idle timeouts, early exit and streaming stats."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient.pool.state import EndpointState
from lbclient.strategies import PickContext
from lbclient.testing import ReplicaConfig, ReplicaFleet

CHAT = "/v1/chat/completions"
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


class _InOrderPicker:
    def __init__(self, states: Sequence[EndpointState]) -> None:
        self._states = tuple(states)

    def pick(self, key: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        for s in self._states:
            if not exclude or s not in exclude:
                return s
        return None


class InOrder:
    """Deterministic strategy: the first endpoint (pool order) not excluded, so the
    primary always goes to replica 0 and a backup / retry to the next one."""

    name = "in_order"

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _InOrderPicker:
        return _InOrderPicker(states)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session


async def wait_until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def _noop(endpoint: lbclient.Endpoint) -> None:
    return None


async def warm_budget(lb: lbclient.Balancer, calls: int = 60) -> None:
    """The hedge budget starts empty and grows by ``max_extra`` per call."""
    for _ in range(calls):
        await lb.call(_noop)


def tokens(n: int) -> list[str]:
    return [f"tok{i} " for i in range(n)]


def make_gen(
    lb: lbclient.Balancer, http: aiohttp.ClientSession, **route: Any
) -> Callable[..., AsyncIterator[str]]:
    @lb.route(**route)
    async def gen(endpoint: lbclient.Endpoint, payload: dict[str, Any]) -> AsyncIterator[str]:
        async with http.post(endpoint.url + CHAT, json={**payload, "stream": True}) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: ") :]
                if data == b"[DONE]":
                    return
                delta = json.loads(data)["choices"][0]["delta"]
                content = delta.get("content")
                if content:
                    yield content

    return gen


def lb_idle(lb: lbclient.Balancer) -> bool:
    st = lb.stats()
    return st.in_flight == 0 and all(e.in_flight == 0 for e in st.endpoints)


def fleet_idle(fleet: ReplicaFleet) -> bool:
    t = fleet.totals()
    return t.in_flight == 0 and t.received == t.finished


async def test_exact_token_sequences_under_concurrency(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [ReplicaConfig(tokens=12, token_delay=0.002, base_latency=0.005) for _ in range(3)]
    )
    lb = lbclient.Balancer(fleet.urls)
    gen = make_gen(lb, http)

    async def collect() -> list[str]:
        return [chunk async for chunk in gen(BODY)]

    results = await asyncio.gather(*(collect() for _ in range(10)))
    for got in results:
        assert got == tokens(12)  # in order, no duplicate, nothing from another stream
    st = lb.stats()
    assert (st.calls, st.calls_failed, st.retries, st.hedges_sent) == (10, 0, 0, 0)
    assert fleet.total_served == 10
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))


async def test_the_faster_first_token_wins_under_hedging(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [
            ReplicaConfig(ttft=0.5, tokens=10, token_delay=0.002),  # the primary: slow TTFT
            ReplicaConfig(ttft=0.01, tokens=10, token_delay=0.002),
        ]
    )
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), hedge=lbclient.Hedge(delay=0.05))
    await warm_budget(lb)
    gen = make_gen(lb, http)
    t0 = time.monotonic()
    got = [chunk async for chunk in gen(BODY)]
    elapsed = time.monotonic() - t0
    assert got == tokens(10)  # the loser's tokens never mix in
    assert elapsed < 0.4  # well before the primary's first token at 0.5 s
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_won, st.calls_failed, st.retries) == (1, 1, 0, 0)
    assert st.endpoint(fleet.urls[1]).hedges_won == 1
    # The loser was cancelled: its replica saw the client go away.
    await wait_until(lambda: fleet[0].counters.cancelled == 1)
    assert fleet[1].counters.served == 1
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))
    assert st.endpoint(fleet.urls[0]).failures == 0


async def test_route_timeout_bounds_the_time_to_first_token(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(ttft=1.0, tokens=3)])
    lb = lbclient.Balancer(fleet.urls)
    gen = make_gen(lb, http, timeout=0.1)
    t0 = time.monotonic()
    with pytest.raises(lbclient.DeadlineExceeded):
        async for _ in gen(BODY):
            pass
    assert time.monotonic() - t0 < 0.8
    assert lb.stats().calls_failed == 1
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))
    # Whatever reached the replica was cancelled (on a loaded machine the request may
    # not have arrived within 0.1 s; then nothing did).
    c = fleet[0].counters
    assert (c.served, c.cancelled) == (0, c.received) and c.received <= 1


async def test_a_cold_balancer_hedges_a_slow_stream_from_its_reserve(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    # No 5% earned yet, but the budget's reserve covers a cold client's first straggler:
    # the backup's first token wins and the slow primary is cancelled.
    fleet = await fleet_factory(
        [ReplicaConfig(ttft=0.5, tokens=3), ReplicaConfig(ttft=0.01, tokens=3)]
    )
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), hedge=lbclient.Hedge(delay=0.03))
    gen = make_gen(lb, http)
    t = time.monotonic()
    assert [chunk async for chunk in gen(BODY)] == tokens(3)
    assert time.monotonic() - t < 0.4
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_won, st.hedges_denied) == (1, 1, 0)
    assert fleet[1].counters.received == 1


async def test_an_error_after_the_first_chunk_reaches_the_caller_without_retry(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [ReplicaConfig(tokens=8, token_delay=0.002, error_after_tokens=3) for _ in range(3)]
    )
    lb = lbclient.Balancer(
        fleet.urls, retry=lbclient.Retry(attempts=3, backoff=0.001, max_backoff=0.002)
    )
    gen = make_gen(lb, http)
    got: list[str] = []
    with pytest.raises(Exception) as info:
        async for chunk in gen(BODY):
            got.append(chunk)
    assert got == tokens(3)  # exactly the chunks sent before the break
    assert not isinstance(info.value, lbclient.LBError)  # the stream's own error, as is
    assert isinstance(info.value, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError)
    st = lb.stats()
    assert (st.retries, st.calls_failed, st.attempts) == (0, 1, 1)
    assert fleet.total_received == 1  # no other replica was asked
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))


async def test_an_error_before_the_first_chunk_is_retried_elsewhere(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [ReplicaConfig(down=True), ReplicaConfig(tokens=6, token_delay=0.002)]
    )
    lb = lbclient.Balancer(
        fleet.urls,
        strategy=InOrder(),  # the first attempt goes to the replica that is down
        retry=lbclient.Retry(attempts=3, backoff=0.001, max_backoff=0.002),
    )
    gen = make_gen(lb, http)
    assert [chunk async for chunk in gen(BODY)] == tokens(6)
    st = lb.stats()
    assert (st.retries, st.calls_failed, st.attempts) == (1, 0, 2)
    assert st.endpoint(fleet.urls[0]).failures == 1
    assert st.endpoint(fleet.urls[1]).retries == 1
    assert fleet[1].counters.served == 1
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))


async def test_an_error_before_the_first_chunk_without_retry_surfaces(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(error_rate=1.0, base_latency=0.002)])
    lb = lbclient.Balancer(fleet.urls)
    gen = make_gen(lb, http)
    with pytest.raises(aiohttp.ClientResponseError) as info:
        async for _ in gen(BODY):
            pass
    assert info.value.status == 500
    st = lb.stats()
    assert (st.calls_failed, st.in_flight) == (1, 0)


async def test_idle_timeout_raises_stream_idle_timeout(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(ttft=0.01, token_delay=0.5, tokens=5)])
    lb = lbclient.Balancer(fleet.urls)
    gen = make_gen(lb, http, idle_timeout=0.1)
    got: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(lbclient.StreamIdleTimeout):
        async for chunk in gen(BODY):
            got.append(chunk)
    elapsed = time.monotonic() - t0
    assert got == ["tok0 "]  # the first token came at once, the second never in time
    assert elapsed < 0.45
    st = lb.stats()
    assert st.calls_failed == 1
    assert st.retries == 0
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))
    assert fleet[0].counters.cancelled == 1


async def test_idle_timeout_does_not_fire_on_a_steady_stream(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(ttft=0.01, token_delay=0.03, tokens=8)])
    lb = lbclient.Balancer(fleet.urls)
    gen = make_gen(lb, http, idle_timeout=0.2)  # the whole stream (~0.25 s) is longer
    assert [chunk async for chunk in gen(BODY)] == tokens(8)
    assert lb.stats().calls_failed == 0


async def test_breaking_out_early_closes_the_stream(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(ttft=0.01, token_delay=0.02, tokens=100)])
    lb = lbclient.Balancer(fleet.urls)
    gen = make_gen(lb, http)
    got: list[str] = []
    async for chunk in gen(BODY):
        got.append(chunk)
        if len(got) == 3:
            break
    assert got == tokens(3)
    # The abandoned generator is finalised by the event loop: the attempt is cancelled,
    # the HTTP response closed and the slot released -- long before the 2 s stream ends.
    await wait_until(lambda: lb_idle(lb), within=1.0)
    await wait_until(lambda: fleet_idle(fleet), within=1.0)
    assert fleet[0].counters.cancelled == 1
    assert fleet[0].counters.served == 0
    assert lb.stats().calls_failed == 0


async def test_aclosing_the_stream_early_releases_its_slot(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(ttft=0.01, token_delay=0.02, tokens=100)])
    lb = lbclient.Balancer(fleet.urls)
    gen = make_gen(lb, http)
    async with contextlib.aclosing(gen(BODY)) as stream:
        async for chunk in stream:
            assert chunk == "tok0 "
            break
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet), within=1.0)
    assert fleet[0].counters.cancelled == 1


async def test_aclose_releases_the_slot_before_it_returns(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(ttft=0.01, token_delay=0.02, tokens=100)])
    lb = lbclient.Balancer(fleet.urls)
    gen = make_gen(lb, http)
    stream = gen(BODY)
    assert await anext(stream) == "tok0 "
    assert lb.stats().in_flight == 1
    await stream.aclose()
    assert lb.stats().in_flight == 0  # closed means closed, not "closed at the next GC"


async def test_ttft_and_chunk_rate_appear_in_stats(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(ttft=0.03, token_delay=0.005, tokens=10)])
    lb = lbclient.Balancer(fleet.urls)
    before = lb.stats().endpoint(fleet.urls[0])
    assert before.ttft_ms is None and before.chunks_per_s is None
    gen = make_gen(lb, http)
    for _ in range(2):
        assert [chunk async for chunk in gen(BODY)] == tokens(10)
    e = lb.stats().endpoint(fleet.urls[0])
    assert e.ttft_ms is not None
    assert 25 <= e.ttft_ms < 1000  # about the replica's 30 ms
    assert e.chunks_per_s is not None and e.chunks_per_s > 0
    assert e.chunks_per_s < 1000  # 10 chunks 5 ms apart: ~200/s, not a per-call artefact
    assert e.requests == 2 and e.failures == 0
