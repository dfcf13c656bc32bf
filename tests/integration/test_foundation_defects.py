"""Regression tests for the defects found in the Foundation v2 review (issue 8, part 2).

Each test states the defect it pins; they use the public API only, so each one can be
run against the code before the rewrite, where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient.testing import ReplicaConfig, ReplicaFleet

URLS = [f"http://10.0.0.{i}:8000" for i in range(5)]


class Down(ConnectionError):
    """What a dead replica looks like to the wrapped call."""


# -- 1. deadline-cut attempts are charged on every path -----------------------------------


def _hung(ep: lbclient.Endpoint) -> bool:
    return ep.url in (URLS[0], URLS[1])


async def _drive(call: Any, n: int) -> int:
    exceeded = 0
    for _ in range(n):
        try:
            await call()
        except lbclient.DeadlineExceeded:
            exceeded += 1
    return exceeded


@pytest.mark.parametrize("path", ["plain", "hedged", "stream", "pick"])
async def test_deadline_cut_attempts_count_against_hung_endpoints(path: str) -> None:
    """2 of 5 replicas hang: whatever the path, the attempts the deadline cuts are the
    endpoint's fault, so their breakers open and the calls stop going there."""
    lb = lbclient.Balancer(
        URLS,
        strategy="round_robin",
        retry=lbclient.Retry(attempts=1, timeout=0.05),
        breaker=lbclient.Breaker(failures=2, cooldown=60.0, max_ejection=0.5),
        hedge=lbclient.Hedge(delay=10.0) if path == "hedged" else None,
        rng=1,
    )

    async def work(ep: lbclient.Endpoint) -> str:
        if _hung(ep):
            await asyncio.sleep(10)
        return ep.url

    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
        if _hung(ep):
            await asyncio.sleep(10)
        yield ep.url

    if path in ("plain", "hedged"):
        call: Any = lb.route(work)
    elif path == "stream":
        stream = lb.route(gen)

        async def call() -> str:
            chunks = [c async for c in stream()]
            return chunks[0]
    else:

        async def call() -> str:
            async with lb.pick() as ep:
                return await work(ep)

    exceeded = await _drive(call, 30)
    stats = lb.stats()
    for url in URLS[:2]:
        e = stats.endpoint(url)
        assert e.failures >= 2 and e.cut >= 2, e
        assert e.breaker == "open", e
    for url in URLS[2:]:
        assert stats.endpoint(url).failures == 0
    assert exceeded <= 4  # two cuts per hung replica, then they are out
    assert stats.in_flight == 0
    await lb.aclose()


# -- 2. a stream's BaseException reaches its consumer ---------------------------------------


class Shutdown(BaseException):
    """A user's own shutdown signal (not an Exception)."""


@pytest.mark.parametrize("after_first", [False, True])
async def test_a_base_exception_from_a_stream_reaches_the_consumer(after_first: bool) -> None:
    lb = lbclient.Balancer(URLS[:2], retry=lbclient.Retry())

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[int]:
        if after_first:
            yield 1
        raise Shutdown("stop")

    got: list[int] = []
    with pytest.raises(Shutdown):
        async with asyncio.timeout(2):  # today's defect: the consumer hangs forever
            async for chunk in gen():
                got.append(chunk)
    assert got == ([1] if after_first else [])
    assert lb.stats().in_flight == 0
    assert sum(e.failures for e in lb.stats().endpoints) == 0  # not the endpoint's fault


# -- 3. a balancer works across sequential event loops ---------------------------------------


def test_hedging_keeps_working_in_a_second_event_loop() -> None:
    lb = lbclient.Balancer(URLS[:3], hedge=lbclient.Hedge(delay=0.02), rng=1)
    slow = {"on": False}

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        if slow["on"] and ep.url == lb.stats().endpoints[0].url:
            await asyncio.sleep(0.3)
        return ep.url

    async def first() -> None:
        await work()  # returns at once: the loop ends with the shared hedge timer armed

    async def second() -> int:
        slow["on"] = True
        before = lb.stats().hedges_sent
        for _ in range(12):
            await work()
        return lb.stats().hedges_sent - before

    asyncio.run(first())
    assert asyncio.run(second()) > 0


def test_discovery_restarts_in_a_second_event_loop() -> None:
    calls: list[float] = []

    def resolve() -> list[str]:
        calls.append(time.monotonic())
        return URLS[:2]

    lb = lbclient.Balancer([], discovery=lbclient.CallableDiscovery(resolve, interval=0.05), rng=1)

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        return ep.url

    async def run() -> int:
        await lb.start()
        before = len(calls)
        await work()
        await asyncio.sleep(0.3)
        return len(calls) - before

    assert asyncio.run(run()) >= 2
    assert asyncio.run(run()) >= 2  # refreshes again in the new loop


def test_drain_can_be_awaited_in_a_second_event_loop() -> None:
    lb = lbclient.Balancer(URLS[:2])

    async def once() -> lbclient.DrainResult:
        result = await lb.drain(URLS[0], timeout=1)
        lb.undrain(URLS[0])
        return result

    assert asyncio.run(once()).idle
    assert asyncio.run(once()).idle  # today: "bound to a different event loop"


async def test_two_running_loops_at_once_are_refused_clearly() -> None:
    lb = lbclient.Balancer(URLS[:2], hedge=lbclient.Hedge(delay=10.0))

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        return ep.url

    other = asyncio.new_event_loop()
    thread = threading.Thread(target=other.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(work(), other).result(timeout=5)
        with pytest.raises(RuntimeError, match="another running event loop"):
            await work()
    finally:
        other.call_soon_threadsafe(other.stop)
        thread.join(5)
        other.close()


# -- 4. Retry-After is a per-endpoint cooldown, not a sleep --------------------------------


async def test_retry_after_cools_the_endpoint_and_the_retry_goes_elsewhere_at_once(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    fleet: ReplicaFleet = await fleet_factory(
        [ReplicaConfig(rate_limit_rate=1.0, retry_after=10.0), ReplicaConfig(), ReplicaConfig()]
    )
    limited = fleet.urls[0]
    lb = lbclient.Balancer(fleet.urls, strategy="round_robin", retry=lbclient.Retry(), rng=3)

    @lb.route
    async def complete(ep: lbclient.Endpoint) -> bytes:
        async with session.post(ep.url + "/v1/chat/completions", json={}) as r:
            r.raise_for_status()
            return await r.read()

    started = time.monotonic()
    slowest = 0.0
    for _ in range(30):
        t = time.monotonic()
        await complete()
        slowest = max(slowest, time.monotonic() - t)
    assert slowest < 1.0  # nobody slept the 10 s
    assert fleet[0].counters.rejected_429 == 1  # cooled after its first 429
    e = lb.stats().endpoint(limited)
    assert 8.0 < e.cooling_s <= 10.0
    assert time.monotonic() - started < 5.0
    await lb.aclose()


async def test_when_every_endpoint_cools_the_call_waits_for_the_first_back() -> None:
    class TooMany(Exception):
        status = 429

        def __init__(self, seconds: float) -> None:
            super().__init__(f"429, retry after {seconds}")
            self.headers = {"Retry-After": str(seconds)}

    lb = lbclient.Balancer(URLS[:2], retry=lbclient.Retry(attempts=5))
    first = {URLS[0]: True, URLS[1]: True}

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        if first[ep.url]:
            first[ep.url] = False
            raise TooMany(0.2)
        return ep.url

    t = time.monotonic()
    assert await work() in URLS[:2]
    assert 0.15 < time.monotonic() - t < 1.0
    assert lb.stats().cooldowns == 2


# -- 5. a hedge loser that swallowed the request is evidence -------------------------------


async def test_a_replica_that_swallows_requests_is_left_even_while_hedges_win() -> None:
    lb = lbclient.Balancer(
        URLS[:4],
        strategy="round_robin",
        hedge=lbclient.Hedge(delay=0.01, max_extra=0.5),
        breaker=lbclient.Breaker(failures=3, cooldown=60.0),
        rng=2,
    )
    black_hole = URLS[0]

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        await asyncio.sleep(10 if ep.url == black_hole else 0.002)
        return ep.url

    for _ in range(40):
        assert await work() != black_hole
    e = lb.stats().endpoint(black_hole)
    assert e.lost >= 3
    assert e.breaker == "open"
    assert e.requests <= 6  # not a quarter of the 40 calls plus hedges
    assert lb.stats().in_flight == 0


# -- 7. locality spills to the next region when the local one is saturated -----------------


async def test_locality_spills_over_when_the_local_region_is_saturated(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    fleet: ReplicaFleet = await fleet_factory(
        [
            ReplicaConfig(region="us-east-1", capacity=1, base_latency=0.02, sigma=0.0),
            ReplicaConfig(region="us-west-2", capacity=4, base_latency=0.02, sigma=0.0),
            ReplicaConfig(region="us-west-2", capacity=4, base_latency=0.02, sigma=0.0),
        ]
    )
    endpoints = [lbclient.Endpoint(r.url, region=r.config.region) for r in fleet]
    lb = lbclient.Balancer(endpoints, region="us-east-1", locality=True, rng=1)

    @lb.route
    async def complete(ep: lbclient.Endpoint) -> bytes:
        async with session.post(ep.url + "/v1/chat/completions", json={}) as r:
            r.raise_for_status()
            return await r.read()

    await asyncio.gather(*(complete() for _ in range(60)))
    local = fleet[0].counters.served
    remote = fleet[1].counters.served + fleet[2].counters.served
    # Behaviour, not wall-clock: with 60 calls at once and one slot locally, most of them
    # must spill to the other region rather than queue on the saturated local replica.
    assert local + remote == 60
    assert local < 50, f"{local} of 60 calls stayed on the one saturated local replica"
    assert remote >= 20, f"only {remote} of 60 calls spilled to the next region"
    await lb.aclose()


# -- 8. bugs in the caller's own code do not count against endpoints ------------------------


async def test_user_errors_pass_through_without_tripping_breakers() -> None:
    lb = lbclient.Balancer(URLS[:2], retry=lbclient.Retry(), breaker=lbclient.Breaker(failures=2))

    @lb.route
    async def work(ep: lbclient.Endpoint, payload: dict[str, Any]) -> Any:
        return payload["missing"]

    for _ in range(10):
        with pytest.raises(KeyError):
            await work({})
    stats = lb.stats()
    assert all(e.breaker == "closed" and e.failures == 0 for e in stats.endpoints)
    assert sum(e.ignored for e in stats.endpoints) == 10
    assert stats.retries == 0


# -- 9. streams apply backpressure ------------------------------------------------------------


async def test_a_slow_consumer_slows_the_stream_instead_of_buffering_it() -> None:
    lb = lbclient.Balancer(URLS[:1])
    produced = 0

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(2000):
            produced += 1
            yield b"x" * 1000
            await asyncio.sleep(0)

    consumed = 0
    ahead = 0
    async with contextlib.aclosing(gen()) as stream:
        async for _ in stream:
            consumed += 1
            await asyncio.sleep(0.001)
            ahead = max(ahead, produced - consumed)
            if consumed == 100:
                break
    assert ahead <= 32, f"the pump ran {ahead} chunks ahead of the consumer"
    assert lb.stats().in_flight == 0


# -- 10. sync() removes an endpoint that was already draining, once idle --------------------


async def test_sync_removes_an_already_draining_endpoint_when_it_goes_idle() -> None:
    lb = lbclient.Balancer(URLS[:2], strategy="round_robin")
    release = asyncio.Event()

    async def hold(ep: lbclient.Endpoint) -> None:
        await release.wait()

    async with lb.pick() as ep:
        lb.drain(ep.url)  # the operator drains it; discovery then drops it
        lb.sync([u for u in URLS[:2] if u != ep.url])
        assert ep.url in [e.url for e in lb.endpoints]  # still busy: kept, draining
    assert ep.url not in [e.url for e in lb.endpoints]  # idle: removed
