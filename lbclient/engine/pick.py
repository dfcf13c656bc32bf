"""``async with lb.pick() as endpoint:`` -- one attempt, for code that cannot be decorated.

The block is the attempt: a lease is taken on entry and given back on exit with the same
outcome rules as every other path -- success, a failure (an ``Exception`` leaving the
block; only the endpoint's faults count against it), a deadline cut (``timeout=``, which
raises :class:`~lbclient.DeadlineExceeded` and counts against the endpoint), or a cancel.
No retry or hedge: a block cannot be re-run for you -- use ``lb.call`` or ``@lb.route``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._context import CallContext
from .._errors import BalancerClosed, DeadlineExceeded, NoEndpointAvailable
from .attempt import cut_error, record, settle, start
from .retrying import acquire_once
from .route import admit, error_type, release

if TYPE_CHECKING:
    from .._endpoint import Endpoint
    from ..admission.gate import Permit
    from ..pool.lease import Lease
    from .engine import Engine

__all__ = ["PickedEndpoint"]


class PickedEndpoint:
    """What ``lb.pick(key=..., timeout=...)`` returns: an async context manager giving
    the picked :class:`~lbclient.Endpoint`.  Single use."""

    __slots__ = ("_asked", "_call", "_elsewhere", "_engine", "_fallback", "_lease", "_permit")

    def __init__(
        self,
        engine: Engine,
        call: CallContext,
        fallback: bool = True,
        timeout: float | None = None,
    ) -> None:
        self._engine = engine
        self._call = call
        self._asked = timeout  # the caller's own timeout; None: each pool's Retry.timeout
        self._lease: Lease | None = None
        self._permit: Permit | None = None
        self._fallback = fallback
        self._elsewhere: PickedEndpoint | None = None  # the fallback pool's pick

    async def __aenter__(self) -> Endpoint:
        engine = self._engine
        if engine.pool.closed:
            raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
        if self._lease is not None or self._elsewhere is not None:
            raise RuntimeError("this lb.pick() context is already in use; call lb.pick() again")
        if not self._fallback or engine.fallback is None:
            return await self._enter()
        from .fallback import falls_back, next_pool

        try:
            return await self._enter()
        except Exception as exc:
            if not falls_back(engine, exc):
                raise
            first = exc
        call = self._call

        async def elsewhere(other: Any) -> Endpoint:
            picked: PickedEndpoint = other.pick(
                key=call.key,
                timeout=self._asked,
                tenant=call.tenant,
                tokens=call.tokens,
                priority=call.priority,
                eligible=call.eligible,
                prefix=call.prefix,
            )
            endpoint = await picked.__aenter__()
            self._elsewhere = picked
            return endpoint

        return await next_pool(engine, first, elsewhere)

    async def _enter(self) -> Endpoint:
        engine = self._engine
        call = self._call
        t = engine.now()
        call.started = t
        engine.counters.calls += 1
        if engine.budget is not None:
            engine.budget.deposit(t)
        if call.timeout is not None:
            call.deadline = t + call.timeout
        if engine.gate is not None:
            self._permit = await admit(engine, call, t)
        try:
            lease = await acquire_once(engine, call)
        except BaseException as exc:  # no endpoint, a strategy's bug, a close meanwhile
            engine.counters.failed(
                "no endpoint" if isinstance(exc, NoEndpointAvailable) else "error"
            )
            if self._permit is not None:
                release(self._permit, call, False)
            raise
        start(call, lease)
        self._lease = lease
        if call.timeout is not None:
            scope = asyncio.timeout(call.deadline - engine.now())  # type: ignore[operator]
            await scope.__aenter__()
            call.scope = scope
        return lease.endpoint

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._elsewhere is not None:
            await self._elsewhere.__aexit__(exc_type, exc, tb)
            return
        lease = self._lease
        if lease is None:
            return
        engine = self._engine
        call = self._call
        permit = self._permit
        scope = call.scope
        try:
            if scope is not None:
                try:
                    await scope.__aexit__(exc_type, exc, tb)
                except TimeoutError as err:
                    if not scope.expired():
                        raise
                    t = engine.now()
                    lease.cut(t)
                    record(call, lease, cut_error(lease), t)
                    engine.counters.failed("deadline")
                    raise DeadlineExceeded(call.timeout or 0.0, call.attempts) from err
            rec = engine.recorder
            if exc is None:
                t = engine.now()
                lease.ok(t)
                call.sample = t - lease.t0
                engine.counters.ok += 1
                if rec is not None:
                    rec.call(t - call.started, True, lease.state.url, call=call)
            elif isinstance(exc, Exception):
                t = engine.now()
                settle(call, lease, exc, t)
                engine.counters.failed("error")
                if rec is not None:
                    rec.call(t - call.started, False, lease.state.url, error_type(exc), call=call)
            else:
                lease.cancel()
        finally:
            if permit is not None:
                release(permit, call, exc is None and call.sample is not None)
