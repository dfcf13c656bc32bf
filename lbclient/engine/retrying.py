"""The call loop: try (an attempt, or a hedged race of attempts), and on failure ask the
retry policy, the budget and the pool whether and when to try again.

:func:`run` is the one path of every call that is not on the plain fast path: a call with
a deadline, an affinity key, hedging, or after its first attempt failed.  Each round
acquires a lease -- avoiding the endpoints this call tried and those that failed for
anyone in the last second -- and runs the round's try.  After a failure,
:func:`next_retry` asks in order: the policy (classification, attempts left, backoff vs
deadline), panic mode (no healthy endpoint left to try), the budget; a refusal raises.
When every endpoint is cooling down after ``Retry-After``, the round waits for the first
to come back (if the policy allows that long) instead of failing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import AttemptsExhausted, DeadlineExceeded, NoEndpointAvailable
from ..observe.events import RetryEvent
from ..policies.classify import error_kind
from .attempt import settle, start

if TYPE_CHECKING:
    from .._context import CallContext
    from ..pool.lease import Lease
    from ..pool.state import EndpointState
    from .engine import Engine

__all__ = [
    "acquire",
    "acquire_once",
    "avoid",
    "converted_cancel",
    "next_retry",
    "rounds",
    "run",
    "wait_for_limits",
]

R = TypeVar("R")

RECENT_FAILURE = 1.0  # seconds: a retry avoids endpoints that failed this recently
_NOT_RETRYABLE = "not retryable"


def avoid(engine: Engine, call: CallContext, now: float) -> AbstractSet[EndpointState]:
    """What a retry should not go to: the endpoints this call tried, and -- while others
    remain -- those that failed for anyone in the last second.  When a replica crashes,
    the calls already in flight learn it first; the retry should not bet on a peer that
    is failing the same way."""
    return engine.pool.widen(call.tried, lambda s: now - s.last_failure < RECENT_FAILURE)


async def acquire(engine: Engine, call: CallContext, err: BaseException | None) -> Lease:
    """A lease for the call's next round (``err``: the error that ended the last one).

    Waits while every endpoint is cooling down after ``Retry-After`` (the call's
    policy permitting), and -- under admission -- while every endpoint it may use is
    at its limits; otherwise a failure to pick ends the call."""
    pool = engine.pool
    while True:
        now = engine.now()
        try:
            return pool.acquire(call, avoid(engine, call, now) if call.tried else None, now)
        except NoEndpointAvailable as exc:
            if exc.reason == "limits" and engine.gate is not None:
                await wait_for_limits(engine, call, exc, now)
                continue
            wait = _cooling_wait(engine, call, exc, now)
            if wait is None:
                engine.counters.failed("no endpoint")
                if err is None:
                    raise
                raise AttemptsExhausted(
                    call.attempts, f"no endpoint available to retry: {exc}"
                ) from err
        await engine.clock.sleep(wait)


async def wait_for_limits(
    engine: Engine, call: CallContext, exc: NoEndpointAvailable, now: float
) -> None:
    """Every endpoint ``call`` may use is at its limits and the balancer has admission:
    wait for a slot -- woken when an attempt on a limited endpoint ends, or when the
    first window frees (``exc.retry_after``) -- for up to the admission's ``max_wait``
    (or the call's deadline) in all; past that the call is shed (:class:`Overloaded`,
    reason ``"limits"``)."""
    gate = engine.gate
    assert gate is not None
    until = call.limit_until
    if until is None:
        budget = gate.policy.max_wait
        left = call.left(now)
        if left is not None and left < budget:
            budget = left
        until = call.limit_until = now + budget
    left = until - now
    if left <= 0:
        engine.counters.failed("shed: limits")
        raise gate.shed(
            "limits",
            call.tenant,
            now,
            f"no endpoint under its limits within the wait allowed ({exc})",
            retry_after=exc.retry_after,
        ) from exc
    wait = left if exc.retry_after is None else min(left, max(exc.retry_after, 0.001))
    await engine.pool.wait_capacity(wait)


async def acquire_once(engine: Engine, call: CallContext) -> Lease:
    """A lease for a single attempt (``lb.pick()``): under admission, wait while every
    endpoint is at its limits; any other failure to pick is raised."""
    while True:
        now = engine.now()
        try:
            return engine.pool.acquire(call, None, now)
        except NoEndpointAvailable as exc:
            if exc.reason != "limits" or engine.gate is None:
                raise
            await wait_for_limits(engine, call, exc, now)


def _cooling_wait(
    engine: Engine, call: CallContext, exc: NoEndpointAvailable, now: float
) -> float | None:
    wait = exc.retry_after
    retry = engine.retry
    if exc.reason != "cooling" or wait is None or retry is None or not retry.respect_retry_after:
        return None
    if wait > retry.max_retry_after:
        return None
    left = call.left(now)
    if left is not None and wait >= left:
        return None
    return max(wait, 0.001)


def next_retry(engine: Engine, call: CallContext, err: BaseException) -> float:
    """May this call try again after ``err``?  Returns the backoff (seconds) or raises.

    A non-retryable error (or any error without a retry policy, after one attempt) is
    raised as it is; every other refusal raises :class:`AttemptsExhausted` chained to
    ``err``."""
    retry = engine.retry
    attempts = call.attempts
    last = attempts[-1].endpoint if attempts else None
    url = last.url if last is not None else None
    now = engine.now()
    if retry is None:
        _give_up(engine, call, url, "error" if len(attempts) <= 1 else "attempts exhausted", now)
        if len(attempts) > 1:
            raise AttemptsExhausted(attempts, "every attempt failed") from err
        raise err
    decision = retry.decide(
        err,
        len(attempts),
        elapsed=now - call.started,
        deadline_left=call.left(now),
        rng=engine.rng,
    )
    if not decision.retry:
        if decision.reason == _NOT_RETRYABLE:
            _give_up(engine, call, url, "error", now, decision.reason)
            if len(attempts) > 1:
                err.add_note(
                    "lbclient: earlier attempts: " + "; ".join(str(a) for a in attempts[:-1])
                )
            raise err
        _give_up(engine, call, url, decision.reason, now)
        raise AttemptsExhausted(attempts, decision.reason) from err
    pool = engine.pool
    if pool.panic and not _other_healthy(engine, call):
        # Every endpoint we could still try is ejected: retrying would only add load to a
        # fleet that is already failing (the retry storm budgets exist to stop).
        _give_up(engine, call, url, "panic", now)
        raise AttemptsExhausted(
            attempts, "no healthy endpoint left to retry on (panic mode)"
        ) from err
    budget = engine.budget
    if budget is not None and not budget.try_withdraw(now):
        engine.counters.retries_denied += 1
        if url is not None:
            pool.retry_denied(url)  # the failure here could not be retried
        _give_up(engine, call, url, "retry budget exhausted", now)
        raise AttemptsExhausted(attempts, "retry budget exhausted") from err
    if engine.observer.wants(logging.DEBUG):
        engine.observer.emit(
            RetryEvent(
                url=url,
                retry=True,
                reason="retry",
                delay=decision.delay,
                attempt=len(attempts),
                at=now,
            )
        )
    return decision.delay


def _give_up(
    engine: Engine,
    call: CallContext,
    url: str | None,
    reason: str,
    now: float,
    event_reason: str | None = None,
) -> None:
    engine.counters.failed(reason)
    why = event_reason or reason
    level = logging.WARNING if why == "retry budget exhausted" else logging.DEBUG
    if engine.observer.wants(level):
        engine.observer.emit(
            RetryEvent(
                url=url, retry=False, reason=why, delay=0.0, attempt=len(call.attempts), at=now
            )
        )


def _other_healthy(engine: Engine, call: CallContext) -> bool:
    """Is there an untried endpoint that is pickable on its own merit (not by panic),
    and that the call may go to?"""
    pool = engine.pool
    for s in pool.pickable:
        if s in call.tried or pool.refuses(s, call, call.tokens):
            continue
        b = s.breaker
        if b is None or b.state == "closed":
            return True
    return False


def counted_retry(engine: Engine, lease: Lease, err: BaseException) -> None:
    """A retry is being sent under ``lease`` after ``err``."""
    lease.sent_as_retry()
    engine.counters.retried(error_kind(err))


async def run(
    engine: Engine,
    call: CallContext,
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    first: Lease | None = None,
) -> R:
    """Run ``fn(endpoint, *args, **kwargs)`` for ``call``: rounds of tries under the
    call's deadline, retried per policy, hedged when the balancer hedges (``first``: a
    lease already taken for the first attempt)."""
    if call.timeout is None:
        return await rounds(engine, call, fn, args, kwargs, None, first)
    # The deadline runs from the call's start: time spent queueing for admission counts.
    left = call.timeout if call.deadline is None else call.deadline - engine.now()
    if left <= 0:
        if first is not None:
            first.cancel()
        engine.counters.failed("deadline")
        raise DeadlineExceeded(call.timeout, call.attempts)
    try:
        async with asyncio.timeout(left) as scope:
            call.scope = scope
            return await rounds(engine, call, fn, args, kwargs, None, first)
    except TimeoutError as exc:
        if scope.expired():
            engine.counters.failed("deadline")
            attempts = call.attempts
            raise DeadlineExceeded(call.timeout, attempts) from (
                attempts[-1].error if attempts else exc
            )
        raise


def converted_cancel(call: CallContext | None, lease: Lease, err: Exception, t: float) -> None:
    """The attempt under ``lease`` raised ``err`` while the caller's task was being
    cancelled: the wrapped function turned the cancel into its own error (an HTTP layer
    mapping an aborted request, say).  Settle it as the cancel it was (cut, if the call's
    deadline sent it) and raise ``CancelledError``: a cancelled call must not retry,
    hedge or wait on."""
    settle(call, lease, asyncio.CancelledError(), t)
    raise asyncio.CancelledError(f"cancelled (the attempt then raised {err!r})") from err


# The fast paths check ``current_task().cancelling()`` only when an attempt failed (free
# on success): a task whose earlier cancel was swallowed without ``uncancel()`` -- which
# asyncio.timeout and TaskGroup do not support either -- then gets no retry.  The other
# paths compare with the count when the call started.


async def rounds(
    engine: Engine,
    call: CallContext,
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    err: Exception | None,
    first: Lease | None = None,
) -> R:
    """The rounds of one call.  A plain attempt runs inline here (one coroutine frame for
    the whole call); a hedged round is :func:`~lbclient.engine.hedging.hedged_try`."""
    hedger = engine.hedger
    if hedger is not None:
        from .hedging import hedged_try
    pool = engine.pool
    now = engine.now
    task = asyncio.current_task()
    base = task.cancelling() if task is not None else 0
    while True:
        if err is not None:
            delay = next_retry(engine, call, err)
            if delay > 0:
                await engine.clock.sleep(delay)
        if first is not None:
            lease, first = first, None
        else:
            t = now()
            try:
                lease = pool.acquire(call, avoid(engine, call, t) if call.tried else None, t)
            except NoEndpointAvailable:
                lease = await acquire(engine, call, err)  # waits out cooldowns, or raises
        if err is not None:
            counted_retry(engine, lease, err)
        if hedger is not None:
            try:
                return await hedged_try(engine, call, lease, fn, args, kwargs)
            except Exception as exc:
                err = exc
                continue
        start(call, lease)
        try:
            result = await fn(lease.endpoint, *args, **kwargs)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                settle(call, lease, exc, now())
                raise
            if task is not None and task.cancelling() > base:
                converted_cancel(call, lease, exc, now())
            settle(call, lease, exc, now())
            err = exc
            continue
        t = now()
        lease.ok(t)
        call.sample = t - lease.t0
        call.served_by = lease.state.url
        return result
