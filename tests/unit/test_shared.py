"""The fleet-shared state without Redis: how remote evidence is weighed and applied to a
real pool, the leased quota buckets, the breaker's suspect transition, the configuration.

The link's background task never runs here (no event loop picks): the tests hand it what
another process would have published (``link.receive``) and read what it would publish
(``link.take_outbox``), on a :class:`FakeClock`.  The Redis side is tested against a
real ``redis-server`` in ``tests/integration/test_shared_redis.py``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lbclient
from lbclient._errors import ConfigError
from lbclient.admission.gate import Gate
from lbclient.policies.breaker import Breaker, BreakerState
from lbclient.pool.lease import Lease
from lbclient.shared.counter import FleetCounter
from lbclient.shared.evidence import EJECT, NONE, SUSPECT, Evidence
from lbclient.shared.lease import HORIZON, LeasedBucket, SharedTenantQuota, busy, plan
from lbclient.shared.link import FleetLink
from lbclient.testing import FakeClock

URLS = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]
A = URLS[0]
REDIS = "redis://127.0.0.1:1/0"  # never reached: the background task does not run here


def balancer(
    clock: FakeClock, events: list[lbclient.Event] | None = None, **kw: Any
) -> lbclient.Balancer:
    kw.setdefault("breaker", lbclient.Breaker(failures=3, jitter=0.0, cooldown=5.0))
    shared = kw.pop("shared", None) or lbclient.RedisState(REDIS)
    return lbclient.Balancer(
        URLS,
        clock=clock,
        rng=1,
        shared=shared,
        on_event=(events.append if events is not None else None),
        **kw,
    )


def link_of(lb: lbclient.Balancer) -> FleetLink:
    link = lb._pool.shared
    assert isinstance(link, FleetLink)
    return link


def msg(peer: str, *events: list[Any]) -> bytes:
    return json.dumps({"p": peer, "e": list(events)}).encode()


def breaker_of(lb: lbclient.Balancer, url: str = A) -> BreakerState:
    b = lb._pool.state_of(url).breaker
    assert b is not None
    return b


def fail_locally(lb: lbclient.Balancer, clock: FakeClock, url: str = A, n: int = 1) -> None:
    pool = lb._pool
    for _ in range(n):
        s = pool.state_of(url)
        pool._take(s, clock.now())  # an in-flight slot, as a pick would take
        Lease(pool, s, clock.now(), 0).fail(ConnectionError("refused"))
        clock.advance(0.01)


def succeed_locally(lb: lbclient.Balancer, clock: FakeClock, url: str = A) -> None:
    pool = lb._pool
    s = pool.state_of(url)
    pool._take(s, clock.now())
    Lease(pool, s, clock.now(), 0).ok()


def fleet_events(events: list[lbclient.Event], action: str) -> list[lbclient.FleetEvent]:
    return [e for e in events if isinstance(e, lbclient.FleetEvent) and e.action == action]


# -- weighing remote evidence, applied to a real pool ------------------------------------------


def test_one_peer_trip_makes_the_next_call_a_probe_and_a_success_refutes_it() -> None:
    clock = FakeClock(100.0)
    events: list[lbclient.Event] = []
    lb = balancer(clock, events)
    link = link_of(lb)
    link.receive(msg("p1", ["open", A, 5.0, 3, False]))
    b = breaker_of(lb)
    assert b.state == "half_open"  # not ejected: one probe decides
    assert b.trips == 0  # and no trip counted: the local cooldown does not grow
    assert fleet_events(events, "suspect")
    lease = lb._pool.acquire(None, None, clock.now())
    assert lease.state.url == A and lease.probe > 0  # the next call is the probe
    lease.ok()
    assert b.state == "closed"
    assert fleet_events(events, "refuted")
    out = link.take_outbox()
    assert ["close", A] in out
    # The refuted peer is not believed about A for a while...
    link.receive(msg("p1", ["open", A, 5.0, 3, False]))
    assert b.state == "closed"
    # ...then it is again.
    clock.advance(link.evidence.refute_for + 1)
    link.receive(msg("p1", ["open", A, 5.0, 3, False]))
    assert b.state == "half_open"


def test_a_probe_that_fails_confirms_with_the_usual_cooldown() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    link.receive(msg("p1", ["open", A, 5.0, 3, False]))
    lease = lb._pool.acquire(None, None, clock.now())
    assert lease.state.url == A and lease.probe > 0
    lease.fail(ConnectionError("refused"))
    b = breaker_of(lb)
    assert b.state == "open"
    assert b.reopen_at - clock.now() == pytest.approx(5.0)  # Breaker(cooldown=5), no growth
    out = link.take_outbox()
    assert out[-1][:2] == ["open", A] and out[-1][4] is False  # its own evidence now
    assert out[-1][5] is True  # and a failed probe: peers put their reopening back


def test_two_peers_trips_eject_at_once_and_are_republished_as_derived() -> None:
    clock = FakeClock(100.0)
    events: list[lbclient.Event] = []
    lb = balancer(clock, events)
    link = link_of(lb)
    link.receive(msg("p1", ["open", A, 5.0, 3, False]))
    link.receive(msg("p2", ["open", A, 5.0, 3, False]))
    b = breaker_of(lb)
    assert b.state == "open" and b.trips == 1
    eject = fleet_events(events, "eject")
    assert eject and "fleet:" in eject[0].reason
    assert lb.stats().endpoint(A).pickable is False
    opens = [e for e in link.take_outbox() if e[0] == "open"]
    assert opens and opens[-1][4] is True  # derived: others must not count it again


def test_failures_counted_together_trip_at_the_breaker_threshold() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)  # Breaker(failures=3)
    link = link_of(lb)
    link.receive(msg("p1", ["run", A, 1]))
    link.receive(msg("p2", ["run", A, 1]))
    b = breaker_of(lb)
    assert b.state == "closed"  # 2 in the fleet: not yet
    fail_locally(lb, clock)
    assert b.state == "open"  # 3 in a row across 3 processes: the breaker's threshold
    assert b.consecutive_failures == 1  # only one of them here


def test_a_peer_run_ended_by_a_success_no_longer_counts() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    link.receive(msg("p1", ["run", A, 2]))
    link.receive(msg("p1", ["run", A, 0]))
    fail_locally(lb, clock, n=2)
    assert breaker_of(lb).state == "closed"


def test_runs_expire_after_the_evidence_ttl() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    link.receive(msg("p1", ["run", A, 2]))
    clock.advance(link.evidence.ttl + 0.1)
    fail_locally(lb, clock)
    assert breaker_of(lb).state == "closed"


def test_derived_trips_alone_are_not_evidence() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    link.receive(msg("p1", ["open", A, 5.0, 0, True]))
    link.receive(msg("p2", ["open", A, 5.0, 0, True]))
    assert breaker_of(lb).state == "closed"


def test_a_peer_s_failed_probe_puts_the_local_reopening_back_but_a_trip_does_not() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    fail_locally(lb, clock, n=3)
    b = breaker_of(lb)
    assert b.state == "open"
    mine = b.reopen_at
    link.receive(msg("p1", ["open", A, 9.0, 3, False, False]))  # a trip: jitter kept
    assert b.reopen_at == mine
    link.receive(msg("p1", ["open", A, 9.0, 4, False, True]))  # its probe failed
    # Reopens a little after that peer (0-10% later): its next probe decides first.
    assert clock.now() + 9.0 <= b.reopen_at <= clock.now() + 9.9
    link.receive(msg("p2", ["open", A, 1e6, 3, False, True]))  # never beyond the policy
    assert b.reopen_at <= clock.now() + b.policy.max_cooldown * (1 + b.policy.jitter)


def test_a_failed_probe_is_published_as_such() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    fail_locally(lb, clock, n=3)
    assert link.take_outbox()[-1][5] is False  # a trip
    clock.advance(6.0)
    lease = lb._pool.acquire(None, None, clock.now())
    assert lease.state.url == A and lease.probe > 0
    lease.fail(ConnectionError("refused"))
    assert link.take_outbox()[-1][5] is True  # a probe that failed


def test_a_peer_recovery_hastens_the_local_probe_but_not_at_once() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    fail_locally(lb, clock, n=3)
    b = breaker_of(lb)
    link.receive(msg("p1", ["close", A]))
    assert b.reopen_at > clock.now()  # just opened: two processes must not ping-pong
    clock.advance(1.5)
    link.receive(msg("p1", ["close", A]))
    assert b.reopen_at == clock.now()
    assert b.available(clock.now()) and b.state == "half_open"


def test_retry_after_is_applied_from_peers_within_the_local_cap() -> None:
    clock = FakeClock(100.0)
    events: list[lbclient.Event] = []
    lb = balancer(clock, events, retry=lbclient.Retry(max_retry_after=4.0))
    link = link_of(lb)
    link.receive(msg("p1", ["cool", A, 10.0, 429]))
    st_a = lb.stats().endpoint(A)
    assert st_a.cooling_s == pytest.approx(4.0) and not st_a.pickable
    assert fleet_events(events, "cooldown")
    assert link.take_outbox() == []  # not echoed back


def test_retry_after_from_peers_is_ignored_where_it_is_not_honoured() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock, retry=lbclient.Retry(respect_retry_after=False))
    link_of(lb).receive(msg("p1", ["cool", A, 10.0, 429]))
    assert lb.stats().endpoint(A).cooling_s == 0.0


def test_own_messages_and_garbage_are_ignored() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    link.receive(msg(link.peer, ["open", A, 5.0, 3, False], ["open", A, 5.0, 3, False]))
    link.receive(b"not json")
    link.receive(msg("p1", ["open", A, "x", 3, False]))
    link.receive(msg("p1", ["open", "http://unknown:1", 5.0, 3, False]))
    assert breaker_of(lb).state == "closed"


def test_sharing_can_be_turned_off_per_kind() -> None:
    clock = FakeClock(100.0)
    lb = balancer(
        clock,
        shared=lbclient.RedisState(REDIS, share_ejections=False, share_cooldowns=False),
    )
    link = link_of(lb)
    link.receive(msg("p1", ["open", A, 5.0, 3, False], ["cool", A, 5.0, 429]))
    link.receive(msg("p2", ["open", A, 5.0, 3, False]))
    assert breaker_of(lb).state == "closed"
    assert lb.stats().endpoint(A).cooling_s == 0.0
    fail_locally(lb, clock, n=3)
    assert link.take_outbox() == []


def test_local_failures_are_queued_and_their_end_is_polled() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock)
    link = link_of(lb)
    fail_locally(lb, clock, n=2)
    assert link.take_outbox() == [["run", A, 2]]
    assert link.poll_runs() is not None  # a run is out: look again soon
    succeed_locally(lb, clock)
    link.poll_runs()
    assert link.take_outbox() == [["run", A, 0]]
    assert link.poll_runs() is None


def test_own_state_is_republished_after_a_reconnect() -> None:
    clock = FakeClock(100.0)
    lb = balancer(clock, retry=lbclient.Retry())
    link = link_of(lb)
    fail_locally(lb, clock, n=3)
    lb._pool.cool(lb._pool.state_of(URLS[1]), 3.0, 503, clock.now())
    link.take_outbox()
    link.connected(scripts=True, peers=3)
    kinds = sorted((e[0], e[1]) for e in link.take_outbox())
    assert kinds == [("cool", URLS[1]), ("open", A)]
    assert lb.stats().shared is not None and lb.stats().shared.peers == 3


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["run", "open", "close"]),
            st.integers(0, 10),
            st.booleans(),
            st.floats(0.0, 3.0),
        ),
        max_size=30,
    )
)
def test_one_peer_alone_never_ejects(reports: list[tuple[str, int, bool, float]]) -> None:
    ev = Evidence()
    now = 0.0
    for kind, n, derived, dt in reports:
        now += dt
        if kind == "run":
            ev.run(A, "p1", n, now)
        elif kind == "open":
            ev.opened(A, "p1", 5.0, n, derived, now)
        else:
            ev.closed(A, "p1", now)
        verdict, _, _ = ev.weigh(A, 0, 5, now)
        assert verdict in (NONE, SUSPECT)


def test_weigh_table() -> None:
    ev = Evidence(ttl=5.0)
    assert ev.weigh(A, 4, 5, 0.0)[0] == NONE  # local alone: the local breaker decides
    ev.run(A, "p1", 1, 0.0)
    assert ev.weigh(A, 4, 5, 0.0)[0] == EJECT  # 5 in a row, 2 sources
    assert ev.weigh(A, 3, 5, 0.0)[0] == NONE
    ev.opened(A, "p2", 5.0, 5, False, 0.0)
    verdict, fleet, sources = ev.weigh(A, 0, 5, 1.0)
    assert verdict == EJECT and fleet == 6 and sources == {"p1", "p2"}
    assert ev.weigh(A, 0, 5, 6.0)[0] == NONE  # p2's trip over, p1's run stale
    ev.opened(A, "p2", 5.0, 5, False, 6.0)
    assert ev.weigh(A, 0, 5, 6.0)[0] == SUSPECT
    ev.refute(A, {"p2"}, 6.0)
    assert ev.weigh(A, 0, 5, 6.0)[0] == NONE


# -- the breaker's suspect transition -----------------------------------------------------------


def test_suspect_moves_closed_to_half_open_without_a_trip() -> None:
    events: list[lbclient.BreakerEvent] = []
    b = BreakerState(Breaker(jitter=0.0), A, rng=random.Random(0), emit=events.append)
    assert b.suspect(1.0, "fleet: test")
    assert b.state == "half_open" and b.trips == 0 and b.streak == 0
    assert (events[-1].old, events[-1].new) == ("closed", "half_open")
    assert not b.suspect(1.0, "again")  # only from closed
    probe = b.on_pick(1.0)
    assert probe > 0
    b.on_failure(2.0, probe)
    assert b.state == "open" and b.reopen_at == pytest.approx(2.0 + 5.0)


# -- leased quota buckets ---------------------------------------------------------------------


def test_a_bucket_before_any_lease_takes_its_share_of_the_quota() -> None:
    b = LeasedBucket("requests", 100.0, 100.0, now=0.0, peers=4, unit=1.0)
    assert not b.leasing and b.level == 25.0 and b.rate == 25.0  # quota / peers
    for _ in range(25):
        assert b.wait_for(1.0, 0.0) == 0.0
        b.take(1.0)
    assert b.wait_for(1.0, 0.0) == pytest.approx(1 / 25)
    assert b.debt == 25.0  # owed to the fleet bucket at the next sync
    assert b.wait_for(1.0, 0.2) == 0.0  # refills at 25/s: 5 in 0.2 s


def test_a_leasing_bucket_refills_only_by_leases_and_starts_idle_on_credit() -> None:
    b = LeasedBucket("requests", 100.0, 100.0, now=0.0, peers=4, unit=1.0)
    b.go_leasing(4)
    b.level = 0.0
    for _ in range(25):  # idle: credit up to its share of the burst
        assert b.wait_for(1.0, 10.0) == 0.0
        b.take(1.0)
    assert b.wait_for(1.0, 10.0) > 0
    assert b.level == -25.0 and b.debt == 0.0  # repaid by the next leases, not owed
    ask, give, debt, demand = plan(b, 10.2, 0.2)
    assert demand > 0 and ask == pytest.approx(25.0 + demand * HORIZON * 0.2)
    assert give == 0.0 and debt == 0.0
    b.level += ask  # the lease
    assert b.wait_for(1.0, 10.3) == 0.0


def test_plan_gives_back_what_is_held_beyond_demand_and_stops_when_idle() -> None:
    b = LeasedBucket("requests", 100.0, 100.0, now=0.0, peers=1, unit=1.0)
    b.go_leasing(1)
    b.level = 50.0
    b.demand = 2.0
    ask, give, _, demand = plan(b, 1.0, 0.2)
    assert demand == pytest.approx(2.0) and ask == 0.0
    assert give == pytest.approx(50.0 - 1.0)  # keeps one call's worth
    b.level -= give
    for i in range(40):  # no more demand: the EWMA decays to zero
        plan(b, 1.0 + 0.2 * (i + 1), 0.2)
    b.level = 0.0
    assert not busy(b)


def test_degraded_keeps_the_last_lease_then_refills_at_quota_over_peers() -> None:
    b = LeasedBucket("requests", 100.0, 100.0, now=0.0, peers=4, unit=1.0)
    b.go_leasing(4)
    b.level = 40.0  # a lease above the local share
    b.go_local(4, now=1.0)
    assert b.wait_for(1.0, 2.0) == 0.0 and b.level == 40.0  # kept, not clipped
    b.level = 0.0
    assert b.wait_for(1.0, 3.0) == 0.0 and b.level == pytest.approx(25.0)  # 25/s, cap 25


def test_gate_quota_is_leased_when_shared() -> None:
    clock = FakeClock(0.0)
    lb = balancer(
        clock,
        admission=lbclient.Admission(
            limit=100, quotas={"*": lbclient.Quota(requests_per_second=10)}
        ),
        shared=lbclient.RedisState(REDIS, expected_peers=2),
    )
    gate = lb._engine.gate
    assert isinstance(gate, Gate)
    admitted = 0
    for _ in range(20):
        try:
            gate.try_admit("t", 0.0, 0, clock.now()).release()  # type: ignore[union-attr]
            admitted += 1
        except lbclient.QuotaExceeded:
            pass
    assert admitted == 5  # quota / expected_peers before any lease, never the whole quota
    q = gate._quotas["t"]
    assert isinstance(q, SharedTenantQuota)
    link = link_of(lb)
    link.connected(scripts=True, peers=5)
    assert q.requests is not None and q.requests.leasing
    link.degraded("test")
    stats = lb.stats().shared
    assert stats is not None and stats.mode == "degraded" and stats.degraded_total == 1
    assert isinstance(q.requests, LeasedBucket) and q.requests.rate == pytest.approx(2.0)


def test_fleet_counter_errs_high_when_disconnected() -> None:
    connected = [True]
    c = FleetCounter("cost", 3600.0, lambda: (4, connected[0]))
    c.add(2.0)
    assert c.total() == 2.0
    sent = c.take()
    c.synced(1, 10.0, sent)  # the fleet spent 10 this window, ours included
    c.add(1.0)
    assert c.total() == 11.0
    connected[0] = False  # Redis out of reach: the 3 others may be spending alike
    assert c.total() == 14.0
    sent = c.take()
    c.lost(sent)
    assert c.pending == 1.0 and c.sending == 0.0


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        (("http://x",), {}, "url"),
        ((), {}, "url"),
        (("redis://x",), {"connect": lambda: None}, "url"),
        (("redis://x",), {"namespace": "a b"}, "namespace"),
        (("redis://x",), {"sync_interval": 1.0}, "sync_interval"),
        (("redis://x",), {"timeout": 0}, "timeout"),
        (("redis://x",), {"expected_peers": 0}, "expected_peers"),
        (("redis://x",), {"scripts": "yes"}, "scripts"),
        (("redis://x",), {"peer_ttl": 0.1}, "peer_ttl"),
        (("redis://x",), {"connect": object()}, "connect"),
    ],
)
def test_redis_state_rejects_a_bad_value_naming_it(
    args: tuple[Any, ...], kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        lbclient.RedisState(*args, **kwargs)


def test_redis_state_defaults_repr_and_prefix() -> None:
    r = lbclient.RedisState("redis://user:secret@10.0.0.5:6379/0", namespace="chat")
    assert (r.sync_interval, r.timeout, r.peer_ttl, r.expected_peers) == (0.2, 0.05, 3.0, 1)
    assert "secret" not in repr(r) and repr(r).startswith("lbclient.RedisState(")
    assert r.prefix == "lbclient:{chat}"
    with pytest.raises(ConfigError, match="shared"):
        lbclient.Balancer(URLS, shared="redis://x")  # type: ignore[arg-type]
