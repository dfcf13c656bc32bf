"""The balancer against real HTTP: a `ReplicaFleet` on 127.0.0.1 and aiohttp.

Each test runs in a few seconds: small latencies (20 ms service time), a few hundred
calls.  Shares are read from the replicas' own counters, so they measure where requests
really went.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient.testing import ReplicaConfig, ReplicaFleet

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

HETERO = [
    ReplicaConfig(speed=1.0, capacity=2, base_latency=0.02),
    ReplicaConfig(speed=0.5, capacity=2, base_latency=0.02),  # the slow one
    ReplicaConfig(speed=0.8, capacity=2, base_latency=0.02),
]
# Capacity: 2 slots / (0.02 s / speed) = 100 + 50 + 80 = 230 requests/s.
RATE = 0.7 * 230.0
FleetFactory = Callable[..., Awaitable[ReplicaFleet]]  # the conftest fixture
CALLS = 350


def make_complete(lb: lbclient.Balancer, http: aiohttp.ClientSession) -> Any:
    @lb.route
    async def complete(endpoint: lbclient.Endpoint, payload: dict[str, Any]) -> str:
        async with http.post(endpoint.url + CHAT, json=payload) as resp:
            resp.raise_for_status()
            await resp.read()
            return resp.headers["x-replica"]

    return complete


async def poisson_load(complete: Any, *, calls: int, rate: float, seed: int) -> list[str]:
    """Open-loop Poisson arrivals at ``rate`` per second; returns the replica names."""
    rnd = random.Random(seed)
    tasks: list[asyncio.Task[str]] = []
    for _ in range(calls):
        tasks.append(asyncio.create_task(complete(BODY)))
        await asyncio.sleep(rnd.expovariate(rate))
    return await asyncio.gather(*tasks)


async def slow_share(
    fleet: ReplicaFleet, http: aiohttp.ClientSession, strategy: str
) -> tuple[float, lbclient.BalancerStats]:
    fleet.reset_counters()
    lb = lbclient.Balancer(fleet.urls, strategy=strategy, rng=11)
    names = await poisson_load(make_complete(lb, http), calls=CALLS, rate=RATE, seed=5)
    received = [r.counters.received for r in fleet]
    assert sum(received) == CALLS
    assert names.count("replica-1") == received[1]
    stats = lb.stats()
    assert [e.requests for e in stats.endpoints] == received  # lb and fleet agree
    assert stats.in_flight == 0 and stats.calls_failed == 0
    await lb.aclose()
    return received[1] / CALLS, stats


@pytest.mark.timeout(30)
async def test_peak_ewma_sends_the_slow_replica_less_than_round_robin(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(HETERO, seed=3)
    t0 = time.monotonic()
    rr_share, _ = await slow_share(fleet, session, "round_robin")
    ewma_share, ewma_stats = await slow_share(fleet, session, "peak_ewma")
    assert abs(rr_share - 1 / 3) < 0.01  # round robin is blind: exactly a third
    print(f"slow replica share: round_robin {rr_share:.3f}, peak_ewma {ewma_share:.3f}")
    assert ewma_share < rr_share - 0.05, (ewma_share, rr_share)
    # ... and it is the fastest replica that takes the difference.
    fast, slow = ewma_stats.endpoints[0], ewma_stats.endpoints[1]
    assert fast.requests > slow.requests
    assert fast.latency_ewma_ms is not None and slow.latency_ewma_ms is not None
    assert time.monotonic() - t0 < 10


async def test_down_replica_error_reaches_the_caller_unchanged(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(down=True)])
    lb = lbclient.Balancer(fleet.urls)  # no retry configured
    seen: list[BaseException] = []

    @lb.route
    async def complete(endpoint: lbclient.Endpoint) -> int:
        try:
            async with session.post(endpoint.url + CHAT, json=BODY) as resp:
                return resp.status
        except BaseException as exc:
            seen.append(exc)
            raise

    with pytest.raises(aiohttp.ClientConnectorError) as info:
        await complete()
    assert info.value is seen[0]  # the very exception, not a wrapper
    assert not isinstance(info.value, lbclient.LBError)
    stats = lb.stats()
    assert (stats.calls, stats.calls_failed, stats.in_flight) == (1, 1, 0)
    assert stats.endpoint(fleet.urls[0]).failures == 1
    assert fleet[0].counters.received == 0


async def test_down_replica_error_through_call_and_pick(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(down=True)])
    lb = lbclient.Balancer(fleet.urls)

    async def post(endpoint: lbclient.Endpoint) -> int:
        async with session.post(endpoint.url + CHAT, json=BODY) as resp:
            return resp.status

    with pytest.raises(aiohttp.ClientConnectorError):
        await lb.call(post)
    with pytest.raises(aiohttp.ClientConnectorError):
        async with lb.pick() as ep:
            await post(ep)
    assert lb.stats().endpoint(fleet.urls[0]).failures == 2
    assert lb.stats().in_flight == 0


async def test_load_aware_strategy_steers_away_from_a_down_replica(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    """A failure is priced as a slow response: fast connection refusals must not attract
    traffic even without a breaker."""
    fleet = await fleet_factory([ReplicaConfig(base_latency=0.005), ReplicaConfig(down=True)])
    lb = lbclient.Balancer(fleet.urls, strategy="peak_ewma", rng=0)
    complete = make_complete(lb, session)
    outcomes = await asyncio.gather(*(complete(BODY) for _ in range(1)), return_exceptions=True)
    for _ in range(60):
        outcomes += await asyncio.gather(complete(BODY), return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(e, aiohttp.ClientConnectorError) for e in errors)
    assert len(errors) <= 2
    assert fleet[0].counters.served == len(outcomes) - len(errors)


async def test_round_robin_over_real_replicas_is_even(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(base_latency=0.002, sigma=0)] * 3)
    lb = lbclient.Balancer(fleet.urls, strategy="round_robin", rng=0)
    complete = make_complete(lb, session)
    names = await asyncio.gather(*(complete(BODY) for _ in range(60)))
    assert sorted(set(names)) == ["replica-0", "replica-1", "replica-2"]
    assert [r.counters.served for r in fleet] == [20, 20, 20]
    assert lb.stats().in_flight == 0


async def test_route_key_affinity_over_real_replicas(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(base_latency=0.002, capacity=8)] * 4)
    lb = lbclient.Balancer(fleet.urls, strategy="consistent_hash", rng=0)

    @lb.route(key=lambda payload: payload["user"])
    async def complete(endpoint: lbclient.Endpoint, payload: dict[str, Any]) -> str:
        async with session.post(endpoint.url + CHAT, json=payload) as resp:
            await resp.read()
            return resp.headers["x-replica"]

    homes: dict[str, set[str]] = {}
    for _ in range(3):  # sequential: no load, so the bound never moves a key
        for u in range(20):
            user = f"user-{u}"
            homes.setdefault(user, set()).add(await complete({**BODY, "user": user}))
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len(set().union(*homes.values())) >= 3


async def test_drain_over_real_replicas(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory([ReplicaConfig(base_latency=0.2, sigma=0, capacity=4)] * 2)
    lb = lbclient.Balancer(fleet.urls, strategy="round_robin", rng=0)
    complete = make_complete(lb, session)
    first = [asyncio.create_task(complete(BODY)) for _ in range(4)]
    for _ in range(200):  # until both requests reached replica 0 (a loaded CI box is slow)
        if fleet[0].counters.in_flight == 2:
            break
        await asyncio.sleep(0.005)
    assert fleet[0].counters.in_flight == 2
    result = await asyncio.wait_for(lb.drain(fleet.urls[0]), 5)
    assert (result.idle, result.in_flight) == (True, 0)
    assert fleet[0].counters.served == 2  # the calls in flight finished ...
    later = await asyncio.gather(*(complete(BODY) for _ in range(10)))
    assert set(later) == {"replica-1"}  # ... and no new one went there
    assert fleet[0].counters.received == 2
    await asyncio.gather(*first)
