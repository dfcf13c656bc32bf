"""Hedged requests against real HTTP replicas on loopback (`ReplicaFleet` + aiohttp):
the tail gets cut, the budget holds, losers are cancelled on the server side and no
in-flight slot leaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient.pool.state import EndpointState
from lbclient.strategies import PickContext
from lbclient.testing import ReplicaConfig, ReplicaFleet

CHAT = "/v1/chat/completions"
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


class _InOrderPicker:
    def __init__(self, states: Sequence[EndpointState]) -> None:
        self._states = tuple(states)

    def pick(self, key: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        for s in self._states:
            if not exclude or s not in exclude:
                return s
        return None


class InOrder:
    """Deterministic strategy: the first endpoint (pool order) not excluded, so the
    primary always goes to replica 0 and a backup / retry to the next one."""

    name = "in_order"

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _InOrderPicker:
        return _InOrderPicker(states)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # A generous client timeout turns a stuck request into a failure, not a hung run.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def wait_until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def _noop(endpoint: lbclient.Endpoint) -> None:
    return None


async def warm_budget(lb: lbclient.Balancer, calls: int = 60) -> None:
    """The hedge budget starts empty and grows by ``max_extra`` per call."""
    for _ in range(calls):
        await lb.call(_noop)


def make_complete(lb: lbclient.Balancer, http: aiohttp.ClientSession) -> Callable[[], Any]:
    @lb.route
    async def complete(endpoint: lbclient.Endpoint) -> str:
        async with http.post(endpoint.url + CHAT, json=BODY) as resp:
            resp.raise_for_status()
            await resp.json()
            return resp.headers["x-replica"]

    return complete


async def run_load(fn: Callable[[], Any], calls: int, concurrency: int) -> list[float]:
    """``calls`` calls from ``concurrency`` workers; returns each call's latency."""
    latencies: list[float] = []
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            await fn()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def lb_idle(lb: lbclient.Balancer) -> bool:
    st = lb.stats()
    return st.in_flight == 0 and all(e.in_flight == 0 for e in st.endpoints)


def fleet_idle(fleet: ReplicaFleet) -> bool:
    t = fleet.totals()
    return t.in_flight == 0 and t.received == t.finished


STRAGGLERS = {"straggler_rate": 0.05, "straggler_factor": 20.0, "base_latency": 0.01}


async def _straggler_run(
    fleet_factory: Any, http: aiohttp.ClientSession, hedge: lbclient.Hedge | None
) -> tuple[list[float], lbclient.Balancer, ReplicaFleet]:
    fleet = await fleet_factory([ReplicaConfig(**STRAGGLERS) for _ in range(6)], seed=1)
    lb = lbclient.Balancer(fleet.urls, hedge=hedge, rng=1)
    complete = make_complete(lb, http)
    await run_load(complete, 40, 4)  # warm up: connections, EWMAs, the hedge budget
    latencies = await run_load(complete, 400, 4)
    return latencies, lb, fleet


async def test_hedging_cuts_the_straggler_tail(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    plain, lb0, fleet0 = await _straggler_run(fleet_factory, http, None)
    # Adaptive: hedge past the p90 of recent latency, so the delay follows the machine's
    # own speed (a loaded CI box included); the budget leaves room above that 10 %, and
    # a second backup covers the rare backup that straggles too.
    max_extra = 0.2
    hedged, lb, fleet = await _straggler_run(
        fleet_factory, http, lbclient.Hedge(quantile=0.9, max_extra=max_extra, max_hedges=2)
    )
    assert len(plain) == len(hedged) == 400
    # Without hedging, ~5 % of calls take ~20x longer: the p99 is a straggler's.
    assert p99(plain) > 0.1
    # With hedging the stragglers are overtaken by a backup after 30 ms.
    st = lb.stats()
    assert p99(hedged) < p99(plain) / 2, (
        p99(hedged),
        p99(plain),
        st.hedges_sent,
        st.hedges_denied,
        st.hedge_delay_ms,
        sorted(hedged)[-8:],
    )
    st = lb.stats()
    assert st.calls == 440
    assert st.calls_failed == 0
    assert st.hedges_sent > 0
    assert st.hedges_won > 0
    assert st.hedges_sent <= max_extra * st.calls + 6  # the budget (and its reserve) held
    # the adaptive delay has left its 1 s cold-start value and tracks the latency
    assert st.hedge_delay_ms is not None and st.hedge_delay_ms < 500
    assert lb0.stats().hedges_sent == 0
    # The losers were cancelled: the replicas saw the client go away, and nothing leaks.
    await wait_until(lambda: fleet.total_cancelled > 0)
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))
    assert fleet0.total_cancelled == 0
    totals = fleet.totals()
    # hedges are the only extra requests (a backup cancelled early may never arrive)
    assert st.calls <= totals.received <= st.attempts
    assert totals.errors == totals.dropped == 0


async def test_sustained_hedging_stays_within_max_extra(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    # A 5 ms hedge delay: nearly every call wants a hedge, far more than the 5 % budget.
    fleet = await fleet_factory([ReplicaConfig(**STRAGGLERS) for _ in range(6)], seed=2)
    lb = lbclient.Balancer(fleet.urls, hedge=lbclient.Hedge(delay=0.005), rng=2)
    complete = make_complete(lb, http)
    for _ in range(4):
        await run_load(complete, 100, 12)
        st = lb.stats()
        # 5% of calls, plus the budget's reserve of 6 per 30 s
        assert st.hedges_sent <= 0.05 * st.calls + 6, (st.hedges_sent, st.calls)
    st = lb.stats()
    assert st.calls == 400
    assert st.calls_failed == 0
    assert st.hedges_sent >= 10  # the budget was used ...
    assert st.hedges_denied > 100  # ... and it, not the demand, set the limit
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))
    totals = fleet.totals()
    assert totals.received <= st.calls + st.hedges_sent  # the extra load really is capped


async def test_cancelling_the_caller_mid_hedge_cancels_every_attempt(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [ReplicaConfig(base_latency=2.0, sigma=0.0) for _ in range(3)], seed=3
    )
    lb = lbclient.Balancer(fleet.urls, hedge=lbclient.Hedge(delay=0.05, max_hedges=2))
    await warm_budget(lb)
    complete = make_complete(lb, http)
    task = asyncio.create_task(complete())
    await wait_until(lambda: fleet.total_in_flight == 2)  # the primary and one backup
    assert lb.stats().hedges_sent == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))
    assert fleet.total_cancelled == 2
    await asyncio.sleep(0.1)  # the second hedge (due at 0.1 s) must never be sent
    st = lb.stats()
    assert st.hedges_sent == 1
    assert fleet.total_received == 2
    assert st.in_flight == 0
    assert st.calls_failed == 0


async def test_a_failing_hedge_does_not_fail_the_call(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    # Replica 0 is slow but fine; the backup goes to replica 1, which is down.
    fleet = await fleet_factory(
        [ReplicaConfig(base_latency=0.3, sigma=0.0), ReplicaConfig(down=True)], seed=4
    )
    lb = lbclient.Balancer(fleet.urls, strategy=InOrder(), hedge=lbclient.Hedge(delay=0.05))
    await warm_budget(lb)
    complete = make_complete(lb, http)
    assert await complete() == "replica-0"
    st = lb.stats()
    assert (st.hedges_sent, st.hedges_won, st.calls_failed) == (1, 0, 0)
    assert st.endpoint(fleet.urls[1]).failures == 1  # the hedge did fail
    assert st.endpoint(fleet.urls[0]).failures == 0
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))
    assert fleet[0].counters.served == 1


async def test_primary_failing_before_the_hedge_delay_is_retried(
    fleet_factory: Any, http: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [
            ReplicaConfig(base_latency=0.001, error_rate=1.0),  # fails fast with a 500
            ReplicaConfig(base_latency=0.01),
        ],
        seed=5,
    )
    lb = lbclient.Balancer(
        fleet.urls,
        strategy=InOrder(),
        retry=lbclient.Retry(attempts=3, backoff=0.001, max_backoff=0.002),
        hedge=lbclient.Hedge(delay=0.2),
    )
    await warm_budget(lb)  # a hedge would be allowed: it is the retry that must run
    complete = make_complete(lb, http)
    assert await complete() == "replica-1"
    st = lb.stats()
    assert st.retries >= 1
    assert st.hedges_sent == 0
    assert st.calls_failed == 0
    assert fleet[0].counters.errors == 1
    assert fleet[1].counters.served == 1
    await wait_until(lambda: lb_idle(lb) and fleet_idle(fleet))
