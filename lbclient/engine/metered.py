"""Metering under a :class:`~lbclient.CostPolicy`: every call reserves before it picks,
every attempt is recorded where it ran, every call settles when it ends.

The meter wraps from the outside, so the call path itself is untouched (and a balancer
without ``cost=`` pays nothing):

* the *call* -- ``@lb.route``'s function, ``lb.call``, ``lb.pick`` -- reserves its
  worst-case cost in the :class:`~lbclient.admission.spend.Ledger` first (or is shed
  with ``Overloaded("budget")`` before anything else happens), and settles when it
  ends, however it ends (refunded in full if no attempt ran);
* each *attempt* -- the user's function as the engine runs it, once per try, retry or
  hedge -- records its endpoint, duration and the usage :func:`lbclient.report_usage`
  reports while it runs.

The call's charge reaches its attempts through a context variable: attempts run in the
caller's task, in hedge backups started in the caller's context, or in stream pumps
started in it.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._context import ATTEMPT
from .._endpoint import Endpoint
from .._errors import Overloaded
from ..admission.spend import Charge, Ledger
from ..policies.cost import CostPolicy, PriceBook
from .pick import PickedEndpoint
from .route import check_tokens

if TYPE_CHECKING:
    from .._context import CallContext
    from .engine import Engine

__all__ = ["Meter"]

log = logging.getLogger("lbclient")

_CHARGE: contextvars.ContextVar[Charge | None] = contextvars.ContextVar(
    "lbclient_charge", default=None
)


class Meter:
    """The cost policy's runtime for one balancer: the ledger and the wrappers."""

    def __init__(self, engine: Engine, policy: CostPolicy, book: PriceBook | None = None) -> None:
        self.engine = engine
        self.policy = policy
        self.book = book or PriceBook()
        fleet = None
        budget = getattr(engine.pool.shared, "budget", None)  # shared state's link
        if budget is not None and policy.ceiling is not None:
            # One fleet-wide ceiling per balancer name in the Redis namespace.
            fleet = budget(f"cost:{engine.name or 'default'}", policy.ceiling, policy.period)
            # The first claim covers a call of the default estimate.
            fleet.largest = max(fleet.largest, self.worst(policy.estimate_tokens))
        self.ledger = Ledger(policy, fleet)

    # -- reserve / settle ---------------------------------------------------------------

    def worst(self, tokens: float) -> float:
        """A call's worst case: ``tokens`` at the dearest member's price."""
        members = (s.endpoint for s in self.engine.pool.members.values())
        return self.book.dearest(members, tokens, self.policy.estimate_seconds)

    def reserve(self, tokens: float | None, stream: bool = False) -> Charge:
        """Reserve a call's worst case now, or shed it (counted as the engine counts
        calls shed at admission)."""
        engine = self.engine
        now = engine.now()
        policy = self.policy
        est = policy.estimate_tokens if tokens is None else tokens
        amount = self.worst(est)
        try:
            return self.ledger.reserve(amount, est, now)
        except Overloaded as exc:
            engine.counters.calls += 1
            engine.counters.failed(f"shed: {exc.reason}")
            rec = engine.recorder
            if rec is not None and rec.traffic:
                rec.traffic_only(0.0, False, None, "Overloaded", stream, None)
            raise

    def settle(self, charge: Charge) -> None:
        self.ledger.settle(charge, self.engine.now())

    # -- the attempt wrapper ---------------------------------------------------------------

    def _begin(self, endpoint: Endpoint) -> Any:
        charge = _CHARGE.get()
        if charge is None:
            return None
        rec = charge.attempt(endpoint.url, self.book.get(endpoint), self.engine.now())
        return rec, ATTEMPT.set(rec)

    def _end(self, begun: Any, ok: bool) -> None:
        if begun is None:
            return
        rec, token = begun
        rec.end = self.engine.now()
        rec.ok = ok
        ATTEMPT.reset(token)

    def attempts(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(endpoint, ...)`` recording each run as an attempt of the current charge."""
        meter = self
        if inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(
            getattr(fn, "__call__", None)  # noqa: B004
        ):

            async def stream_attempt(endpoint: Endpoint, *args: Any, **kwargs: Any) -> Any:
                begun = meter._begin(endpoint)
                ok = False
                try:
                    async for chunk in fn(endpoint, *args, **kwargs):
                        yield chunk
                    ok = True
                finally:
                    meter._end(begun, ok)

            return functools.wraps(fn)(stream_attempt)

        async def attempt(endpoint: Endpoint, *args: Any, **kwargs: Any) -> Any:
            begun = meter._begin(endpoint)
            ok = False
            try:
                result = await fn(endpoint, *args, **kwargs)
                ok = True
                return result
            finally:
                meter._end(begun, ok)

        return functools.wraps(fn)(attempt)

    # -- the call wrappers -----------------------------------------------------------------

    def route(
        self,
        routed: Callable[..., Any],
        fn: Callable[..., Any],
        tokens: Callable[..., object] | None,
    ) -> Callable[..., Any]:
        """The engine's route (``routed``, made of :meth:`attempts` of ``fn``) metered:
        reserve, run, settle."""
        meter = self

        def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
            return None if tokens is None else check_tokens(tokens(*args, **kwargs))

        if inspect.isasyncgenfunction(routed):

            async def stream(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
                charge = meter.reserve(estimate(args, kwargs), stream=True)
                try:
                    agen = routed(*args, **kwargs)
                    try:
                        # The engine copies the caller's context for its stream pumps
                        # during the first step: the charge must be current then, and
                        # only then (a generator must not leave it set in its consumer).
                        token = _CHARGE.set(charge)
                        try:
                            first = await agen.__anext__()
                        except StopAsyncIteration:
                            return
                        finally:
                            _CHARGE.reset(token)
                        yield first
                        async for item in agen:
                            yield item
                    finally:
                        await agen.aclose()
                finally:
                    meter.settle(charge)

            return functools.wraps(fn)(stream)

        async def call(*args: Any, **kwargs: Any) -> Any:
            charge = meter.reserve(estimate(args, kwargs))
            token = _CHARGE.set(charge)
            try:
                return await routed(*args, **kwargs)
            finally:
                _CHARGE.reset(token)
                meter.settle(charge)

        return functools.wraps(fn)(call)

    async def call(
        self,
        run: Callable[[Callable[..., Any]], Awaitable[Any]],
        fn: Callable[..., Any],
        tokens: float | None,
    ) -> Any:
        """``lb.call``: ``run(metered fn)`` between a reservation and its settlement."""
        charge = self.reserve(tokens)
        token = _CHARGE.set(charge)
        try:
            return await run(self.attempts(fn))
        finally:
            _CHARGE.reset(token)
            self.settle(charge)

    def pick(
        self, call: CallContext, fallback: bool = True, timeout: float | None = None
    ) -> MeteredPick:
        return MeteredPick(self, call, fallback, timeout)


class MeteredPick(PickedEndpoint):
    """``async with lb.pick() as endpoint:`` under a cost policy: this pool's pick
    reserves first (before the pick; a call shed at the budget may then be picked from
    the fallback pool, metered there), the block is the attempt, settle on exit."""

    __slots__ = ("_begun", "_charge", "_meter", "_token")

    def __init__(
        self,
        meter: Meter,
        call: CallContext,
        fallback: bool = True,
        timeout: float | None = None,
    ) -> None:
        super().__init__(meter.engine, call, fallback, timeout)
        self._meter = meter
        self._charge: Charge | None = None
        self._begun: Any = None
        self._token: Any = None

    async def _enter(self) -> Endpoint:
        meter = self._meter
        charge = meter.reserve(self._call.tokens)
        token = _CHARGE.set(charge)
        try:
            endpoint = await super()._enter()
            self._begun = meter._begin(endpoint)
        except BaseException:
            _CHARGE.reset(token)
            meter.settle(charge)
            raise
        self._charge = charge
        self._token = token
        return endpoint

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        charge = self._charge
        if charge is None:  # picked from the fallback pool (metered there), or not entered
            await super().__aexit__(exc_type, exc, tb)
            return
        meter = self._meter
        try:
            meter._end(self._begun, exc is None)
            await super().__aexit__(exc_type, exc, tb)
        finally:
            _CHARGE.reset(self._token)
            self._charge = self._token = None
            meter.settle(charge)
