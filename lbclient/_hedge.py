"""Hedged requests: after a delay, a backup attempt on another endpoint; first success wins.

"The Tail at Scale" (Dean & Barroso, 2013): a backup request sent after the 95th
percentile latency costs about 5% extra load and cuts the 99.9th percentile many-fold,
because stragglers are rarely correlated across replicas.  Finagle's backup requests and
gRPC's hedging policy (gRFC A6) do the same; lbclient adds a budget so hedges never
exceed ``max_extra`` of the traffic, whatever the latency distribution does.

The primary attempt runs inline in the caller's task (a hedge that never fires costs
one timer); when the timer fires, the backup runs in its own task.  If the backup wins,
the caller's task is cancelled out of the primary and un-cancelled (the pattern of
``asyncio.timeout``), so the loser is always cancelled and its slot released at once.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from ._budget import Budget
from ._call import _retrying
from ._clock import Clock
from ._errors import (
    Attempt,
    AttemptsExhausted,
    BalancerClosed,
    ConfigError,
    DeadlineExceeded,
    NoEndpointAvailable,
)
from ._state import EndpointState

if TYPE_CHECKING:
    from ._balancer import Balancer

__all__ = ["Hedge", "Hedger", "LatencyWindow", "run_hedged"]

R = TypeVar("R")


def _seconds_or_none(name: str, *, allow_zero: bool = False) -> Callable[[object], float | None]:
    def convert(value: object) -> float | None:
        if value is None:
            return None
        ok = (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and math.isfinite(value)
            and (value >= 0 if allow_zero else value > 0)
        )
        if not ok:
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{name} must be a number of seconds {bound} or None, got {value!r}")
        return float(value)  # type: ignore[arg-type]

    return convert


def _delay(value: object) -> float | None:
    return _seconds_or_none("delay")(value)


def _min_delay(value: object) -> float:
    out = _seconds_or_none("min_delay", allow_zero=True)(value)
    if out is None:
        raise ConfigError("min_delay must be a number of seconds >= 0, got None")
    return out


def _initial_delay(value: object) -> float:
    out = _seconds_or_none("initial_delay")(value)
    if out is None:
        raise ConfigError("initial_delay must be a number of seconds > 0, got None")
    return out


def _fraction(name: str, lo_open: bool = True) -> Callable[[object, object, object], None]:
    def check(_i: object, _a: object, value: object) -> None:
        ok = (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and math.isfinite(value)
            and (0 < value < 1 if lo_open else 0 <= value < 1)
        )
        if not ok:
            raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")

    return check


def _max_hedges(_i: object, _a: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4:
        raise ConfigError(f"max_hedges must be an int from 1 to 4, got {value!r}")


def _warmup(_i: object, _a: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"warmup must be an int >= 1, got {value!r}")


@attrs.frozen(kw_only=True, repr=False)
class Hedge:
    """When to send a backup request, and how many at most.

    >>> lbclient.Hedge()                          # adaptive: hedge at p97.5, <= 5% extra load
    >>> lbclient.Hedge(delay=0.25)                # fixed: hedge after 250 ms
    >>> lbclient.Hedge(max_extra=0.02)            # adaptive at p99, <= 2% extra load

    * ``delay`` -- seconds before the backup; ``None`` (default) adapts it to the
      ``quantile`` of recent call latency.  A fixed delay is simple but goes stale as
      load changes; the adaptive one tracks it.
    * ``max_extra`` -- budget: hedges never exceed this share of calls (default 0.05:
      "The Tail at Scale" shows hedging at p95 costs about 5% and removes most of the tail).
    * ``quantile`` -- which latency quantile is the adaptive delay (default
      ``1 - max_extra / 2``: p97.5 for a 5% budget).  Finagle hedges at ``1 - max_extra``,
      which spends the whole budget in steady state: then bursts of slow calls find it
      empty and the stragglers that matter most go unhedged.  Half the budget on
      expected hedges, half as headroom, keeps the p99.9 down.
    * ``min_delay`` -- floor of the adaptive delay (default 5 ms), so a burst of very
      fast calls cannot turn hedging into request duplication.
    * ``initial_delay`` -- used until ``warmup`` latencies (default 32) have been seen
      (default 1 s: conservative; a cold start must not double the load).
    * ``max_hedges`` -- backups per call (default 1; each waits another delay).
    * ``window`` -- how many recent latencies the quantile is computed over (default 512);
      it is recomputed every ``window / 4`` calls, so the hot path never sorts.
    """

    delay: float | None = attrs.field(default=None, converter=_delay)
    max_extra: float = attrs.field(default=0.05, validator=_fraction("max_extra"))
    quantile: float | None = attrs.field(default=None)
    min_delay: float = attrs.field(default=0.005, converter=_min_delay)
    initial_delay: float = attrs.field(default=1.0, converter=_initial_delay)
    warmup: int = attrs.field(default=32, validator=_warmup)
    max_hedges: int = attrs.field(default=1, validator=_max_hedges)
    window: int = attrs.field(default=512)

    @quantile.validator
    def _check_quantile(self, _a: object, value: object) -> None:
        if value is None:
            return
        _fraction("quantile")(self, _a, value)

    @window.validator
    def _check_window(self, _a: object, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 65536:
            raise ConfigError(f"window must be an int from 16 to 65536, got {value!r}")

    @property
    def effective_quantile(self) -> float:
        return self.quantile if self.quantile is not None else 1.0 - self.max_extra / 2

    def __repr__(self) -> str:
        fields = attrs.fields(Hedge)
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields
            if getattr(self, f.name) != f.default
        ]
        return f"lbclient.Hedge({', '.join(parts)})"


class LatencyWindow:
    """Recent latencies and a quantile of them, recomputed every ``every`` samples.

    Recording is O(1) (a ring write); the sort happens once per ``every`` samples, so a
    512-sample window costs well under a microsecond per call amortised.  Only the
    window's samples count, so the estimate follows load changes within ``size`` calls,
    and it decays with time too: at each recompute, samples older than ``horizon``
    seconds (tracked per block of ``every``) are left out.
    """

    __slots__ = ("_blocks", "_buf", "_every", "_horizon", "_i", "_q", "_size", "value")

    def __init__(self, size: int, q: float, every: int = 32, horizon: float = 60.0) -> None:
        self._buf: list[float] = []
        self._size = size
        self._i = 0
        self._q = q
        self._every = every
        self._horizon = horizon
        self._blocks: collections.deque[float] = collections.deque(maxlen=size // every + 1)
        self.value: float | None = None

    def add(self, x: float, now: float | None = None) -> None:
        buf = self._buf
        i = self._i
        if len(buf) < self._size:
            buf.append(x)
        else:
            buf[i % self._size] = x
        self._i = i + 1
        if self._i % self._every == 0:
            if now is not None:
                self._blocks.append(now)
            self.refresh(now)

    def refresh(self, now: float | None = None) -> None:
        """Recompute the quantile now (also done every ``every`` samples)."""
        buf = self._buf
        if not buf:
            return
        recent = buf
        if now is not None and self._blocks:
            # Keep the blocks that ended within the horizon (always the newest one).
            fresh = 0
            for t in reversed(self._blocks):
                if now - t > self._horizon and fresh:
                    break
                fresh += 1
            m = min(len(buf), fresh * self._every)
            if m < len(buf):
                j = self._i % self._size if len(buf) == self._size else len(buf)
                recent = buf[j - m : j] if m <= j else buf[j - m :] + buf[:j]
        s = sorted(recent)
        self.value = s[min(len(s) - 1, int(self._q * len(s)))]

    @property
    def count(self) -> int:
        return self._i


class Hedger:
    """The balancer's hedging state: the delay estimator, the budget and the timers.

    Hedge timers share one loop timer: each call appends ``(due, race)`` to a queue
    (deadlines arrive nearly in order, since the delay changes slowly) and the single
    armed timer fires whatever is due, then re-arms for the next.  A call that ends
    first just marks its race done -- no timer to cancel, no heap churn -- which keeps
    a hedge that never fires to about a microsecond.
    """

    __slots__ = ("_armed", "_armed_at", "_lb", "_queue", "budget", "policy", "window")

    def __init__(self, policy: Hedge, clock: Clock, lb: Balancer | None = None) -> None:
        self.policy = policy
        # Recompute the quantile every window/4 calls: a 512-sample sort every 128 calls
        # costs well under a microsecond per call, and the estimate lags a quarter window.
        self.window = LatencyWindow(
            policy.window, policy.effective_quantile, every=max(32, policy.window // 4)
        )
        self.budget = Budget(ratio=policy.max_extra, min_per_second=0.0, ttl=10.0, clock=clock)
        self._lb = lb
        self._queue: collections.deque[_Race] = collections.deque()
        self._armed: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def schedule(self, loop: asyncio.AbstractEventLoop, race: _Race, due: float) -> None:
        """Fire ``race``'s next hedge at loop time ``due`` unless it is done by then."""
        race.due = due
        queue = self._queue
        while queue and queue[0].done:
            queue.popleft()
        queue.append(race)
        if self._armed is None or due < self._armed_at - 0.001:
            self.schedule_timer(loop, due)

    def schedule_timer(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self._armed is not None:
            self._armed.cancel()
        self._armed = loop.call_at(due, self._tick, loop)
        self._armed_at = due

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._armed = None
        self._armed_at = math.inf
        queue = self._queue
        now = loop.time()
        while queue:
            race = queue[0]
            if race.done or not race.primary_running:
                queue.popleft()
                continue
            if race.due > now + 0.0005:
                self._armed = loop.call_at(race.due, self._tick, loop)
                self._armed_at = race.due
                return
            queue.popleft()
            if self._lb is not None:
                _fire(self._lb, race, loop)

    def current_delay(self) -> float:
        p = self.policy
        if p.delay is not None:
            return p.delay
        w = self.window
        if w.count < p.warmup:
            return p.initial_delay
        value = w.value
        if value is None:  # warm now, but the periodic recompute has not run yet
            w.refresh()
            value = w.value
            assert value is not None
        return max(p.min_delay, value)


class _Race:
    """One hedged call in progress: the attempts running and who won."""

    __slots__ = (
        "args",
        "attempts",
        "backups",
        "caller",
        "delay",
        "done",
        "due",
        "fn",
        "key",
        "kwargs",
        "left",
        "primary_running",
        "result",
        "slots",
        "tried",
        "winner",
    )

    due: float
    result: Any

    def __init__(
        self,
        caller: asyncio.Task[Any],
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        key: object,
        delay: float,
        left: int,
        first: EndpointState,
    ) -> None:
        self.caller = caller
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.key = key
        self.delay = delay
        self.left = left
        self.primary_running = True
        self.done = False
        self.winner: asyncio.Task[Any] | None = None
        self.tried: set[EndpointState] = {first}
        self.attempts: list[Attempt] = []
        self.backups: list[asyncio.Task[Any]] = []
        self.slots: list[_Slot] = []
        # set when used: due (in Hedger.schedule), result (by the winning backup)


def _prefer_elsewhere(lb: Balancer, tried: set[EndpointState]) -> set[EndpointState]:
    """Exclusion set that also avoids the tried endpoints' zones/regions."""
    zones = {s.endpoint.zone for s in tried if s.endpoint.zone is not None}
    regions = {s.endpoint.region for s in tried if s.endpoint.region is not None}
    if not zones and not regions:
        return tried
    out = set(tried)
    for s in lb._pickable:
        e = s.endpoint
        if (e.zone is not None and e.zone in zones) or (
            not zones and e.region is not None and e.region in regions
        ):
            out.add(s)
    # Everything left is in a tried zone/region: any untried endpoint will do.
    return tried if all(s in out for s in lb._pickable) else out


async def _backup(
    lb: Balancer,
    race: _Race,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    slot: _Slot,
    t0: float,
) -> Any:
    slot.started = True  # from here on every exit path releases the slot
    s, probe = slot.state, slot.probe
    try:
        result = await fn(s.endpoint, *args, **kwargs)
    except Exception as exc:
        if slot.released:  # the call already ended and gave the slot back
            raise
        slot.released = True
        lb._failed(s, t0, exc, probe)
        race.attempts.append(
            Attempt(endpoint=s.endpoint, error=exc, duration=lb._now() - t0, hedge=True)
        )
        raise
    except BaseException:
        slot.release(lb)
        raise
    if slot.released:
        return result
    slot.released = True
    lb._succeeded(s, t0, probe)
    if not race.done:
        race.done = True
        race.winner = asyncio.current_task()
        race.result = result
        s.hedges_won += 1
        lb._hedges_won += 1
        if race.primary_running:
            race.caller.cancel()  # interrupt the primary; _hedged un-cancels
    return result


class _Slot:
    """A backup's in-flight slot, released exactly once (possibly before its task ends)."""

    __slots__ = ("probe", "released", "started", "state")

    def __init__(self, state: EndpointState, probe: int) -> None:
        self.state = state
        self.probe = probe
        self.started = False
        self.released = False

    def release(self, lb: Balancer) -> None:
        if not self.released:
            self.released = True
            lb._cancelled(self.state, self.probe)


def _finisher(lb: Balancer, slot: _Slot) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        slot.release(lb)  # a no-op unless it was cancelled before it ever ran
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as lost

    return done


def _fire(lb: Balancer, race: _Race, loop: asyncio.AbstractEventLoop) -> None:
    """Timer callback: launch one backup if the budget and the pool allow it."""
    if race.done or not race.primary_running or lb._closed:
        return
    fn, args, kwargs, key = race.fn, race.args, race.kwargs, race.key
    race.left -= 1
    if race.left > 0:  # the next backup waits another delay
        lb._hedger.schedule(loop, race, loop.time() + race.delay)
    hedger: Hedger = lb._hedger
    now = lb._now()
    if not hedger.budget.try_withdraw():
        lb._hedges_denied += 1
        return
    try:
        s, probe = lb._acquire(key, _prefer_elsewhere(lb, race.tried), now)
    except NoEndpointAvailable:
        return
    if s in race.tried:  # nowhere else to go: a backup on the same endpoint is pointless
        lb._cancelled(s, probe)
        s.requests -= 1
        return
    race.tried.add(s)
    s.hedges_sent += 1
    lb._hedges_sent += 1
    slot = _Slot(s, probe)
    task = loop.create_task(_backup(lb, race, fn, args, kwargs, slot, now))
    task.add_done_callback(_finisher(lb, slot))
    race.backups.append(task)
    race.slots.append(slot)


async def run_hedged(
    lb: Balancer,
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: object,
    timeout: float | None,
) -> R:
    """Run one call with hedging (and the retry policy after every attempt has failed)."""
    if timeout is None:
        return await _hedged(lb, fn, args, kwargs, key, None)
    deadline = lb._now() + timeout
    holder: list[list[Attempt]] = []
    try:
        async with asyncio.timeout(timeout) as scope:
            return await _hedged(lb, fn, args, kwargs, key, deadline, holder)
    except TimeoutError as exc:
        if scope.expired():
            lb._calls_failed += 1
            attempts = holder[0] if holder else []
            raise DeadlineExceeded(timeout, attempts) from (attempts[-1].error if attempts else exc)
        raise


async def _hedged(
    lb: Balancer,
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: object,
    deadline: float | None,
    holder: list[list[Attempt]] | None = None,
) -> R:
    if lb._closed:
        raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
    lb._calls += 1
    hedger: Hedger = lb._hedger
    now = lb._now()
    hedger.budget.deposit(now)
    budget = lb._budget
    if budget is not None:
        budget.deposit(now)
    loop = asyncio.get_running_loop()
    caller = asyncio.current_task(loop)
    assert caller is not None
    delay = hedger.current_delay()
    try:
        s, probe = lb._acquire(key, None, now)
    except NoEndpointAvailable:
        lb._calls_failed += 1
        raise
    race = _Race(caller, fn, args, kwargs, key, delay, hedger.policy.max_hedges, s)
    if holder is not None:
        holder.append(race.attempts)
    hedger.schedule(loop, race, loop.time() + delay)
    cancelling = caller.cancelling()
    try:
        result = await fn(s.endpoint, *args, **kwargs)
    except asyncio.CancelledError:
        race.primary_running = False
        lb._cancelled(s, probe)
        if race.winner is not None and caller.uncancel() <= cancelling:
            # A backup won and cancelled us out of the primary: that is a success.
            _cancel_all(race, lb)
            t = lb._now()
            hedger.window.add(t - now, t)
            return race.result  # type: ignore[no-any-return]
        race.done = True
        _cancel_all(race, lb)
        raise
    except Exception as exc:
        race.primary_running = False
        lb._failed(s, now, exc, probe)
        race.attempts.insert(0, Attempt(endpoint=s.endpoint, error=exc, duration=lb._now() - now))
        error: Exception = exc
    except BaseException:
        race.primary_running = False
        lb._cancelled(s, probe)
        race.done = True
        _cancel_all(race, lb)
        raise
    else:
        race.primary_running = False
        t = lb._now()
        lb._succeeded(s, now, probe, t=t)
        hedger.window.add(t - now, t)
        if race.winner is not None:
            # The wrapped function swallowed our cancellation; the backup's result stands.
            if caller.cancelling() > cancelling:
                caller.uncancel()
            return race.result  # type: ignore[no-any-return]
        race.done = True
        if race.backups:
            _cancel_all(race, lb)
        return result
    if race.winner is not None:  # a backup won while the primary was failing
        if caller.cancelling() > cancelling:
            caller.uncancel()
        _cancel_all(race, lb)
        return race.result  # type: ignore[no-any-return]
    # The primary failed: a backup still running may yet succeed.
    try:
        while not race.done:
            pending = [t for t in race.backups if not t.done()]
            if not pending:
                break
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        race.done = True
        _cancel_all(race, lb)
        raise
    if race.winner is not None:
        t = lb._now()
        hedger.window.add(t - now, t)
        return race.result
    race.done = True
    _cancel_all(race, lb)
    if lb._retry is None:
        lb._calls_failed += 1
        if len(race.attempts) > 1:
            raise AttemptsExhausted(race.attempts, "primary and hedges failed") from error
        raise error
    return await _retrying(lb, fn, args, kwargs, key, race.attempts, race.tried, now, deadline)


def _cancel_all(race: _Race, lb: Balancer | None = None) -> None:
    """Cancel the backups still running and give their slots back at once."""
    for t, slot in zip(race.backups, race.slots, strict=True):
        if not t.done():
            t.cancel()
            if lb is not None:
                slot.release(lb)
