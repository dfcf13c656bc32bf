"""Adversarial tests of the call engine: the contract is that a request is never lost
silently -- every call returns or raises an exception saying what was tried, every
attempt's in-flight slot is released exactly once, nothing hangs, and no task or timer
outlives the calls and ``await lb.aclose()``.

Two kinds of test live here:

* regression tests for the defects this review found (each fixed since): each asserts
  the correct behaviour and its comment says where the code went wrong;
* plain tests are robustness checks that held, beyond the single-call accounting matrix
  (``test_accounting_matrix.py``) and the pool state machine
  (``tests/unit/test_pool_state_machine.py``): orderings of win / fail / cancel inside
  one loop iteration, thousands of concurrent calls with random faults, cancellations and
  membership changes, two event loops, raising listeners, probe hand-over under load,
  Retry-After everywhere plus a deadline, and a chaos run over real loopback HTTP.

Wrapped functions here do no HTTP unless they say so: they wait on futures and events the
test controls, so orderings are deterministic rather than timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from typing import Any

import pytest

import lbclient
from lbclient.pool.state import EndpointState
from lbclient.strategies import PickContext
from lbclient.testing import FakeClock, ReplicaConfig, ReplicaFleet

URLS = [f"http://10.77.0.{i}:8000" for i in range(1, 6)]
A, B, C = URLS[:3]


# -- helpers ------------------------------------------------------------------------------


class _InOrderPicker:
    def __init__(self, states: Sequence[EndpointState]) -> None:
        self.states = tuple(states)

    def pick(self, call: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        for s in self.states:
            if not exclude or s not in exclude:
                return s
        return None


class InOrder:
    """Deterministic strategy: the first pickable endpoint (pool order) not excluded, so
    the primary goes to the first URL and a backup or retry to the next one."""

    name = "in_order"

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _InOrderPicker:
        return _InOrderPicker(states)


class HTTPError(Exception):
    """An HTTP error shaped like aiohttp's: ``status`` and ``headers``."""

    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers or {}


class Shutdown(BaseException):
    """A user's own shutdown signal (not an Exception)."""


def assert_accounting(lb: lbclient.Balancer) -> None:
    """Every slot given back; per endpoint, every attempt ended exactly one way."""
    st = lb.stats()
    assert st.in_flight == 0, st
    assert lb._pool.totals.inflight == 0
    for e in st.endpoints:
        assert e.in_flight == 0, e
        assert e.requests == e.successes + e.failures + e.ignored + e.cancelled, e
        assert e.cut <= e.failures and e.lost <= e.cancelled, e


def pending_tasks() -> list[asyncio.Task[Any]]:
    """Tasks still running besides the current one (pytest-asyncio runs none of its own)."""
    me = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not me and not t.done()]


@pytest.fixture(autouse=True)
async def _reap() -> AsyncIterator[None]:
    """A test that finds a leak must not pass it on: cancel whatever is left running."""
    yield
    left = pending_tasks()
    for t in left:
        t.cancel()
    if left:
        await asyncio.wait(left, timeout=2.0)


async def settle_loop(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# == defects ====================================================================================

# -- hedging: losers left running -------------------------------------------------------------


# Was a defect: hedged_try: when the primary failed and a backup then wins in the
# asyncio.wait loop, it returns race.result without _end(); other backups keep running and
# hold their slots
async def test_backup_winning_after_the_primary_failed_cancels_the_other_backups() -> None:
    lb = lbclient.Balancer(
        [A, B, C], strategy=InOrder(), hedge=lbclient.Hedge(delay=0.01, max_hedges=2)
    )
    c_started, a_failed = asyncio.Event(), asyncio.Event()
    cancelled: list[str] = []

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        if ep.url == A:  # the primary fails once both backups run
            await c_started.wait()
            a_failed.set()
            raise ConnectionError("primary down")
        if ep.url == B:  # the first backup wins after that
            await a_failed.wait()
            return "B"
        c_started.set()  # the second backup would run for a long time
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(ep.url)
            raise
        return "C"

    assert await work() == "B"
    await settle_loop()
    assert cancelled == [C], "the losing backup was not cancelled"
    assert_accounting(lb)


# Was a defect: hedged_try: when the primary swallows the cancel sent by a winning backup
# and returns, the winner's result is returned without _end(); other backups keep running
# and hold their slots
async def test_primary_swallowing_the_winners_cancel_still_cancels_the_other_backups() -> None:
    lb = lbclient.Balancer(
        [A, B, C], strategy=InOrder(), hedge=lbclient.Hedge(delay=0.01, max_hedges=2)
    )
    c_started = asyncio.Event()
    cancelled: list[str] = []

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        if ep.url == A:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                return "primary swallowed its cancel"
        if ep.url == B:
            await c_started.wait()
            return "B"
        c_started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append(ep.url)
            raise
        return "C"

    assert await work() == "B"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await settle_loop()
    assert cancelled == [C], "the losing backup was not cancelled"
    assert_accounting(lb)


# Was a defect: hedging._end only cancels losing backups; nothing awaits or tracks them,
# so aclose() returns while their tasks (and the wrapped function's cleanup) still run
async def test_no_hedge_task_outlives_the_call_and_aclose() -> None:
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=lbclient.Hedge(delay=0.01))
    cleaned: list[str] = []

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        if ep.url == A:
            await asyncio.sleep(0.05)
            return "A"
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            await asyncio.sleep(0.02)  # closing a connection, say
            cleaned.append(ep.url)
            raise
        return "B"

    assert await work() == "A"
    assert lb.stats().hedges_sent == 1
    await lb.aclose()
    assert pending_tasks() == []
    assert cleaned == [B]


# Was a defect: a hedge backup's BaseException is retrieved and dropped by
# hedging._finisher (streams forward it to the consumer, a primary's propagates): a
# shutdown signal raised in a backup is lost silently
async def test_a_base_exception_from_a_hedge_backup_reaches_the_caller() -> None:
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=lbclient.Hedge(delay=0.01))

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        if ep.url == A:
            await asyncio.sleep(0.1)
            return "A"
        raise Shutdown("stop")

    with pytest.raises(Shutdown):
        await work()
    await settle_loop()
    assert_accounting(lb)


# Was a defect: a strategy raising in the backup pick escapes Hedger._tick (a loop
# callback): the races still queued behind it are never fired (the shared timer is not re-
# armed)
async def test_a_picker_raising_for_one_backup_does_not_stop_other_hedges() -> None:
    class FlakyPicker(_InOrderPicker):
        def pick(
            self, call: Any, exclude: Collection[EndpointState] | None
        ) -> EndpointState | None:
            if exclude and call is not None and call.key == "boom":
                raise RuntimeError("picker bug")
            return super().pick(call, exclude)

    class Flaky(InOrder):
        def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> FlakyPicker:
            return FlakyPicker(states)

    lb = lbclient.Balancer([A, B, C], strategy=Flaky(), hedge=lbclient.Hedge(delay=0.02))

    @lb.route(key=lambda name: name)
    async def work(ep: lbclient.Endpoint, name: str) -> str:
        if ep.url == A:
            await asyncio.sleep(0.3)
        return ep.url

    loop = asyncio.get_running_loop()
    errors: list[object] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))
    try:
        t0 = time.monotonic()
        boom, ok = await asyncio.gather(work("boom"), work("ok"))
        elapsed = time.monotonic() - t0
    finally:
        loop.set_exception_handler(old)
    assert boom == A  # its own backup could not be picked: the primary answered
    assert ok == B, f"the other call was never hedged ({elapsed:.2f} s)"
    assert_accounting(lb)


# -- a deadline cut charges a backup that had only just started ----------------------------------


# Was a defect: hedging._end(..., 'cut') -> Lease.cut charges every running backup as a
# failure however briefly it ran: a healthy endpoint's breaker opens for a backup sent
# just before the deadline (lose() weighs the time run; cut() does not)
async def test_a_backup_sent_just_before_the_deadline_is_not_held_against_its_endpoint() -> None:
    lb = lbclient.Balancer(
        [A, B, C],
        strategy=InOrder(),
        hedge=lbclient.Hedge(delay=0.03),
        breaker=lbclient.Breaker(failures=1),
    )
    latency = {A: 5.0, B: 0.04}

    @lb.route(timeout=0.06)
    async def work(ep: lbclient.Endpoint) -> str:
        await asyncio.sleep(latency[ep.url])
        return ep.url

    lb.drain(A)  # teach the balancer B's latency: ~40 ms
    for _ in range(5):
        async with lb.pick() as ep:
            assert ep.url == B
            await asyncio.sleep(latency[B])
    lb.undrain(A)

    # A hangs; B is backed up at 30 ms and would answer at 70 ms, as it always does.
    with pytest.raises(lbclient.DeadlineExceeded):
        await work()
    st = lb.stats()
    assert st.hedges_sent == 1
    assert (st.endpoint(A).cut, st.endpoint(A).breaker) == (1, "open")  # the hung one
    eb = st.endpoint(B)
    assert eb.failures == 0 and eb.breaker == "closed", eb
    assert_accounting(lb)


# -- a caller's cancel turned into an error by the wrapped function -------------------------------


# Was a defect: the engine never checks the caller's cancelling(): a cancel that the
# wrapped function turns into a retryable error is retried (engine/retrying.py's loop) or
# waits for a running backup (hedged_try's asyncio.wait loop); the call goes on
@pytest.mark.parametrize("variant", ["fast_then_retry", "deadline", "hedged"])
async def test_a_cancelled_call_sends_nothing_more_when_the_function_converts_the_cancel(
    variant: str,
) -> None:
    lb = lbclient.Balancer(
        [A, B, C],
        strategy=InOrder(),
        retry=lbclient.Retry(
            attempts=3,
            backoff=0.001,
            max_backoff=0.001,
            timeout=5.0 if variant == "deadline" else None,
        ),
        hedge=lbclient.Hedge(delay=0.01) if variant == "hedged" else None,
    )
    sent: list[str] = []
    running = asyncio.Event()

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        sent.append(ep.url)
        if len(sent) == (2 if variant == "hedged" else 1):
            running.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            # what an HTTP layer that maps an aborted request to its own error does
            raise ConnectionError("request aborted") from None
        return ep.url

    task = asyncio.create_task(work())
    await running.wait()
    before = list(sent)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert task in done, "the cancelled call is still running"
    assert task.cancelled() or task.exception() is not None, "a cancelled call returned"
    assert sent == before, f"attempts sent after the cancel: {sent[len(before) :]}"
    await settle_loop()
    assert_accounting(lb)


# -- aclose() with calls in flight -----------------------------------------------------------------


# Was a defect: after aclose(), retrying.acquire -> pool.acquire raises a bare
# BalancerClosed: a call in flight loses its attempts and error, and is not counted in
# calls_failed
@pytest.mark.parametrize("variant", ["fast_then_retry", "deadline", "hedged", "stream"])
async def test_a_call_in_flight_at_aclose_still_says_what_it_tried(variant: str) -> None:
    lb = lbclient.Balancer(
        [A, B],
        strategy=InOrder(),
        retry=lbclient.Retry(
            attempts=3,
            backoff=0.001,
            max_backoff=0.001,
            timeout=5.0 if variant == "deadline" else None,
        ),
        hedge=lbclient.Hedge(delay=1.0) if variant == "hedged" else None,
    )
    started = asyncio.Event()

    async def attempt() -> None:
        started.set()
        await asyncio.sleep(0.02)
        raise ConnectionError("down")

    run: Callable[[], Coroutine[Any, Any, object]]
    if variant == "stream":

        @lb.route
        async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
            await attempt()
            yield "never"

        async def consume() -> object:
            return [chunk async for chunk in gen()]

        run = consume
    else:

        @lb.route
        async def work(ep: lbclient.Endpoint) -> str:
            await attempt()
            return "never"

        run = work

    task = asyncio.create_task(run())
    await started.wait()
    await lb.aclose()
    with pytest.raises(Exception) as info:
        await task
    attempts = getattr(info.value, "attempts", ())
    assert any(isinstance(a.error, ConnectionError) for a in attempts), repr(info.value)
    assert lb.stats().calls_failed == 1
    assert_accounting(lb)


# Was a defect: aclose() kills a healthy hedged stream in flight: its hedge timer calls
# send_backup -> pool.acquire, which raises BalancerClosed out of _stream_call (the plain
# hedged path checks pool.closed in _fire; send_backup catches only NoEndpointAvailable)
async def test_a_hedged_stream_in_flight_at_aclose_finishes() -> None:
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=lbclient.Hedge(delay=0.03))
    started = asyncio.Event()

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
        started.set()
        await asyncio.sleep(0.06)
        yield "tok"

    async def consume() -> list[str]:
        return [chunk async for chunk in gen()]

    task = asyncio.create_task(consume())
    await started.wait()
    await lb.aclose()
    assert await task == ["tok"]
    assert_accounting(lb)


# -- streams whose generator swallows the cancel ---------------------------------------------------


# Was a defect: streaming._pump keeps pumping a losing attempt whose generator swallowed
# the cancel: nobody reads its channel, so after 16 chunks the pump blocks forever on
# channel.put (never awaited: losers are dropped from `live`)
async def test_a_losing_stream_that_swallows_its_cancel_does_not_leak_its_pump() -> None:
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=lbclient.Hedge(delay=0.02))

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
        if ep.url == A:  # a slow first token, and a generator that ignores cancellation
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.1)
            for i in range(100):
                yield f"a{i}"
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.01)
            for i in range(3):
                yield f"b{i}"

    assert [chunk async for chunk in gen()] == ["b0", "b1", "b2"]
    held = pending_tasks()  # strong references: a blocked pump is otherwise garbage
    await asyncio.sleep(0.1)
    assert [t for t in held if not t.done()] == []
    assert_accounting(lb)


# Was a defect: closing a stream whose generator swallowed one cancel hangs:
# _stream_call's finally awaits the pump, which goes on pumping into a channel nobody
# reads
async def test_closing_a_stream_whose_generator_swallows_a_cancel_does_not_hang() -> None:
    lb = lbclient.Balancer([A, B], strategy=InOrder())

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[int]:
        for i in range(200):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.001)
            yield i

    async def consume() -> list[int]:
        got: list[int] = []
        async with contextlib.aclosing(gen()) as chunks:
            async for chunk in chunks:
                got.append(chunk)
                if chunk == 2:
                    break
        return got

    task = asyncio.create_task(consume())
    held = pending_tasks()  # strong references: a blocked pump is otherwise garbage
    done, _ = await asyncio.wait([task], timeout=1.0)
    assert done, f"closing the stream hangs ({len(held)} tasks)"
    assert_accounting(lb)


# -- retries and membership ------------------------------------------------------------------------


# Was a defect: retrying.avoid compares len(tried | recently failed) with len(pickable),
# counting tried endpoints that are no longer pickable (drained/removed): the retry then
# avoids only `tried` and goes to an endpoint that failed a moment ago
async def test_a_retry_after_a_drain_avoids_an_endpoint_that_just_failed() -> None:
    # pool order A, C, B: after A is drained, C comes first and has just failed
    lb = lbclient.Balancer(
        [A, C, B],
        strategy=InOrder(),
        retry=lbclient.Retry(attempts=2, backoff=0.001, max_backoff=0.001),
    )
    running = asyncio.Event()
    sent: list[str] = []

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        sent.append(ep.url)
        if ep.url == A:
            running.set()
            await asyncio.sleep(0.01)
            raise ConnectionError("A is going away")
        return ep.url

    task = asyncio.create_task(work())
    await running.wait()
    lb.drain(A)  # a spot interruption notice
    with pytest.raises(ConnectionError):  # meanwhile C fails for another caller
        async with lb.pick() as ep:
            assert ep.url == C
            raise ConnectionError("C failed")
    assert await task == B, f"the retry went to {sent[1:]}"
    assert_accounting(lb)


# -- admission (work in progress at review time) -----------------------------------------------


# Was a defect: PickedEndpoint.__aenter__ releases its admission permit only on
# NoEndpointAvailable: any other error from pool.acquire (a strategy bug, BalancerClosed)
# leaks the permit and shrinks the concurrency limit for good
async def test_lb_pick_gives_its_admission_permit_back_when_picking_fails() -> None:
    admission_cls = getattr(lbclient, "Admission", None)
    if admission_cls is None:
        pytest.skip("no lbclient.Admission in this tree")

    class Broken(InOrder):
        broken = True

        def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _InOrderPicker:
            strategy = self

            class Picker(_InOrderPicker):
                def pick(
                    self, call: object, exclude: Collection[EndpointState] | None
                ) -> EndpointState | None:
                    if strategy.broken:
                        raise RuntimeError("picker bug")
                    return super().pick(call, exclude)

            return Picker(states)

    strategy = Broken()
    lb = lbclient.Balancer(
        [A, B], strategy=strategy, admission=admission_cls(limit=1, max_wait=0.1)
    )
    with pytest.raises(RuntimeError):
        async with lb.pick():
            pass
    strategy.broken = False
    async with lb.pick() as ep:  # the only slot must be free again
        assert ep.url == A
    assert_accounting(lb)


# == what held ==================================================================================

# -- every ordering of win / fail / cancel in a hedge race --------------------------------------


async def _hedge_race(order: tuple[str, ...], spins: int, swallow: bool, deadline: bool) -> None:
    """A primary on A and a backup on B, each waiting on a future the test resolves in
    ``order`` ("P"/"B": succeed, "pE"/"bE": fail, "C": the caller cancels), ``spins``
    loop iterations apart (0: in the same iteration)."""
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=lbclient.Hedge(delay=0.001))
    loop = asyncio.get_running_loop()
    futs: dict[str, asyncio.Future[str]] = {A: loop.create_future(), B: loop.create_future()}
    started = {A: asyncio.Event(), B: asyncio.Event()}

    async def work(ep: lbclient.Endpoint) -> str:
        started[ep.url].set()
        try:
            return await futs[ep.url]
        except asyncio.CancelledError:
            if swallow:
                return "swallowed"
            raise

    route = lb.route(timeout=5.0)(work) if deadline else lb.route(work)
    caller = asyncio.create_task(route())
    await started[B].wait()

    def act(what: str) -> None:
        if what == "C":
            caller.cancel()
            return
        fut = futs[A if what[0] in "Pp" else B]
        if not fut.done():
            if what.endswith("E"):
                fut.set_exception(ConnectionError(what))
            else:
                fut.set_result(what)

    for i, what in enumerate(order):
        act(what)
        if i == 0:
            await settle_loop(spins)
    done, _ = await asyncio.wait([caller], timeout=1.0)
    assert done, f"{order}/{spins}: the call hangs"
    label = f"{order} spins={spins} swallow={swallow} deadline={deadline}"
    if not caller.cancelled():
        exc = caller.exception()
        if exc is None:
            if "C" not in order or not swallow:
                assert caller.result() in ("P", "B", "swallowed"), label
        else:
            assert isinstance(exc, ConnectionError | lbclient.AttemptsExhausted), label
    else:
        assert "C" in order, label
    await settle_loop()
    assert pending_tasks() == [], label
    assert_accounting(lb)
    for fut in futs.values():
        fut.cancel()


ORDERS = [
    ("B", "C"),
    ("C", "B"),
    ("P", "B"),
    ("B", "P"),
    ("P", "C"),
    ("C", "P"),
    ("pE", "B"),
    ("B", "pE"),
    ("pE", "C"),
    ("bE", "C"),
    ("C", "bE"),
    ("B", "C", "P"),
    ("pE", "bE"),
    ("bE", "pE"),
]


@pytest.mark.parametrize("deadline", [False, True], ids=["no-deadline", "deadline"])
async def test_every_ordering_of_win_fail_and_cancel_in_a_hedge_race(deadline: bool) -> None:
    for order in ORDERS:
        for spins in range(3):
            for swallow in (False, True):
                await _hedge_race(order, spins, swallow, deadline)


async def test_every_ordering_of_first_chunks_errors_and_cancels_in_a_stream_race() -> None:
    for order in [*ORDERS, ("Pe", "B"), ("B", "Pe")]:
        for spins in range(3):
            for mode in ("plain", "break"):
                lb = lbclient.Balancer(
                    [A, B],
                    strategy=InOrder(),
                    hedge=lbclient.Hedge(delay=0.001),
                    retry=lbclient.Retry(attempts=2, backoff=0.001, max_backoff=0.001),
                )
                loop = asyncio.get_running_loop()
                futs: dict[str, asyncio.Future[str]] = {
                    A: loop.create_future(),
                    B: loop.create_future(),
                }
                started = {A: asyncio.Event(), B: asyncio.Event()}

                @lb.route
                async def gen(
                    ep: lbclient.Endpoint,
                    futs: dict[str, asyncio.Future[str]] = futs,
                    started: dict[str, asyncio.Event] = started,
                ) -> AsyncIterator[str]:
                    started[ep.url].set()
                    if await futs[ep.url] == "empty":
                        return
                    for i in range(3):
                        yield f"{ep.url}#{i}"
                        await asyncio.sleep(0)

                got: list[str] = []

                async def consume(
                    gen: Callable[[], AsyncIterator[str]] = gen,
                    got: list[str] = got,
                    mode: str = mode,
                ) -> None:
                    async with contextlib.aclosing(gen()) as chunks:  # type: ignore[type-var]
                        async for chunk in chunks:
                            got.append(chunk)
                            if mode == "break":
                                break

                caller = asyncio.create_task(consume())
                await started[B].wait()
                for i, what in enumerate(order):
                    if what == "C":
                        caller.cancel()
                    else:
                        fut = futs[A if what[0] in "Pp" else B]
                        if not fut.done():
                            if what.endswith("E"):
                                fut.set_exception(ConnectionError(what))
                            else:
                                fut.set_result("empty" if what == "Pe" else what)
                    if i == 0:
                        await settle_loop(spins)
                label = f"{order} spins={spins} {mode}"
                done, _ = await asyncio.wait([caller], timeout=1.0)
                assert done, f"{label}: the stream hangs"
                assert len({chunk.split("#")[0] for chunk in got}) <= 1, f"{label}: {got}"
                await settle_loop()
                assert pending_tasks() == [], label
                assert_accounting(lb)
                for fut in futs.values():
                    fut.cancel()


# -- thousands of concurrent calls: random faults, cancellations, membership changes -------------


async def test_chaos_of_concurrent_calls_keeps_every_invariant() -> None:
    rng = random.Random(7)
    lb = lbclient.Balancer(
        URLS[:4],
        retry=lbclient.Retry(attempts=3, backoff=0.001, max_backoff=0.004),
        breaker=lbclient.Breaker(failures=3, cooldown=0.02),
        hedge=lbclient.Hedge(delay=0.004, max_hedges=2, max_extra=0.5),
        rng=7,
    )

    async def behave(stream: bool = False) -> str:
        r = rng.random()
        await asyncio.sleep(rng.choice([0.0, 0.001, 0.003, 0.008]))
        if r < 0.5:
            return "ok"
        if r < 0.6:
            raise ConnectionError("refused")
        if r < 0.65:
            raise HTTPError(503, {"Retry-After": "0.01"})
        if r < 0.7:
            raise HTTPError(429, {"retry-after-ms": "5"})
        if r < 0.75:
            raise ValueError("the caller's own bug")
        if r < 0.8:
            raise HTTPError(400)
        if r < 0.83 and not stream:  # (a stream that does is pinned above as a defect)
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                return "swallowed"  # a function that swallows its cancellation
        await asyncio.sleep(0.1)
        return "slow"

    @lb.route
    async def hedged(ep: lbclient.Endpoint) -> str:
        return await behave()

    @lb.route(timeout=0.04, key=lambda: rng.random())
    async def deadline(ep: lbclient.Endpoint) -> str:
        return await behave()

    @lb.route(timeout=0.04)
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[int]:
        if rng.random() < 0.1:
            return
        await behave(stream=True)
        for i in range(rng.randint(0, 20)):
            yield i
            if rng.random() < 0.03:
                raise ConnectionError("mid-stream")
            await asyncio.sleep(rng.choice([0.0, 0.0, 0.001]))

    async def stream() -> int:
        n = 0
        async with contextlib.aclosing(gen()) as chunks:
            async for _ in chunks:
                n += 1
                if rng.random() < 0.05:
                    break
        return n

    async def pick() -> str:
        async with lb.pick(timeout=rng.choice([None, 0.04])):
            return await behave()

    async def call() -> str:
        async def fn(ep: lbclient.Endpoint) -> str:
            return await behave()

        return await lb.call(fn)

    kinds: list[Callable[[], Coroutine[Any, Any, object]]] = [
        hedged,
        deadline,
        stream,
        pick,
        call,
    ]
    tasks: list[asyncio.Task[object]] = []
    for _ in range(2000):
        tasks.append(asyncio.create_task(rng.choice(kinds)()))
        if rng.random() < 0.3:
            await asyncio.sleep(0)
        if rng.random() < 0.05:
            await asyncio.sleep(0.001)
        if rng.random() < 0.1:
            rng.choice(tasks).cancel()
        if rng.random() < 0.01:
            url = rng.choice(URLS[:4])
            action = rng.choice(["drain", "undrain", "down", "up", "replace"])
            if action == "drain":
                lb.drain(url)
            elif action == "undrain":
                lb.undrain(url)
            elif action in ("down", "up"):
                lb.set_health(url, action == "up")
            else:
                lb.remove(url)
                lb.add(url)
    done, _ = await asyncio.wait(tasks, timeout=20)
    assert len(done) == len(tasks), "calls hang"
    allowed = (
        ConnectionError,
        HTTPError,
        ValueError,
        lbclient.AttemptsExhausted,
        lbclient.DeadlineExceeded,
        lbclient.NoEndpointAvailable,
    )
    for t in tasks:
        if t.cancelled():
            continue
        exc = t.exception()
        assert exc is None or isinstance(exc, allowed), repr(exc)
        if isinstance(exc, lbclient.AttemptsExhausted | lbclient.DeadlineExceeded):
            assert str(exc)  # says what was tried (or that nothing finished)
    await asyncio.sleep(0.15)  # backups of "slow" attempts that lost their race finish
    assert pending_tasks() == []
    assert_accounting(lb)
    st = lb.stats()
    assert st.hedges_sent > 0 and st.retries > 0 and st.calls_failed > 0
    await lb.aclose()


# -- two event loops, calls in flight when the first one ends -----------------------------------


def test_calls_in_flight_when_a_loop_ends_release_their_slots_and_the_next_loop_works() -> None:
    lb = lbclient.Balancer(
        URLS[:3],
        retry=lbclient.Retry(attempts=2, backoff=0.001),
        hedge=lbclient.Hedge(delay=0.01),
        breaker=lbclient.Breaker(failures=2),
        rng=1,
    )

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        await asyncio.sleep(0.05)
        return ep.url

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[int]:
        await asyncio.sleep(0.01)
        for i in range(100):
            yield i
            await asyncio.sleep(0.01)

    held: list[object] = []

    async def first() -> int:
        for _ in range(3):
            asyncio.create_task(work())  # noqa: RUF006 -- left running on purpose
        chunks = gen()
        held.append(chunks)  # a stream suspended mid-way when the loop ends
        await chunks.__anext__()

        async def block() -> None:
            async with lb.pick():
                await asyncio.sleep(1)

        asyncio.create_task(block())  # noqa: RUF006
        await asyncio.sleep(0.02)  # backups sent, everything in flight
        return lb.stats().in_flight

    assert asyncio.run(first()) >= 5  # 3 calls, their backups, a stream, a block
    assert_accounting(lb)

    async def second() -> None:
        before = lb.stats().hedges_sent
        answers = await asyncio.gather(*(work() for _ in range(10)))
        assert len(answers) == 10
        assert [x async for x in gen()][:3] == [0, 1, 2]
        assert lb.stats().hedges_sent > before  # the hedge timer lives in this loop now
        await settle_loop()
        assert pending_tasks() == []
        assert_accounting(lb)
        await lb.aclose()

    asyncio.run(second())
    assert_accounting(lb)


# -- listeners that raise (and re-enter the balancer) on every kind of event ----------------------


async def test_listeners_that_raise_on_every_event_never_fail_a_call() -> None:
    seen: set[str] = set()
    box: list[lbclient.Balancer] = []

    def listener(event: object) -> None:
        seen.add(type(event).__name__)
        box[0].stats()  # re-enters the pool (may rebuild its snapshot) mid-operation
        raise RuntimeError("listener bug")

    lb = lbclient.Balancer(
        URLS[:3],
        on_event=listener,
        retry=lbclient.Retry(attempts=3, backoff=0.001, max_backoff=0.001),
        breaker=lbclient.Breaker(failures=1, cooldown=0.01),
        hedge=lbclient.Hedge(delay=0.005),
        rng=3,
    )
    box.append(lb)

    @lb.route
    async def work(ep: lbclient.Endpoint, i: int) -> str:
        r = i % 5
        await asyncio.sleep(0.001 if r else 0.01)
        if r == 1:
            raise ConnectionError("refused")
        if r == 2:
            raise HTTPError(503, {"Retry-After": "0.002"})
        return ep.url

    log = logging.getLogger("lbclient")
    level = log.level
    log.setLevel(logging.CRITICAL)  # every listener failure is logged with its traceback
    try:
        results = await asyncio.gather(*(work(i) for i in range(300)), return_exceptions=True)
        lb.drain(A)
        lb.undrain(A)
        lb.remove(B)
        lb.add(B)
        results += await asyncio.gather(*(work(i) for i in range(300)), return_exceptions=True)
    finally:
        log.setLevel(level)
    assert {"AttemptEvent", "BreakerEvent", "CooldownEvent", "HedgeEvent"} <= seen
    assert {"MembershipEvent", "PanicEvent", "RetryEvent"} <= seen
    for r in results:
        assert isinstance(r, str | lbclient.AttemptsExhausted), repr(r)
    assert any(isinstance(r, str) for r in results)
    await settle_loop()
    assert_accounting(lb)


# -- the half-open probe hand-over on the fast path, under load ------------------------------------


@pytest.mark.parametrize("retry", [False, True], ids=["fast", "fast_then_retry"])
async def test_probe_hand_over_under_load_and_a_breaker_flip_during_the_probe(
    retry: bool,
) -> None:
    clock = FakeClock(auto_advance=True)
    lb = lbclient.Balancer(
        URLS[:3],
        clock=clock,
        breaker=lbclient.Breaker(failures=1, cooldown=1.0, jitter=0.0),
        retry=lbclient.Retry(attempts=2, backoff=0.001) if retry else None,
        rng=1,
    )
    hits: list[str] = []
    gate = asyncio.Event()

    @lb.route
    async def work(ep: lbclient.Endpoint, fail_a: bool = True) -> str:
        hits.append(ep.url)
        await gate.wait()
        if ep.url == A and fail_a:
            raise ConnectionError("A is still down")
        return ep.url

    lb.set_health(A, False)
    lb.set_health(A, True)  # A is let through to half-open: the next pick is its probe
    first = [asyncio.create_task(work()) for _ in range(50)]
    await settle_loop(1)
    assert hits.count(A) == 1  # exactly one probe among 50 concurrent fast-path calls
    lb.set_health(A, False)  # the breaker flips while that probe is out...
    lb.set_health(A, True)  # ...and a new half-open episode begins
    second = [asyncio.create_task(work(False)) for _ in range(10)]
    await settle_loop(1)
    assert hits.count(A) == 2  # one probe for the new episode
    gate.set()
    results = await asyncio.gather(*first, *second, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    # the stale probe fails (surfacing, or retried elsewhere); it gives no verdict
    assert len(errors) == (0 if retry else 1)
    st = lb.stats()
    ea = st.endpoint(A)
    assert (ea.breaker, ea.trips) == ("closed", 2)  # closed by the current episode's probe
    assert lb._pool.members[A].breaker.probes_in_flight == 0  # type: ignore[union-attr]
    assert_accounting(lb)


# -- Retry-After on every endpoint, plus a deadline ------------------------------------------------


@pytest.mark.parametrize("retry_after", [0.4, 5.0])
@pytest.mark.parametrize("stream", [False, True], ids=["call", "stream"])
async def test_retry_after_everywhere_waits_only_within_the_deadline(
    retry_after: float, stream: bool
) -> None:
    clock = FakeClock(auto_advance=True)
    lb = lbclient.Balancer(
        [A, B],
        clock=clock,
        retry=lbclient.Retry(attempts=10, backoff=0.001, max_backoff=0.001, timeout=1.0),
        rng=1,
    )
    sent: list[float] = []
    headers = {"Retry-After": str(retry_after)}

    @lb.route
    async def work(ep: lbclient.Endpoint) -> str:
        sent.append(clock.now())
        raise HTTPError(503, headers)

    @lb.route
    async def gen(ep: lbclient.Endpoint) -> AsyncIterator[str]:
        sent.append(clock.now())
        raise HTTPError(503, headers)
        yield "never"

    async def consume() -> list[str]:
        return [chunk async for chunk in gen()]

    with pytest.raises(lbclient.AttemptsExhausted) as info:
        await (consume() if stream else work())
    assert len(info.value.attempts) == len(sent)
    assert all(isinstance(a.error, HTTPError) for a in info.value.attempts)
    assert "cooling down" in str(info.value)
    assert clock.now() < 1.0  # never slept past the deadline
    assert all(t < 1.0 for t in sent)
    assert len(sent) == (6 if retry_after < 1 else 2)  # waited for the cooldowns it could
    assert dict(lb.stats().failed_by) == {"no endpoint": 1}
    assert_accounting(lb)


# -- lb.pick() misuse ------------------------------------------------------------------------------


async def test_lb_pick_misuse_is_refused_without_leaking_a_slot() -> None:
    lb = lbclient.Balancer([A, B], strategy=InOrder(), breaker=lbclient.Breaker(failures=1))
    picked = lb.pick()
    async with picked:
        pass
    with pytest.raises(RuntimeError, match="already in use"):
        async with picked:  # reused
            pass
    nested = lb.pick()
    with pytest.raises(RuntimeError, match="already in use"):
        async with nested, nested:  # entered twice
            pass
    # a block that swallows the deadline's cancel and returns normally
    async with lb.pick(timeout=0.01):
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.1)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    # a block that turns the deadline's cancel into an error
    with pytest.raises(ConnectionError):
        async with lb.pick(timeout=0.01):
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                raise ConnectionError("aborted") from None
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    st = lb.stats()
    assert st.calls == 4
    assert_accounting(lb)


# -- real HTTP: chaos over loopback replicas -------------------------------------------------------


async def test_chaos_over_loopback_http_every_abandoned_attempt_is_aborted_on_the_wire(
    fleet_factory: Callable[..., Coroutine[Any, Any, ReplicaFleet]],
) -> None:
    from lbclient.http import ChatClient

    fleet = await fleet_factory(
        [
            ReplicaConfig(base_latency=0.01, straggler_rate=0.1, straggler_factor=20),
            ReplicaConfig(base_latency=0.01, error_rate=0.3),
            ReplicaConfig(base_latency=0.01, rate_limit_rate=0.3, retry_after=0.05),
            ReplicaConfig(base_latency=0.01, error_after_tokens=2),
        ],
        seed=11,
    )
    lb = lbclient.Balancer(
        fleet.urls,
        retry=lbclient.Retry(attempts=3, backoff=0.005, max_backoff=0.01, timeout=1.0),
        breaker=lbclient.Breaker(failures=3, cooldown=0.2),
        hedge=lbclient.Hedge(delay=0.03, max_hedges=2, max_extra=0.5),
        rng=11,
    )
    rng = random.Random(11)
    messages = [{"role": "user", "content": "hi"}]
    async with ChatClient(lb, timeout=5.0) as chat:

        async def create() -> object:
            return await chat.text(messages=messages)

        async def stream() -> object:
            async with contextlib.aclosing(chat.stream(messages=messages)) as tokens:
                return [t async for t in tokens]

        tasks = []
        for i in range(300):
            tasks.append(asyncio.create_task(rng.choice([create, stream])()))
            if rng.random() < 0.5:
                await asyncio.sleep(0.001)
            if rng.random() < 0.2:
                victim = rng.choice(tasks)
                asyncio.get_running_loop().call_later(rng.random() * 0.05, victim.cancel)
            if i == 100:
                await fleet[1].down()
            if i == 200:
                await fleet[1].up()
        done, _ = await asyncio.wait(tasks, timeout=20)
        assert len(done) == len(tasks), "calls hang"
        ok = sum(1 for t in tasks if not t.cancelled() and t.exception() is None)
        assert ok > 100

        def fleet_idle() -> bool:
            t = fleet.totals()
            ended = t.served + t.errors + t.rejected_429 + t.cancelled + t.dropped
            return t.in_flight == 0 and t.received == ended

        for _ in range(500):
            if fleet_idle():
                break
            await asyncio.sleep(0.01)
        assert fleet_idle(), fleet.totals()  # nothing left running server-side
        assert_accounting(lb)
        st = lb.stats()
        assert st.hedges_sent > 0 and st.retries > 0
    await lb.aclose()
    await settle_loop()
    assert pending_tasks() == []
