"""Cost-aware routing on loopback: the ceiling holds under concurrency (reserve, then
settle), spend is counted from real usage on every call path (plain, hedged, stream,
lb.call, lb.pick), cheaper endpoints are preferred while their latency stays close."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient.testing import ReplicaConfig

PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
USAGE = (1, 8)  # what every fake replica reports: 1 prompt token, 8 completion tokens


async def _post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> str:
    async with session.post(url + "/v1/chat/completions", json=payload) as r:
        r.raise_for_status()
        body = await r.json()
        lbclient.report_usage(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        return r.headers["x-replica"]


def _priced(urls: list[str], prices: list[float]) -> list[lbclient.Endpoint]:
    return [
        lbclient.Endpoint(u, metadata={"price_per_1k_tokens": p})
        for u, p in zip(urls, prices, strict=True)
    ]


async def test_the_ceiling_holds_under_concurrency(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(capacity=8, base_latency=0.02)] * 4)
    prices = [1.0, 1.0, 10.0, 10.0]  # per 1k tokens
    lb = lbclient.Balancer(
        _priced(fleet.urls, prices),
        retry=lbclient.Retry(attempts=3),
        cost=lbclient.CostPolicy(ceiling=1.0, period=3600),
    )

    @lb.route(tokens=lambda p: 20)  # an upper bound: the replicas use 9
    async def call(endpoint: lbclient.Endpoint, p: dict[str, Any]) -> str:
        return await _post(session, endpoint.url, p)

    served: collections.Counter[str] = collections.Counter()
    shed: list[lbclient.Overloaded] = []
    other: list[BaseException] = []

    async def one() -> None:
        try:
            served[await call(PAYLOAD)] += 1
        except lbclient.Overloaded as exc:
            shed.append(exc)
        except Exception as exc:
            other.append(exc)

    waves = 0
    while waves < 200:  # waves of 100 concurrent calls, until one is shed entirely
        waves += 1
        before = len(shed)
        await asyncio.gather(*(one() for _ in range(100)))
        if len(shed) - before == 100:
            break
    spend = lb.spend()
    assert not other  # every admitted call succeeded
    assert shed and all(e.reason == "budget" and e.retry_after for e in shed)
    assert sum(served.values()) + len(shed) == 100 * waves
    assert spend.spent <= 1.0 and spend.max_overshoot == 0.0
    assert spend.reserved == 0.0 and spend.in_flight == 0 and spend.shed == len(shed)
    # spend is the real usage at each replica's price, to the cent
    by_name = {
        f"replica-{i}": (u, p) for i, (u, p) in enumerate(zip(fleet.urls, prices, strict=True))
    }
    expected = {by_name[n][0]: k * sum(USAGE) * by_name[n][1] / 1000 for n, k in served.items()}
    assert spend.by_endpoint == pytest.approx(expected)
    assert spend.spent == pytest.approx(sum(expected.values()))
    # the budget is used up to what one more reservation (20 tokens at 10/1k) needs
    assert spend.spent > 1.0 - 20 * 10.0 / 1000
    stats = lb.stats()
    assert stats.failed_by.get("shed: budget") == len(shed)
    await lb.aclose()


async def test_overshoot_is_bounded_by_the_calls_in_flight(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(capacity=16, base_latency=0.02)] * 2)
    lb = lbclient.Balancer(_priced(fleet.urls, [10.0, 10.0]), cost=lbclient.CostPolicy(ceiling=0.5))

    @lb.route(tokens=lambda: 2)  # an estimate below the real use (9 tokens)
    async def call(endpoint: lbclient.Endpoint) -> str:
        return await _post(session, endpoint.url, PAYLOAD)

    wave = 40
    for _ in range(5):
        await asyncio.gather(*(call() for _ in range(wave)), return_exceptions=True)
    spend = lb.spend()
    excess = (sum(USAGE) - 2) * 10.0 / 1000  # what a call costs beyond its reservation
    assert spend.spent > 0.5  # the estimates were wrong: it passed the ceiling...
    assert spend.spent <= 0.5 + wave * excess + 1e-9  # ...by at most the calls in flight
    await lb.aclose()


async def test_every_call_path_is_metered(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [ReplicaConfig(base_latency=0.02, sigma=0), ReplicaConfig(base_latency=0.3, sigma=0)]
    )
    price = 1.0  # per 1k tokens, everywhere: spend = 9 tokens -> 0.009 per answered call
    lb = lbclient.Balancer(
        _priced(fleet.urls, [price, price]),
        strategy="round_robin",
        hedge=lbclient.Hedge(delay=0.05),
        cost=lbclient.CostPolicy(ceiling=100.0),
    )

    @lb.route
    async def plain(endpoint: lbclient.Endpoint) -> str:
        return await _post(session, endpoint.url, PAYLOAD)

    @lb.route
    async def stream(endpoint: lbclient.Endpoint) -> Any:
        body = {**PAYLOAD, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(endpoint.url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if line.startswith(b'data: {"id"') and b'"usage"' in line:
                    lbclient.report_usage(*USAGE)
                elif line.startswith(b"data:"):
                    yield line

    async def direct(endpoint: lbclient.Endpoint) -> str:
        return await _post(session, endpoint.url, PAYLOAD)

    answered = 0
    for _ in range(6):  # some hedged: a backup wins against the 0.3 s replica
        await plain()
        answered += 1
    async with contextlib.aclosing(stream()) as chunks:
        assert len([c async for c in chunks]) >= 8
    answered += 1
    await lb.call(direct)
    answered += 1
    async with lb.pick() as ep:
        await _post(session, ep.url, PAYLOAD)
    answered += 1
    spend = lb.spend()
    assert spend.calls == answered and spend.in_flight == 0 and spend.reserved == 0
    # every answered call paid for its answer once; hedge losers were cancelled unpaid
    assert spend.total == pytest.approx(answered * sum(USAGE) * price / 1000)
    assert lb.stats().hedges_sent >= 1
    await lb.aclose()


async def test_cheaper_endpoints_while_latency_stays_close(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    cheap = ReplicaConfig(base_latency=0.05, sigma=0)  # twice as slow...
    dear = ReplicaConfig(base_latency=0.025, sigma=0)  # ...as the dear ones
    fleet = await fleet_factory([cheap, cheap, dear, dear])
    eps = _priced(fleet.urls, [1.0, 1.0, 5.0, 5.0])

    async def share_of_cheap(lb: lbclient.Balancer, n: int = 40) -> float:
        @lb.route
        async def call(endpoint: lbclient.Endpoint) -> str:
            return await _post(session, endpoint.url, PAYLOAD)

        names = [await call() for _ in range(n)]
        return sum(x in ("replica-0", "replica-1") for x in names[n // 2 :]) / (n - n // 2)

    tolerant = lbclient.Balancer(eps, cost=lbclient.CostPolicy(latency_factor=3.0))
    assert await share_of_cheap(tolerant) >= 0.8  # 2x slower is within 3x: cheap wins
    strict = lbclient.Balancer(eps, cost=lbclient.CostPolicy(latency_factor=1.2))
    assert await share_of_cheap(strict) <= 0.2  # not within 1.2x: the fast ones
    plain = lbclient.Balancer(eps)  # no cost policy: price plays no part, speed does
    assert await share_of_cheap(plain) <= 0.2
    # the cheap replicas slow down 10x: even the tolerant balancer moves to the dear ones
    for i in (0, 1):
        fleet[i].set(speed=0.1)
    assert await share_of_cheap(tolerant) <= 0.2
    for lb in (tolerant, strict, plain):
        await lb.aclose()


def test_without_a_cost_policy_the_fast_path_is_untouched() -> None:
    lb = lbclient.Balancer(["http://a"])

    @lb.route
    async def call(endpoint: lbclient.Endpoint) -> None: ...

    assert lb._meter is None
    assert call.__code__.co_filename.endswith("route.py")  # the engine's own wrapper
    priced = lbclient.Balancer(["http://a"], cost=lbclient.CostPolicy())

    @priced.route
    async def metered(endpoint: lbclient.Endpoint) -> None: ...

    assert metered.__code__.co_filename.endswith("metered.py")
