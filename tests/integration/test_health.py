"""Active health checks against the fake replica fleet on 127.0.0.1: replicas that
fail ``GET /health`` or go down are ejected, and come back when they recover -- with and
without a breaker.  Plus the policy's validation and the threshold logic on its own."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import attrs
import pytest

import lbclient
from lbclient._errors import ConfigError, UnknownEndpoint
from lbclient.pool.health import HealthCheck, HealthTracker
from lbclient.pool.pool import Pool
from lbclient.testing import FakeClock, ReplicaConfig, ReplicaFleet

INTERVAL = 0.05
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
FAST = HealthCheck(interval=INTERVAL, timeout=0.2, unhealthy_threshold=2)


@pytest.fixture
async def fleet() -> AsyncIterator[ReplicaFleet]:
    configs = [ReplicaConfig(base_latency=0.002, sigma=0) for _ in range(3)]
    async with ReplicaFleet(configs) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def wait_until(predicate: Callable[[], bool], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {within} s")
        await asyncio.sleep(0.01)


def route(lb: lbclient.Balancer, http: aiohttp.ClientSession) -> Callable[[], Any]:
    @lb.route
    async def complete(endpoint: lbclient.Endpoint) -> str:
        async with http.post(endpoint.url + CHAT, json=BODY) as resp:
            resp.raise_for_status()
            await resp.read()
            return resp.headers["x-replica"]

    return complete


def stats_of(lb: lbclient.Balancer, url: str) -> lbclient.EndpointStats:
    (found,) = [e for e in lb.stats().endpoints if e.url == url]
    return found


def down(lb: lbclient.Balancer, url: str) -> bool:
    return lb._pool.members[url].health_down


# ------------------------------------------------------------------------ the policy


def test_defaults_and_repr() -> None:
    h = HealthCheck()
    assert (h.path, h.interval, h.timeout) == ("/health", 5.0, 1.0)
    assert (h.unhealthy_threshold, h.healthy_threshold, h.jitter) == (2, 1, 0.1)
    assert repr(h) == "lbclient.HealthCheck()"
    assert repr(FAST) == ("lbclient.HealthCheck(interval=0.05, timeout=0.2)")
    assert attrs.evolve(h, interval=1).interval == 1.0
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        h.interval = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"interval": 0}, "interval must be a finite number of seconds > 0, got 0"),
        ({"interval": math.inf}, "got inf"),
        ({"interval": "5"}, "got '5'"),
        ({"timeout": -1}, "timeout must be a finite number of seconds > 0, got -1"),
        ({"timeout": True}, "got True"),
        ({"unhealthy_threshold": 0}, "unhealthy_threshold must be an int >= 1, got 0"),
        ({"healthy_threshold": 1.5}, "healthy_threshold must be an int >= 1, got 1.5"),
        ({"jitter": 1.0}, "jitter must be a fraction in [0, 1), got 1.0"),
        ({"jitter": -0.1}, "got -0.1"),
        ({"path": "health"}, "path must start with '/'"),
        ({"path": "/he alth"}, "got '/he alth'"),
        ({"path": None}, "got None"),
    ],
)
def test_bad_values_are_config_errors_naming_them(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        HealthCheck(**kwargs)
    assert named in str(info.value)


def test_jittered_waits_stay_in_bounds() -> None:
    rng = random.Random(1)
    waits = [HealthCheck(interval=10, jitter=0.2).next_wait(rng) for _ in range(500)]
    assert 8.0 <= min(waits) < 8.2
    assert 11.8 < max(waits) <= 12.0
    assert HealthCheck(interval=10, jitter=0).next_wait(rng) == 10.0


# ------------------------------------------------------------------ the thresholds


def test_tracker_thresholds_streaks_and_forgetting() -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:1", "http://10.0.0.2:1"])
    a, b = lb._pool.members.values()
    t = HealthTracker(HealthCheck(unhealthy_threshold=3, healthy_threshold=2))
    assert [t.record(a, False), t.record(a, False), t.record(a, True)] == [None, None, None]
    assert [t.record(a, False), t.record(a, False), t.record(a, False)] == [None, None, False]
    assert t.record(a, False) is None  # already down: no repeat
    assert [t.record(a, True), t.record(a, False), t.record(a, True)] == [None, None, None]
    assert t.record(a, True) is True
    assert t.record(b, True) is None

    t.forget(lambda url: url != b.url)
    assert "tracking=1" in repr(t)
    # A URL removed and added again starts over, from the balancer's view.
    lb.remove(a.url)
    lb.add(a.url)
    fresh = lb._pool.members[a.url]
    assert fresh is not a
    assert [t.record(fresh, False), t.record(fresh, False)] == [None, None]


def test_tracker_apply_marks_the_balancer_and_tolerates_removed_members(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:1", "http://10.0.0.2:1", "http://10.0.0.3:1"])
    a, b, c = (s.url for s in lb._pool.members.values())
    t = HealthTracker(HealthCheck(unhealthy_threshold=1))
    with caplog.at_level(logging.INFO, logger="lbclient"):
        t.apply(lb._pool, {a: "HTTP 503", b: None, "http://gone:1": "refused"})
    assert down(lb, a) and not down(lb, b)
    assert f"{a} failed 1 check(s) in a row (last: HTTP 503); marked unhealthy" in caplog.text

    def vanished(url: str, healthy: bool) -> None:
        raise UnknownEndpoint(url)

    lb._pool.set_health = vanished  # type: ignore[method-assign]
    t.apply(lb._pool, {a: None, c: "timeout"})  # no exception

    del lb._pool.set_health
    lb.remove(c)
    t.apply(lb._pool, {a: None})
    assert not down(lb, a)
    assert "down=[]" in repr(t)


# ----------------------------------------------------------- against real replicas


@pytest.mark.parametrize("breaker", [True, False], ids=["breaker", "no-breaker"])
async def test_an_unhealthy_replica_is_ejected_and_comes_back(
    fleet: ReplicaFleet, http: aiohttp.ClientSession, breaker: bool
) -> None:
    lb = lbclient.Balancer(
        fleet.urls,
        health=FAST,
        breaker=lbclient.Breaker() if breaker else None,
        strategy="round_robin",
    )
    complete = route(lb, http)
    sick = fleet.urls[1]
    async with lb:
        await asyncio.gather(*(complete() for _ in range(9)))
        assert fleet[1].counters.served == 3

        fleet[1].set(healthy=False)
        await wait_until(lambda: down(lb, sick), within=6 * INTERVAL + 0.3)
        fleet.reset_counters()
        requests = stats_of(lb, sick).requests
        names = await asyncio.gather(*(complete() for _ in range(20)))
        assert "replica-1" not in names
        assert fleet[1].counters.received == 0
        assert stats_of(lb, sick).requests == requests
        assert not stats_of(lb, sick).pickable
        if breaker:
            assert stats_of(lb, sick).breaker == "open"

        fleet[1].set(healthy=True)
        await wait_until(lambda: not down(lb, sick), within=4 * INTERVAL + 0.3)
        # With a breaker it comes back half-open: its first call is the probe.
        names = [await complete() for _ in range(9)]
        assert "replica-1" in names
        assert fleet[1].counters.served > 0
        assert stats_of(lb, sick).pickable
        if breaker:
            assert stats_of(lb, sick).breaker == "closed"


async def test_a_replica_that_goes_down_is_marked_unhealthy(
    fleet: ReplicaFleet, http: aiohttp.ClientSession
) -> None:
    lb = lbclient.Balancer(fleet.urls, health=FAST, breaker=lbclient.Breaker())
    complete = route(lb, http)
    async with lb:
        await fleet[2].down()
        await wait_until(lambda: down(lb, fleet.urls[2]), within=6 * INTERVAL + 0.3)
        names = await asyncio.gather(*(complete() for _ in range(20)))
        assert "replica-2" not in names  # every call succeeded elsewhere
        await fleet[2].up()
        await wait_until(lambda: not down(lb, fleet.urls[2]), within=4 * INTERVAL + 0.3)


async def test_a_slow_health_answer_is_a_failure(fleet: ReplicaFleet) -> None:
    fleet[0].set(network_latency=0.3)  # longer than the 0.2 s timeout
    async with lbclient.Balancer(fleet.urls, health=FAST) as lb:
        await wait_until(lambda: down(lb, fleet.urls[0]), within=1.5)
        assert not down(lb, fleet.urls[1])


async def test_check_once_probes_every_member(fleet: ReplicaFleet) -> None:
    fleet[1].set(healthy=False)
    await fleet[2].down()
    lb = lbclient.Balancer([*fleet.urls, "http://127.0.0.1:9/never"], health=FAST)
    async with aiohttp.ClientSession() as session:
        results = await FAST.check_once(lb._pool, session)
    assert results == {
        fleet.urls[0]: True,
        fleet.urls[1]: False,
        fleet.urls[2]: False,
        "http://127.0.0.1:9/never": False,
    }
    assert fleet[0].counters.health_checks == 1
    assert lb._pool.members[fleet.urls[0]].health_down is False  # check_once only probes
    await lb.aclose()


async def test_the_loop_survives_errors(
    fleet: ReplicaFleet, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    lb = lbclient.Balancer(fleet.urls, health=FAST)
    real = lb._pool.set_health  # what the health loop calls
    failures = 0

    def flaky(url: str, healthy: bool) -> None:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("boom")
        real(url, healthy)

    lb._pool.set_health = flaky  # type: ignore[method-assign]
    fleet[1].set(healthy=False)
    with caplog.at_level(logging.ERROR, logger="lbclient"):
        async with lb:
            await wait_until(lambda: down(lb, fleet.urls[1]), within=1.5)
    assert failures == 2
    assert caplog.text.count(f"health check: marking {fleet.urls[1]} unhealthy failed") == 2

    # A round that fails as a whole is logged and the loop goes on too.
    lb = lbclient.Balancer(fleet.urls, health=FAST)
    rounds = 0
    real_apply = HealthTracker.apply

    def broken_once(self: HealthTracker, pool: Pool, results: Any) -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise RuntimeError("tracker bug")
        real_apply(self, pool, results)

    monkeypatch.setattr(HealthTracker, "apply", broken_once)
    with caplog.at_level(logging.ERROR, logger="lbclient"):
        async with lb:
            await wait_until(lambda: down(lb, fleet.urls[1]), within=1.5)
    assert "health check round failed; checks go on" in caplog.text


async def test_aclose_stops_the_loop_and_closes_its_session(
    fleet: ReplicaFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions: list[aiohttp.ClientSession] = []
    real = aiohttp.ClientSession

    def recording(*args: Any, **kwargs: Any) -> aiohttp.ClientSession:
        session = real(*args, **kwargs)
        sessions.append(session)
        return session

    monkeypatch.setattr(aiohttp, "ClientSession", recording)
    lb = lbclient.Balancer(fleet.urls, health=FAST)
    async with lb:
        await wait_until(lambda: fleet[0].counters.health_checks >= 2)
    assert len(sessions) == 1 and sessions[0].closed
    assert not lb._background._tasks
    checks = fleet.totals().health_checks
    await asyncio.sleep(3 * INTERVAL)
    assert fleet.totals().health_checks == checks
    del sessions[:]
    gc.collect()  # an unclosed session would warn here (warnings are errors)


async def test_the_loop_sleeps_on_the_balancer_clock(fleet: ReplicaFleet) -> None:
    clock = FakeClock()
    policy = HealthCheck(interval=10, jitter=0, timeout=0.5)
    async with lbclient.Balancer(fleet.urls, health=policy, clock=clock) as lb:
        await wait_until(lambda: clock.sleepers == 1)  # the first round ran at once
        assert [r.counters.health_checks for r in fleet] == [1, 1, 1]
        assert clock.slept == [10.0]
        await asyncio.sleep(0.1)
        assert [r.counters.health_checks for r in fleet] == [1, 1, 1]  # real time: nothing
        clock.advance(10)
        await wait_until(lambda: fleet[0].counters.health_checks == 2)
        await wait_until(lambda: clock.sleepers == 1)
        assert lb.stats().endpoints[0].pickable
