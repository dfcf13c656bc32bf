"""Resilience end to end: retries, breakers and budgets against a real fake fleet on
loopback (:class:`lbclient.testing.ReplicaFleet`), through an ``aiohttp`` client.

Each test drives traffic at a fixed rate (open loop) or a few calls, injects a fault
while it runs -- replicas crashing, a brownout, the whole fleet down, rate limiting
-- and then checks counts: how many calls succeeded, where the requests went, how many
attempts reached the fleet.  Timing tolerances are generous (the machine may be loaded);
counts are strict.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient import (
    AttemptsExhausted,
    Balancer,
    BreakerEvent,
    DeadlineExceeded,
    Endpoint,
    LBError,
    NoEndpointAvailable,
    Retry,
)
from lbclient.testing import ReplicaConfig, ReplicaFleet

CHAT = "/v1/chat/completions"
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
FAST = {"base_latency": 0.02, "sigma": 0.2, "capacity": 8}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # Per-request timeout: a hung replica becomes a retryable TimeoutError, not a hung test.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        yield session


class Completions:
    """The decorated call under test: POST a chat completion, ``raise_for_status()``,
    return the name of the replica that answered.  Counts every invocation of the body
    (each one is an attempt that reached for the network)."""

    def __init__(self, lb: Balancer, http: aiohttp.ClientSession) -> None:
        self.invocations = 0
        self.http = http

        @lb.route
        async def complete(endpoint: Endpoint) -> str:
            self.invocations += 1
            async with self.http.post(endpoint.url + CHAT, json=BODY) as r:
                r.raise_for_status()
                await r.read()
                return r.headers["x-replica"]

        self.call = complete


class Outcome:
    """How one call ended: ``value`` or ``error``, and how long it took."""

    __slots__ = ("duration", "error", "value")

    def __init__(self, value: object, error: BaseException | None, duration: float) -> None:
        self.value, self.error, self.duration = value, error, duration


async def run_one(call: Callable[[], Awaitable[Any]]) -> Outcome:
    t0 = time.monotonic()
    try:
        value = await call()
    except Exception as exc:
        return Outcome(None, exc, time.monotonic() - t0)
    return Outcome(value, None, time.monotonic() - t0)


async def open_loop(
    call: Callable[[], Awaitable[Any]],
    n: int,
    rate: float,
    at: dict[int, Callable[[], Awaitable[None]]] | None = None,
) -> list[Outcome]:
    """Start ``n`` calls at ``rate`` per second whatever their latency (open loop); at
    call index ``i`` in ``at``, also start ``at[i]()`` (a fault) without waiting for it."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Outcome]] = []
    faults: list[asyncio.Task[None]] = []
    t0 = loop.time()
    for i in range(n):
        if at and i in at:
            faults.append(asyncio.create_task(at[i]()))
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run_one(call)))
    outcomes = list(await asyncio.gather(*tasks))
    await asyncio.gather(*faults)
    return outcomes


async def settle(fleet: ReplicaFleet, within: float = 3.0) -> None:
    """Wait until the fleet has finished every request it received."""
    deadline = time.monotonic() + within
    while fleet.total_in_flight or fleet.totals().received != fleet.totals().finished:
        assert time.monotonic() < deadline, fleet.totals()
        await asyncio.sleep(0.01)


# -- half the fleet crashes mid-run -------------------------------------------------------


async def test_half_the_replicas_crash_mid_run(http: aiohttp.ClientSession) -> None:
    # 99.9% of n must succeed.  The few failures all happen at the crash itself: a call
    # whose three attempts land on the three crashed replicas before any has a failure
    # history (about 0.3 such calls per crash on average), whatever n is -- so n is large
    # enough for 99.9% to leave room for 2 of them (at n = 600 it would demand 100%).
    n, rate = 2000, 250.0
    async with asyncio.timeout(30), ReplicaFleet.uniform(6, seed=1, **FAST) as fleet:
        lb = Balancer(fleet.urls, retry=Retry(attempts=3), breaker=lbclient.Breaker(), rng=1)
        api = Completions(lb, http)

        async def crash() -> None:
            await asyncio.gather(*(fleet[i].down() for i in range(3)))

        outcomes = await open_loop(api.call, n, rate, at={n // 2: crash})

        ok = [o for o in outcomes if o.error is None]
        errors = Counter(type(o.error).__name__ for o in outcomes if o.error is not None)
        assert len(outcomes) == n
        assert n - len(ok) <= n // 1000, errors  # >= 99.9% succeed
        # After the crash, only the survivors answered.
        late = {o.value for o in outcomes[n // 2 + 50 :] if o.error is None}
        assert late <= {"replica-3", "replica-4", "replica-5"}, late
        stats = lb.stats()
        assert stats.calls == n
        assert stats.in_flight == 0
        assert stats.calls_failed == n - len(ok)
        assert api.invocations == stats.attempts == n + stats.retries
        assert not stats.panic  # 3 of 6 ejected is exactly max_ejection=0.5
        assert fleet.total_served >= len(ok)


# -- a brownout: one replica fails half its requests --------------------------------------


async def test_brownout_replica_is_ejected_and_every_call_succeeds(
    http: aiohttp.ClientSession,
) -> None:
    n, rate = 600, 200.0
    async with asyncio.timeout(30), ReplicaFleet.uniform(4, seed=2, **FAST) as fleet:
        bad = 1
        fleet[bad].set(error_rate=0.5)
        trips: list[tuple[str, int, int]] = []

        def on_event(event: lbclient.Event) -> None:
            # Runs inline at the transition: snapshot the fleet's counters right then.
            if isinstance(event, BreakerEvent) and event.new == "open" and not trips:
                trips.append((event.url, fleet.total_received, fleet[bad].counters.received))

        # round_robin: the first attempt ignores latency, so only the breaker (not the
        # failure penalty of load-aware strategies) can keep traffic off the bad replica.
        lb = Balancer(
            fleet.urls,
            strategy="round_robin",
            retry=Retry(attempts=3),
            breaker=lbclient.Breaker(failure_rate=0.3, min_calls=10, window=5.0),
            on_event=on_event,
            rng=2,
        )
        api = Completions(lb, http)
        outcomes = await open_loop(api.call, n, rate)

        assert [o.error for o in outcomes if o.error is not None] == []
        assert trips, "the brownout replica's breaker never tripped"
        opened = [e for e in lb.stats().endpoints if e.url == fleet.urls[bad] and e.trips >= 1]
        assert opened
        url, total_at_trip, bad_at_trip = trips[0]
        assert url == fleet.urls[bad]
        after_total = fleet.total_received - total_at_trip
        after_bad = fleet[bad].counters.received - bad_at_trip
        assert after_total >= 300, after_total  # it tripped early: enough traffic after it
        assert after_bad / after_total < 0.05, (after_bad, after_total)
        # Healthy replicas never failed, and no one else was ejected.
        assert all(fleet[i].counters.errors == 0 for i in range(4) if i != bad)
        assert all(e.trips == 0 for e in lb.stats().endpoints if e.url != fleet.urls[bad])
        assert lb.stats().in_flight == 0


# -- the whole fleet is down --------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry", "breaker"),
    [
        (Retry(attempts=3), lbclient.Breaker()),
        (Retry(attempts=3, budget_min_per_second=2.0), lbclient.Breaker()),
        (Retry(attempts=3, budget_min_per_second=2.0), None),
    ],
    ids=["defaults", "tight-budget", "budget-only"],
)
async def test_whole_fleet_down_fails_fast_within_the_budget(
    http: aiohttp.ClientSession, retry: Retry, breaker: lbclient.Breaker | None
) -> None:
    n, rate = 300, 200.0
    reserve = retry.budget_min_per_second * 10.0  # the budget's ttl is 10 s
    async with asyncio.timeout(30), ReplicaFleet.uniform(4, seed=3, **FAST) as fleet:
        lb = Balancer(fleet.urls, retry=retry, breaker=breaker, rng=3)
        api = Completions(lb, http)
        assert await api.call() in {r.name for r in fleet}  # warm: pooled connections
        await asyncio.gather(*(r.down() for r in fleet))
        api.invocations = 0

        async with asyncio.timeout(10):  # nothing hangs
            outcomes = await open_loop(api.call, n, rate)

        assert len(outcomes) == n
        assert all(o.error is not None for o in outcomes)
        kinds = Counter(type(o.error).__name__ for o in outcomes)
        allowed = (AttemptsExhausted, NoEndpointAvailable, aiohttp.ClientConnectionError)
        assert all(isinstance(o.error, allowed) for o in outcomes), kinds
        slowest = max(o.duration for o in outcomes)
        assert slowest < 1.0, slowest
        stats = lb.stats()
        assert stats.calls == n + 1
        assert stats.calls_failed == n
        assert stats.in_flight == 0
        assert api.invocations == stats.attempts - 1
        # Upstream attempts stay within the budget: 20% of calls plus the reserve...
        assert stats.retries <= retry.budget_ratio * stats.calls + reserve
        # ...and within 1.25 x calls + 20 in every configuration.
        assert api.invocations <= n * 1.25 + 20, (api.invocations, kinds)
        if breaker is not None:
            assert stats.panic  # every breaker open: panic mode, serving the least bad
        else:
            assert stats.retries_denied > 0  # the budget alone stopped the storm
        assert fleet.total_received == 1  # only the warm-up call ever got through


# -- rate limiting with Retry-After -------------------------------------------------------


async def test_429_with_retry_after_is_retried_on_another_replica(
    http: aiohttp.ClientSession,
) -> None:
    async with (
        asyncio.timeout(30),
        ReplicaFleet(
            [
                ReplicaConfig(rate_limit_rate=1.0, retry_after=1.0, **FAST),
                ReplicaConfig(**FAST),
            ],
            seed=4,
        ) as fleet,
    ):
        lb = Balancer(fleet.urls, strategy="round_robin", retry=Retry(attempts=3), rng=4)
        api = Completions(lb, http)
        outcomes = await asyncio.gather(*(run_one(api.call) for _ in range(2)))

        assert [o.error for o in outcomes] == [None, None]
        assert [o.value for o in outcomes] == ["replica-1", "replica-1"]
        limited = fleet[0].counters
        assert limited.rejected_429 >= 1  # round robin sent at least one call there first
        assert limited.served == 0
        # Retry-After (1 s) cools the replica instead of delaying the call: the calls that
        # met the 429 were retried on the other replica at once.
        assert all(o.duration < 0.9 for o in outcomes)
        stats = lb.stats()
        assert stats.retries == limited.rejected_429
        assert stats.cooldowns >= 1
        assert stats.calls_failed == 0
        # While it cools, round robin skips it: no new call reaches it.
        received = limited.received
        assert [await api.call() for _ in range(4)] == ["replica-1"] * 4
        assert fleet[0].counters.received == received


# -- no call is ever lost -----------------------------------------------------------------


async def test_every_call_ends_exactly_once_under_mixed_faults(
    http: aiohttp.ClientSession,
) -> None:
    n, rate = 400, 200.0
    configs = [
        ReplicaConfig(error_rate=0.3, **FAST),
        ReplicaConfig(rate_limit_rate=0.5, retry_after=0.0, **FAST),
        ReplicaConfig(**FAST),  # crashes at 1/3, back at 2/3
        ReplicaConfig(**FAST),  # hangs from 1/3 to 2/3
        ReplicaConfig(**FAST),
    ]
    async with asyncio.timeout(30), ReplicaFleet(configs, seed=5) as fleet:
        lb = Balancer(
            fleet.urls,
            # The deadline outlasts the client's 2 s read timeout, so a hung attempt ends as
            # a TimeoutError that counts against the replica and is retried (the test below
            # covers a deadline shorter than the client timeout).
            retry=Retry(attempts=3, timeout=3.5),
            breaker=lbclient.Breaker(failures=3, cooldown=0.5),
            rng=5,
        )
        api = Completions(lb, http)

        async def break_two() -> None:
            fleet[3].set(hang=True)
            await fleet[2].down()

        async def heal_two() -> None:
            fleet[3].set(hang=False)
            await fleet[2].up()

        outcomes = await open_loop(api.call, n, rate, at={n // 3: break_two, 2 * n // 3: heal_two})

        ok = sum(o.error is None for o in outcomes)
        lb_errors = Counter(
            type(o.error).__name__ for o in outcomes if isinstance(o.error, LBError)
        )
        original = Counter(
            type(o.error).__name__
            for o in outcomes
            if isinstance(o.error, aiohttp.ClientError | TimeoutError | OSError)
            and not isinstance(o.error, LBError)
        )
        other = [
            o.error
            for o in outcomes
            if o.error is not None
            and not isinstance(o.error, LBError | aiohttp.ClientError | TimeoutError | OSError)
        ]
        assert other == []
        assert ok + sum(lb_errors.values()) + sum(original.values()) == n
        assert ok >= 0.9 * n, (lb_errors, original)
        # Every failure is one of lbclient's verdicts (all these faults are retryable).
        assert set(lb_errors) <= {"AttemptsExhausted", "DeadlineExceeded"}
        stats = lb.stats()
        assert stats.calls == n
        assert stats.calls_failed == n - ok
        assert stats.in_flight == 0
        assert all(e.in_flight == 0 for e in stats.endpoints)
        assert api.invocations == stats.attempts == n + stats.retries
        await settle(fleet)
        assert fleet.total_in_flight == 0
        # What the fleet saw matches what the client sent (connection refused never arrives).
        assert fleet.totals().received <= api.invocations


async def test_a_hung_replica_is_ejected_when_calls_hit_their_deadline(
    http: aiohttp.ClientSession,
) -> None:
    configs = [ReplicaConfig(hang=True, **FAST), ReplicaConfig(**FAST), ReplicaConfig(**FAST)]
    async with asyncio.timeout(30), ReplicaFleet(configs, seed=6) as fleet:
        lb = Balancer(
            fleet.urls,
            strategy="round_robin",
            retry=Retry(attempts=3, timeout=0.3),
            breaker=lbclient.Breaker(failures=3),
            rng=6,
        )
        api = Completions(lb, http)
        outcomes = [await run_one(api.call) for _ in range(15)]
        deadlines = sum(isinstance(o.error, DeadlineExceeded) for o in outcomes)
        assert deadlines == fleet[0].counters.received  # every call sent there timed out
        hung = lb.stats().endpoint(fleet.urls[0])
        assert hung.failures == deadlines  # each one a failure of that replica...
        assert hung.breaker == "open"  # ...so its breaker trips after 3
        assert fleet[0].counters.received == 3
