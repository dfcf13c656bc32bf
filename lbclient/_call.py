"""The call engine: one attempt on the fast path, retries and the deadline off it.

The first attempt touches no retry machinery: pick, await, record.  Only a failure
enters :func:`_retrying`, which asks the pure :meth:`Retry.decide` what to do next
(give up / sleep this long / try another endpoint), checks the shared budget, and
drives it.  ``asyncio.CancelledError`` is never retried and never counted as a failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import (
    Attempt,
    AttemptsExhausted,
    BalancerClosed,
    DeadlineExceeded,
    NoEndpointAvailable,
)
from ._state import EndpointState

if TYPE_CHECKING:
    from ._balancer import Balancer

R = TypeVar("R")
Fn = Callable[..., Awaitable[R]]

_NOT_RETRYABLE = "not retryable"


async def run(
    lb: Balancer,
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: object,
    attempts: list[Attempt] | None = None,
    deadline: float | None = None,
    scope: asyncio.Timeout | None = None,
) -> R:
    """Run ``fn(endpoint, *args, **kwargs)`` through the balancer.

    ``attempts``/``deadline``/``scope`` come from :func:`run_with_deadline`: the list it
    reports in ``DeadlineExceeded``, the deadline and the ``asyncio.timeout`` scope.
    """
    if lb._closed:
        raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
    lb._calls += 1
    now = lb._now()
    budget = lb._budget
    if budget is not None:
        budget.deposit(now)
    try:
        s, probe = lb._acquire(key, None, now)
    except NoEndpointAvailable:
        lb._calls_failed += 1
        raise
    try:
        result = await fn(s.endpoint, *args, **kwargs)
    except Exception as exc:
        lb._failed(s, now, exc, probe)
        if attempts is None:
            attempts = []
        attempts.append(Attempt(endpoint=s.endpoint, error=exc, duration=lb._now() - now))
        if lb._retry is None:
            lb._calls_failed += 1
            raise
    except BaseException:
        if attempts is None:
            lb._cancelled(s, probe)
        else:
            _interrupted(lb, s, now, probe, scope, attempts)
        raise
    else:
        lb._succeeded(s, now, probe)
        return result
    return await _retrying(lb, fn, args, kwargs, key, attempts, {s}, now, deadline, scope)


async def run_with_deadline(
    lb: Balancer,
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: object,
    timeout: float,
) -> R:
    """:func:`run` under an overall deadline covering every attempt and backoff."""
    attempts: list[Attempt] = []
    deadline = lb._now() + timeout
    try:
        async with asyncio.timeout(timeout) as scope:
            return await run(lb, fn, args, kwargs, key, attempts, deadline, scope)
    except TimeoutError as exc:
        if scope.expired():
            lb._calls_failed += 1
            raise DeadlineExceeded(timeout, attempts) from (attempts[-1].error if attempts else exc)
        raise


def _interrupted(
    lb: Balancer,
    s: EndpointState,
    t0: float,
    probe: int,
    scope: asyncio.Timeout | None,
    attempts: list[Attempt],
) -> None:
    """An attempt was cancelled: by the call's own deadline (the endpoint was too slow,
    which counts against it, so a hung replica gets ejected) or by the caller."""
    if scope is not None and scope.expired():
        err = TimeoutError(f"attempt on {s.url} still running at the call's deadline")
        lb._failed(s, t0, err, probe)
        attempts.append(Attempt(endpoint=s.endpoint, error=err, duration=lb._now() - t0))
    else:
        lb._cancelled(s, probe)


_RECENT_FAILURE = 1.0  # seconds: a retry avoids endpoints that failed this recently


def _avoid(lb: Balancer, tried: set[EndpointState], now: float) -> set[EndpointState]:
    """What a retry should not go to: the endpoints this call tried, and -- while others
    remain -- those that failed for anyone in the last second.  When a replica crashes,
    the calls already in flight learn it first; the retry should not bet on a peer that
    is failing the same way."""
    avoid = set(tried)
    for s in lb._pickable:
        if now - s.last_failure < _RECENT_FAILURE:
            avoid.add(s)
    if len(avoid) >= len(lb._pickable):
        return tried
    return avoid


def _other_healthy(lb: Balancer, tried: set[EndpointState]) -> bool:
    """Is there an untried endpoint that is pickable on its own merit (not by panic)?"""
    for s in lb._pickable:
        if s in tried:
            continue
        b = s.breaker
        if b is None or b.state == "closed":
            return True
    return False


def next_retry(
    lb: Balancer,
    err: BaseException,
    attempts: list[Attempt],
    tried: set[EndpointState],
    started: float,
    deadline: float | None,
) -> float:
    """May this call try again after ``err``?  Returns the backoff (seconds) or raises.

    In order: the policy (classification, attempts, Retry-After vs deadline), panic mode
    (no healthy endpoint left to try), the budget.  A non-retryable error is raised as it
    is; every other refusal raises :class:`AttemptsExhausted` chained to ``err``.
    """
    retry = lb._retry
    assert retry is not None
    now = lb._now()
    decision = retry.decide(
        err,
        len(attempts),
        elapsed=now - started,
        deadline_left=None if deadline is None else deadline - now,
        rng=lb._rng,
    )
    if not decision.retry:
        lb._calls_failed += 1
        if decision.reason == _NOT_RETRYABLE:
            if len(attempts) > 1:
                err.add_note(
                    "lbclient: earlier attempts: " + "; ".join(str(a) for a in attempts[:-1])
                )
            raise err
        raise AttemptsExhausted(attempts, decision.reason) from err
    if lb._panic and not _other_healthy(lb, tried):
        # Every endpoint we could still try is ejected: retrying would only add load
        # to a fleet that is already failing (the retry storm budgets exist to stop).
        lb._calls_failed += 1
        raise AttemptsExhausted(
            attempts, "no healthy endpoint left to retry on (panic mode)"
        ) from err
    budget = lb._budget
    if budget is not None and not budget.try_withdraw():
        lb._retries_denied += 1
        lb._calls_failed += 1
        last = attempts[-1].endpoint
        denied = lb._members.get(last.url) if last is not None else None
        if denied is not None:
            denied.retries_denied += 1  # the failure that could not be retried
        raise AttemptsExhausted(attempts, "retry budget exhausted") from err
    return decision.delay


async def _retrying(
    lb: Balancer,
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: object,
    attempts: list[Attempt],
    tried: set[EndpointState],
    started: float,
    deadline: float | None,
    scope: asyncio.Timeout | None = None,
) -> R:
    err = attempts[-1].error
    while True:
        delay = next_retry(lb, err, attempts, tried, started, deadline)
        if delay > 0:
            await lb._clock.sleep(delay)
        now = lb._now()
        try:
            s, probe = lb._acquire(key, _avoid(lb, tried, now), now)
        except NoEndpointAvailable as exc:
            lb._calls_failed += 1
            raise AttemptsExhausted(attempts, f"no endpoint available to retry: {exc}") from err
        s.retries_sent += 1
        lb._retries += 1
        tried.add(s)
        try:
            result = await fn(s.endpoint, *args, **kwargs)
        except Exception as exc:
            lb._failed(s, now, exc, probe)
            attempts.append(Attempt(endpoint=s.endpoint, error=exc, duration=lb._now() - now))
            err = exc
            continue
        except BaseException:
            _interrupted(lb, s, now, probe, scope, attempts)
            raise
        lb._succeeded(s, now, probe)
        return result
