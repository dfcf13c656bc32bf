"""peak_ewma's cached score and the estimates read beside it.

Picks compare ``EndpointState.score`` and no longer write the idle decay back into
``cost``: whatever reads ``cost`` directly must decay it itself.  Found by an
adversarial review of that change; each test failed before its fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import lbclient
from lbclient.pool.load import peak_ewma_load
from lbclient.pool.pool import Pool
from lbclient.pool.state import EndpointState
from lbclient.strategies import PeakEwma, PickContext, Picker
from lbclient.testing import FakeClock

A, B = "http://a:1", "http://b:1"


def _spike_then_quiet(clock: FakeClock) -> tuple[Pool, EndpointState, EndpointState]:
    """``a`` answered once in 5 s a minute ago (decayed to ~12 ms); ``b`` answers in
    50 ms, recently."""
    lb = lbclient.Balancer([A, B], clock=clock, rng=3)  # peak_ewma, decay 10 s
    pool = lb._pool
    pool.refresh()
    a, b = pool.members[A], pool.members[B]
    lease = pool._take(a, clock.now())
    clock.advance(5.0)
    lease.ok()
    clock.advance(60.0)
    for _ in range(5):
        lease = pool._take(b, clock.now())
        clock.advance(0.05)
        lease.ok()
    return pool, a, b


def test_a_stuck_call_is_a_peak_sample_even_after_an_old_peak_decayed() -> None:
    clock = FakeClock(100.0)
    pool, a, b = _spike_then_quiet(clock)
    stuck = pool.acquire(None, None, clock.now())
    assert stuck.state is a  # the least load
    clock.advance(1.0)
    stuck.overdue(clock.now())  # silent for 1 s: the hedge timer says so
    now = clock.now()
    assert a.ewma(now) >= 1.0
    assert pool.acquire(None, None, now).state is b  # not queued behind the stuck call


def test_a_failure_is_priced_from_the_estimate_its_pick_compared() -> None:
    clock = FakeClock(100.0)
    pool, a, _ = _spike_then_quiet(clock)
    lease = pool.acquire(None, None, clock.now())
    assert lease.state is a
    clock.advance(0.01)
    lease.fail(ConnectionError("reset"))
    # 4 x ~12 ms, not 4 x the minute-old 5 s peak (which the 10 s cap would hold)
    assert a.penalty < 0.2


class _Subsets:
    """A picker that builds its peak_ewma sub-pickers lazily, per key (after the
    snapshot was built)."""

    def __init__(self, states: Sequence[EndpointState], ctx: PickContext) -> None:
        self._states, self._ctx = tuple(states), ctx
        self._subs: dict[object, Picker] = {}

    def pick(
        self, call: lbclient.CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        key = call.key if call is not None else None
        sub = self._subs.get(key)
        if sub is None:
            sub = self._subs[key] = PeakEwma().picker(self._states, self._ctx)
        return sub.pick(call, exclude)


class Subsets:
    name = "subsets"

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> Picker:
        return _Subsets(states, ctx)


def test_a_peak_ewma_picker_built_late_still_reads_current_scores() -> None:
    clock = FakeClock(100.0)
    lb = lbclient.Balancer([A, B], strategy=Subsets(), clock=clock, rng=1)
    pool = lb._pool
    slow, fast = pool.members[A], pool.members[B]
    for s, rtt in ((slow, 1.0), (fast, 0.01)):
        for _ in range(10):
            lease = pool._take(s, clock.now())
            clock.advance(rtt)
            lease.ok()
    now = clock.now()
    assert peak_ewma_load(slow, now) > 20 * peak_ewma_load(fast, now)
    picks: Counter[str] = Counter()
    for _ in range(40):
        lease = pool.acquire(None, None, clock.now())
        picks[lease.state.url] += 1
        lease.cancel()
    assert picks[A] == 0, picks


def test_only_pools_whose_picker_reads_the_score_keep_it() -> None:
    for strategy, scored in (("peak_ewma", True), ("power_of_two", False), ("prefix", False)):
        lb = lbclient.Balancer([A, B], strategy=strategy)
        lb._pool.refresh()
        assert lb._pool.totals.scored is scored, strategy


def test_the_hedged_paths_context_is_a_plain_call_context() -> None:
    """``CallContext.keyed`` builds what ``CallContext(key=, started=)`` does, field by
    field (slots and what reads a class default), so the two cannot drift apart."""
    fast, slow = lbclient.CallContext.keyed("k", 12.5), lbclient.CallContext(key="k", started=12.5)
    names = {n for cls in type(slow).__mro__ for n in getattr(cls, "__slots__", ())}
    names |= {n for n in vars(lbclient.CallContext) if not n.startswith("_")}
    names -= {"__dict__", "__weakref__"}
    for name in sorted(names):
        a, b = getattr(fast, name), getattr(slow, name)
        if callable(b) and not isinstance(b, type):  # methods: bound to each object
            continue
        assert a == b, name
    assert vars(fast) == vars(slow) == {}  # nothing rare was set
