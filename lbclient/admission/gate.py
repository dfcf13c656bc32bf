"""The admission gate: a call gets a :class:`Permit` (a slot under the concurrency limit)
before it may pick an endpoint, and gives it back when it ends.

::

    permit = gate.try_admit(tenant, tokens, priority, now)   # sync: quotas, throttle, room?
    if permit is None:
        permit = await gate.wait(...)                        # queue, in fair order, bounded
    ...                                                       # the call: picks, attempts
    permit.release(kind, sample, ok, overloaded, usage)       # feedback; wake the next

When there is room (fewer calls in flight than the limit, nobody queued) admission is a
few comparisons.  When there is not, a caller waits in the :class:`FairQueue` -- unless
it is shed at once: the queue is full (and it is not owed more than whoever holds the
most), or its expected wait (the waiters ahead of it, at the rate slots are freeing up)
is longer than ``max_wait`` or its own deadline.  Shedding is immediate and says why
(:class:`lbclient.Overloaded`): a caller learns in microseconds, not after a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
from typing import TYPE_CHECKING

from .._errors import Overloaded, QuotaExceeded
from ..observe.events import AdmissionEvent
from .fair import FairQueue, Waiter
from .limiter import GradientLimiter
from .policy import Admission
from .quota import TenantQuota
from .throttle import Throttle

if TYPE_CHECKING:
    from .._clock import Clock
    from ..observe.observer import Observer
    from ..shared.protocol import Shared

__all__ = ["Gate", "Permit", "TenantCounters"]

log = logging.getLogger("lbclient")

_RATE_SAMPLES = 64  # completions remembered to estimate how fast slots free up
OUTPUT_WEIGHT = 2.0  # VTC: an output token costs twice an input token (the paper's default)
_LATENCY_ALPHA = 0.05  # weight of a call's duration in the gate's latency EWMA
WAIT_MARGIN = 0.5  # queue a caller only if its expected wait is within this share of its budget


class TenantCounters:
    """What one tenant got from admission (cumulative, but ``in_flight`` and ``queued``)."""

    __slots__ = (
        "admitted",
        "in_flight",
        "queued",
        "quota_denied",
        "shed",
        "tokens_in_flight",
        "waited",
    )

    def __init__(self) -> None:
        self.admitted = 0
        self.waited = 0  # admitted after waiting in the queue
        self.queued = 0  # waiting now
        self.shed: dict[str, int] = {}
        self.quota_denied = 0
        self.in_flight = 0
        self.tokens_in_flight = 0.0


class Permit:
    """A slot under the limit, held for a whole call (every attempt of it)."""

    __slots__ = ("_gate", "cost", "done", "t0", "tenant", "tokens")

    def __init__(self, gate: Gate, tenant: object, tokens: float, cost: float, t0: float) -> None:
        self._gate = gate
        self.tenant = tenant
        self.tokens = tokens
        self.cost = cost
        self.t0 = t0
        self.done = False

    def release(
        self,
        kind: str | None = None,
        sample: float | None = None,
        *,
        overloaded: bool = False,
        accepted: bool | None = None,
        usage: tuple[float, float] | None = None,
    ) -> None:
        """The call ended.  ``kind``/``sample``: its latency signal for the limiter
        (``"ttft"``, ``"per_token"``, ``"latency"``), if it succeeded; ``overloaded``: a
        replica answered 429/503 during it; ``accepted``: the fleet took it (for client
        throttling; ``None``: unknown, e.g. cancelled before an answer); ``usage``: real
        ``(input, output)`` tokens, to settle the estimate.  Exactly once."""
        self._gate.release(self, kind, sample, overloaded, accepted, usage)


class Gate:
    """The admission runtime of one balancer (see the module docstring)."""

    def __init__(
        self, policy: Admission, clock: Clock, rng: random.Random, observer: Observer
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.now = clock.now
        self.observer = observer
        now = clock.now()
        self.limiter: GradientLimiter | None = None
        if policy.adaptive:
            self.limiter = GradientLimiter(
                policy.initial_limit, policy.min_limit, policy.max_limit, now
            )
            self.limit: float = self.limiter.limit
        else:
            self.limit = float(policy.limit)
        self.in_flight = 0
        self.tokens_in_flight = 0.0
        self.queue = FairQueue(policy.fair, policy.weights)
        self._fair = policy.fair
        self._quotas_on = bool(policy.quotas)
        self.throttle = None if policy.throttle is None else Throttle(policy.throttle, rng, now)
        self._quotas: dict[object, TenantQuota] = {}
        self.shared: Shared | None = None  # quotas are fleet-wide (Balancer(shared=...))
        self.tenants: dict[object, TenantCounters] = {}
        self._done_at: collections.deque[float] = collections.deque(maxlen=_RATE_SAMPLES)
        self._latency = 0.0  # EWMA of admitted calls' durations (seconds; 0: none yet)
        self._waiting: dict[object, int] = {}  # tenants with callers queued: how many
        self.shed_total: dict[str, int] = {}

    # -- admission ----------------------------------------------------------------------

    def tenant(self, tenant: object) -> TenantCounters:
        c = self.tenants.get(tenant)
        if c is None:
            c = self.tenants[tenant] = TenantCounters()
        return c

    def _quota(self, tenant: object, now: float) -> TenantQuota | None:
        q = self._quotas.get(tenant)
        if q is None:
            policy = self.policy.quota_for(tenant)
            if policy is None:
                return None
            shared = self.shared
            q = TenantQuota(policy, now) if shared is None else shared.quota(tenant, policy, now)
            self._quotas[tenant] = q
        return q

    def try_admit(self, tenant: object, tokens: float, priority: int, now: float) -> Permit | None:
        """Admit now if there is room; ``None`` if the caller must wait.  Raises
        :class:`QuotaExceeded` or :class:`Overloaded` (throttled) at once."""
        if self._quotas_on:
            q = self._quota(tenant, now)
            if q is not None:
                wait = q.check(tokens, now)
                if wait > 0:
                    self.tenant(tenant).quota_denied += 1
                    self._shed_event("quota", tenant, now)
                    raise QuotaExceeded(
                        "quota",
                        f"tenant {tenant!r} is over its quota ({q.quota!r})",
                        retry_after=wait,
                        tenant=tenant,
                    )
                q.charge(tokens)
        throttle = self.throttle
        if throttle is not None and throttle.active and not throttle.admit(now):
            self._refund_quota(tenant, tokens)
            raise self.shed(
                "throttled",
                tenant,
                now,
                f"the fleet is rejecting calls ({throttle.probability(now):.0%} now rejected "
                "locally: Google SRE client-side throttling)",
            )
        if self.in_flight < self.limit and not self.queue.size:
            return self._grant(tenant, tokens, False, now)
        return None

    # -- the hot path: a call with no tokens, when there is room -------------------------

    def enter(self, tenant: object) -> bool:
        """Admit a call of ``tenant`` with no token estimate at once, without a
        :class:`Permit`, if nothing stands in the way (no quotas, throttling dormant,
        room under the limit, nobody queued); False: use :meth:`try_admit`.  The call
        ends with :meth:`leave` (or :meth:`permit_for`, to continue on the full path)."""
        if self._quotas_on:
            return False
        throttle = self.throttle
        if throttle is not None and throttle.active:
            return False
        in_flight = self.in_flight
        if in_flight >= self.limit or self.queue.size:
            return False
        self.in_flight = in_flight + 1
        c = self.tenants.get(tenant)
        if c is None:
            c = self.tenants[tenant] = TenantCounters()
        c.admitted += 1
        c.in_flight += 1
        if self._fair:
            queue = self.queue
            counters = queue.counters
            counters[tenant] = counters.get(tenant, 0.0) + queue.unit(tenant)
            queue.last = tenant
        return True

    def permit_for(self, tenant: object, t0: float) -> Permit:
        """The permit of a call admitted by :meth:`enter` at ``t0``, for the full path."""
        return Permit(self, tenant, 0.0, 1.0, t0)

    def leave(self, tenant: object, latency: float, now: float) -> None:
        """A call admitted by :meth:`enter` succeeded in ``latency`` seconds."""
        inflight = self.in_flight
        self.in_flight = inflight - 1
        self.tenants[tenant].in_flight -= 1
        self._done_at.append(now)
        lat = self._latency
        self._latency = lat + _LATENCY_ALPHA * (latency - lat) if lat else latency
        throttle = self.throttle
        if throttle is not None and throttle.active:
            throttle.answered(True, now)
        limiter = self.limiter
        if limiter is not None and limiter.sample("latency", latency, inflight, now):
            self._limit_changed(now)
        if self.queue.size:
            self._wake(now)

    def _cost(self, tokens: float) -> float:
        return tokens if tokens > 0 else 1.0

    def _grant(self, tenant: object, tokens: float, waited: bool, now: float) -> Permit:
        self.in_flight += 1
        c = self.tenant(tenant)
        c.admitted += 1
        c.in_flight += 1
        cost = 1.0
        if tokens:
            self.tokens_in_flight += tokens
            c.tokens_in_flight += tokens
            cost = tokens
        if waited:
            c.waited += 1
        if self._fair:
            self.queue.charge(tenant, cost)
            self.queue.last = tenant
        return Permit(self, tenant, tokens, cost, now)

    async def wait(
        self, tenant: object, tokens: float, priority: int, deadline_left: float | None
    ) -> Permit:
        """Queue for a slot (after :meth:`try_admit` said wait), or be shed at once."""
        now = self.now()
        budget = self.policy.max_wait
        if deadline_left is not None and deadline_left < budget:
            budget = deadline_left
        queue = self.queue
        if (
            queue.size >= self.policy.max_queue
            and not self._purge_leaving()
            and not self._evict_for(tenant, now)
        ):
            self._refund_quota(tenant, tokens)
            raise self.shed(
                "queue full",
                tenant,
                now,
                f"{queue.size} callers are already waiting (max_queue={self.policy.max_queue})",
                retry_after=self._expected_wait(queue.size, now),
            )
        ahead = self._ahead(tenant)
        expected = self._expected_wait(ahead, now)
        if expected is None and ahead >= max(1.0, self.limit):
            # No completion rate yet (a cold start): queue one round of the limit -- the
            # callers likely served in time -- and shed the rest now, not after max_wait.
            self._refund_quota(tenant, tokens)
            raise self.shed(
                "wait exceeded",
                tenant,
                now,
                f"{ahead} callers are already waiting for {self.limit:.0f} slots and no call "
                "has finished yet",
            )
        # Only queue a caller likely to be served in time: one whose expected wait is
        # within half its budget.  The rest are shed now -- a caller learns in
        # microseconds, not after waiting out max_wait (estimates move: the margin
        # keeps those that do wait from timing out).
        if expected is not None and expected > WAIT_MARGIN * budget:
            self._refund_quota(tenant, tokens)
            raise self.shed(
                "wait exceeded",
                tenant,
                now,
                f"about {expected:.3g} s expected in the queue ({ahead} ahead, "
                f"{self.in_flight} in flight, limit {self.limit:.0f}) > {budget:.3g} s allowed",
                retry_after=expected,
            )
        w = Waiter(tenant, priority, self._cost(tokens), tokens)
        w.future = asyncio.get_running_loop().create_future()
        queue.push(w)
        c = self.tenant(tenant)
        c.queued += 1
        waiting = self._waiting
        waiting[tenant] = waiting.get(tenant, 0) + 1
        try:
            async with asyncio.timeout(budget):
                permit: Permit = await w.future
        except TimeoutError:
            fut = w.future
            if fut.done() and not fut.cancelled():
                err = fut.exception()
                if err is None:
                    return fut.result()  # type: ignore[no-any-return]  # granted as time ran out
                # Pushed out of a full queue as time ran out: shed (and counted) once.
                raise err from None
            self._left_queue(w)
            raise self.shed(
                "wait exceeded",
                tenant,
                self.now(),
                f"no slot within {budget:.3g} s ({queue.size} waiting, {self.in_flight} in "
                f"flight, limit {self.limit:.0f})",
                retry_after=self._expected_wait(queue.size, self.now()),
            ) from None
        except BaseException:
            # Cancelled while waiting -- or just as a slot was granted: give it back.
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                w.future.result().release()
            else:
                self._left_queue(w)
            raise
        finally:
            c.queued -= 1
            n = waiting[tenant] - 1
            if n:
                waiting[tenant] = n
            else:
                del waiting[tenant]
        return permit

    def _left_queue(self, w: Waiter) -> None:
        if not w.gone:
            self.queue.discard(w)
            self._refund_quota(w.tenant, w.tokens)

    def _ahead(self, tenant: object) -> int:
        """About how many waiters will be served before a newcomer of ``tenant``: all of
        them, first come first served; with fairness, its own tenant's (first come first
        served within a tenant) and, of each other waiting tenant's, as many as turns
        it gets meanwhile -- at most one more than the newcomer's own queue.  O(tenants
        waiting), not O(waiters)."""
        q = self.queue
        if not q.fair or not q.size:
            return q.size
        own = self._waiting.get(tenant, 0)
        turns = own + 1
        ahead = own
        for t, n in self._waiting.items():
            if t != tenant:
                ahead += n if n < turns else turns
        return min(q.size, ahead)

    def _own(self, tenant: object) -> list[Waiter]:
        out: list[Waiter] = []
        for band in self.queue._bands.values():
            d = band.queues.get(tenant)
            if d:
                out.extend(w for w in d if not w.gone)
        return out

    def _purge_leaving(self) -> bool:
        """The queue is full: drop the waiters that are leaving already (cancelled or
        timed out in this loop iteration, their tasks not run yet).  True if any."""
        leaving = [
            w
            for band in self.queue._bands.values()
            for d in band.queues.values()
            for w in d
            if not w.gone and w.future is not None and w.future.done()
        ]
        for w in leaving:
            self._left_queue(w)
        return bool(leaving)

    def _evict_for(self, tenant: object, now: float) -> bool:
        """The queue is full: with fairness, make room by shedding the newest waiter of
        the backlogged tenant that has received the most service -- if that is not the
        newcomer's own tenant (a noisy tenant must not push quiet ones out)."""
        q = self.queue
        if not q.fair:
            return False
        counters = q.counters
        mine = counters.get(tenant, 0.0)
        worst_key: object = None
        worst_c = -math.inf
        for band in q._bands.values():
            for t, d in band.queues.items():
                if d and t != tenant and counters.get(t, 0.0) > worst_c:
                    worst_key, worst_c = t, counters.get(t, 0.0)
        if worst_c <= mine:
            return False
        victims = self._own(worst_key)
        if not victims:
            return False
        victim = max(victims, key=lambda w: w.seq)
        self._left_queue(victim)
        victim.future.set_exception(
            self.shed(
                "queue full",
                worst_key,
                now,
                "pushed out of a full queue by a tenant that has received less service",
                retry_after=self._expected_wait(q.size, now),
            )
        )
        return True

    def _expected_wait(self, ahead: int, now: float) -> float | None:
        """Seconds until ``ahead`` more slots free up, at the recent completion rate
        (``None`` before there is a rate to go by)."""
        done = self._done_at
        if len(done) < 8:
            return None
        span = now - done[0]
        if span <= 0:
            return 0.0
        rate = len(done) / span
        # Under light load completions come as fast as calls arrive, not as fast as slots
        # can free: the calls in flight, each about one call time long, bound it below.
        if self._latency > 0 and self.in_flight:
            rate = max(rate, self.in_flight / self._latency)
        return (ahead + 1) / rate

    # -- release ------------------------------------------------------------------------

    def release(
        self,
        permit: Permit,
        kind: str | None,
        sample: float | None,
        overloaded: bool,
        accepted: bool | None,
        usage: tuple[float, float] | None,
        now: float | None = None,
    ) -> None:
        """``permit``'s call ended (see :meth:`Permit.release`); exactly once.  ``now``:
        the time, if the caller has just read it."""
        if permit.done:
            return
        permit.done = True
        if now is None:
            now = self.now()
        inflight = self.in_flight
        self.in_flight = inflight - 1
        if accepted:  # it ran and was answered: its duration tells how fast slots free
            lat = self._latency
            took = now - permit.t0
            self._latency = lat + _LATENCY_ALPHA * (took - lat) if lat else took
        c = self.tenants[permit.tenant]
        c.in_flight -= 1
        if permit.tokens:
            self.tokens_in_flight -= permit.tokens
            c.tokens_in_flight -= permit.tokens
        self._done_at.append(now)
        if usage is not None:
            used = usage[0] + usage[1]
            if self.policy.fair:
                real = usage[0] + OUTPUT_WEIGHT * usage[1]
                self.queue.charge(permit.tenant, real - permit.cost)
            if self.policy.quotas:
                q = self._quotas.get(permit.tenant)
                if q is not None:
                    q.settle(permit.tokens, used)
        throttle = self.throttle
        if throttle is not None and accepted is not None and (throttle.active or not accepted):
            throttle.answered(accepted, now)
        limiter = self.limiter
        if limiter is not None:
            changed = False
            if overloaded:
                limiter.overload()
            if kind is not None and sample is not None and sample >= 0:
                changed = limiter.sample(kind, sample, inflight, now)
            if changed:
                self._limit_changed(now)
        if self.queue.size:
            self._wake(now)

    def _limit_changed(self, now: float) -> None:
        limiter = self.limiter
        assert limiter is not None
        old = self.limit
        self.limit = limiter.limit
        if self.observer.wants(logging.DEBUG):
            self.observer.emit(
                AdmissionEvent(
                    action="limit",
                    reason="increase" if self.limit > old else "decrease",
                    tenant=None,
                    limit=self.limit,
                    in_flight=self.in_flight,
                    queued=self.queue.size,
                    at=now,
                )
            )

    def _wake(self, now: float) -> None:
        queue = self.queue
        while queue.size and self.in_flight < self.limit:
            w = queue.pop()
            if w is None:
                break
            fut = w.future
            if fut is None or fut.done():
                # Cancelled (or timed out) in this same loop iteration; popping it marked
                # it gone, so its own exit will not refund it: do it here.
                self._refund_quota(w.tenant, w.tokens)
                continue
            fut.set_result(self._grant(w.tenant, w.tokens, True, now))

    # -- shedding ------------------------------------------------------------------------

    def _refund_quota(self, tenant: object, tokens: float) -> None:
        """A call that never got a slot gives its quota charge back."""
        q = self._quotas.get(tenant)
        if q is not None:
            q.refund(tokens)

    def shed(
        self,
        reason: str,
        tenant: object,
        now: float,
        message: str,
        retry_after: float | None = None,
    ) -> Overloaded:
        """Count a call shed for ``reason`` and return the error to raise (the gate's
        own sheds, and the engine's: a call that waited too long for an endpoint under
        its limits)."""
        counts = self.tenant(tenant).shed
        counts[reason] = counts.get(reason, 0) + 1
        self.shed_total[reason] = self.shed_total.get(reason, 0) + 1
        self._shed_event(reason, tenant, now)
        return Overloaded(
            reason, f"shed ({reason}): {message}", retry_after=retry_after, tenant=tenant
        )

    def _shed_event(self, reason: str, tenant: object, now: float) -> None:
        if self.observer.wants(logging.WARNING):
            self.observer.emit(
                AdmissionEvent(
                    action="shed",
                    reason=reason,
                    tenant=tenant,
                    limit=self.limit,
                    in_flight=self.in_flight,
                    queued=self.queue.size,
                    at=now,
                )
            )
