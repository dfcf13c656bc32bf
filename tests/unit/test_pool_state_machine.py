"""A hypothesis state machine over a balancer's pool: membership, health, breakers, time
and leases, driven synchronously with a :class:`~lbclient.testing.FakeClock`.

The machine keeps its own model of what the pool must look like -- which URLs are
members, which are draining, health-down, or retired by ``sync`` (removed once idle) --
and every lease it holds open, and checks after every step:

* each member's ``inflight`` equals the leases open on it, and the pool's
  ``totals.inflight`` the leases open anywhere (on members, or on endpoints removed
  while calls ran there);
* the per-endpoint counters add up: ``requests == successes + failures + ignored +
  cancelled + inflight``, each equal to what the machine recorded;
* membership, draining and health flags match the model; an endpoint retired by
  ``sync`` while it had open leases stays (draining) until its last lease ends, and is
  removed right then;
* every pick is legitimate, by the exact rule of :func:`lbclient.pool.snapshot.build`:

  - *on its own merit*: a member, not draining, health up, and its breaker (if any)
    closed, or open past its cooldown (it turns half-open), or half-open with a free
    probe slot;
  - otherwise only in **panic mode** -- with ejection on (a breaker configured), when
    fewer than ``need = active - floor(max_ejection x active)`` (at least 1) members are
    pickable on their own merit, the ``need - healthy`` ejected members (health-down or
    breaker not available; never draining) that failed least recently are served too;
  - nothing legitimate -> :class:`NoEndpointAvailable`;
  - a half-open endpoint with a free probe slot (not excluded) gets the pick outright;
  - endpoints in ``exclude`` are avoided while a legitimate other one remains.

* a view just rebuilt (``lb.stats()`` rebuilds a stale one) is not stale at once.

Finally, when every lease has ended, every ``inflight`` is 0 and every retired endpoint
is gone.  Rules: membership (add / remove / drain / undrain / health up / down), sync to a
random subset plus new URLs (new weights for survivors), clock advances, picks through
``acquire`` (with an affinity key and an exclude set) and ``acquire_fast``, back-to-back
calls, and ending an open lease with ok / ConnectionError / ValueError / cut / cancel.
Two machines: no breaker, and ``Breaker(failures=2, cooldown=1.0)``; the strategy is
drawn per run.

Four lbclient bugs the machine found (fixed) are pinned by the regression tests at the
end of this file.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import lbclient
from lbclient.pool.lease import Lease
from lbclient.pool.pool import Pool
from lbclient.pool.state import EndpointState
from lbclient.testing import FakeClock

UNIVERSE = [f"http://10.7.0.{i}:8000" for i in range(1, 7)]
STRATEGIES = ["peak_ewma", "power_of_two", "round_robin", "consistent_hash"]
OUTCOMES = ["ok", "endpoint_failure", "user_bug", "cut", "cancel"]
KEYS = ["alice", "bob", "carol", "dave"]

indices = st.integers(min_value=0, max_value=len(UNIVERSE) - 1)
weights = st.sampled_from([1.0, 2.0, 3.0])

try:
    from lbclient.pool.pool import Handoff as _Handoff

    Handoff: type[Exception] | None = _Handoff
except ImportError:  # an older pool: acquire_fast returned None for a probe/panic pick
    Handoff = None


def fast_pick(pool: Pool, now: float) -> tuple[EndpointState | None, Lease | None]:
    """``pool.acquire_fast(now)``: ``(state, None)`` for a plain slot taken on a closed
    endpoint, ``(None, lease)`` for a probe or panic pick handed to the full path."""
    if Handoff is None:
        s = pool.acquire_fast(now)
        return (s, None) if s is not None else (None, pool.acquire(None, None, now))
    try:
        return pool.acquire_fast(now), None
    except Handoff as handoff:
        lease: Lease = handoff.lease  # type: ignore[attr-defined]
        return None, lease


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    database=None,  # nothing written to the repo
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class PoolMachine(RuleBasedStateMachine):
    """See the module docstring.  Subclasses choose whether a breaker is configured."""

    BREAKER: lbclient.Breaker | None = None

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(100.0)
        self.lb: lbclient.Balancer | None = None
        # the model
        self.members: dict[str, EndpointState] = {}  # url -> the state it must be
        self.draining: set[str] = set()
        self.down: set[str] = set()
        self.retired: set[str] = set()  # retired by sync, waiting for its leases
        self.leases: list[Lease] = []  # open leases, in order taken
        # (snapshot, half-open endpoints a pick excluded while they were due a probe)
        self.skipped: tuple[object, set[EndpointState]] | None = None
        # (snapshot, id(state) -> last_failure when it was built)
        self.noted: tuple[object, dict[int, float]] | None = None
        self.counts: dict[int, Counter[str]] = {}  # id(state) -> expected counters
        self.states: list[EndpointState] = []  # every state seen (keeps ids unique)

    # -- setup ---------------------------------------------------------------------------

    @initialize(
        strategy=st.sampled_from(STRATEGIES),
        first=st.lists(indices, min_size=1, max_size=4, unique=True),
        seed=st.integers(min_value=0, max_value=2**16),
        slow_start=st.sampled_from([None, 1.0]),
    )
    def setup(self, strategy: str, first: list[int], seed: int, slow_start: float | None) -> None:
        urls = [UNIVERSE[i] for i in first]
        self.lb = lbclient.Balancer(
            urls,
            strategy=strategy,
            breaker=self.BREAKER,
            clock=self.clock,
            rng=seed,
            slow_start=slow_start,
        )
        for url in urls:
            self._adopt(url)
        self._note_snapshot()

    @property
    def pool(self) -> Pool:
        assert self.lb is not None
        return self.lb._pool

    def _adopt(self, url: str) -> None:
        """``url`` just became a member with a fresh state."""
        s = self.pool.members[url]
        assert s not in self.states, "a new member must get a new state"
        self.members[url] = s
        self.states.append(s)
        self.counts[id(s)] = Counter()
        self.draining.discard(url)
        self.down.discard(url)
        self.retired.discard(url)

    def _drop(self, url: str) -> None:
        del self.members[url]
        self.draining.discard(url)
        self.down.discard(url)
        self.retired.discard(url)

    def open_on(self, s: EndpointState) -> int:
        return sum(1 for lease in self.leases if lease.state is s)

    # -- membership ------------------------------------------------------------------------

    @rule(
        action=st.sampled_from(["add", "remove", "drain", "undrain", "up", "down"]),
        i=indices,
        weight=weights,
    )
    def membership(self, action: str, i: int, weight: float) -> None:
        """One membership or health change: add, remove, drain, undrain, health up/down."""
        getattr(self, f"do_{action}")(UNIVERSE[i], weight)

    def do_add(self, url: str, weight: float) -> None:
        assert self.lb is not None
        if url in self.members:
            with pytest.raises(lbclient.ConfigError):
                self.lb.add(lbclient.Endpoint(url, weight=weight))
            return
        self.lb.add(lbclient.Endpoint(url, weight=weight))
        self._adopt(url)

    def do_remove(self, url: str, weight: float) -> None:
        assert self.lb is not None
        if url not in self.members:
            with pytest.raises(lbclient.UnknownEndpoint):
                self.lb.remove(url)
            return
        self.lb.remove(url)
        self._drop(url)

    def do_drain(self, url: str, weight: float) -> None:
        assert self.lb is not None
        if url not in self.members:
            with pytest.raises(lbclient.UnknownEndpoint):
                self.lb.drain(url)
            return
        self.lb.drain(url)  # an awaitable; the draining itself happened already
        self.draining.add(url)

    def do_undrain(self, url: str, weight: float) -> None:
        assert self.lb is not None
        if url not in self.members:
            with pytest.raises(lbclient.UnknownEndpoint):
                self.lb.undrain(url)
            return
        self.lb.undrain(url)
        self.draining.discard(url)
        self.retired.discard(url)

    def do_up(self, url: str, weight: float) -> None:
        self._set_health(url, True)

    def do_down(self, url: str, weight: float) -> None:
        self._set_health(url, False)

    def _set_health(self, url: str, healthy: bool) -> None:
        assert self.lb is not None
        if url not in self.members:
            with pytest.raises(lbclient.UnknownEndpoint):
                self.lb.set_health(url, healthy)
            return
        self.lb.set_health(url, healthy)
        if healthy:
            self.down.discard(url)
        else:
            self.down.add(url)

    @rule(
        wanted=st.lists(
            st.tuples(indices, weights), max_size=len(UNIVERSE), unique_by=lambda t: t[0]
        )
    )
    def sync(self, wanted: list[tuple[int, float]]) -> None:
        assert self.lb is not None
        eps = [lbclient.Endpoint(UNIVERSE[i], weight=w) for i, w in wanted]
        self.lb.sync(eps)
        urls = {ep.url for ep in eps}
        for ep in eps:
            if ep.url in self.members:
                self.draining.discard(ep.url)
                self.retired.discard(ep.url)
                assert self.members[ep.url].endpoint.weight == ep.weight
            else:
                self._adopt(ep.url)
        for url in [u for u in self.members if u not in urls]:
            if self.open_on(self.members[url]) == 0:
                self._drop(url)  # idle: removed at once
            else:
                self.draining.add(url)
                self.retired.add(url)

    @rule(seconds=st.sampled_from([0.0, 0.01, 0.3, 0.6, 1.0, 1.2, 3.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(i=indices, load=st.sampled_from([0, 1, 5, 50]))
    def report_load(self, i: int, load: int) -> None:
        """A replica's own queue depth (``x-queue-depth``): counted by load-aware
        pickers for a while, changes no membership or counter."""
        assert self.lb is not None
        self.lb.report_load(UNIVERSE[i], load)

    # -- picking -----------------------------------------------------------------------------

    def merit(self, s: EndpointState, now: float) -> bool:
        """Pickable on its own merit (not counting panic mode)."""
        if s.draining or s.health_down:
            return False
        b = s.breaker
        if b is None or b.state == "closed":
            return True
        if b.state == "open":
            return now >= b.reopen_at  # turns half-open, with every probe slot free
        return b.probes_in_flight < b.policy.half_open_probes

    def free_probe(self, s: EndpointState, now: float) -> bool:
        """Half-open (or due to be) with a free probe slot."""
        b = s.breaker
        return b is not None and b.state != "closed" and self.merit(s, now)

    def legitimate(self, now: float) -> tuple[list[EndpointState], list[EndpointState], int]:
        """(active members on their own merit, the ejected ones, how many panic mode wants
        pickable -- 0 without ejection), by snapshot.build's rule."""
        active = [s for s in self.pool.members.values() if not s.draining]
        healthy = [s for s in active if self.merit(s, now)]
        ejected = [s for s in active if not self.merit(s, now)]
        need = 0
        if ejected and self.BREAKER is not None:  # ejection (and so panic) needs a breaker here
            share = self.BREAKER.max_ejection
            need = len(active) - math.floor(share * len(active) + 1e-9)
            if share < 1.0:
                need = max(1, need)
        return healthy, ejected, need

    @staticmethod
    def panic_served(
        healthy: list[EndpointState],
        ejected: list[EndpointState],
        need: int,
        last_failure: dict[int, float] | None = None,
    ) -> list[EndpointState]:
        """In panic (fewer than ``need`` healthy), the ejected members that failed least
        recently (stable: member order breaks ties) fill up to ``need``."""
        if len(healthy) >= need:
            return []
        if last_failure is None:
            ranked = sorted(ejected, key=lambda s: s.last_failure)
        else:
            ranked = sorted(ejected, key=lambda s: last_failure[id(s)])
        return ranked[: need - len(healthy)]

    def _note_snapshot(self) -> None:
        """Remember each member's ``last_failure`` as the current snapshot saw it when it
        was built (call right after anything that may rebuild it, before any outcome)."""
        snap = self.pool.snap
        if self.noted is None or self.noted[0] is not snap:
            self.noted = (snap, {id(s): s.last_failure for s in self.pool.members.values()})

    def _before_pick(self, exclude: set[EndpointState]) -> None:
        """Note what the rule allows for the pick about to be made."""
        now = self.clock.now()
        self.before = self.legitimate(now)
        self.snap_before = self.pool.snap
        self.probe_due = {x for x in self.before[0] if x not in exclude and self.free_probe(x, now)}
        self.breaker_before = {
            id(x): (x.breaker.state, x.breaker.trips) if x.breaker is not None else None
            for x in self.pool.members.values()
        }

    def _nothing_to_pick(self) -> bool:
        healthy, ejected, need = self.before
        return not healthy and not self.panic_served(healthy, ejected, need)

    def _after_pick(
        self, s: EndpointState, exclude: set[EndpointState], now: float, *, fast: bool = False
    ) -> None:
        """Check a pick against the rule noted by :meth:`_before_pick`."""
        self._note_snapshot()
        healthy, ejected, need = self.before
        served = self.panic_served(healthy, ejected, need)
        assert self.pool.members.get(s.url) is s, f"picked {s.url}, not a member"
        assert not s.draining, f"picked {s.url}, draining"
        assert self.pool.panic == (len(healthy) < need)
        if s not in healthy:
            assert len(healthy) < need, (
                f"picked {s.url} (down={s.health_down}, breaker={s.breaker}) outside panic "
                f"while {[h.url for h in healthy]} are pickable on their merit"
            )
            assert s in served, (
                f"panic served {s.url}; the rule serves {[p.url for p in served]} "
                "(the ejected ones that failed least recently)"
            )
        legit = [x for x in healthy + served if x not in exclude]
        if legit:
            assert s not in exclude, (
                f"picked excluded {s.url} while {[x.url for x in legit]} remain"
            )
        # Half-open endpoints with a free probe slot get the pick outright.
        due = self.probe_due
        if due:
            if fast:
                raise AssertionError(
                    f"fast path took {s.url} while {[p.url for p in due]} were due a probe"
                )
            assert s in self.probe_due, (
                f"half-open {[p.url for p in due]} due a probe, but {s.url} was picked"
            )
        skipped = {x for x in healthy if x in exclude and self.free_probe(x, now)}
        if skipped:
            snap = self.pool.snap
            kept = self.skipped[1] if self.skipped and self.skipped[0] is snap else set()
            self.skipped = (snap, kept | skipped)

    def _took(self, lease: Lease) -> None:
        self.leases.append(lease)
        self.counts[id(lease.state)]["requests"] += 1

    @rule(
        key=st.none() | st.sampled_from(KEYS),
        exclude=st.sets(indices, max_size=3),
    )
    def acquire(self, key: str | None, exclude: set[int]) -> None:
        """A pick, its lease kept open."""
        self._acquire(key, exclude)

    @rule(
        key=st.none() | st.sampled_from(KEYS),
        outcome=st.sampled_from(OUTCOMES),
        times=st.integers(min_value=1, max_value=3),
    )
    def call(self, key: str | None, outcome: str, times: int) -> None:
        """Back-to-back calls: a pick whose attempt ends at once with ``outcome``."""
        for _ in range(times):
            lease = self._acquire(key, set())
            if lease is None:
                return
            self.finish(len(self.leases) - 1, outcome)

    def _acquire(self, key: str | None, exclude: set[int]) -> Lease | None:
        now = self.clock.now()
        ex = {self.members[UNIVERSE[i]] for i in exclude if UNIVERSE[i] in self.members}
        call = lbclient.CallContext(key=key) if key is not None else None
        self._before_pick(ex)
        total = self.pool.totals.inflight
        if self._nothing_to_pick():
            with pytest.raises(lbclient.NoEndpointAvailable):
                self.pool.acquire(call, ex or None, now)
            self._note_snapshot()
            assert self.pool.totals.inflight == total
            return None
        lease = self.pool.acquire(call, ex or None, now)
        self._took(lease)  # first, so teardown can end it whatever is asserted next
        self._after_pick(lease.state, ex, now)
        b = lease.state.breaker
        if lease.state in self.probe_due:
            assert lease.probe > 0, "a half-open pick with a free slot must carry a probe token"
        elif b is None or self.breaker_before.get(id(lease.state)) == ("closed", b.trips):
            assert lease.probe == 0
        return lease

    @rule()
    def acquire_fast(self) -> None:
        """The decorator's fast path: ``acquire_fast`` -- a slot on a closed endpoint, or a
        probe/panic pick handed to the full path with its lease (as ``_fast`` does)."""
        now = self.clock.now()
        self._before_pick(set())
        total = self.pool.totals.inflight
        if self._nothing_to_pick():
            with pytest.raises(lbclient.NoEndpointAvailable):
                fast_pick(self.pool, now)
            self._note_snapshot()
            assert self.pool.totals.inflight == total
            return
        s, lease = fast_pick(self.pool, now)
        if s is not None:
            self._took(Lease(self.pool, s, now, 0))
            assert s.breaker is None or s.breaker.state == "closed"
            self._after_pick(s, set(), now, fast=True)
        else:
            assert lease is not None
            self._took(lease)
            b = lease.state.breaker
            assert b is not None and self.breaker_before[id(lease.state)] != ("closed", b.trips)
            self._after_pick(lease.state, set(), now)
            if lease.state in self.probe_due:
                assert lease.probe > 0, "a half-open pick with a free slot must carry a probe token"

    # -- outcomes ------------------------------------------------------------------------------

    @precondition(lambda self: bool(self.leases))
    @rule(i=st.integers(min_value=0, max_value=10**6), outcome=st.sampled_from(OUTCOMES))
    def finish(self, i: int, outcome: str) -> None:
        lease = self.leases.pop(i % len(self.leases))
        s = lease.state
        b = s.breaker
        before = (b.state, b.trips, b.consecutive_failures) if b is not None else None
        now = self.clock.now()
        counts = self.counts[id(s)]
        if outcome == "ok":
            assert lease.ok(now) is True
            counts["successes"] += 1
        elif outcome == "endpoint_failure":
            assert lease.fail(ConnectionError("refused"), now) is True
            counts["failures"] += 1
            assert s.last_failure == now
        elif outcome == "user_bug":
            assert lease.fail(ValueError("bug in the wrapped code"), now) is False
            counts["ignored"] += 1
        elif outcome == "cut":
            # held against the endpoint only if it ran longer than the endpoint usually
            # takes (a backup sent just before the deadline says nothing about it)
            charged = not s.count or now - lease.t0 > s.at(lease.t0)
            assert lease.cut(now) is True
            if charged:
                counts["failures"] += 1
                counts["cut"] += 1
                assert s.last_failure == now
            else:
                counts["cancelled"] += 1
                outcome = "cancel"
        else:
            assert lease.cancel() is True
            counts["cancelled"] += 1
        assert lease.done
        # a second outcome is ignored
        assert lease.cancel() is False and lease.ok() is False
        if outcome in ("user_bug", "cancel") and b is not None:
            # no verdict on the endpoint: the breaker does not move
            assert (b.state, b.trips, b.consecutive_failures) == before
        url = s.url
        if url in self.retired and self.members.get(url) is s and self.open_on(s) == 0:
            self._drop(url)  # its last lease ended: removed now

    @rule()
    def finish_all(self) -> None:
        """Every lease ends (cancelled, newest first)."""
        while self.leases:
            self.finish(len(self.leases) - 1, "cancel")

    @rule()
    def stats(self) -> None:
        """``lb.stats()`` agrees with the model (and refreshing the view changes nothing)."""
        assert self.lb is not None
        st_ = self.lb.stats()  # rebuilds the view if it is stale
        self._note_snapshot()
        now = self.clock.now()
        # A view just built is not stale at once (else every pick rebuilds it) ...
        assert self.pool.next_refresh > now, (self.pool.next_refresh, now)
        assert [e.url for e in st_.endpoints] == list(self.members)
        for e in st_.endpoints:
            s = self.members[e.url]
            assert e.in_flight == self.open_on(s)
            assert e.state == ("draining" if e.url in self.draining else "active")
            c = self.counts[id(s)]
            assert (e.requests, e.successes, e.failures, e.ignored, e.cancelled, e.cut) == (
                c["requests"],
                c["successes"],
                c["failures"],
                c["ignored"],
                c["cancelled"],
                c["cut"],
            )
        assert st_.in_flight == sum(self.open_on(s) for s in self.members.values())

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def inflight_matches_open_leases(self) -> None:
        if self.lb is None:
            return
        for s in self.states:
            n = self.open_on(s)
            assert s.inflight >= 0
            assert s.inflight == n, f"{s.url}: inflight {s.inflight}, {n} open lease(s)"
        assert self.pool.totals.inflight == len(self.leases)

    @invariant()
    def pick_keys_are_current(self) -> None:
        """``peak_ewma`` compares a cached score: every write the pool made to cost,
        stamp, weight, penalty, server load or in-flight must have refreshed it."""
        if self.lb is None or not self.pool.totals.scored:
            return
        for s in self.states:
            key, score = s.key, s.score
            s.rekey()
            assert (s.key, s.score) == (key, score), f"{s.url}: stale pick key"

    @invariant()
    def counters_add_up(self) -> None:
        if self.lb is None:
            return
        for s in self.states:
            c = self.counts[id(s)]
            got = (s.requests, s.successes, s.failures, s.ignored, s.cancelled, s.cut, s.lost)
            want = (
                c["requests"],
                c["successes"],
                c["failures"],
                c["ignored"],
                c["cancelled"],
                c["cut"],
                0,
            )
            assert got == want, f"{s.url}: {got} != {want}"
            assert s.requests == s.successes + s.failures + s.ignored + s.cancelled + s.inflight

    @invariant()
    def membership_matches_model(self) -> None:
        if self.lb is None:
            return
        members = self.pool.members
        assert list(members) == list(self.members), "members (and their order)"
        for url, s in members.items():
            assert s is self.members[url], f"{url}: a different state object"
            assert s.draining == (url in self.draining), f"{url}: draining={s.draining}"
            assert s.health_down == (url in self.down), f"{url}: health_down={s.health_down}"
            retired = url in self.retired
            assert s.remove_when_idle == retired, f"{url}: remove_when_idle={s.remove_when_idle}"
            if retired:
                assert self.open_on(s) > 0, f"{url} retired and idle, but still a member"
        assert [e.url for e in self.lb.endpoints] == list(self.members)

    def teardown(self) -> None:
        if self.lb is None:
            return
        self.finish_all()
        assert not self.retired, f"retired endpoints left after every lease ended: {self.retired}"
        for s in self.states:
            assert s.inflight == 0, s
        assert self.pool.totals.inflight == 0
        assert set(self.pool.members) == set(self.members)


class PlainPool(PoolMachine):
    BREAKER = None


class BreakerPool(PoolMachine):
    BREAKER = lbclient.Breaker(failures=2, cooldown=1.0)


TestPlainPool = PlainPool.TestCase
TestPlainPool.settings = SETTINGS
TestBreakerPool = BreakerPool.TestCase
TestBreakerPool.settings = SETTINGS


# -- a bug the machine found, pinned down ---------------------------------------------------


@pytest.mark.parametrize("path", ["acquire", "acquire_fast"])
def test_excluded_half_open_endpoint_keeps_its_probe_pick(path: str) -> None:
    clock = FakeClock(100.0)
    a, b = UNIVERSE[0], UNIVERSE[1]
    lb = lbclient.Balancer(
        [a, b], breaker=lbclient.Breaker(failures=1, cooldown=1.0), clock=clock, rng=0
    )
    pool = lb._pool
    sb = pool.members[b]
    lease = pool.acquire(None, {pool.members[a]}, clock.now())
    assert lease.state is sb
    lease.fail(ConnectionError("refused"))
    assert sb.breaker is not None and sb.breaker.state == "open"
    clock.advance(2.0)  # past the cooldown: b is due a half-open probe
    # A call that already tried b (a retry, a hedge backup) excludes it: it goes to a.
    other = pool.acquire(None, {sb}, clock.now())
    assert other.state is pool.members[a]
    other.ok()
    assert sb.breaker.state == "half_open" and sb.breaker.probes_in_flight == 0
    # The next call that may go to b must be its probe.
    if path == "acquire":
        probe = pool.acquire(None, None, clock.now())
    else:
        s, handed = fast_pick(pool, clock.now())  # a probe: handed to the full path
        assert s is None and handed is not None, f"the fast path took a plain slot on {s}"
        probe = handed
    assert probe.state is sb and probe.probe > 0, (probe, probe.probe)


def _fail_on(lb: lbclient.Balancer, url: str, clock: FakeClock) -> None:
    """One counted failure on ``url`` (the others excluded from the pick)."""
    pool = lb._pool
    target = pool.members[url]
    lease = pool.acquire(None, {s for s in pool.members.values() if s is not target}, clock.now())
    assert lease.state is target
    lease.fail(ConnectionError("refused"))


@pytest.mark.parametrize("path", ["acquire", "acquire_fast"])
def test_due_probe_goes_before_a_panic_pick_of_a_busy_half_open(path: str) -> None:
    clock = FakeClock(100.0)
    a, b, c = UNIVERSE[0], UNIVERSE[1], UNIVERSE[2]
    lb = lbclient.Balancer(
        [a, b, c],
        strategy="round_robin",
        breaker=lbclient.Breaker(failures=1, cooldown=1.0, jitter=0.0),
        clock=clock,
        rng=0,
    )
    pool = lb._pool
    _fail_on(lb, a, clock)  # a reopens at 101.0
    clock.advance(0.25)
    _fail_on(lb, b, clock)  # b at 101.25
    clock.advance(0.25)
    _fail_on(lb, c, clock)  # c at 101.5
    clock.advance(0.5)  # 101.0: a is half-open; its probe goes out and stays out
    probe_a = pool.acquire(None, None, clock.now())
    assert probe_a.state is pool.members[a] and probe_a.probe > 0
    clock.advance(0.25)  # 101.25: b is half-open with a free slot, due its probe
    sb = pool.members[b]
    # (panic: need 2 pickable, only b is on its merit -> a, which failed longest ago,
    # is served too, as an ordinary call: its probe slot is taken)
    if path == "acquire":
        lease = pool.acquire(None, None, clock.now())
    else:
        s, handed = fast_pick(pool, clock.now())  # a probe: handed to the full path
        assert s is None and handed is not None, f"the fast path took a plain slot on {s}"
        lease = handed
    assert lease.state is sb and lease.probe > 0, (lease, lease.probe)


def test_snapshot_of_a_long_health_down_endpoint_is_not_rebuilt_on_every_pick() -> None:
    clock = FakeClock(100.0)
    a, b = UNIVERSE[0], UNIVERSE[1]
    lb = lbclient.Balancer(
        [a, b], strategy="round_robin", breaker=lbclient.Breaker(), clock=clock, rng=0
    )
    pool = lb._pool
    lb.set_health(b, False)  # b's breaker is forced open (cooldown 5 s)
    clock.advance(120.0)  # the health check keeps failing, well past any cooldown
    first = pool.acquire(None, None, clock.now())
    first.ok()
    built = pool.snap
    for _ in range(3):  # nothing changed: the picks read the same view
        lease = pool.acquire(None, None, clock.now())
        assert lease.state is pool.members[a]
        lease.ok()
        assert pool.snap is built, "the snapshot was rebuilt for a pick with nothing changed"
    assert pool.next_refresh > clock.now()


def test_panic_rotates_to_the_endpoint_that_failed_longest_ago() -> None:
    clock = FakeClock(100.0)
    a, b = UNIVERSE[0], UNIVERSE[1]
    lb = lbclient.Balancer(
        [a, b],
        strategy="round_robin",
        breaker=lbclient.Breaker(failures=2, cooldown=1.0, jitter=0.0),
        clock=clock,
        rng=0,
    )
    pool = lb._pool
    sa, sb = pool.members[a], pool.members[b]
    lb.set_health(b, False)  # b ejected by its health check (its breaker forced open)
    _fail_on(lb, a, clock)
    _fail_on(lb, a, clock)  # a's breaker opens: both ejected, panic
    lease = pool.acquire(None, None, clock.now())
    assert pool.panic and lease.state is sb  # b never failed: it ranks first
    lease.ok()  # a panic call that worked closes b's breaker (b stays health-down)
    assert sb.breaker is not None and sb.breaker.state == "closed" and sb.health_down
    probe = pool.acquire(None, None, clock.now())  # a is half-open now: its probe
    assert probe.state is sa and probe.probe > 0
    clock.advance(0.25)
    # a's probe is out, b is health-down: panic serves one, b (it never failed)
    lease = pool.acquire(None, None, clock.now())
    assert pool.panic and lease.state is sb
    lease.fail(ConnectionError("refused"))  # b's breaker stays closed (1 of 2)
    assert sb.last_failure > sa.last_failure  # now a failed longest ago
    nxt = pool.acquire(None, None, clock.now())
    assert nxt.state is sa, f"panic still serves {nxt.state.url}, which just failed"
    probe.cancel()
