"""What a service's probes and its shutdown see: ``lb.ready()`` flipping with drains,
health checks, ejections and Retry-After cooldowns; ``lb.health()`` as JSON; and
``await lb.aclose(timeout=...)`` waiting for calls in flight (and only so long), with
the documented fate of the stragglers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

import lbclient
from lbclient.http import ChatClient
from lbclient.testing import FakeClock, ReplicaConfig, ReplicaFleet

A, B = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
MESSAGES = [{"role": "user", "content": "hi"}]


class Status(Exception):
    """An HTTP-ish error: ``status``, and ``headers`` (Retry-After)."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.headers = headers or {}


async def started(flag: asyncio.Event, timeout: float = 2.0) -> None:
    await asyncio.wait_for(flag.wait(), timeout)


# -- ready() ------------------------------------------------------------------------------


async def test_ready_is_false_when_every_endpoint_is_drained_and_true_again() -> None:
    lb = lbclient.Balancer([A, B])
    assert lb.ready()
    lb.drain(A)
    assert lb.ready()  # B is still pickable
    lb.drain(B)
    assert not lb.ready()
    assert lb.health()["ready"] is False
    lb.undrain(B)
    assert lb.ready()
    await lb.aclose()


async def test_ready_follows_health_checks_without_a_breaker() -> None:
    lb = lbclient.Balancer([A, B])
    lb.set_health(A, False)
    lb.set_health(B, False)
    assert not lb.ready()
    lb.set_health(A, True)
    assert lb.ready()
    await lb.aclose()


async def test_ready_is_false_when_breakers_eject_everything_until_a_probe_is_due(
    clock: FakeClock,
) -> None:
    lb = lbclient.Balancer(
        [A, B],
        breaker=lbclient.Breaker(failures=1, cooldown=5.0, jitter=0.0, max_ejection=1.0),
        clock=clock,
    )

    @lb.route
    async def fail(ep: lbclient.Endpoint) -> None:
        raise ConnectionError("refused")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await fail()
    assert not lb.ready()
    assert {e.breaker for e in lb.stats().endpoints} == {"open"}
    clock.advance(5.1)  # cooldown over: each breaker lets a probe through
    assert lb.ready()
    assert {e.breaker for e in lb.stats().endpoints} == {"half_open"}
    await lb.aclose()


async def test_ready_stays_true_in_panic_mode(clock: FakeClock) -> None:
    """With the default ``max_ejection=0.5`` the balancer never ejects everything: past
    it, panic mode serves ejected endpoints, so they are pickable and ready() is True."""
    lb = lbclient.Balancer([A, B], breaker=lbclient.Breaker(failures=1), clock=clock)

    @lb.route
    async def fail(ep: lbclient.Endpoint) -> None:
        raise ConnectionError("refused")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await fail()
    assert lb.stats().panic
    assert lb.ready()
    assert lb.health()["panic"] is True
    await lb.aclose()


async def test_ready_is_false_while_every_endpoint_cools_down_after_retry_after(
    clock: FakeClock,
) -> None:
    lb = lbclient.Balancer([A, B], clock=clock)

    @lb.route
    async def busy(ep: lbclient.Endpoint) -> None:
        raise Status(429, {"Retry-After": "3"})

    for _ in range(2):
        with pytest.raises(Status):
            await busy()
    assert not lb.ready()
    assert [e["cooling_s"] for e in lb.health()["endpoints"]] == [3.0, 3.0]
    clock.advance(3.0)
    assert lb.ready()
    await lb.aclose()


async def test_ready_is_false_once_closed() -> None:
    lb = lbclient.Balancer([A])
    await lb.aclose()
    assert not lb.ready()
    assert lb.health()["closed"] is True


# -- health() -----------------------------------------------------------------------------


async def test_health_is_a_json_able_view_of_every_endpoint(clock: FakeClock) -> None:
    lb = lbclient.Balancer(
        [lbclient.Endpoint(A, region="us-east-1"), B],
        breaker=lbclient.Breaker(failures=1, cooldown=60.0, max_ejection=1.0),
        admission=lbclient.Admission(limit=5, throttle=None),
        clock=clock,
    )
    release = asyncio.Event()
    running = asyncio.Event()

    async def work(ep: lbclient.Endpoint, fail: bool) -> str:
        if fail:
            raise ConnectionError("refused")
        running.set()
        await release.wait()
        return ep.url

    with pytest.raises(ConnectionError):
        await lb.call(work, True)
    broken = next(e.url for e in lb.stats().endpoints if e.breaker == "open")
    task = asyncio.create_task(lb.call(work, False))
    await started(running)
    lb.drain(A if broken == B else B)  # the healthy one, with a call on it: draining

    view = lb.health()
    assert json.loads(json.dumps(view)) == view  # plain JSON types only
    assert view["ready"] is False  # one open, one draining
    assert (view["closed"], view["panic"], view["strategy"]) == (False, False, "peak_ewma")
    assert (view["calls"], view["calls_failed"], view["in_flight"]) == (2, 1, 1)
    assert view["admission"] == {"limit": 5.0, "in_flight": 1, "queued": 0, "shed": {}}
    endpoints = {e["url"]: e for e in view["endpoints"]}
    assert list(endpoints) == [A, B]
    assert endpoints[A]["region"] == "us-east-1"
    bad, good = endpoints[broken], endpoints[A if broken == B else B]
    assert (bad["breaker"], bad["pickable"], bad["failures"], bad["in_flight"]) == (
        "open",
        False,
        1,
        0,
    )
    assert (good["state"], good["pickable"], good["in_flight"], good["breaker"]) == (
        "draining",
        False,
        1,
        "closed",
    )
    assert set(good) == {
        "url",
        "region",
        "state",
        "pickable",
        "breaker",
        "in_flight",
        "latency_ewma_ms",
        "p99_ms",
        "cooling_s",
        "server_load",
        "requests",
        "failures",
    }
    release.set()
    assert await task == good["url"]
    view = lb.health()
    assert view["in_flight"] == 0 and view["calls_failed"] == 1
    await lb.aclose()


# -- aclose(timeout=...) --------------------------------------------------------------------


async def test_aclose_with_a_timeout_waits_for_a_call_in_flight(fleet_factory: Any) -> None:
    fleet: ReplicaFleet = await fleet_factory([ReplicaConfig(base_latency=0.3, sigma=0.0)])
    lb = lbclient.Balancer(fleet.urls)
    async with ChatClient(lb, timeout=5.0) as chat:
        call = asyncio.create_task(chat.text(messages=MESSAGES))
        for _ in range(100):
            await asyncio.sleep(0.005)
            if fleet.total_received:
                break
        t0 = time.monotonic()
        closing = asyncio.create_task(lb.aclose(timeout=5.0))
        await asyncio.sleep(0.05)
        # While it waits: no new calls, not ready, and the call still runs.
        assert not closing.done() and not call.done()
        with pytest.raises(lbclient.BalancerClosed):
            await chat.text(messages=MESSAGES)
        assert not lb.ready()
        await closing
        elapsed = time.monotonic() - t0
        assert call.done(), "aclose returned before the call in flight finished"
        assert (await call).startswith("replica-0: ")
    assert 0.15 < elapsed < 2.0, elapsed
    st = lb.stats()
    assert (st.calls, st.calls_failed, st.in_flight) == (1, 0, 0)
    assert fleet.total_served == 1


async def test_aclose_returns_after_its_timeout_and_the_straggler_finishes_on_its_own() -> None:
    """``timeout`` bounds the wait; what still runs then is not cancelled: as with
    ``aclose()``, calls in flight finish on their own."""
    lb = lbclient.Balancer([A])
    running = asyncio.Event()

    @lb.route
    async def slow(ep: lbclient.Endpoint) -> str:
        running.set()
        await asyncio.sleep(0.8)
        return "late"

    call = asyncio.create_task(slow())
    await started(running)
    t0 = time.monotonic()
    await lb.aclose(timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.18 <= elapsed < 0.6, elapsed
    assert lb.closed and not call.done()
    assert lb.stats().in_flight == 1
    assert await asyncio.wait_for(call, 2.0) == "late"
    st = lb.stats()
    assert (st.calls, st.calls_failed, st.in_flight) == (1, 0, 0)
    assert lb.stats().endpoints[0].successes == 1


async def test_aclose_without_a_timeout_returns_at_once() -> None:
    lb = lbclient.Balancer([A])
    running = asyncio.Event()

    @lb.route
    async def slow(ep: lbclient.Endpoint) -> str:
        running.set()
        await asyncio.sleep(0.3)
        return "done"

    call = asyncio.create_task(slow())
    await started(running)
    t0 = time.monotonic()
    await lb.aclose()
    assert time.monotonic() - t0 < 0.1
    assert not call.done()
    assert await call == "done"
    await lb.aclose(timeout=1.0)  # idempotent: closed already, returns at once


async def test_aclose_timeout_is_checked() -> None:
    lb = lbclient.Balancer([A])
    for bad in (0, -1.0, float("inf"), "5", True):
        with pytest.raises(lbclient.ConfigError):
            await lb.aclose(timeout=bad)  # type: ignore[arg-type]
    assert not lb.closed
    await lb.aclose()


# Was a defect: Pool.wait_idle (called by aclose(timeout)) waits for attempts in flight
# (pool.totals.inflight), not calls: a call waiting to retry (backoff, Retry-After) has
# none, so aclose(timeout) returns at once while the call is still running
async def test_aclose_with_a_timeout_waits_for_a_call_waiting_to_retry() -> None:
    # One endpoint that answers 503 with Retry-After 0.3 s: the retry waits 0.3 s, with
    # no attempt in flight (deterministic, unlike a jittered backoff).
    lb = lbclient.Balancer([A], retry=lbclient.Retry(attempts=2, backoff=0.001, max_backoff=0.001))
    failed = asyncio.Event()
    sent = 0

    @lb.route
    async def busy_once(ep: lbclient.Endpoint) -> str:
        nonlocal sent
        sent += 1
        if sent == 1:
            failed.set()
            raise Status(503, {"Retry-After": "0.3"})
        return "second try"

    call = asyncio.create_task(busy_once())
    await started(failed)
    await asyncio.sleep(0.01)
    assert lb.stats().in_flight == 0 and not call.done()
    await lb.aclose(timeout=3.0)
    assert call.done(), "aclose(timeout) returned while the call was still running"
    assert await call == "second try"


# Was a defect: a call waiting in the admission queue when aclose(timeout) starts is taken
# (it was accepted before the close), but once a slot frees it reaches pool.acquire with
# call.sent == 0 and gets BalancerClosed: the graceful wait does not cover it
async def test_aclose_with_a_timeout_finishes_calls_queued_at_admission() -> None:
    lb = lbclient.Balancer([A], admission=lbclient.Admission(limit=1, max_queue=5, throttle=None))

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        await asyncio.sleep(0.1)
        return "done"

    calls = [asyncio.create_task(work()) for _ in range(2)]
    await asyncio.sleep(0.02)
    assert lb.stats().admission.queued == 1  # type: ignore[union-attr]
    await lb.aclose(timeout=3.0)
    assert await asyncio.gather(*calls, return_exceptions=True) == ["done", "done"]


# Was a defect: Pool.wait_idle measures its deadline with the balancer's clock (an
# injected FakeClock that nobody advances) but sleeps in real time: aclose(timeout=0.1)
# never returns while a call is in flight
async def test_aclose_timeout_is_real_time_with_an_injected_clock(clock: FakeClock) -> None:
    lb = lbclient.Balancer([A], clock=clock)
    running = asyncio.Event()

    @lb.route
    async def slow(ep: lbclient.Endpoint) -> None:
        running.set()
        await asyncio.sleep(1.0)

    call = asyncio.create_task(slow())
    await started(running)
    try:
        await asyncio.wait_for(lb.aclose(timeout=0.1), 0.5)
    finally:
        await call
