"""Distribution and choice properties of every picking strategy.

Pickers are tested directly (``strategy.picker(states, ctx).pick(call, exclude)``, where
``call`` is the :class:`CallContext` carrying the affinity key, or None) with seeded RNGs
and a fake clock; a few tests go through the balancer's pool (``acquire``) to see the
pool-wide counters that bounded-load hashing reads.

Tolerances, stated once:

* ``weighted_round_robin``: over ``k x sum(weights)`` picks each endpoint gets
  ``k x weight`` picks, within +/-1.
* ``random``: over 20,000 picks each endpoint's share is within 15% (relative) of
  ``weight / sum(weights)`` -- at least 6 standard deviations for the weights drawn here.
* ``consistent_hash``: adding one endpoint to n moves fewer than ``2.5/(n+1)`` of 2,000
  keys (about ``1/(n+1)`` expected) and more than ``0.3/(n+1)``, all to the newcomer.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import DECAY, PRIOR, acquire, call_of, ctx, put, states, weight_lists

import lbclient
from lbclient import strategies as lbstrategies
from lbclient.pool.load import peak_ewma_load
from lbclient.pool.state import EndpointState
from lbclient.strategies import (
    ConsistentHash,
    LeastConnections,
    LeastResponseTime,
    PeakEwma,
    PowerOfTwo,
    Random,
    RoundRobin,
    Totals,
    WeightedRoundRobin,
)
from lbclient.testing import FakeClock

SETTINGS = settings(max_examples=60, deadline=None)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def longest_run(seq: list[bool]) -> int:
    best = run = 0
    for x in seq:
        run = run + 1 if x else 0
        best = max(best, run)
    return best


# -- round_robin -------------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(min_value=1, max_value=12), seed=seeds, k=st.integers(1, 5))
def test_round_robin_cycles_exactly(n: int, seed: int, k: int) -> None:
    ss = states([1.0] * n)
    picker = RoundRobin().picker(ss, ctx(seed))
    picks = [picker.pick(None, None) for _ in range(k * n)]
    first = picks[:n]
    assert set(first) == set(ss)  # every endpoint once per cycle ...
    assert picks == first * k  # ... in the same order every cycle
    assert [ss.index(s) for s in first] == [(ss.index(first[0]) + i) % n for i in range(n)]


def test_round_robin_ignores_weights() -> None:
    ss = states([1.0, 5.0, 2.0])
    picker = RoundRobin().picker(ss, ctx(3))
    counts = Counter(picker.pick(None, None) for _ in range(300))
    assert [counts[s] for s in ss] == [100, 100, 100]


def test_round_robin_start_depends_on_rng() -> None:
    ss = states([1.0] * 8)
    firsts = {RoundRobin().picker(ss, ctx(seed)).pick(None, None) for seed in range(40)}
    assert len(firsts) > 1  # processes do not all start on the same replica


def test_round_robin_skips_excluded_and_keeps_cycling() -> None:
    ss = states([1.0] * 4)
    picker = RoundRobin().picker(ss, ctx(0))
    picks = [picker.pick(None, {ss[1]}) for _ in range(30)]
    assert ss[1] not in picks
    assert Counter(picks) == {ss[0]: 10, ss[2]: 10, ss[3]: 10}
    assert picker.pick(None, set(ss)) is None


# -- weighted_round_robin ----------------------------------------------------------------


@SETTINGS
@given(ws=weight_lists(1, 8), seed=seeds, k=st.integers(1, 4))
def test_weighted_round_robin_exact_shares(ws: list[float], seed: int, k: int) -> None:
    ss = states(ws)
    picker = WeightedRoundRobin().picker(ss, ctx(seed))
    total = int(k * sum(ws))
    counts = Counter(picker.pick(None, None) for _ in range(total))
    for s, w in zip(ss, ws, strict=True):
        assert abs(counts[s] - k * w) <= 1, (ws, [counts[x] for x in ss])


@pytest.mark.parametrize("seed", range(20))
def test_weighted_round_robin_interleaves_3_to_1(seed: int) -> None:
    heavy, light = states([3.0, 1.0])
    picker = WeightedRoundRobin().picker([heavy, light], ctx(seed))
    picks = [picker.pick(None, None) for _ in range(400)]
    assert longest_run([p is heavy for p in picks]) <= 3
    assert longest_run([p is light for p in picks]) == 1
    assert Counter(picks) == {heavy: 300, light: 100}


@SETTINGS
@given(heavy_w=st.integers(2, 8), seed=seeds)
def test_weighted_round_robin_never_bursts(heavy_w: int, seed: int) -> None:
    heavy, light = states([float(heavy_w), 1.0])
    picker = WeightedRoundRobin().picker([heavy, light], ctx(seed))
    picks = [picker.pick(None, None) for _ in range(20 * (heavy_w + 1))]
    assert longest_run([p is heavy for p in picks]) <= heavy_w


def test_weighted_round_robin_exclude_heavy_returns_the_other() -> None:
    # Regression: the EDF retry loop ran len(heap)-1 times and could pop the same heavy
    # endpoint again, returning None although the light one was free.
    heavy, light = states([100.0, 1.0])
    picker = WeightedRoundRobin().picker([heavy, light], ctx(1))
    assert [picker.pick(None, {heavy}) for _ in range(5)] == [light] * 5


def test_weighted_round_robin_exclude_keeps_shares_of_the_rest() -> None:
    ss = states([1.0, 2.0, 3.0, 4.0])
    picker = WeightedRoundRobin().picker(ss, ctx(2))
    counts = Counter(picker.pick(None, {ss[3]}) for _ in range(6000))
    assert ss[3] not in counts
    for s, w in zip(ss[:3], [1.0, 2.0, 3.0], strict=True):
        assert counts[s] / 6000 == pytest.approx(w / 6.0, rel=0.15)
    # ... and the schedule without exclusion is still exact afterwards.
    after = Counter(picker.pick(None, None) for _ in range(100))
    assert all(abs(after[s] - 10 * s.weight) <= 1 for s in ss)


def test_weighted_round_robin_exclude_with_equal_weights() -> None:
    ss = states([1.0] * 4)
    picker = WeightedRoundRobin().picker(ss, ctx(5))
    picks = [picker.pick(None, {ss[0], ss[2]}) for _ in range(40)]
    assert set(picks) == {ss[1], ss[3]}
    assert picker.pick(None, set(ss)) is None


# -- random ------------------------------------------------------------------------------


def _random_shares(ws: list[float], seed: int, picks: int = 20_000) -> list[float]:
    ss = states(ws)
    picker = Random().picker(ss, ctx(seed))
    counts = Counter(picker.pick(None, None) for _ in range(picks))
    return [counts[s] / picks for s in ss]


def test_random_honours_weights_fixed_seed() -> None:
    ws = [1.0, 2.0, 3.0, 4.0]
    shares = _random_shares(ws, seed=1234)
    for share, w in zip(shares, ws, strict=True):
        assert share == pytest.approx(w / 10.0, rel=0.15)


@settings(max_examples=50, deadline=None)
@given(ws=st.lists(st.integers(1, 4).map(float), min_size=1, max_size=4))
def test_random_honours_weights(ws: list[float]) -> None:
    # 1..4 endpoints of weight 1..4: the smallest share is >= 1/13, i.e. >= 1,500 of
    # 20,000 picks, so 15% is more than 6 standard deviations.
    total = sum(ws)
    for share, w in zip(_random_shares(ws, seed=len(ws) * 31 + int(total)), ws, strict=True):
        assert share == pytest.approx(w / total, rel=0.15)


def test_random_uniform_weights_reach_everyone() -> None:
    shares = _random_shares([2.0] * 5, seed=9)
    assert all(s == pytest.approx(0.2, rel=0.1) for s in shares)


# -- power_of_two ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_power_of_two_prefers_less_loaded(seed: int) -> None:
    busy, idle = states([1.0, 1.0])
    put(busy, inflight=5)
    picker = PowerOfTwo().picker([busy, idle], ctx(seed))
    assert all(picker.pick(None, None) is idle for _ in range(200))


def test_power_of_two_divides_load_by_weight() -> None:
    big, small = states([10.0, 1.0])
    put(big, inflight=5)  # 0.5 per unit of weight vs 1.0
    put(small, inflight=1)
    picker = PowerOfTwo().picker([big, small], ctx(0))
    assert all(picker.pick(None, None) is big for _ in range(100))


@SETTINGS
@given(
    loads=st.lists(st.integers(0, 50), min_size=3, max_size=10, unique=True),
    seed=seeds,
)
def test_power_of_two_never_picks_the_most_loaded(loads: list[int], seed: int) -> None:
    ss = states([1.0] * len(loads))
    for s, q in zip(ss, loads, strict=True):
        put(s, inflight=q)
    worst = ss[loads.index(max(loads))]
    picker = PowerOfTwo().picker(ss, ctx(seed))
    picks = [picker.pick(None, None) for _ in range(100)]
    assert worst not in picks
    # The least loaded wins every draw it is part of: about 2/n of picks.
    best = ss[loads.index(min(loads))]
    assert picks.count(best) > 0


@pytest.mark.parametrize("name", ["power_of_two", "peak_ewma", "least_connections"])
def test_server_reported_load_counts_until_it_expires(name: str) -> None:
    clock = FakeClock(100.0)
    reported, quiet = states([1.0, 1.0])
    put(reported, server_load=10.0, server_load_at=100.0)  # x-queue-depth: 10
    picker = lbstrategies.resolve(name).picker([reported, quiet], ctx(4, clock=clock))
    assert all(picker.pick(None, None) is quiet for _ in range(50))
    put(quiet, inflight=3)  # our own count is below the server's: the server wins
    assert all(picker.pick(None, None) is quiet for _ in range(50))
    clock.advance(2.5)  # past SERVER_LOAD_TTL: the report is forgotten
    assert all(picker.pick(None, None) is reported for _ in range(50))


# -- peak_ewma ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_peak_ewma_prefers_lower_latency(seed: int) -> None:
    clock = FakeClock()
    slow, fast = states([1.0, 1.0])
    slow.observe(0.5, 0.0)
    fast.observe(0.01, 0.0)
    picker = PeakEwma().picker([slow, fast], ctx(seed, clock=clock))
    assert all(picker.pick(None, None) is fast for _ in range(200))


def test_peak_ewma_weighs_latency_against_queue() -> None:
    slow, fast = states([1.0, 1.0])
    slow.observe(0.100, 0.0)
    fast.observe(0.010, 0.0)
    put(fast, inflight=20)  # 0.010 x 21 = 0.21 s expected wait > 0.100 x 1
    picker = PeakEwma().picker([slow, fast], ctx(0))
    assert all(picker.pick(None, None) is slow for _ in range(50))


def test_peak_ewma_is_peak_sensitive() -> None:
    (s,) = states([1.0])
    s.observe(0.02, 1.0)
    s.observe(2.0, 1.001)  # a sample above the estimate replaces it at once
    assert s.ewma(1.001) == 2.0


@pytest.mark.parametrize("slow", [0.5, 2.0, 7.0])
def test_peak_ewma_decays_with_the_clock(slow: float) -> None:
    clock = FakeClock()
    lb = lbclient.Balancer(["http://a"], clock=clock, rng=0, ewma_decay=DECAY)
    lease = acquire(lb, now=clock.now())
    s = lease.state
    clock.advance(slow)
    assert lease.ok()
    observed = s.ewma(clock.now())
    assert observed == pytest.approx(slow)  # above the prior: taken at once
    clock.advance(DECAY)
    assert s.ewma(clock.now()) == pytest.approx(observed / math.e, rel=1e-9)
    clock.advance(DECAY)
    assert s.ewma(clock.now()) == pytest.approx(observed / math.e**2, rel=1e-9)
    stats = lb.stats().endpoint("http://a")
    assert stats.latency_ewma_ms == pytest.approx(observed / math.e**2 * 1000)


def test_peak_ewma_slow_endpoint_is_tried_again_once_decayed() -> None:
    clock = FakeClock()
    slow, fast = states([1.0, 1.0])
    slow.observe(1.0, 0.0)
    fast.observe(0.05, 0.0)
    picker = PeakEwma().picker([slow, fast], ctx(0, clock=clock))
    assert all(picker.pick(None, None) is fast for _ in range(50))
    put(fast, stamp=0.0)
    put(slow, stamp=0.0)
    clock.advance(DECAY * 4)  # slow decays to 1.0/e^4 = 0.018 s; fast to 0.0009 s ...
    put(fast, inflight=30)  # ... but fast is now queued 31 deep: 0.028 s
    assert all(picker.pick(None, None) is slow for _ in range(50))


# -- least_connections / least_response_time ---------------------------------------------


@SETTINGS
@given(loads=st.lists(st.integers(0, 20), min_size=1, max_size=10), seed=seeds)
def test_least_connections_picks_an_argmin(loads: list[int], seed: int) -> None:
    ss = states([1.0] * len(loads))
    for s, q in zip(ss, loads, strict=True):
        put(s, inflight=q)
    picker = LeastConnections().picker(ss, ctx(seed))
    for _ in range(20):
        assert picker.pick(None, None).inflight == min(loads)  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", range(5))
def test_least_connections_breaks_ties_randomly(seed: int) -> None:
    ss = states([1.0] * 5)
    for s, q in zip(ss, [3, 1, 4, 1, 5], strict=True):
        put(s, inflight=q)
    picker = LeastConnections().picker(ss, ctx(seed))
    counts = Counter(picker.pick(None, None) for _ in range(400))
    assert set(counts) == {ss[1], ss[3]}
    assert min(counts.values()) > 100  # both tied endpoints get a fair share


def test_least_connections_divides_by_weight() -> None:
    a, b = states([4.0, 1.0])
    put(a, inflight=3)  # 0.75 vs 1.0 per unit of weight
    put(b, inflight=1)
    picker = LeastConnections().picker([a, b], ctx(0))
    assert all(picker.pick(None, None) is a for _ in range(50))


def _with_latency(latencies: list[float], inflight: list[int]) -> list[EndpointState]:
    ss = states([1.0] * len(latencies))
    for s, lat, q in zip(ss, latencies, inflight, strict=True):
        put(s, cost=lat, inflight=q)
    return ss


@SETTINGS
@given(
    data=st.lists(
        st.tuples(st.sampled_from([0.01, 0.02, 0.05, 0.1, 0.3]), st.integers(0, 6)),
        min_size=1,
        max_size=8,
    ),
    seed=seeds,
)
def test_least_response_time_picks_an_argmin(data: list[tuple[float, int]], seed: int) -> None:
    ss = _with_latency([d[0] for d in data], [d[1] for d in data])
    score = {id(s): s.cost * (s.inflight + 1) for s in ss}
    picker = LeastResponseTime().picker(ss, ctx(seed))
    for _ in range(20):
        s = picker.pick(None, None)
        assert s is not None
        assert score[id(s)] == min(score.values())


@pytest.mark.parametrize("seed", range(5))
def test_least_response_time_breaks_ties_randomly(seed: int) -> None:
    # 0.1 x 1 == 0.05 x 2 -- an exact tie between endpoints 0 and 2; 1 and 3 lose.
    ss = _with_latency([0.1, 0.3, 0.05, 0.1], [0, 0, 1, 1])
    picker = LeastResponseTime().picker(ss, ctx(seed))
    counts = Counter(picker.pick(None, None) for _ in range(400))
    assert set(counts) == {ss[0], ss[2]}
    assert min(counts.values()) > 100


# -- consistent_hash ---------------------------------------------------------------------


def _ring_pick(picker: object, key: object) -> EndpointState:
    s = picker.pick(call_of(key), None)  # type: ignore[attr-defined]
    assert s is not None
    return s


@SETTINGS
@given(n=st.integers(1, 12), key=st.one_of(st.text(), st.integers(), st.binary()))
def test_consistent_hash_same_key_same_endpoint(n: int, key: object) -> None:
    ss = states([1.0] * n)
    picker = ConsistentHash().picker(ss, ctx(0))
    first = _ring_pick(picker, key)
    assert all(_ring_pick(picker, key) is first for _ in range(10))
    # ... and the same for a picker rebuilt over the same pool (a new process, say).
    assert _ring_pick(ConsistentHash().picker(ss, ctx(99)), key) is first


@settings(max_examples=50, deadline=None)
@given(n=st.integers(4, 20), balance=st.sampled_from([1.25, None]))
def test_consistent_hash_adding_one_moves_about_1_over_n(n: int, balance: float | None) -> None:
    old = states([1.0] * (n + 1))
    newcomer, pool = old[-1], old[:-1]
    strategy = ConsistentHash(balance_factor=balance)
    before = strategy.picker(pool, ctx(0))
    after = strategy.picker(old, ctx(0))
    keys = [f"user-{i}" for i in range(2000)]
    moved = [k for k in keys if _ring_pick(before, k) is not _ring_pick(after, k)]
    assert all(_ring_pick(after, k) is newcomer for k in moved)  # only to the newcomer
    frac = len(moved) / len(keys)
    assert 0.3 / (n + 1) < frac < 2.5 / (n + 1), (n, frac)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(4, 12))
def test_consistent_hash_removing_one_moves_only_its_keys(n: int) -> None:
    ss = states([1.0] * n)
    gone = ss[n // 2]
    before = ConsistentHash(balance_factor=None).picker(ss, ctx(0))
    after = ConsistentHash(balance_factor=None).picker([s for s in ss if s is not gone], ctx(0))
    for i in range(1000):
        owner = _ring_pick(before, i)
        if owner is not gone:
            assert _ring_pick(after, i) is owner


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(2, 10),
    seed=seeds,
    hot=st.floats(0.0, 1.0),
    picks=st.integers(1, 120),
    balance=st.sampled_from([1.0, 1.25, 1.5, 2.0]),
)
def test_consistent_hash_bounded_load_never_exceeded(
    n: int, seed: int, hot: float, picks: int, balance: float
) -> None:
    """Slots taken and never released: after every pick the chosen endpoint holds at most
    ``ceil(c x total_in_flight / n)`` (equal weights), however hot the keys."""
    clock = FakeClock()
    lb = lbclient.Balancer(
        [f"http://10.0.0.{i}" for i in range(n)],
        strategy=ConsistentHash(balance_factor=balance),
        clock=clock,
        rng=seed,
    )
    rnd = random.Random(seed)
    for _ in range(picks):
        key = "hot-user" if rnd.random() < hot else f"user-{rnd.randrange(50)}"
        s = acquire(lb, key, now=clock.now()).state
        total = sum(m.inflight for m in lb._pool.members.values())
        assert lb._pool.totals.inflight == total
        assert s.inflight <= math.ceil(balance * total / n), (s.inflight, total, n)


def test_consistent_hash_hot_key_spills_over() -> None:
    clock = FakeClock()
    lb = lbclient.Balancer(
        [f"http://10.0.0.{i}" for i in range(4)], strategy="consistent_hash", clock=clock, rng=1
    )
    homes = Counter(acquire(lb, "hot", now=clock.now()).state.url for _ in range(40))
    assert len(homes) == 4
    assert max(homes.values()) <= math.ceil(1.25 * 40 / 4)


def test_consistent_hash_without_bound_keeps_hot_key_home() -> None:
    clock = FakeClock()
    lb = lbclient.Balancer(
        [f"http://10.0.0.{i}" for i in range(4)],
        strategy=ConsistentHash(balance_factor=None),
        clock=clock,
        rng=1,
    )
    homes = Counter(acquire(lb, "hot", now=clock.now()).state.url for _ in range(40))
    assert len(homes) == 1


def test_consistent_hash_no_key_falls_back_to_peak_ewma() -> None:
    ss = states([1.0] * 4)
    picker = ConsistentHash().picker(ss, ctx(3))
    # Without a key the picks spread (the ring would send one key to one endpoint) ...
    spread = Counter(_ring_pick(picker, None) for _ in range(400))
    assert set(spread) == set(ss)
    assert min(spread.values()) > 50
    # ... and follow peak-EWMA load: with two endpoints, the slow one is never chosen.
    slow, fast = states([1.0, 1.0])
    slow.observe(1.0, 0.0)
    two = ConsistentHash().picker([slow, fast], ctx(3))
    assert all(_ring_pick(two, None) is fast for _ in range(100))


def test_consistent_hash_keys_spread_over_endpoints() -> None:
    ss = states([1.0] * 5)
    picker = ConsistentHash().picker(ss, ctx(0))
    counts = Counter(_ring_pick(picker, f"k{i}") for i in range(5000))
    assert set(counts) == set(ss)
    assert all(600 < c < 1400 for c in counts.values()), counts


def test_consistent_hash_weights_shape_the_ring() -> None:
    ss = states([3.0, 1.0])
    picker = ConsistentHash(balance_factor=None).picker(ss, ctx(0))
    counts = Counter(_ring_pick(picker, f"k{i}") for i in range(8000))
    assert counts[ss[0]] / 8000 == pytest.approx(0.75, abs=0.08)


# -- every strategy: exclusion -----------------------------------------------------------


@pytest.mark.parametrize("name", lbstrategies.names())
@settings(max_examples=80, deadline=None)
@given(
    ws=weight_lists(2, 8),
    loads=st.lists(st.integers(0, 4), min_size=8, max_size=8),
    mask=st.lists(st.booleans(), min_size=8, max_size=8),
    seed=seeds,
)
@example(ws=[8.0, 1.0], loads=[0] * 8, mask=[True] + [False] * 7, seed=1)
def test_exclude_is_honoured_when_another_exists(
    name: str, ws: list[float], loads: list[int], mask: list[bool], seed: int
) -> None:
    ss = states(ws)
    for s, q in zip(ss, loads, strict=False):
        put(s, inflight=q)
    excluded = {s for s, out in zip(ss, mask, strict=False) if out} or {ss[0]}
    if len(excluded) == len(ss):
        excluded.discard(ss[-1])
    picker = lbstrategies.resolve(name).picker(ss, ctx(seed, totals=_totals(ss)))
    for i in range(12):
        key = (None, f"k{i}", i)[i % 3]
        s = picker.pick(call_of(key), excluded)
        assert s is not None and s not in excluded, (name, i, key)


@pytest.mark.parametrize("name", lbstrategies.names())
def test_exclude_everything_gives_none(name: str) -> None:
    ss = states([1.0, 2.0, 3.0])
    picker = lbstrategies.resolve(name).picker(ss, ctx(0))
    assert picker.pick(call_of("k"), set(ss)) is None
    assert picker.pick(None, set(ss)) is None


@pytest.mark.parametrize("name", lbstrategies.names())
def test_every_strategy_picks_a_member(name: str) -> None:
    ss = states([1.0, 2.0, 3.0])
    picker = lbstrategies.resolve(name).picker(ss, ctx(0))
    assert isinstance(picker, lbstrategies.Picker)
    for i in range(50):
        assert picker.pick(call_of(f"k{i}"), None) in ss
        assert picker.pick(call_of(f"k{i}", stream=True), None) in ss


def test_registry_names_match_strategy_names() -> None:
    assert lbstrategies.names() == (
        "consistent_hash",
        "geo",
        "least_connections",
        "least_response_time",
        "peak_ewma",
        "power_of_two",
        "prefix",
        "random",
        "round_robin",
        "weighted_round_robin",
    )
    for name in lbstrategies.names():
        strategy = lbstrategies.resolve(name)
        assert strategy.name == name
        assert isinstance(strategy, lbstrategies.Strategy)


def _totals(ss: list[EndpointState]) -> Totals:
    t = Totals()
    t.inflight = sum(s.inflight for s in ss)
    return t


def test_fresh_state_defaults() -> None:
    (s,) = states([2.0])
    assert (s.inflight, s.requests, s.failures, s.weight) == (0, 0, 0, 2.0)
    assert s.ewma(0.0) == PRIOR


# -- peak_ewma's cached score equals the load it stands for ---------------------------------


@SETTINGS
@given(
    ends=st.lists(
        st.tuples(
            st.floats(0.001, 5.0),  # latency sample
            st.floats(0.0, 60.0),  # when it was taken
            st.integers(0, 40),  # in flight
            st.sampled_from([0.5, 1.0, 3.0]),  # weight
            st.sampled_from([None] * 8 + [0.0, 4.0]),  # server-reported load
            st.sampled_from([None] * 8 + [0.2, 3.0]),  # a failure penalty
        ),
        min_size=2,
        max_size=12,
    ),
    later=st.floats(0.0, 120.0),
    seed=seeds,
)
@example(  # decay matters: the slow one sampled long ago is now the better pick
    ends=[(1.0, 0.0, 0, 1.0, None, None), (0.1, 50.0, 0, 1.0, None, None)], later=0.0, seed=0
)
def test_peak_ewma_picks_the_least_load_at_any_time(
    ends: list[tuple[float, float, int, float, float | None, float | None]],
    later: float,
    seed: int,
) -> None:
    """The score a pick compares (``log`` of the load, without the ``now`` every
    endpoint shares) orders endpoints exactly as :func:`peak_ewma_load` does, at any
    time after the samples, with penalties and server loads in the mix."""
    ss = states([w for *_, w, _, _ in ends])
    last = 0.0
    for s, (latency, at, q, _w, load, penalty) in zip(ss, ends, strict=True):
        s.observe(latency, at)
        if penalty is not None:
            s.penalize(penalty, at)
        if load is not None:
            s.set_server_load(load, at)
        put(s, inflight=q)
        last = max(last, at)
    clock = FakeClock(last + later)
    picker = PeakEwma().picker(ss, ctx(seed, clock=clock))
    now = clock.now()
    loads = [peak_ewma_load(s, now) for s in ss]
    for _ in range(5):
        picked = picker.pick(None, None)
        assert picked is not None
        assert peak_ewma_load(picked, now) == pytest.approx(min(loads), rel=1e-9)
