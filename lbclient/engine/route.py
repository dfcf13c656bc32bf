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
from asyncio import current_task
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from .._context import CURRENT, CallContext
from .._endpoint import Endpoint
from .._errors import BalancerClosed, ConfigError, NoEndpointAvailable, Overloaded
from .._numbers import is_int, is_number
from ..policies.classify import status_of
from ..pool.lease import Lease
from ..pool.pool import Handoff
from .attempt import settle
from .retrying import converted_cancel, rounds, run

if TYPE_CHECKING:
    from ..admission.gate import Permit
    from .engine import Engine
    from .metered import Meter

R = TypeVar("R")
T = TypeVar("T")
P = ParamSpec("P")


class RouteDecorator(Protocol):
    """What ``lb.route(key=..., timeout=...)`` returns: a decorator."""

    @overload
    def __call__(
        self, fn: Callable[Concatenate[Endpoint, P], Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(
        self, fn: Callable[Concatenate[Endpoint, P], AsyncIterator[T]], /
    ) -> Callable[P, AsyncGenerator[T, None]]: ...


__all__ = [
    "Extract",
    "RouteDecorator",
    "admit",
    "check_async",
    "check_eligible",
    "check_prefix",
    "check_priority",
    "check_timeout",
    "check_tokens",
    "error_type",
    "make_route",
    "release",
    "run_call",
]


def check_timeout(value: object, name: str = "timeout") -> float | None:
    if value is None:
        return None
    if not is_number(value) or value <= 0:
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


def _callable_or_none(value: object, name: str) -> Callable[..., Any] | None:
    if value is not None and (isinstance(value, type) or not callable(value)):
        raise ConfigError(
            f"route {name} must be a callable taking the call's arguments, got {value!r}"
        )
    return value


class Extract:
    """What a route computes from each call's arguments: its affinity key, tenant,
    estimated tokens, priority and prompt prefix, and which endpoints it may go to (each
    a callable, or absent)."""

    __slots__ = ("eligible", "key", "prefix", "priority", "tenant", "tokens")

    def __init__(
        self,
        key: Callable[..., object] | None,
        tenant: Callable[..., object] | None,
        tokens: Callable[..., object] | None,
        priority: int | Callable[..., object] | None,
        prefix: Callable[..., object] | None = None,
        eligible: Callable[..., object] | None = None,
    ) -> None:
        self.key = _callable_or_none(key, "key")
        self.prefix = _callable_or_none(prefix, "prefix")
        self.tenant = _callable_or_none(tenant, "tenant")
        self.tokens = _callable_or_none(tokens, "tokens")
        self.eligible = _callable_or_none(eligible, "eligible")
        if priority is not None and not callable(priority) and not is_int(priority):
            raise ConfigError(f"route priority must be an int or a callable, got {priority!r}")
        self.priority = priority

    @property
    def any(self) -> bool:
        return any(
            x is not None
            for x in (
                self.key,
                self.tenant,
                self.tokens,
                self.priority,
                self.prefix,
                self.eligible,
            )
        )

    def context(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, timeout: float | None, stream: bool
    ) -> CallContext:
        call = CallContext(
            key=self.key(*args, **kwargs) if self.key is not None else None,
            tenant=self.tenant(*args, **kwargs) if self.tenant is not None else None,
            tokens=check_tokens(self.tokens(*args, **kwargs)) if self.tokens is not None else None,
            stream=stream,
            timeout=timeout,
        )
        if self.priority is not None:
            call.priority = _priority_of(self.priority, args, kwargs)
        if self.prefix is not None:
            call.prefix = check_prefix(self.prefix(*args, **kwargs))
        eligible = self.eligible
        if eligible is not None:

            def may_use(endpoint: Endpoint) -> bool:
                return bool(eligible(endpoint, *args, **kwargs))

            call.eligible = may_use
        return call


def check_eligible(value: object) -> Callable[[Endpoint], bool]:
    """``eligible=`` of one call (``lb.call``, ``lb.pick``): a predicate on endpoints."""
    if isinstance(value, type) or not callable(value):
        raise ConfigError(f"eligible must be a callable taking an lbclient.Endpoint, got {value!r}")
    return value


def check_priority(value: object) -> int:
    if not is_int(value):
        raise ConfigError(f"priority must be an int, got {value!r}")
    return value


def _priority_of(
    priority: int | Callable[..., object], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> int:
    if not callable(priority):
        return priority
    value = priority(*args, **kwargs)
    if not is_int(value):
        raise TypeError(f"priority= must give an int, got {value!r}")
    return value


def check_prefix(value: object) -> str | None:
    """A call's prompt text for prefix affinity: a str (None or "": none).  Anything
    else is the caller's bug: TypeError naming it, before anything is sent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TypeError(f"prefix= must give the prompt text (a str), got {type(value).__name__}")
    return value


def check_tokens(value: object) -> float | None:
    """A call's token estimate: a number >= 0 (None: no estimate).  A bad one is the
    caller's bug: TypeError/ValueError naming it, before anything is sent."""
    if value is None:
        return None
    if not is_number(value):
        raise TypeError(f"tokens= must give a finite number of tokens, got {value!r}")
    if value < 0:
        raise ValueError(f"tokens= must give a number of tokens >= 0, got {value!r}")
    return float(value)


def make_route(
    engine: Engine,
    fn: Callable[..., Any],
    *,
    key: Callable[..., object] | None,
    timeout: float | None,
    idle_timeout: float | None,
    tenant: Callable[..., object] | None = None,
    tokens: Callable[..., object] | None = None,
    priority: int | Callable[..., object] | None = None,
    prefix: Callable[..., object] | None = None,
    eligible: Callable[..., object] | None = None,
    fallback: bool = True,
    meter: Meter | None = None,
) -> Callable[..., Any]:
    """Wrap ``fn(endpoint, *args, **kwargs)`` so callers call ``wrapped(*args, **kwargs)``.

    Under a cost policy (``meter``) each attempt of ``fn`` is recorded and the call
    reserves and settles in this pool's ledger -- inside the fallback wrapper, so a call
    shed at the budget goes to the fallback pool, which meters it by its own policy."""
    check_async(fn, "@lb.route", streams=True)
    extract = Extract(key, tenant, tokens, priority, prefix, eligible)
    deadline = check_timeout(timeout)
    idle = check_timeout(idle_timeout, "idle_timeout")
    if not isinstance(fallback, bool):
        raise ConfigError(f"route fallback must be a bool, got {fallback!r}")
    if deadline is None and engine.retry is not None:
        deadline = engine.retry.timeout
    stream = inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )
    attempt = fn if meter is None else meter.attempts(fn)
    if stream:
        from .streaming import make_stream_route

        wrapped = make_stream_route(engine, attempt, extract, deadline, idle)
    else:
        if idle is not None:
            raise ConfigError(
                f"idle_timeout applies to streaming routes (async generators) only; {fn!r} "
                "is a plain async function: use timeout="
            )
        wrapped = functools.wraps(fn)(_variant(engine, attempt, extract, deadline))
    if meter is not None:
        wrapped = meter.route(wrapped, fn, tokens)
    if not fallback or engine.fallback is None:
        return wrapped
    from .fallback import with_fallback

    def secondary(other: Any) -> Callable[..., Any]:
        # The same function through the fallback balancer, with the route's own options
        # (its timeout left to that balancer's Retry, as given here).
        route: Callable[..., Any] = other.route(
            key=key,
            timeout=timeout,
            idle_timeout=idle_timeout,
            tenant=tenant,
            tokens=tokens,
            priority=priority,
            prefix=prefix,
            eligible=eligible,
        )
        routed: Callable[..., Any] = route(fn)
        return routed

    return functools.wraps(fn)(with_fallback(engine, wrapped, secondary, stream=stream))


def _variant(
    engine: Engine, fn: Callable[..., Any], extract: Extract, deadline: float | None
) -> Callable[..., Any]:
    """The wrapper a plain (not streaming) route runs: the least machinery its options
    need.  A prefix or an eligibility test needs the call's context: the full path."""
    if (
        deadline is None
        and extract.key is None
        and extract.tokens is None
        and extract.prefix is None
    ):
        if extract.eligible is not None:
            return _full(engine, fn, extract, deadline)
        if engine.gate is None:
            if engine.hedger is not None and extract.tenant is None:
                return _hedged(engine, fn, None)
            if not extract.any:
                if engine.retry is None:
                    return _fast(engine, fn)
                return _fast_then_retry(engine, fn)
        elif engine.hedger is None:
            return _fast_admitted(engine, fn, extract)
    elif (
        engine.gate is None
        and engine.hedger is not None
        and deadline is None
        and extract.tenant is None
        and extract.tokens is None
        and extract.priority is None
        and extract.prefix is None
        and extract.eligible is None
    ):
        return _hedged(engine, fn, extract.key)
    return _full(engine, fn, extract, deadline)


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
        if engine.tracer is not None:  # spans need a call context: the full path
            return await run_call(engine, fn, args, kwargs, CallContext())
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
            t = now()
            settle(None, Lease(pool, s, t0, 0), exc, t)
            if isinstance(exc, Exception):
                counters.failed("error")
                if engine.recorder is not None:
                    engine.recorder.call(t - t0, False, s.url, error_type(exc))
            raise
        t = now()
        succeeded(s, t0, t)
        counters.ok += 1
        if engine.recorder is not None:
            engine.recorder.call(t - t0, True, s.url)
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
        if engine.tracer is not None:  # spans need a call context: the full path
            return await run_call(engine, fn, args, kwargs, CallContext())
        t0 = now()
        try:
            s = acquire(t0)
        except NoEndpointAvailable as exc:
            if exc.reason != "cooling":
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
            if current_task().cancelling():  # type: ignore[union-attr]  # see converted_cancel
                converted_cancel(None, Lease(pool, s, t0, 0), exc, t1)
            ctx = CallContext(started=t0)
            ctx.sent = 1
            ctx.add_tried(s)
            settle(ctx, Lease(pool, s, t0, 0), exc, t1)
            return await _recorded(engine, ctx, rounds(engine, ctx, fn, args, kwargs, exc))
        except BaseException:
            Lease(pool, s, t0, 0).cancel()
            raise
        t = now()
        succeeded(s, t0, t)
        counters.ok += 1
        if engine.recorder is not None:
            engine.recorder.call(t - t0, True, s.url)
        return result

    return call


def _fast_admitted(
    engine: Engine, fn: Callable[..., Awaitable[Any]], extract: Extract
) -> Callable[..., Any]:
    """The fast path under admission (no key, tokens, deadline or hedging): the permit is
    taken synchronously when there is room and the attempt runs in this frame.  Anything
    else -- a caller that must wait, a probe hand-over, a failure to retry -- continues on
    the full path with the permit it holds."""
    gate = engine.gate
    assert gate is not None
    pool = engine.pool
    acquire = pool.acquire_fast
    succeeded = pool.succeeded
    now = engine.now
    counters = engine.counters
    budget = engine.budget
    retry = engine.retry
    tenant_of = extract.tenant
    prio = extract.priority

    async def call(*args: Any, **kwargs: Any) -> Any:
        t0 = now()
        tenant = tenant_of(*args, **kwargs) if tenant_of is not None else None
        priority = 0 if prio is None else _priority_of(prio, args, kwargs)
        if engine.tracer is not None:  # spans need a call context: the full path
            ctx = CallContext(tenant=tenant, priority=priority)
            return await run_call(engine, fn, args, kwargs, ctx)
        if not gate.enter(tenant):  # quotas, throttling or no room: the general way
            try:
                permit = gate.try_admit(tenant, 0.0, priority, t0)
            except Overloaded as exc:
                counters.calls += 1
                counters.failed(f"shed: {exc.reason}")
                rec = engine.recorder
                if rec is not None and rec.traffic:
                    ctx = CallContext(tenant=tenant, started=t0)
                    rec.traffic_only(now() - t0, False, None, error_type(exc), False, ctx)
                raise
            if permit is None:  # no room now: wait in the queue (or be shed), full path
                ctx = CallContext(tenant=tenant, priority=priority)
                return await run_call(engine, fn, args, kwargs, ctx, waiting=True)
            # admitted with a permit (a quota charged): the full path gives it back
            counters.calls += 1
            if budget is not None:
                budget.deposit(t0)
            ctx = CallContext(tenant=tenant, priority=priority)
            return await run_call(engine, fn, args, kwargs, ctx, None, permit)
        counters.calls += 1
        if budget is not None:
            budget.deposit(t0)
        try:
            s = acquire(t0)
        except Handoff as h:
            ctx = CallContext(tenant=tenant, priority=priority)
            return await run_call(
                engine, fn, args, kwargs, ctx, h.lease, gate.permit_for(tenant, t0)
            )
        except NoEndpointAvailable as exc:
            permit = gate.permit_for(tenant, t0)
            if exc.reason not in ("limits", "cooling"):
                permit.release()
                counters.failed("no endpoint")
                raise
            # Every endpoint is at its limits (or cooling down): the full path waits
            # for one, holding the permit.
            ctx = CallContext(tenant=tenant, priority=priority)
            return await run_call(engine, fn, args, kwargs, ctx, None, permit)
        except BaseException:
            gate.permit_for(tenant, t0).release()
            counters.failed("no endpoint")
            raise
        try:
            result = await fn(s.endpoint, *args, **kwargs)
        except Exception as exc:
            t1 = now()
            lease = Lease(pool, s, t0, 0)
            permit = gate.permit_for(tenant, t0)
            if current_task().cancelling():  # type: ignore[union-attr]  # see converted_cancel
                permit.release()
                converted_cancel(None, lease, exc, t1)
            ctx = CallContext(tenant=tenant, priority=priority, started=t0)
            ctx.sent = 1
            ctx.add_tried(s)
            settle(ctx, lease, exc, t1)
            if retry is None:
                counters.failed("error")
                release(permit, ctx, False)
                if engine.recorder is not None:
                    engine.recorder.call(t1 - t0, False, s.url, error_type(exc), call=ctx)
                raise
            try:
                result = await _recorded(engine, ctx, rounds(engine, ctx, fn, args, kwargs, exc))
            except BaseException:
                release(permit, ctx, False)
                raise
            release(permit, ctx, True)
            return result
        except BaseException:
            Lease(pool, s, t0, 0).cancel()
            gate.permit_for(tenant, t0).release()
            raise
        t = now()
        succeeded(s, t0, t)
        counters.ok += 1
        gate.leave(tenant, t - t0, t)
        rec = engine.recorder
        if rec is not None:
            traced = CallContext(tenant=tenant, started=t0) if rec.traffic else None
            rec.call(t - t0, True, s.url, call=traced)
        return result

    return call


def _hedged(
    engine: Engine, fn: Callable[..., Awaitable[Any]], key: Callable[..., object] | None
) -> Callable[..., Any]:
    """Hedging without a deadline: the first round straight into the race; only a
    failure enters the retry loop."""
    from .hedging import begin_race, end_race, primary_raised, primary_returned

    pool = engine.pool
    now = engine.now
    counters = engine.counters
    budget = engine.budget

    async def call(*args: Any, **kwargs: Any) -> Any:
        if pool.closed:
            raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
        t0 = now()
        ctx = CallContext.keyed(key(*args, **kwargs) if key is not None else None, t0)
        if engine.tracer is not None:  # spans: the full path
            return await run_call(engine, fn, args, kwargs, ctx)
        counters.calls += 1
        if budget is not None:
            budget.deposit(t0)
        try:
            # without a key, nothing in the context is for the picker: its fast pick
            lease = pool.acquire(ctx if ctx.key is not None else None, None, t0)
        except NoEndpointAvailable as exc:
            if exc.reason != "cooling":
                counters.failed("no endpoint")
                raise
            return await run(engine, ctx, fn, args, kwargs)  # waits out the cooldowns
        except Exception:  # a strategy's bug: the call failed all the same
            counters.failed("error")
            raise
        try:
            # hedging.hedged_try, in this frame
            race = begin_race(engine, ctx, lease, fn, args, kwargs)
            error: BaseException | None
            try:
                try:
                    result = await fn(lease.endpoint, *args, **kwargs)
                except BaseException as exc:
                    error = exc  # handled outside the except block: no implicit __context__
                else:
                    error = None
                    result = primary_returned(engine, race, result)
                if error is not None:
                    result = await primary_raised(engine, race, error)
            finally:
                end_race(race)
        except Exception as exc:
            return await _recorded(engine, ctx, rounds(engine, ctx, fn, args, kwargs, exc))
        counters.ok += 1
        if engine.recorder is not None:
            engine.recorder.call(now() - t0, True, ctx.served_by, call=ctx)
        return result

    return call


def _full(
    engine: Engine,
    fn: Callable[..., Awaitable[Any]],
    extract: Extract,
    timeout: float | None,
) -> Callable[..., Any]:
    """A call context from the start: key, tenant, tokens, deadline, admission."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        ctx = extract.context(args, kwargs, timeout=timeout, stream=False)
        return await run_call(engine, fn, args, kwargs, ctx)

    return call


def run_call(
    engine: Engine,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: CallContext,
    first: Lease | None = None,
    permit: Permit | None = None,
    waiting: bool = False,
) -> Coroutine[Any, Any, Any]:
    """Start ``call`` (count it, feed the budget, admit it) and run it on the full path:
    the coroutine to await.

    ``first``: a lease already taken for its first attempt (a fast-path hand-over);
    ``permit``: an admission permit already granted; ``waiting``: admission already
    said "no room now" (the caller goes straight to the queue).  (Not itself a
    coroutine: every frame of the chain is resumed at every I/O of the attempt.)"""
    coro = _run_call(engine, fn, args, kwargs, call, first, permit, waiting)
    tracer = engine.tracer
    if tracer is None:
        return _recorded(engine, call, coro)
    return _traced(engine, call, coro, tracer)


async def _traced(
    engine: Engine, call: CallContext, coro: Coroutine[Any, Any, Any], tracer: Any
) -> Any:
    call.tracer = tracer
    with tracer.call(call):  # a span for the call; start() opens one per attempt
        return await _recorded(engine, call, coro)


async def _recorded(engine: Engine, call: CallContext, coro: Coroutine[Any, Any, R]) -> R:
    """Await the rest of a call; count and record how it ended."""
    engine.active += 1
    try:
        result = await coro
    except Exception as exc:
        rec = engine.recorder
        if rec is not None:
            rec.call(engine.now() - call.started, False, call.served_by, error_type(exc), call=call)
        raise
    finally:
        engine.active -= 1
    engine.counters.ok += 1
    rec = engine.recorder
    if rec is not None:
        rec.call(engine.now() - call.started, True, call.served_by, call=call)
        if call.usage is not None:
            rec.usage(call.usage, call.served_by)
    return result


def error_type(exc: BaseException) -> str:
    """The ``error.type`` of a failed call (OpenTelemetry's attribute): the HTTP status
    when the error carries one, else the exception's class name."""
    status = status_of(exc)
    return str(status) if status is not None else type(exc).__name__


async def _run_call(
    engine: Engine,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: CallContext,
    first: Lease | None = None,
    permit: Permit | None = None,
    waiting: bool = False,
) -> Any:
    if engine.pool.closed and first is None and permit is None:
        raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
    t = first.t0 if first is not None else engine.now()
    call.started = t
    if call.timeout is not None:
        call.deadline = t + call.timeout
    if permit is None:
        engine.counters.calls += 1
        if engine.budget is not None:
            engine.budget.deposit(t)
    gate = engine.gate
    if gate is None:
        if call.tokens is None:
            if call.timeout is None:  # no deadline scope: straight into the rounds
                return await rounds(engine, call, fn, args, kwargs, None, first)
            return await run(engine, call, fn, args, kwargs, first)
        token = CURRENT.set(call)
        try:
            if call.timeout is None:  # no deadline scope: straight into the rounds
                return await rounds(engine, call, fn, args, kwargs, None, first)
            return await run(engine, call, fn, args, kwargs, first)
        finally:
            CURRENT.reset(token)
    if permit is None:
        permit = await admit(engine, call, None if waiting else t)
    current = CURRENT.set(call) if call.tokens is not None else None
    try:
        if call.timeout is None:
            result = await rounds(engine, call, fn, args, kwargs, None, first)
        else:
            result = await run(engine, call, fn, args, kwargs, first)
    except BaseException:
        release(permit, call, False)
        raise
    finally:
        if current is not None:
            CURRENT.reset(current)
    release(permit, call, True)
    return result


async def admit(engine: Engine, call: CallContext, t: float | None = None) -> Permit:
    """A permit for the call: at once when the gate has room at ``t`` (now), else after
    waiting in the admission queue -- or shed, :class:`Overloaded` (counted).  ``t=None``:
    the call already asked ``gate.try_admit``, which said wait (and charged its quota
    once)."""
    gate = engine.gate
    assert gate is not None
    try:
        if t is not None:
            permit = gate.try_admit(call.tenant, call.tokens or 0.0, call.priority, t)
            if permit is not None:
                return permit
        return await gate.wait(
            call.tenant, call.tokens or 0.0, call.priority, call.left(engine.now())
        )
    except Overloaded as exc:
        engine.counters.failed(f"shed: {exc.reason}")
        raise


def release(permit: Permit, call: CallContext, ok: bool) -> None:
    """Give the permit back, with what the call taught the limiter."""
    sample = call.sample if ok else None
    if sample is None:
        kind = None
    elif call.stream:
        kind = "ttft"
    elif call.tokens:
        kind, sample = "per_token", sample / call.tokens
    else:
        kind = "latency"
    accepted = None if not call.sent else not call.rejected
    permit.release(kind, sample, overloaded=call.overloaded, accepted=accepted, usage=call.usage)
