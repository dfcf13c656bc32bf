"""`Balancer`: the façade that wires a pool, an engine and an observer together.

Everything a balancer does lives elsewhere: its checked configuration in
:mod:`lbclient._config`, its endpoints and what may be picked in :mod:`lbclient.pool`,
the call paths in :mod:`lbclient.engine`, events and counters in :mod:`lbclient.observe`.
This class validates, wires, and forwards.
"""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from ._clock import Clock
from ._config import BalancerConfig
from ._context import CallContext
from ._endpoint import Endpoint
from ._errors import BalancerClosed, ConfigError
from .admission.policy import Admission
from .engine.engine import Engine
from .engine.pick import PickedEndpoint
from .engine.route import check_async, check_timeout, check_tokens, make_route, run_call
from .observe.observer import Observer
from .observe.stats import BalancerStats, health_view, snapshot
from .policies.breaker import Breaker
from .policies.classify import is_endpoint_failure
from .policies.geo import GeoTable
from .policies.hedge import Hedge
from .policies.retry import Retry
from .pool.background import Background
from .pool.discovery import Discovery
from .pool.drain import Drain, DrainResult
from .pool.health import HealthCheck
from .pool.locality import Locality
from .pool.pool import Pool

__all__ = ["Balancer", "DrainResult"]

LOSER_GRACE = 1.0  # seconds aclose() gives cancelled hedge losers to finish their cleanup

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


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


class Balancer:
    """A pool of endpoints and the policies that spread calls over them.

    >>> lb = lbclient.Balancer(["http://10.0.1.10:8000", "http://10.0.1.11:8000"])
    >>> @lb.route
    ... async def complete(endpoint, payload): ...

    * ``endpoints`` -- URLs or :class:`Endpoint` objects (at least one; URLs unique).
    * ``strategy`` -- a name (see :mod:`lbclient.strategies`) or a strategy object;
      default ``"peak_ewma"``: P2C on latency x load, the best tail latency for replicas
      of unequal speed, at O(1) per pick.
    * ``retry`` / ``breaker`` / ``hedge`` -- policies, ``None`` disables each.
    * ``admission`` -- admission control (:class:`Admission`): a concurrency limit over
      the pool, a bounded fair queue, tenant quotas, fast shedding; ``None`` (default):
      every call goes straight to picking.
    * ``region`` -- this client's own region, for geo scoring and locality.
    * ``geo`` -- the :class:`GeoTable` of region latencies (default: the playbook table).
    * ``on_event`` -- a callable, a :class:`Listener` or a list of them, given every
      event (breaker, panic, membership, cooldown, attempt, retry, hedge); events are
      also logged on the ``lbclient`` logger.
    * ``ewma_decay`` -- seconds for the latency EWMA to forget (default 10 s, as Finagle).
    * ``slow_start`` -- seconds over which an endpoint added later, or back from ejection,
      ramps from 10% to its full weight (Envoy's ``slow_start_window``; default off).
    * ``locality`` -- keep traffic in ``region`` while it is healthy and not saturated
      (``True`` or a :class:`Locality`); spills to the next-closest region otherwise.
    * ``health`` -- active health checks (:class:`HealthCheck`), default off.
    * ``discovery`` -- a provider that refreshes the endpoint set (DNS, a callable...);
      ``endpoints`` may then be empty -- use ``async with`` (or ``await lb.start()``) so
      the first resolution completes before the first call.
    * ``clock`` / ``rng`` -- injectable time and randomness (an int seeds a Random).

    A balancer lives on one event loop thread at a time; it may be used by several
    event loops one after another (``asyncio.run`` twice).
    """

    def __init__(
        self,
        endpoints: Iterable[Endpoint | str],
        *,
        strategy: object = "peak_ewma",
        retry: Retry | None = None,
        breaker: Breaker | None = None,
        hedge: Hedge | None = None,
        admission: Admission | None = None,
        region: str | None = None,
        geo: GeoTable | None = None,
        on_event: object = None,
        ewma_decay: float = 10.0,
        slow_start: float | None = None,
        locality: Locality | bool | None = None,
        health: HealthCheck | None = None,
        discovery: Discovery | None = None,
        clock: Clock | None = None,
        rng: random.Random | int | None = None,
    ) -> None:
        cfg = BalancerConfig(
            endpoints=endpoints,
            strategy=strategy,
            retry=retry,
            breaker=breaker,
            hedge=hedge,
            admission=admission,
            region=region,
            geo=geo,
            on_event=on_event,
            ewma_decay=ewma_decay,
            slow_start=slow_start,
            locality=locality,
            health=health,
            discovery=discovery,
            clock=clock,
            rng=rng,
        )
        self._config = cfg
        self._observer = Observer(cfg.on_event, now=cfg.clock.now)
        self._pool = Pool(
            strategy=cfg.strategy,
            breaker=cfg.breaker,
            health=cfg.health is not None,
            slow_start=cfg.slow_start,
            locality=cfg.locality,
            region=cfg.region,
            geo=cfg.geo,
            decay=cfg.ewma_decay,
            clock=cfg.clock,
            rng=cfg.rng,
            observer=self._observer,
            is_failure=cfg.breaker.is_failure if cfg.breaker is not None else is_endpoint_failure,
            cooldown_cap=_cooldown_cap(cfg.retry),
        )
        self._engine = Engine(
            self._pool,
            self._observer,
            retry=cfg.retry,
            hedge=cfg.hedge,
            clock=cfg.clock,
            rng=cfg.rng,
            admission=cfg.admission,
        )
        self._background = Background(self._pool, self._engine, cfg.discovery, cfg.health)
        for ep in cfg.endpoints:
            self._pool.add(ep, initial=True)
        self._pool.refresh()
        if self._background.wanted:
            self._pool.on_refresh = self._background.ensure
            self._pool.invalidate()  # the first pick starts the background work

    # -- the three ways to call -------------------------------------------------------------

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
        """
        self._check_open()
        options = functools.partial(
            make_route,
            self._engine,
            key=key,
            timeout=timeout,
            idle_timeout=idle_timeout,
            tenant=tenant,
            tokens=tokens,
            priority=priority,
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
        **kwargs: Any,
    ) -> R:
        """``await lb.call(fn, *args, **kwargs)`` runs ``fn(endpoint, *args, **kwargs)``
        like a decorated function would.  ``key``, ``tenant``, ``tokens`` and ``priority``
        are this call's values themselves (see :meth:`route`); to pass arguments of those
        names to ``fn``, bind them with ``functools.partial``."""
        check_async(fn, "lb.call", streams=False)
        retry = self._engine.retry
        call = CallContext(
            key=key,
            tenant=tenant,
            tokens=check_tokens(tokens),
            timeout=retry.timeout if retry is not None else None,
            priority=_priority(priority),
        )
        return await run_call(self._engine, fn, args, kwargs, call)  # type: ignore[no-any-return]

    def pick(
        self,
        *,
        key: object = None,
        timeout: float | None = None,
        tenant: object = None,
        tokens: float | None = None,
        priority: int = 0,
    ) -> PickedEndpoint:
        """``async with lb.pick() as endpoint:`` -- one attempt for code that cannot be
        decorated; an exception leaving the block is recorded as that endpoint's failure
        (when it is the endpoint's fault).  ``timeout`` bounds the block (default:
        ``Retry.timeout``): past it the block is cancelled, the endpoint charged, and
        :class:`DeadlineExceeded` raised.  ``tenant``/``tokens``/``priority``: as for
        :meth:`route`, under :class:`Admission`."""
        retry = self._engine.retry
        seconds = check_timeout(timeout)
        if seconds is None and retry is not None:
            seconds = retry.timeout
        call = CallContext(
            key=key,
            tenant=tenant,
            tokens=check_tokens(tokens),
            timeout=seconds,
            priority=_priority(priority),
        )
        return PickedEndpoint(self._engine, call)

    # -- membership -------------------------------------------------------------------------

    def add(self, endpoint: Endpoint | str) -> Endpoint:
        """Add an endpoint; it is pickable at once.  A URL already present is a ConfigError."""
        self._check_open()
        return self._pool.add(endpoint)

    def remove(self, url: str) -> Endpoint:
        """Remove an endpoint at once.  Calls in flight on it finish normally (to let them
        finish *before* removal, ``await lb.drain(url)`` first)."""
        return self._pool.remove(url)

    def drain(self, url: str, *, timeout: float | None = None) -> Drain:
        """Stop new picks of ``url`` now; ``await`` the result to wait until it is idle.

        The endpoint stays a member (state ``"draining"`` in stats) until you ``remove``
        it or ``undrain`` it.  Awaiting returns a :class:`DrainResult`; with ``timeout``
        (seconds) it returns when the time is up, saying how many calls still run.
        Typical use on a spot interruption notice (2 minutes)::

            result = await lb.drain(url, timeout=110)
            lb.remove(url)
        """
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0
        ):
            raise ConfigError(f"drain timeout must be a number of seconds >= 0, got {timeout!r}")
        return Drain(self._pool.drain(url), self._pool.clock, timeout)

    def undrain(self, url: str) -> None:
        """Make a draining endpoint pickable again."""
        self._pool.undrain(url)

    def sync(self, endpoints: Iterable[Endpoint | str]) -> None:
        """Make the pool exactly ``endpoints`` (what discovery calls on every refresh): new
        URLs are added, missing ones drained and removed once idle (also those you were
        already draining), survivors keep their statistics."""
        self._check_open()
        self._pool.sync(endpoints)

    def set_health(self, url: str, healthy: bool) -> None:
        """Mark an endpoint up or down (what active health checks call).  Down: no new
        picks (with a breaker: it opens).  Up again: with a breaker, the next call is a
        half-open probe; without one, it is pickable at once."""
        self._pool.set_health(url, healthy)

    def report_load(self, endpoint: Endpoint | str, load: float | str | None) -> None:
        """Tell the balancer the replica's own load, e.g. its ``x-queue-depth`` header:
        load-aware strategies use the larger of our in-flight count and this value for
        the next 2 seconds (it sees the other clients' requests too).  Unknown endpoints
        and unparsable values are ignored (a bad header must never fail a call)."""
        self._pool.report_load(endpoint, load)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every member, draining ones included, in insertion order."""
        return tuple(s.endpoint for s in self._pool.members.values())

    # -- lifecycle --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._pool.closed:
            raise BalancerClosed("this lbclient.Balancer is closed; create a new one")

    @property
    def closed(self) -> bool:
        return self._pool.closed

    async def start(self) -> None:
        """Start background work (discovery, health checks) and wait for the first
        discovery result.  ``async with`` does this; otherwise the first call does."""
        self._check_open()
        await self._background.start()

    async def aclose(self, timeout: float | None = None) -> None:
        """Close: new calls raise :class:`BalancerClosed` at once, background work
        (health checks, discovery) stops.  Idempotent.

        ``timeout=None`` (default) closes now; calls in flight finish on their own (their
        retries still run; no new hedges are sent), and hedge backups that already lost
        get up to a second to finish their cleanup.
        ``timeout=seconds`` -- graceful shutdown (SIGTERM): stop taking calls now, then
        wait up to that long for the ones in flight to finish before stopping the rest.
        """
        seconds = check_timeout(timeout)
        if self._pool.closed:
            return
        self._pool.close()
        hedger = self._engine.hedger
        if seconds is not None:
            start = self._pool.now()
            await self._pool.wait_idle(seconds)
            seconds = max(0.0, seconds - (self._pool.now() - start))
        if hedger is not None:
            hedger.close()
            await hedger.wait_backups(LOSER_GRACE if seconds is None else seconds)
        await self._background.stop()

    async def __aenter__(self) -> Balancer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- seeing what happened ---------------------------------------------------------------

    def stats(self) -> BalancerStats:
        """An immutable snapshot of every endpoint and the call totals."""
        return snapshot(self._pool, self._engine)

    def ready(self) -> bool:
        """For a readiness probe: open, and at least one endpoint may be picked now."""
        pool = self._pool
        if pool.closed:
            return False
        if pool.now() >= pool.next_refresh:
            pool.refresh()
        return bool(pool.snap.pickable)

    def health(self) -> dict[str, Any]:
        """A JSON-able view for a debug page: readiness, panic, admission and each
        endpoint's state (pickable, breaker, in flight, latency, cooldown, counters)."""
        return health_view(self.stats(), self.ready())

    def __repr__(self) -> str:
        closed = " closed" if self._pool.closed else ""
        return (
            f"<lbclient.Balancer strategy={self._pool.strategy.name!r} "
            f"endpoints={len(self._pool.members)}{closed}>"
        )


def _priority(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"priority must be an int, got {value!r}")
    return value


def _cooldown_cap(retry: Retry | None) -> float | None:
    """How long a ``Retry-After`` may keep an endpoint out (None: not at all)."""
    if retry is None:
        return 30.0
    return retry.max_retry_after if retry.respect_retry_after else None
