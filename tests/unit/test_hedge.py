"""Hedging: the policy, the latency quantile estimator, the delay, the budget and the
race itself (with fake async functions; the hedge timer is the event loop's real
``call_later``, so the timing tests use small real delays)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Collection, Sequence
from typing import Any

import pytest

import lbclient
from lbclient._errors import ConfigError
from lbclient.engine import hedging as _hedge
from lbclient.engine.hedging import Hedger, LatencyWindow
from lbclient.policies.hedge import Hedge
from lbclient.pool.state import EndpointState
from lbclient.strategies import PickContext
from lbclient.testing import FakeClock

# --------------------------------------------------------------------------- helpers


class _InOrderPicker:
    def __init__(self, states: Sequence[EndpointState]) -> None:
        self._states = tuple(states)

    def pick(self, key: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        for s in self._states:
            if not exclude or s not in exclude:
                return s
        return None


class InOrder:
    """A deterministic strategy: the first endpoint (in pool order) not excluded.

    The primary attempt therefore always goes to the first endpoint, and the backup to
    the first one the hedging code does not exclude -- which exposes its choices."""

    name = "in_order"

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _InOrderPicker:
        return _InOrderPicker(states)


async def _noop(endpoint: lbclient.Endpoint) -> None:
    return None


async def warm_budget(lb: lbclient.Balancer, calls: int = 60) -> None:
    """Fill the hedge budget (it only grows with calls: ``max_extra`` per call)."""
    for _ in range(calls):
        await lb.call(_noop)


class Recorder:
    """A fake async call: records (url, start offset) and sleeps per endpoint."""

    def __init__(self, sleeps: dict[str, float], default: float = 0.0) -> None:
        self.sleeps = sleeps
        self.default = default
        self.t0 = time.monotonic()
        self.started: list[tuple[str, float]] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    @property
    def urls(self) -> list[str]:
        return [u for u, _ in self.started]

    async def __call__(self, endpoint: lbclient.Endpoint, tag: str = "") -> str:
        self.started.append((endpoint.url, time.monotonic() - self.t0))
        try:
            await asyncio.sleep(self.sleeps.get(endpoint.url, self.default))
        except asyncio.CancelledError:
            self.cancelled.append(endpoint.url)
            raise
        self.finished.append(endpoint.url)
        return endpoint.url


async def wait_until(predicate: Any, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


A, B, C, D = (f"http://10.0.0.{i}:8000" for i in range(1, 5))


# ------------------------------------------------------------------------ the policy


@pytest.mark.parametrize(
    ("kwargs", "field", "shown"),
    [
        ({"delay": -1}, "delay", "-1"),
        ({"delay": 0}, "delay", "0"),
        ({"delay": float("nan")}, "delay", "nan"),
        ({"delay": "1"}, "delay", "'1'"),
        ({"max_extra": 0}, "max_extra", "0"),
        ({"max_extra": 1}, "max_extra", "1"),
        ({"max_extra": 1.5}, "max_extra", "1.5"),
        ({"max_extra": True}, "max_extra", "True"),
        ({"quantile": 0}, "quantile", "0"),
        ({"quantile": 1}, "quantile", "1"),
        ({"quantile": -0.5}, "quantile", "-0.5"),
        ({"max_hedges": 0}, "max_hedges", "0"),
        ({"max_hedges": 5}, "max_hedges", "5"),
        ({"max_hedges": 1.0}, "max_hedges", "1.0"),
        ({"warmup": 0}, "warmup", "0"),
        ({"warmup": -3}, "warmup", "-3"),
        ({"window": 8}, "window", "8"),
        ({"window": 65537}, "window", "65537"),
        ({"min_delay": -0.1}, "min_delay", "-0.1"),
        ({"min_delay": None}, "min_delay", "None"),
        ({"initial_delay": 0}, "initial_delay", "0"),
        ({"initial_delay": None}, "initial_delay", "None"),
    ],
)
def test_hedge_config_error_names_field_and_value(
    kwargs: dict[str, Any], field: str, shown: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Hedge(**kwargs)
    message = str(info.value)
    assert field in message
    assert f"got {shown}" in message
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError too


def test_hedge_defaults_and_valid_bounds() -> None:
    h = Hedge()
    assert h.delay is None
    assert h.max_extra == 0.05
    assert h.quantile is None
    assert h.min_delay == 0.005
    assert h.initial_delay == 1.0
    assert h.fence == 2.0
    assert (h.warmup, h.max_hedges, h.window) == (8, 1, 512)
    # the edges that are allowed
    assert Hedge(max_hedges=4).max_hedges == 4
    assert Hedge(window=16).window == 16
    assert Hedge(window=65536).window == 65536
    assert Hedge(warmup=1).warmup == 1
    assert Hedge(min_delay=0).min_delay == 0.0
    assert Hedge(delay=1).delay == 1.0 and isinstance(Hedge(delay=1).delay, float)
    assert repr(Hedge(delay=0.25)) == "lbclient.Hedge(delay=0.25)"


def test_hedger_estimates_tukeys_fence_or_the_quantile_asked_for() -> None:
    # 0.000 .. 0.999 in a random order: p25 = 0.25, p75 = 0.75, so the fence
    # p75 + 2 x IQR is 1.75; with quantile=0.95 the delay is the p95 instead.
    values = [i / 1000 for i in range(1000)]
    random.Random(3).shuffle(values)
    for policy, expected in (
        (Hedge(window=1024, warmup=1), 1.75),
        (Hedge(window=1024, warmup=1, fence=1.0), 1.25),
        (Hedge(window=1024, warmup=1, quantile=0.95), 0.95),
    ):
        hedger = Hedger(policy, FakeClock())
        for v in values[:960]:  # a multiple of 64: the estimate is current
            hedger.window.add(v)
        assert hedger.current_delay() == pytest.approx(expected, abs=0.03)


def test_the_fence_ignores_stragglers_and_hedged_calls_in_the_tail() -> None:
    # 95% of calls near 100 ms, 5% stragglers at 2 s: a p97.5 lands among the
    # stragglers, the fence stays just above the normal calls.
    rng = random.Random(5)
    samples = [0.1 * rng.lognormvariate(0, 0.25) for _ in range(480)] + [2.0] * 32
    rng.shuffle(samples)
    fence, p975 = LatencyWindow(512), LatencyWindow(512, 0.975)
    for x in samples:
        fence.add(x)
        p975.add(x)
    assert fence.value is not None and p975.value is not None
    assert 0.12 < fence.value < 0.25 < 1.5 < p975.value


# -------------------------------------------------------------------- LatencyWindow


def _p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def test_latency_window_follows_the_distribution_and_its_shift() -> None:
    rng = random.Random(11)
    w = LatencyWindow(512, 0.95)
    assert w.value is None
    # 1024 samples of an exponential distribution, mean 50 ms: p95 = -ln(0.05) * 0.05.
    # (Phases are multiples of 64 samples: the estimate is recomputed every 64.)
    for _ in range(1024):
        w.add(rng.expovariate(1 / 0.05))
    true_p95 = 2.9957 * 0.05
    assert w.value is not None
    assert w.value == pytest.approx(true_p95, rel=0.2)
    assert w.count == 1024
    # The load changes: latencies now uniform in [0.5, 1.5] s (p95 = 1.45 s).  Within one
    # window (512 samples) the estimate has followed.
    for _ in range(512):
        w.add(rng.uniform(0.5, 1.5))
    assert w.value == pytest.approx(1.45, abs=0.05)
    # ... and back down: uniform in [0, 10] ms (p95 = 9.5 ms).
    for _ in range(512):
        w.add(rng.uniform(0.0, 0.010))
    assert w.value == pytest.approx(0.0095, abs=0.001)


def test_latency_window_only_counts_the_last_size_samples() -> None:
    w = LatencyWindow(64, 0.5)
    for _ in range(640):
        w.add(100.0)
    for _ in range(64):  # exactly one window of new samples (a multiple of 32)
        w.add(1.0)
    assert w.value == 1.0


def test_latency_window_recomputes_early_then_every_64_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sorts: list[int] = []
    real_sorted = sorted
    w = LatencyWindow(512, 0.95)

    def counting_sorted(*args: Any, **kwargs: Any) -> list[Any]:
        sorts.append(w.count)
        return real_sorted(*args, **kwargs)

    monkeypatch.setattr(_hedge, "sorted", counting_sorted, raising=False)
    for i in range(7):
        w.add(float(i))
    assert w.value is None  # nothing computed yet: no sort on the hot path
    assert sorts == []
    w.add(7.0)  # the 8th sample: a cold window learns as soon as it can
    assert sorts == [8]
    first = w.value
    for _ in range(7):
        w.add(1000.0)  # a huge change, not recomputed until the 16th
    assert w.value == first
    for _ in range(1024 - 15):
        w.add(5.0)
    # 8, 16, 32, 64, then every 64 samples: the hot path sorts once per 64 calls.
    assert sorts == [8, 16, 32, 64, *range(128, 1025, 64)]


# ------------------------------------------------------------------- current_delay


def test_current_delay_is_initial_delay_until_warmup() -> None:
    hedger = Hedger(Hedge(initial_delay=0.7, warmup=64), FakeClock())
    assert hedger.current_delay() == 0.7
    for _ in range(63):
        hedger.window.add(0.1)
    assert hedger.current_delay() == 0.7  # an estimate exists (at 32) but no warmup yet
    hedger.window.add(0.1)  # the 64th
    assert hedger.current_delay() == pytest.approx(0.1)  # the fence of a constant: itself


def test_current_delay_is_the_quantile_floored_at_min_delay() -> None:
    hedger = Hedger(Hedge(min_delay=0.02, warmup=32, quantile=0.975), FakeClock())
    for _ in range(32):
        hedger.window.add(0.001)  # far below the floor
    assert hedger.current_delay() == 0.02
    for i in range(512):
        hedger.window.add(0.1 + i / 10_000)  # 0.1 .. 0.1511
    hedger.window.refresh()  # the periodic recompute runs every 64 samples
    expected = _p([0.1 + i / 10_000 for i in range(512)], 0.975)
    assert hedger.current_delay() == pytest.approx(expected)
    assert hedger.current_delay() > 0.02


def test_fixed_delay_ignores_samples() -> None:
    hedger = Hedger(Hedge(delay=0.25), FakeClock())
    assert hedger.current_delay() == 0.25
    for _ in range(1000):
        hedger.window.add(3.0)
    assert hedger.current_delay() == 0.25


async def test_stats_report_the_current_hedge_delay() -> None:
    lb = lbclient.Balancer([A, B], hedge=Hedge(delay=0.25))
    assert lb.stats().hedge_delay_ms == pytest.approx(250.0)
    assert lbclient.Balancer([A]).stats().hedge_delay_ms is None


# ------------------------------------------------------------------------ the budget


RESERVE = 6  # the hedge budget's reserve: 0.2 backups/s over its 30 s window


async def test_budget_caps_hedges_at_max_extra_of_calls_plus_the_reserve() -> None:
    rec = Recorder({}, default=0.06)  # every call is slow: every call wants a hedge
    lb = lbclient.Balancer([A, B, C, D], hedge=Hedge(delay=0.01, max_extra=0.05))
    calls = 0
    for _ in range(3):
        await asyncio.gather(*(lb.call(rec) for _ in range(40)))
        calls += 40
        st = lb.stats()
        assert st.calls == calls
        assert st.hedges_sent <= 0.05 * calls + RESERVE + 1e-9
        # one timer per call (max_hedges=1): each one either sent or was denied
        assert st.hedges_sent + st.hedges_denied == calls
        assert st.in_flight == 0
    st = lb.stats()
    assert st.hedges_denied > 0
    assert st.hedges_sent == int(0.05 * calls) + RESERVE  # every token was used
    assert len(rec.started) == calls + st.hedges_sent


async def test_a_cold_balancer_can_hedge_its_first_stragglers_but_only_the_reserve() -> None:
    # A cold (or quiet) client has earned no 5% yet: the reserve lets its first
    # stragglers be hedged -- a few, not a doubling of the load.
    rec = Recorder({}, default=0.08)
    lb = lbclient.Balancer([A, B], hedge=Hedge(delay=0.01))
    await lb.call(rec)
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_denied) == (1, 0)
    assert len(rec.started) == 2
    for _ in range(RESERVE + 3):
        await lb.call(rec)
    st = lb.stats()
    assert st.hedges_sent == RESERVE  # 10 calls earn half a token: only the reserve went
    assert st.hedges_denied == 4


# ------------------------------------------------------------------------- the race


async def test_hedge_fires_only_after_the_delay() -> None:
    rec = Recorder({A: 0.3}, default=0.3)
    lb = lbclient.Balancer([A, B, C], strategy=InOrder(), hedge=Hedge(delay=0.05))
    await warm_budget(lb)
    rec.t0 = time.monotonic()
    task = asyncio.create_task(lb.call(rec))
    await asyncio.sleep(0.03)
    if time.monotonic() - rec.t0 < 0.045:  # a loaded machine may oversleep: then skip
        assert rec.urls == [A]
        assert lb.stats().hedges_sent == 0
    await asyncio.sleep(0.1 - (time.monotonic() - rec.t0))
    assert len(rec.started) == 2
    assert rec.urls[0] == A
    assert rec.urls[1] != A
    backup_at = rec.started[1][1] - rec.started[0][1]
    assert backup_at >= 0.045  # not before the delay (timer granularity aside)
    st = lb.stats()
    assert st.hedges_sent == 1
    assert st.in_flight == 2  # both attempts are running
    assert await task in (A, B, C)
    assert lb.stats().in_flight == 0


async def test_backup_wins_and_the_primary_is_cancelled() -> None:
    rec = Recorder({A: 2.0, B: 0.02})
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)
    t0 = time.monotonic()
    result = await lb.call(rec)
    elapsed = time.monotonic() - t0
    assert result == B
    assert elapsed < 1.0  # did not wait for the 2 s primary
    assert rec.cancelled == [A]
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_won, st.in_flight, st.calls_failed) == (1, 1, 0, 0)
    assert st.endpoint(B).hedges_won == 1
    assert st.endpoint(A).failures == 0  # a cancelled loser is not a failure


async def test_primary_wins_and_the_backup_is_cancelled() -> None:
    rec = Recorder({A: 0.1, B: 2.0})
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)
    assert await lb.call(rec) == A
    await wait_until(lambda: rec.cancelled == [B])
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_won, st.in_flight) == (1, 0, 0)


async def test_loser_slot_is_released_when_the_call_returns() -> None:
    rec = Recorder({A: 0.1, B: 2.0})
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)
    assert await lb.call(rec) == A
    st = lb.stats()
    assert st.hedges_sent == 1
    assert st.in_flight == 0


async def test_max_hedges_2_sends_two_backups_on_distinct_endpoints() -> None:
    rec = Recorder({}, default=0.4)
    lb = lbclient.Balancer([A, B, C, D], hedge=Hedge(delay=0.05, max_hedges=2))
    await warm_budget(lb)
    rec.t0 = time.monotonic()
    task = asyncio.create_task(lb.call(rec))
    await wait_until(lambda: len(rec.started) == 3, within=1.0)
    offsets = [t for _, t in rec.started]
    assert offsets[1] - offsets[0] >= 0.045  # first backup after one delay
    assert offsets[2] - offsets[1] >= 0.045  # the second after another one
    assert len(set(rec.urls)) == 3  # three distinct endpoints
    assert lb.stats().in_flight == 3
    await asyncio.sleep(0.15)
    assert len(rec.started) == 3  # never more than max_hedges backups
    await task
    st = lb.stats()
    assert st.hedges_sent == 2
    assert st.in_flight == 0
    await wait_until(lambda: len(rec.cancelled) == 2)


async def test_a_hedge_never_goes_to_an_endpoint_already_tried() -> None:
    # Two endpoints, up to three hedges: only one backup can go anywhere new.
    rec = Recorder({}, default=0.3)
    lb = lbclient.Balancer([A, B], hedge=Hedge(delay=0.03, max_hedges=3))
    await warm_budget(lb)
    before = lb.stats().attempts
    await lb.call(rec)
    assert sorted(rec.urls) == [A, B]
    st = lb.stats()
    assert st.hedges_sent == 1
    assert st.attempts - before == 2  # no phantom request counted on a tried endpoint
    await wait_until(lambda: lb.stats().in_flight == 0)


async def test_a_hedge_never_goes_to_the_tried_endpoint_with_round_robin() -> None:
    # Round robin would, left alone, come back to the primary; the hedge must not.
    async def one(seed: int) -> list[str]:
        rec = Recorder({}, default=0.15)
        lb = lbclient.Balancer(
            [A, B], strategy="round_robin", hedge=Hedge(delay=0.02, max_hedges=2), rng=seed
        )
        await warm_budget(lb)
        await lb.call(rec)
        return rec.urls

    for urls in await asyncio.gather(*(one(seed) for seed in range(6))):
        assert len(urls) == len(set(urls)) == 2


async def test_hedge_prefers_another_zone() -> None:
    # zones a, a, b: the primary is on a1; left alone InOrder would pick a2, but the backup
    # must go to zone b.
    a1 = lbclient.Endpoint(A, zone="a")
    a2 = lbclient.Endpoint(B, zone="a")
    b1 = lbclient.Endpoint(C, zone="b")
    rec = Recorder({}, default=0.2)
    lb = lbclient.Balancer([a1, a2, b1], strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)
    await lb.call(rec)
    assert rec.urls == [A, C]


async def test_hedge_prefers_another_zone_with_the_default_strategy() -> None:
    zones = {A: "a", B: "a", C: "b"}
    eps = [lbclient.Endpoint(u, zone=z) for u, z in zones.items()]
    lb = lbclient.Balancer(eps, hedge=Hedge(delay=0.02, max_extra=0.5), rng=5)
    await warm_budget(lb)
    primaries_in_a = 0
    for _ in range(8):
        rec = Recorder({}, default=0.06)
        await lb.call(rec)
        assert len(rec.urls) == 2
        primary, backup = rec.urls
        assert zones[backup] != zones[primary]
        primaries_in_a += zones[primary] == "a"
    assert primaries_in_a > 0  # the interesting case happened


async def test_hedge_prefers_another_region_when_no_zones() -> None:
    eps = [
        lbclient.Endpoint(A, region="us-east-1"),
        lbclient.Endpoint(B, region="us-east-1"),
        lbclient.Endpoint(C, region="eu-west-1"),
    ]
    rec = Recorder({}, default=0.2)
    lb = lbclient.Balancer(eps, strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)
    await lb.call(rec)
    assert rec.urls == [A, C]


async def test_hedge_in_a_single_zone_pool_goes_to_the_other_endpoint() -> None:
    eps = [lbclient.Endpoint(A, zone="a"), lbclient.Endpoint(B, zone="a")]
    rec = Recorder({}, default=0.2)
    lb = lbclient.Balancer(eps, strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)
    await lb.call(rec)
    assert rec.urls == [A, B]
    assert lb.stats().hedges_sent == 1


async def test_second_hedge_uses_an_untried_endpoint_in_a_tried_zone() -> None:
    eps = [
        lbclient.Endpoint(A, zone="a"),
        lbclient.Endpoint(B, zone="a"),
        lbclient.Endpoint(C, zone="b"),
    ]
    rec = Recorder({}, default=0.3)
    lb = lbclient.Balancer(eps, strategy=InOrder(), hedge=Hedge(delay=0.04, max_hedges=2))
    await warm_budget(lb)
    await lb.call(rec)
    assert rec.urls == [A, C, B]
    assert lb.stats().hedges_sent == 2


async def test_hedge_to_a_failing_endpoint_does_not_fail_the_call() -> None:
    async def fn(endpoint: lbclient.Endpoint) -> str:
        if endpoint.url == A:
            await asyncio.sleep(0.15)
            return "primary"
        raise ConnectionRefusedError("backup down")

    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)
    assert await lb.call(fn) == "primary"
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_won, st.calls_failed, st.in_flight) == (1, 0, 0, 0)
    assert st.endpoint(B).failures == 1


async def test_backup_still_running_can_rescue_a_failed_primary() -> None:
    async def fn(endpoint: lbclient.Endpoint) -> str:
        if endpoint.url == A:
            await asyncio.sleep(0.08)
            raise ConnectionResetError("primary broke")
        await asyncio.sleep(0.1)
        return "backup"

    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)
    assert await lb.call(fn) == "backup"
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_won, st.calls_failed, st.in_flight) == (1, 1, 0, 0)
    assert st.retries == 0


async def test_cancelling_the_caller_mid_hedge_cancels_every_attempt() -> None:
    rec = Recorder({}, default=5.0)
    lb = lbclient.Balancer([A, B, C], hedge=Hedge(delay=0.03, max_hedges=2))
    await warm_budget(lb)
    task = asyncio.create_task(lb.call(rec))
    await wait_until(lambda: len(rec.started) == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: len(rec.cancelled) == 2)
    await asyncio.sleep(0.1)  # the second hedge's timer must not fire after the cancel
    assert len(rec.started) == 2
    st = lb.stats()
    assert st.in_flight == 0
    assert st.calls_failed == 0


async def test_route_timeout_with_a_winning_backup_returns_its_result() -> None:
    rec = Recorder({A: 2.0, B: 0.02})
    lb = lbclient.Balancer([A, B], strategy=InOrder(), hedge=Hedge(delay=0.03))
    await warm_budget(lb)

    @lb.route(timeout=1.0)
    async def call(endpoint: lbclient.Endpoint) -> str:
        return await rec(endpoint)

    assert await call() == B  # the backup's cancel of the primary is not a timeout
    st = lb.stats()
    assert (st.hedges_won, st.calls_failed, st.in_flight) == (1, 0, 0)


async def test_route_deadline_during_a_hedge_cancels_every_attempt() -> None:
    rec = Recorder({}, default=2.0)
    lb = lbclient.Balancer([A, B, C], hedge=Hedge(delay=0.03))
    await warm_budget(lb)

    @lb.route(timeout=0.15)
    async def call(endpoint: lbclient.Endpoint) -> str:
        return await rec(endpoint)

    t0 = time.monotonic()
    with pytest.raises(lbclient.DeadlineExceeded):
        await call()
    assert time.monotonic() - t0 < 1.0
    assert len(rec.started) == 2  # the primary and its backup ...
    await wait_until(lambda: len(rec.cancelled) == 2)  # ... both cancelled
    st = lb.stats()
    assert (st.hedges_sent, st.calls_failed, st.in_flight) == (1, 1, 0)


async def test_lb_call_with_hedge_honours_retry_timeout() -> None:
    rec = Recorder({}, default=1.0)
    lb = lbclient.Balancer([A, B], retry=lbclient.Retry(timeout=0.1), hedge=Hedge(delay=5.0))
    with pytest.raises(lbclient.DeadlineExceeded):
        await asyncio.wait_for(lb.call(rec), 3.0)


async def test_lb_call_without_hedge_honours_retry_timeout() -> None:
    rec = Recorder({}, default=1.0)
    lb = lbclient.Balancer([A, B], retry=lbclient.Retry(timeout=0.1))
    with pytest.raises(lbclient.DeadlineExceeded):
        await asyncio.wait_for(lb.call(rec), 3.0)


def test_latency_window_forgets_samples_older_than_its_horizon() -> None:
    w = LatencyWindow(512, 0.975, every=128, horizon=60.0)
    for _ in range(512):
        w.add(1.0, 0.0)  # a slow period, long ago
    assert w.value == 1.0
    for _ in range(128):
        w.add(0.1, 100.0)  # one block of fast calls, 100 s later
    # By count alone 3/4 of the window would still be the old 1.0 s; by time only the
    # fresh block is left, so the quantile drops at once.
    assert w.value == 0.1
    for _ in range(128):
        w.add(0.2, 110.0)  # within the horizon: both recent blocks count
    assert w.value == 0.2
