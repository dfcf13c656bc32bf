"""``@lb.route`` and ``lb.call``: the call path, chosen once at decoration time.

Every variant goes through the same pieces -- ``pool.acquire`` for a lease, one outcome
recorded on it (:mod:`lbclient.engine.attempt`), :func:`~lbclient.engine.retrying.run` for
anything beyond a single attempt -- but what a call does not need is not compiled in:

* **fast** -- no retry, no hedge, no key, no deadline (a breaker is fine): one coroutine
  frame, ``pool.acquire_fast`` and ``lease.ok``;
* **fast, then retry** -- a ``Retry`` without deadline, key or hedge: the first attempt is
  the fast one; only a failure builds the call's context and enters the retry loop;
* **full** -- a key, a deadline or hedging: a :class:`~lbclient.CallContext` from the
  start and :func:`~lbclient.engine.retrying.run`;
* **stream** -- an async generator: :mod:`lbclient.engine.streaming`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .._context import CallContext
from .._errors import BalancerClosed, ConfigError, NoEndpointAvailable
from ..pool.lease import Lease
from ..pool.pool import Handoff
from .attempt import record, settle
from .retrying import retry_from, run

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["check_async", "check_timeout", "make_route", "run_call"]


def check_timeout(value: object, name: str = "timeout") -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value > 0
        or value == float("inf")
    ):
        raise ConfigError(f"{name} must be a finite number of seconds > 0 or None, got {value!r}")
    return float(value)


def check_async(fn: object, where: str, *, streams: bool) -> None:
    """``fn`` must be an ``async def`` function (or an async generator, when ``streams``),
    or an object whose ``__call__`` is one; a plain function is refused here, at
    decoration, not at its first call."""
    if isinstance(fn, type) or not callable(fn):
        raise ConfigError(f"{where} needs an async function, got {fn!r}")
    if inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async generator objects are fine
    ):
        if not streams:
            raise ConfigError(
                f"{where} cannot stream: {fn!r} is an async generator -- decorate it with "
                "@lb.route to stream through the balancer"
            )
        return
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects are fine
    ):
        return
    raise ConfigError(
        f"{where} needs an 'async def' function{' (or async generator)' if streams else ''}, "
        f"got {fn!r}"
    )


def make_route(
    engine: Engine,
    fn: Callable[..., Any],
    *,
    key: Callable[..., object] | None,
    timeout: float | None,
    idle_timeout: float | None,
) -> Callable[..., Any]:
    """Wrap ``fn(endpoint, *args, **kwargs)`` so callers call ``wrapped(*args, **kwargs)``."""
    check_async(fn, "@lb.route", streams=True)
    if key is not None and (isinstance(key, type) or not callable(key)):
        raise ConfigError(f"route key must be a callable taking the call's arguments, got {key!r}")
    deadline = check_timeout(timeout)
    idle = check_timeout(idle_timeout, "idle_timeout")
    if deadline is None and engine.retry is not None:
        deadline = engine.retry.timeout
    if inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(
        getattr(fn, "__call__", None)  # noqa: B004
    ):
        from .streaming import make_stream_route

        return make_stream_route(engine, fn, key, deadline, idle)
    if idle is not None:
        raise ConfigError(
            f"idle_timeout applies to streaming routes (async generators) only; {fn!r} is a "
            "plain async function: use timeout="
        )
    if deadline is None:
        if engine.hedger is not None:
            return functools.wraps(fn)(_hedged(engine, fn, key))
        if key is None:
            if engine.retry is None:
                return functools.wraps(fn)(_fast(engine, fn))
            return functools.wraps(fn)(_fast_then_retry(engine, fn))
    return functools.wraps(fn)(_full(engine, fn, key, deadline))


def _fast(engine: Engine, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """One attempt, no context: the hot path.  Success is recorded by
    ``pool.succeeded`` (what ``Lease.ok`` calls); a failure or a cancel makes the lease
    then, and settles it like every other path."""
    pool = engine.pool
    acquire = pool.acquire_fast
    succeeded = pool.succeeded
    now = engine.now
    counters = engine.counters

    async def call(*args: Any, **kwargs: Any) -> Any:
        t0 = now()
        try:
            s = acquire(t0)
        except NoEndpointAvailable:
            counters.calls += 1
            counters.failed("no endpoint")
            raise
        except Handoff as h:  # a probe or panic pick: the full path records its token
            return await run_call(engine, fn, args, kwargs, CallContext(), h.lease)
        counters.calls += 1
        try:
            result = await fn(s.endpoint, *args, **kwargs)
        except BaseException as exc:
            settle(None, Lease(pool, s, t0, 0), exc, now())
            if isinstance(exc, Exception):
                counters.failed("error")
            raise
        succeeded(s, t0, now())
        return result

    return call


def _fast_then_retry(engine: Engine, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The fast first attempt; a failure enters the retry loop with a fresh context."""
    pool = engine.pool
    acquire = pool.acquire_fast
    succeeded = pool.succeeded
    now = engine.now
    counters = engine.counters
    budget = engine.budget
    assert budget is not None
    deposit = budget.deposit

    async def call(*args: Any, **kwargs: Any) -> Any:
        t0 = now()
        try:
            s = acquire(t0)
        except NoEndpointAvailable as exc:
            if exc.retry_after is None:
                counters.calls += 1
                counters.failed("no endpoint")
                raise
            # Every endpoint is cooling down after Retry-After: the full path waits for
            # the first one back, as the policy allows.
            return await run_call(engine, fn, args, kwargs, CallContext())
        except Handoff as h:  # a probe or panic pick: the full path records its token
            return await run_call(engine, fn, args, kwargs, CallContext(), h.lease)
        counters.calls += 1
        deposit(t0)
        try:
            result = await fn(s.endpoint, *args, **kwargs)
        except Exception as exc:
            t1 = now()
            lease = Lease(pool, s, t0, 0)
            lease.fail(exc, t1)
            ctx = CallContext(started=t0)
            ctx.sent = 1
            ctx.tried.add(s)
            record(ctx, lease, exc, t1)
            return await retry_from(engine, ctx, fn, args, kwargs, exc)
        except BaseException:
            Lease(pool, s, t0, 0).cancel()
            raise
        succeeded(s, t0, now())
        return result

    return call


def _hedged(
    engine: Engine, fn: Callable[..., Awaitable[Any]], key: Callable[..., object] | None
) -> Callable[..., Any]:
    """Hedging without a deadline: the first round straight into the race; only a
    failure enters the retry loop."""
    from .hedging import hedged_try

    pool = engine.pool
    now = engine.now
    counters = engine.counters
    budget = engine.budget

    async def call(*args: Any, **kwargs: Any) -> Any:
        if pool.closed:
            raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
        t0 = now()
        ctx = CallContext(key=key(*args, **kwargs) if key is not None else None, started=t0)
        counters.calls += 1
        if budget is not None:
            budget.deposit(t0)
        try:
            lease = pool.acquire(ctx, None, t0)
        except NoEndpointAvailable as exc:
            if exc.retry_after is None:
                counters.failed("no endpoint")
                raise
            return await run(engine, ctx, fn, args, kwargs)  # waits out the cooldowns
        try:
            return await hedged_try(engine, ctx, lease, fn, args, kwargs)
        except Exception as exc:
            return await retry_from(engine, ctx, fn, args, kwargs, exc)

    return call


def _full(
    engine: Engine,
    fn: Callable[..., Awaitable[Any]],
    key: Callable[..., object] | None,
    timeout: float | None,
) -> Callable[..., Any]:
    """A call context from the start: affinity key, deadline, hedging."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        k = key(*args, **kwargs) if key is not None else None
        return await run_call(engine, fn, args, kwargs, CallContext(key=k, timeout=timeout))

    return call


async def run_call(
    engine: Engine,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: CallContext,
    first: Lease | None = None,
) -> Any:
    """Start ``call`` (count it, feed the budget) and run it on the full path; ``first``
    is a lease already taken for its first attempt (a fast-path hand-over)."""
    if engine.pool.closed and first is None:
        raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
    t = first.t0 if first is not None else engine.now()
    call.started = t
    if call.timeout is not None:
        call.deadline = t + call.timeout
    engine.counters.calls += 1
    if engine.budget is not None:
        engine.budget.deposit(t)
    return await run(engine, call, fn, args, kwargs, first)
