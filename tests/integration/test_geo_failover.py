"""Region failover over real loopback HTTP: a ReplicaFleet spread over four regions.

Two replicas per region, with the network distance simulated by the replica
(``network_latency``: 2 / 30 / 40 / 100 ms) and the region given to the balancer on each
:class:`lbclient.Endpoint`.  The client sits in us-east-1.  A small closed-loop load (two
workers calling back to back: "moderate") runs through three phases:

1. healthy -- the local region takes nearly all calls;
2. both us-east-1 replicas crash (``down()``) -- calls move to the next-closest region
   (us-west-2) and none fails (retries step over the dead replicas);
3. they come back (``up()``) -- once their breakers have closed and slow start has run,
   traffic returns to the local region.

Counts are strict (no failed call); timings are generous (the machine may be busy).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from lbclient import Balancer, Breaker, Endpoint, Retry
from lbclient.testing import ReplicaConfig, ReplicaFleet

pytestmark = pytest.mark.slow

US_EAST, US_WEST, EU_WEST, AP_SE = "us-east-1", "us-west-2", "eu-west-1", "ap-southeast-1"
REGIONS = [(US_EAST, 0.002), (US_WEST, 0.030), (EU_WEST, 0.040), (AP_SE, 0.100)]
WORKERS = 2


@pytest.fixture
async def fleet() -> AsyncIterator[ReplicaFleet]:
    configs = [
        ReplicaConfig(
            region=region,
            network_latency=net,
            base_latency=0.02,
            sigma=0.1,
            name=f"{region}-{i}",
        )
        for region, net in REGIONS
        for i in range(2)
    ]
    async with ReplicaFleet(configs, seed=1) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


class Load:
    """Closed-loop load: ``WORKERS`` tasks calling ``fn()`` back to back; counts which
    region served each successful call, and every call that failed."""

    def __init__(self, lb: Balancer, http: aiohttp.ClientSession) -> None:
        self.lb = lb
        self.region_of = {e.url: e.region for e in lb.endpoints}
        self.served: Counter[str | None] = Counter()
        self.errors: list[BaseException] = []
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []

        @lb.route
        async def complete(endpoint: Endpoint) -> str:
            async with http.post(
                endpoint.url + "/v1/chat/completions", json={"model": "m", "messages": []}
            ) as resp:
                resp.raise_for_status()
                await resp.read()
                return endpoint.url

        self.complete = complete

    async def _worker(self) -> None:
        while not self._stop:
            try:
                served_by = await self.complete()
            except Exception as exc:  # every failure is a test failure: collect them
                self.errors.append(exc)
            else:
                self.served[self.region_of[served_by]] += 1

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(WORKERS)]

    async def window(self, seconds: float) -> Counter[str | None]:
        """What was served during the next ``seconds``."""
        self.served.clear()
        await asyncio.sleep(seconds)
        return Counter(self.served)

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)


def share(counts: Counter[Any], key: object) -> float:
    total = sum(counts.values())
    return counts[key] / total if total else 0.0


async def wait_for(predicate: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def run_scenario(
    fleet: ReplicaFleet,
    http: aiohttp.ClientSession,
    *,
    strategy: str,
    locality: bool,
    slow_start: float | None,
) -> None:
    eps = [Endpoint(r.url, region=r.config.region) for r in fleet]
    lb = Balancer(
        eps,
        strategy=strategy,
        region=US_EAST,
        locality=locality,
        retry=Retry(attempts=3),
        breaker=Breaker(cooldown=0.5),
        slow_start=slow_start,
        rng=1,
    )
    load = Load(lb, http)
    # Open the connections and let the latency estimates settle before measuring.
    for _ in range(20):
        await load.complete()
    load.start()
    try:
        # 1. Healthy, moderate load: the local region takes nearly everything.
        healthy = await load.window(0.8)
        assert sum(healthy.values()) >= 20, healthy
        assert share(healthy, US_EAST) >= 0.9, healthy
        assert not load.errors, load.errors[:3]

        # 2. The whole local region crashes: failover to us-west-2, no call fails.
        await fleet[0].down()
        await fleet[1].down()
        down = await load.window(1.2)
        assert sum(down.values()) >= 15, down
        assert down[US_EAST] == 0, down
        assert share(down, US_WEST) > 0.5, down  # the next-closest region takes most
        assert down[US_WEST] > down[EU_WEST] + down[AP_SE], down
        assert not load.errors, load.errors[:3]

        # 3. Back up: after the breaker cooldown (re-trips double it) and slow start,
        # traffic returns to the local region.
        await fleet[0].up()
        await fleet[1].up()

        def local_closed() -> bool:  # both probed (half-open probes go out at once)
            st = lb.stats()
            return all(st.endpoint(r.url).breaker == "closed" for r in fleet.replicas[:2])

        await wait_for(local_closed, within=8.0)
        await asyncio.sleep((slow_start or 0.0) + 0.5)
        back = await load.window(0.5)
        assert sum(back.values()) >= 5, back
        assert share(back, US_EAST) >= 0.7, back
        assert not load.errors, load.errors[:3]
        assert lb.stats().calls_failed == 0
    finally:
        await load.stop()
        assert not load.errors, load.errors[:3]


@pytest.mark.parametrize(
    ("strategy", "locality"),
    [("geo", False), ("peak_ewma", True)],
    ids=["geo", "peak_ewma+locality"],
)
async def test_region_failover_and_return(
    fleet: ReplicaFleet, http: aiohttp.ClientSession, strategy: str, locality: bool
) -> None:
    await run_scenario(fleet, http, strategy=strategy, locality=locality, slow_start=1.0)
