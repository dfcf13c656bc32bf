"""`FleetLink`: one balancer's side of the fleet-shared state (the :class:`Shared` the
pool and the gate call), and what it does with what the other processes say.

Outgoing, everything is queued in process memory (:meth:`FleetLink.failed`,
:meth:`~FleetLink.breaker_event`, :meth:`~FleetLink.cooled`) and the background task
(:mod:`lbclient.shared.redis_io`) is woken to send it -- a few milliseconds later, in a
batch; the call that caused it never waits.  Incoming, :meth:`FleetLink.receive` reads
the other processes' reports into :class:`~lbclient.shared.evidence.Evidence` and acts
through the pool's own methods: a breaker forced open on fleet evidence, made half-open
on one peer's word (one probe decides), its reopening lined up with the fleet's, a
``Retry-After`` cooldown applied.  What a process publishes about an endpoint:

* ``["run", url, n]`` -- its breaker's run of consecutive failures there (0: it ended);
* ``["open", url, seconds, run, derived, probe]`` -- its breaker opened (``derived``: on
  fleet evidence, not its own failures; ``probe``: a half-open probe failed -- the
  replica is still down after a cooldown);
* ``["close", url]`` -- its breaker closed (a probe succeeded);
* ``["cool", url, seconds, status]`` -- a ``Retry-After`` cooldown started.

Trips and cooldowns are also written as keys that expire with them, so a process that
joins late (or comes back after Redis did) learns them at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import socket
from typing import TYPE_CHECKING, Any

from .._endpoint import normalize_url
from .._numbers import is_int
from ..observe.events import BreakerEvent, FleetEvent
from ..observe.stats import FleetQuotaStats, SharedStats
from .budget import GRACE, FleetBudget
from .counter import FleetCounter
from .evidence import EJECT, SUSPECT, Evidence
from .lease import SharedTenantQuota

if TYPE_CHECKING:
    from .._clock import Clock
    from ..admission.policy import Quota
    from ..observe.observer import Observer
    from ..pool.pool import Pool
    from ..pool.state import EndpointState
    from .policy import RedisState
    from .redis_io import Syncer

__all__ = ["FleetLink"]

log = logging.getLogger("lbclient")

CONNECTING = "connecting"
CONNECTED = "connected"
DEGRADED = "degraded"
CLOSED = "closed"

_HASTEN_AFTER = 1.0  # s: a peer's recovery hastens a local probe only after this long open
_RUN_POLL = 0.05  # s: how often a reported failure run is checked for its end
_FOLLOW = 0.1  # reopen up to this share later than a peer whose probe failed


class FleetLink:
    """See the module docstring.  Lives on the balancer's event loop; not thread-safe."""

    def __init__(self, config: RedisState, pool: Pool, observer: Observer, clock: Clock) -> None:
        # redis-py takes ~0.3 s to import: here, at construction, not in the event loop
        # on the first pick.
        from . import redis_io

        self._syncer_type = redis_io.Syncer
        self.config = config
        self.pool = pool
        self.observer = observer
        self.now = clock.now
        self.peer = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.mode = CONNECTING
        self.scripts: bool | None = None
        self.peers_seen = 0  # live processes at the last heartbeat count (0: never)
        self.evidence = Evidence()
        self.quotas: list[SharedTenantQuota] = []
        self.counters: dict[str, FleetCounter] = {}
        self.budgets: dict[str, FleetBudget] = {}
        self.closed = False
        self.wake: asyncio.Event | None = None  # set by the background task's loop
        self.syncer: Syncer | None = None
        self._outbox: dict[tuple[str, str], list[Any]] = {}
        self._reported: dict[str, int] = {}  # url -> failure run last published (> 0)
        self._suspects: dict[str, set[str]] = {}  # url -> peers whose word made it half-open
        self._deriving: set[str] = set()  # urls being forced open on fleet evidence now
        self._derived: set[str] = set()  # urls whose current trip came from the fleet
        self.synced_at: float | None = None
        self.rounds = 0
        self.errors = 0
        self.degraded_total = 0
        self.events_sent = 0
        self.events_received = 0
        self.ejected = 0
        self.suspected = 0
        self.refuted = 0
        self.cooldowns = 0

    # -- what the pool and the gate call (sync, memory only) ----------------------------------

    @property
    def peers(self) -> int:
        """Live processes to divide a quota by: the last count, at least expected_peers."""
        return max(self.peers_seen, self.config.expected_peers, 1)

    def failed(self, s: EndpointState, now: float) -> None:
        b = s.breaker
        if b is None or b.state != "closed" or not self.config.share_ejections:
            return  # a trip is published by breaker_event
        run = b.consecutive_failures
        if run <= 0:
            return
        self._reported[s.url] = run
        self._send(("e", s.url), ["run", s.url, run])
        self._weigh(s, now)  # the fleet may have seen enough already

    def breaker_event(self, event: BreakerEvent) -> None:
        if not self.config.share_ejections:
            return
        url = event.url
        if event.new == "open":
            derived = url in self._deriving
            if derived:
                self._derived.add(url)
            else:
                self._derived.discard(url)
            self._reported.pop(url, None)
            self._suspects.pop(url, None)  # a suspicion's probe failed: confirmed here
            seconds = event.cooldown or 0.0
            probe = event.old == "half_open"
            self._send(
                ("e", url), ["open", url, seconds, event.consecutive_failures, derived, probe]
            )
        elif event.new == "closed":
            self._derived.discard(url)
            self._reported.pop(url, None)
            self._send(("e", url), ["close", url])
            sources = self._suspects.pop(url, None)
            if sources and event.old == "half_open":
                self.evidence.refute(url, sources, event.at)
                self.refuted += 1
                self._event(
                    "refuted",
                    f"a probe succeeded; not believing {len(sources)} process(es) about it "
                    f"for {self.evidence.refute_for:g} s",
                    url,
                    event.at,
                )

    def cooled(self, s: EndpointState, seconds: float, status: int | None, now: float) -> None:
        if self.config.share_cooldowns:
            self._send(("c", s.url), ["cool", s.url, seconds, status])

    def quota(self, tenant: object, policy: Quota, now: float) -> SharedTenantQuota:
        q = SharedTenantQuota(policy, now, str(tenant), self.peers)
        if self.mode == CONNECTED:
            for b in q.buckets():
                b.go_leasing(self.peers)
                b.level = 0.0  # no lease yet: the first asks start on credit
        self.quotas.append(q)
        return q

    def status(self) -> tuple[int, bool]:
        """``(live peers, connected?)``: what counters and budgets divide by, and whether
        the fleet's view is current."""
        return self.peers, self.mode == CONNECTED

    def counter(self, name: str, window: float) -> FleetCounter:
        """A fleet-wide sum over ``window`` seconds (see :mod:`lbclient.shared.counter`)."""
        c = self.counters.get(name)
        if c is None:
            c = self.counters[name] = FleetCounter(
                name,
                window,
                self.status,
                lag=2 * self.config.sync_interval + self.config.timeout,
            )
        return c

    def budget(self, name: str, ceiling: float, period: float) -> FleetBudget:
        """A fleet-wide ceiling leased to this process (see :mod:`lbclient.shared.budget`)."""
        b = self.budgets.get(name)
        if b is None:
            b = self.budgets[name] = FleetBudget(name, ceiling, period, self.status)
        return b

    # -- the outbox -----------------------------------------------------------------------

    def _send(self, key: tuple[str, str], event: list[Any]) -> None:
        self._outbox[key] = event  # the latest state per endpoint is all that matters
        if self.wake is not None:
            self.wake.set()

    def take_outbox(self) -> list[list[Any]]:
        """Everything queued since the last call (the background task sends it)."""
        if not self._outbox:
            return []
        out = list(self._outbox.values())
        self._outbox.clear()
        self.events_sent += len(out)
        return out

    def poll_runs(self) -> float | None:
        """Publish the end of failure runs reported earlier (a success reset the
        breaker's count; the success path is not hooked, so this looks).  Returns how
        soon to look again (None: nothing reported)."""
        if not self._reported:
            return None
        for url, run in list(self._reported.items()):
            s = self.pool.members.get(url)
            b = s.breaker if s is not None else None
            if b is None or b.state != "closed":
                del self._reported[url]
                continue
            now_run = b.consecutive_failures
            if now_run < run:
                self._send(("e", url), ["run", url, now_run])
                if now_run == 0:
                    del self._reported[url]
                else:
                    self._reported[url] = now_run
        return _RUN_POLL if self._reported else None

    def own_state(self) -> None:
        """Queue this process's current trips and cooldowns (after (re)connecting: a
        restarted Redis forgot them, a late joiner needs them)."""
        now = self.now()
        for s in list(self.pool.members.values()):
            b = s.breaker
            if self.config.share_ejections and b is not None and b.state == "open":
                left = b.reopen_at - now
                if left > 0:
                    derived = s.url in self._derived
                    self._send(
                        ("e", s.url),
                        ["open", s.url, left, b.consecutive_failures, derived, False],
                    )
            if self.config.share_cooldowns and s.cooldown_until > now:
                self._send(("c", s.url), ["cool", s.url, s.cooldown_until - now, None])

    # -- what the others say --------------------------------------------------------------

    def receive(self, payload: bytes | str) -> None:
        """One published message (a batch of events from one peer)."""
        try:
            msg = json.loads(payload)
            peer = msg["p"]
            events = msg["e"]
        except (ValueError, KeyError, TypeError):
            log.warning("lbclient fleet: ignoring a malformed message %.200r", payload)
            return
        if peer == self.peer or not isinstance(events, list):
            return
        now = self.now()
        for ev in events:
            try:
                self.apply(peer, ev, now)
            except (ValueError, TypeError, IndexError):
                log.warning("lbclient fleet: ignoring a malformed event %.200r", ev)

    def apply(self, peer: str, ev: list[Any], now: float) -> None:
        """One event from ``peer`` (also used for the keys a late joiner reads)."""
        kind, url = ev[0], ev[1]
        if not isinstance(url, str):
            raise TypeError(url)
        self.events_received += 1
        s = self._member(url)
        if s is None:
            return
        url = s.url
        if kind == "cool":
            if self.config.share_cooldowns:
                self._remote_cool(s, float(ev[2]), ev[3], now)
            return
        if not self.config.share_ejections:
            return
        if kind == "run":
            self.evidence.run(url, peer, int(ev[2]), now)
        elif kind == "open":
            seconds = float(ev[2])
            self.evidence.opened(url, peer, seconds, int(ev[3]), bool(ev[4]), now)
            if len(ev) > 5 and ev[5]:
                self._probe_failed(s, seconds, now)
        elif kind == "close":
            self.evidence.closed(url, peer, now)
            self._hasten(s, peer, now)
            return
        else:
            return
        self._weigh(s, now)

    def _member(self, url: str) -> EndpointState | None:
        members = self.pool.members
        s = members.get(url)
        if s is None:
            try:
                s = members.get(normalize_url(url, strict=False))
            except Exception:
                return None
        return s

    def _weigh(self, s: EndpointState, now: float) -> None:
        """Act on what the fleet says about ``s`` (see :mod:`lbclient.shared.evidence`)."""
        b = s.breaker
        if b is None or self.pool.closed:
            return
        url = s.url
        suspected = b.state == "half_open" and url in self._suspects
        if b.state == "closed" or suspected:
            verdict, fleet, sources = self.evidence.weigh(
                url, b.consecutive_failures, b.policy.failures, now
            )
            if verdict == EJECT:  # (a suspect's probe, if out, no longer decides)
                reason = (
                    f"fleet: {fleet} failures in a row seen by {len(sources)} processes"
                    f"{' (this one included)' if 'local' in sources else ''}"
                )
                self._deriving.add(url)
                try:
                    b.force_open(now, reason)
                finally:
                    self._deriving.discard(url)
                self.pool.invalidate()
                self.ejected += 1
                self._event("eject", reason, url, now)
            elif verdict == SUSPECT and b.suspect(
                now, "fleet: ejected by another process; the next call here is a probe"
            ):
                self._suspects[url] = sources
                self.pool.invalidate()
                self.suspected += 1
                self._event(
                    "suspect",
                    f"ejected by {len(sources)} other process(es), nothing here agrees yet: "
                    "the next call here is a probe",
                    url,
                    now,
                )

    def _probe_failed(self, s: EndpointState, seconds: float, now: float) -> None:
        """A peer's probe of ``s`` failed after its cooldown: the replica is still down.
        If ``s`` is out here too, put its reopening back as far as the peer's (never
        beyond the longest cooldown the local policy allows), so the fleet probes a dead
        replica about once per cooldown, not once per process.  (Trips are not lined up:
        the breakers' jitter keeps the processes' reopenings apart, so the first probe's
        verdict arrives before the others reopen.)"""
        b = s.breaker
        if b is None or b.state != "open" or s.url in self._suspects:
            return
        policy = b.policy
        # A little later than the peer (0-10%), so next time too its probe decides first.
        seconds *= 1.0 + _FOLLOW * self.pool.rng.random()
        until = now + min(seconds, policy.max_cooldown * (1.0 + policy.jitter))
        if until > b.reopen_at:
            b.reopen_at = until
            self.pool.invalidate()

    def _hasten(self, s: EndpointState, peer: str, now: float) -> None:
        """A peer's probe of ``s`` succeeded: probe it here now rather than at the end of
        the local cooldown (if it has been out a while: two processes cannot ping-pong)."""
        b = s.breaker
        if b is None or b.state != "open" or now - b.opened_at < _HASTEN_AFTER:
            return
        if b.allow_probe(now):
            self.pool.invalidate()

    def _remote_cool(self, s: EndpointState, seconds: float, status: object, now: float) -> None:
        cap = self.pool.cooldown_cap
        if cap is None or not math.isfinite(seconds) or seconds <= 0:
            return  # Retry-After is not honoured here: nor is anyone else's
        seconds = min(seconds, cap)
        if now + seconds <= s.cooldown_until:
            return
        code = status if is_int(status) else None
        self.pool.cool(s, seconds, code, now, publish=False)
        self.cooldowns += 1
        self._event("cooldown", f"Retry-After {seconds:.3g} s seen by another process", s.url, now)

    # -- modes (the background task) ------------------------------------------------------

    def connected(self, scripts: bool, peers: int) -> None:
        was = self.mode
        self.mode = CONNECTED
        self.scripts = scripts
        if peers > 0:
            self.peers_seen = peers
        for q in self.quotas:
            for b in q.buckets():
                b.go_leasing(self.peers)
        if was == DEGRADED:
            rounds = math.ceil(GRACE / max(self.config.sync_interval, 0.01))
            for budget in self.budgets.values():
                budget.reconnected(rounds)
        self.own_state()
        self._event(
            "connected",
            f"Redis answers ({'leases by script' if scripts else 'windowed-counter quotas'})"
            + (" again" if was == DEGRADED else ""),
            None,
            self.now(),
        )
        if not scripts and self.config.scripts:
            self.scripts_refused()

    def scripts_refused(self) -> None:
        self._event(
            "scripts",
            "the server refuses Lua scripts: fleet quotas use per-second counters",
            None,
            self.now(),
        )

    def degraded(self, reason: str) -> None:
        if self.mode == DEGRADED or self.closed:
            return
        self.mode = DEGRADED
        self.degraded_total += 1
        now = self.now()
        for q in self.quotas:
            for b in q.buckets():
                b.go_local(self.peers, now)
        self._event(
            "degraded",
            f"{reason}; on the last leases, then each quota / {self.peers} live process(es)",
            None,
            now,
        )

    def leases_lost(self) -> None:
        """A sync failed (Redis slow or gone, before the breaker says so): the quota
        buckets refill locally at quota / peers from now on, keeping what they hold, so
        a call never waits for a lease that may not come."""
        now = self.now()
        for q in self.quotas:
            for b in q.buckets():
                if b.leasing:
                    b.go_local(self.peers, now)

    def leases_back(self) -> None:
        """A sync succeeded: leases feed the buckets again."""
        if self.mode != CONNECTED:
            return
        for q in self.quotas:
            for b in q.buckets():
                if not b.leasing:
                    b.go_leasing(self.peers)

    def counted(self, peers: int) -> None:
        if peers > 0:
            self.peers_seen = peers
            for q in self.quotas:
                for b in q.buckets():
                    if b.leasing:
                        b.go_leasing(self.peers)

    def _event(self, action: str, reason: str, url: str | None, now: float) -> None:
        self.observer.emit(
            FleetEvent(action=action, reason=reason, url=url, peers=self.peers, at=now)
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """The background task (started with the balancer's other background work)."""
        if self.closed:
            return
        syncer = self._syncer_type(self)
        self.syncer = syncer
        await syncer.run()

    async def aclose(self) -> None:
        """Give unused leases back and leave the peer count (best effort, bounded by
        the timeout), then stop."""
        if self.closed:
            return
        syncer = self.syncer
        if syncer is not None:
            try:
                await syncer.farewell()
            except Exception:  # best effort: Redis may be gone
                log.debug("lbclient fleet: farewell failed", exc_info=True)
        self.closed = True
        self.mode = CLOSED
        if self.wake is not None:
            self.wake.set()

    def stats(self) -> SharedStats:
        now = self.now()
        quotas = tuple(
            FleetQuotaStats(
                tenant=q.tenant,
                dimension=b.name,
                leasing=b.leasing,
                level=b.level,
                demand_per_s=b.rate_ewma,
                leased=b.leased,
            )
            for q in self.quotas
            for b in q.buckets()
        )
        return SharedStats(
            mode=self.mode,
            namespace=self.config.namespace,
            peer=self.peer,
            peers=self.peers,
            scripts=self.scripts,
            synced_ago_s=None if self.synced_at is None else max(0.0, now - self.synced_at),
            rounds=self.rounds,
            errors=self.errors,
            degraded_total=self.degraded_total,
            events_sent=self.events_sent,
            events_received=self.events_received,
            ejected=self.ejected,
            suspected=self.suspected,
            refuted=self.refuted,
            cooldowns=self.cooldowns,
            quotas=quotas,
        )

    def __repr__(self) -> str:
        return f"<FleetLink {self.config.namespace} {self.mode} peers={self.peers}>"
