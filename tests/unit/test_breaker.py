"""The Breaker policy and the BreakerState machine, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient._errors import ConfigError
from lbclient.observe.events import BreakerEvent
from lbclient.policies.breaker import (
    CLOSED,
    HALF_OPEN,
    NOT_PROBE,
    OPEN,
    Breaker,
    BreakerState,
    default_is_failure,
)
from lbclient.testing._clock import FakeClock

URL = "http://10.0.0.1:8000"


def always(exc: BaseException) -> bool:
    return True


def make(
    *, seed: int = 0, emit: bool = True, **kw: Any
) -> tuple[BreakerState, list[BreakerEvent], FakeClock]:
    kw.setdefault("jitter", 0.0)
    kw.setdefault("is_failure", always)
    events: list[BreakerEvent] = []
    state = BreakerState(
        Breaker(**kw), URL, rng=random.Random(seed), emit=events.append if emit else None
    )
    return state, events, FakeClock(100.0)


def fail(state: BreakerState, clock: FakeClock, n: int = 1) -> None:
    for _ in range(n):
        assert state.available(clock.now())
        probe = state.on_pick(clock.now())
        state.on_failure(clock.now(), probe)


def succeed(state: BreakerState, clock: FakeClock, n: int = 1) -> None:
    for _ in range(n):
        assert state.available(clock.now())
        probe = state.on_pick(clock.now())
        state.on_success(clock.now(), probe)


def trip(state: BreakerState, clock: FakeClock) -> float:
    """Open a closed breaker by consecutive failures; return its cooldown."""
    assert state.state == CLOSED
    fail(state, clock, state.policy.failures)
    assert state.state == OPEN
    return state.reopen_at - state.opened_at


def to_half_open(state: BreakerState, clock: FakeClock) -> None:
    assert state.state == OPEN
    clock.advance(state.reopen_at - clock.now())
    assert state.available(clock.now())
    assert state.state == HALF_OPEN


# -- transitions -------------------------------------------------------------------------


def test_starts_closed_and_available() -> None:
    state, events, clock = make()
    assert state.state == CLOSED
    assert state.available(clock.now())
    assert state.on_pick(clock.now()) == NOT_PROBE
    assert state.next_change(clock.now()) is None
    assert (state.trips, state.consecutive_failures, state.probes_in_flight) == (0, 0, 0)
    assert state.last_failure_at == -math.inf
    assert events == []


def test_consecutive_failures_open_the_circuit() -> None:
    state, events, clock = make(failures=5, cooldown=5.0)
    fail(state, clock, 4)
    assert state.state == CLOSED
    assert state.consecutive_failures == 4
    fail(state, clock)
    assert state.state == OPEN
    assert state.trips == 1
    assert state.opened_at == 100.0
    assert state.reopen_at == 105.0
    assert state.last_failure_at == 100.0
    assert events == [
        BreakerEvent(URL, CLOSED, OPEN, 100.0, "5 consecutive failures", 5, 5.0),
    ]
    assert events[0].level == logging.WARNING


def test_success_resets_the_failure_run() -> None:
    state, _, clock = make(failures=3)
    fail(state, clock, 2)
    succeed(state, clock)
    assert state.consecutive_failures == 0
    fail(state, clock, 2)
    assert state.state == CLOSED
    fail(state, clock)
    assert state.state == OPEN


def test_a_single_failure_can_trip_with_failures_1() -> None:
    state, events, clock = make(failures=1)
    fail(state, clock)
    assert state.state == OPEN
    assert events[0].reason == "1 consecutive failure"


def test_open_is_unavailable_until_the_cooldown_elapses() -> None:
    state, events, clock = make(cooldown=5.0)
    trip(state, clock)
    assert state.next_change(clock.now()) == 105.0
    clock.advance(4.999)
    assert not state.available(clock.now())
    assert state.state == OPEN
    clock.advance(0.001)
    assert state.available(clock.now())
    assert state.state == HALF_OPEN
    assert state.next_change(clock.now()) is None
    assert events[-1] == BreakerEvent(
        URL, OPEN, HALF_OPEN, clock.now(), "cooldown 5.0 s elapsed", 5, None
    )
    assert events[-1].level == logging.INFO


def test_probe_success_closes() -> None:
    state, events, clock = make()
    trip(state, clock)
    to_half_open(state, clock)
    probe = state.on_pick(clock.now())
    assert probe != NOT_PROBE
    assert state.probes_in_flight == 1
    assert not state.available(clock.now())  # the one probe slot is taken
    clock.advance(0.5)
    state.on_success(clock.now(), probe)
    assert state.state == CLOSED
    assert state.probes_in_flight == 0
    assert state.consecutive_failures == 0
    assert state.available(clock.now())
    assert events[-1] == BreakerEvent(URL, HALF_OPEN, CLOSED, 105.5, "probe succeeded", 5, None)
    assert [e.new for e in events] == [OPEN, HALF_OPEN, CLOSED]


def test_probe_failure_reopens_with_a_longer_cooldown() -> None:
    state, events, clock = make(cooldown=5.0, multiplier=2.0)
    trip(state, clock)
    to_half_open(state, clock)
    probe = state.on_pick(clock.now())
    state.on_failure(clock.now(), probe)
    assert state.state == OPEN
    assert state.trips == 2
    assert state.probes_in_flight == 0
    assert state.consecutive_failures == 6
    assert state.reopen_at - state.opened_at == 10.0
    assert events[-1] == BreakerEvent(URL, HALF_OPEN, OPEN, 105.0, "probe failed", 6, 10.0)


def test_probe_ignored_frees_the_slot_without_a_verdict() -> None:
    state, events, clock = make()
    trip(state, clock)
    to_half_open(state, clock)
    probe = state.on_pick(clock.now())
    assert not state.available(clock.now())
    state.on_ignored(clock.now(), probe)
    assert state.state == HALF_OPEN
    assert state.probes_in_flight == 0
    assert state.available(clock.now())
    assert len(events) == 2
    state.on_ignored(clock.now(), probe)  # a second release is harmless
    assert state.probes_in_flight == 0


def test_ignored_outcomes_while_closed_change_nothing() -> None:
    state, events, clock = make(failures=2)
    fail(state, clock)
    state.on_ignored(clock.now(), state.on_pick(clock.now()))
    assert state.consecutive_failures == 1
    assert state.state == CLOSED
    assert events == []


# -- growth, jitter, reset ---------------------------------------------------------------


def reopen_cycle(state: BreakerState, clock: FakeClock) -> float:
    """From open: wait for half-open, fail the probe, return the new cooldown."""
    to_half_open(state, clock)
    state.on_failure(clock.now(), state.on_pick(clock.now()))
    assert state.state == OPEN
    return state.reopen_at - state.opened_at


def test_cooldown_grows_and_is_capped_without_jitter() -> None:
    state, _, clock = make(cooldown=5.0, multiplier=2.0, max_cooldown=60.0)
    cooldowns = [trip(state, clock)] + [reopen_cycle(state, clock) for _ in range(6)]
    assert cooldowns == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


def test_multiplier_one_keeps_the_cooldown_flat() -> None:
    state, _, clock = make(cooldown=3.0, multiplier=1.0)
    cooldowns = [trip(state, clock)] + [reopen_cycle(state, clock) for _ in range(4)]
    assert cooldowns == [3.0] * 5


@pytest.mark.parametrize("seed", [0, 1, 7, 1234])
def test_jittered_cooldowns_stay_within_bounds(seed: int) -> None:
    policy: dict[str, Any] = dict(cooldown=5.0, multiplier=2.0, max_cooldown=60.0, jitter=0.1)
    state, _, clock = make(seed=seed, **policy)
    cooldowns = [trip(state, clock)] + [reopen_cycle(state, clock) for _ in range(9)]
    bases = [5.0, 10.0, 20.0, 40.0] + [60.0] * 6
    for cooldown, base in zip(cooldowns, bases, strict=True):
        assert base * 0.9 <= cooldown <= base * 1.1
    assert max(cooldowns) <= 60.0 * 1.1
    assert len(set(cooldowns)) == len(cooldowns)  # really jittered
    # Same seed, same cooldowns: the randomness is only the injected rng.
    again, _, clock2 = make(seed=seed, **policy)
    assert [trip(again, clock2)] + [reopen_cycle(again, clock2) for _ in range(9)] == cooldowns


def test_growth_resets_after_a_healthy_closed_period() -> None:
    state, _, clock = make(cooldown=5.0, max_cooldown=60.0)  # reset_after None -> 60 s
    assert state.policy.reset_period == 60.0
    trip(state, clock)
    assert reopen_cycle(state, clock) == 10.0
    to_half_open(state, clock)
    state.on_success(clock.now(), state.on_pick(clock.now()))
    assert state.state == CLOSED
    clock.advance(59.0)  # not healthy for long enough: the growth continues
    assert trip(state, clock) == 20.0
    to_half_open(state, clock)
    state.on_success(clock.now(), state.on_pick(clock.now()))
    clock.advance(60.0)  # healthy for reset_after: back to the base cooldown
    assert trip(state, clock) == 5.0
    assert state.streak == 1
    assert state.trips == 4


def test_explicit_reset_after() -> None:
    state, _, clock = make(cooldown=1.0, reset_after=2.0)
    assert state.policy.reset_period == 2.0
    trip(state, clock)
    to_half_open(state, clock)
    state.on_success(clock.now(), state.on_pick(clock.now()))
    clock.advance(2.0)
    assert trip(state, clock) == 1.0


def test_huge_multiplier_does_not_overflow() -> None:
    state, _, clock = make(cooldown=1.0, multiplier=1e300, max_cooldown=10.0)
    cooldowns = [trip(state, clock)] + [reopen_cycle(state, clock) for _ in range(5)]
    assert cooldowns == [1.0] + [10.0] * 5
    assert Breaker(multiplier=1e300, max_cooldown=10.0).base_cooldown(5000) == 10.0


# -- half-open probe limit and stale outcomes ---------------------------------------------


def test_half_open_probe_limit() -> None:
    state, events, clock = make(half_open_probes=2)
    trip(state, clock)
    to_half_open(state, clock)
    now = clock.now()
    first = state.on_pick(now)
    assert state.available(now)
    second = state.on_pick(now)
    assert first == second != NOT_PROBE
    assert state.probes_in_flight == 2
    assert not state.available(now)  # a third concurrent pick is refused
    # A pick anyway (panic mode ignores availability) is an ordinary call, not a probe.
    assert state.on_pick(now) == NOT_PROBE
    assert state.probes_in_flight == 2
    state.on_ignored(now, first)
    assert state.probes_in_flight == 1
    assert state.available(now)
    state.on_success(now, second)
    assert state.state == CLOSED
    assert [e.new for e in events] == [OPEN, HALF_OPEN, CLOSED]


def test_late_probe_after_sibling_closed_counts_as_ordinary_outcome() -> None:
    state, events, clock = make(half_open_probes=2, failures=1)
    trip(state, clock)
    to_half_open(state, clock)
    a, b = state.on_pick(clock.now()), state.on_pick(clock.now())
    state.on_success(clock.now(), a)
    assert state.state == CLOSED
    state.on_failure(clock.now(), b)  # the replica still fails: that counts while closed
    assert state.state == OPEN
    assert [e.reason for e in events][-1] == "1 consecutive failure"


def test_stale_non_probe_calls_do_not_decide_half_open() -> None:
    state, events, clock = make()
    # Five calls go out while closed; their failures trip it; a sixth is still in flight.
    tokens = [state.on_pick(clock.now()) for _ in range(6)]
    assert tokens == [NOT_PROBE] * 6
    for token in tokens[:5]:
        state.on_failure(clock.now(), token)
    assert state.state == OPEN
    to_half_open(state, clock)
    state.on_success(clock.now(), tokens[5])  # sent before the cooldown: no verdict
    assert state.state == HALF_OPEN
    state.on_failure(clock.now(), NOT_PROBE)  # a stale failure does not reopen either
    assert state.state == HALF_OPEN
    assert state.last_failure_at == clock.now()
    assert state.consecutive_failures == 5
    assert state.available(clock.now())  # and the probe slot is still free
    assert len(events) == 2


def test_stale_outcomes_while_open_change_nothing() -> None:
    state, events, clock = make()
    trip(state, clock)
    reopen_at = state.reopen_at
    state.on_success(clock.now(), NOT_PROBE)
    state.on_failure(clock.now(), None)  # None is accepted as "not a probe" too
    state.on_ignored(clock.now(), NOT_PROBE)
    assert (state.state, state.reopen_at, state.trips) == (OPEN, reopen_at, 1)
    assert len(events) == 1


def test_probe_from_an_earlier_episode_is_stale() -> None:
    state, events, clock = make()
    trip(state, clock)
    to_half_open(state, clock)
    old_probe = state.on_pick(clock.now())
    assert state.force_open(clock.now())  # health check fails mid-probe
    to_half_open(state, clock)
    new_probe = state.on_pick(clock.now())
    assert new_probe != old_probe
    state.on_success(clock.now(), old_probe)  # must neither close nor free the slot
    assert state.state == HALF_OPEN
    assert state.probes_in_flight == 1
    state.on_failure(clock.now(), old_probe)
    assert state.state == HALF_OPEN
    state.on_success(clock.now(), new_probe)
    assert state.state == CLOSED
    assert [(e.old, e.new) for e in events] == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_only_the_int_token_counts_as_a_probe() -> None:
    state, _, clock = make()
    trip(state, clock)
    to_half_open(state, clock)
    probe = state.on_pick(clock.now())
    assert probe == 1  # the first half-open episode
    for bogus in (True, 1.0, "1", object(), None, 0, 2):
        state.on_success(clock.now(), bogus)
        assert state.state == HALF_OPEN
        assert state.probes_in_flight == 1
    state.on_success(clock.now(), probe)
    assert state.state == CLOSED


# -- failure rate --------------------------------------------------------------------------


def test_failure_rate_trips_once_min_calls_reached() -> None:
    state, events, clock = make(failures=1000, failure_rate=0.5, min_calls=20, window=10.0)
    for _ in range(10):
        succeed(state, clock)
        clock.advance(0.1)
    for _ in range(9):
        fail(state, clock)
        clock.advance(0.1)
    assert state.state == CLOSED  # 9 of 19: below min_calls, and below 50%
    fail(state, clock)
    assert state.state == OPEN
    assert events[-1].reason == "failure rate 50% over 10 s (20 calls)"
    assert events[-1].consecutive_failures == 10


def test_failure_rate_needs_min_calls() -> None:
    state, _, clock = make(failures=1000, failure_rate=0.5, min_calls=20)
    fail(state, clock, 19)  # 100% failures, but only 19 calls
    assert state.state == CLOSED
    fail(state, clock)
    assert state.state == OPEN


def test_failure_rate_below_threshold_does_not_trip() -> None:
    state, _, clock = make(failures=1000, failure_rate=0.5, min_calls=10)
    for _ in range(50):
        succeed(state, clock, 2)
        fail(state, clock)
        clock.advance(0.05)
    assert state.state == CLOSED  # a steady 33% stays closed


def test_failure_rate_counts_only_the_window() -> None:
    state, _, clock = make(failures=1000, failure_rate=0.5, min_calls=10, window=10.0)
    fail(state, clock, 9)
    clock.advance(10.5)  # those nine slide out of the window
    fail(state, clock)
    assert state.state == CLOSED
    fail(state, clock, 8)
    assert state.state == CLOSED
    fail(state, clock)  # ten recent failures
    assert state.state == OPEN


def test_failure_rate_window_restarts_after_closing() -> None:
    state, _, clock = make(failures=1000, failure_rate=0.5, min_calls=4, cooldown=1.0)
    fail(state, clock, 4)
    assert state.state == OPEN
    to_half_open(state, clock)
    state.on_success(clock.now(), state.on_pick(clock.now()))
    assert state.state == CLOSED
    fail(state, clock, 3)  # the old failures are forgotten: 3 calls < min_calls
    assert state.state == CLOSED


def test_consecutive_failures_still_apply_with_a_rate() -> None:
    state, events, clock = make(failures=3, failure_rate=0.9, min_calls=100)
    fail(state, clock, 3)
    assert state.state == OPEN
    assert events[-1].reason == "3 consecutive failures"


# -- forced transitions --------------------------------------------------------------------


def test_force_open_and_close() -> None:
    state, events, clock = make(cooldown=5.0)
    assert not state.force_close(clock.now())  # already closed: no event
    assert state.force_open(clock.now())
    assert state.state == OPEN
    assert state.reopen_at == clock.now() + 5.0
    assert not state.force_open(clock.now() + 1.0)  # already open: keeps reopen_at
    assert state.reopen_at == clock.now() + 5.0
    assert state.force_close(clock.now(), "health check passed")
    assert state.state == CLOSED
    assert [(e.old, e.new, e.reason) for e in events] == [
        (CLOSED, OPEN, "health check failed"),
        (OPEN, CLOSED, "health check passed"),
    ]


def test_force_close_from_half_open_and_force_open_grows() -> None:
    state, events, clock = make(cooldown=2.0)
    state.force_open(clock.now(), "probe endpoint returned 503")
    to_half_open(state, clock)
    state.on_pick(clock.now())
    assert state.force_open(clock.now())
    assert state.reopen_at - state.opened_at == 4.0
    to_half_open(state, clock)
    state.on_pick(clock.now())
    assert state.force_close(clock.now())
    assert state.probes_in_flight == 0
    assert events[0].reason == "probe endpoint returned 503"
    assert [e.new for e in events] == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_without_emit_transitions_still_happen() -> None:
    state, events, clock = make(emit=False, failures=1)
    fail(state, clock)
    assert state.state == OPEN
    to_half_open(state, clock)
    assert events == []


def test_listener_sees_a_consistent_state() -> None:
    seen: list[tuple[str, str]] = []
    state: BreakerState

    def emit(event: BreakerEvent) -> None:
        seen.append((event.new, state.state))

    state = BreakerState(
        Breaker(failures=1, jitter=0.0, is_failure=always), URL, rng=random.Random(), emit=emit
    )
    state.on_failure(1.0)
    assert seen == [(OPEN, OPEN)]


def test_repr() -> None:
    state, _, _ = make()
    assert repr(state) == f"<BreakerState {URL} closed trips=0 consecutive_failures=0>"


# -- policy --------------------------------------------------------------------------------


def test_policy_defaults_and_repr() -> None:
    b = Breaker()
    assert (b.failures, b.failure_rate, b.window, b.min_calls) == (5, None, 10.0, 20)
    assert (b.cooldown, b.max_cooldown, b.multiplier, b.jitter) == (5.0, 60.0, 2.0, 0.1)
    assert (b.half_open_probes, b.reset_after, b.max_ejection) == (1, None, 0.5)
    assert b.is_failure is default_is_failure
    assert repr(b) == "lbclient.Breaker()"
    custom = Breaker(failures=3, cooldown=2, is_failure=always)
    assert repr(custom) == "lbclient.Breaker(failures=3, cooldown=2.0, is_failure=always)"
    assert isinstance(custom.cooldown, float)
    assert attrs.evolve(custom, failure_rate=1).failure_rate == 1.0
    assert b == Breaker() and hash(b) == hash(Breaker())
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        b.failures = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Breaker(5)  # type: ignore[call-arg]


def test_base_cooldown() -> None:
    b = Breaker(cooldown=5.0, multiplier=3.0, max_cooldown=100.0)
    assert [b.base_cooldown(k) for k in range(5)] == [5.0, 15.0, 45.0, 100.0, 100.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failures": 0}, "Breaker failures must be an int >= 1, got 0"),
        ({"failures": 2.5}, "Breaker failures must be an int >= 1, got 2.5"),
        ({"failures": True}, "Breaker failures must be an int >= 1, got True"),
        ({"failure_rate": 0}, "Breaker failure_rate must be a finite number in (0, 1] or None"),
        ({"failure_rate": 1.5}, "got 1.5"),
        (
            {"failure_rate": "50%"},
            "Breaker failure_rate must be a finite number in (0, 1] or None, got '50%'",
        ),
        ({"window": 0}, "Breaker window must be a finite number > 0, got 0.0"),
        ({"window": math.inf}, "Breaker window must be a finite number > 0, got inf"),
        ({"min_calls": 0}, "Breaker min_calls must be an int >= 1, got 0"),
        ({"cooldown": -1}, "Breaker cooldown must be a finite number > 0, got -1.0"),
        ({"cooldown": math.nan}, "Breaker cooldown must be a finite number > 0, got nan"),
        ({"cooldown": None}, "Breaker cooldown must be a finite number > 0, got None"),
        ({"max_cooldown": 4}, "Breaker max_cooldown must be >= cooldown (5.0), got 4.0"),
        (
            {"max_cooldown": "60"},
            "Breaker max_cooldown must be a finite number >= cooldown, got '60'",
        ),
        ({"multiplier": 0.5}, "Breaker multiplier must be a finite number >= 1, got 0.5"),
        ({"jitter": -0.1}, "Breaker jitter must be a finite number between 0 and 1, got -0.1"),
        ({"jitter": 1.5}, "got 1.5"),
        ({"half_open_probes": 0}, "Breaker half_open_probes must be an int >= 1, got 0"),
        ({"reset_after": 0}, "Breaker reset_after must be a finite number > 0 or None, got 0.0"),
        (
            {"max_ejection": 1.01},
            "Breaker max_ejection must be a finite number between 0 and 1, got 1.01",
        ),
        ({"is_failure": "yes"}, "Breaker is_failure must be callable, got 'yes'"),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Breaker(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_policy_boundaries_are_accepted() -> None:
    Breaker(failures=1, failure_rate=1.0, min_calls=1, multiplier=1.0, jitter=0.0)
    Breaker(jitter=1.0, max_ejection=0.0, cooldown=60.0, max_cooldown=60.0)
    Breaker(max_ejection=1.0, reset_after=0.001)


def test_default_is_failure_delegates_to_classify() -> None:
    pytest.importorskip("lbclient.policies.classify")
    from lbclient._errors import NoEndpointAvailable

    assert default_is_failure(ConnectionResetError())
    assert default_is_failure(TimeoutError())
    assert not default_is_failure(asyncio.CancelledError())
    assert not default_is_failure(NoEndpointAvailable("empty"))
    assert not default_is_failure(ValueError("the caller's own bug"))
    assert not default_is_failure(RuntimeError("the caller's own bug"))


# -- property test -------------------------------------------------------------------------

ops = st.one_of(
    st.tuples(st.just("advance"), st.floats(0.0, 30.0)),
    st.tuples(st.sampled_from(["pick", "pick_anyway"]), st.just(0)),
    st.tuples(st.sampled_from(["success", "failure", "ignored"]), st.integers(0, 50)),
    st.tuples(st.sampled_from(["force_open", "force_close"]), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(ops, max_size=120),
    st.integers(1, 4),
    st.integers(1, 3),
    st.sampled_from([None, 0.3, 0.8]),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32),
)
def test_invariants_hold_for_any_sequence(
    steps: list[tuple[str, float]],
    failures: int,
    probes: int,
    rate: float | None,
    jitter: float,
    seed: int,
) -> None:
    state, events, clock = make(
        seed=seed,
        failures=failures,
        half_open_probes=probes,
        failure_rate=rate,
        min_calls=3,
        window=5.0,
        cooldown=1.0,
        max_cooldown=8.0,
        jitter=jitter,
    )
    outstanding: list[int] = []
    for op, arg in steps:
        now = clock.now()
        if op == "advance":
            clock.advance(arg)
        elif op == "pick":
            if state.available(now):
                outstanding.append(state.on_pick(now))
        elif op == "pick_anyway":  # panic mode picks regardless of availability
            outstanding.append(state.on_pick(now))
        elif op in ("success", "failure", "ignored"):
            if outstanding:
                token = outstanding.pop(int(arg) % len(outstanding))
                getattr(state, f"on_{op}")(now, token)
        elif op == "force_open":
            state.force_open(now)
        else:
            state.force_close(now)

        now = clock.now()
        assert state.state in (CLOSED, OPEN, HALF_OPEN)
        assert state.probes_in_flight >= 0
        if state.state == HALF_OPEN:
            assert state.probes_in_flight <= probes
            # every slot taken is held by an outstanding probe of this episode
            current = [t for t in outstanding if t != NOT_PROBE and t == state._episode]
            assert state.probes_in_flight == len(current)
        else:
            assert state.probes_in_flight == 0
        if state.state == OPEN:
            assert state.reopen_at > state.opened_at or jitter == 1.0
            assert state.reopen_at <= state.opened_at + 8.0 * (1 + jitter)
            assert state.next_change(now) == state.reopen_at
            if now < state.reopen_at:
                assert not state.available(now)
                assert state.state == OPEN
        else:
            assert state.next_change(now) is None
        # events chain: closed -> ... -> current state, one event per transition
        previous = CLOSED
        for event in events:
            assert event.old == previous != event.new
            assert event.url == URL
            assert (event.cooldown is not None) == (event.new == OPEN)
            previous = event.new
        assert previous == state.state
        assert state.trips == sum(1 for e in events if e.new == OPEN)
        assert [e.at for e in events] == sorted(e.at for e in events)
