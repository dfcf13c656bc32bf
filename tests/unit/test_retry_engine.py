"""The retry engine driven through a real :class:`lbclient.Balancer`
(``lbclient/engine/retrying.py``), with fake async functions and no network: endpoint
exclusion, classification, cancellation, backoff and Retry-After cooldowns, deadlines,
the retry budget, the breaker state machine as the balancer drives it, and panic mode.

Backoff sleeps run on ``FakeClock(auto_advance=True)`` (instant, recorded in ``slept``);
breaker tests step a manual ``FakeClock``.  Only the deadline tests use real time, because
the deadline is an ``asyncio.timeout`` on the loop's own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from strategies import acquire
from yarl import URL

import lbclient
from lbclient import (
    AttemptsExhausted,
    Balancer,
    Breaker,
    BreakerEvent,
    CooldownEvent,
    DeadlineExceeded,
    Endpoint,
    LBError,
    NoEndpointAvailable,
    PanicEvent,
    Retry,
)
from lbclient import strategies as lbstrategies
from lbclient.testing import FakeClock

URLS = [f"http://10.0.0.{i}:8000" for i in range(1, 21)]


def http_error(status: int, headers: dict[str, str] | None = None) -> aiohttp.ClientResponseError:
    """What ``r.raise_for_status()`` raises, without a server."""
    info = aiohttp.RequestInfo(
        URL("http://10.0.0.1:8000/v1/chat/completions"),
        "POST",
        CIMultiDictProxy(CIMultiDict()),
        URL("http://10.0.0.1:8000/v1/chat/completions"),
    )
    return aiohttp.ClientResponseError(
        request_info=info,
        history=(),
        status=status,
        headers=CIMultiDictProxy(CIMultiDict(headers or {})),
    )


class Script:
    """An ``async def fn(endpoint)`` that records every endpoint it is called with and
    raises (or returns) whatever ``outcome(n, endpoint)`` gives for call number ``n``."""

    def __init__(self, outcome: Callable[[int, Endpoint], object]) -> None:
        self.outcome = outcome
        self.seen: list[Endpoint] = []
        self.raised: list[BaseException] = []

    async def __call__(self, endpoint: Endpoint) -> object:
        n = len(self.seen)
        self.seen.append(endpoint)
        result = self.outcome(n, endpoint)
        if isinstance(result, BaseException):
            self.raised.append(result)
            raise result
        return result


def breaker_state(lb: Balancer, url: str) -> str | None:
    return lb.stats().endpoint(url).breaker


def pickable(lb: Balancer) -> set[str]:
    return {e.url for e in lb.stats().endpoints if e.pickable}


# -- where retries go ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", lbstrategies.names())
@pytest.mark.parametrize("seed", range(8))
async def test_each_retry_goes_to_an_endpoint_not_tried_by_this_call(
    strategy: str, seed: int
) -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], strategy=strategy, retry=Retry(attempts=3), clock=clock, rng=seed)

    def fail(n: int, endpoint: Endpoint) -> BaseException:
        clock.advance(0.1 * (n + 1))  # attempt n takes (n + 1) * 100 ms of fake time
        return ConnectionError(f"attempt {n} on {endpoint.url}")

    fn = Script(fail)
    with pytest.raises(AttemptsExhausted) as info:
        await lb.route(fn)()

    assert len({e.url for e in fn.seen}) == 3, [e.url for e in fn.seen]
    exc = info.value
    assert exc.reason == "attempts exhausted"
    assert len(exc.attempts) == 3
    assert [a.endpoint for a in exc.attempts] == fn.seen
    assert [a.error for a in exc.attempts] == fn.raised
    assert all(a.error is e for a, e in zip(exc.attempts, fn.raised, strict=True))
    assert [a.duration for a in exc.attempts] == pytest.approx([0.1, 0.2, 0.3])
    assert not any(a.hedge for a in exc.attempts)
    assert exc.__cause__ is fn.raised[-1]
    assert exc.last_error is fn.raised[-1]

    stats = lb.stats()
    assert (stats.calls, stats.calls_failed, stats.retries, stats.attempts) == (1, 1, 2, 3)
    assert stats.in_flight == 0
    assert [e.failures for e in stats.endpoints] == [1, 1, 1]
    assert sum(e.retries for e in stats.endpoints) == 2


async def test_retry_with_more_attempts_than_endpoints_reuses_one_only_at_the_end() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:2], strategy="random", retry=Retry(attempts=3), clock=clock, rng=5)
    fn = Script(lambda n, ep: ConnectionError(n))
    with pytest.raises(AttemptsExhausted) as info:
        await lb.route(fn)()
    assert len(info.value.attempts) == 3
    assert fn.seen[0] != fn.seen[1]  # the first retry still avoids the failed endpoint
    assert lb.stats().in_flight == 0


async def test_a_retry_that_succeeds_returns_the_result_and_counts_once() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], retry=Retry(attempts=3), clock=clock, rng=1)
    fn = Script(lambda n, ep: ConnectionError("boom") if n == 0 else f"ok from {ep.url}")
    result = await lb.route(fn)()
    assert result == f"ok from {fn.seen[1].url}"
    assert fn.seen[0] != fn.seen[1]
    stats = lb.stats()
    assert (stats.calls, stats.calls_failed, stats.retries, stats.attempts) == (1, 0, 1, 2)
    assert stats.endpoint(fn.seen[0].url).failures == 1
    assert stats.endpoint(fn.seen[1].url).failures == 0


# -- classification ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: http_error(400),
        lambda: http_error(404),
        lambda: http_error(401),
        lambda: http_error(501),
        lambda: ValueError("bad json in my own parsing code"),
        lambda: KeyError("choices"),
    ],
    ids=["400", "404", "401", "501", "ValueError", "KeyError"],
)
async def test_non_retryable_errors_raise_at_once_unchanged(
    make_error: Callable[[], Exception],
) -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], retry=Retry(attempts=3), clock=clock, rng=2)
    error = make_error()
    fn = Script(lambda n, ep: error)
    with pytest.raises(type(error)) as info:
        await lb.route(fn)()
    assert info.value is error
    assert len(fn.seen) == 1
    assert clock.slept == []
    stats = lb.stats()
    assert (stats.calls, stats.calls_failed, stats.retries, stats.retries_denied) == (1, 1, 0, 0)
    assert stats.in_flight == 0


async def test_caller_errors_do_not_count_against_the_endpoint() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:2], retry=Retry(), breaker=Breaker(failures=1), clock=clock, rng=2)
    fn = Script(lambda n, ep: http_error(400))
    for _ in range(10):
        with pytest.raises(aiohttp.ClientResponseError):
            await lb.route(fn)()
    # A bug in the caller's own code is not the endpoint's fault either.
    bug = ValueError("bad json in my own parsing code")
    for _ in range(10):
        with pytest.raises(ValueError) as info:
            await lb.route(Script(lambda n, ep: bug))()
        assert info.value is bug
    stats = lb.stats()
    assert [e.failures for e in stats.endpoints] == [0, 0]
    assert sum(e.ignored for e in stats.endpoints) == 20
    assert [e.breaker for e in stats.endpoints] == ["closed", "closed"]


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: http_error(408),
        lambda: http_error(429),
        lambda: http_error(500),
        lambda: http_error(502),
        lambda: http_error(503),
        lambda: http_error(504),
        lambda: ConnectionError("reset"),
        lambda: ConnectionRefusedError("refused"),
        lambda: TimeoutError("read timeout"),
        lambda: aiohttp.ServerDisconnectedError(),
        lambda: aiohttp.ClientConnectionError("conn"),
    ],
    ids=[
        "408",
        "429",
        "500",
        "502",
        "503",
        "504",
        "ConnectionError",
        "ConnectionRefusedError",
        "TimeoutError",
        "ServerDisconnected",
        "ClientConnectionError",
    ],
)
async def test_transient_errors_are_retried(make_error: Callable[[], Exception]) -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], retry=Retry(attempts=3), clock=clock, rng=3)
    fn = Script(lambda n, ep: make_error() if n < 2 else "ok")
    assert await lb.route(fn)() == "ok"
    assert len(fn.seen) == 3
    assert len({e.url for e in fn.seen}) == 3
    stats = lb.stats()
    assert (stats.calls, stats.calls_failed, stats.retries) == (1, 0, 2)


async def test_custom_retry_on_is_obeyed() -> None:
    clock = FakeClock(auto_advance=True)
    policy = Retry(attempts=3, retry_on=lbclient.retry_if_status(503))
    lb = Balancer(URLS[:3], retry=policy, clock=clock, rng=3)
    refused = ConnectionRefusedError("refused")
    fn = Script(lambda n, ep: refused)
    with pytest.raises(ConnectionRefusedError) as info:
        await lb.route(fn)()
    assert info.value is refused
    assert len(fn.seen) == 1


async def test_non_retryable_error_after_retries_is_raised_with_a_note() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], retry=Retry(attempts=3), clock=clock, rng=4)
    final = http_error(400)
    fn = Script(lambda n, ep: ConnectionError("first") if n == 0 else final)
    with pytest.raises(aiohttp.ClientResponseError) as info:
        await lb.route(fn)()
    assert info.value is final
    assert len(fn.seen) == 2
    assert any("earlier attempts" in note for note in getattr(final, "__notes__", []))


# -- cancellation ------------------------------------------------------------------------


class Hang:
    """fn that fails ``fail_first`` times (ConnectionError), then hangs until cancelled."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls: list[Endpoint] = []
        self.entered = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, endpoint: Endpoint) -> str:
        self.calls.append(endpoint)
        if len(self.calls) <= self.fail_first:
            raise ConnectionError("refused")
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "unreachable"


async def spin_until(predicate: Callable[[], bool], spins: int = 10_000) -> None:
    """Let other tasks run until ``predicate()`` holds (no real time passes)."""
    for _ in range(spins):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def _cancel_when(task: asyncio.Task[Any], ready: Callable[[], Awaitable[Any]]) -> None:
    await asyncio.wait_for(ready(), 2.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("fail_first", [0, 1], ids=["first-attempt", "retry-attempt"])
async def test_cancel_mid_attempt_is_neither_retried_nor_a_failure(fail_first: int) -> None:
    clock = FakeClock(auto_advance=True)
    events: list[lbclient.Event] = []
    lb = Balancer(
        URLS[:3],
        retry=Retry(attempts=3),
        breaker=Breaker(failures=2),
        on_event=events.append,
        clock=clock,
        rng=6,
    )
    fn = Hang(fail_first)
    task = asyncio.create_task(lb.route(fn)())
    await asyncio.wait_for(fn.entered.wait(), 2.0)
    assert lb.stats().in_flight == 1
    before = lb.stats()

    await _cancel_when(task, fn.entered.wait)

    after = lb.stats()
    assert fn.cancelled == 1
    assert len(fn.calls) == fail_first + 1  # not retried after the cancel
    assert after.in_flight == 0
    assert all(e.in_flight == 0 for e in after.endpoints)
    assert [e.failures for e in after.endpoints] == [e.failures for e in before.endpoints]
    assert sum(e.failures for e in after.endpoints) == fail_first
    assert [e.breaker for e in after.endpoints] == ["closed"] * 3
    assert (after.calls_failed, after.retries) == (0, fail_first)
    assert not [e for e in events if isinstance(e, BreakerEvent)]
    # The balancer is still usable and the cancelled endpoint is not penalised as failed.
    assert await lb.route(Script(lambda n, ep: "ok"))() == "ok"


async def test_cancel_during_backoff_sends_nothing_more() -> None:
    clock = FakeClock()  # manual: the backoff sleep blocks until cancelled
    lb = Balancer(URLS[:3], retry=Retry(attempts=3, backoff=0.5), clock=clock, rng=7)
    fn = Script(lambda n, ep: ConnectionError("refused"))
    task = asyncio.create_task(lb.route(fn)())

    await _cancel_when(task, lambda: spin_until(lambda: clock.sleepers > 0))
    clock.advance(10.0)
    await asyncio.sleep(0)
    assert len(fn.seen) == 1
    stats = lb.stats()
    assert stats.in_flight == 0
    assert stats.retries == 0
    assert sum(e.failures for e in stats.endpoints) == 1


async def test_cancelled_half_open_probe_frees_its_slot_without_a_verdict() -> None:
    clock = FakeClock()
    events: list[lbclient.Event] = []
    lb = Balancer(
        URLS[:2],
        strategy="round_robin",
        breaker=Breaker(failures=1, cooldown=1.0, jitter=0.0, max_ejection=0.5),
        on_event=events.append,
        clock=clock,
        rng=0,
    )
    bad = URLS[0]
    # Trip `bad`: fail there until its breaker opens.
    fail_bad = Script(lambda n, ep: ConnectionError("x") if ep.url == bad else "ok")
    for _ in range(4):
        with contextlib.suppress(ConnectionError):
            await lb.route(fail_bad)()
    assert breaker_state(lb, bad) == "open"
    clock.advance(1.0)

    hang = Hang()
    tasks = []
    # Start calls until one is a probe on `bad` (round robin alternates).
    for _ in range(4):
        t = asyncio.create_task(lb.route(hang)())
        tasks.append(t)
        await asyncio.sleep(0)
        if any(e.url == bad for e in hang.calls):
            break
    assert [e.url for e in hang.calls].count(bad) == 1
    assert breaker_state(lb, bad) == "half_open"
    states = {s.url: s for s in lb._pool.members.values()}
    for _ in range(10):  # its single probe slot is taken: not pickable
        lease = acquire(lb, now=clock.now())
        assert lease.state.url != bad
        assert lease.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert hang.cancelled == len(tasks)
    assert lb.stats().in_flight == 0
    assert breaker_state(lb, bad) == "half_open"  # no verdict
    assert lb.stats().endpoint(bad).failures == 1
    # The slot is free again: the next call there is a probe, and its success closes.
    lease = acquire(lb, None, [states[URLS[1]]], clock.now())
    assert lease.state.url == bad
    assert lease.probe
    assert lease.ok(clock.now())
    assert breaker_state(lb, bad) == "closed"


# -- backoff and Retry-After -------------------------------------------------------------


async def test_backoff_sleeps_are_full_jitter_within_the_exponential_ceiling() -> None:
    policy = Retry(attempts=6, backoff=0.1, max_backoff=0.3, budget_min_per_second=100.0)
    all_sleeps: list[tuple[int, float]] = []
    for seed in range(30):
        clock = FakeClock(auto_advance=True)
        lb = Balancer(URLS[:6], retry=policy, clock=clock, rng=seed)
        fn = Script(lambda n, ep: ConnectionError("refused"))
        with pytest.raises(AttemptsExhausted):
            await lb.route(fn)()
        assert len(fn.seen) == 6
        assert len(clock.slept) == 5  # one sleep before each retry, none after the last
        for n, slept in enumerate(clock.slept, start=1):
            ceiling = min(policy.max_backoff, policy.backoff * 2 ** (n - 1))
            assert 0.0 <= slept <= ceiling, (seed, n, slept, ceiling)
            all_sleeps.append((n, slept))
    # Jittered: spread over [0, ceiling], not pinned to either end.
    ratios = [s / min(0.3, 0.1 * 2 ** (n - 1)) for n, s in all_sleeps]
    assert min(ratios) < 0.25
    assert max(ratios) > 0.75
    assert len({round(s, 9) for _, s in all_sleeps}) > len(all_sleeps) // 2


# Retry-After is a per-endpoint cooldown, not a sleep: the endpoint that sent it gets no
# new calls for that long (capped by max_retry_after), the retry goes elsewhere at once,
# and a call only waits when every endpoint is cooling down.


@pytest.mark.parametrize("status", [503, 429])
async def test_retry_after_cools_the_endpoint_and_the_retry_goes_elsewhere_at_once(
    status: int,
) -> None:
    clock = FakeClock(auto_advance=True)
    events: list[lbclient.Event] = []
    lb = Balancer(
        URLS[:3],
        strategy="round_robin",  # would go everywhere in turn, but for the cooldown
        retry=Retry(attempts=3),
        clock=clock,
        rng=8,
        on_event=events.append,
    )
    fn = Script(lambda n, ep: http_error(status, {"Retry-After": "2"}) if n == 0 else "ok")
    assert await lb.route(fn)() == "ok"
    cooled = fn.seen[0].url
    assert fn.seen[1].url != cooled  # retried on another endpoint ...
    assert all(d < 2.0 for d in clock.slept)  # ... without sleeping out the Retry-After
    assert clock.now() < 2.0
    stats = lb.stats()
    assert stats.cooldowns == 1
    assert stats.retries == 1
    e = stats.endpoint(cooled)
    assert e.pickable is False
    assert e.cooling_s == pytest.approx(2.0 - clock.now())
    assert [e.cooling_s for e in stats.endpoints if e.url != cooled] == [0.0, 0.0]
    (cooldown,) = [e for e in events if isinstance(e, CooldownEvent)]
    assert (cooldown.url, cooldown.seconds, cooldown.status) == (cooled, 2.0, status)
    # While it cools, no call goes there; afterwards it is picked again.
    ok = Script(lambda n, ep: "ok")
    for _ in range(30):
        assert await lb.route(ok)() == "ok"
    assert cooled not in {e.url for e in ok.seen}
    clock.advance(2.0)
    assert lb.stats().endpoint(cooled).pickable is True
    assert lb.stats().endpoint(cooled).cooling_s == 0.0
    for _ in range(30):
        await lb.route(ok)()
    assert cooled in {e.url for e in ok.seen}


async def test_retry_after_ms_wins_over_retry_after() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], retry=Retry(attempts=3), clock=clock, rng=8)
    headers = {"Retry-After": "20", "retry-after-ms": "1500"}
    fn = Script(lambda n, ep: http_error(429, headers) if n == 0 else "ok")
    assert await lb.route(fn)() == "ok"
    e = lb.stats().endpoint(fn.seen[0].url)
    assert e.cooling_s == pytest.approx(1.5 - clock.now())


async def test_when_every_endpoint_is_cooling_the_call_waits_for_the_first_back() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:1], retry=Retry(attempts=2), clock=clock, rng=8)
    fn = Script(lambda n, ep: http_error(503, {"Retry-After": "3"}) if n == 0 else "ok")
    assert await lb.route(fn)() == "ok"
    assert [e.url for e in fn.seen] == [URLS[0]] * 2
    assert clock.now() == pytest.approx(3.0, abs=0.01)  # waited out the cooldown, no more
    assert lb.stats().retries == 1


async def test_retry_after_is_capped_by_the_deadline() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], retry=Retry(attempts=5, timeout=1.0), clock=clock, rng=9)
    error = http_error(503, {"Retry-After": "5"})
    fn = Script(lambda n, ep: error)
    t0 = time.monotonic()
    with pytest.raises(AttemptsExhausted) as info:
        await lb.route(fn)()
    assert time.monotonic() - t0 < 0.5
    # Each endpoint was tried once and is now cooling for 5 s: waiting for the first to
    # come back would pass the 1 s deadline, so the call gives up at once.
    assert len({e.url for e in fn.seen}) == len(fn.seen) == 3
    assert "cooling down" in info.value.reason
    assert info.value.__cause__ is error
    assert all(d < 1.0 for d in clock.slept)
    assert clock.now() < 1.0
    stats = lb.stats()
    assert stats.in_flight == 0
    assert (stats.calls_failed, dict(stats.failed_by)) == (1, {"no endpoint": 1})
    assert stats.cooldowns == 3


async def test_retry_after_longer_than_max_retry_after_is_capped() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], retry=Retry(max_retry_after=3.0), clock=clock, rng=9)
    fn = Script(lambda n, ep: http_error(429, {"Retry-After": "60"}) if n == 0 else "ok")
    assert await lb.route(fn)() == "ok"
    cooled = fn.seen[0].url
    assert lb.stats().endpoint(cooled).cooling_s == pytest.approx(3.0 - clock.now())
    assert all(d < 3.0 for d in clock.slept)
    clock.advance(3.0)
    assert lb.stats().endpoint(cooled).pickable is True


async def test_a_cooldown_longer_than_max_retry_after_is_not_waited_for() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:2], retry=Retry(max_retry_after=3.0), clock=clock, rng=9)
    for s in lb._pool.members.values():
        lb._pool.cool(s, 60.0, 503, clock.now())
    fn = Script(lambda n, ep: "ok")
    with pytest.raises(NoEndpointAvailable, match="cooling down") as info:
        await lb.route(timeout=120.0)(fn)()
    assert info.value.retry_after == pytest.approx(60.0)
    assert fn.seen == []
    assert clock.slept == []


async def test_respect_retry_after_false_starts_no_cooldown() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:3], retry=Retry(respect_retry_after=False), clock=clock, rng=9)
    fn = Script(lambda n, ep: http_error(429, {"Retry-After": "60"}) if n == 0 else "ok")
    assert await lb.route(fn)() == "ok"
    stats = lb.stats()
    assert stats.cooldowns == 0
    assert all(e.cooling_s == 0.0 and e.pickable for e in stats.endpoints)


@pytest.mark.parametrize(
    "timeout",
    [
        pytest.param(None, id="fast-path"),
        pytest.param(10.0, id="full-path"),
    ],
)
async def test_a_new_call_waits_when_every_endpoint_is_cooling(timeout: float | None) -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:2], retry=Retry(), clock=clock, rng=9)
    for s in lb._pool.members.values():
        lb._pool.cool(s, 2.0, 429, clock.now())
    fn = Script(lambda n, ep: "ok")
    route = lb.route(fn) if timeout is None else lb.route(timeout=timeout)(fn)
    assert await route() == "ok"
    assert clock.now() == pytest.approx(2.0, abs=0.01)
    assert len(fn.seen) == 1


async def test_fake_time_spent_in_attempts_counts_against_the_timeout() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(URLS[:10], retry=Retry(attempts=10, timeout=1.0), clock=clock, rng=10)

    async def slow_failure(endpoint: Endpoint) -> str:
        await clock.sleep(0.4)  # 0.4 s of fake time per attempt
        raise ConnectionError("refused")

    with pytest.raises(AttemptsExhausted) as info:
        await lb.route(slow_failure)()
    # 3 attempts fill the 1 s timeout (0.4 + 0.4 + backoffs + 0.4 > 1.0).
    assert info.value.reason == "deadline"
    assert len(info.value.attempts) == 3
    assert lb.stats().in_flight == 0


# -- the deadline (real loop time) -------------------------------------------------------


@pytest.mark.parametrize("fail_first", [0, 1], ids=["hang-first", "fail-then-hang"])
async def test_deadline_exceeded_on_a_hanging_call(fail_first: int) -> None:
    lb = Balancer(URLS[:3], retry=Retry(attempts=3, timeout=0.2), rng=11)
    fn = Hang(fail_first)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        await lb.route(fn)()
    elapsed = time.monotonic() - t0
    assert 0.18 <= elapsed < 0.6, elapsed
    exc = info.value
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, LBError)
    assert exc.timeout == 0.2
    # The attempt still running at the deadline is listed too: it counts against its
    # endpoint (a hung replica must get ejected), as a TimeoutError.
    assert len(exc.attempts) == fail_first + 1
    assert isinstance(exc.attempts[-1].error, TimeoutError)
    assert "deadline" in str(exc.attempts[-1].error)
    assert exc.__cause__ is exc.attempts[-1].error
    assert fn.cancelled == 1
    stats = lb.stats()
    assert stats.in_flight == 0
    assert stats.calls_failed == 1
    assert sum(e.failures for e in stats.endpoints) == fail_first + 1


async def test_route_timeout_without_retry_policy() -> None:
    lb = Balancer(URLS[:2], rng=12)
    fn = Hang()
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await lb.route(timeout=0.2)(fn)()
    assert 0.18 <= time.monotonic() - t0 < 0.6
    assert lb.stats().in_flight == 0


async def test_a_timeout_raised_by_fn_itself_is_not_a_deadline() -> None:
    lb = Balancer(URLS[:2], rng=13)  # no retry: the error reaches the caller
    error = TimeoutError("the HTTP client's own read timeout")
    fn = Script(lambda n, ep: error)
    with pytest.raises(TimeoutError) as info:
        await lb.route(timeout=5.0)(fn)()
    assert info.value is error
    assert not isinstance(info.value, DeadlineExceeded)


# -- the retry budget --------------------------------------------------------------------

_OUTCOMES = {
    "ok": lambda: "ok",
    "refused": lambda: ConnectionRefusedError("refused"),
    "503": lambda: http_error(503),
    "timeout": lambda: TimeoutError("read"),
}


@settings(max_examples=30, deadline=None)
@given(
    outcomes=st.lists(st.sampled_from(sorted(_OUTCOMES)), min_size=1, max_size=50),
    n_calls=st.integers(min_value=1, max_value=120),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_retries_never_exceed_the_budget(outcomes: list[str], n_calls: int, seed: int) -> None:
    asyncio.run(_budget_run(outcomes, n_calls, seed))


async def _budget_run(outcomes: list[str], n_calls: int, seed: int) -> None:
    ratio = 0.2
    clock = FakeClock(auto_advance=True)
    policy = Retry(attempts=3, budget_ratio=ratio, budget_min_per_second=0)
    lb = Balancer(URLS[:4], retry=policy, clock=clock, rng=seed)
    script = itertools.cycle(outcomes)
    violations: list[tuple[int, int]] = []

    async def fn(endpoint: Endpoint) -> str:
        s = lb.stats()
        if s.retries > ratio * s.calls + 1e-9:  # checked at every attempt, in order
            violations.append((s.retries, s.calls))
        result = _OUTCOMES[next(script)]()
        if isinstance(result, BaseException):
            raise result
        return result

    route = lb.route(fn)
    ok = exhausted = budget_denials = 0
    for _ in range(n_calls):
        try:
            await route()
            ok += 1
        except AttemptsExhausted as exc:
            exhausted += 1
            if "budget" in exc.reason:
                budget_denials += 1
    stats = lb.stats()
    assert clock.now() < 10.0  # one budget ttl: the plain bound applies
    assert not violations
    assert stats.retries <= ratio * stats.calls + 1e-9
    assert ok + exhausted == n_calls == stats.calls
    assert stats.calls_failed == exhausted
    assert stats.retries_denied == budget_denials
    assert stats.attempts == stats.calls + stats.retries
    assert stats.in_flight == 0


async def test_budget_denial_raises_attempts_exhausted_and_is_counted() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(
        URLS[:3],
        retry=Retry(attempts=3, budget_ratio=0.0, budget_min_per_second=0.0),
        clock=clock,
        rng=14,
    )
    error = ConnectionRefusedError("refused")
    fn = Script(lambda n, ep: error)
    with pytest.raises(AttemptsExhausted) as info:
        await lb.route(fn)()
    assert "budget" in info.value.reason
    assert info.value.__cause__ is error
    assert len(info.value.attempts) == 1
    assert len(fn.seen) == 1
    assert clock.slept == []  # no token, no backoff either
    stats = lb.stats()
    assert (stats.retries, stats.retries_denied, stats.calls_failed) == (0, 1, 1)
    # Per endpoint: the failure that could not be retried is counted where it happened.
    denied = {e.url: e.retries_denied for e in stats.endpoints}
    assert denied == {e.url: int(e.url == fn.seen[0].url) for e in stats.endpoints}


async def test_budget_floor_allows_retries_then_runs_dry() -> None:
    clock = FakeClock()  # time stands still: the reserve is never refilled
    lb = Balancer(
        URLS[:3],
        retry=Retry(attempts=2, budget_ratio=0.0, budget_min_per_second=0.5, backoff=0.0),
        clock=clock,
        rng=15,
    )
    fn = Script(lambda n, ep: ConnectionRefusedError("refused"))
    reasons = []
    for _ in range(10):
        with pytest.raises(AttemptsExhausted) as info:
            await lb.route(fn)()
        reasons.append(info.value.reason)
    # 0.5/s x 10 s ttl = 5 tokens, then every retry is denied.
    assert reasons.count("attempts exhausted") == 5
    assert sum("budget" in r for r in reasons) == 5
    assert lb.stats().retries == 5
    assert lb.stats().retries_denied == 5


# -- the breaker state machine, through the balancer ------------------------------------


async def test_breaker_opens_half_opens_admits_probes_and_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    events: list[lbclient.Event] = []
    policy = Breaker(failures=3, cooldown=5.0, jitter=0.0, half_open_probes=2)
    lb = Balancer(
        URLS[:3], strategy="random", breaker=policy, on_event=events.append, clock=clock, rng=16
    )
    bad = URLS[0]
    broken = True

    def outcome(n: int, ep: Endpoint) -> object:
        return ConnectionError("refused") if ep.url == bad and broken else "ok"

    route = lb.route(Script(outcome))
    with caplog.at_level(logging.INFO, logger="lbclient"):
        for _ in range(200):
            if breaker_state(lb, bad) == "open":
                break
            assert breaker_state(lb, bad) == "closed"
            with contextlib.suppress(ConnectionError):
                await route()
            clock.advance(0.01)
    stats = lb.stats().endpoint(bad)
    assert (stats.breaker, stats.pickable, stats.trips, stats.failures) == ("open", False, 1, 3)

    opened = [e for e in events if isinstance(e, BreakerEvent)]
    assert len(opened) == 1
    assert (opened[0].url, opened[0].old, opened[0].new) == (bad, "closed", "open")
    assert opened[0].consecutive_failures == 3
    assert opened[0].cooldown == 5.0
    warnings = [r for r in caplog.records if r.name == "lbclient" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert bad in warnings[0].getMessage() and "open" in warnings[0].getMessage()

    # Open: never picked, until the cooldown has fully elapsed.
    opened_at = opened[0].at
    clock.advance(opened_at + 4.99 - clock.now())
    for _ in range(50):
        lease = acquire(lb, now=clock.now())
        assert lease.state.url != bad
        assert lease.cancel()

    # Cooldown over: half-open admits exactly `half_open_probes` concurrent probes.
    broken = False
    clock.advance(0.01)
    gate = asyncio.Event()
    landed: list[str] = []

    async def gated(endpoint: Endpoint) -> str:
        landed.append(endpoint.url)
        await gate.wait()
        return endpoint.url

    gated_route = lb.route(gated)
    tasks = [asyncio.create_task(gated_route()) for _ in range(30)]
    await spin_until(lambda: len(landed) == 30)
    assert landed.count(bad) == 2
    assert breaker_state(lb, bad) == "half_open"
    assert lb.stats().endpoint(bad).pickable is False  # both probe slots taken
    assert [(e.old, e.new) for e in events if isinstance(e, BreakerEvent)][-1] == (
        "open",
        "half_open",
    )

    gate.set()
    results = await asyncio.gather(*tasks)
    assert results.count(bad) == 2
    assert breaker_state(lb, bad) == "closed"
    assert lb.stats().endpoint(bad).pickable is True
    transitions = [(e.old, e.new) for e in events if isinstance(e, BreakerEvent)]
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert lb.stats().in_flight == 0


async def test_failed_probe_reopens_with_a_longer_cooldown() -> None:
    clock = FakeClock()
    events: list[lbclient.Event] = []
    policy = Breaker(failures=1, cooldown=2.0, jitter=0.0, multiplier=2.0)
    lb = Balancer(
        URLS[:3], strategy="round_robin", breaker=policy, on_event=events.append, clock=clock
    )
    bad = URLS[1]
    route = lb.route(Script(lambda n, ep: ConnectionError("x") if ep.url == bad else "ok"))
    for _ in range(10):
        with contextlib.suppress(ConnectionError):
            await route()
        if breaker_state(lb, bad) == "open":
            break
    assert breaker_state(lb, bad) == "open"
    clock.advance(2.0)
    for _ in range(10):
        with contextlib.suppress(ConnectionError):
            await route()
        if breaker_state(lb, bad) == "open":
            break
    opens = [e for e in events if isinstance(e, BreakerEvent) and e.new == "open"]
    assert [e.reason for e in opens] == ["1 consecutive failure", "probe failed"]
    assert [e.cooldown for e in opens] == [2.0, 4.0]
    clock.advance(3.9)
    for _ in range(20):
        lease = acquire(lb, now=clock.now())
        assert lease.state.url != bad
        assert lease.cancel()


@st.composite
def pools_with_open_breakers(draw: st.DrawFn) -> tuple[int, float, list[int], str, int]:
    n = draw(st.integers(min_value=2, max_value=10))
    share = draw(st.sampled_from([0.3, 0.5, 0.7, 0.9, 1.0]))
    # Strictly below the max-ejection share, in exact arithmetic: never panic.
    max_open = max(k for k in range(n + 1) if Fraction(k, n) < Fraction(share).limit_denominator())
    max_open = min(max_open, n - 1)
    if max_open < 1:
        n, share, max_open = 4, 0.5, 1
    k = draw(st.integers(min_value=1, max_value=max_open))
    opened = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k, unique=True))
    strategy = draw(st.sampled_from(lbstrategies.names()))
    seed = draw(st.integers(min_value=0, max_value=2**16))
    return n, share, opened, strategy, seed


@settings(max_examples=40, deadline=None)
@given(case=pools_with_open_breakers())
def test_acquire_never_returns_an_open_endpoint(
    case: tuple[int, float, list[int], str, int],
) -> None:
    n, share, opened, strategy, seed = case
    clock = FakeClock()
    lb = Balancer(
        URLS[:n],
        strategy=strategy,
        breaker=Breaker(failures=1, max_ejection=share, cooldown=30.0),
        clock=clock,
        rng=seed,
    )
    states = {s.url: s for s in lb._pool.members.values()}
    open_urls = {URLS[i] for i in opened}
    for url in open_urls:
        # Target `url` through the retry exclusion path, then fail it once.
        others = [s for u, s in states.items() if u != url]
        lease = acquire(lb, None, others, clock.now())
        assert lease.state.url == url
        assert lease.fail(ConnectionRefusedError("refused"), clock.now())
        clock.advance(0.01)
    stats = lb.stats()
    assert {e.url for e in stats.endpoints if e.breaker == "open"} == open_urls
    assert not stats.panic
    assert pickable(lb) == set(URLS[:n]) - open_urls
    healthy = [s for u, s in states.items() if u not in open_urls]
    for i in range(60):
        # Plain picks, and retry picks that exclude all but (at most) one healthy endpoint.
        exclude = None if i % 2 == 0 else healthy[: i % len(healthy)] or None
        lease = acquire(lb, None, exclude, clock.now())
        assert lease.state.url not in open_urls
        assert lease.cancel()
        clock.advance(0.05)
    assert lb.stats().in_flight == 0
    assert pickable(lb) == set(URLS[:n]) - open_urls
    assert not lb.stats().panic


# -- panic mode --------------------------------------------------------------------------


async def test_panic_mode_serves_least_recently_failed_and_recovers() -> None:
    clock = FakeClock()
    events: list[lbclient.Event] = []
    lb = Balancer(
        URLS[:4],
        strategy="round_robin",
        breaker=Breaker(failures=1, max_ejection=0.5, cooldown=5.0, jitter=0.0),
        on_event=events.append,
        clock=clock,
        rng=17,
    )
    healthy = URLS[3]
    broken = set(URLS[:3])
    failed_order: list[str] = []

    def outcome(n: int, ep: Endpoint) -> object:
        if ep.url in broken:
            failed_order.append(ep.url)
            return ConnectionError("refused")
        return ep.url

    route = lb.route(Script(outcome))
    panics = lambda: [e for e in events if isinstance(e, PanicEvent)]  # noqa: E731
    for _ in range(100):
        opened = {e.url for e in lb.stats().endpoints if e.breaker == "open"}
        if opened == set(URLS[:3]):
            break
        # Before the third trip, at most half the pool is ejected: no panic.
        assert lb.stats().panic is False
        assert len(pickable(lb)) >= 2
        with contextlib.suppress(ConnectionError):
            await route()
        clock.advance(0.1)  # distinct failure times
    assert {e.url for e in lb.stats().endpoints if e.breaker == "open"} == set(URLS[:3])
    assert failed_order[:3] == sorted(set(failed_order[:3]), key=failed_order.index)

    # Panic at once (stats() refreshes the snapshot), serving the healthy one plus the
    # ejected one that failed longest ago.
    first_failed = failed_order[0]
    assert lb.stats().panic is True
    assert pickable(lb) == {healthy, first_failed}
    broken.clear()
    served = [await route() for _ in range(40)]
    # A success from an ejected endpoint served in panic mode closes its breaker (the
    # panic is over without waiting for the cooldown), and that recovery gets the other
    # ejected endpoints probed at once: a shared outage ends for all of them together.
    # Panic serves the pickable pair: the first call goes to one of them (round robin's
    # phase decides which) and the ejected one is served within the first two calls.
    assert served[0] in (healthy, first_failed)
    assert first_failed in served[:2]
    assert set(served) == set(URLS[:4])
    assert [e.breaker for e in lb.stats().endpoints] == ["closed"] * 4
    stats = lb.stats()
    assert stats.panic is False
    entered = panics()
    assert [e.entered for e in entered] == [True, False]
    assert (entered[0].pickable, entered[0].total) == (1, 4)
    assert pickable(lb) == set(URLS[:4])

    # Cooldown over: the other ejected ones turn half-open and probes close them.
    clock.advance(5.0)
    for _ in range(40):
        await route()
    stats = lb.stats()
    assert stats.panic is False
    assert [e.breaker for e in stats.endpoints] == ["closed"] * 4
    assert [e.entered for e in panics()] == [True, False]
    assert panics()[1].total == 4
    assert stats.in_flight == 0


async def test_panic_mode_never_leaves_fewer_than_the_floor_pickable() -> None:
    clock = FakeClock()
    lb = Balancer(
        URLS[:6],
        strategy="random",
        breaker=Breaker(failures=1, max_ejection=0.5, cooldown=60.0),
        clock=clock,
        rng=18,
    )
    route = lb.route(Script(lambda n, ep: ConnectionError("all down")))
    for _ in range(200):
        with contextlib.suppress(ConnectionError):
            await route()
        clock.advance(0.01)
        assert len(pickable(lb)) >= 3  # ceil((1 - 0.5) * 6)
    assert lb.stats().panic is True


async def test_in_panic_a_retry_needs_a_healthy_untried_endpoint() -> None:
    clock = FakeClock(auto_advance=True)
    lb = Balancer(
        URLS[:4],
        retry=Retry(attempts=3),
        breaker=Breaker(failures=1, max_ejection=0.5, cooldown=60.0),
        clock=clock,
        rng=19,
    )
    route = lb.route(Script(lambda n, ep: ConnectionRefusedError("fleet down")))
    reasons = []
    for _ in range(30):
        with pytest.raises(AttemptsExhausted) as info:
            await route()
        reasons.append(info.value.reason)
    assert lb.stats().panic is True
    assert [e.breaker for e in lb.stats().endpoints] == ["open"] * 4
    # Once everything is ejected, a failed call is not retried at all.
    assert "panic" in reasons[-1]


async def test_ejecting_exactly_the_max_ejection_share_is_not_panic() -> None:
    clock = FakeClock()
    lb = Balancer(
        URLS[:10],
        strategy="round_robin",
        breaker=Breaker(failures=1, max_ejection=0.7, cooldown=60.0),
        clock=clock,
        rng=20,
    )
    states = list(lb._pool.members.values())
    for target in states[:7]:
        others = [s for s in states if s is not target]
        lease = acquire(lb, None, others, clock.now())
        assert lease.state is target
        assert lease.fail(ConnectionRefusedError("refused"), clock.now())
        clock.advance(0.01)
    stats = lb.stats()
    assert sum(e.breaker == "open" for e in stats.endpoints) == 7
    assert stats.panic is False  # 70% ejected is within max_ejection=0.7
    assert pickable(lb) == {s.url for s in states[7:]}


async def test_max_ejection_one_disables_panic_mode() -> None:
    clock = FakeClock()
    events: list[lbclient.Event] = []
    lb = Balancer(
        URLS[:2],
        strategy="round_robin",
        breaker=Breaker(failures=1, max_ejection=1.0, cooldown=60.0),
        on_event=events.append,
        clock=clock,
    )
    route = lb.route(Script(lambda n, ep: ConnectionRefusedError("down")))
    for _ in range(2):
        with contextlib.suppress(ConnectionRefusedError):
            await route()
    assert [e.breaker for e in lb.stats().endpoints] == ["open", "open"]
    assert lb.stats().panic is False
    assert not [e for e in events if isinstance(e, PanicEvent)]
    with pytest.raises(NoEndpointAvailable):
        await route()


async def test_stats_are_current_right_after_a_trip() -> None:
    clock = FakeClock()
    lb = Balancer(URLS[:3], breaker=Breaker(failures=1, cooldown=1.0, jitter=0.0), clock=clock)
    states = list(lb._pool.members.values())
    lease = acquire(lb, None, states[1:], clock.now())
    assert lease.fail(ConnectionRefusedError("refused"), clock.now())
    e = lb.stats().endpoint(lease.state.url)
    assert (e.breaker, e.pickable) == ("open", False)


async def test_stats_pickable_reflects_a_taken_probe_slot() -> None:
    clock = FakeClock()
    lb = Balancer(URLS[:3], breaker=Breaker(failures=1, cooldown=1.0, jitter=0.0), clock=clock)
    states = list(lb._pool.members.values())
    lease = acquire(lb, None, states[1:], clock.now())
    assert lease.fail(ConnectionRefusedError("refused"), clock.now())
    assert acquire(lb, now=clock.now()).cancel()  # any pick refreshes the snapshot
    assert lb.stats().endpoint(lease.state.url).pickable is False
    clock.advance(1.0)
    probe = acquire(lb, None, states[1:], clock.now())
    assert probe.state is states[0] and probe.probe  # the single probe is out
    assert lb.stats().endpoint(probe.state.url).pickable is False


@pytest.mark.parametrize(
    "retry",
    [None, Retry(), Retry(timeout=5.0)],
    ids=["fast-route", "retry", "retry-deadline"],
)
async def test_no_endpoint_available_counts_as_a_failed_call(retry: Retry | None) -> None:
    lb = Balancer(URLS[:2], retry=retry, clock=FakeClock(auto_advance=True))
    for url in URLS[:2]:
        lb.drain(url)
    fn = Script(lambda n, ep: "ok")
    with pytest.raises(NoEndpointAvailable):
        await lb.route(fn)()
    assert fn.seen == []
    stats = lb.stats()
    assert (stats.calls, stats.calls_failed, stats.attempts, stats.in_flight) == (1, 1, 0, 0)
