"""The fleet-shared state against a real ``redis-server`` (never a mock): several
balancers in one event loop stand for several processes (each has its own link, peer id,
connections and leases), sharing one namespace.

Covered: heartbeats and the peer count, fleet-wide quotas by script and by the
windowed-counter fallback (a server refusing scripts by rename or by ACL), failures
counted together and ejections, a single peer probed not obeyed, Retry-After shared, late
joiners, Redis killed (SIGKILL) and hung (SIGSTOP) mid-run: no call fails or waits, quotas
split by the live count, and convergence when Redis is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient.testing import RedisServer, ReplicaConfig, ReplicaFleet

pytest.importorskip("redis")

pytestmark = pytest.mark.timeout(60)

FAKE = ["http://10.9.0.1:8000", "http://10.9.0.2:8000", "http://10.9.0.3:8000"]


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> float:
    """Poll ``predicate`` every 10 ms; return the seconds it took (fail after timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def mode(lb: lbclient.Balancer) -> str:
    shared = lb.stats().shared
    assert shared is not None
    return shared.mode


def peers(lb: lbclient.Balancer) -> int:
    shared = lb.stats().shared
    assert shared is not None
    return shared.peers


class Fleet:
    """N balancers sharing one namespace, closed at the end."""

    def __init__(self) -> None:
        self.lbs: list[lbclient.Balancer] = []
        self.events: list[list[lbclient.Event]] = []

    def add(self, urls: list[str], state: lbclient.RedisState, **kw: Any) -> lbclient.Balancer:
        events: list[lbclient.Event] = []
        lb = lbclient.Balancer(urls, shared=state, on_event=events.append, rng=len(self.lbs), **kw)
        self.lbs.append(lb)
        self.events.append(events)
        return lb

    async def start(self) -> None:
        for lb in self.lbs:
            await lb.start()
        await wait_until(lambda: all(mode(lb) == "connected" for lb in self.lbs))

    def fleet_events(self, i: int, action: str) -> list[lbclient.FleetEvent]:
        return [
            e for e in self.events[i] if isinstance(e, lbclient.FleetEvent) and e.action == action
        ]

    async def aclose(self) -> None:
        for lb in self.lbs:
            await lb.aclose()


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    f = Fleet()
    yield f
    await f.aclose()


def quota_route(
    lb: lbclient.Balancer, tenant: str = "acme", **kw: Any
) -> Callable[[], Awaitable[Any]]:
    @lb.route(tenant=lambda: tenant, **kw)
    async def call(endpoint: lbclient.Endpoint) -> str:
        return endpoint.url

    return call


async def offer(
    routes: list[Callable[[], Awaitable[Any]]], rate: float, seconds: float
) -> tuple[list[int], list[int], list[BaseException]]:
    """Each route offered ``rate`` calls/s for ``seconds`` (open loop, in turn): calls
    admitted and refused per route, and any other error."""
    admitted = [0] * len(routes)
    refused = [0] * len(routes)
    errors: list[BaseException] = []
    start = time.monotonic()
    n = 0
    while True:
        due = start + n / rate
        now = time.monotonic()
        if due - start >= seconds:
            break
        if due > now:
            await asyncio.sleep(due - now)
        for i, route in enumerate(routes):
            try:
                await route()
                admitted[i] += 1
            except lbclient.QuotaExceeded:
                refused[i] += 1
            except Exception as exc:
                errors.append(exc)
        n += 1
    return admitted, refused, errors


def admission(rps: float) -> lbclient.Admission:
    return lbclient.Admission(limit=1000, quotas={"*": lbclient.Quota(requests_per_second=rps)})


# -- membership ---------------------------------------------------------------------------------


async def test_peers_are_counted_and_a_closed_one_leaves_at_once(
    fleet: Fleet, redis_server: RedisServer, redis_namespace: str
) -> None:
    state = lbclient.RedisState(redis_server.url, namespace=redis_namespace)
    for _ in range(3):
        fleet.add(FAKE, state)
    await fleet.start()
    await wait_until(lambda: all(peers(lb) == 3 for lb in fleet.lbs))
    assert fleet.fleet_events(0, "connected")
    await fleet.lbs[2].aclose()
    assert mode(fleet.lbs[2]) == "closed"
    await wait_until(lambda: peers(fleet.lbs[0]) == 2 and peers(fleet.lbs[1]) == 2, 1.0)


# -- quotas -------------------------------------------------------------------------------------


async def test_a_quota_holds_across_processes_with_even_shares(
    fleet: Fleet, redis_server: RedisServer, redis_namespace: str
) -> None:
    state = lbclient.RedisState(redis_server.url, namespace=redis_namespace)
    routes = [quota_route(fleet.add(FAKE, state, admission=admission(20))) for _ in range(3)]
    await fleet.start()
    seconds = 3.0
    admitted, refused, errors = await offer(routes, 30, seconds)
    assert not errors
    total = sum(admitted)
    # One burst (20) plus 20/s -- per-process quotas would admit all 270 offered.
    assert 0.8 * 20 * seconds <= total <= 20 + 20 * seconds + 6, admitted
    assert min(admitted) >= 0.7 * max(admitted), admitted  # roughly even shares
    assert sum(refused) > 0
    shared = fleet.lbs[0].stats().shared
    assert shared is not None and shared.quotas[0].leasing and shared.quotas[0].leased > 0


async def test_a_token_quota_is_leased_in_tokens(
    fleet: Fleet, redis_server: RedisServer, redis_namespace: str
) -> None:
    state = lbclient.RedisState(redis_server.url, namespace=redis_namespace)
    quota = lbclient.Admission(
        limit=1000, quotas={"*": lbclient.Quota(tokens_per_minute=60 * 200, burst=0.01)}
    )
    routes = [
        quota_route(fleet.add(FAKE, state, admission=quota), tokens=lambda: 10.0) for _ in range(2)
    ]
    await fleet.start()
    admitted, _, errors = await offer(routes, 30, 2.0)
    assert not errors
    # 200 tokens/s at 10 tokens a call: 20 calls/s across both, plus one burst (120).
    assert 30 <= sum(admitted) <= 20 * 2.0 + 12 + 6, admitted
    dims = {q.dimension for q in fleet.lbs[0].stats().shared.quotas}  # type: ignore[union-attr]
    assert dims == {"tokens"}


@pytest.mark.parametrize(
    "refuse",
    [
        ("--rename-command", "EVAL", "", "--rename-command", "EVALSHA", ""),
        ("--user", "default", "on", "nopass", "~*", "&*", "+@all", "-@scripting"),
    ],
    ids=["renamed", "acl"],
)
async def test_a_server_refusing_scripts_gets_windowed_counters_and_says_so(
    fleet: Fleet,
    redis_factory: Callable[..., RedisServer],
    redis_namespace: str,
    refuse: tuple[str, ...],
) -> None:
    server = redis_factory(*refuse)
    state = lbclient.RedisState(server.url, namespace=redis_namespace)
    routes = [quota_route(fleet.add(FAKE, state, admission=admission(20))) for _ in range(2)]
    await fleet.start()
    admitted, _, errors = await offer(routes, 30, 2.0)
    assert not errors
    shared = fleet.lbs[0].stats().shared
    assert shared is not None and shared.scripts is False
    assert fleet.fleet_events(0, "scripts")  # never silent (LiteLLM #32232)
    # No burst in the fallback: 20 per one-second window, plus what each process may
    # start on credit or hold as provisional share before its first lease.
    assert 0.6 * 20 * 2.0 <= sum(admitted) <= 20 * 2.0 + 20 + 6, admitted


async def test_closing_gives_unused_leases_back(
    fleet: Fleet, redis_server: RedisServer, redis_namespace: str
) -> None:
    import redis.asyncio as aioredis

    state = lbclient.RedisState(redis_server.url, namespace=redis_namespace)
    # A big burst at a slow rate: what is given back shows in the fleet bucket.
    quota = lbclient.Quota(requests_per_second=1, burst=100)
    lb = fleet.add(FAKE, state, admission=lbclient.Admission(limit=100, quotas={"*": quota}))
    route = quota_route(lb)
    await fleet.start()
    for _ in range(20):
        await route()
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # leases for the demand seen
    shared = lb.stats().shared
    assert shared is not None and shared.quotas[0].level > 0
    client = aioredis.Redis.from_url(redis_server.url)
    key = f"{state.prefix}:q:requests:acme"
    before = float(await client.hget(key, "level"))  # type: ignore[misc]
    await lb.aclose()
    after = float(await client.hget(key, "level"))  # type: ignore[misc]
    await client.aclose()
    assert shared.quotas[0].level > 1
    assert after >= before + shared.quotas[0].level - 0.5


# -- ejections and cooldowns --------------------------------------------------------------------


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[ReplicaFleet, aiohttp.ClientSession]]:
    async with (
        ReplicaFleet([ReplicaConfig(base_latency=0.002, sigma=0.0)] * 3, seed=3) as f,
        aiohttp.ClientSession() as http,
    ):
        yield f, http


def http_route(
    lb: lbclient.Balancer, http: aiohttp.ClientSession, failures: dict[str, int]
) -> Callable[[], Awaitable[Any]]:
    @lb.route
    async def call(endpoint: lbclient.Endpoint) -> bytes:
        async with http.post(endpoint.url + "/v1/chat/completions", json={}) as r:
            if r.status >= 500:
                failures[endpoint.url] = failures.get(endpoint.url, 0) + 1
            r.raise_for_status()
            return await r.read()

    return call


async def test_failures_are_counted_together_and_eject_everywhere(
    fleet: Fleet,
    redis_server: RedisServer,
    redis_namespace: str,
    replicas: tuple[ReplicaFleet, aiohttp.ClientSession],
) -> None:
    reps, http = replicas
    state = lbclient.RedisState(redis_server.url, namespace=redis_namespace)
    failures = [dict[str, int]() for _ in range(3)]
    routes = [
        http_route(
            fleet.add(
                reps.urls,
                state,
                strategy="round_robin",
                retry=lbclient.Retry(attempts=3),
                breaker=lbclient.Breaker(failures=5),
            ),
            http,
            failures[i],
        )
        for i in range(3)
    ]
    await fleet.start()
    bad = reps.urls[0]
    reps[0].set(error_rate=1.0)
    for _ in range(10):  # each process in turn, as traffic interleaves across a fleet
        for route in routes:
            await route()  # never fails: retried elsewhere
            await asyncio.sleep(0.02)  # time for the failure report to travel
    total = sum(f.get(bad, 0) for f in failures)
    # Five in a row across the fleet trip every breaker; alone, each needed five.
    assert total <= 6, failures
    for i, lb in enumerate(fleet.lbs):
        assert lb.stats().endpoint(bad).breaker == "open", i
    assert any(fleet.fleet_events(i, "eject") for i in range(3))


async def test_one_process_with_a_bad_network_is_probed_not_obeyed(
    fleet: Fleet,
    redis_server: RedisServer,
    redis_namespace: str,
    replicas: tuple[ReplicaFleet, aiohttp.ClientSession],
) -> None:
    reps, http = replicas
    state = lbclient.RedisState(redis_server.url, namespace=redis_namespace)
    breaker = lbclient.Breaker(failures=3, cooldown=0.3, jitter=0.0)
    flaky = fleet.add(reps.urls, state, strategy="round_robin", breaker=breaker)
    healthy = fleet.add(reps.urls, state, strategy="round_robin", breaker=breaker)
    bad = reps.urls[0]

    @flaky.route
    async def broken(endpoint: lbclient.Endpoint) -> None:
        if endpoint.url == bad:  # this process cannot reach it; the replica is fine
            raise ConnectionRefusedError("no route to host")

    ok = http_route(healthy, http, {})
    await fleet.start()
    for _ in range(9):  # round robin: 3 failures on `bad`, its breaker trips
        with _maybe():
            await broken()
    assert flaky.stats().endpoint(bad).breaker == "open"
    await wait_until(lambda: healthy.stats().endpoint(bad).breaker == "half_open", 1.0)
    assert fleet.fleet_events(1, "suspect")
    before = reps[0].counters.received
    for _ in range(3):
        await ok()  # the first is the probe, to `bad`: it succeeds
    assert reps[0].counters.received > before
    assert healthy.stats().endpoint(bad).breaker == "closed"
    assert fleet.fleet_events(1, "refuted")
    # The flaky process trips again after its cooldown: not believed this time.
    await asyncio.sleep(0.4)
    for _ in range(9):
        with _maybe():
            await broken()
    await asyncio.sleep(0.1)
    assert healthy.stats().endpoint(bad).breaker == "closed"
    assert len(fleet.fleet_events(1, "suspect")) == 1


class _maybe:
    """Swallow the flaky route's own error (a context manager)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ConnectionRefusedError)  # type: ignore[arg-type]


async def test_retry_after_is_honoured_by_every_process_within_a_second(
    fleet: Fleet,
    redis_server: RedisServer,
    redis_namespace: str,
    replicas: tuple[ReplicaFleet, aiohttp.ClientSession],
) -> None:
    reps, http = replicas
    state = lbclient.RedisState(redis_server.url, namespace=redis_namespace)
    first = fleet.add(reps.urls, state, strategy="round_robin", retry=lbclient.Retry())
    other = fleet.add(reps.urls, state, strategy="round_robin", retry=lbclient.Retry())
    routes = [http_route(first, http, {}), http_route(other, http, {})]
    await fleet.start()
    limited = reps.urls[1]
    reps[1].set(rate_limit_rate=1.0, retry_after=5.0)
    for _ in range(3):
        await routes[0]()  # meets the 429 once, retries elsewhere
    assert first.stats().endpoint(limited).cooling_s > 0
    took = await wait_until(lambda: other.stats().endpoint(limited).cooling_s > 0, 1.0)
    assert took < 1.0
    assert fleet.fleet_events(1, "cooldown")
    before = reps[1].counters.received
    for _ in range(6):
        await routes[1]()
    assert reps[1].counters.received == before  # the other process never sent it one


async def test_a_late_joiner_learns_the_fleet_s_trips(
    fleet: Fleet, redis_server: RedisServer, redis_namespace: str
) -> None:
    state = lbclient.RedisState(redis_server.url, namespace=redis_namespace)
    breaker = lbclient.Breaker(failures=2, cooldown=20.0, jitter=0.0)
    early = [fleet.add(FAKE, state, breaker=breaker) for _ in range(2)]
    await fleet.start()
    for lb in early:
        lb.set_health(FAKE[0], False)  # a local trip in each (a failed health check)
    await asyncio.sleep(0.2)
    late = fleet.add(FAKE, state, breaker=breaker)
    await late.start()
    await wait_until(lambda: mode(late) == "connected")
    # Two processes' trips, read from the keys they left: ejected here at once.
    assert late.stats().endpoint(FAKE[0]).breaker == "open"


# -- Redis failing ------------------------------------------------------------------------------


async def test_redis_killed_mid_run_no_call_fails_quota_split_then_converges(
    fleet: Fleet, redis_factory: Callable[..., RedisServer], redis_namespace: str
) -> None:
    server = redis_factory()
    state = lbclient.RedisState(server.url, namespace=redis_namespace)
    routes = [
        quota_route(fleet.add(FAKE, state, admission=admission(20), breaker=lbclient.Breaker()))
        for _ in range(2)
    ]
    await fleet.start()
    await wait_until(lambda: all(peers(lb) == 2 for lb in fleet.lbs))
    admitted, _, errors = await offer(routes, 30, 1.0)
    server.kill()
    await wait_until(lambda: all(mode(lb) == "degraded" for lb in fleet.lbs), 2.0)
    assert fleet.fleet_events(0, "degraded")
    admitted, _, errors = await offer(routes, 30, 2.0)
    assert not errors  # no call failed because Redis is gone
    # Each process on quota / 2 live peers: 20/s in all (plus what leases were held).
    assert sum(admitted) <= 20 * 2.0 + 20 + 4, admitted
    assert min(admitted) > 0
    server.start()
    took = await wait_until(
        lambda: all(mode(lb) == "connected" and peers(lb) == 2 for lb in fleet.lbs), 3.0
    )
    assert took <= 2.0
    admitted, _, errors = await offer(routes, 30, 1.0)
    assert not errors and sum(admitted) > 0
    shared = fleet.lbs[0].stats().shared
    assert shared is not None and shared.degraded_total == 1 and shared.quotas[0].leasing


async def test_a_hung_redis_never_delays_a_call(
    fleet: Fleet, redis_factory: Callable[..., RedisServer], redis_namespace: str
) -> None:
    server = redis_factory()
    state = lbclient.RedisState(server.url, namespace=redis_namespace)
    lb = fleet.add(FAKE, state, admission=admission(1000), breaker=lbclient.Breaker())
    route = quota_route(lb)
    await fleet.start()
    server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        worst = 0.0
        start = time.monotonic()
        while time.monotonic() - start < 1.0:
            t0 = time.perf_counter()
            await route()
            worst = max(worst, time.perf_counter() - t0)
            await asyncio.sleep(0.005)
        assert worst < 0.01, worst  # calls never wait for Redis
        await wait_until(lambda: mode(lb) == "degraded", 2.0)  # 3 syncs timed out
    finally:
        server.resume()
    await wait_until(lambda: mode(lb) == "connected", 3.0)


async def test_a_fleet_counter_sums_every_process_s_spend(
    fleet: Fleet, redis_factory: Callable[..., RedisServer], redis_namespace: str
) -> None:
    """What a cost ceiling reads: the fleet's spend in the window, not one process's;
    with Redis gone, this process's unsynced spend counts once per live peer."""
    from lbclient.shared.link import FleetLink

    server = redis_factory()
    state = lbclient.RedisState(server.url, namespace=redis_namespace)
    lbs = [fleet.add(FAKE, state) for _ in range(3)]
    await fleet.start()
    links = [lb._pool.shared for lb in lbs]
    assert all(isinstance(link, FleetLink) for link in links)
    counters = [link.counter("cost_usd", 3600.0) for link in links]  # type: ignore[union-attr]
    for i, c in enumerate(counters):
        c.add(1.5 * (i + 1))  # 1.5 + 3.0 + 4.5
    await wait_until(lambda: all(c.total() == pytest.approx(9.0) for c in counters), 2.0)
    await wait_until(lambda: all(peers(lb) == 3 for lb in lbs))
    server.kill()
    await wait_until(lambda: all(mode(lb) == "degraded" for lb in lbs), 2.0)
    counters[0].add(1.0)
    assert counters[0].total() == pytest.approx(9.0 + 3.0)


def cost_fleet(fleet: Fleet, url: str, namespace: str, n: int = 3) -> list[lbclient.Balancer]:
    state = lbclient.RedisState(url, namespace=namespace)
    priced = [lbclient.Endpoint(u, metadata={"price_per_1k_tokens": 1.0}) for u in FAKE]
    policy = lbclient.CostPolicy(ceiling=10.0, period=3600.0, latency_factor=None)
    return [fleet.add(priced, state, cost=policy, name="llm") for _ in range(n)]  # type: ignore[arg-type]


async def spend_half(endpoint: lbclient.Endpoint) -> None:
    await asyncio.sleep(0.005)
    lbclient.report_usage(500, 0)  # 0.5 a call; the reservation holds 1.0


async def spend_while_allowed(lb: lbclient.Balancer, calls: int = 40) -> int:
    served = 0
    for _ in range(calls):
        try:
            await lb.call(spend_half, tokens=1000)
            served += 1
        except lbclient.Overloaded as exc:
            assert exc.reason == "budget"
        await asyncio.sleep(0.01)
    return served


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "incrbyfloat"])
async def test_a_cost_ceiling_holds_for_the_fleet_not_per_process(
    fleet: Fleet,
    redis_factory: Callable[..., RedisServer],
    redis_namespace: str,
    scripts: bool,
) -> None:
    """Three processes under one ``CostPolicy(ceiling=10)``, each trying to spend 20 in
    0.6 s: together they spend the ceiling, not 3x it -- each reserves only from what it
    leased from the fleet, and the fleet's grants never pass the ceiling."""
    refuse = () if scripts else ("--rename-command", "EVAL", "", "--rename-command", "EVALSHA", "")
    server = redis_factory(*refuse)
    lbs = cost_fleet(fleet, server.url, redis_namespace)
    await fleet.start()
    await wait_until(lambda: all(peers(lb) == 3 for lb in lbs))
    served = await asyncio.gather(*(spend_while_allowed(lb) for lb in lbs))
    spent = sum(lb.spend().spent for lb in lbs)
    print(f"fleet ceiling 10: served {served}, spent {spent:.2f}")
    assert 8.0 <= spent <= 10.0, (served, spent)  # per process: 3 x 10 = 30
    stats = lbs[0].spend()
    assert stats.left is not None and stats.left <= 1.0
    assert stats.fleet_claimed is not None and stats.fleet_claimed >= 8.0
    if scripts:  # (INCRBYFLOAT's total counts others' asks until they give them back)
        assert stats.fleet_claimed <= 10.0 + 1e-9
    with pytest.raises(lbclient.Overloaded, match="fleet has claimed"):
        await lbs[0].call(spend_half, tokens=1000)


async def test_a_cost_ceiling_with_redis_gone_splits_by_peers_and_owes_it_back(
    fleet: Fleet, redis_factory: Callable[..., RedisServer], redis_namespace: str
) -> None:
    """Redis killed: each process may use ceiling / live peers, never the whole ceiling;
    what it spent meanwhile is owed to the fleet once Redis is back."""
    import redis.asyncio as aioredis

    server = redis_factory()
    lbs = cost_fleet(fleet, server.url, redis_namespace)
    await fleet.start()
    await wait_until(lambda: all(peers(lb) == 3 for lb in lbs))
    server.kill()
    await wait_until(lambda: all(mode(lb) == "degraded" for lb in lbs), 2.0)
    served = await asyncio.gather(*(spend_while_allowed(lb, 15) for lb in lbs))
    spent = [lb.spend().spent for lb in lbs]
    assert all(s <= 10.0 / 3 + 1e-9 for s in spent), spent  # each: ceiling / 3 peers
    assert sum(spent) >= 7.0, (served, spent)
    server.start()  # empty: what the fleet claimed before is gone with it
    await wait_until(lambda: all(mode(lb) == "connected" for lb in lbs), 3.0)
    client = aioredis.Redis.from_url(server.url)
    try:

        async def owed() -> float:  # the window's key, rebuilt from the debts
            keys = await client.keys(f"*{redis_namespace}*:b:*")
            assert len(keys) <= 1
            return float(await client.get(keys[0]) or 0) if keys else 0.0

        deadline = asyncio.get_running_loop().time() + 2.0
        while await owed() < sum(spent) - 1e-6:
            assert asyncio.get_running_loop().time() < deadline, await owed()
            await asyncio.sleep(0.05)
        # The fleet knows what was spent in the outage: what is left is the rest.
        await asyncio.gather(*(spend_while_allowed(lb, 15) for lb in lbs))
        total = sum(lb.spend().spent for lb in lbs)
        assert total <= 10.0 + 1e-9, (spent, total)
    finally:
        await client.aclose()
        await fleet.aclose()
