"""Draining over real loopback HTTP (ReplicaFleet): ``lb.drain(url)`` stops new picks at
once, and awaiting it waits until the calls already running there have finished.

Counts are strict (no failed call, no pick of a draining endpoint); timings generous.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient import Balancer, DrainResult, Endpoint, Retry
from lbclient.testing import ReplicaConfig, ReplicaFleet

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def completion(lb: Balancer, http: aiohttp.ClientSession) -> Callable[[], Coroutine[Any, Any, str]]:
    @lb.route
    async def complete(endpoint: Endpoint) -> str:
        async with http.post(endpoint.url + CHAT, json=BODY) as resp:
            resp.raise_for_status()
            await resp.read()
            return endpoint.url

    return complete


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def test_drain_waits_for_in_flight_calls_and_stops_new_picks(
    http: aiohttp.ClientSession,
) -> None:
    slow = ReplicaConfig(base_latency=1.0, sigma=0.0, capacity=4, name="slow")
    fast = ReplicaConfig(base_latency=0.01, sigma=0.0, capacity=8, name="fast")
    async with ReplicaFleet([slow, fast]) as fleet:
        slow_url, fast_url = fleet.urls
        lb = Balancer(fleet.urls, strategy="round_robin", rng=0)
        complete = completion(lb, http)
        finished: list[float] = []

        async def timed() -> str:
            served_by = await complete()
            finished.append(time.monotonic())  # same step as the balancer's release
            return served_by

        # Round robin: 2 of these 4 calls land on the slow replica and stay there ~1 s.
        first = [asyncio.create_task(timed()) for _ in range(4)]
        await wait_until(lambda: fleet[0].counters.in_flight == 2)
        assert lb.stats().endpoint(slow_url).in_flight == 2

        drain = lb.drain(slow_url)  # takes effect now, before any await
        st = lb.stats().endpoint(slow_url)
        assert (st.state, st.pickable, st.in_flight) == ("draining", False, 2)
        drained_at: list[float] = []

        async def wait_drained() -> DrainResult:
            result: DrainResult = await drain
            drained_at.append(time.monotonic())
            return result

        waiter = asyncio.create_task(wait_drained())
        for _ in range(5):
            await asyncio.sleep(0)
        if fleet[0].counters.in_flight:  # (always, unless the machine stalled for ~1 s)
            assert not waiter.done()

        # New calls meanwhile: none goes to the draining endpoint.
        more = await asyncio.gather(*(complete() for _ in range(20)))
        assert more == [fast_url] * 20
        assert fleet[0].counters.received == 2

        result = await waiter
        assert isinstance(result, DrainResult)
        assert result.url == slow_url
        assert result.idle is True
        assert result.in_flight == 0
        # It returned only once the slow calls had finished, and they all succeeded.
        assert all(t.done() for t in first)
        results = [t.result() for t in first]
        assert sorted(results) == sorted([slow_url, slow_url, fast_url, fast_url])
        assert len(finished) == 4
        assert drained_at[0] >= max(finished)
        assert fleet[0].counters.served == 2
        assert fleet[0].counters.in_flight == 0
        assert result.waited > 0
        assert "idle=True" in repr(result)

        # Drained and idle: still a member (until removed), still never picked.
        assert lb.stats().endpoint(slow_url).state == "draining"
        assert set(await asyncio.gather(*(complete() for _ in range(10)))) == {fast_url}
        assert fleet[0].counters.received == 2
        stats = lb.stats()
        assert stats.calls_failed == 0
        assert stats.calls == 34
        assert stats.retries == 0

        # Awaiting again on an idle endpoint returns at once.
        again = await lb.drain(slow_url)
        assert (again.idle, again.in_flight) == (True, 0)
        assert again.waited < 0.05
        lb.remove(slow_url)
        assert [e.url for e in lb.endpoints] == [fast_url]


async def test_drain_with_timeout_on_a_hanging_call(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    hanging = ReplicaConfig(hang=True, name="hanging")
    async with ReplicaFleet([hanging, ReplicaConfig(base_latency=0.005)]) as fleet:
        hang_url, ok_url = fleet.urls
        lb = Balancer([hang_url], strategy="round_robin")
        complete = completion(lb, http)
        call = asyncio.create_task(complete())
        await wait_until(lambda: fleet[0].counters.in_flight == 1)
        lb.add(ok_url)

        with caplog.at_level(logging.WARNING, logger="lbclient"):
            t0 = time.monotonic()
            result = await lb.drain(hang_url, timeout=0.1)
            elapsed = time.monotonic() - t0
        assert result.url == hang_url
        assert result.idle is False
        assert result.in_flight == 1
        assert 0.09 <= result.waited < 1.0
        assert 0.09 <= elapsed < 1.0
        assert "idle=False" in repr(result)
        warnings = [
            r for r in caplog.records if r.name == "lbclient" and r.levelno == logging.WARNING
        ]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
        message = warnings[0].getMessage()
        assert hang_url in message
        assert "timed out" in message
        assert "1 call(s) still in flight" in message

        # The hanging call is untouched by the drain; new calls go elsewhere.
        assert not call.done()
        assert await complete() == ok_url
        assert lb.stats().endpoint(hang_url).in_flight == 1

        # Cancelling the stuck call frees the slot; a second drain now finds it idle.
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        result = await lb.drain(hang_url, timeout=0.1)
        assert (result.idle, result.in_flight) == (True, 0)
        stats = lb.stats()
        assert stats.endpoint(hang_url).in_flight == 0
        assert stats.calls_failed == 0


async def test_drain_timeout_zero_reports_without_waiting(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet([ReplicaConfig(base_latency=0.3, sigma=0.0)]) as fleet:
        lb = Balancer(fleet.urls)
        complete = completion(lb, http)
        call = asyncio.create_task(complete())
        await wait_until(lambda: fleet[0].counters.in_flight == 1)
        result = await lb.drain(fleet.urls[0], timeout=0)
        assert (result.idle, result.in_flight) == (False, 1)
        assert result.waited < 0.1
        assert await call == fleet.urls[0]  # the call itself still completes
        assert lb.stats().calls_failed == 0


async def test_spot_interruption_storm(http: aiohttp.ClientSession) -> None:
    """10 replicas under ~100 calls/s; 8 get spot-interruption notices within 0.5 s and
    are drained, removed, then killed.  No call fails; the 2 survivors carry the rest."""
    configs = [ReplicaConfig(base_latency=0.05, sigma=0.25, capacity=8) for _ in range(10)]
    async with ReplicaFleet(configs, seed=4) as fleet:
        urls = fleet.urls
        lb = Balancer(
            [Endpoint(u, region="us-east-1") for u in urls],
            retry=Retry(attempts=3),
            rng=4,
        )
        complete = completion(lb, http)
        victims = list(range(8))
        served: Counter[str] = Counter()
        errors: list[BaseException] = []
        calls: set[asyncio.Task[None]] = set()

        async def one() -> None:
            try:
                served[await complete()] += 1
            except Exception as exc:  # every failure is a test failure: collect them
                errors.append(exc)

        async def generate(seconds: float, rate: float = 100.0) -> int:
            """Open-loop load: one new call every 1/rate s, whatever the latency."""
            start = time.monotonic()
            n = 0
            while (now := time.monotonic()) - start < seconds:
                due = int((now - start) * rate) + 1
                while n < due:
                    task = asyncio.create_task(one())
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                    n += 1
                await asyncio.sleep(1.0 / rate)
            return n

        picked_before_drain: dict[int, int] = {}
        results: dict[int, DrainResult] = {}

        async def interrupt(i: int, delay: float) -> None:
            await asyncio.sleep(delay)
            drain = lb.drain(urls[i], timeout=5.0)  # picks stop here
            picked_before_drain[i] = lb.stats().endpoint(urls[i]).requests
            results[i] = await drain
            # Idle, and not one more pick while draining.
            assert lb.stats().endpoint(urls[i]).requests == picked_before_drain[i]
            assert fleet[i].counters.in_flight == 0
            lb.remove(urls[i])  # the notice period is over: remove ...
            await fleet[i].down()  # ... and the instance dies

        async def storm() -> None:
            await asyncio.sleep(1.0)  # 1 s of normal traffic first
            await asyncio.gather(*(interrupt(i, 0.06 * k) for k, i in enumerate(victims)))

        load = asyncio.create_task(generate(3.0))
        await storm()
        sent = await load
        await asyncio.gather(*list(calls))

        assert not errors, errors[:3]
        assert sent >= 150  # the generator really ran (loosely: the machine may be busy)
        assert sum(served.values()) == sent
        stats = lb.stats()
        assert stats.calls == sent
        assert stats.calls_failed == 0
        assert stats.retries == 0  # a drain never makes an attempt fail
        assert [e.url for e in stats.endpoints] == urls[8:]

        for i in victims:
            r = results[i]
            assert (r.url, r.idle, r.in_flight) == (urls[i], True, 0), r
            # Every call a victim received was picked before its drain began ...
            assert fleet[i].counters.received == picked_before_drain[i], i
            # ... and answered: nothing was dropped by the kill that followed.
            c = fleet[i].counters
            assert c.served == c.received and c.dropped == c.cancelled == 0, (i, c)

        # The survivors carried the rest: every call after the storm went to them.
        survivors = sum(served[u] for u in urls[8:])
        victims_served = sum(served[urls[i]] for i in victims)
        assert survivors + victims_served == sent
        assert survivors > victims_served
        assert fleet[8].counters.served > 0 and fleet[9].counters.served > 0
        assert fleet[8].counters.served + fleet[9].counters.served == survivors


def test_drain_result_repr() -> None:
    r = lbclient.DrainResult("http://10.0.0.1:8000", True, 0, 0.25)
    assert repr(r) == (
        "lbclient.DrainResult(url='http://10.0.0.1:8000', idle=True, in_flight=0, waited=0.250)"
    )
