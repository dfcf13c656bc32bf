"""Per-endpoint :class:`lbclient.Limits` and eligibility (``eligible=``,
``metadata["max_context"]``): pick-time filters.

The windows are driven with a :class:`FakeClock`; picks go through the public entries
(``lb.pick``, ``@lb.route``, ``lb.call``) on a strategy that always prefers the first
endpoint it may use, so each test knows where a call would go without its filters.
"""

from __future__ import annotations

import asyncio
import math
import random
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import InOrder

import lbclient
from lbclient.pool.limits import LimitState, Window
from lbclient.shared.counter import FleetCounter
from lbclient.testing import FakeClock

A, B, C = "http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"


def limited(url: str, **limits: Any) -> lbclient.Endpoint:
    return lbclient.Endpoint(url, limits=lbclient.Limits(**limits))


# =========================================================================================
# Configuration
# =========================================================================================


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({}, "Limits needs max_in_flight, requests_per_minute or tokens_per_minute"),
        ({"max_in_flight": 0}, r"max_in_flight must be an int >= 1 or None, got 0"),
        ({"max_in_flight": 1.5}, r"max_in_flight must be an int >= 1 or None, got 1.5"),
        ({"max_in_flight": True}, r"max_in_flight .* got True"),
        ({"requests_per_minute": -1}, r"requests_per_minute must be a finite number > 0"),
        ({"tokens_per_minute": math.inf}, r"tokens_per_minute .* got inf"),
        ({"tokens_per_minute": "10k"}, r"tokens_per_minute .* got '10k'"),
    ],
)
def test_limits_reject_a_bad_value_naming_it(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(lbclient.ConfigError, match=pattern):
        lbclient.Limits(**kwargs)


def test_limits_repr_and_endpoint_equality() -> None:
    limits = lbclient.Limits(max_in_flight=4, tokens_per_minute=90_000)
    assert repr(limits) == "lbclient.Limits(max_in_flight=4, tokens_per_minute=90000)"
    ep = lbclient.Endpoint(A, limits=limits)
    assert "limits=lbclient.Limits(max_in_flight=4" in repr(ep)
    assert ep != lbclient.Endpoint(A)  # sync() sees a change of limits
    assert ep == lbclient.Endpoint(
        A, limits=lbclient.Limits(max_in_flight=4, tokens_per_minute=9e4)
    )


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        (lbclient.Limits, r"not the class"),
        ({"max_in_flight": 2}, r"limits must be an lbclient.Limits or None, got \{"),
    ],
)
def test_endpoint_limits_must_be_a_limits(value: object, pattern: str) -> None:
    with pytest.raises(lbclient.ConfigError, match=pattern):
        lbclient.Endpoint(A, limits=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, -5, "8k", True, math.nan])
def test_max_context_must_be_a_positive_number(value: object) -> None:
    with pytest.raises(lbclient.ConfigError, match=r"max_context.* must be a number of tokens"):
        lbclient.Endpoint(A, metadata={"max_context": value})


# =========================================================================================
# The windows, on a fake clock
# =========================================================================================


def test_window_slides_and_says_when_room_comes_back() -> None:
    w = Window(span=60.0)
    w.add(0.0, 400)
    w.add(10.0, 400)
    w.add(20.0, 200)
    assert w.expire(30.0) == 1000
    assert w.room_at(30.0, limit=1000, need=700) == 70.0  # the 400 of t=10 must go too
    assert w.room_at(30.0, limit=1000, need=300) == 60.0
    assert w.room_at(30.0, limit=1000, need=0) == 60.0  # exactly full: nothing more fits
    assert w.expire(60.0) == 600  # the entry of t=0 left exactly at t=60
    assert w.expire(80.0) == 0 and not w.entries


def test_a_settled_charge_replaces_the_estimate_while_in_the_window() -> None:
    w = Window()
    charge = w.add(0.0, 1000)
    w.settle(charge, 120, now=5.0)
    assert w.total == 120
    w.expire(61.0)
    w.settle(charge, 5000, now=61.0)  # already gone: nothing to settle
    assert w.total == 0


def test_limit_state_full_and_free_at() -> None:
    clock = FakeClock()
    lb = lbclient.Balancer([limited(A, max_in_flight=2, requests_per_minute=3)], clock=clock)
    s = lb._pool.members[A]
    lim = s.limit
    assert isinstance(lim, LimitState)
    assert not lim.full(s, 0.0, None)
    leases = [lb._pool.acquire(None, None, clock.now()) for _ in range(2)]
    assert lim.full(s, 0.0, None)  # two in flight
    assert lim.free_at(s, 0.0, None) == math.inf  # only an ending call can free it
    leases[0].ok(1.0)
    clock.advance(1.0)
    assert not lim.full(s, 1.0, None)
    lb._pool.acquire(None, None, clock.now()).ok(2.0)  # the third request of the minute
    assert lim.full(s, 2.0, None)
    assert lim.free_at(s, 2.0, None) == 60.0
    assert "3/3 requests in the last minute" in lim.describe(s, 2.0)


class FakeShared:
    """What :meth:`LimitState.share` asks of the fleet link: counters, whose syncs a
    test plays by hand (``counter.synced``), and the link's (peers, connected?)."""

    def __init__(self, peers: int = 1, lag: float = 0.5) -> None:
        self.peers = peers
        self.connected = True
        self.lag = lag
        self.counters: dict[str, FleetCounter] = {}

    def counter(self, name: str, window: float) -> FleetCounter:
        assert window == 60.0
        c = FleetCounter(name, window, lambda: (self.peers, self.connected), lag=self.lag)
        self.counters[name] = c
        return c


def fleet_limit(shared: FakeShared, **limits: Any) -> tuple[LimitState, Any]:
    lim = LimitState(lbclient.Limits(**limits))
    lim.share(shared, A)  # type: ignore[arg-type]
    return lim, SimpleNamespace(inflight=0)


def admit(lim: LimitState, s: Any, now: float, tokens: float | None = None) -> int:
    """Charge calls at ``now`` while the limit lets them; how many it let."""
    n = 0
    while not lim.full(s, now, tokens) and n < 10_000:
        lim.charge(now, tokens)
        n += 1
    return n


def test_without_shared_state_a_limit_has_no_fleet_part() -> None:
    lim = LimitState(lbclient.Limits(requests_per_minute=5, tokens_per_minute=10))
    assert lim.fleet_requests is None and lim.fleet_tokens is None


def test_fleet_requests_count_the_others_synced_usage_in_a_sliding_window() -> None:
    shared = FakeShared()
    lim, s = fleet_limit(shared, requests_per_minute=30)
    c = shared.counters[f"limit:rpm:{A}"]
    c.synced(7, 25.0, 0.0)  # the others sent 25 in server window 7
    assert admit(lim, s, 1.0) == 5  # 25 + 5 = the limit
    assert c.pending == 5  # sent with the next sync
    sent = c.take()
    c.synced(7, 30.0, sent)  # Redis took this process's 5: the others' part is still 25
    assert lim.full(s, 2.0, None)
    assert "30/30 requests in the last minute across the fleet (5 from this process)" in (
        lim.describe(s, 2.0)
    )
    assert lim.free_at(s, 2.0, None) == 61.0  # the first 5 (local, t=1) and 25 (seen t=1)
    c.synced(8, 4.0, 0.0)  # a new server window: the others' 4 are all new
    assert lim.fleet_requests is not None
    assert lim.fleet_requests.read(3.0) == 29.0
    c.synced(8, 2.0, 0.0)  # a peer's settlement lowered it: taken back from the newest
    assert lim.fleet_requests.read(4.0) == 27.0
    # A minute after t=1 only the 2 seen at t=3 are left: 28 more fit here.
    assert admit(lim, s, 61.5) == 28


def test_fleet_tokens_settle_into_the_counter() -> None:
    shared = FakeShared()
    lim, s = fleet_limit(shared, tokens_per_minute=1000)
    c = shared.counters[f"limit:tpm:{A}"]
    charge = lim.charge(0.0, 600.0)
    assert charge is not None and c.pending == 600
    lim.settle(charge, 100.0, 1.0)
    assert c.pending == 100  # the correction goes to the fleet too
    c.synced(1, 800.0, c.take())  # the others used 700
    assert lim.full(s, 2.0, 300.0) and not lim.full(s, 2.0, 200.0)


def test_others_unsynced_usage_is_estimated_from_this_process_s_recent_usage() -> None:
    shared = FakeShared(peers=3, lag=0.5)
    lim, s = fleet_limit(shared, requests_per_minute=30)
    # Nothing from the others yet: a burst here stops at a third, assuming each of the
    # two others sent as much in the time a sync takes to tell.
    assert admit(lim, s, 0.0) == 10
    assert lim.free_at(s, 0.0, None) == 0.5
    # Once that has passed (and still nothing seen from them), a third of what is left
    # (20 / 3, the last call admitted while 10 + 6 + 2 x 6 + 1 fit).
    assert admit(lim, s, 0.6) == 7


def test_redis_unreachable_each_process_keeps_to_limit_over_peers() -> None:
    shared = FakeShared(peers=3)
    lim, s = fleet_limit(shared, requests_per_minute=30)
    shared.connected = False
    assert admit(lim, s, 0.0) == 10
    assert lim.free_at(s, 0.0, None) == 60.0
    c = shared.counters[f"limit:rpm:{A}"]
    assert c.pending == 10
    assert admit(lim, s, 61.0) == 10  # the window slid
    assert c.pending == 10  # what left the window is not sent to Redis when it is back


# =========================================================================================
# Picking around limits
# =========================================================================================


async def test_an_endpoint_at_max_in_flight_is_not_picked_while_another_can_take_the_call(
    clock: FakeClock,
) -> None:
    lb = lbclient.Balancer([limited(A, max_in_flight=1), B], strategy=InOrder(), clock=clock)
    async with lb.pick() as first, lb.pick() as second:
        assert (first.url, second.url) == (A, B)
    async with lb.pick() as third:
        assert third.url == A


async def test_all_at_their_limits_without_admission_fails_fast_saying_when(
    clock: FakeClock,
) -> None:
    lb = lbclient.Balancer(
        [limited(A, requests_per_minute=2), limited(B, requests_per_minute=1)],
        strategy=InOrder(),
        clock=clock,
    )
    for _ in range(2):
        async with lb.pick():
            pass
        clock.advance(10.0)
    async with lb.pick() as ep:
        assert ep.url == B  # A used its two requests of the minute
    clock.advance(5.0)  # t = 25
    with pytest.raises(lbclient.NoEndpointAvailable) as info:
        async with lb.pick():
            pass
    err = info.value
    assert err.reason == "limits"
    assert err.retry_after == pytest.approx(35.0)  # A's first request leaves the window at 60
    assert "at its limits" in str(err) and "2/2 requests in the last minute" in str(err)
    clock.advance(35.0)
    async with lb.pick() as ep:
        assert ep.url == A


async def test_the_fast_path_respects_max_in_flight(clock: FakeClock) -> None:
    lb = lbclient.Balancer([limited(A, max_in_flight=2), B], strategy=InOrder(), clock=clock)
    release = asyncio.Event()
    served: list[str] = []

    @lb.route
    async def call(endpoint: lbclient.Endpoint) -> None:
        served.append(endpoint.url)
        await release.wait()

    tasks = [asyncio.create_task(call()) for _ in range(4)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sorted(served) == [A, A, B, B]
    release.set()
    await asyncio.gather(*tasks)
    assert lb.stats().endpoint(A).in_flight == 0


async def test_the_fast_path_without_room_anywhere_raises_no_endpoint_available(
    clock: FakeClock,
) -> None:
    lb = lbclient.Balancer([limited(A, max_in_flight=1)], clock=clock)
    release = asyncio.Event()

    @lb.route
    async def call(endpoint: lbclient.Endpoint) -> None:
        await release.wait()

    held = asyncio.create_task(call())
    await asyncio.sleep(0)
    with pytest.raises(lbclient.NoEndpointAvailable, match="1/1 in flight") as info:
        await call()
    assert info.value.reason == "limits"
    assert info.value.retry_after is not None  # about one call's time
    release.set()
    await held
    assert lb.stats().failed_by["no endpoint"] == 1


async def test_with_admission_a_call_waits_for_a_slot_and_is_woken_when_one_frees(
    clock: FakeClock,
) -> None:
    lb = lbclient.Balancer(
        [limited(A, max_in_flight=1)],
        admission=lbclient.Admission(limit=10, max_wait=30.0),
        clock=clock,
    )
    release = asyncio.Event()
    order: list[str] = []

    @lb.route
    async def call(endpoint: lbclient.Endpoint, name: str) -> None:
        order.append(name)
        if name == "first":
            await release.wait()

    first = asyncio.create_task(call("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(call("second"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["first"]  # waiting, not failed, not sent
    assert not second.done()
    release.set()  # the first ends: its slot goes to the waiter at once (no clock advance)
    await asyncio.wait_for(asyncio.gather(first, second), 2.0)
    assert order == ["first", "second"]


async def test_with_admission_a_call_waits_out_a_requests_window(clock: FakeClock) -> None:
    lb = lbclient.Balancer(
        [limited(A, requests_per_minute=1)],
        admission=lbclient.Admission(limit=10, max_wait=120.0),
        clock=clock,
    )
    async with lb.pick():
        pass
    clock.advance(20.0)
    waiting = asyncio.create_task(lb.call(_url))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    clock.advance(39.0)  # t = 59: still full
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    clock.advance(1.0)  # t = 60: the first request leaves the window
    assert await asyncio.wait_for(waiting, 2.0) == A


async def test_with_admission_a_call_waiting_too_long_for_a_slot_is_shed(clock: FakeClock) -> None:
    lb = lbclient.Balancer(
        [limited(A, requests_per_minute=1)],
        admission=lbclient.Admission(limit=10, max_wait=5.0),
        clock=clock,
    )
    async with lb.pick():
        pass
    waiting = asyncio.create_task(lb.call(_url))
    for _ in range(5):
        await asyncio.sleep(0)
    clock.advance(5.0)
    with pytest.raises(lbclient.Overloaded, match=r"shed \(limits\)") as info:
        await asyncio.wait_for(waiting, 2.0)
    assert info.value.reason == "limits"
    assert info.value.retry_after == pytest.approx(55.0)  # at t=5, the window frees at 60
    stats = lb.stats()
    assert stats.admission is not None and stats.admission.shed["limits"] == 1
    assert stats.failed_by["shed: limits"] == 1


async def _url(endpoint: lbclient.Endpoint) -> str:
    return endpoint.url


async def test_tokens_per_minute_counts_estimates_and_settles_them_with_usage(
    clock: FakeClock,
) -> None:
    lb = lbclient.Balancer([limited(A, tokens_per_minute=1000), B], strategy=InOrder(), clock=clock)

    async def answer(endpoint: lbclient.Endpoint, used: tuple[int, int] | None) -> str:
        if used is not None:
            lbclient.report_usage(*used)
        return endpoint.url

    assert await lb.call(answer, None, tokens=600) == A
    assert await lb.call(answer, None, tokens=600) == B  # 1200 > 1000 in A's minute
    clock.advance(61.0)
    assert await lb.call(answer, (50, 50), tokens=600) == A  # really used 100
    assert await lb.call(answer, None, tokens=600) == A  # 100 + 600 fit
    assert await lb.call(answer, None, tokens=1500) == B  # more than A's minute alone
    window = lb._pool.members[A].limit.tokens  # type: ignore[union-attr]
    assert window is not None and window.total == 700


async def test_limits_follow_sync_and_keep_their_windows(clock: FakeClock) -> None:
    lb = lbclient.Balancer([limited(A, requests_per_minute=5)], clock=clock)
    for _ in range(3):
        async with lb.pick():
            pass
    lb.sync([limited(A, requests_per_minute=3)])  # lowered: already at it
    with pytest.raises(lbclient.NoEndpointAvailable, match="3/3 requests"):
        async with lb.pick():
            pass
    lb.sync([A])  # limits dropped: no filter left
    assert lb._pool.limited == 0
    async with lb.pick() as ep:
        assert ep.url == A


async def test_removing_the_last_limited_endpoint_turns_the_filters_off() -> None:
    lb = lbclient.Balancer([limited(A, max_in_flight=1), B])
    assert lb._pool.limited == 1
    lb.remove(A)
    assert lb._pool.limited == 0


# =========================================================================================
# Eligibility
# =========================================================================================

MODELS = [
    lbclient.Endpoint(A, metadata={"model": "small", "tier": 1}),
    lbclient.Endpoint(B, metadata={"model": "big", "tier": 2}),
    lbclient.Endpoint(C, metadata={"model": "big", "tier": 1}),
]


async def test_route_eligible_filters_endpoints_per_call_by_metadata() -> None:
    lb = lbclient.Balancer(MODELS, strategy="round_robin")

    @lb.route(eligible=lambda ep, model: ep.metadata["model"] == model)
    async def complete(endpoint: lbclient.Endpoint, model: str) -> str:
        return endpoint.url

    big = {await complete("big") for _ in range(60)}
    assert big == {B, C}
    assert {await complete("small") for _ in range(20)} == {A}
    with pytest.raises(lbclient.NoEndpointAvailable) as info:
        await complete("huge")
    assert info.value.reason == "ineligible"
    assert "no endpoint is eligible for this call: of 3 pickable, 3 refused by the call's" in str(
        info.value
    )


async def test_eligible_is_asked_only_about_the_candidates_a_pick_looks_at() -> None:
    lb = lbclient.Balancer([f"http://10.0.1.{i}:8000" for i in range(50)], strategy="power_of_two")
    asked: list[str] = []

    def eligible(ep: lbclient.Endpoint) -> bool:
        asked.append(ep.url)
        return True

    async with lb.pick(eligible=eligible):
        pass
    assert len(asked) == 2  # P2C compares two: the other 48 are never asked


async def test_a_refused_endpoint_is_never_reused_as_a_last_resort() -> None:
    lb = lbclient.Balancer(MODELS, retry=lbclient.Retry(attempts=3), strategy=InOrder())
    seen: list[str] = []

    async def flaky(endpoint: lbclient.Endpoint) -> str:
        seen.append(endpoint.url)
        if len(seen) < 3:
            raise ConnectionError("refused")
        return endpoint.url

    big = lambda ep: ep.metadata["model"] == "big"  # noqa: E731
    assert await lb.call(flaky, eligible=big) == B
    assert seen == [B, C, B]  # retries go to untried eligible ones, then reuse -- never A


async def test_calls_skip_endpoints_whose_context_window_is_too_small() -> None:
    lb = lbclient.Balancer(
        [
            lbclient.Endpoint(A, metadata={"max_context": 8192}),
            lbclient.Endpoint(B, metadata={"max_context": 128_000}),
            C,  # no known window: any size goes
        ],
        strategy=InOrder(),
    )

    async def where(endpoint: lbclient.Endpoint) -> str:
        return endpoint.url

    assert await lb.call(where, tokens=8000) == A
    assert await lb.call(where, tokens=9000) == B
    assert await lb.call(where) == A  # no estimate: no check
    lb.remove(C)
    with pytest.raises(lbclient.NoEndpointAvailable) as info:
        await lb.call(where, tokens=200_000)
    assert info.value.reason == "ineligible"
    assert "2 with a max_context below the call's 200000 estimated tokens" in str(info.value)


async def test_route_tokens_and_eligibility_work_on_streams() -> None:
    lb = lbclient.Balancer(MODELS, strategy=InOrder())

    @lb.route(eligible=lambda ep, tier: ep.metadata["tier"] >= tier)
    async def stream(endpoint: lbclient.Endpoint, tier: int) -> Any:
        yield endpoint.url

    assert [x async for x in stream(2)] == [B]
    assert [x async for x in stream(1)] == [A]


def test_without_filters_routes_keep_their_fast_variant() -> None:
    lb = lbclient.Balancer([A, B])

    async def fn(endpoint: lbclient.Endpoint) -> None:
        return None

    assert lb.route(fn).__code__.co_qualname.startswith("_fast.")
    filtered = lb.route(eligible=lambda ep: True)(fn)
    assert filtered.__code__.co_qualname.startswith("_full.")


@pytest.mark.parametrize("value", [42, int])
async def test_eligible_must_be_callable(value: object) -> None:
    lb = lbclient.Balancer([A])
    with pytest.raises(lbclient.ConfigError, match="eligible"):
        lb.pick(eligible=value)  # type: ignore[arg-type]
    with pytest.raises(lbclient.ConfigError, match="eligible"):
        await lb.call(_url, eligible=value)  # type: ignore[arg-type]
    with pytest.raises(lbclient.ConfigError, match="route eligible must be a callable"):
        lb.route(eligible=value)(_url)  # type: ignore[arg-type]


# =========================================================================================
# A property: whatever the mix, no pick goes where it may not
# =========================================================================================


@st.composite
def pools(draw: st.DrawFn) -> list[lbclient.Endpoint]:
    n = draw(st.integers(min_value=1, max_value=6))
    out = []
    for i in range(n):
        limits = draw(
            st.one_of(
                st.none(),
                st.builds(
                    lbclient.Limits,
                    max_in_flight=st.one_of(st.none(), st.integers(1, 3)),
                    requests_per_minute=st.integers(1, 6),
                ),
            )
        )
        context = draw(st.one_of(st.none(), st.sampled_from([500, 2000, 8000])))
        out.append(
            lbclient.Endpoint(
                f"http://10.0.2.{i}:8000",
                limits=limits,
                metadata={"max_context": context, "tier": i % 3} if context else {"tier": i % 3},
            )
        )
    return out


@settings(max_examples=80, deadline=None)
@given(
    pools(),
    st.sampled_from(["peak_ewma", "power_of_two", "round_robin", "least_connections", "random"]),
    st.lists(
        st.tuples(
            st.sampled_from(["pick", "end", "wait"]), st.integers(0, 4000), st.integers(0, 2)
        ),
        max_size=60,
    ),
    st.integers(0, 2**16),
)
def test_no_pick_goes_to_a_refused_or_full_endpoint(
    endpoints: list[lbclient.Endpoint],
    strategy: str,
    ops: list[tuple[str, int, int]],
    seed: int,
) -> None:
    clock = FakeClock()
    lb = lbclient.Balancer(endpoints, strategy=strategy, clock=clock, rng=seed)
    pool = lb._pool
    held = []
    rng = random.Random(seed)
    for op, tokens, tier in ops:
        if op == "wait":
            clock.advance(tokens / 100)
            continue
        if op == "end" and held:
            held.pop(rng.randrange(len(held))).ok(clock.now())
            continue
        call = lbclient.CallContext(tokens=float(tokens))
        call.eligible = lambda ep, tier=tier: ep.metadata["tier"] >= tier  # type: ignore[misc]
        now = clock.now()
        may = [
            s
            for s in pool.members.values()
            if s.endpoint.metadata["tier"] >= tier
            and (s.max_context is None or tokens <= s.max_context)
            and (s.limit is None or not s.limit.full(s, now, float(tokens)))
        ]
        try:
            lease = pool.acquire(call, None, now)
        except lbclient.NoEndpointAvailable as exc:
            assert not may, (exc, may)
            assert exc.reason in ("limits", "ineligible")
            continue
        assert lease.state in may
        held.append(lease)
    for lease in held:
        lease.ok(clock.now())
    assert all(s.inflight == 0 for s in pool.members.values())
