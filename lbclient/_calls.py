"""The three ways to call through a :class:`~lbclient.Balancer` -- ``@lb.route``,
``lb.call`` and ``lb.pick`` -- each a thin entry into :mod:`lbclient.engine`."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar, overload

from ._context import CallContext
from ._endpoint import Endpoint
from ._errors import BalancerClosed, ConfigError
from .engine.engine import Engine
from .engine.metered import Meter
from .engine.pick import PickedEndpoint
from .engine.route import (
    RouteDecorator,
    check_async,
    check_eligible,
    check_prefix,
    check_priority,
    check_timeout,
    check_tokens,
    make_route,
    run_call,
)

__all__ = ["Calls", "call_context"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def call_context(
    key: object,
    tenant: object,
    tokens: float | None,
    priority: int,
    eligible: Callable[[Endpoint], bool] | None,
    prefix: str | None = None,
    timeout: float | None = None,
) -> Callable[[Engine], CallContext]:
    """How one call's context is made in a pool -- and made again in its fallback pool:
    the values given (checked), ``timeout`` or else the pool's ``Retry.timeout`` as its
    deadline."""

    def context(engine: Engine) -> CallContext:
        retry = engine.retry
        seconds = timeout
        if seconds is None and retry is not None:
            seconds = retry.timeout
        call = CallContext(
            key=key,
            tenant=tenant,
            tokens=tokens,
            timeout=seconds,
            priority=priority,
            prefix=prefix,
        )
        if eligible is not None:
            call.eligible = eligible
        return call

    return context


class Calls:
    """:class:`~lbclient.Balancer`'s calling half (its other half: membership, lifecycle,
    stats).  Needs ``_engine`` (and ``_meter`` under a cost policy)."""

    _engine: Engine
    _meter: Meter | None = None

    def _check_open(self) -> None:
        if self._engine.pool.closed:
            raise BalancerClosed("this lbclient.Balancer is closed; create a new one")

    @overload
    def route(
        self, fn: Callable[Concatenate[Endpoint, P], Coroutine[Any, Any, R]], /
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def route(
        self, fn: Callable[Concatenate[Endpoint, P], AsyncIterator[T]], /
    ) -> Callable[P, AsyncGenerator[T, None]]: ...
    @overload
    def route(
        self,
        fn: None = None,
        /,
        *,
        key: Callable[..., object] | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        tenant: Callable[..., object] | None = None,
        tokens: Callable[..., object] | None = None,
        priority: int | Callable[..., object] | None = None,
        eligible: Callable[..., object] | None = None,
        fallback: bool = True,
        prefix: Callable[..., object] | None = None,
    ) -> RouteDecorator: ...
    def route(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        key: Callable[..., object] | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        tenant: Callable[..., object] | None = None,
        tokens: Callable[..., object] | None = None,
        priority: int | Callable[..., object] | None = None,
        eligible: Callable[..., object] | None = None,
        fallback: bool = True,
        prefix: Callable[..., object] | None = None,
    ) -> Any:
        """Decorate ``async def fn(endpoint, ...)``; callers call ``fn(...)`` without it.

        The balancer picks the endpoint, injects it as the first argument, records the
        outcome, and retries / hedges as configured.  Works on async generators too
        (streaming: hedged and retried until the first chunk, committed after it).

        * ``key`` -- a callable given the call's arguments that returns the affinity key
          for ``consistent_hash`` (e.g. ``key=lambda payload: payload["user"]``).
        * ``timeout`` -- overall deadline in seconds for this function's calls, covering
          every attempt and backoff (default: ``Retry.timeout``, else none).  For a
          stream it bounds the time to the first chunk.
        * ``idle_timeout`` -- streams only: the longest gap between chunks after the first
          before :class:`StreamIdleTimeout` is raised (default: none).
        * ``tenant`` -- a callable giving who the call is for (fairness and quotas under
          :class:`Admission`; e.g. ``tenant=lambda payload: payload["user"]``).
        * ``tokens`` -- a callable giving the call's estimated token cost: load is then
          counted in tokens in flight (a 30k-token prompt is not a 50-token one), and
          quotas and fairness are charged in tokens, settled by :func:`report_usage`.
        * ``priority`` -- an int (or a callable giving one): under admission, waiting
          calls of higher priority are served first.
        * ``eligible`` -- which endpoints a call may go to: called like ``fn`` itself,
          with a candidate endpoint first (``eligible(endpoint, *args, **kwargs)``), it
          returns whether that endpoint may serve this call -- by model, tags, tier,
          anything in ``endpoint.metadata``::

              @lb.route(eligible=lambda ep, req: req["model"] in ep.metadata["models"])

          It is asked only about the candidates a pick looks at (two for P2C), never
          twice per pick.  An endpoint it refuses is never picked for the call, even as
          a last resort; none left: :class:`NoEndpointAvailable` (``reason
          "ineligible"``) saying how many each test refused.  Calls with ``tokens=``
          also skip endpoints whose ``metadata["max_context"]`` is smaller.
        * ``fallback`` -- ``False``: never send this route's calls to the balancer's
          ``fallback=`` pool.
        * ``prefix`` -- a callable giving the call's prompt text (a str, or None) for the
          ``prefix`` strategy's KV-cache affinity (e.g. ``prefix=lambda payload:
          lbclient.prompt_text(payload["messages"])``).  Calls then take the full path.
        """
        self._check_open()
        options: Callable[[Callable[..., Any]], Any] = functools.partial(
            make_route,
            self._engine,
            key=key,
            timeout=timeout,
            idle_timeout=idle_timeout,
            tenant=tenant,
            tokens=tokens,
            priority=priority,
            eligible=eligible,
            fallback=fallback,
            prefix=prefix,
            meter=self._meter,  # a cost policy: reserve before, settle after
        )
        return options if fn is None else options(fn)

    async def call(
        self,
        fn: Callable[..., Awaitable[R]],
        /,
        *args: Any,
        key: object = None,
        tenant: object = None,
        tokens: float | None = None,
        priority: int = 0,
        eligible: Callable[[Endpoint], bool] | None = None,
        fallback: bool = True,
        prefix: str | None = None,
        **kwargs: Any,
    ) -> R:
        """``await lb.call(fn, *args, **kwargs)`` runs ``fn(endpoint, *args, **kwargs)``
        like a decorated function would.  ``key``, ``tenant``, ``tokens``, ``priority``,
        ``prefix`` and ``fallback`` are this call's values themselves (see
        :meth:`route`); ``eligible`` is a predicate on the candidate :class:`Endpoint`.
        To pass arguments of those names to ``fn``, bind them with ``functools.partial``."""
        check_async(fn, "lb.call", streams=False)
        context = call_context(
            key,
            tenant,
            check_tokens(tokens),
            check_priority(priority),
            check_eligible(eligible) if eligible is not None else None,
            check_prefix(prefix),
        )
        return await self._call(fn, args, kwargs, context, fallback)

    def _call(
        self,
        fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        context: Callable[[Engine], CallContext],
        fallback: bool = True,
    ) -> Awaitable[R]:
        """:meth:`call` with checked arguments (lbclient's own clients call this): the
        call's context is ``context(engine)``, made again for a fallback pool.  Returns
        the coroutine to await (no frame of its own: each is resumed at every I/O)."""
        engine = self._engine
        call = context(engine)
        result: Coroutine[Any, Any, R]
        if self._meter is None:
            result = run_call(engine, fn, args, kwargs, call)
        else:  # a cost policy: reserve before, settle after
            result = self._meter.call(
                lambda metered: run_call(engine, metered, args, kwargs, call), fn, call.tokens
            )
        if engine.fallback is None or fallback is False:
            return result
        from .engine.fallback import with_fallback_call

        def again(other: Calls) -> Awaitable[R]:
            return other._call(fn, args, kwargs, context)

        return with_fallback_call(engine, result, again)

    def pick(
        self,
        *,
        key: object = None,
        timeout: float | None = None,
        tenant: object = None,
        tokens: float | None = None,
        priority: int = 0,
        eligible: Callable[[Endpoint], bool] | None = None,
        fallback: bool = True,
        prefix: str | None = None,
    ) -> PickedEndpoint:
        """``async with lb.pick() as endpoint:`` -- one attempt for code that cannot be
        decorated; an exception leaving the block is recorded as that endpoint's failure
        (when it is the endpoint's fault).  ``timeout`` bounds the block (default:
        ``Retry.timeout``): past it the block is cancelled, the endpoint charged, and
        :class:`DeadlineExceeded` raised.  ``tenant``/``tokens``/``priority``: as for
        :meth:`route`, under :class:`Admission`; ``prefix``: the prompt text (the ``prefix``
        strategy); ``eligible``: a predicate on the candidate :class:`Endpoint`.  When
        nothing can be picked (or admission sheds the call), the pick comes from the
        ``fallback=`` pool unless ``fallback=False``; a block already entered is not re-run
        anywhere."""
        seconds = check_timeout(timeout)
        call = call_context(
            key,
            tenant,
            check_tokens(tokens),
            check_priority(priority),
            check_eligible(eligible) if eligible is not None else None,
            check_prefix(prefix),
            seconds,
        )(self._engine)
        if not isinstance(fallback, bool):
            raise ConfigError(f"fallback must be a bool, got {fallback!r}")
        if self._meter is not None:
            return self._meter.pick(call, fallback, seconds)
        return PickedEndpoint(self._engine, call, fallback, seconds)
