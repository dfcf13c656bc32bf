"""CostPolicy, endpoint prices and the spend ledger (reserve, then settle)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lbclient
from lbclient.admission.spend import Ledger
from lbclient.policies.cost import Price


def _ep(**meta: Any) -> lbclient.Endpoint:
    return lbclient.Endpoint("http://a", metadata=meta)


def test_prices_from_metadata() -> None:
    assert Price.of(_ep()) is None
    p = Price.of(_ep(price_per_1k_input=0.5, price_per_1k_output=1.5))
    assert p is not None
    assert p.cost(10.0, (1000, 2000)) == pytest.approx(0.5 + 3.0)  # no time price
    both = Price.of(_ep(price_per_1k_tokens=2.0))
    assert both is not None and both.per_1k_input == both.per_1k_output == 2.0
    gpu = Price.of(_ep(price_per_hour=3.6, slots=4))
    assert gpu is not None and gpu.per_second == pytest.approx(0.00025)
    assert gpu.cost(8.0, None) == pytest.approx(0.002)
    # a reservation holds the dearer token price; picking compares the blend
    assert p.worst(1000, 0) == pytest.approx(1.5)
    assert p.expected(1000, 0, 0.25) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"price_per_hour": -1}, "price_per_hour"),
        ({"price_per_1k_input": "cheap"}, "price_per_1k_input"),
        ({"price_per_1k_output": math.inf}, "price_per_1k_output"),
        ({"price_per_hour": 1.0, "slots": 0}, "slots"),
    ],
)
def test_bad_prices_fail_at_construction(meta: dict[str, Any], match: str) -> None:
    with pytest.raises(lbclient.ConfigError, match=match):
        lbclient.Balancer([_ep(**meta)], cost=lbclient.CostPolicy())
    lbclient.Balancer([_ep(**meta)])  # without a cost policy, metadata is not read


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ceiling": 0}, "ceiling"),
        ({"ceiling": -5}, "ceiling"),
        ({"period": 0}, "period"),
        ({"latency_factor": 0.9}, "latency_factor"),
        ({"estimate_tokens": -1}, "estimate_tokens"),
        ({"estimate_seconds": 0}, "estimate_seconds"),
        ({"output_share": 2}, "output_share"),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(lbclient.ConfigError, match=match):
        lbclient.CostPolicy(**kwargs)


def test_cost_must_be_an_instance() -> None:
    with pytest.raises(lbclient.ConfigError, match=r"cost=lbclient.CostPolicy\(\)"):
        lbclient.Balancer(["http://a"], cost=lbclient.CostPolicy)  # type: ignore[arg-type]
    with pytest.raises(lbclient.ConfigError, match="needs a cost policy"):
        lbclient.Balancer(["http://a"]).spend()


def test_reserve_settle_refund_and_shed() -> None:
    led = Ledger(lbclient.CostPolicy(ceiling=1.0, period=60))
    a = led.reserve(0.4, 100, now=0.0)
    b = led.reserve(0.4, 100, now=0.0)
    assert led.reserved == pytest.approx(0.8) and led.in_flight == 2
    with pytest.raises(lbclient.Overloaded) as info:
        led.reserve(0.4, 100, now=10.0)  # 0.8 held + 0.4 > 1.0
    assert info.value.reason == "budget"
    assert info.value.retry_after == pytest.approx(50.0)  # the period ends at 60 s
    assert led.shed == 1
    price = Price(per_1k_input=1.0, per_1k_output=1.0)
    att = a.attempt("http://a", price, 0.0)
    att.usage, att.ok, att.end = (100, 50), True, 1.0
    assert led.settle(a, 1.0) == pytest.approx(0.15)
    assert led.settle(a, 1.0) == 0.0  # once
    assert led.settle(b, 2.0) == 0.0  # never ran: refunded in full
    assert led.reserved == 0.0 and led.in_flight == 0
    assert led.spent == pytest.approx(0.15) and led.by_endpoint == {"http://a": 0.15}
    led.reserve(0.8, 100, now=3.0)  # fits again
    # the next period starts afresh; the reservation still in flight counts there
    led2 = Ledger(lbclient.CostPolicy(ceiling=1.0, period=60))
    held = led2.reserve(0.9, 10, now=0.0)
    with pytest.raises(lbclient.Overloaded):
        led2.reserve(0.2, 10, now=61.0)
    led2.settle(held, 62.0)
    led2.reserve(0.2, 10, now=63.0)
    assert led2.history[-1] == (0.0, 0.0)


def test_an_attempt_without_usage_costs_its_estimate() -> None:
    led = Ledger(lbclient.CostPolicy(ceiling=10.0))
    c = led.reserve(1.0, 500, now=0.0)
    att = c.attempt("http://a", Price(per_1k_input=1.0, per_1k_output=2.0), 0.0)
    att.ok, att.end = True, 0.5
    failed = c.attempt("http://b", Price(per_1k_input=1.0, per_1k_output=2.0), 0.0)
    failed.end = 0.2  # failed, no usage: token-priced providers bill nothing
    timed = c.attempt("http://c", Price(per_hour=36.0), 0.0)
    timed.end = 2.0  # a time-priced attempt costs its time, whatever the outcome
    assert led.settle(c, 2.0) == pytest.approx(500 * 2.0 / 1000 + 2.0 * 0.01)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.floats(0.01, 2.0), st.floats(0.0, 1.0), st.booleans()),
        min_size=1,
        max_size=60,
    ),
    ceiling=st.floats(0.5, 20.0),
)
def test_spend_never_passes_the_ceiling_when_estimates_hold(
    ops: list[tuple[float, float, bool]], ceiling: float
) -> None:
    """Reserve-then-settle: however calls interleave, with real costs within their
    reservations, spent + reserved never passes the ceiling."""
    led = Ledger(lbclient.CostPolicy(ceiling=ceiling, period=1e9))
    open_: list[tuple[Any, float]] = []
    now = 0.0
    for amount, share, settle_first in ops:
        now += 1.0
        if settle_first and open_:
            charge, real = open_.pop(0)
            if real > 0:
                a = charge.attempt("http://a", Price(per_hour=3600.0), now - real)
                a.end = now  # costs `real`: 1 per second at 3600/h
            led.settle(charge, now)
        with contextlib.suppress(lbclient.Overloaded):
            open_.append((led.reserve(amount, 0, now), amount * share))
        assert led.spent + led.reserved <= ceiling + 1e-9
    for charge, _ in open_:
        led.settle(charge, now)
    assert led.spent <= ceiling + 1e-9 and led.max_overshoot <= 1e-9


async def test_a_cost_policy_and_a_fallback_pool_together() -> None:
    """Each pool meters its own calls: the primary's budget sheds (``Overloaded``), so
    the call falls back; the fallback's spend is its own, the primary's ledger settles."""
    vendor = lbclient.Balancer(
        [lbclient.Endpoint("http://vendor", metadata={"price_per_1k_tokens": 1.0})],
        cost=lbclient.CostPolicy(),
        name="vendor",
    )
    lb = lbclient.Balancer(
        [lbclient.Endpoint("http://own", metadata={"price_per_1k_tokens": 1.0})],
        cost=lbclient.CostPolicy(ceiling=1.5, period=3600.0),
        fallback=vendor,
    )

    async def fn(endpoint: lbclient.Endpoint) -> str:
        lbclient.report_usage(1000, 0)
        return endpoint.url

    @lb.route(tokens=lambda: 1000)
    async def routed(endpoint: lbclient.Endpoint) -> str:
        return await fn(endpoint)

    assert await lb.call(fn, tokens=1000) == "http://own"  # 1.0 of 1.5 spent
    assert await lb.call(fn, tokens=1000) == "http://vendor"  # 1.0 more would pass it

    @lb.route(tokens=lambda: 1000)
    async def streamed(endpoint: lbclient.Endpoint) -> AsyncIterator[str]:
        lbclient.report_usage(1000, 0)
        yield endpoint.url

    assert await routed() == "http://vendor"
    assert [chunk async for chunk in streamed()] == ["http://vendor"]
    async with lb.pick(tokens=1000) as endpoint:
        assert endpoint.url == "http://vendor"
        lbclient.report_usage(1000, 0)
    with pytest.raises(lbclient.Overloaded):
        await lb.call(fn, tokens=1000, fallback=False)
    own, theirs = lb.spend(), vendor.spend()
    assert own.spent == pytest.approx(1.0) and own.reserved == 0 and own.in_flight == 0
    assert own.shed == 5 and own.by_endpoint == {"http://own": pytest.approx(1.0)}
    assert theirs.calls == 4 and theirs.by_endpoint == {"http://vendor": pytest.approx(4.0)}
    assert theirs.reserved == 0 and theirs.in_flight == 0
    await lb.aclose()
    await vendor.aclose()
