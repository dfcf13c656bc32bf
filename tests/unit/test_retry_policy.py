"""Retry: the frozen policy and its pure decisions (no event loop needed)."""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
from collections.abc import Mapping
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbclient._errors import BalancerClosed, ConfigError, DeadlineExceeded
from lbclient.policies.budget import Budget
from lbclient.policies.classify import DEFAULT_RETRY_ON, Classifier, retry_after, retry_if_status
from lbclient.policies.retry import Retry, RetryDecision
from lbclient.testing._clock import FakeClock


class _Response:
    def __init__(self, status_code: int, headers: Mapping[str, str]) -> None:
        self.status_code = status_code
        self.headers = dict(headers)


class APIStatusError(Exception):  # shaped like openai's
    def __init__(self, status_code: int, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"Error code: {status_code}")
        self.status_code = status_code
        self.response = _Response(status_code, headers or {})


class MaxRandom(random.Random):
    """uniform(a, b) returns b: exposes the backoff ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


def rng() -> random.Random:
    return random.Random(1234)


# -- construction ------------------------------------------------------------------------


def test_defaults_and_repr() -> None:
    policy = Retry()
    assert policy == Retry(attempts=3)
    assert (policy.attempts, policy.backoff, policy.max_backoff) == (3, 0.025, 1.0)
    assert policy.retry_on is DEFAULT_RETRY_ON
    assert policy.respect_retry_after is True
    assert policy.max_retry_after == 30.0
    assert (policy.budget_ratio, policy.budget_min_per_second) == (0.2, 10.0)
    assert policy.timeout is None
    assert repr(policy) == (
        "lbclient.Retry(attempts=3, backoff=0.025, max_backoff=1.0, "
        "retry_on=lbclient.DEFAULT_RETRY_ON, respect_retry_after=True, max_retry_after=30.0, "
        "budget_ratio=0.2, budget_min_per_second=10.0, timeout=None)"
    )


def test_keyword_only_frozen_and_evolvable() -> None:
    with pytest.raises(TypeError):
        Retry(3)  # type: ignore[call-arg]
    policy = Retry(attempts=2, timeout=5)
    assert policy.timeout == 5.0 and isinstance(policy.timeout, float)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.attempts = 5  # type: ignore[misc]
    assert attrs.evolve(policy, attempts=1).attempts == 1
    with pytest.raises(ConfigError):
        attrs.evolve(policy, attempts=0)


def test_retry_on_is_converted() -> None:
    assert isinstance(Retry(retry_on=ConnectionError).retry_on, Classifier)
    assert Retry(retry_on=(KeyError, ValueError)).retry_on(KeyError())
    assert Retry(retry_on=lambda e: "busy" in str(e)).retry_on(RuntimeError("busy"))
    on_503 = retry_if_status(503)
    assert Retry(retry_on=on_503).retry_on is on_503


def test_infinite_max_retry_after_is_allowed() -> None:
    assert Retry(max_retry_after=math.inf).max_retry_after == math.inf


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"attempts": 0}, "0"),
        ({"attempts": -1}, "-1"),
        ({"attempts": 2.0}, "2.0"),
        ({"attempts": True}, "True"),
        ({"attempts": "3"}, "'3'"),
        ({"backoff": -0.1}, "-0.1"),
        ({"backoff": math.nan}, "nan"),
        ({"backoff": math.inf, "max_backoff": math.inf}, "inf"),
        ({"backoff": "25ms"}, "'25ms'"),
        ({"max_backoff": -1.0}, "-1.0"),
        ({"max_backoff": 0.01}, "0.01"),  # below backoff 0.025
        ({"retry_on": 503}, "503"),
        ({"retry_on": "ConnectionError"}, "'ConnectionError'"),
        ({"retry_on": asyncio.CancelledError}, "CancelledError"),
        ({"respect_retry_after": 1}, "1"),
        ({"respect_retry_after": "yes"}, "'yes'"),
        ({"max_retry_after": -1}, "-1"),
        ({"max_retry_after": math.nan}, "nan"),
        ({"max_retry_after": None}, "None"),
        ({"budget_ratio": 1.2}, "1.2"),
        ({"budget_ratio": -0.2}, "-0.2"),
        ({"budget_min_per_second": -10}, "-10"),
        ({"budget_min_per_second": math.inf}, "inf"),
        ({"timeout": 0}, "0"),
        ({"timeout": -5.0}, "-5.0"),
        ({"timeout": math.inf}, "inf"),
        ({"timeout": "30s"}, "'30s'"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        Retry(**kwargs)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)


# -- backoff -----------------------------------------------------------------------------


def test_backoff_ceiling_doubles_then_caps() -> None:
    policy = Retry(attempts=10)
    ceilings = [policy.backoff_for(n, MaxRandom()) for n in range(1, 9)]
    assert ceilings == [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_huge_retry_number_is_the_cap() -> None:
    assert Retry().backoff_for(10_000, MaxRandom()) == 1.0
    assert Retry(backoff=0.0, max_backoff=0.0).backoff_for(10_000, MaxRandom()) == 0.0


def test_backoff_rejects_retry_number_below_one() -> None:
    with pytest.raises(ValueError, match="0"):
        Retry().backoff_for(0, rng())


def test_backoff_is_jittered_and_seeded() -> None:
    policy = Retry()
    draws = [policy.backoff_for(3, random.Random(7)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    spread = {policy.backoff_for(3, r) for r in [random.Random(s) for s in range(50)]}
    assert len(spread) == 50


@given(
    base=st.floats(0.0, 10.0),
    extra=st.floats(0.0, 100.0),
    retry_number=st.integers(1, 2000),
    seed=st.integers(0, 2**32),
)
def test_backoff_bounds(base: float, extra: float, retry_number: int, seed: int) -> None:
    policy = Retry(backoff=base, max_backoff=base + extra)
    delay = policy.backoff_for(retry_number, random.Random(seed))
    ceiling = min(base + extra, base * 2.0 ** min(retry_number - 1, 1000))
    assert 0.0 <= delay <= ceiling


# -- decide ------------------------------------------------------------------------------


def test_retryable_error_is_retried_with_backoff() -> None:
    decision = Retry().decide(ConnectionResetError(), 1, elapsed=0.1, rng=MaxRandom())
    assert decision == RetryDecision(retry=True, delay=0.025, reason="retry")
    decision = Retry().decide(APIStatusError(502), 2, rng=MaxRandom())
    assert decision == RetryDecision(retry=True, delay=0.05, reason="retry")


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad"),
        APIStatusError(400),
        APIStatusError(401),
        APIStatusError(404),
        asyncio.CancelledError(),
        KeyboardInterrupt(),
        DeadlineExceeded(10.0),
    ],
)
def test_not_retryable(error: BaseException) -> None:
    decision = Retry().decide(error, 1, rng=rng())
    assert decision == RetryDecision(retry=False, delay=0.0, reason="not retryable")


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_retried(status: int) -> None:
    assert Retry().decide(APIStatusError(status), 1, rng=rng()).retry


def test_cancelled_and_deadline_never_retried_even_if_classifier_says_so() -> None:
    greedy = Retry(retry_on=lambda e: True)
    everything = Retry(retry_on=BaseException)
    for policy in (greedy, everything):
        for error in (asyncio.CancelledError(), DeadlineExceeded(1.0), BalancerClosed()):
            assert policy.decide(error, 1, rng=rng()).reason == "not retryable"
        assert policy.decide(ValueError(), 1, rng=rng()).retry


def test_attempts_exhausted() -> None:
    policy = Retry(attempts=3)
    assert policy.decide(ConnectionError(), 2, rng=rng()).retry
    assert policy.decide(ConnectionError(), 3, rng=rng()) == RetryDecision(
        retry=False, delay=0.0, reason="attempts exhausted"
    )
    assert Retry(attempts=1).decide(ConnectionError(), 1, rng=rng()).reason == (
        "attempts exhausted"
    )


def test_classification_comes_before_attempts() -> None:
    assert Retry(attempts=1).decide(ValueError(), 1, rng=rng()).reason == "not retryable"


# Retry-After is not a sleep any more: the pool cools the endpoint that sent it (see
# test_retry_engine.py) and the retry goes elsewhere after the ordinary backoff.  The
# policy's decision no longer looks at it; ``retry_after()`` parses it for the pool.


def test_retry_after_seconds_does_not_change_the_decision() -> None:
    error = APIStatusError(429, {"Retry-After": "2"})
    decision = Retry().decide(error, 1, rng=MaxRandom())
    assert decision == RetryDecision(retry=True, delay=0.025, reason="retry")
    assert retry_after(error) == 2.0  # what the pool cools the endpoint for


def test_backoff_wins_when_longer_than_retry_after() -> None:
    error = APIStatusError(503, {"Retry-After": "0"})
    decision = Retry(backoff=0.5).decide(error, 1, rng=MaxRandom())
    assert decision == RetryDecision(retry=True, delay=0.5, reason="retry")


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    error = APIStatusError(503, {"Retry-After": email.utils.formatdate(now + 5, usegmt=True)})
    assert retry_after(error, now_wall=now) == 5.0
    decision = Retry().decide(error, 1, rng=MaxRandom())
    assert decision == RetryDecision(retry=True, delay=0.025, reason="retry")


def test_retry_after_too_long_is_still_a_plain_retry() -> None:
    # Longer than max_retry_after: the pool caps the endpoint's cooldown; the decision
    # is the same as without the header (never "retry-after too long" any more).
    error = APIStatusError(429, {"Retry-After": "120"})
    assert Retry().decide(error, 1, rng=MaxRandom()) == RetryDecision(
        retry=True, delay=0.025, reason="retry"
    )
    assert Retry(max_retry_after=120.0).decide(error, 1, rng=MaxRandom()).delay == 0.025
    reasons = {
        Retry(attempts=a, timeout=t).decide(error, n, elapsed=e, rng=rng()).reason
        for a in (1, 3)
        for t in (None, 0.01, 10.0)
        for n in (1, 2, 3)
        for e in (0.0, 5.0)
    }
    assert reasons <= {"retry", "attempts exhausted", "deadline"}


def test_retry_after_ignored_when_not_respected() -> None:
    error = APIStatusError(429, {"Retry-After": "120"})
    decision = Retry(respect_retry_after=False).decide(error, 1, rng=MaxRandom())
    assert decision == RetryDecision(retry=True, delay=0.025, reason="retry")


def test_retry_after_ignored_on_other_statuses() -> None:
    error = APIStatusError(500, {"Retry-After": "120"})
    assert Retry().decide(error, 1, rng=MaxRandom()).delay == 0.025
    assert retry_after(error) is None


def test_decide_takes_no_wall_clock() -> None:
    error = APIStatusError(503, {"Retry-After": "1"})
    with pytest.raises(TypeError):
        Retry().decide(error, 1, rng=rng(), now_wall=0.0)  # type: ignore[call-arg]


def test_deadline_from_timeout_and_elapsed() -> None:
    policy = Retry(timeout=1.0, backoff=0.5, max_backoff=0.5)
    error = APIStatusError(503)
    assert policy.decide(error, 1, elapsed=0.4, rng=MaxRandom()).retry
    assert policy.decide(error, 1, elapsed=0.5, rng=MaxRandom()) == RetryDecision(
        retry=False, delay=0.0, reason="deadline"
    )
    assert policy.decide(ConnectionError(), 1, elapsed=1.5, rng=rng()).reason == "deadline"


def test_deadline_left_from_caller_and_tightest_wins() -> None:
    error = APIStatusError(503)
    policy = Retry(backoff=0.5, max_backoff=0.5)
    assert not policy.decide(error, 1, deadline_left=0.5, rng=MaxRandom()).retry
    assert policy.decide(error, 1, deadline_left=0.6, rng=MaxRandom()).retry
    tight = Retry(timeout=10.0).decide(error, 1, elapsed=0.0, deadline_left=0.01, rng=MaxRandom())
    assert tight.reason == "deadline"
    tight = Retry(timeout=1.0).decide(error, 1, elapsed=0.99, deadline_left=30.0, rng=MaxRandom())
    assert tight.reason == "deadline"


def test_backoff_reaching_the_deadline_gives_up() -> None:
    policy = Retry(backoff=1.0, max_backoff=1.0)
    assert policy.decide(ConnectionError(), 1, deadline_left=1.0, rng=MaxRandom()).reason == (
        "deadline"
    )
    assert policy.decide(ConnectionError(), 1, deadline_left=1.01, rng=MaxRandom()).retry
    assert Retry().decide(ConnectionError(), 1, deadline_left=0.0, rng=rng()).reason == ("deadline")


def test_decide_is_deterministic_given_the_rng() -> None:
    policy = Retry()
    first = policy.decide(ConnectionError(), 2, rng=random.Random(99))
    second = policy.decide(ConnectionError(), 2, rng=random.Random(99))
    assert first == second and 0.0 <= first.delay <= 0.05


# -- budget ------------------------------------------------------------------------------


def test_make_budget_uses_policy_and_clock() -> None:
    clock = FakeClock()
    budget = Retry(budget_ratio=0.5, budget_min_per_second=0.0).make_budget(clock)
    assert isinstance(budget, Budget)
    assert (budget.ratio, budget.min_per_second, budget.ttl) == (0.5, 0.0, 10.0)
    budget.deposit()
    budget.deposit()
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    clock.advance(11.0)
    assert budget.balance() == 0.0


def test_make_budget_defaults_are_finagles() -> None:
    budget = Retry().make_budget(FakeClock())
    assert (budget.ratio, budget.min_per_second, budget.ttl) == (0.2, 10.0, 10.0)
    assert budget.balance() == 100.0
