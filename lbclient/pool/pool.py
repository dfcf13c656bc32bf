"""`Pool`: the members, their runtime state and the pickable snapshot.

The pool is the only writer of endpoint state (with :mod:`lbclient.pool.lease`, which
records call outcomes on its behalf).  Membership, health, load reports and cooldowns
change state here and mark the snapshot stale with one call, :meth:`Pool.invalidate`;
the next pick rebuilds it (:mod:`lbclient.pool.snapshot`).  Picking is synchronous:
:meth:`Pool.acquire` reads the snapshot, takes an in-flight slot and returns a
:class:`~lbclient.pool.lease.Lease`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
from collections.abc import Callable, Collection, Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from .._clock import Clock
from .._endpoint import Endpoint, normalize_url, to_endpoint
from .._errors import BalancerClosed, ConfigError, NoEndpointAvailable, UnknownEndpoint
from ..observe.events import BreakerEvent, CooldownEvent, MembershipEvent, PanicEvent
from ..strategies import PickContext, Strategy, Totals
from .lease import PANIC_PICK, Lease
from .snapshot import MIN_RAMP, Snapshot, build
from .state import LN1, EndpointState, ln1

if TYPE_CHECKING:
    from .._context import CallContext
    from ..observe.observer import Observer
    from ..policies.breaker import Breaker
    from ..policies.geo import GeoTable
    from ..shared.protocol import Shared
    from .locality import Locality

__all__ = ["DEFAULT_COST", "Handoff", "Pool"]

_exp = math.exp
_log = math.log

DEFAULT_COST = 0.05  # seconds: the latency prior of a pool with no samples yet
_TYPICAL_SAMPLE = 64  # endpoints sampled for the pool's typical latency (O(1) at any size)


class Handoff(Exception):
    """Raised by :meth:`Pool.acquire_fast` for a pick that needs the full path: carries
    the lease taken on it (with its probe token)."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(lease)
        self.lease = lease


class Pool:
    """Endpoints, their state, and what may be picked now.  See the module docstring."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        breaker: Breaker | None,
        health: bool,
        slow_start: float | None,
        locality: Locality | None,
        region: str | None,
        geo: GeoTable | None,
        decay: float,
        clock: Clock,
        rng: random.Random,
        observer: Observer,
        is_failure: Callable[[BaseException], bool],
        cooldown_cap: float | None,
    ) -> None:
        self.strategy = strategy
        # EndpointState.score is kept current on every in-flight change and latency
        # sample once a picker reads it (totals.scored, set by peak_ewma's picker); the
        # pool rekeys every member when that first happens (``refresh``).
        self._scored_all = False
        self.breaker = breaker
        self.ejecting = breaker is not None or health
        self.slow_start = slow_start
        self.locality = locality
        self.region = region
        self.geo = geo
        self.decay = decay
        self.clock = clock
        self.now = clock.now
        self.rng = rng
        self.observer = observer
        self.is_failure = is_failure
        self.cooldown_cap = cooldown_cap  # None: Retry-After starts no cooldown
        self.members: dict[str, EndpointState] = {}
        self.totals = Totals()
        self.ctx = PickContext(clock=clock, rng=rng, totals=self.totals, region=region, geo=geo)
        self.snap = Snapshot()
        self.pick_now = self.snap.pick_now
        # When the snapshot must be rebuilt: a clock time (breaker cooldown, Retry-After,
        # slow-start step) or -inf for "now" (membership, health or breaker changed;
        # closed).  One float compare per call is all the hot path pays.
        self.next_refresh = -math.inf
        self.closed = False
        self.on_refresh: Callable[[], None] | None = None  # the façade's background hook
        self._typical: tuple[object, int, float, float] | None = None
        self.outcomes = 0  # attempts ended (keys the typical-cost cache)
        # The fleet-shared state (Balancer(shared=...)), told about failures, breaker
        # transitions and cooldowns -- never on the success path.  Set before members.
        self.shared: Shared | None = None
        # Pick-time filters, off (and free) unless a member has limits or a context
        # window: how many members have Limits, and the smallest max_context.
        self.limited = 0
        self.min_context = math.inf
        # Calls waiting for an endpoint under its limits (admission only): woken one
        # per freed slot, FIFO.
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Told each endpoint removed from the pool (the httpx transport closes its
        # connection pool there).
        self.on_remove: list[Callable[[Endpoint], None]] = []

    # -- membership -------------------------------------------------------------------------

    def new_state(self, ep: Endpoint, *, initial: bool = False) -> EndpointState:
        now = self.now()
        # A newcomer starts at the pool's typical latency: optimistic (it has no queue, so
        # it wins most comparisons) but not absurdly so (a zero estimate would flood it).
        cost, ttft = (DEFAULT_COST, DEFAULT_COST) if initial else self.typical(now)
        s = EndpointState(ep, now=now, decay=self.decay, cost=cost, ttft_cost=ttft)
        if s.limit is not None and self.shared is not None:
            s.limit.share(self.shared, s.url)
        if self.slow_start is not None and not initial:
            s.ramp_from = now
            s.set_weight(ep.weight * MIN_RAMP)
        if self.breaker is not None:
            from ..policies.breaker import BreakerState

            emit = self.observer.emit if self.shared is None else self._breaker_event
            s.breaker = BreakerState(self.breaker, ep.url, rng=self.rng, emit=emit)
        return s

    def _breaker_event(self, event: BreakerEvent) -> None:
        """A breaker transition, when the fleet shares state: the observer, then the
        fleet (which may publish it)."""
        self.observer.emit(event)
        shared = self.shared
        if shared is not None:
            shared.breaker_event(event)

    def add(self, endpoint: Endpoint | str, *, initial: bool = False) -> Endpoint:
        ep = to_endpoint(endpoint)
        if ep.url in self.members:
            raise ConfigError(f"endpoint {ep.url!r} is already in the pool")
        s = self.members[ep.url] = self.new_state(ep, initial=initial)
        if s.limit is not None:
            self.limited += 1
        if s.max_context is not None and s.max_context < self.min_context:
            self.min_context = s.max_context
        self.invalidate()
        if not initial:
            self._membership(ep.url, "add")
        return ep

    def remove(self, url: str) -> Endpoint:
        s = self.state_of(url)
        del self.members[s.url]
        s.remove_when_idle = False
        if s.limit is not None:
            self.limited -= 1
        if s.max_context is not None:
            self._filters_changed()
        self.invalidate()
        self._membership(s.url, "remove")
        for hook in self.on_remove:
            try:
                hook(s.endpoint)
            except Exception:  # a broken hook must not break membership
                logging.getLogger("lbclient").exception("on_remove hook raised for %s", s.url)
        return s.endpoint

    def drain(self, url: str) -> EndpointState:
        s = self.state_of(url)
        if not s.draining:
            s.draining = True
            self.invalidate()
            self._membership(s.url, "drain")
        return s

    def undrain(self, url: str) -> None:
        s = self.state_of(url)
        s.remove_when_idle = False
        if s.draining:
            s.draining = False
            self.invalidate()
            self._membership(s.url, "undrain")

    def retire(self, url: str) -> None:
        """Drain ``url`` and remove it as soon as no call is in flight there."""
        s = self.drain(url)
        if s.inflight <= 0:
            self.remove(url)
        else:
            s.remove_when_idle = True

    def sync(self, endpoints: Iterable[Endpoint | str]) -> None:
        """Make the members exactly ``endpoints``: add the new, retire the missing (drained,
        removed once idle), update the survivors' attributes, keep their statistics."""
        wanted: dict[str, Endpoint] = {}
        for e in endpoints:
            ep = to_endpoint(e)
            wanted[ep.url] = ep
        for url, ep in wanted.items():
            s = self.members.get(url)
            if s is None:
                self.add(ep)
                continue
            if s.draining:
                self.undrain(url)
            if s.endpoint != ep or s.endpoint.metadata != ep.metadata:
                ratio = s.weight / s.endpoint.weight
                s.endpoint = ep
                s.set_weight(ep.weight * ratio)
                s.configure(ep, self.shared)
                self._filters_changed()
                self.invalidate()
        for url in [u for u in self.members if u not in wanted]:
            self.retire(url)

    def set_health(self, url: str, healthy: bool) -> None:
        s = self.state_of(url)
        now = self.now()
        b = s.breaker
        if not healthy:
            if not s.health_down:
                s.health_down = True
                self.invalidate()
                if b is not None:
                    b.force_open(now)
        elif s.health_down:
            s.health_down = False
            self.invalidate()
            if b is not None:
                b.allow_probe(now)

    def report_load(self, endpoint: Endpoint | str, load: object) -> None:
        if load is None:
            return
        url = endpoint.url if isinstance(endpoint, Endpoint) else endpoint
        if not isinstance(url, str):
            return
        s = self.members.get(url) or self.members.get(normalize_url(url, strict=False))
        if s is None:
            return
        try:
            value = float(load)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return
        if math.isfinite(value) and value >= 0:
            s.set_server_load(value, self.now())

    def retry_denied(self, url: str) -> None:
        """A failure on ``url`` could not be retried (the retry budget was spent)."""
        s = self.members.get(url)
        if s is not None:
            s.retries_denied += 1

    def cool(
        self,
        s: EndpointState,
        seconds: float,
        status: int | None,
        now: float,
        *,
        publish: bool = True,
    ) -> None:
        """No new picks of ``s`` for ``seconds`` (the server's ``Retry-After``).
        ``publish=False``: the cooldown came from another process (do not echo it)."""
        until = now + seconds
        if until <= s.cooldown_until:
            return
        s.cooldown_until = until
        self.invalidate()
        self.observer.counters.cooldowns += 1
        if self.observer.wants(20):
            self.observer.emit(CooldownEvent(url=s.url, seconds=seconds, status=status, at=now))
        if publish and self.shared is not None:
            self.shared.cooled(s, seconds, status, now)

    def state_of(self, url: str) -> EndpointState:
        s = self.members.get(url) if isinstance(url, str) else None
        if s is None and isinstance(url, str):
            s = self.members.get(normalize_url(url, strict=False))
        if s is None:
            raise UnknownEndpoint(f"no endpoint {url!r} in the pool")
        return s

    def _filters_changed(self) -> None:
        """Recount what the pick-time filters need (members' limits, context windows)."""
        self.limited = sum(1 for s in self.members.values() if s.limit is not None)
        self.min_context = min(
            (s.max_context for s in self.members.values() if s.max_context is not None),
            default=math.inf,
        )

    def _membership(self, url: str, action: str) -> None:
        if self.observer.wants(20):
            self.observer.emit(MembershipEvent(url=url, action=action, at=self.now()))

    # -- the snapshot -----------------------------------------------------------------------

    def invalidate(self) -> None:
        """Something changed: the next pick rebuilds the snapshot."""
        self.next_refresh = -math.inf

    def refresh(self) -> None:
        """Rebuild the snapshot now."""
        if self.on_refresh is not None:
            self.on_refresh()
        now = self.now()
        old = self.snap
        snap = build(
            list(self.members.values()),
            now,
            strategy=self.strategy,
            ctx=self.ctx,
            breaker=self.breaker,
            ejecting=self.ejecting,
            slow_start=self.slow_start,
            locality=self.locality,
            region=self.region,
            geo=self.geo,
            previous=old,
        )
        self.snap = snap
        if self.totals.scored and not self._scored_all:
            self._scored_all = True
            for s in self.members.values():
                s.rekey()  # fresh from here on, pickable or not
        self.pick_now = self._pick_probe if snap.probes_due else snap.pick_now
        self.next_refresh = -math.inf if self.closed else snap.next_refresh
        if snap.panic != old.panic:
            total = sum(1 for s in self.members.values() if not s.draining)
            self.observer.emit(
                PanicEvent(entered=snap.panic, at=now, pickable=snap.healthy, total=total)
            )

    @property
    def panic(self) -> bool:
        return self.snap.panic

    @property
    def pickable(self) -> tuple[EndpointState, ...]:
        return self.snap.pickable

    def widen(
        self, tried: AbstractSet[EndpointState], test: Callable[[EndpointState], bool]
    ) -> AbstractSet[EndpointState]:
        """What a new attempt should avoid: ``tried``, and the pickable endpoints that
        pass ``test`` -- unless that leaves nothing untried to pick, then ``tried`` alone."""
        pickable = self.snap.pickable
        out = set(tried)
        out.update(s for s in pickable if test(s))
        return tried if all(s in out for s in pickable) else out

    # -- picking ----------------------------------------------------------------------------

    def acquire(
        self,
        call: CallContext | None,
        exclude: Collection[EndpointState] | None,
        now: float,
    ) -> Lease:
        """Pick an endpoint for ``call`` (avoiding ``exclude`` while others remain) and take
        an in-flight slot on it.  Synchronous.  Raises :class:`NoEndpointAvailable`.

        Once the pool is closed, only a call already under way may still pick (a call
        context exists only for a call that started before the close: its retries, or
        a call that was queued for admission, finish it, as closing promises)."""
        if now >= self.next_refresh:
            if self.closed and call is None:
                raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
            self.refresh()
        snap = self.snap
        picker = snap.picker
        if picker is None:
            raise self.empty(now)
        tokens = call.tokens if call is not None else None
        if self.limited or (
            call is not None
            and (call.eligible is not None or (tokens is not None and tokens > self.min_context))
        ):
            return self._acquire_filtered(call, exclude, now, tokens)
        s = None
        probes = snap.probes_due
        if probes:
            s = self._due_probe(probes, exclude)
        if s is None:
            # a call that carries nothing for the picker: the fast path's pick, at ``now``
            s = picker.pick(call, exclude) if call is not None or exclude else snap.pick_now(now)
            if s is None:
                s = picker.pick(call, None)  # everything excluded: reuse beats failing
                if s is None:
                    raise self.empty(now)
        return self._take(s, now, tokens)

    # -- pick-time filters: eligibility, context windows, limits -----------------------

    def refuses(self, s: EndpointState, call: CallContext | None, tokens: float | None) -> bool:
        """May ``call`` never go to ``s``?  (Its ``eligible=`` says no, its estimated
        tokens exceed the context window, or alone the tokens-per-minute limit.)"""
        if call is not None:
            eligible = call.eligible
            if eligible is not None and not eligible(s.endpoint):
                return True
        if tokens is not None:
            if s.max_context is not None and tokens > s.max_context:
                return True
            lim = s.limit
            if lim is not None and lim.too_big(tokens):
                return True
        return False

    def blocks(
        self, s: EndpointState, call: CallContext | None, tokens: float | None, now: float
    ) -> bool:
        """May ``call`` not go to ``s`` now?  (:meth:`refuses`, or ``s`` is at a limit.)"""
        if self.refuses(s, call, tokens):
            return True
        lim = s.limit
        return lim is not None and lim.full(s, now, tokens)

    def _acquire_filtered(
        self,
        call: CallContext | None,
        exclude: Collection[EndpointState] | None,
        now: float,
        tokens: float | None,
    ) -> Lease:
        """:meth:`acquire` for a call some endpoints may not take: the ones refused or at
        a limit are excluded outright (never "reused as a last resort" like the ones the
        call would only rather avoid), tested lazily as the picker looks at them."""
        snap = self.snap
        picker = snap.picker
        assert picker is not None
        blocked = _Blocked(self, call, tokens, now, exclude)
        s = None
        probes = snap.probes_due
        if probes:
            s = self._due_probe(probes, blocked)
        if s is None:
            s = picker.pick(call, blocked)
            if s is None and exclude:
                s = picker.pick(call, blocked.hard())  # reuse beats failing
            if s is None:
                raise self.unavailable(call, tokens, now)
        return self._take(s, now, tokens, call)

    def unavailable(
        self, call: CallContext | None, tokens: float | None, now: float
    ) -> NoEndpointAvailable:
        """The error for "no pickable endpoint may take this call", saying why: how many
        were refused for which reason, or -- when some are only at a limit -- which
        limits, and when the first frees (``retry_after``)."""
        eligible = call.eligible if call is not None else None
        refused = context = too_big = 0
        full: list[EndpointState] = []
        for s in self.snap.pickable:
            if eligible is not None and not eligible(s.endpoint):
                refused += 1
            elif tokens is not None and s.max_context is not None and tokens > s.max_context:
                context += 1
            elif s.limit is not None and s.limit.too_big(tokens):
                too_big += 1
            elif s.limit is not None and s.limit.full(s, now, tokens):
                full.append(s)
        if full:
            first = min(s.limit.free_at(s, now, tokens) for s in full)  # type: ignore[union-attr]
            # Only in-flight limits: about one call's time away.
            wait = min(s.ewma(now) for s in full) if first == math.inf else max(0.0, first - now)
            shown = "; ".join(
                f"{s.url} ({s.limit.describe(s, now)})"  # type: ignore[union-attr]
                for s in full[:5]
            )
            more = f" and {len(full) - 5} more" if len(full) > 5 else ""
            return NoEndpointAvailable(
                f"every endpoint this call may use is at its limits: {shown}{more}; the "
                f"first frees in about {wait:.3g} s",
                retry_after=wait,
                reason="limits",
            )
        why = []
        if refused:
            why.append(f"{refused} refused by the call's eligible=")
        if context:
            why.append(
                f"{context} with a max_context below the call's {tokens:.0f} estimated tokens"
            )
        if too_big:
            why.append(
                f"{too_big} with a tokens_per_minute limit below the call's {tokens:.0f} "
                "estimated tokens"
            )
        n = len(self.snap.pickable)
        others = len(self.members) - n
        rest = f" ({others} more member(s) not pickable now)" if others else ""
        return NoEndpointAvailable(
            f"no endpoint is eligible for this call: of {n} pickable, {', '.join(why)}{rest}",
            reason="ineligible",
        )

    # -- waiting for an endpoint under its limits ---------------------------------------

    async def wait_capacity(self, seconds: float) -> None:
        """Wait until an attempt on a limited endpoint ends (a slot may be free: woken
        first come, first served, one per attempt ended) or ``seconds`` pass."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.waiters.append(fut)
        timer = loop.create_task(self.clock.sleep(seconds))
        try:
            await asyncio.wait((fut, timer), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.wake()  # woken as it was cancelled: pass the slot on
            raise
        finally:
            timer.cancel()
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)

    def wake(self) -> None:
        """An attempt on a limited endpoint ended: wake the first call waiting."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _take(
        self,
        s: EndpointState,
        now: float,
        tokens: float | None = None,
        call: CallContext | None = None,
    ) -> Lease:
        """Take an in-flight slot on the picked ``s`` (a probe slot, when its breaker is
        half-open), and count it against its limits."""
        probe = 0
        b = s.breaker
        if b is not None and b.state != "closed":
            probe = b.on_pick(now)
            if probe == 0 and b.state == "open":
                probe = PANIC_PICK  # an ejected endpoint served because of panic mode
            self.next_refresh = -math.inf  # a half-open probe slot was taken
        n = s.inflight + 1
        s.inflight = n
        totals = self.totals
        if totals.scored:
            s.score = s.key + (LN1[n] if n < 1024 else ln1(n))
        if n > s.peak_inflight:
            s.peak_inflight = n
        s.requests += 1
        totals.inflight += 1
        lease = Lease(self, s, now, probe)
        lim = s.limit
        if lim is not None:
            charge = lim.charge(now, tokens)
            if charge is not None:  # a token charge, settled by the call's real usage
                lease.charge = charge
                lease.call = call
        if tokens:
            lease.tokens = tokens
            s.tokens += tokens
            totals.tokens += tokens
            mean = totals.mean_tokens
            totals.mean_tokens = tokens if not mean else mean + 0.05 * (tokens - mean)
        return lease

    def acquire_fast(self, now: float) -> EndpointState:
        """:meth:`acquire` for a call with no context and nothing to exclude (the
        decorator's fast path): one compare, one pick, one slot taken on the returned
        state -- and no :class:`Lease` object.  The caller ends the attempt with
        :meth:`succeeded` (``probe`` 0), or on the rare failure path with a ``Lease``
        made then (``Lease(pool, state, t0, 0).fail(exc)``): one outcome, the same code
        as every other path.  When the pick lands on an endpoint whose breaker is not
        closed (a half-open probe, a panic pick), its outcome must carry a probe token:
        the lease is taken here and handed over in :class:`Handoff`, for the full path."""
        if now >= self.next_refresh:
            if self.closed:
                raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
            self.refresh()
        s = self.pick_now(now)
        if s is None:
            raise self.empty(now)
        lim = s.limit
        if lim is not None and lim.full(s, now, None):  # pick again, under the limits
            raise Handoff(self._acquire_filtered(None, None, now, None))
        b = s.breaker
        if b is not None and b.state != "closed":
            raise Handoff(self._take(s, now))
        if lim is not None:
            lim.charge(now, None)
        n = s.inflight + 1
        s.inflight = n
        totals = self.totals
        if totals.scored:
            s.score = s.key + (LN1[n] if n < 1024 else ln1(n))
        if n > s.peak_inflight:
            s.peak_inflight = n
        s.requests += 1
        totals.inflight += 1
        return s

    @staticmethod
    def _due_probe(
        probes: list[EndpointState], exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        """Take the next endpoint due a probe off ``probes``: half-open with a free probe
        slot, and not excluded (an excluded one keeps its place for the next call).  The
        ones no longer due (closed, reopened, slot taken) are dropped."""
        i = len(probes) - 1
        while i >= 0:
            s = probes[i]
            b = s.breaker
            if (
                b is None
                or b.state != "half_open"
                or b.probes_in_flight >= b.policy.half_open_probes
            ):
                del probes[i]
            elif not exclude or s not in exclude:
                del probes[i]
                return s
            i -= 1
        return None

    def _pick_probe(self, now: float) -> EndpointState | None:
        """``pick_now`` while half-open endpoints are due a probe: takes one off the list
        (its breaker is not closed, so the fast path hands it to the full path with a
        probe token); once none is left, the snapshot's own ``pick_now`` is back."""
        s = self._due_probe(self.snap.probes_due, None)
        if s is not None:
            return s
        self.pick_now = self.snap.pick_now
        return self.pick_now(now)

    def empty(self, now: float) -> NoEndpointAvailable:
        """The error for "nothing to pick", saying why (and when to come back, if the
        only reason is Retry-After cooldowns)."""
        until = self.snap.cooling_until
        if self.closed:
            return NoEndpointAvailable("the balancer is closed", reason="closed")
        if not self.members:
            return NoEndpointAvailable(
                "the pool is empty (every endpoint was removed)", reason="empty"
            )
        if until < math.inf:
            wait = max(0.0, until - now)
            return NoEndpointAvailable(
                f"every pickable endpoint is cooling down after Retry-After; the first is "
                f"back in {wait:.3g} s",
                retry_after=wait,
                reason="cooling",
            )
        n = len(self.members)
        draining = sum(1 for s in self.members.values() if s.draining)
        if draining == n:
            return NoEndpointAvailable(
                f"all {draining} endpoint(s) are draining", reason="draining"
            )
        return NoEndpointAvailable(f"no endpoint is pickable ({n} member(s), {draining} draining)")

    # -- outcomes (the lease's helpers) -----------------------------------------------------

    def release(self, s: EndpointState, tokens: float = 0.0) -> None:
        """Give an in-flight slot back."""
        self.outcomes += 1
        n = s.inflight - 1
        if n >= 0:
            s.inflight = n
            totals = self.totals
            if totals.scored:
                s.score = s.key + (LN1[n] if n < 1024 else ln1(n))
            if totals.inflight > 0:
                totals.inflight -= 1
        if tokens:
            s.tokens -= tokens
            self.totals.tokens -= tokens
        if n <= 0 and (s._idle or s.remove_when_idle):
            self.idle(s)
        if s.limit is not None and self.waiters:
            self.wake()

    def idle(self, s: EndpointState) -> None:
        """No call is in flight on ``s`` any more: wake drains, remove it if retired."""
        s.wake_idle()
        if s.remove_when_idle and self.members.get(s.url) is s:
            self.remove(s.url)

    def succeeded(
        self,
        s: EndpointState,
        t0: float,
        t: float,
        probe: int = 0,
        tokens: float = 0.0,
        sample: bool = True,
    ) -> None:
        """An attempt on ``s`` that started at ``t0`` succeeded at ``t``: its latency
        sample (unless ``sample`` is false: a stream's is its time to first chunk), the
        slot back, the breaker told.  Every successful attempt ends here."""
        if sample:
            # EndpointState.observe, inlined: this is every successful call.
            rtt = t - t0
            cost = s.cost
            decay = s.decay
            stamp = s.stamp
            if t0 - stamp >= 0.01 * decay:  # as the pick at t0 read it (see observe)
                cost *= _exp((stamp - t0) / decay)
                stamp = t0
            n = s.inflight
            if n > s.cap_seen and rtt <= 2.0 * cost:
                s.cap_seen = n
            if rtt > cost:
                s.cost = rtt
            else:
                dt = t - stamp
                # exp(-dt/decay) > 0.97 (the clamp) whenever dt < 0.0304 decay: skip the exp.
                w = 0.97 if dt < 0.0304 * decay else _exp(-dt / decay)
                s.cost = cost * w + rtt * (1.0 - w)
            s.stamp = t
            i = s._i
            if i < 256:
                s._ring.append(rtt)
            else:
                s._ring[i & 255] = rtt
            s._i = i + 1
            if self.totals.scored:  # EndpointState.rekey, inlined for the plain case
                cost = s.cost
                if s.penalty or s.server_load is not None or not cost > 0.0:
                    s.rekey(t)
                else:
                    s.key = _log(cost / s.weight) + t / s.decay
        s.successes += 1
        # release, inlined
        self.outcomes += 1
        n = s.inflight - 1
        totals = self.totals
        if n >= 0:
            s.inflight = n
            if totals.inflight > 0:
                totals.inflight -= 1
        if totals.scored:
            s.score = s.key + (LN1[n] if 0 <= n < 1024 else ln1(n))
        if tokens:
            s.tokens -= tokens
            self.totals.tokens -= tokens
        if n <= 0 and (s._idle or s.remove_when_idle):
            self.idle(s)
        if s.limit is not None and self.waiters:
            self.wake()
        b = s.breaker
        if b is not None:
            if b.state != "closed" or probe:
                self.breaker_succeeded(s, probe, t, t - t0)
            else:
                b.on_success(t, 0)

    def breaker_succeeded(self, s: EndpointState, probe: int, now: float, latency: float) -> None:
        """A success on an endpoint whose breaker is not plainly closed (or a probe)."""
        b = s.breaker
        assert b is not None
        before = b.state
        if probe == PANIC_PICK and before == "open":
            # Panic mode sent a real call to an ejected endpoint and it worked: that is as
            # good as a probe.  Closing now ends the panic as soon as the fleet is back,
            # instead of waiting out cooldowns grown during a long outage.
            b.force_close(now, "succeeded while serving in panic mode")
        else:
            b.on_success(now, probe)
        if b.state != before or probe:
            self.invalidate()
            if b.state == "closed":
                # Back from ejection: forget the failure penalty, restart at the pool's
                # typical latency (or what this probe just measured, if higher).
                s.reset_cost(max(latency, self.typical(now, s)[0]), now)
                self._hasten_probes(now)
                if self.slow_start is not None:
                    s.ramp_from = now
                    s.set_weight(s.endpoint.weight * MIN_RAMP)

    def _hasten_probes(self, now: float) -> None:
        """One ejected endpoint just recovered: outages are often shared (a deploy, a
        network partition), so probe the others now instead of waiting out cooldowns that
        grew while everything was down (a probe that fails only re-opens its breaker)."""
        for other in self.members.values():
            ob = other.breaker
            if ob is not None and ob.state == "open" and ob.reopen_at > now:
                ob.reopen_at = now
                self.invalidate()

    def typical(self, now: float, skip: EndpointState | None = None) -> tuple[float, float]:
        """The pool's median call latency and median time to first chunk (seconds), from a
        sample of at most 64 pickable endpoints; cached until an attempt ends or the
        snapshot changes, so adding 10,000 endpoints at once computes it once."""
        cached = self._typical
        if skip is None and cached is not None:
            snap, outcomes, cost, ttft = cached
            if snap is self.snap and outcomes == self.outcomes:
                return cost, ttft
        states = self.snap.pickable
        step = max(1, len(states) // _TYPICAL_SAMPLE)
        calls: list[float] = []
        ttfts: list[float] = []
        for s in states[::step]:
            if s is skip or s.failures >= s.requests:
                continue
            if s.count:
                calls.append(s.ewma(now))
            if s.ttft.count:
                ttfts.append(s.ttft_ewma(now))
        calls.sort()
        ttfts.sort()
        cost = calls[len(calls) // 2] if calls else DEFAULT_COST
        ttft = ttfts[len(ttfts) // 2] if ttfts else cost
        if skip is None:
            self._typical = (self.snap, self.outcomes, cost, ttft)
        return cost, ttft

    def ready(self) -> bool:
        """Open, and at least one endpoint may be picked now (a readiness probe)."""
        if self.closed:
            return False
        if self.now() >= self.next_refresh:
            self.refresh()
        return bool(self.snap.pickable)

    def close(self) -> None:
        self.closed = True
        self.next_refresh = -math.inf  # the hot path's one compare now sees "closed"

    def __repr__(self) -> str:
        return f"<Pool members={len(self.members)} pickable={len(self.snap.pickable)}>"


class _Blocked(Collection[EndpointState]):
    """The endpoints a call may not be sent to now -- refused (``eligible=``, context
    window) or at a limit -- as the ``exclude`` collection pickers take, tested lazily
    (and once) for the candidates a picker actually looks at: a P2C pick tests two, not
    the pool.  ``soft`` adds what the call would only rather avoid."""

    __slots__ = ("_call", "_memo", "_now", "_pool", "_tokens", "soft")

    def __init__(
        self,
        pool: Pool,
        call: CallContext | None,
        tokens: float | None,
        now: float,
        soft: Collection[EndpointState] | None,
        memo: dict[EndpointState, bool] | None = None,
    ) -> None:
        self._pool = pool
        self._call = call
        self._tokens = tokens
        self._now = now
        self.soft = soft
        self._memo: dict[EndpointState, bool] = {} if memo is None else memo

    def hard(self) -> _Blocked:
        """The same, without the endpoints only to be avoided."""
        return _Blocked(self._pool, self._call, self._tokens, self._now, None, self._memo)

    def __contains__(self, s: object) -> bool:
        soft = self.soft
        if soft and s in soft:
            return True
        memo = self._memo
        out: bool | None = memo.get(s)  # type: ignore[call-overload]
        if out is None:
            out = memo[s] = self._pool.blocks(s, self._call, self._tokens, self._now)  # type: ignore[index, arg-type]
        return out

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[EndpointState]:
        return (s for s in self._pool.snap.pickable if s in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)
