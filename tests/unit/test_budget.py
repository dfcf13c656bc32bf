"""Budget: the token bucket shared by retries and hedges."""

from __future__ import annotations

import bisect
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient._errors import ConfigError
from lbclient.policies.budget import Budget
from lbclient.testing._clock import FakeClock


def test_defaults_reserve_is_min_per_second_times_ttl() -> None:
    clock = FakeClock()
    budget = Budget(clock=clock)
    assert (budget.ratio, budget.min_per_second, budget.ttl) == (0.2, 10.0, 10.0)
    assert budget.balance() == 100.0
    assert all(budget.try_withdraw() for _ in range(100))
    assert not budget.try_withdraw()
    assert (budget.deposits, budget.withdrawals, budget.denials) == (0, 100, 1)
    assert budget.balance() == 0.0


def test_ratio_of_deposits() -> None:
    budget = Budget(ratio=0.2, min_per_second=0.0, clock=FakeClock())
    assert not budget.try_withdraw()
    for _ in range(10):
        budget.deposit()
    assert budget.balance() == pytest.approx(2.0)
    assert budget.try_withdraw()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    assert not budget.try_withdraw()
    assert (budget.deposits, budget.withdrawals, budget.denials) == (10, 2, 3)


def test_fractional_ratio_adds_up_exactly() -> None:
    # 0.1 * 30 is 3.0000000000000004 or 2.9999999999999996 depending on the path: the
    # budget must allow exactly 3.
    budget = Budget(ratio=0.1, min_per_second=0.0, clock=FakeClock())
    for _ in range(30):
        budget.deposit()
    assert [budget.try_withdraw() for _ in range(4)] == [True, True, True, False]


def test_deposits_expire_after_ttl_plus_one_slot() -> None:
    clock = FakeClock()
    budget = Budget(ratio=1.0, min_per_second=0.0, ttl=10.0, clock=clock)
    for _ in range(5):
        budget.deposit()
    clock.advance(10.0)
    assert budget.balance() == 5.0  # still within ttl + ttl/10 of slot start
    clock.advance(0.99)
    assert budget.balance() == 5.0
    clock.advance(0.01)  # 11 s: the deposits' slot has left the window
    assert budget.balance() == 0.0
    assert not budget.try_withdraw()


def test_withdrawals_are_returned_after_ttl() -> None:
    clock = FakeClock(start=1000.0)
    budget = Budget(ratio=0.0, min_per_second=1.0, ttl=10.0, clock=clock)
    assert sum(budget.try_withdraw() for _ in range(20)) == 10
    assert budget.denials == 10
    clock.advance(5.0)
    assert not budget.try_withdraw()
    clock.advance(5.0)  # t + ttl: the cap still holds over (t, t + ttl]
    assert not budget.try_withdraw()
    clock.advance(1.0)
    assert budget.balance() == 10.0
    assert budget.try_withdraw()


def test_long_idle_gap_rotates_cleanly() -> None:
    clock = FakeClock()
    budget = Budget(ratio=0.5, min_per_second=0.0, ttl=1.0, clock=clock)
    for _ in range(4):
        budget.deposit()
    assert budget.try_withdraw()
    clock.advance(1e6)
    assert budget.balance() == 0.0
    budget.deposit()
    budget.deposit()
    assert budget.balance() == 1.0


def test_late_deposits_reimburse_earlier_withdrawals() -> None:
    budget = Budget(ratio=0.5, min_per_second=0.0, clock=FakeClock())
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw()
    assert budget.balance() == 0.0
    budget.deposit()
    budget.deposit()
    assert budget.balance() == 1.0


def test_now_argument_skips_the_clock() -> None:
    class CountingClock(FakeClock):
        reads = 0

        def now(self) -> float:
            self.reads += 1
            return super().now()

    clock = CountingClock()
    budget = Budget(ratio=1.0, min_per_second=0.0, ttl=10.0, clock=clock)
    reads = clock.reads
    budget.deposit(0.5)
    budget.deposit(3.0)
    budget.deposit(3.0)
    assert budget.try_withdraw(3.0)
    assert budget.balance(3.0) == 2.0
    assert clock.reads == reads
    assert budget.balance(11.5) == 1.0  # 0.5 expired; 3.0 and the withdrawal still count
    budget.deposit()
    assert clock.reads == reads + 1


def test_time_going_backwards_counts_in_current_slot() -> None:
    budget = Budget(ratio=1.0, min_per_second=0.0, ttl=10.0, clock=FakeClock(start=50.0))
    budget.deposit(now=20.0)
    assert budget.balance(50.0) == 1.0


def test_zero_budget_never_allows() -> None:
    budget = Budget(ratio=0.0, min_per_second=0.0, clock=FakeClock())
    for _ in range(100):
        budget.deposit()
    assert not budget.try_withdraw()
    assert budget.denials == 1


def test_repr() -> None:
    budget = Budget(ratio=0.05, min_per_second=0.0, ttl=10.0, clock=FakeClock())
    assert repr(budget) == "lbclient.Budget(ratio=0.05, min_per_second=0.0, ttl=10.0)"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"ratio": -0.1}, "-0.1"),
        ({"ratio": 1.5}, "1.5"),
        ({"ratio": math.nan}, "nan"),
        ({"ratio": "0.2"}, "'0.2'"),
        ({"ratio": True}, "True"),
        ({"ratio": None}, "None"),
        ({"min_per_second": -1}, "-1"),
        ({"min_per_second": math.inf}, "inf"),
        ({"min_per_second": math.nan}, "nan"),
        ({"min_per_second": "10"}, "'10'"),
        ({"ttl": 0}, "0"),
        ({"ttl": -10.0}, "-10.0"),
        ({"ttl": math.inf}, "inf"),
        ({"ttl": "10s"}, "'10s'"),
        ({"clock": "monotonic"}, "'monotonic'"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        Budget(**kwargs)
    message = str(info.value)
    assert named in message
    assert next(iter(kwargs)) in message


# -- the window invariant, over random histories -----------------------------------------

TTL = 10.0  # 10 slots of exactly 1.0 s; times are multiples of 1/8, so all arithmetic is exact
SLOT = TTL / 10

operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(0, 40).map(lambda n: n / 8)),
        st.tuples(st.just("deposit"), st.integers(1, 30)),
        st.tuples(st.just("withdraw"), st.integers(1, 30)),
    ),
    max_size=80,
)


def _count(times: list[float], lo: float, hi: float, *, lo_open: bool) -> int:
    """How many of the sorted ``times`` lie in (lo, hi] (lo_open) or [lo, hi]."""
    left = bisect.bisect_right(times, lo) if lo_open else bisect.bisect_left(times, lo)
    return bisect.bisect_right(times, hi) - left


@settings(max_examples=300, deadline=None)
@given(
    ops=operations,
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    min_per_second=st.sampled_from([0.0, 0.25, 1.0, 2.0]),
    start=st.sampled_from([0.0, 3.5, 1000.125]),
)
def test_window_invariant(
    ops: list[tuple[str, float]], ratio: float, min_per_second: float, start: float
) -> None:
    clock = FakeClock(start=start)
    budget = Budget(ratio=ratio, min_per_second=min_per_second, ttl=TTL, clock=clock)
    reserve = min_per_second * TTL
    deposits: list[float] = []
    withdrawals: list[float] = []
    denials = 0
    for op, arg in ops:
        if op == "advance":
            clock.advance(arg)
            continue
        for _ in range(int(arg)):
            t = clock.now()
            if op == "deposit":
                budget.deposit()
                deposits.append(t)
                continue
            if budget.try_withdraw():
                withdrawals.append(t)
                # Safety: withdrawals in (t - ttl, t] <= ratio x deposits in the same
                # window widened by one slot + reserve.
                spent = _count(withdrawals, t - TTL, t, lo_open=True)
                earned = _count(deposits, t - TTL - SLOT, t, lo_open=False)
                assert spent <= ratio * earned + reserve + 1e-9
            else:
                denials += 1
                # Liveness: denied only if even the most generous reading of the window
                # (deposits over a full ttl, withdrawals one slot wider) had no token left.
                spent = _count(withdrawals, t - TTL - SLOT, t, lo_open=True)
                earned = _count(deposits, t - TTL, t, lo_open=False)
                assert ratio * earned + reserve - spent < 1 + 1e-9
    assert budget.deposits == len(deposits)
    assert budget.withdrawals == len(withdrawals)
    assert budget.denials == denials
    assert budget.balance() >= 0.0
