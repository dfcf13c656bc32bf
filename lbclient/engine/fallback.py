"""Fallback pools (model groups): a call this balancer cannot serve goes to the next.

``Balancer(..., fallback=other)`` chains pools -- a self-hosted fleet falling back to a
vendor API, a big model to a smaller one.  A call goes to the fallback when its own pool
*could not serve it*:

* nothing could be picked (:class:`~lbclient.NoEndpointAvailable`: all ejected,
  draining, cooling down, at their limits, or none eligible);
* its attempts were exhausted (:class:`~lbclient.AttemptsExhausted`: every retry
  failed, the retry budget or panic mode said stop);
* admission shed it (:class:`~lbclient.Overloaded`, quotas included);
* without a retry policy, its one attempt failed with a retryable error (a 503, a
  connection refused).

Anything else is the call's own outcome and is raised as it is: a 4xx (the request is
bad everywhere), an error of your code, a deadline that passed, a cancel.  The fallback
runs the call as its own call -- its own admission, retries, hedging, deadline and
counters -- and may fall back in turn.  When every pool failed, the error is
:class:`~lbclient.PoolsExhausted`, which says what each pool tried.  A stream falls back
only before its first chunk.

Each wrapper here costs nothing unless the balancer has a fallback (the route variant
is wrapped at decoration time, ``lb.call``/``lb.pick`` check one attribute), and one
``try`` around the primary call when it does.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from .._errors import (
    AttemptsExhausted,
    LBError,
    NoEndpointAvailable,
    Overloaded,
    PoolFailure,
    PoolsExhausted,
)
from ..policies.classify import is_retryable

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["falls_back", "next_pool", "pool_name", "with_fallback", "with_fallback_call"]

R = TypeVar("R")


def falls_back(engine: Engine, exc: BaseException) -> bool:
    """Did ``exc`` end the call because this pool could not serve it (see the module
    docstring), rather than because of the call itself?"""
    if isinstance(exc, NoEndpointAvailable | Overloaded | AttemptsExhausted):
        return True
    if isinstance(exc, LBError) or not isinstance(exc, Exception):
        return False
    # Raised as it is: with a retry policy, the policy found it not retryable (a 4xx);
    # without one, the single attempt failed -- a transient failure falls back.
    return engine.retry is None and is_retryable(exc)


def pool_name(engine: Engine) -> str:
    """How errors name a pool: ``Balancer(name=...)``, else its first endpoint (and how
    many more)."""
    if engine.name is not None:
        return engine.name
    members = engine.pool.members
    if not members:
        return "<empty pool>"
    first = next(iter(members))
    return first if len(members) == 1 else f"{first} +{len(members) - 1}"


def _failures(engine: Engine, exc: BaseException) -> list[PoolFailure]:
    if isinstance(exc, PoolsExhausted):
        return list(exc.pools)
    return [PoolFailure(pool=pool_name(engine), error=exc)]


async def next_pool(engine: Engine, first: Exception, attempt: Callable[[Any], Awaitable[R]]) -> R:
    """The call failed in this pool with ``first``: run it in the fallback pool
    (``attempt(fallback_balancer)``), or raise what says both pools' story."""
    fallback = engine.fallback
    assert fallback is not None
    engine.counters.fallbacks += 1
    try:
        return await attempt(fallback)
    except Exception as exc:
        _reraise(engine, first, fallback._engine, exc)


def _last(exc: BaseException) -> BaseException:
    """The last pool's own error (what :class:`PoolsExhausted` is chained to)."""
    if isinstance(exc, PoolsExhausted) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def _reraise(engine: Engine, first: Exception, next_engine: Engine, exc: Exception) -> NoReturn:
    """Raise :func:`_merged`: ``exc`` itself, or every pool's story chained to the last
    pool's own error."""
    merged = _merged(engine, first, next_engine, exc)
    if merged is exc:
        raise exc
    raise merged from _last(exc)


def _merged(engine: Engine, first: Exception, next_engine: Engine, exc: Exception) -> Exception:
    """The error of a call that failed in this pool (``first``) and then in the next
    one (``exc``): every pool's story when the next one could not serve it either,
    else the next pool's own error (a 4xx, a deadline) with a note about this one."""
    if falls_back(next_engine, exc):
        return PoolsExhausted(_failures(engine, first) + _failures(next_engine, exc))
    exc.add_note(f"lbclient: pool {pool_name(engine)!r} could not serve the call first: {first}")
    return exc


async def with_fallback_call(
    engine: Engine,
    primary: Coroutine[Any, Any, R],
    attempt: Callable[[Any], Awaitable[R]],
) -> R:
    """``await primary``; if this pool could not serve the call, ``attempt(fallback)``."""
    try:
        return await primary
    except Exception as exc:
        if not falls_back(engine, exc):
            raise
        first = exc
    return await next_pool(engine, first, attempt)


def with_fallback(
    engine: Engine,
    primary: Callable[..., Any],
    secondary_of: Callable[[Any], Callable[..., Any]],
    *,
    stream: bool,
) -> Callable[..., Any]:
    """Wrap a route variant (``primary``): a call it cannot serve goes to the same
    function routed through the fallback balancer (``secondary_of(fallback)``, made on
    first use)."""
    made: list[Callable[..., Any]] = []

    def secondary() -> Callable[..., Any]:
        if not made:
            made.append(secondary_of(engine.fallback))
        return made[0]

    if not stream:

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await with_fallback_call(
                engine, primary(*args, **kwargs), lambda fb: secondary()(*args, **kwargs)
            )

        return call

    async def relay(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        inner: AsyncIterator[Any] = primary(*args, **kwargs)
        try:
            try:
                item = await anext(inner)
            except StopAsyncIteration:
                return
            except Exception as exc:
                if not falls_back(engine, exc):
                    raise
                first = exc
            else:
                # Committed to this pool at its first chunk: no fallback from here on.
                yield item
                async for item in inner:
                    yield item
                return
        finally:
            await _aclose(inner)
        engine.counters.fallbacks += 1
        fallback = engine.fallback
        assert fallback is not None
        other: AsyncIterator[Any] = secondary()(*args, **kwargs)
        try:
            try:
                item = await anext(other)
            except StopAsyncIteration:
                return
            except Exception as exc:
                _reraise(engine, first, fallback._engine, exc)
            yield item
            async for item in other:
                yield item
        finally:
            await _aclose(other)

    return relay


async def _aclose(agen: AsyncIterator[Any]) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        await aclose()
