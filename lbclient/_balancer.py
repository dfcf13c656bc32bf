"""`Balancer`: the façade that wires a pool, an engine and an observer together.

Everything a balancer does lives elsewhere: its checked configuration in
:mod:`lbclient._config`, its endpoints and what may be picked in :mod:`lbclient.pool`,
the call paths in :mod:`lbclient.engine`, events and counters in :mod:`lbclient.observe`.
This class validates, wires, and forwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from ._calls import Calls
from ._clock import Clock
from ._config import BalancerConfig, chain_of
from ._endpoint import Endpoint
from ._errors import ConfigError
from ._runtime import build, shutdown
from .admission.policy import Admission
from .admission.spend import SpendStats, spend_stats
from .engine.route import check_timeout
from .observe.stats import BalancerStats, health_view, snapshot
from .policies.breaker import Breaker
from .policies.cost import CostPolicy
from .policies.geo import GeoTable
from .policies.hedge import Hedge
from .policies.retry import Retry
from .pool.discovery import Discovery
from .pool.drain import Drain, DrainResult
from .pool.health import HealthCheck
from .pool.locality import Locality
from .shared.policy import RedisState

__all__ = ["Balancer", "DrainResult"]


class Balancer(Calls):
    """A pool of endpoints and the policies that spread calls over them.

    >>> lb = lbclient.Balancer(["http://10.0.1.10:8000", "http://10.0.1.11:8000"])
    >>> @lb.route
    ... async def complete(endpoint, payload): ...

    * ``endpoints`` -- URLs or :class:`Endpoint` objects (at least one; URLs unique).
    * ``strategy`` -- a name (see :mod:`lbclient.strategies`) or a strategy object;
      default ``"peak_ewma"``: the lowest latency x load among up to 16 endpoints, the
      best tail latency for replicas of unequal speed.
    * ``retry`` / ``breaker`` / ``hedge`` -- policies, ``None`` disables each.
    * ``admission`` -- admission control (:class:`Admission`): a concurrency limit over
      the pool, a bounded fair queue, tenant quotas, fast shedding; ``None`` (default):
      every call goes straight to picking.
    * ``shared`` -- share what this process learns with the other processes of the
      fleet through Redis (:class:`RedisState`): ejections, Retry-After cooldowns,
      fleet-wide tenant quotas, the live process count.  Nothing on a call's path waits
      for Redis; an outage degrades to per-process behaviour (quotas / live processes).
      ``None`` (default): this process learns alone.
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
    * ``cost`` -- a :class:`CostPolicy`: prefer cheaper endpoints (priced in their
      ``metadata``) while their latency stays near the best, track spend, and shed
      calls with ``Overloaded("budget")`` at a ceiling per period (see :meth:`spend`).
    * ``fallback`` -- another balancer (a model group: a vendor API behind a
      self-hosted fleet, a smaller model behind a bigger one) that takes the calls this
      pool cannot serve: nothing pickable, attempts exhausted, shed by admission.  It
      may have its own fallback; a chain with a cycle is a ConfigError.  When every
      pool fails, :class:`PoolsExhausted` says what each one tried.  Opt out per call
      with ``fallback=False`` (``route``, ``call``, ``pick``).
    * ``name`` -- what errors and logs call this pool (default: its first endpoint).

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
        shared: RedisState | None = None,
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
        cost: CostPolicy | None = None,
        fallback: Balancer | None = None,
        name: str | None = None,
    ) -> None:
        # Every parameter, checked in one place (a ConfigError names the bad value).
        cfg = BalancerConfig(**{k: v for k, v in locals().items() if k != "self"})
        if cfg.fallback is not None:
            chain_of(cfg.fallback, start=self)  # a -> b -> a: refused
        self._config = cfg
        self._observer, self._pool, self._engine, self._background = build(cfg)
        if cfg.cost is not None:
            from .engine.metered import Meter

            book = getattr(self._pool.strategy, "book", None)  # the picker's prices
            self._meter = Meter(self._engine, cfg.cost, book)

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
        return Drain.of(self._pool, url, timeout)

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
    def fallback(self) -> Balancer | None:
        """The balancer that takes the calls this one cannot serve (or None)."""
        return self._config.fallback  # type: ignore[no-any-return]

    @property
    def name(self) -> str | None:
        """This pool's name (``name=``), or None."""
        return self._config.name

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every member, draining ones included, in insertion order."""
        return tuple(s.endpoint for s in self._pool.members.values())

    # -- lifecycle --------------------------------------------------------------------------

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
        await shutdown(self._pool, self._engine, self._background, check_timeout(timeout))

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

    def spend(self) -> SpendStats:
        """What the :class:`CostPolicy` has counted: spend this period and since the
        start, reservations in flight, calls shed at the ceiling, spend per endpoint.
        Without ``cost=``: a :class:`~lbclient.ConfigError`."""
        if self._meter is None:
            raise ConfigError(
                "lb.spend() needs a cost policy: Balancer(..., cost=lbclient.CostPolicy())"
            )
        return spend_stats(self._meter.ledger, self._pool.now())

    def ready(self) -> bool:
        """For a readiness probe: open, and at least one endpoint may be picked now."""
        return self._pool.ready()

    def health(self) -> dict[str, Any]:
        """A JSON-able view for a debug page: readiness, panic, admission and each
        endpoint's state (pickable, breaker, in flight, latency, cooldown, counters)."""
        return health_view(self.stats(), self.ready())

    def __repr__(self) -> str:
        closed = " closed" if self._pool.closed else ""
        name = "" if self._config.name is None else f" name={self._config.name!r}"
        return (
            f"<lbclient.Balancer{name} strategy={self._pool.strategy.name!r} "
            f"endpoints={len(self._pool.members)}{closed}>"
        )
