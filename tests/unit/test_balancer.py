"""`lbclient.Balancer`: configuration errors, membership, in-flight accounting and the
three ways to call (``@lb.route``, ``lb.call``, ``async with lb.pick()``).

Synchronous properties drive the internals directly (``lb._pool.acquire`` takes a slot
and returns a lease; ``lease.ok()`` / ``fail()`` / ``cancel()`` give it back) with a fake
clock and a seeded RNG; the async tests run real coroutines on the event loop with tiny sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import acquire, endpoint_lists, operations, strategy_names, url, urls

import lbclient
from lbclient import strategies as lbstrategies
from lbclient.pool.lease import Lease
from lbclient.pool.state import EndpointState
from lbclient.strategies import ConsistentHash
from lbclient.testing import FakeClock

SETTINGS = settings(max_examples=60, deadline=None)
seeds = st.integers(min_value=0, max_value=2**32 - 1)
A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


def named(value: object) -> str:
    """A regex matching ``repr(value)`` inside an error message."""
    return re.escape(repr(value))


def in_flight(lb: lbclient.Balancer) -> dict[str, int]:
    return {e.url: e.in_flight for e in lb.stats().endpoints}


async def wait_until(predicate: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


# =========================================================================================
# Bad input: every ConfigError names the bad value
# =========================================================================================


class NoClock:
    pass


class HalfClock:
    def now(self) -> float:
        return 0.0


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"endpoints": []}, r"endpoints must not be empty.*got \[\]"),
        ({"endpoints": A}, r"endpoints must be a list .*" + named(A)),
        ({"endpoints": lbclient.Endpoint(A)}, r"endpoints must be a list .*Endpoint"),
        ({"endpoints": 42}, r"endpoints must be a list .*42"),
        ({"endpoints": [A, A + "/"]}, r"duplicate endpoint url " + named(A)),
        ({"endpoints": [A, lbclient.Endpoint(A, weight=2)]}, r"duplicate .*" + named(A)),
        ({"strategy": "fastest"}, r"unknown strategy 'fastest'; known: consistent_hash, geo"),
        ({"strategy": 42}, r"strategy must be a name .*got 42"),
        ({"strategy": object}, r"strategy must be a name .*got <class 'object'>"),
        ({"endpoints": ["ftp://x"]}, r"'ftp://x' must start with http:// or https://"),
        ({"endpoints": ["http://"]}, r"'http://' has no host"),
        ({"endpoints": [A, 123]}, r"expected an lbclient.Endpoint or a URL str, got 123"),
        ({"endpoints": [None]}, r"got None"),
        ({"region": ""}, r"region must be a non-empty str or None, got ''"),
        ({"region": "   "}, r"region .*got '   '"),
        ({"region": 5}, r"region .*got 5"),
        ({"geo": {"us": {}}}, r"geo must be an lbclient.GeoTable or None, got \{'us': \{\}\}"),
        ({"ewma_decay": 0}, r"ewma_decay must be a finite number of seconds > 0, got 0"),
        ({"ewma_decay": -1.5}, r"ewma_decay .*got -1.5"),
        ({"ewma_decay": math.nan}, r"ewma_decay .*got nan"),
        ({"ewma_decay": math.inf}, r"ewma_decay .*got inf"),
        ({"ewma_decay": "10"}, r"ewma_decay .*got '10'"),
        ({"ewma_decay": True}, r"ewma_decay .*got True"),
        (
            {"on_event": "print"},
            r"on_event must be a callable, an lbclient.Listener .* or a list of them, "
            r"got 'print'",
        ),
        ({"rng": "x"}, r"rng must be a random.Random, an int seed or None, got 'x'"),
        ({"rng": True}, r"rng .*got True"),
        ({"rng": 1.5}, r"rng .*got 1.5"),
        (
            {"clock": NoClock()},
            r"clock must implement lbclient.Clock \(now, sleep\), got <.*NoClock",
        ),
        ({"clock": HalfClock()}, r"clock must implement .*HalfClock"),
        ({"retry": "3"}, r"retry must be an lbclient.Retry or None, got '3'"),
        ({"retry": lbclient.Breaker()}, r"retry must be an lbclient.Retry or None, got .*Breaker"),
        (
            {"breaker": lbclient.Retry()},
            r"breaker must be an lbclient.Breaker or None, got .*Retry",
        ),
        ({"hedge": 0.05}, r"hedge must be an lbclient.Hedge or None, got 0.05"),
        (
            {"slow_start": 0},
            r"slow_start must be a finite number of seconds > 0 or None, got 0",
        ),
        ({"slow_start": -1}, r"slow_start .*got -1"),
        ({"slow_start": math.nan}, r"slow_start .*got nan"),
        ({"slow_start": "30"}, r"slow_start .*got '30'"),
        ({"slow_start": True}, r"slow_start .*got True"),
        ({"locality": "eu"}, r"locality must be an lbclient.Locality or None, got 'eu'"),
        ({"locality": True}, r"locality needs the client's own region: pass region="),
        ({"health": 5}, r"health must be an lbclient.HealthCheck or None, got 5"),
        (
            {"discovery": ["http://x"]},
            r"discovery must have an async resolve\(\) method.*\['http://x'\]",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_balancer_config_errors(kwargs: dict[str, Any], pattern: str) -> None:
    endpoints = kwargs.pop("endpoints", [A, B])
    with pytest.raises(lbclient.ConfigError, match=pattern) as info:
        lbclient.Balancer(endpoints, **kwargs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, lbclient.LBError)


@pytest.mark.parametrize("w", [0, -1, math.nan, math.inf, "2"])
def test_balancer_bad_weights(w: object) -> None:
    with pytest.raises(lbclient.ConfigError, match=r"weight .*" + ("nan" if w != w else named(w))):
        lbclient.Balancer([lbclient.Endpoint(A, weight=w)])  # type: ignore[arg-type]


def test_balancer_accepts_a_generator_and_endpoint_objects() -> None:
    lb = lbclient.Balancer(u for u in [A, lbclient.Endpoint(B, weight=2)])
    assert lb.endpoints == (lbclient.Endpoint(A), lbclient.Endpoint(B, weight=2))


def test_balancer_accepts_a_good_clock_and_rng() -> None:
    lbclient.Balancer([A], clock=FakeClock(), rng=random.Random(1))
    lbclient.Balancer([A], clock=lbclient.MonotonicClock(), rng=0)


@pytest.mark.parametrize("vnodes", [0, -3, 1.5, True, "100"])
def test_consistent_hash_bad_vnodes(vnodes: object) -> None:
    with pytest.raises(
        lbclient.ConfigError, match=r"vnodes must be an int >= 1, got " + named(vnodes)
    ):
        ConsistentHash(vnodes=vnodes)  # type: ignore[arg-type]


@pytest.mark.parametrize("factor", [0.5, 0.999, -1, math.nan, math.inf, "2", True])
def test_consistent_hash_bad_balance_factor(factor: object) -> None:
    with pytest.raises(
        lbclient.ConfigError, match=r"balance_factor must be a number >= 1.0 or None"
    ):
        ConsistentHash(balance_factor=factor)  # type: ignore[arg-type]
    with pytest.raises(lbclient.ConfigError, match="nan" if factor != factor else named(factor)):
        ConsistentHash(balance_factor=factor)  # type: ignore[arg-type]


def test_consistent_hash_bad_max_ring_size() -> None:
    with pytest.raises(lbclient.ConfigError, match=r"max_ring_size must be an int >= 1, got 0"):
        ConsistentHash(max_ring_size=0)


async def _fn(endpoint: lbclient.Endpoint) -> str:
    return endpoint.url


@pytest.mark.parametrize("key", [5, "user", ["user"]])
def test_route_key_not_callable(key: object) -> None:
    lb = lbclient.Balancer([A])
    with pytest.raises(lbclient.ConfigError, match=r"route key must be a callable.*" + named(key)):
        lb.route(key=key)(_fn)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, 0, math.nan, "1", True])
def test_route_bad_timeout(timeout: object) -> None:
    lb = lbclient.Balancer([A])
    pattern = r"timeout must be a finite number of seconds > 0 or None, got "
    with pytest.raises(
        lbclient.ConfigError, match=pattern + ("nan" if timeout != timeout else named(timeout))
    ):
        lb.route(timeout=timeout)(_fn)  # type: ignore[arg-type]


def test_route_bad_idle_timeout_on_a_stream() -> None:
    lb = lbclient.Balancer([A])

    async def stream(endpoint: lbclient.Endpoint) -> AsyncIterator[str]:
        yield endpoint.url

    with pytest.raises(lbclient.ConfigError, match=r"timeout .*got -1"):
        lb.route(idle_timeout=-1)(stream)


@pytest.mark.parametrize("fn", [42, "fn"])
def test_route_needs_a_callable(fn: object) -> None:
    lb = lbclient.Balancer([A])
    with pytest.raises(
        lbclient.ConfigError, match=r"@lb.route needs an async function.*" + named(fn)
    ):
        lb.route(fn)  # type: ignore[call-overload]


def test_route_rejects_a_sync_function() -> None:
    lb = lbclient.Balancer([A])

    def sync(endpoint: lbclient.Endpoint) -> str:
        return endpoint.url

    with pytest.raises(lbclient.ConfigError, match=r"'async def' function.*sync"):
        lb.route(sync)  # type: ignore[call-overload]


async def test_call_needs_a_callable() -> None:
    lb = lbclient.Balancer([A])
    with pytest.raises(lbclient.ConfigError, match=r"lb.call needs an async function, got 42"):
        await lb.call(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [-1, -0.5, "1", True])
def test_drain_bad_timeout(timeout: object) -> None:
    lb = lbclient.Balancer([A, B])
    with pytest.raises(
        lbclient.ConfigError,
        match=r"drain timeout must be a number of seconds >= 0, got " + named(timeout),
    ):
        lb.drain(A, timeout=timeout)  # type: ignore[arg-type]
    assert lb.stats().endpoint(A).state == "active"  # nothing happened


def test_drain_nan_timeout_is_a_config_error() -> None:
    lb = lbclient.Balancer([A, B])
    with pytest.raises(lbclient.ConfigError, match="nan"):
        lb.drain(A, timeout=math.nan)


def test_add_duplicate() -> None:
    lb = lbclient.Balancer([A, B])
    with pytest.raises(
        lbclient.ConfigError, match=r"endpoint " + named(A) + r" is already in the pool"
    ):
        lb.add(A + "/")
    with pytest.raises(lbclient.ConfigError, match=r"got 7"):
        lb.add(7)  # type: ignore[arg-type]
    with pytest.raises(lbclient.ConfigError, match=r"'ftp://c'"):
        lb.add("ftp://c")
    assert lb.endpoints == (lbclient.Endpoint(A), lbclient.Endpoint(B))


@pytest.mark.parametrize("op", ["remove", "drain", "undrain"])
@pytest.mark.parametrize("target", ["http://10.9.9.9:1", "nope", 123, None])
def test_unknown_endpoint(op: str, target: object) -> None:
    lb = lbclient.Balancer([A, B])
    with pytest.raises(
        lbclient.UnknownEndpoint, match=r"no endpoint " + named(target) + " in the pool"
    ) as info:
        getattr(lb, op)(target)
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, lbclient.LBError)
    assert len(lb.endpoints) == 2


# =========================================================================================
# Membership
# =========================================================================================


def test_repr_and_endpoints() -> None:
    lb = lbclient.Balancer([A, B], strategy="round_robin")
    assert repr(lb) == "<lbclient.Balancer strategy='round_robin' endpoints=2>"
    assert lb.endpoints == (lbclient.Endpoint(A), lbclient.Endpoint(B))
    assert lb.stats().strategy == "round_robin"
    assert lbclient.Balancer([A]).stats().strategy == "peak_ewma"  # the default


def test_add_is_pickable_at_once_and_survivors_keep_their_state() -> None:
    clock = FakeClock()
    lb = lbclient.Balancer([A], strategy="round_robin", clock=clock, rng=0)
    assert acquire(lb).ok(0.0)
    before = lb._pool.members[A]
    assert lb.add(lbclient.Endpoint(B + "/", weight=2)) == lbclient.Endpoint(B, weight=2)
    picks = Counter(acquire(lb).state.url for _ in range(10))
    assert picks == {A: 5, B: 5}
    assert lb._pool.members[A] is before and before.requests == 6
    lb.remove(B)
    assert lb._pool.members[A] is before
    assert lb.stats().endpoint(A).requests == 6


def test_remove_accepts_trailing_slash_and_returns_the_endpoint() -> None:
    lb = lbclient.Balancer([A, lbclient.Endpoint(B, region="eu")])
    assert lb.remove(B + "/") == lbclient.Endpoint(B, region="eu")
    assert lb.endpoints == (lbclient.Endpoint(A),)
    with pytest.raises(lbclient.UnknownEndpoint):
        lb.remove(B)


def test_empty_pool_and_all_draining_raise_no_endpoint_available() -> None:
    lb = lbclient.Balancer([A, B])
    lb.drain(A)
    lb.drain(B)
    with pytest.raises(lbclient.NoEndpointAvailable, match="all 2 endpoint"):
        acquire(lb)
    lb.undrain(B)
    assert acquire(lb).state.url == B
    lb.remove(A)
    lb.remove(B)
    with pytest.raises(lbclient.NoEndpointAvailable, match="empty"):
        acquire(lb)


def test_drain_takes_effect_before_await_and_shows_in_stats() -> None:
    lb = lbclient.Balancer([A, B], strategy="round_robin", rng=0)
    lb.drain(A)  # not awaited: picks stop anyway
    assert {acquire(lb).state.url for _ in range(10)} == {B}
    st_a = lb.stats().endpoint(A)
    assert (st_a.state, st_a.pickable) == ("draining", False)
    lb.undrain(A)
    assert {acquire(lb).state.url for _ in range(10)} == {A, B}
    assert lb.stats().endpoint(A).state == "active"


def test_membership_events() -> None:
    events: list[lbclient.Event] = []
    lb = lbclient.Balancer([A], on_event=events.append, clock=FakeClock(3.0))
    lb.add(B)
    lb.drain(B)
    lb.drain(B)  # already draining: no second event
    lb.undrain(B)
    lb.remove(B)
    assert [(e.action, e.url, e.at) for e in events] == [  # type: ignore[attr-defined]
        ("add", B, 3.0),
        ("drain", B, 3.0),
        ("undrain", B, 3.0),
        ("remove", B, 3.0),
    ]
    assert all(isinstance(e, lbclient.MembershipEvent) for e in events)


def test_broken_listener_does_not_break_membership() -> None:
    def boom(event: lbclient.Event) -> None:
        raise RuntimeError("listener bug")

    lb = lbclient.Balancer([A], on_event=boom)
    lb.add(B)
    assert len(lb.endpoints) == 2


def test_same_seed_same_picks() -> None:
    def picks(seed: int) -> list[str]:
        lb = lbclient.Balancer([A, B, C], strategy="random", rng=seed, clock=FakeClock())
        return [acquire(lb).state.url for _ in range(50)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)


# =========================================================================================
# Properties (hypothesis, no event loop)
# =========================================================================================


@SETTINGS
@given(
    eps=endpoint_lists(2, 8),
    name=strategy_names,
    mask=st.lists(st.booleans(), min_size=8, max_size=8),
    seed=seeds,
)
def test_drained_endpoints_are_never_picked(
    eps: list[lbclient.Endpoint], name: str, mask: list[bool], seed: int
) -> None:
    clock = FakeClock()
    lb = lbclient.Balancer(eps, strategy=name, clock=clock, rng=seed)
    drained = {e.url for e, m in zip(eps, mask, strict=False) if m} or {eps[0].url}
    drained.discard(eps[-1].url)  # at least one stays pickable
    for u in drained:
        lb.drain(u)
    rnd = random.Random(seed)
    held: list[Lease] = []
    for i in range(40):
        lease = acquire(lb, f"key-{rnd.randrange(10)}" if i % 2 else None, now=clock.now())
        assert lease.state.url not in drained
        held.append(lease)
        if rnd.random() < 0.6:
            assert held.pop(rnd.randrange(len(held))).ok(clock.now())
        clock.advance(0.01)


@SETTINGS
@given(eps=endpoint_lists(1, 6), seed=seeds, k=st.integers(1, 3))
def test_balancer_weighted_round_robin_honours_weights(
    eps: list[lbclient.Endpoint], seed: int, k: int
) -> None:
    clock = FakeClock()
    lb = lbclient.Balancer(eps, strategy="weighted_round_robin", clock=clock, rng=seed)
    total = int(k * sum(e.weight for e in eps))
    for _ in range(total):
        lease = acquire(lb, now=clock.now())
        clock.advance(0.001)
        assert lease.ok(clock.now())
    for e in lb.stats().endpoints:
        assert abs(e.requests - k * e.weight) <= 1


@settings(max_examples=25, deadline=None)  # 20,000 picks each
@given(ws=st.lists(st.integers(1, 4), min_size=2, max_size=4), seed=seeds)
def test_balancer_random_honours_weights(ws: list[int], seed: int) -> None:
    lb = lbclient.Balancer(
        [lbclient.Endpoint(url(i), weight=w) for i, w in enumerate(ws)],
        strategy="random",
        clock=FakeClock(),
        rng=seed,
    )
    picks = 20_000
    for _ in range(picks):
        assert acquire(lb).cancel()
    for e in lb.stats().endpoints:
        assert e.requests / picks == pytest.approx(e.weight / sum(ws), rel=0.15)


@SETTINGS
@given(
    eps=endpoint_lists(1, 8),
    name=st.sampled_from(["least_connections", "power_of_two"]),
    seed=seeds,
    k=st.integers(1, 4),
)
def test_load_aware_strategies_fill_by_weight(
    eps: list[lbclient.Endpoint], name: str, seed: int, k: int
) -> None:
    """Slots held, never released: load per unit of weight stays level."""
    lb = lbclient.Balancer(eps, strategy=name, clock=FakeClock(), rng=seed)
    for _ in range(int(k * sum(e.weight for e in eps))):
        acquire(lb)
    members = lb._pool.members.values()
    levels = [s.inflight / s.weight for s in members]
    if name == "least_connections":  # exact water-filling
        assert max(levels) - min(levels) <= max(1 / s.weight for s in members)
    else:  # P2C: never more than a few picks above the mean
        mean = sum(s.inflight for s in members) / sum(s.weight for s in members)
        assert max(levels) <= mean + 3.0 + max(1 / s.weight for s in members)


@settings(max_examples=80, deadline=None)
@given(urls_=urls(1, 5), name=strategy_names, ops=operations, seed=seeds)
def test_in_flight_never_negative_and_always_exact(
    urls_: list[str], name: str, ops: list[tuple[str, int]], seed: int
) -> None:
    """Model-based: after any sequence of acquire / succeed / fail / cancel / drain /
    undrain, every member's in-flight equals the slots held on it, and never < 0."""
    clock = FakeClock()
    lb = lbclient.Balancer(urls_, strategy=name, clock=clock, rng=seed)
    held: list[Lease] = []
    requests: Counter[int] = Counter()
    failures: Counter[int] = Counter()
    for op, n in ops:
        clock.advance(0.005)
        target = urls_[n % len(urls_)]
        if op == "acquire":
            try:
                lease = acquire(lb, None if n % 3 == 0 else f"k{n}", now=clock.now())
            except lbclient.NoEndpointAvailable:
                assert all(m.draining for m in lb._pool.members.values())
                continue
            assert not lease.state.draining
            held.append(lease)
            requests[id(lease.state)] += 1
        elif op in ("succeed", "fail", "cancel") and held:
            lease = held.pop(n % len(held))
            if op == "succeed":
                assert lease.ok()
            elif op == "fail":
                assert lease.fail(ConnectionError("refused")) is True
                failures[id(lease.state)] += 1
            else:
                assert lease.cancel()
        elif op == "drain":
            lb.drain(target)
        elif op == "undrain":
            lb.undrain(target)
        for s in lb._pool.members.values():
            expected = sum(1 for h in held if h.state is s)
            assert s.inflight == expected >= 0
            assert s.requests == requests[id(s)]
            assert s.failures == failures[id(s)]
        assert lb._pool.totals.inflight == len(held)
        assert lb.stats().in_flight == len(held)
    for lease in held:
        assert lease.ok()
    assert lb.stats().in_flight == 0 == lb._pool.totals.inflight


@SETTINGS
@given(
    eps=endpoint_lists(2, 8),
    name=strategy_names,
    mask=st.lists(st.booleans(), min_size=8, max_size=8),
    seed=seeds,
)
def test_acquire_honours_exclude_for_every_strategy(
    eps: list[lbclient.Endpoint], name: str, mask: list[bool], seed: int
) -> None:
    """What a retry or hedge relies on: ``pool.acquire(call, exclude)`` never returns an
    excluded endpoint while a non-excluded one is pickable."""
    clock = FakeClock()
    lb = lbclient.Balancer(eps, strategy=name, clock=clock, rng=seed)
    members = list(lb._pool.members.values())
    excluded = {s for s, m in zip(members, mask, strict=False) if m} or {members[0]}
    excluded.discard(members[-1])
    for i in range(20):
        lease = acquire(lb, (None, f"k{i}", i)[i % 3], excluded, clock.now())
        assert lease.state not in excluded, (name, lease.state)
        if i % 2:
            assert lease.ok(clock.now())
        clock.advance(0.01)


def test_release_never_goes_negative() -> None:
    lb = lbclient.Balancer([A], clock=FakeClock())
    lease = acquire(lb)
    s = lease.state
    assert lease.ok(0.0)
    # Stray extra outcomes on the same lease are refused and change nothing.
    assert lease.cancel() is False
    assert lease.fail(ConnectionError("late"), 0.0) is False
    assert lease.ok(0.0) is False
    assert lease.cut(0.0) is False
    assert lease.lose(0.0) is False
    lease.abandon()
    assert s.inflight == 0 and lb._pool.totals.inflight == 0
    assert (s.requests, s.successes, s.failures, s.cancelled) == (1, 1, 0, 0)


def test_remove_with_slots_held_keeps_totals_exact() -> None:
    clock = FakeClock()
    lb = lbclient.Balancer([A, B], strategy="round_robin", clock=clock, rng=0)
    taken = [acquire(lb) for _ in range(4)]
    lb.remove(A)
    for lease in taken:
        assert lease.ok(0.0)
    assert lb._pool.totals.inflight == 0
    assert in_flight(lb) == {B: 0}


# =========================================================================================
# Concurrency on a real event loop
# =========================================================================================


Face = Callable[[lbclient.Balancer, Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]


def face_route(
    lb: lbclient.Balancer, fn: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    return lb.route(fn)


def face_route_key(
    lb: lbclient.Balancer, fn: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    return lb.route(key=lambda *a, **k: "k")(fn)


def face_route_timeout(
    lb: lbclient.Balancer, fn: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    return lb.route(timeout=30)(fn)


def face_call(
    lb: lbclient.Balancer, fn: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    return functools.partial(lb.call, fn)


def face_pick(
    lb: lbclient.Balancer, fn: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[Any]]:
    async def call(*args: Any, **kwargs: Any) -> Any:
        async with lb.pick() as ep:
            return await fn(ep, *args, **kwargs)

    return call


FACES = [face_route, face_route_key, face_route_timeout, face_call, face_pick]


@pytest.mark.parametrize("name", lbstrategies.names())
async def test_thousand_concurrent_calls_end_with_nothing_in_flight(name: str) -> None:
    lb = lbclient.Balancer([A, B, C], strategy=name, rng=1)

    @lb.route
    async def work(endpoint: lbclient.Endpoint, i: int) -> tuple[str, int]:
        await asyncio.sleep(0)
        if i % 3 == 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)
        if i % 20 == 7:
            raise ValueError(i)  # our own bug: reaches the caller, not the endpoint's fault
        if i % 20 == 17:
            raise ConnectionError(i)  # the endpoint's fault: counted against it
        return endpoint.url, i

    results = await asyncio.gather(*(work(i) for i in range(1000)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 100
    assert sum(isinstance(e, ValueError) for e in errors) == 50
    assert sum(isinstance(e, ConnectionError) for e in errors) == 50
    assert [r[1] for r in results if isinstance(r, tuple)] == [
        i for i in range(1000) if i % 10 != 7
    ]
    stats = lb.stats()
    assert in_flight(lb) == {A: 0, B: 0, C: 0}
    assert stats.in_flight == 0 and lb._pool.totals.inflight == 0
    assert (stats.calls, stats.calls_failed, stats.attempts) == (1000, 100, 1000)
    assert sum(e.failures for e in stats.endpoints) == 50
    assert sum(e.ignored for e in stats.endpoints) == 50
    assert sum(e.successes for e in stats.endpoints) == 900
    assert max(s.peak_inflight for s in lb._pool.members.values()) > 10  # really concurrent


@pytest.mark.parametrize("face", FACES)
async def test_thousand_concurrent_calls_every_face(face: Face) -> None:
    lb = lbclient.Balancer([A, B, C], strategy="least_connections", rng=2)

    async def work(endpoint: lbclient.Endpoint, i: int, *, fail: bool = False) -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0.001 * (i % 2))
        if fail:
            raise KeyError(i)
        return i

    run = face(lb, work)
    results = await asyncio.gather(
        *(run(i, fail=i % 50 == 0) for i in range(1000)), return_exceptions=True
    )
    assert sum(isinstance(r, KeyError) for r in results) == 20
    stats = lb.stats()
    assert stats.in_flight == 0 and all(v == 0 for v in in_flight(lb).values())
    assert (stats.calls, stats.calls_failed) == (1000, 20)
    # least_connections spreads concurrent calls evenly
    assert all(abs(e.requests - 333) < 40 for e in stats.endpoints), stats


@pytest.mark.parametrize("face", FACES)
async def test_cancellation_mid_call_releases_the_slot(face: Face) -> None:
    lb = lbclient.Balancer([A, B], strategy="round_robin")
    started = asyncio.Event()
    never = asyncio.Event()

    async def slow(endpoint: lbclient.Endpoint) -> str:
        started.set()
        await never.wait()
        return endpoint.url

    task = asyncio.create_task(face(lb, slow)())
    await started.wait()
    assert lb.stats().in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = lb.stats()
    assert stats.in_flight == 0 and lb._pool.totals.inflight == 0
    assert sum(e.failures for e in stats.endpoints) == 0
    assert stats.calls_failed == 0


async def test_cancellation_mid_call_with_retry_configured() -> None:
    lb = lbclient.Balancer(
        [A, B], retry=lbclient.Retry(attempts=3), clock=FakeClock(auto_advance=True)
    )
    started = asyncio.Event()

    @lb.route
    async def slow(endpoint: lbclient.Endpoint) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = lb.stats()
    assert (stats.in_flight, stats.retries, stats.calls_failed) == (0, 0, 0)
    assert sum(e.failures for e in stats.endpoints) == 0


async def test_drained_endpoint_gets_no_new_picks_and_drain_waits() -> None:
    lb = lbclient.Balancer([A, B], strategy="round_robin", rng=0)
    release = asyncio.Event()
    held: list[str] = []

    @lb.route
    async def call(endpoint: lbclient.Endpoint, hold: bool) -> str:
        if hold:
            held.append(endpoint.url)
            await release.wait()
        return endpoint.url

    long_call = asyncio.create_task(call(True))
    await wait_until(lambda: bool(held))
    victim = held[0]
    other = B if victim == A else A
    waiter = asyncio.ensure_future(lb.drain(victim))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # one call still in flight there
    assert await asyncio.gather(*(call(False) for _ in range(50))) == [other] * 50
    assert lb.stats().endpoint(victim).requests == 1
    release.set()
    result = await asyncio.wait_for(waiter, 2)
    assert isinstance(result, lbclient.DrainResult)
    assert (result.url, result.idle, result.in_flight) == (victim, True, 0)
    assert result.waited > 0
    assert await long_call == victim
    assert lb.stats().endpoint(victim).state == "draining"  # still a member until removed
    lb.remove(victim)
    assert lb.endpoints == (lbclient.Endpoint(other),)


async def test_drain_with_timeout_reports_what_is_still_running() -> None:
    lb = lbclient.Balancer([A], strategy="round_robin")
    started = asyncio.Event()
    release = asyncio.Event()

    @lb.route
    async def call(endpoint: lbclient.Endpoint) -> str:
        started.set()
        await release.wait()
        return endpoint.url

    tasks = [asyncio.create_task(call()) for _ in range(2)]
    await started.wait()
    await asyncio.sleep(0)
    t0 = time.monotonic()
    result = await lb.drain(A, timeout=0.05)
    assert 0.04 <= time.monotonic() - t0 < 1.0
    assert (result.idle, result.in_flight) == (False, 2)
    assert 0.04 <= result.waited < 1.0
    assert "idle=False, in_flight=2" in repr(result)
    with pytest.raises(lbclient.NoEndpointAvailable, match="draining"):
        await call()
    release.set()
    assert await asyncio.gather(*tasks) == [A, A]
    again = await lb.drain(A, timeout=0)
    assert (again.idle, again.in_flight) == (True, 0)


async def test_drain_of_an_idle_endpoint_returns_at_once() -> None:
    lb = lbclient.Balancer([A, B])
    result = await asyncio.wait_for(lb.drain(A), 1)
    assert (result.url, result.idle, result.in_flight) == (A, True, 0)


async def test_removing_an_endpoint_mid_call_does_not_break_the_call() -> None:
    lb = lbclient.Balancer([A, B], strategy="round_robin", rng=0)
    started = asyncio.Event()
    release = asyncio.Event()

    @lb.route
    async def call(endpoint: lbclient.Endpoint, x: int) -> tuple[str, int]:
        started.set()
        await release.wait()
        return endpoint.url, x * 2

    task = asyncio.create_task(call(21))
    await started.wait()
    victim = next(u for u, n in in_flight(lb).items() if n == 1)
    assert lb.remove(victim) == lbclient.Endpoint(victim)
    release.set()
    assert await task == (victim, 42)
    assert lb._pool.totals.inflight == 0
    assert [e.url for e in lb.stats().endpoints] == [B if victim == A else A]
    assert (await call(1))[0] != victim


async def test_call_passes_arguments_and_key() -> None:
    lb = lbclient.Balancer([A, B, C], strategy="consistent_hash", rng=0)

    async def fn(endpoint: lbclient.Endpoint, a: int, *, b: str) -> tuple[str, int, str]:
        await asyncio.sleep(0)
        return endpoint.url, a, b

    first = await lb.call(fn, 1, b="x", key="user-1")
    assert first[1:] == (1, "x")
    for _ in range(10):
        assert (await lb.call(fn, 2, b="y", key="user-1"))[0] == first[0]
    stats = lb.stats()
    assert (stats.calls, stats.calls_failed, stats.in_flight) == (11, 0, 0)


async def test_call_records_failures_and_reraises_the_same_exception() -> None:
    lb = lbclient.Balancer([A])
    boom = ConnectionResetError("peer reset")

    async def fn(endpoint: lbclient.Endpoint) -> None:
        raise boom

    with pytest.raises(ConnectionResetError) as info:
        await lb.call(fn)
    assert info.value is boom
    stats = lb.stats()
    assert (stats.calls, stats.calls_failed, stats.in_flight) == (1, 1, 0)
    assert stats.endpoint(A).failures == 1


async def test_pick_context_manager() -> None:
    lb = lbclient.Balancer([A, B], strategy="round_robin")
    async with lb.pick() as ep:
        assert isinstance(ep, lbclient.Endpoint) and ep.url in (A, B)
        assert in_flight(lb)[ep.url] == 1
    assert lb.stats().in_flight == 0
    assert lb.stats().endpoint(ep.url).requests == 1

    boom = ValueError("bad response")
    with pytest.raises(ValueError) as info:
        async with lb.pick() as ep2:
            raise boom
    assert info.value is boom  # unchanged, not wrapped
    stats = lb.stats()
    # The block's own error is not the endpoint's fault: ignored, not a failure.
    assert (stats.endpoint(ep2.url).failures, stats.endpoint(ep2.url).ignored) == (0, 1)
    assert (stats.calls, stats.calls_failed, stats.in_flight) == (2, 1, 0)

    down = ConnectionError("down")
    with pytest.raises(ConnectionError) as info2:
        async with lb.pick() as ep3:
            raise down
    assert info2.value is down
    stats = lb.stats()
    assert stats.endpoint(ep3.url).failures == 1
    assert (stats.calls, stats.calls_failed, stats.in_flight) == (3, 2, 0)


async def test_pick_with_key_and_reuse() -> None:
    lb = lbclient.Balancer([A, B, C], strategy="consistent_hash", rng=0)
    homes = set()
    for _ in range(5):
        async with lb.pick(key="tenant-9") as ep:
            homes.add(ep.url)
    assert len(homes) == 1
    ctx = lb.pick()
    async with ctx:
        with pytest.raises(RuntimeError, match="already in use"):
            await ctx.__aenter__()


async def test_pick_cancelled_inside_block_is_not_a_failure() -> None:
    lb = lbclient.Balancer([A])
    inside = asyncio.Event()

    async def user() -> None:
        async with lb.pick():
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(user())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = lb.stats()
    assert (stats.in_flight, stats.calls_failed, stats.endpoint(A).failures) == (0, 0, 0)


async def test_use_after_aclose_raises_balancer_closed() -> None:
    lb = lbclient.Balancer([A, B])

    async def fn(endpoint: lbclient.Endpoint) -> str:
        return endpoint.url

    routed = [face(lb, fn) for face in FACES]
    await lb.aclose()
    await lb.aclose()  # idempotent
    assert lb.closed and lb.stats().closed
    assert "closed" in repr(lb)
    for run in routed:
        with pytest.raises(lbclient.BalancerClosed, match="closed"):
            await run()
    with pytest.raises(lbclient.BalancerClosed):
        lb.route(fn)
    with pytest.raises(lbclient.BalancerClosed):
        lb.add(C)
    with pytest.raises(lbclient.BalancerClosed) as info:
        async with lb:
            pass
    assert isinstance(info.value, RuntimeError)
    assert lb.stats().calls == 0


async def test_in_flight_call_finishes_after_aclose() -> None:
    lb = lbclient.Balancer([A])
    started, release = asyncio.Event(), asyncio.Event()

    @lb.route
    async def fn(endpoint: lbclient.Endpoint) -> str:
        started.set()
        await release.wait()
        return endpoint.url

    task = asyncio.create_task(fn())
    await started.wait()
    await lb.aclose()
    release.set()
    assert await task == A
    assert lb.stats().in_flight == 0


async def test_async_with_balancer() -> None:
    async with lbclient.Balancer([A]) as lb:
        assert isinstance(lb, lbclient.Balancer)
        assert not lb.closed

        @lb.route
        async def fn(endpoint: lbclient.Endpoint) -> str:
            return endpoint.url

        assert await fn() == A
    assert lb.closed
    with pytest.raises(lbclient.BalancerClosed):
        await fn()


@pytest.mark.parametrize(
    "kwargs", [{}, {"key": lambda x: x}, {"timeout": 5.0}, {"retry": True}, {"hedge": True}]
)
def test_route_keeps_name_doc_and_wrapped(kwargs: dict[str, Any]) -> None:
    retry = lbclient.Retry() if kwargs.pop("retry", False) else None
    hedge = lbclient.Hedge() if kwargs.pop("hedge", False) else None
    lb = lbclient.Balancer([A], retry=retry, hedge=hedge)

    async def complete(endpoint: lbclient.Endpoint, x: int) -> str:
        """Ask a replica."""
        return endpoint.url

    wrapped = lb.route(**kwargs)(complete) if kwargs else lb.route(complete)
    assert wrapped.__name__ == "complete"
    assert wrapped.__doc__ == "Ask a replica."
    assert wrapped.__qualname__ == complete.__qualname__
    assert wrapped.__wrapped__ is complete  # type: ignore[attr-defined]


async def test_route_key_sends_the_same_user_to_the_same_endpoint() -> None:
    lb = lbclient.Balancer([A, B, C, "http://10.0.0.4:8000"], strategy="consistent_hash", rng=3)

    @lb.route(key=lambda payload: payload["user"])
    async def complete(endpoint: lbclient.Endpoint, payload: dict[str, str]) -> str:
        await asyncio.sleep(0)
        return endpoint.url

    homes: dict[str, set[str]] = {}
    for _ in range(5):
        for u in range(30):
            user = f"user-{u}"
            homes.setdefault(user, set()).add(await complete({"user": user, "prompt": "hi"}))
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) >= 3  # users spread over the pool
    # keyword arguments reach the key function as well
    assert await complete(payload={"user": "user-0"}) in homes["user-0"]


async def test_route_key_function_gets_the_call_arguments() -> None:
    seen: list[tuple[Any, ...]] = []
    lb = lbclient.Balancer([A], strategy="consistent_hash")

    def key(*args: Any, **kwargs: Any) -> str:
        seen.append((args, kwargs))
        return "k"

    @lb.route(key=key)
    async def fn(endpoint: lbclient.Endpoint, a: int, *, b: int) -> int:
        return a + b

    assert await fn(1, b=2) == 3
    assert seen == [((1,), {"b": 2})]


@pytest.mark.parametrize("face", FACES)
async def test_no_endpoint_available_counts_as_a_failed_call(face: Face) -> None:
    lb = lbclient.Balancer([A])

    async def fn(endpoint: lbclient.Endpoint) -> str:
        return endpoint.url

    run = face(lb, fn)
    lb.drain(A)
    with pytest.raises(lbclient.NoEndpointAvailable):
        await run()
    stats = lb.stats()
    assert stats.calls == 1
    assert stats.calls_failed == 1


@pytest.mark.parametrize("face", FACES)
async def test_every_face_records_the_same_latency_as_observe(face: Face) -> None:
    """The inlined fast path and the generic engine keep the peak-EWMA identically to
    ``EndpointState.observe`` (the reference), on a fake clock."""
    clock = FakeClock()
    lb = lbclient.Balancer([A], clock=clock)
    reference = EndpointState(lbclient.Endpoint(A), now=0.0, decay=10.0, cost=0.05)

    async def fn(endpoint: lbclient.Endpoint, rtt: float) -> None:
        clock.advance(rtt)

    run = face(lb, fn)
    t = 0.0
    for rtt, idle in [(0.5, 0.0), (0.1, 0.0), (0.1, 5.0), (0.02, 30.0), (0.3, 1.0), (0.0, 0.0)]:
        clock.advance(idle)
        t += idle
        await run(rtt)
        t += rtt
        reference.observe(rtt, t)
        state = lb._pool.members[A]
        assert state.cost == pytest.approx(reference.cost, rel=1e-12)
        assert state.ewma(t) == pytest.approx(reference.ewma(t), rel=1e-12)
    assert sorted(lb._pool.members[A].recent_latencies()) == pytest.approx(
        sorted(reference.recent_latencies())
    )
    assert lb.stats().in_flight == 0
