"""Slow start: an endpoint added later, or back from breaker ejection, ramps its weight
linearly from 10% to 100% over ``slow_start`` seconds (Envoy's slow_start_window).

A :class:`FakeClock` is advanced by hand; picks go through the balancer's pool
(``acquire`` takes a lease, ``lease.ok()`` / ``fail()`` end it: the synchronous half of a
call).  The effective weight is refreshed when
the pick snapshot is rebuilt -- every tenth of the window while a ramp is running, on a
pick or on ``stats()``.

Pick shares use ``weighted_round_robin``, which is exact: over a window of ``n`` picks at
a constant weight, an endpoint gets ``n x w / sum(w)`` picks within +/-1 (+1 slack for
the random phase of a rebuilt schedule).
"""

from __future__ import annotations

from collections import Counter

import pytest
from strategies import acquire

from lbclient import Balancer, Breaker, Endpoint
from lbclient.testing import FakeClock

A, B, C, SEED = (f"http://10.0.0.{i}:8000" for i in (1, 2, 3, 9))
WINDOW = 10.0


def picks(lb: Balancer, clock: FakeClock, n: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(n):
        lease = acquire(lb, now=clock.now())
        assert lease.ok()
        counts[lease.state.url] += 1
    return counts


def weight(lb: Balancer, url: str) -> float:
    return lb.stats().endpoint(url).effective_weight


def full_weight_pool(clock: FakeClock, **kw: object) -> Balancer:
    """A balancer whose members A and B are at full weight, built by adding them after
    construction and letting their ramp finish (so these tests do not depend on how the
    initial pool is treated -- that is tested on its own below)."""
    lb = Balancer(
        [SEED],
        slow_start=WINDOW,
        clock=clock,
        strategy="weighted_round_robin",
        rng=3,
        **kw,  # type: ignore[arg-type]
    )
    lb.add(A)
    lb.add(B)
    clock.advance(WINDOW)
    picks(lb, clock, 1)  # refresh: the ramp is over
    lb.remove(SEED)
    assert weight(lb, A) == weight(lb, B) == 1.0
    return lb


def test_added_endpoint_starts_at_ten_percent_and_ramps_linearly() -> None:
    clock = FakeClock()
    lb = full_weight_pool(clock)
    lb.add(C)
    lb.add(Endpoint("http://10.0.0.4:8000", weight=2.0))
    picks(lb, clock, 1)
    assert weight(lb, C) == pytest.approx(0.1)
    assert weight(lb, "http://10.0.0.4:8000") == pytest.approx(0.2)  # 10% of its weight
    assert lb.stats().endpoint(C).weight == 1.0  # the configured weight is untouched
    for t in range(1, 11):
        clock.advance(1.0)
        picks(lb, clock, 1)
        expected = max(0.1, t / WINDOW)
        assert weight(lb, C) == pytest.approx(expected), t
        assert weight(lb, "http://10.0.0.4:8000") == pytest.approx(2 * expected), t
    assert weight(lb, C) == 1.0  # full weight at the end of the window ...
    clock.advance(30.0)
    picks(lb, clock, 1)
    assert weight(lb, C) == 1.0  # ... and it stays there
    assert weight(lb, A) == weight(lb, B) == 1.0  # the others never moved


def test_ramp_is_half_way_at_half_the_window() -> None:
    clock = FakeClock()
    lb = full_weight_pool(clock)
    clock.advance(3.0)
    lb.add(C)
    clock.advance(5.0)
    picks(lb, clock, 1)
    assert weight(lb, C) == pytest.approx(0.5)
    clock.advance(5.0)
    picks(lb, clock, 1)
    assert weight(lb, C) == 1.0


def test_pick_share_follows_the_ramp() -> None:
    clock = FakeClock()
    lb = full_weight_pool(clock)
    lb.add(C)
    shares = []
    for t in range(12):
        n = 420
        counts = picks(lb, clock, n)  # all at time t: one weight per window
        w = max(0.1, min(1.0, t / WINDOW))
        expected = n * w / (2.0 + w)
        assert abs(counts[C] - expected) <= 2, (t, counts[C], expected)
        assert abs(counts[A] - counts[B]) <= 2
        shares.append(counts[C] / n)
        clock.advance(1.0)
    assert shares[0] == pytest.approx(0.1 / 2.1, abs=0.01)  # ~4.8% at first
    assert shares[5] == pytest.approx(0.5 / 2.5, abs=0.01)  # 20% half way
    assert shares[-1] == pytest.approx(1 / 3, abs=0.01)  # an equal share at the end
    assert shares == sorted(shares)


def test_without_slow_start_a_new_endpoint_gets_full_weight_at_once() -> None:
    clock = FakeClock()
    lb = Balancer([A, B], clock=clock, strategy="weighted_round_robin", rng=3)
    lb.add(C)
    assert weight(lb, C) == 1.0
    counts = picks(lb, clock, 300)
    assert counts == Counter({A: 100, B: 100, C: 100})


def test_recovery_from_breaker_ejection_restarts_the_ramp() -> None:
    clock = FakeClock()
    lb = full_weight_pool(clock, breaker=Breaker(failures=1, cooldown=1.0))
    lb.add(C)
    clock.advance(WINDOW)
    picks(lb, clock, 3)
    assert weight(lb, C) == 1.0  # fully ramped up
    # One failure on C trips its breaker (failures=1).
    while True:
        lease = acquire(lb, now=clock.now())
        if lease.state.url == C:
            assert lease.fail(ConnectionResetError("boom"))
            break
        assert lease.ok()
    assert lb.stats().endpoint(C).breaker == "open"
    assert C not in picks(lb, clock, 30)  # ejected
    clock.advance(1.2)  # past the cooldown (1 s +/- 10% jitter): half-open
    # The next pick of C is the probe; it succeeds and closes the breaker.
    for _ in range(30):
        lease = acquire(lb, now=clock.now())
        assert lease.ok()
        if lease.state.url == C:
            assert lease.probe  # it was the half-open probe
            break
    else:
        pytest.fail("the half-open endpoint was never probed")
    assert lb.stats().endpoint(C).breaker == "closed"
    picks(lb, clock, 1)
    assert weight(lb, C) == pytest.approx(0.1)  # the ramp starts again from 10%
    counts = picks(lb, clock, 210)
    assert abs(counts[C] - 10) <= 2, counts
    clock.advance(5.0)
    picks(lb, clock, 1)
    assert weight(lb, C) == pytest.approx(0.5)
    clock.advance(5.0)
    picks(lb, clock, 1)
    assert weight(lb, C) == 1.0
    counts = picks(lb, clock, 300)
    assert abs(counts[C] - 100) <= 2, counts


def test_recovery_without_slow_start_is_at_full_weight() -> None:
    clock = FakeClock()
    lb = Balancer(
        [A, B, C],
        clock=clock,
        strategy="weighted_round_robin",
        rng=3,
        breaker=Breaker(failures=1, cooldown=1.0),
    )
    while True:
        lease = acquire(lb, now=clock.now())
        if lease.state.url == C:
            assert lease.fail(ConnectionResetError("boom"))
            break
        assert lease.ok()
    clock.advance(1.2)
    counts = picks(lb, clock, 30)
    assert counts[C] >= 9  # probe, closed, then its full share at once
    assert weight(lb, C) == 1.0


# -- the initial pool; probes under load-aware strategies --------------------------------


def test_initial_pool_is_not_slow_started() -> None:
    clock = FakeClock()
    lb = Balancer(
        [A, Endpoint(B, weight=2.0)],
        slow_start=WINDOW,
        clock=clock,
        strategy="weighted_round_robin",
        rng=3,
    )
    picks(lb, clock, 1)
    assert weight(lb, A) == 1.0
    assert weight(lb, B) == 2.0


def test_added_endpoint_gets_an_equal_share_with_the_initial_pool_after_the_ramp() -> None:
    clock = FakeClock()
    lb = Balancer([A, B], slow_start=WINDOW, clock=clock, strategy="weighted_round_robin", rng=3)
    counts = picks(lb, clock, 300)
    assert counts == Counter({A: 150, B: 150})
    lb.add(C)
    counts = picks(lb, clock, 210)
    assert abs(counts[C] - 10) <= 2, counts  # 0.1 / (1 + 1 + 0.1)
    clock.advance(WINDOW)
    counts = picks(lb, clock, 300)
    assert abs(counts[C] - 100) <= 2, counts  # not ~250 (1.0 vs 0.1 + 0.1)


def test_stats_show_the_current_ramp_without_a_pick() -> None:
    clock = FakeClock()
    lb = full_weight_pool(clock)
    lb.add(C)
    assert weight(lb, C) == pytest.approx(0.1)
    clock.advance(5.0)  # no traffic meanwhile: stats() itself must not be stale
    assert weight(lb, C) == pytest.approx(0.5)
    clock.advance(5.0)
    assert weight(lb, C) == 1.0


def test_half_open_endpoint_gets_its_probe_under_peak_ewma() -> None:
    clock = FakeClock()
    lb = Balancer(
        [A, B, C],
        strategy="peak_ewma",
        breaker=Breaker(failures=1, cooldown=1.0),
        slow_start=WINDOW,
        clock=clock,
        rng=3,
    )

    def call(latency: float = 0.05, fail_on: str | None = None) -> str:
        lease = acquire(lb, now=clock.now())
        clock.advance(latency)
        if lease.state.url == fail_on:
            assert lease.fail(ConnectionResetError("boom"))
        else:
            assert lease.ok()
        return lease.state.url

    for _ in range(30):  # every endpoint measured at ~50 ms
        call()
    while call(fail_on=C) != C:
        pass
    assert lb.stats().endpoint(C).breaker == "open"
    clock.advance(1.2)  # past the cooldown: C is half-open and admits one probe
    # C still carries its failure penalty (4x its latency), so P2C alone would avoid it
    # for ~14 s; the probe must go out at once all the same.
    assert call() == C
    assert lb.stats().endpoint(C).breaker == "closed"
    assert weight(lb, C) == pytest.approx(0.1)  # and the ramp restarts
    clock.advance(WINDOW)
    served = Counter(call() for _ in range(60))
    assert served[C] >= 5, served  # back in rotation
