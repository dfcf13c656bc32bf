"""`Balancer`: owns the pool, its runtime state and the pickable snapshot.

The balancer is the only writer of endpoint state.  Picking is synchronous: it reads an
immutable snapshot (the tuple of pickable endpoints and the strategy's picker built over
it), which is rebuilt only when membership or availability changes -- never per call.
The call engine (``_call.py``) and the decorator (``_route.py``) sit on top.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar, overload

from . import _call
from . import strategies as _strategies
from ._breaker import Breaker
from ._classify import is_endpoint_failure
from ._clock import MONOTONIC, Clock
from ._endpoint import Endpoint, to_endpoint
from ._errors import BalancerClosed, ConfigError, NoEndpointAvailable, UnknownEndpoint
from ._events import Event, MembershipEvent, PanicEvent
from ._geo import GeoTable
from ._hedge import Hedge, run_hedged
from ._locality import Locality, LocalityPicker, nearest_tier
from ._retry import Retry
from ._route import PickedEndpoint, make_route
from ._state import EndpointState
from ._stats import BalancerStats, EndpointStats, _quantile
from .strategies import PickContext, Picker, Totals

if TYPE_CHECKING:
    from ._budget import Budget
    from ._discovery import Discovery
    from ._health import HealthCheck

__all__ = ["Balancer", "DrainResult"]

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


log = logging.getLogger("lbclient")

_DEFAULT_COST = 0.05  # seconds: the latency prior of a pool with no samples yet
_FAILURE_PENALTY = 4.0  # a failure counts as this many times the current latency estimate
_MAX_PENALTY = 10.0  # seconds: the penalty stops growing here (it decays from there)
_PANIC_PICK = -1  # probe token of a call sent to an ejected endpoint in panic mode
_MIN_RAMP = 0.1  # slow start begins at 10% of the weight (Envoy's min_weight_percent)


def _check_policy(name: str, value: object, cls: type) -> None:
    if value is not None and not isinstance(value, cls):
        raise ConfigError(f"{name} must be an lbclient.{cls.__name__} or None, got {value!r}")


def _pick_now_of(picker: Picker | None) -> Callable[[float], EndpointState | None]:
    """The fast path's pick: ``picker.pick_now(now)`` where a built-in picker offers it."""
    if picker is None:
        return lambda now: None
    pick_now = getattr(picker, "pick_now", None)
    if callable(pick_now):
        return pick_now  # type: ignore[no-any-return]
    pick = picker.pick
    return lambda now: pick(None, None)


class DrainResult:
    """What ``await lb.drain(url)`` returns: whether the endpoint went idle in time."""

    __slots__ = ("idle", "in_flight", "url", "waited")

    def __init__(self, url: str, idle: bool, in_flight: int, waited: float) -> None:
        self.url, self.idle, self.in_flight, self.waited = url, idle, in_flight, waited

    def __repr__(self) -> str:
        return (
            f"lbclient.DrainResult(url={self.url!r}, idle={self.idle}, "
            f"in_flight={self.in_flight}, waited={self.waited:.3f})"
        )


class _Drain:
    """Awaitable returned by ``lb.drain()``: the draining itself already happened."""

    __slots__ = ("_lb", "_state", "_timeout")

    def __init__(self, lb: Balancer, state: EndpointState, timeout: float | None) -> None:
        self._lb, self._state, self._timeout = lb, state, timeout

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> DrainResult:
        s = self._state
        t0 = self._lb._clock.now()
        if s.inflight > 0:
            if s.idle is None:
                s.idle = asyncio.Event()
            s.idle.clear()
            if s.inflight > 0:
                try:
                    async with asyncio.timeout(self._timeout):
                        while s.inflight > 0:
                            await s.idle.wait()
                            s.idle.clear()
                except TimeoutError:
                    log.warning(
                        "drain of %s timed out after %ss with %d call(s) still in flight",
                        s.url,
                        self._timeout,
                        s.inflight,
                    )
        waited = self._lb._clock.now() - t0
        return DrainResult(s.url, s.inflight == 0, s.inflight, waited)


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
    * ``region`` -- this client's own region, for geo scoring and locality.
    * ``geo`` -- the :class:`GeoTable` of region latencies (default: the playbook table).
    * ``on_event`` -- called with every breaker, panic and membership event (also logged
      on the ``lbclient`` logger).
    * ``ewma_decay`` -- seconds for the latency EWMA to forget (default 10 s, as Finagle).
    * ``slow_start`` -- seconds over which an endpoint added later, or back from ejection,
      ramps from 10% to its full weight (Envoy's ``slow_start_window``; default off).
    * ``locality`` -- keep traffic in ``region`` while it is healthy (``True`` or a
      :class:`Locality`); spills to the next-closest region otherwise.
    * ``health`` -- active health checks (:class:`HealthCheck`), default off.
    * ``discovery`` -- a provider that refreshes the endpoint set (DNS, a callable...);
      ``endpoints`` may then be empty -- use ``async with`` (or ``await lb.start()``) so
      the first resolution completes before the first call.
    * ``clock`` / ``rng`` -- injectable time and randomness (an int seeds a Random).
    """

    def __init__(
        self,
        endpoints: Iterable[Endpoint | str],
        *,
        strategy: object = "peak_ewma",
        retry: Retry | None = None,
        breaker: Breaker | None = None,
        hedge: Hedge | None = None,
        region: str | None = None,
        geo: GeoTable | None = None,
        on_event: Callable[[Event], None] | None = None,
        ewma_decay: float = 10.0,
        slow_start: float | None = None,
        locality: Locality | bool | None = None,
        health: HealthCheck | None = None,
        discovery: Discovery | None = None,
        clock: Clock | None = None,
        rng: random.Random | int | None = None,
    ) -> None:
        if isinstance(endpoints, str | Endpoint) or not isinstance(endpoints, Iterable):
            raise ConfigError(f"endpoints must be a list of URLs or Endpoints, got {endpoints!r}")
        eps = [to_endpoint(e) for e in endpoints]
        if not eps and discovery is None:
            raise ConfigError("endpoints must not be empty (or give discovery=): got []")
        if slow_start is not None and (
            isinstance(slow_start, bool)
            or not isinstance(slow_start, int | float)
            or not math.isfinite(slow_start)
            or slow_start <= 0
        ):
            raise ConfigError(
                f"slow_start must be a number of seconds > 0 or None, got {slow_start!r}"
            )
        if locality is True:
            locality = Locality()
        elif locality is False:
            locality = None
        if locality is not None and not isinstance(locality, Locality):
            raise ConfigError(
                f"locality must be True, False, None or an lbclient.Locality, got {locality!r}"
            )
        if locality is not None and region is None:
            raise ConfigError("locality needs the client's own region: pass region=")
        if health is not None and not callable(getattr(health, "check_loop", None)):
            raise ConfigError(f"health must be an lbclient.HealthCheck or None, got {health!r}")
        if discovery is not None and not callable(getattr(discovery, "resolve", None)):
            raise ConfigError(
                f"discovery must have an async resolve() method (lbclient.DnsDiscovery, "
                f"lbclient.CallableDiscovery, ...), got {discovery!r}"
            )
        if region is not None and (not isinstance(region, str) or not region.strip()):
            raise ConfigError(f"region must be a non-empty str or None, got {region!r}")
        if geo is not None and not isinstance(geo, GeoTable):
            raise ConfigError(f"geo must be an lbclient.GeoTable or None, got {geo!r}")
        if (
            isinstance(ewma_decay, bool)
            or not isinstance(ewma_decay, int | float)
            or not math.isfinite(ewma_decay)
            or ewma_decay <= 0
        ):
            raise ConfigError(
                f"ewma_decay must be a finite number of seconds > 0, got {ewma_decay!r}"
            )
        if on_event is not None and not callable(on_event):
            raise ConfigError(f"on_event must be callable or None, got {on_event!r}")
        if clock is not None and not isinstance(clock, Clock):
            raise ConfigError(f"clock must implement lbclient.Clock (now, sleep), got {clock!r}")
        if rng is not None and (isinstance(rng, bool) or not isinstance(rng, random.Random | int)):
            raise ConfigError(f"rng must be a random.Random, an int seed or None, got {rng!r}")
        _check_policy("retry", retry, Retry)
        _check_policy("breaker", breaker, Breaker)
        _check_policy("hedge", hedge, Hedge)

        self._strategy = _strategies.resolve(strategy)
        self._clock: Clock = clock if clock is not None else MONOTONIC
        self._now = self._clock.now
        self._rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        self._region = region.strip() if region else None
        self._geo = geo
        self._on_event = on_event
        self._decay = float(ewma_decay)
        self._retry = retry
        self._breaker = breaker
        self._hedge = hedge
        self._is_failure: Callable[[BaseException], bool] = (
            breaker.is_failure if breaker is not None else is_endpoint_failure
        )
        self._budget: Budget | None = retry.make_budget(self._clock) if retry is not None else None
        self._totals = Totals()
        self._ctx = PickContext(
            clock=self._clock, rng=self._rng, totals=self._totals, region=self._region, geo=geo
        )
        self._slow_start = None if slow_start is None else float(slow_start)
        self._locality: Locality | None = locality
        self._health = health
        self._discovery = discovery
        self._started = False
        self._constructed = False  # background work starts with the first call, not here
        self._discovered = False  # has start() seen a first discovery result
        self._members: dict[str, EndpointState] = {}
        self._picker: Picker | None = None
        self._pick_now: Callable[[float], EndpointState | None] = _pick_now_of(None)
        self._pickable: tuple[EndpointState, ...] = ()
        # When the snapshot must be rebuilt: a time (breaker cooldown, slow-start step),
        # or -inf for "now" (membership, health or breaker changed; closed).  One float
        # compare per call is all the hot path pays.
        self._next_refresh = math.inf
        self._panic = False
        self._probes_due: list[EndpointState] = []
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # call-level counters
        self._calls = 0
        self._calls_failed = 0
        self._retries = 0
        self._retries_denied = 0
        self._hedges_sent = 0
        self._hedges_won = 0
        self._hedges_denied = 0
        self._hedger: Any = None
        if hedge is not None:
            from ._hedge import Hedger

            self._hedger = Hedger(hedge, self._clock, self)
        seen: set[str] = set()
        for ep in eps:
            if ep.url in seen:
                raise ConfigError(f"duplicate endpoint url {ep.url!r}")
            seen.add(ep.url)
            self._members[ep.url] = self._new_state(ep)
            st = self._members[ep.url]
            st.ramp_from = None  # the initial pool needs no slow start
            st.weight = ep.weight
        self._rebuild()
        self._constructed = True
        self._next_refresh = -math.inf  # the first pick starts background work, if any

    # -- membership ------------------------------------------------------------------------

    def _new_state(self, ep: Endpoint) -> EndpointState:
        now = self._now()
        # A newcomer starts at the pool's median latency: optimistic (it has no queue, so
        # it wins most comparisons) but not absurdly so (a zero estimate would flood it).
        cost = self._typical_cost(now)
        s = EndpointState(ep, now=now, decay=self._decay, cost=cost)
        if self._slow_start is not None:
            s.ramp_from = now
            s.weight = ep.weight * _MIN_RAMP
        if self._breaker is not None:
            from ._breaker import BreakerState

            s.breaker = BreakerState(self._breaker, ep.url, rng=self._rng, emit=self._emit)
        return s

    def add(self, endpoint: Endpoint | str) -> Endpoint:
        """Add an endpoint; it is pickable at once.  A URL already present is a ConfigError."""
        self._check_open()
        ep = to_endpoint(endpoint)
        if ep.url in self._members:
            raise ConfigError(f"endpoint {ep.url!r} is already in the pool")
        self._members[ep.url] = self._new_state(ep)
        self._next_refresh = -math.inf
        self._emit(MembershipEvent(url=ep.url, action="add", at=self._now()))
        return ep

    def remove(self, url: str) -> Endpoint:
        """Remove an endpoint at once.  Calls in flight on it finish normally.

        To let in-flight calls finish *before* removal, ``await lb.drain(url)`` first.
        """
        s = self._state_of(url)
        del self._members[s.url]
        self._next_refresh = -math.inf
        self._emit(MembershipEvent(url=s.url, action="remove", at=self._now()))
        return s.endpoint

    def drain(self, url: str, *, timeout: float | None = None) -> _Drain:
        """Stop new picks of ``url`` now; ``await`` the result to wait until it is idle.

        The endpoint stays a member (state ``"draining"`` in stats) until you ``remove``
        it or ``undrain`` it.  Awaiting returns a :class:`DrainResult`; with ``timeout``
        (seconds) it returns when the time is up, saying how many calls still run.
        Typical use on a spot interruption notice (2 minutes)::

            result = await lb.drain(url, timeout=110)
            lb.remove(url)
        """
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not timeout >= 0  # also rejects NaN
        ):
            raise ConfigError(f"drain timeout must be a number of seconds >= 0, got {timeout!r}")
        s = self._state_of(url)
        if not s.draining:
            s.draining = True
            self._next_refresh = -math.inf
            self._emit(MembershipEvent(url=s.url, action="drain", at=self._now()))
        return _Drain(self, s, timeout)

    def undrain(self, url: str) -> None:
        """Make a draining endpoint pickable again."""
        s = self._state_of(url)
        if s.draining:
            s.draining = False
            self._next_refresh = -math.inf
            self._emit(MembershipEvent(url=s.url, action="undrain", at=self._now()))

    def report_load(self, endpoint: Endpoint | str, load: float | str | None) -> None:
        """Tell the balancer the replica's own load, e.g. its ``x-queue-depth`` header.

        ``peak_ewma``, ``power_of_two``, ``least_*`` and ``geo`` then use the larger of our
        in-flight count and this value for the next 2 seconds -- it sees the other
        clients' requests too.  Unknown endpoints and unparsable values are ignored (a
        bad header must never fail a call)::

            lb.report_load(endpoint, r.headers.get("x-queue-depth"))
        """
        if load is None:
            return
        url = endpoint.url if isinstance(endpoint, Endpoint) else endpoint
        s = self._members.get(url.rstrip("/") if isinstance(url, str) else url)
        if s is None:
            return
        try:
            value = float(load)
        except (TypeError, ValueError):
            return
        if math.isfinite(value) and value >= 0:
            s.server_load = value
            s.server_load_at = self._now()

    def sync(self, endpoints: Iterable[Endpoint | str]) -> None:
        """Make the pool exactly ``endpoints`` (what discovery calls on every refresh).

        New URLs are added, missing ones are drained and removed once idle, survivors
        keep their statistics (a changed weight or region is taken over).
        """
        self._check_open()
        wanted: dict[str, Endpoint] = {}
        for e in endpoints:
            ep = to_endpoint(e)
            wanted[ep.url] = ep
        for url, ep in wanted.items():
            s = self._members.get(url)
            if s is None:
                self.add(ep)
                continue
            if s.draining:
                self.undrain(url)
            if s.endpoint != ep:
                ratio = s.weight / s.endpoint.weight
                s.endpoint = ep
                s.weight = ep.weight * ratio
                self._next_refresh = -math.inf
        for url in [u for u in self._members if u not in wanted]:
            s = self._members[url]
            if s.inflight == 0:
                self.remove(url)
            elif not s.draining:
                drain = self.drain(url)
                self._spawn(self._remove_when_idle(url, drain))

    async def _remove_when_idle(self, url: str, drain: _Drain) -> None:
        await drain
        s = self._members.get(url)
        if s is not None and s.draining:
            self.remove(url)

    def set_health(self, url: str, healthy: bool) -> None:
        """Mark an endpoint up or down (what active health checks call).

        Down: no new picks (with a breaker: it opens).  Up again: with a breaker, the
        next call is a half-open probe; without one, it is pickable at once.
        """
        s = self._state_of(url)
        now = self._now()
        b = s.breaker
        if not healthy:
            if not s.health_down:
                s.health_down = True
                self._next_refresh = -math.inf
                if b is not None:
                    b.force_open(now)
        elif s.health_down:
            s.health_down = False
            self._next_refresh = -math.inf
            if b is not None:
                b.allow_probe(now)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_background(self) -> None:
        """Start discovery and health checks once an event loop runs."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # not in a loop yet: the next pick will try again
        self._started = True
        if self._discovery is not None:
            from ._discovery import discovery_loop

            self._spawn(discovery_loop(self, self._discovery))
        if self._health is not None:
            self._spawn(self._health.check_loop(self))

    async def start(self) -> None:
        """Start background work (discovery, health checks) and wait for the first
        discovery result.  ``async with`` does this; otherwise the first call does."""
        self._check_open()
        if self._discovery is not None and not self._discovered:
            from ._discovery import refresh_once

            self._discovered = await refresh_once(self, self._discovery)
        if not self._started:
            self._start_background()

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every member, draining ones included, in insertion order."""
        return tuple(s.endpoint for s in self._members.values())

    def _state_of(self, url: str) -> EndpointState:
        key = url.rstrip("/") if isinstance(url, str) else url
        try:
            return self._members[key]
        except (KeyError, TypeError):
            raise UnknownEndpoint(f"no endpoint {url!r} in the pool") from None

    # -- the snapshot ----------------------------------------------------------------------

    def _rebuild(self) -> None:
        """Recompute the pickable set and the strategy's picker over it."""
        now = self._now()
        members = [s for s in self._members.values() if not s.draining]
        pickable: list[EndpointState] = []
        ejected: list[EndpointState] = []
        next_refresh = math.inf
        if not self._started and self._constructed:
            self._start_background()
        ramp = self._slow_start
        for s in members:
            if s.ramp_from is not None and ramp is not None:
                # Slow start: weight grows linearly from 10% to 100% over the window.
                f = (now - s.ramp_from) / ramp
                if f >= 1.0:
                    s.ramp_from = None
                    s.weight = s.endpoint.weight
                else:
                    s.weight = s.endpoint.weight * max(_MIN_RAMP, f)
                    next_refresh = min(next_refresh, now + ramp / 10)
            b = s.breaker
            if s.health_down:
                ejected.append(s)
            elif b is None or b.available(now):
                pickable.append(s)
            else:
                ejected.append(s)
            if b is not None:
                nc = b.next_change(now)
                if nc is not None and nc < next_refresh:
                    next_refresh = nc
        panic = False
        healthy = len(pickable)
        if ejected and (self._breaker is not None or self._health is not None):
            # Never eject more than max_ejection of the pool (Envoy's panic threshold):
            # past it, serve from the ejected endpoints that failed least recently.
            max_ejection = self._breaker.max_ejection if self._breaker is not None else 0.5
            # members - floor(share x members), with a hair of slack for float error
            # (0.7 x 10 must allow exactly 7 ejections, not 6).
            need = len(members) - math.floor(max_ejection * len(members) + 1e-9)
            if max_ejection < 1.0:
                need = max(1, need)  # max_ejection=1.0 is the only way to eject everything
            if healthy < need:
                panic = True
                ejected.sort(key=lambda s: s.last_failure)
                pickable.extend(ejected[: need - healthy])
        for s in self._members.values():
            s.available = False
        for s in pickable:
            s.available = True
        if panic != self._panic:
            self._panic = panic
            self._emit(PanicEvent(entered=panic, at=now, pickable=healthy, total=len(members)))
        # Half-open endpoints with a free probe slot get the next pick outright: a
        # load-aware strategy would otherwise avoid them (their EWMA still carries the
        # failure penalty) and the breaker would never learn they recovered.
        self._probes_due = [
            s for s in pickable if s.breaker is not None and s.breaker.state == "half_open"
        ]
        self._pickable = tuple(pickable)
        self._picker = self._strategy.picker(self._pickable, self._ctx) if pickable else None
        self._pick_now = _pick_now_of(self._picker)
        loc = self._locality
        if loc is not None and pickable and self._picker is not None:
            table = self._geo or GeoTable.default()
            distance = {
                s.endpoint.region: table.latency(self._region, s.endpoint.region)
                for s in self._members.values()
            }
            # Draining endpoints count as unhealthy members of their region.
            tier = nearest_tier(pickable, list(self._members.values()), distance, loc.min_healthy)
            if len(tier) < len(pickable):
                self._picker = LocalityPicker(
                    self._strategy.picker(tier, self._ctx), self._picker, loc.spill_inflight
                )
        self._next_refresh = -math.inf if self._closed else next_refresh

    def _acquire(
        self, key: object, exclude: Collection[EndpointState] | None, now: float
    ) -> tuple[EndpointState, int]:
        """Pick an endpoint and take an in-flight slot on it.  Synchronous."""
        if now >= self._next_refresh:
            self._rebuild()
        picker = self._picker
        if picker is None:
            raise NoEndpointAvailable(self._why_empty())
        s = None
        if self._probes_due:
            s = self._probes_due.pop()
            if (exclude and s in exclude) or s.breaker is None or s.breaker.state != "half_open":
                s = None
        if s is None:
            s = picker.pick(key, exclude)
        if s is None:
            s = picker.pick(key, None)
            if s is None:
                raise NoEndpointAvailable(self._why_empty())
        probe = 0
        b = s.breaker
        if b is not None and b.state != "closed":
            probe = b.on_pick(now)
            if probe == 0 and b.state == "open":
                probe = _PANIC_PICK  # an ejected endpoint served because of panic mode
            self._next_refresh = -math.inf  # a half-open probe slot was taken
        n = s.inflight + 1
        s.inflight = n
        if n > s.peak_inflight:
            s.peak_inflight = n
        s.requests += 1
        self._totals.inflight += 1
        return s, probe

    def _typical_cost(self, now: float, skip: EndpointState | None = None) -> float:
        costs = sorted(
            s.ewma(now)
            for s in self._members.values()
            if s.requests and s is not skip and s.available and s.failures < s.requests
        )
        return costs[len(costs) // 2] if costs else _DEFAULT_COST

    def _acquire_first(self, key: object, now: float) -> tuple[EndpointState, int]:
        """The first pick of a call: a failure to pick is a failed call."""
        try:
            return self._acquire(key, None, now)
        except NoEndpointAvailable:
            self._calls_failed += 1
            raise

    def _why_empty(self) -> str:
        if self._closed:
            return "the balancer is closed"
        if not self._members:
            return "the pool is empty (every endpoint was removed)"
        draining = sum(1 for s in self._members.values() if s.draining)
        if draining == len(self._members):
            return f"all {draining} endpoint(s) are draining"
        return f"no endpoint is pickable ({len(self._members)} member(s), {draining} draining)"

    # -- outcomes --------------------------------------------------------------------------

    def _release(self, s: EndpointState) -> None:
        if s.inflight > 0:
            s.inflight -= 1
            if self._totals.inflight > 0:
                self._totals.inflight -= 1
        if s.inflight == 0 and s.idle is not None:
            s.idle.set()

    def _succeeded(
        self,
        s: EndpointState,
        t0: float,
        probe: int,
        observe: bool = True,
        t: float | None = None,
    ) -> None:
        now = self._now() if t is None else t
        if observe:
            s.observe(now - t0, now)
        self._release(s)
        b = s.breaker
        if b is not None:
            before = b.state
            if probe == _PANIC_PICK and before == "open":
                # Panic mode sent a real call to an ejected endpoint and it worked: that is
                # as good as a probe.  Closing now ends the panic as soon as the fleet is
                # back, instead of waiting out cooldowns grown during a long outage.
                b.force_close(now, "succeeded while serving in panic mode")
            else:
                b.on_success(now, probe)
            if b.state != before or probe:
                self._next_refresh = -math.inf
                if b.state == "closed":
                    # Back from ejection: forget the failure penalty, restart at the pool's
                    # typical latency (or what this probe just measured, if higher).
                    s.reset_cost(max(now - t0, self._typical_cost(now, s)), now)
                    self._hasten_probes(now)
                    if self._slow_start is not None:
                        s.ramp_from = now
                        s.weight = s.endpoint.weight * _MIN_RAMP

    def _hasten_probes(self, now: float) -> None:
        """One ejected endpoint just recovered: outages are often shared (a deploy, a
        network partition), so probe the others now instead of waiting out cooldowns that
        grew while everything was down (a probe that fails only re-opens its breaker)."""
        policy = self._breaker
        if policy is None:
            return
        soon = now  # probe them now: one call each, bounded by half_open_probes
        for other in self._members.values():
            ob = other.breaker
            if ob is not None and ob.state == "open" and ob.reopen_at > soon:
                ob.reopen_at = soon
                self._next_refresh = -math.inf

    def _failed(self, s: EndpointState, t0: float, exc: BaseException, probe: int) -> bool:
        """Record a failed attempt; returns whether it counted against the endpoint."""
        now = self._now()
        self._release(s)
        try:
            counted = bool(self._is_failure(exc))
        except Exception:  # a broken user predicate must not lose the call's own error
            log.exception("breaker is_failure predicate raised; counting as a failure")
            counted = True
        b = s.breaker
        if counted:
            s.failures += 1
            s.last_failure = now
            # A failure is priced as a slow response so load-aware strategies steer away
            # even before (or without) a breaker: fast failures must not attract traffic.
            s.penalize(
                max(now - t0, min(_FAILURE_PENALTY * s.cost, _MAX_PENALTY)), now, _MAX_PENALTY
            )
            if b is not None:
                before = b.state
                b.on_failure(now, probe)
                if b.state != before or probe:
                    self._next_refresh = -math.inf
        else:
            s.observe(now - t0, now)
            if b is not None:
                b.on_ignored(now, probe)
                if probe:
                    self._next_refresh = -math.inf
        return counted

    def _cancelled(self, s: EndpointState, probe: int) -> None:
        self._release(s)
        b = s.breaker
        if b is not None and probe:
            b.on_ignored(self._now(), probe)
            self._next_refresh = -math.inf

    # -- the three ways to call -----------------------------------------------------------

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
    ) -> RouteDecorator: ...
    def route(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        key: Callable[..., object] | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> Any:
        """Decorate ``async def fn(endpoint, ...)``; callers call ``fn(...)`` without it.

        The balancer picks the endpoint, injects it as the first argument, records the
        outcome, and retries / hedges as configured.  Works on async generators too
        (streaming): see :mod:`lbclient` docs on streaming.

        * ``key`` -- a callable given the call's arguments that returns the affinity key
          for ``consistent_hash`` (e.g. ``key=lambda payload: payload["user"]``).
        * ``timeout`` -- overall deadline in seconds for this function's calls, covering
          every attempt and backoff (default: ``Retry.timeout``, else none).  For a
          stream it bounds the time to the first chunk.
        * ``idle_timeout`` -- streams only: the longest gap between chunks after the first
          before :class:`StreamIdleTimeout` is raised (default: none).
        """
        if fn is None:
            return functools.partial(
                self._make_route, key=key, timeout=timeout, idle_timeout=idle_timeout
            )
        return self._make_route(fn, key=key, timeout=timeout, idle_timeout=idle_timeout)

    def _make_route(
        self,
        fn: Callable[..., Any],
        key: Callable[..., object] | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> Any:
        self._check_open()
        if not callable(fn):
            raise ConfigError(f"@lb.route needs an async function, got {fn!r}")
        return make_route(self, fn, key, timeout, idle_timeout)

    async def call(
        self,
        fn: Callable[..., Awaitable[R]],
        /,
        *args: Any,
        key: object = None,
        **kwargs: Any,
    ) -> R:
        """``await lb.call(fn, *args, **kwargs)`` runs ``fn(endpoint, *args, **kwargs)``
        like a decorated function would.  ``key`` is the affinity key value itself."""
        if not callable(fn):
            raise ConfigError(f"lb.call needs an async function, got {fn!r}")
        if self._hedge is not None:
            timeout = self._retry.timeout if self._retry is not None else None
            return await run_hedged(self, fn, args, kwargs, key, timeout)
        deadline = self._retry.timeout if self._retry is not None else None
        if deadline is not None:
            return await _call.run_with_deadline(self, fn, args, kwargs, key, deadline)
        return await _call.run(self, fn, args, kwargs, key)

    def pick(self, *, key: object = None) -> PickedEndpoint:
        """``async with lb.pick() as endpoint:`` -- one attempt for code that cannot be
        decorated; an exception leaving the block is recorded as a failure."""
        return PickedEndpoint(self, key)

    # -- events ----------------------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        log.log(event.level, "%s", event.message())
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("on_event listener raised for %r", event)

    # -- lifecycle -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BalancerClosed("this lbclient.Balancer is closed; create a new one")

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Stop background work (health checks, discovery).  Idempotent.

        Calls in flight finish; new calls raise :class:`BalancerClosed`.
        """
        if self._closed:
            return
        self._closed = True
        self._next_refresh = -math.inf  # the hot path's one compare now sees "closed"
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

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

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> BalancerStats:
        """An immutable snapshot of every endpoint and the call totals."""
        now = self._now()
        if now >= self._next_refresh and not self._closed:
            self._rebuild()  # so ``pickable`` reflects health/breaker changes already made
        eps = []
        for s in self._members.values():
            lat = sorted(s.recent_latencies())
            b = s.breaker
            eps.append(
                EndpointStats(
                    url=s.url,
                    region=s.endpoint.region,
                    zone=s.endpoint.zone,
                    weight=s.endpoint.weight,
                    effective_weight=s.weight,
                    state="draining" if s.draining else "active",
                    pickable=s.available and not s.draining,
                    breaker=None if b is None else b.state,
                    trips=0 if b is None else b.trips,
                    in_flight=s.inflight,
                    requests=s.requests,
                    failures=s.failures,
                    retries=s.retries_sent,
                    retries_denied=s.retries_denied,
                    hedges_sent=s.hedges_sent,
                    hedges_won=s.hedges_won,
                    latency_ewma_ms=s.ewma(now) * 1000 if s.requests else None,
                    p50_ms=None if not lat else _quantile(lat, 0.5) * 1000,  # type: ignore[operator]
                    p99_ms=None if not lat else _quantile(lat, 0.99) * 1000,  # type: ignore[operator]
                    ttft_ms=None if s.ttft is None else s.ttft * 1000,
                    chunks_per_s=(s.chunks / s.stream_time) if s.stream_time > 0 else None,
                    server_load=s.server_load,
                )
            )
        hedger = self._hedger
        return BalancerStats(
            strategy=self._strategy.name,
            closed=self._closed,
            panic=self._panic,
            calls=self._calls,
            calls_failed=self._calls_failed,
            attempts=sum(e.requests for e in eps),
            retries=self._retries,
            retries_denied=self._retries_denied,
            hedges_sent=self._hedges_sent,
            hedges_won=self._hedges_won,
            hedges_denied=self._hedges_denied,
            hedge_delay_ms=None if hedger is None else hedger.current_delay() * 1000,
            in_flight=sum(e.in_flight for e in eps),
            endpoints=tuple(eps),
        )

    def __repr__(self) -> str:
        return (
            f"<lbclient.Balancer strategy={self._strategy.name!r} "
            f"endpoints={len(self._members)}{' closed' if self._closed else ''}>"
        )
