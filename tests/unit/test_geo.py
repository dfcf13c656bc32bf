"""Geography: the region latency table, the ``geo`` strategy, locality, and
server-reported load.

Everything runs on a :class:`FakeClock` with seeded RNGs: no sleeps, no sockets.  The
``geo`` picker is exercised both directly (synthetic :class:`EndpointState` objects, a
hand-built :class:`PickContext`) and through the balancer's pool (``acquire`` takes a
lease, ``lease.ok()`` ends it), the synchronous pick / outcome half of every call.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Collection, Iterable

import pytest
from strategies import acquire, put

import lbclient
from lbclient import Balancer, ConfigError, Endpoint, GeoTable, Locality
from lbclient.policies.geo import DEFAULT_LATENCY_MS
from lbclient.pool.state import EndpointState
from lbclient.strategies import Geo, PickContext, Totals
from lbclient.testing import FakeClock

US_EAST = "us-east-1"
US_WEST = "us-west-2"
EU_WEST = "eu-west-1"
AP_SE = "ap-southeast-1"

DECAY = 10.0


def url(i: int) -> str:
    return f"http://10.0.0.{i}:8000"


def endpoints(regions: Iterable[str | None]) -> list[Endpoint]:
    return [Endpoint(url(i), region=r) for i, r in enumerate(regions)]


def state(i: int, region: str | None) -> EndpointState:
    return EndpointState(Endpoint(url(i), region=region), now=0.0, decay=DECAY, cost=0.05)


def sampled(s: EndpointState, latency: float, now: float = 0.0) -> EndpointState:
    """Give ``s`` a measured (peak-EWMA) latency, as if it had served calls."""
    s.requests = 10
    for _ in range(10):  # ten latency samples on record
        s.observe(latency, now)
    s.call.cost = s.cost = latency  # exactly this estimate (observe blends towards it)
    s.call.stamp = s.stamp = now
    s.rekey()
    return s


def geo_ctx(region: str | None, *, seed: int = 0, clock: FakeClock | None = None) -> PickContext:
    return PickContext(
        clock=clock if clock is not None else FakeClock(),
        rng=random.Random(seed),
        totals=Totals(),
        region=region,
    )


def pick_regions(picker: object, n: int = 200) -> Counter[str | None]:
    counts: Counter[str | None] = Counter()
    for _ in range(n):
        s = picker.pick(None, None)  # type: ignore[attr-defined]
        assert s is not None
        counts[s.endpoint.region] += 1
    return counts


def run_picks(
    lb: Balancer,
    clock: FakeClock,
    n: int,
    *,
    latency: float = 0.0,
    exclude: Collection[EndpointState] | None = None,
) -> Counter[str]:
    """``n`` sequential calls through the pick / outcome path; counts per url."""
    counts: Counter[str] = Counter()
    for _ in range(n):
        lease = acquire(lb, None, exclude, clock.now())
        clock.advance(latency)
        if latency > 0:
            assert lease.ok(clock.now())
        else:
            assert lease.cancel()  # an unmeasured call: the slot back, no latency sample
        counts[lease.state.url] += 1
    return counts


def by_region(lb: Balancer, counts: Counter[str]) -> Counter[str | None]:
    region = {e.url: e.region for e in lb.endpoints}
    out: Counter[str | None] = Counter()
    for u, n in counts.items():
        out[region[u]] += n
    return out


# -- GeoTable ---------------------------------------------------------------------------


def test_default_table_is_the_playbook_figures() -> None:
    t = GeoTable.default()
    assert t == GeoTable()
    assert t.latency(US_EAST, EU_WEST) == pytest.approx(0.09)
    assert t.latency(EU_WEST, US_EAST) == pytest.approx(0.09)  # pairs are unordered
    assert t.latency(US_EAST, US_WEST) == pytest.approx(0.07)
    assert t.latency(US_EAST, AP_SE) == pytest.approx(0.2)
    assert t.latency(US_WEST, EU_WEST) == pytest.approx(0.15)
    assert t.latency(US_WEST, AP_SE) == pytest.approx(0.13)
    assert t.latency(EU_WEST, AP_SE) == pytest.approx(0.16)
    assert len(DEFAULT_LATENCY_MS) == 6


@pytest.mark.parametrize("region", [US_EAST, AP_SE, "mars-1"])
def test_same_region_is_ten_ms(region: str) -> None:
    assert GeoTable.default().latency(region, region) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (US_EAST, "mars-1"),
        ("mars-1", "venus-2"),
        (None, US_EAST),
        (US_EAST, None),
        (None, None),  # two unlabelled endpoints are not known to be "the same region"
    ],
)
def test_unknown_pair_or_missing_region_is_200_ms(a: str | None, b: str | None) -> None:
    assert GeoTable.default().latency(a, b) == pytest.approx(0.2)


def test_with_pairs_overrides_and_extends_without_mutating() -> None:
    base = GeoTable.default()
    t = base.with_pairs({(EU_WEST, US_EAST): 50, ("us-east-2", US_EAST): 12.5})
    assert t.latency(US_EAST, EU_WEST) == pytest.approx(0.05)  # overridden, either order
    assert t.latency(US_EAST, "us-east-2") == pytest.approx(0.0125)  # added
    assert t.latency(US_EAST, US_WEST) == pytest.approx(0.07)  # the rest kept
    assert t.latency(US_EAST, "mars-1") == pytest.approx(0.2)
    assert base.latency(US_EAST, EU_WEST) == pytest.approx(0.09)  # the original unchanged
    assert base.latency(US_EAST, "us-east-2") == pytest.approx(0.2)
    # Chained overrides, and custom same-region / unknown figures survive with_pairs.
    custom = GeoTable(same_region_ms=1, unknown_ms=500).with_pairs({("x", "y"): 3})
    assert custom.latency("x", "x") == pytest.approx(0.001)
    assert custom.latency("x", "z") == pytest.approx(0.5)
    assert custom.latency(None, "x") == pytest.approx(0.5)
    assert custom.latency("y", "x") == pytest.approx(0.003)
    assert custom.with_pairs({("x", "y"): 4}).latency("x", "y") == pytest.approx(0.004)


def test_explicit_table_replaces_the_default() -> None:
    t = GeoTable(latency_ms={("a", "b"): 30})
    assert t.latency("a", "b") == pytest.approx(0.03)
    assert t.latency(US_EAST, EU_WEST) == pytest.approx(0.2)  # not in this table: unknown


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: GeoTable(same_region_ms=-1), "-1"),
        (lambda: GeoTable(same_region_ms=math.nan), "nan"),
        (lambda: GeoTable(same_region_ms=True), "True"),
        (lambda: GeoTable(unknown_ms=math.inf), "inf"),
        (lambda: GeoTable(unknown_ms="200"), "'200'"),  # type: ignore[arg-type]
        (lambda: GeoTable(latency_ms=[("a", "b")]), "[('a', 'b')]"),
        (lambda: GeoTable(latency_ms={("a", "b"): -5}), "-5"),
        (lambda: GeoTable(latency_ms={("a", "b"): math.nan}), "nan"),
        (lambda: GeoTable.default().with_pairs({("a", "b"): "10"}), "'10'"),  # type: ignore[dict-item]
        (lambda: GeoTable.default().with_pairs({("a", "b"): False}), "False"),
        (lambda: GeoTable.default().with_pairs({"ab": 10}), "'ab'"),  # type: ignore[dict-item]
        (lambda: GeoTable.default().with_pairs({("a", "b", "c"): 10}), "('a', 'b', 'c')"),  # type: ignore[dict-item]
        (lambda: GeoTable.default().with_pairs({("a", 3): 10}), "('a', 3)"),  # type: ignore[dict-item]
    ],
)
def test_validation_errors_name_the_bad_value(build: object, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()  # type: ignore[operator]
    assert named in str(info.value)


@pytest.mark.parametrize("key", [5, None, 1.5])
def test_non_iterable_pair_key_is_a_config_error(key: object) -> None:
    with pytest.raises(ConfigError) as info:
        GeoTable.default().with_pairs({key: 10})  # type: ignore[dict-item]
    assert repr(key) in str(info.value)


def test_balancer_rejects_a_geo_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError, match=r"geo must be an lbclient.GeoTable or None, got"):
        Balancer([url(1)], geo={(US_EAST, EU_WEST): 90})  # type: ignore[arg-type]


# -- the geo picker, on synthetic states --------------------------------------------------


def test_no_samples_local_endpoints_win() -> None:
    ss = [
        state(0, US_EAST),
        state(1, US_EAST),
        state(2, EU_WEST),
        state(3, EU_WEST),
        state(4, US_WEST),
        state(5, AP_SE),
    ]
    picker = Geo().picker(ss, geo_ctx(US_EAST))
    picks = Counter(picker.pick(None, None) for _ in range(400))
    assert set(picks) == {ss[0], ss[1]}  # only local, and both local replicas are used
    assert min(picks[ss[0]], picks[ss[1]]) > 100


def test_no_samples_remote_client_goes_to_its_own_nearest_region() -> None:
    ss = [state(0, US_EAST), state(1, EU_WEST), state(2, US_WEST), state(3, AP_SE)]
    assert pick_regions(Geo().picker(ss, geo_ctx(AP_SE))) == Counter({AP_SE: 200})
    # No ap-southeast-1 replica: the next-closest from there is us-west-2 (130 ms).
    assert pick_regions(Geo().picker(ss[:3], geo_ctx(AP_SE))) == Counter({US_WEST: 200})
    # Exclusion (a retry) moves to the next-closest region, then the next.
    picker = Geo().picker(ss, geo_ctx(US_EAST))
    assert picker.pick(None, {ss[0]}) is ss[2]  # us-west-2, 70 ms
    assert picker.pick(None, {ss[0], ss[2]}) is ss[1]  # eu-west-1, 90 ms
    assert picker.pick(None, {ss[0], ss[2], ss[1]}) is ss[3]
    assert picker.pick(None, set(ss)) is None


def test_with_samples_idle_local_still_wins() -> None:
    proc = 0.05
    ss = [
        sampled(state(0, US_EAST), 0.01 + proc),
        sampled(state(1, US_EAST), 0.01 + proc),
        sampled(state(2, EU_WEST), 0.09 + proc),
        sampled(state(3, EU_WEST), 0.09 + proc),
    ]
    assert pick_regions(Geo().picker(ss, geo_ctx(US_EAST))) == Counter({US_EAST: 200})


def test_saturated_local_endpoints_lose_to_a_remote_one() -> None:
    proc = 0.05
    local = [sampled(state(i, US_EAST), 0.01 + proc) for i in range(2)]
    remote = [sampled(state(2 + i, EU_WEST), 0.09 + proc) for i in range(2)]
    ss = local + remote
    for s in local:
        put(s, inflight=10)  # local score 0.01 + 0.05 x 11 = 0.56 s vs remote 0.09 + 0.05
    picker = Geo().picker(ss, geo_ctx(US_EAST))
    assert pick_regions(picker) == Counter({EU_WEST: 200})
    # The queue is priced through processing: one call queued locally is still cheaper
    # (0.01 + 0.05 x 2 = 0.11 < 0.14), two are not (0.16).
    for s in local:
        put(s, inflight=1)
    assert pick_regions(picker) == Counter({US_EAST: 200})
    for s in local:
        put(s, inflight=2)
    assert pick_regions(picker) == Counter({EU_WEST: 200})
    # Only one local replica saturated: the other local one takes the pick.
    put(local[0], inflight=10)
    put(local[1], inflight=0)
    assert Counter(picker.pick(None, None) for _ in range(200)) == Counter({local[1]: 200})


def test_server_reported_load_saturates_a_local_endpoint() -> None:
    clock = FakeClock(100.0)
    s_local = sampled(state(0, US_EAST), 0.06, now=100.0)
    s_remote = sampled(state(1, EU_WEST), 0.14, now=100.0)
    picker = Geo().picker([s_local, s_remote], geo_ctx(US_EAST, clock=clock))
    assert picker.pick(None, None) is s_local
    put(s_local, server_load=20.0, server_load_at=clock.now())
    assert picker.pick(None, None) is s_remote
    clock.advance(2.5)  # the report is stale after 2 s
    assert picker.pick(None, None) is s_local


@pytest.mark.parametrize("client", [US_EAST, "mars-1", None])
def test_unknown_regions_do_not_crash(client: str | None) -> None:
    ss = [
        state(0, "mars-1"),
        state(1, None),
        state(2, "venus-2"),
        state(3, None),
        sampled(state(4, "mars-1"), 0.3),
        sampled(state(5, None), 0.02),
    ]
    picker = Geo().picker(ss, geo_ctx(client, seed=3))
    picks = Counter(picker.pick(None, None) for _ in range(300))
    assert set(picks) <= set(ss)
    assert sum(picks.values()) == 300
    assert picker.pick(None, set(ss[1:])) is ss[0]
    assert picker.pick(None, set(ss)) is None


def test_without_client_region_only_latency_counts() -> None:
    # No client region: geography is unknown, the fastest measured endpoint wins even
    # though it is labelled far away.
    ss = [
        sampled(state(0, US_EAST), 0.2),
        sampled(state(1, AP_SE), 0.03),
        sampled(state(2, EU_WEST), 0.1),
    ]
    assert pick_regions(Geo().picker(ss, geo_ctx(None))) == Counter({AP_SE: 200})


def test_custom_geo_table_is_used() -> None:
    ss = [state(0, US_WEST), state(1, EU_WEST)]
    default = Geo().picker(ss, geo_ctx(US_EAST))
    assert pick_regions(default) == Counter({US_WEST: 200})  # 70 ms < 90 ms
    table = GeoTable.default().with_pairs({(US_EAST, EU_WEST): 20})
    ctx = PickContext(
        clock=FakeClock(), rng=random.Random(0), totals=Totals(), region=US_EAST, geo=table
    )
    assert pick_regions(Geo().picker(ss, ctx)) == Counter({EU_WEST: 200})


def test_queue_still_counts_when_measured_latency_beats_the_table() -> None:
    # Two us-west-2 replicas answering in 50 ms, under the table's 70 ms from us-east-1.
    busy = sampled(state(0, US_WEST), 0.05)
    idle = sampled(state(1, US_WEST), 0.05)
    put(busy, inflight=20)
    picker = Geo().picker([busy, idle], geo_ctx(US_EAST))
    picks = Counter(picker.pick(None, None) for _ in range(200))
    assert picks[idle] >= 190


# -- the geo strategy through the Balancer --------------------------------------------------

NET = {US_EAST: 0.01, US_WEST: 0.07, EU_WEST: 0.09, AP_SE: 0.2}


def test_balancer_geo_burst_does_not_pile_onto_one_remote_replica() -> None:
    clock = FakeClock()
    eps = endpoints([US_EAST, US_WEST])
    lb = Balancer(eps, strategy="geo", region=US_EAST, clock=clock, rng=1)
    held = [acquire(lb, now=clock.now()).state for _ in range(10)]
    counts = Counter(s.endpoint.region for s in held)
    assert counts[US_EAST] >= 3, counts  # (was: 1 local, 9 stacked on one us-west-2)


def test_balancer_geo_prior_for_unsampled_regions_follows_the_samples() -> None:
    clock = FakeClock()
    local, remote = endpoints([US_EAST, US_WEST])
    lb = Balancer([local, remote], strategy="geo", region=US_EAST, clock=clock, rng=1)
    for _ in range(50):  # the local replica answers in 60 ms: 10 network + 50 processing
        lease = acquire(lb, now=clock.now())
        assert lease.state.url == local.url
        clock.advance(0.06)
        assert lease.ok(clock.now())
    # One call in flight locally: 0.01 + 0.05 x 2 = 0.11 s, against an unsampled
    # us-west-2 replica at 0.07 + the pool's median processing (~0.06) = 0.13 s.
    t0 = clock.now()
    first = acquire(lb, now=t0).state
    second = acquire(lb, now=t0).state
    assert (first.url, second.url) == (local.url, local.url)


def test_balancer_geo_picks_mostly_local_with_equal_processing_latency() -> None:
    clock = FakeClock()
    regions = [US_EAST, US_EAST, US_WEST, US_WEST, EU_WEST, EU_WEST, AP_SE]
    eps = endpoints(regions)
    lb = Balancer(eps, strategy="geo", region=US_EAST, clock=clock, rng=7)
    proc = 0.04
    members = {s.url: s for s in lb._pool.members.values()}
    # Every endpoint serves one call first: its measured latency = network + processing.
    for ep in eps:
        others = [s for u, s in members.items() if u != ep.url]
        lease = acquire(lb, None, others, clock.now())
        assert lease.state.url == ep.url
        clock.advance(NET[ep.region] + proc)  # type: ignore[index]
        assert lease.ok(clock.now())
    region_of = {e.url: e.region for e in eps}
    counts: Counter[str | None] = Counter()
    # Moderate load: two calls in flight at a time.
    for _ in range(200):
        t0 = clock.now()
        batch = [acquire(lb, now=t0) for _ in range(2)]
        clock.advance(max(NET[region_of[b.state.url]] for b in batch) + proc)  # type: ignore[index]
        for lease in batch:
            assert lease.ok(clock.now())
            counts[region_of[lease.state.url]] += 1
    assert counts[US_EAST] >= 0.9 * 400, counts
    assert lb.stats().calls_failed == 0


def test_balancer_geo_overflows_to_the_next_region_when_local_is_saturated() -> None:
    clock = FakeClock()
    eps = endpoints([US_EAST, US_WEST, EU_WEST])
    lb = Balancer(eps, strategy="geo", region=US_EAST, clock=clock, rng=1)
    members = list(lb._pool.members.values())
    for s_target in members:  # one sample each: 10/70/90 ms + 50 ms
        lease = acquire(lb, None, [m for m in members if m is not s_target], clock.now())
        clock.advance(NET[lease.state.endpoint.region] + 0.05)  # type: ignore[index]
        assert lease.ok(clock.now())
    t0 = clock.now()
    held = [acquire(lb, now=t0).state for _ in range(6)]
    regions = [s.endpoint.region for s in held]
    assert regions[0] == US_EAST
    assert US_WEST in regions  # the overflow goes to the next-closest region first ...
    assert regions.index(US_WEST) < (regions.index(EU_WEST) if EU_WEST in regions else 99)
    assert regions.count(US_EAST) >= 2  # ... but only once the local queue is priced in


# -- Locality ------------------------------------------------------------------------------

# 4 local replicas, then 2 in each other region (playbook distances 70 / 90 / 200 ms).
LOC_REGIONS = [US_EAST] * 4 + [US_WEST] * 2 + [EU_WEST] * 2 + [AP_SE] * 2


def locality_lb(
    strategy: str = "round_robin", locality: Locality | bool = True, **kw: object
) -> tuple[Balancer, list[Endpoint], FakeClock]:
    clock = FakeClock()
    eps = endpoints(LOC_REGIONS)
    lb = Balancer(
        eps,
        strategy=strategy,
        region=US_EAST,
        locality=locality,
        clock=clock,
        rng=5,
        **kw,  # type: ignore[arg-type]
    )
    return lb, eps, clock


def test_locality_keeps_round_robin_local_while_half_the_region_is_healthy() -> None:
    lb, eps, clock = locality_lb()
    picks = run_picks(lb, clock, 40)
    assert picks == Counter({e.url: 10 for e in eps[:4]})  # round robin, local only
    lb.set_health(eps[0].url, False)
    picks = run_picks(lb, clock, 60)
    assert set(picks) == {e.url for e in eps[1:4]}
    lb.set_health(eps[1].url, False)  # 2 of 4 pickable: exactly min_healthy
    picks = run_picks(lb, clock, 60)
    assert picks == Counter({eps[2].url: 30, eps[3].url: 30})
    lb.set_health(eps[2].url, False)  # 1 of 4: us-west-2 joins (1 + 2 of 4 + 2)
    picks = run_picks(lb, clock, 60)
    assert picks == Counter({eps[3].url: 20, eps[4].url: 20, eps[5].url: 20})
    lb.set_health(eps[2].url, True)  # back to 2 of 4: local only again
    picks = run_picks(lb, clock, 60)
    assert picks == Counter({eps[2].url: 30, eps[3].url: 30})


def test_locality_drained_local_region_fails_over_nearest_first() -> None:
    lb, eps, clock = locality_lb()
    for e in eps[:4]:
        lb.drain(e.url)
    assert by_region(lb, run_picks(lb, clock, 40)) == Counter({US_WEST: 40})
    for e in eps[4:6]:
        lb.drain(e.url)
    assert by_region(lb, run_picks(lb, clock, 40)) == Counter({EU_WEST: 40})
    for e in eps[6:8]:
        lb.drain(e.url)
    assert by_region(lb, run_picks(lb, clock, 40)) == Counter({AP_SE: 40})
    # Undraining goes back the same way: the nearest healthy region takes over again.
    lb.undrain(eps[5].url)
    assert by_region(lb, run_picks(lb, clock, 40)) == Counter({US_WEST: 40})
    # One local replica of four is below min_healthy: it serves, with the next region's help.
    lb.undrain(eps[3].url)
    assert by_region(lb, run_picks(lb, clock, 40)) == Counter({US_EAST: 20, US_WEST: 20})
    lb.undrain(eps[2].url)
    assert by_region(lb, run_picks(lb, clock, 40)) == Counter({US_EAST: 40})


def test_locality_follows_a_custom_geo_table() -> None:
    table = GeoTable.default().with_pairs({(US_EAST, AP_SE): 5})  # ap is now the closest
    lb, eps, clock = locality_lb(geo=table)
    for e in eps[:4]:
        lb.drain(e.url)
    assert by_region(lb, run_picks(lb, clock, 40)) == Counter({AP_SE: 40})


def test_locality_with_every_endpoint_unlabelled_uses_the_whole_pool() -> None:
    clock = FakeClock()
    eps = endpoints([None, None, None])
    lb = Balancer(eps, strategy="round_robin", region=US_EAST, locality=True, clock=clock)
    assert run_picks(lb, clock, 30) == Counter({e.url: 10 for e in eps})


def test_locality_counts_draining_local_endpoints_as_unhealthy() -> None:
    lb, eps, clock = locality_lb()
    for e in eps[:3]:
        lb.drain(e.url)
    picks = by_region(lb, run_picks(lb, clock, 60))
    assert picks[US_WEST] > 0, picks


def test_locality_spills_to_the_whole_pool_when_the_local_pick_is_saturated() -> None:
    clock = FakeClock()
    eps = endpoints([US_EAST, US_WEST, US_WEST, EU_WEST])
    lb = Balancer(
        eps,
        strategy="least_connections",
        region=US_EAST,
        locality=Locality(spill_inflight=2),
        clock=clock,
        rng=2,
    )
    held = [acquire(lb, now=clock.now()) for _ in range(5)]
    regions = [lease.state.endpoint.region for lease in held]
    # Two calls fill the local replica; the next ones spill to the (least loaded) rest.
    assert regions[:2] == [US_EAST, US_EAST]
    assert regions[2:].count(US_EAST) == 0
    assert lb._pool.members[eps[0].url].inflight == 2
    # One local call finishes: it is below the limit again and takes the next pick.
    assert held[0].ok(clock.now())
    assert acquire(lb, now=clock.now()).state.url == eps[0].url


def test_locality_without_spill_limit_never_spills() -> None:
    clock = FakeClock()
    eps = endpoints([US_EAST, US_WEST, EU_WEST])
    lb = Balancer(
        eps,
        strategy="least_connections",
        region=US_EAST,
        locality=Locality(spill_inflight=None),
        clock=clock,
    )
    held = [acquire(lb, now=clock.now()).state for _ in range(20)]
    assert {s.url for s in held} == {eps[0].url}


def test_locality_spills_by_default_once_the_local_endpoint_is_saturated() -> None:
    # locality=True spills ("auto"): a local replica already running as many calls as
    # its capacity shares the queue with idle remote ones.
    clock = FakeClock()
    eps = [
        Endpoint(url(0), region=US_EAST, metadata={"capacity": 2}),
        Endpoint(url(1), region=US_WEST),
        Endpoint(url(2), region=EU_WEST),
    ]
    lb = Balancer(eps, strategy="least_connections", region=US_EAST, locality=True, clock=clock)
    assert Locality().spill_inflight == "auto"
    held = [acquire(lb, now=clock.now()).state for _ in range(20)]
    assert [s.url for s in held[:2]] == [eps[0].url] * 2  # local, up to its capacity
    assert {s.endpoint.region for s in held} > {US_EAST}  # then the rest spill over


def test_spill_with_round_robin_reaches_remote_endpoints() -> None:
    clock = FakeClock()
    eps = endpoints([US_EAST, US_WEST, EU_WEST])
    lb = Balancer(
        eps,
        strategy="round_robin",
        region=US_EAST,
        locality=Locality(spill_inflight=1),
        clock=clock,
        rng=0,
    )
    held = [acquire(lb, now=clock.now()).state for _ in range(9)]
    assert held[0].url == eps[0].url
    assert {s.endpoint.region for s in held[1:]} >= {US_WEST, EU_WEST}


def test_locality_needs_a_region() -> None:
    with pytest.raises(ConfigError, match=r"locality needs the client's own region: pass region="):
        Balancer([url(1)], locality=True)
    with pytest.raises(ConfigError, match=r"pass region="):
        Balancer([url(1)], locality=Locality(spill_inflight=3))
    # False / None: no locality, no region needed.
    Balancer([url(1)], locality=False)
    Balancer([url(1)], locality=None)


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda: Locality(min_healthy=0), "got 0"),
        (lambda: Locality(min_healthy=1.5), "got 1.5"),
        (lambda: Locality(min_healthy=math.nan), "got nan"),
        (lambda: Locality(min_healthy=True), "got True"),
        (lambda: Locality(spill_inflight=0), "got 0"),
        (lambda: Locality(spill_inflight=2.5), "got 2.5"),  # type: ignore[arg-type]
        (lambda: Locality(spill_inflight=True), "got True"),
        (lambda: Balancer([url(1)], region=US_EAST, locality="yes"), "got 'yes'"),  # type: ignore[arg-type]
    ],
)
def test_locality_validation_errors_name_the_bad_value(build: object, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build()  # type: ignore[operator]


# -- server-reported load ------------------------------------------------------------------

A, B = url(1), url(2)


@pytest.mark.parametrize(
    "strategy", ["power_of_two", "peak_ewma", "least_connections", "least_response_time", "geo"]
)
def test_reported_load_steers_picks_away_until_it_expires(strategy: str) -> None:
    clock = FakeClock()
    ep_a, ep_b = Endpoint(A, region=US_EAST), Endpoint(B, region=US_EAST)
    lb = Balancer([ep_a, ep_b], strategy=strategy, region=US_EAST, clock=clock, rng=11)
    lb.report_load(ep_a, 50)
    assert lb.stats().endpoint(A).server_load == 50
    picks = run_picks(lb, clock, 100)
    assert picks[B] >= 98, picks
    clock.advance(1.9)  # still fresh
    assert run_picks(lb, clock, 50)[B] >= 49
    clock.advance(0.2)  # 2.1 s after the report: expired
    picks = run_picks(lb, clock, 200)
    assert picks[A] >= 50, picks


@pytest.mark.parametrize("value", ["50", "50.0", 50.0])
def test_reported_load_accepts_header_strings(value: object) -> None:
    clock = FakeClock()
    lb = Balancer([A, B], strategy="power_of_two", clock=clock, rng=1)
    lb.report_load(A, value)  # type: ignore[arg-type]
    assert run_picks(lb, clock, 50) == Counter({B: 50})


@pytest.mark.parametrize("value", [None, "abc", "", -1, math.nan, math.inf, [3]])
def test_unusable_reported_load_is_ignored(value: object) -> None:
    clock = FakeClock()
    lb = Balancer([A, B], strategy="power_of_two", clock=clock, rng=1)
    lb.report_load(A, value)  # type: ignore[arg-type]
    lb.report_load("http://10.9.9.9:8000", 50)  # not a member: ignored
    assert lb.stats().endpoint(A).server_load is None
    picks = run_picks(lb, clock, 200)
    assert picks[A] >= 60 and picks[B] >= 60


def test_a_newer_report_replaces_the_older_one() -> None:
    clock = FakeClock()
    lb = Balancer([A, B], strategy="power_of_two", clock=clock, rng=1)
    lb.report_load(A, 50)
    clock.advance(1.5)
    lb.report_load(A, 0)  # the queue drained
    picks = run_picks(lb, clock, 200)
    assert picks[A] >= 60, picks
    clock.advance(1.0)
    lb.report_load(B, 50)  # now B is the busy one, for the next 2 s
    assert run_picks(lb, clock, 50) == Counter({A: 50})


def test_report_load_accepts_a_trailing_slash() -> None:
    clock = FakeClock()
    lb = Balancer([A, B], strategy="power_of_two", clock=clock, rng=1)
    lb.report_load(A + "/", 50)
    assert lb.stats().endpoint(A).server_load == 50


def test_public_names() -> None:
    assert lbclient.GeoTable is GeoTable
    assert lbclient.Locality is Locality
