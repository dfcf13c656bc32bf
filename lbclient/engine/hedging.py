"""Hedged requests: after a delay, a backup attempt on another endpoint; first success wins.

The policy is :class:`lbclient.Hedge`; this module sends the backups.  The primary
attempt runs inline in the caller's task (a hedge that never fires costs one entry in a
queue); when its timer fires, a backup runs in its own task.  If the backup wins, the
caller's task is cancelled out of the primary and un-cancelled (the pattern of
``asyncio.timeout``), so the loser is always cancelled and its slot released at once --
and judged: a loser that had run far longer than its endpoint usually takes is evidence
against it (:meth:`~lbclient.pool.lease.Lease.lose`).

Streams hedge on time to first chunk with the same delay estimator, budget and backup
rule (:mod:`lbclient.engine.streaming`); their latencies are kept in a separate window.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import heapq
import logging
import math
import weakref
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, TypeVar

from .._clock import Clock
from .._errors import BalancerClosed, NoEndpointAvailable
from ..observe.events import HedgeEvent
from ..policies.budget import Budget
from ..policies.hedge import Hedge
from .attempt import record, settle, start
from .retrying import converted_cancel

if TYPE_CHECKING:
    from .._context import CallContext
    from ..pool.lease import Lease
    from ..pool.pool import Pool
    from ..pool.state import EndpointState
    from .engine import Engine

log = logging.getLogger("lbclient")

__all__ = [
    "Hedger",
    "LatencyWindow",
    "begin_race",
    "end_race",
    "hedged_try",
    "prefer_elsewhere",
    "primary_raised",
    "primary_returned",
    "send_backup",
]

R = TypeVar("R")

HEDGE_RESERVE = 0.2  # backups per second allowed beyond max_extra (6 per 30 s window)
BUDGET_WINDOW = 30.0  # seconds over which max_extra is counted


class LatencyWindow:
    """Recent latencies and the adaptive delay computed from them.

    Recording is O(1) (a ring write); the estimate is recomputed at 8, 16, 32 and 64
    samples, then every ``every`` samples (a sort of the window), so the hot path never
    sorts and a cold window is refreshed as soon as there is something to learn.  The
    estimate is Tukey's upper fence ``p75 + fence x (p75 - p25)``, or the ``quantile``
    when one is given.  Only the window's samples count, so the estimate follows load
    changes within ``size`` calls, and it decays with time too: at each recompute,
    samples older than ``horizon`` seconds (tracked per block of ``every``) are left out.
    """

    __slots__ = (
        "_blocks",
        "_buf",
        "_every",
        "_horizon",
        "_i",
        "_next",
        "_q",
        "_size",
        "fence",
        "value",
    )

    def __init__(
        self,
        size: int,
        q: float | None = None,
        every: int = 64,
        horizon: float = 60.0,
        fence: float = 2.0,
    ) -> None:
        self._buf: list[float] = []
        self._size = size
        self._i = 0
        self._q = q
        self.fence = fence
        self._every = every
        self._next = min(8, every)
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
        i += 1
        self._i = i
        if i >= self._next:
            self._next = i * 2 if i * 2 <= self._every else i + self._every
            if now is not None and i % self._every == 0:
                self._blocks.append(now)
            self.refresh(now)

    def refresh(self, now: float | None = None) -> None:
        """Recompute the estimate now."""
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
        n = len(s)
        if self._q is not None:
            self.value = s[min(n - 1, int(self._q * n))]
            return
        p25, p75 = s[int(0.25 * n)], s[min(n - 1, int(0.75 * n))]
        self.value = p75 + self.fence * (p75 - p25)

    @property
    def count(self) -> int:
        return self._i


class Hedger:
    """A balancer's hedging state: the delay estimators, the budget and the timers.

    Hedge timers share one loop timer: each call pushes its race on a heap by due time,
    and the single armed timer fires whatever is due, then re-arms for the next.  A call
    that ends first just marks its race done -- no timer to cancel -- and its entry is
    dropped when it comes up, which keeps a hedge that never fires to a few hundred
    nanoseconds of bookkeeping.  The timer belongs to one event loop; moving to another
    (:meth:`rebind`) drops what the old loop left queued.
    """

    __slots__ = (
        "_armed",
        "_armed_at",
        "_engine",
        "_queue",
        "_seq",
        "budget",
        "policy",
        "tasks",
        "ttft_window",
        "window",
    )

    def __init__(self, policy: Hedge, clock: Clock) -> None:
        self.policy = policy
        # Recompute every 64 calls (window/8 for bigger windows): a 512-sample sort every
        # 64 calls costs about half a microsecond per call.
        every = max(16, min(64, policy.window // 8))
        self.window = LatencyWindow(policy.window, policy.quantile, every, fence=policy.fence)
        self.ttft_window = LatencyWindow(policy.window, policy.quantile, every, fence=policy.fence)
        # max_extra of the calls over a 30 s window, plus a reserve of 0.2 backups/s.
        # The window banks tokens for bursts: a straggler that blocks a replica's queue
        # makes every call behind it slow at once, and a 10 s window ran dry exactly
        # then.  The reserve lets a cold or quiet client hedge at all (at 1 call/s and
        # 5%, a token takes 20 s to earn).
        self.budget = Budget(
            ratio=policy.max_extra, min_per_second=HEDGE_RESERVE, ttl=BUDGET_WINDOW, clock=clock
        )
        self._engine: Engine | None = None
        self._queue: list[tuple[float, int, _Race]] = []
        self._seq = 0
        self._armed: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        # Backups still running (a loser whose cancel is being processed, say): aclose()
        # waits for them, so none outlives the balancer.
        self.tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    def rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The balancer moved to ``loop``: forget the old loop's timer and queue."""
        self._armed = None
        self._armed_at = math.inf
        self._queue.clear()

    def close(self) -> None:
        """The balancer closed: cancel the timer and drop every queued race."""
        if self._armed is not None:
            self._armed.cancel()
        self.rebind(None)  # type: ignore[arg-type]

    async def wait_backups(self, timeout: float) -> None:
        """Wait (up to ``timeout`` seconds) for the backups that lost a race and were
        cancelled to finish their cleanup (closing a connection, say), so none outlives
        the balancer.  Backups still racing for a call in flight are left to it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        tasks = [t for t in self.tasks if not t.done() and t.get_loop() is loop]
        tasks = [t for t in tasks if t.cancelling()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def schedule(self, engine: Engine, loop: asyncio.AbstractEventLoop, race: _Race) -> None:
        """Fire ``race``'s next hedge at loop time ``race.due`` unless it is done by then."""
        self._engine = engine
        queue = self._queue
        while queue and queue[0][2].done:
            heapq.heappop(queue)
        due = race.due
        self._seq += 1
        heapq.heappush(queue, (due, self._seq, race))
        if self._armed is None or due < self._armed_at - 0.001:
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
            due, _, race = queue[0]
            if race.done or not race.primary_running or due != race.due:
                heapq.heappop(queue)
                continue
            if due > now + 0.0005:
                self._armed = loop.call_at(due, self._tick, loop)
                self._armed_at = due
                return
            heapq.heappop(queue)
            if self._engine is not None:
                try:
                    _fire(self._engine, race, loop)
                except Exception:  # a strategy bug: this backup is not sent, others are
                    log.exception("lbclient: sending a hedge backup failed")

    def current_delay(self, stream: bool = False) -> float:
        """Seconds to wait before a backup: the policy's fixed ``delay``, else the
        adaptive quantile of recent latencies (time to first chunk for streams)."""
        p = self.policy
        if p.delay is not None:
            return p.delay
        w = self.ttft_window if stream else self.window
        if w.count < p.warmup:
            return p.initial_delay
        value = w.value
        if value is None:  # warm now, but the periodic recompute has not run yet
            w.refresh()
            value = w.value
            assert value is not None
        return max(p.min_delay, value)

    def observe(self, latency: float, now: float, stream: bool = False) -> None:
        """One call's latency (or time to first chunk), for the adaptive delay (a fixed
        delay keeps no window)."""
        if self.policy.delay is None:
            (self.ttft_window if stream else self.window).add(latency, now)


def prefer_elsewhere(pool: Pool, tried: AbstractSet[EndpointState]) -> AbstractSet[EndpointState]:
    """Exclusion set that also avoids the tried endpoints' zones (or, without zones,
    regions): a backup in another failure domain is less likely to share the delay."""
    zones = {s.endpoint.zone for s in tried if s.endpoint.zone is not None}
    regions = {s.endpoint.region for s in tried if s.endpoint.region is not None}
    if not zones and not regions:
        return tried
    if zones:
        return pool.widen(tried, lambda s: s.endpoint.zone in zones)
    # Everything left in a tried region: any untried endpoint will do.
    return pool.widen(tried, lambda s: s.endpoint.region in regions)


def send_backup(engine: Engine, call: CallContext, delay: float, now: float) -> Lease | None:
    """A lease for a backup attempt of ``call``, if the budget and the pool allow one on
    an endpoint the call has not tried."""
    hedger = engine.hedger
    assert hedger is not None
    pool = engine.pool
    if pool.closed:  # calls in flight finish, without new hedges
        return None
    observer = engine.observer
    if not hedger.budget.try_withdraw(now):
        engine.counters.hedges_denied += 1
        if observer.wants(logging.DEBUG):
            observer.emit(HedgeEvent(action="denied", url=None, delay=delay, at=now))
        return None
    try:
        lease = pool.acquire(call, prefer_elsewhere(pool, call.tried), now)
    except (NoEndpointAvailable, BalancerClosed):
        return None
    if lease.state in call.tried:  # nowhere else to go: a backup there is pointless
        lease.abandon()
        return None
    lease.stream = call.stream
    lease.sent_as_hedge()
    start(call, lease)
    engine.counters.hedges_sent += 1
    if observer.wants(logging.DEBUG):
        observer.emit(HedgeEvent(action="sent", url=lease.state.url, delay=delay, at=now))
    return lease


def hedge_won(engine: Engine, lease: Lease, delay: float) -> None:
    lease.won_as_hedge()
    engine.counters.hedges_won += 1
    observer = engine.observer
    if observer.wants(logging.DEBUG):
        observer.emit(HedgeEvent(action="won", url=lease.state.url, delay=delay, at=engine.now()))


class _Race:
    """One hedged try in progress: its primary, its backups, and who won."""

    # Every race sets the slots; what only a race with a backup sets lives in a lazily
    # made __dict__ and reads its class default until then (as Lease does).
    __slots__ = (
        "__dict__",
        "args",
        "call",
        "caller",
        "cancelling",
        "context",
        "delay",
        "done",
        "due",
        "fn",
        "kwargs",
        "left",
        "primary",
        "primary_running",
    )

    winner: asyncio.Task[Any] | None = None
    result: Any = None
    won_in: float | None = None  # the winning backup's own latency
    fatal: BaseException | None = None  # a backup's BaseException, for the caller
    backups: list[tuple[asyncio.Task[Any], Lease]] | tuple[()] = ()  # a list once one runs

    def __init__(
        self,
        call: CallContext,
        caller: asyncio.Task[Any],
        fn: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        delay: float,
        left: int,
        due: float,
        primary: Lease,
        cancelling: int,
    ) -> None:
        self.call = call
        self.caller: asyncio.Task[Any] | None = caller
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.delay = delay
        self.left = left
        self.due = due
        self.primary = primary
        self.primary_running = True
        self.done = False
        self.cancelling = cancelling  # the caller's cancel requests when the race began
        # Backups run in the caller's context (its contextvars: report_usage's current
        # call, a cost policy's meter), not in whichever call's context armed the timer.
        self.context = contextvars.copy_context()


_EMPTY = contextvars.Context()
_NO_KWARGS: dict[str, Any] = {}  # shared by every ended race: never written


def _fire(engine: Engine, race: _Race, loop: asyncio.AbstractEventLoop) -> None:
    """Timer callback: launch one backup if the budget and the pool allow it."""
    if race.done or not race.primary_running or engine.pool.closed:
        return
    race.left -= 1
    hedger = engine.hedger
    assert hedger is not None
    if race.left > 0:  # the next backup waits another delay
        race.due = loop.time() + race.delay
        hedger.schedule(engine, loop, race)
    t = engine.now()
    race.primary.overdue(t)
    lease = send_backup(engine, race.call, race.delay, t)
    if lease is None:
        return
    task = loop.create_task(_backup(engine, race, lease), context=race.context)
    task.add_done_callback(_finisher(lease))
    if race.backups:
        race.backups.append((task, lease))
    else:
        race.backups = [(task, lease)]
    hedger.tasks.add(task)


async def _backup(engine: Engine, race: _Race, lease: Lease) -> Any:
    call = race.call
    try:
        result = await race.fn(lease.endpoint, *race.args, **race.kwargs)
    except BaseException as exc:
        if not lease.done:  # else the race already ended and settled this attempt
            settle(call, lease, exc, engine.now())
        if not isinstance(exc, Exception | asyncio.CancelledError) and not race.done:
            # KeyboardInterrupt, SystemExit, a user's own shutdown signal: the caller
            # must see it, as it would from the primary; the race ends here.
            race.done = True
            race.fatal = exc
            if race.primary_running and race.caller is not None:
                race.caller.cancel()  # interrupt the primary; hedged_try raises it
        raise
    if lease.done:
        return result
    t = engine.now()
    lease.ok(t)
    if not race.done:
        race.done = True
        race.winner = asyncio.current_task()
        race.result = result
        race.won_in = t - lease.t0
        race.call.served_by = lease.state.url
        hedge_won(engine, lease, race.delay)
        if race.primary_running and race.caller is not None:
            race.caller.cancel()  # interrupt the primary; hedged_try un-cancels
    return result


def _finisher(lease: Lease) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        lease.cancel()  # a no-op unless it was cancelled before it ever ran
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it as lost

    return done


def _end(engine: Engine, race: _Race, how: str, winner: float | None = None) -> None:
    """The race is over: settle every backup still running (``how``: ``"lost"`` -- another
    attempt won, in ``winner`` seconds; ``"cut"`` -- the call's deadline; ``"cancel"`` --
    the caller gave up) and cancel its task."""
    race.done = True
    t = engine.now()
    for task, lease in race.backups:
        if task.done():
            continue
        if not lease.done:
            if how == "lost":
                lease.lose(t, winner)
            elif how == "cut":
                lease.cut(t)
                record(race.call, lease, TimeoutError("hedge still running at the deadline"), t)
            else:
                lease.cancel()
        task.cancel()


async def hedged_try(
    engine: Engine,
    call: CallContext,
    lease: Lease,
    fn: Callable[..., Awaitable[R]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> R:
    """One round of a hedged call: the primary inline, backups after each delay.

    However the round ends, no backup is left running: a winner cancels the rest, a
    failure or cancel of the call cuts or cancels them.  A backup's ``BaseException``
    (not an ``Exception``) ends the round and reaches the caller, as a primary's would.
    The decorator's hedged path runs these same lines in its own frame
    (:func:`~lbclient.engine.route._hedged`): :func:`begin_race`, the primary, then
    :func:`primary_returned` or :func:`primary_raised`, and :func:`end_race` always.
    """
    race = begin_race(engine, call, lease, fn, args, kwargs)
    try:
        try:
            result = await fn(lease.endpoint, *args, **kwargs)
        except BaseException as exc:
            error = exc  # handled below, outside this block: no implicit __context__
        else:
            return primary_returned(engine, race, result)  # type: ignore[no-any-return]
        return await primary_raised(engine, race, error)  # type: ignore[no-any-return]
    finally:
        end_race(race)


def begin_race(
    engine: Engine,
    call: CallContext,
    lease: Lease,
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> _Race:
    """Start a hedged round whose primary, under ``lease``, the caller runs next: its
    first backup is queued on the hedge timer."""
    hedger = engine.hedger
    assert hedger is not None
    loop = engine.bind()
    caller = asyncio.current_task(loop)
    assert caller is not None
    hedger.budget.deposit(lease.t0)
    start(call, lease)
    delay = hedger.current_delay()
    due = loop.time() + delay
    race = _Race(
        call, caller, fn, args, kwargs, delay, hedger.policy.max_hedges, due, lease,
        caller.cancelling(),
    )  # fmt: skip
    hedger.schedule(engine, loop, race)
    return race


def primary_returned(engine: Engine, race: _Race, result: Any) -> Any:
    """The primary returned ``result``: it won, unless a backup ended the race first."""
    race.primary_running = False
    lease = race.primary
    t = engine.now()
    if _backup_ended_it(race):
        # The function swallowed the cancel a backup sent: the backup's verdict
        # stands, and this answer is given back like a lost one's.
        caller = race.caller
        if caller is not None and caller.cancelling() > race.cancelling:
            caller.uncancel()
        return _backup_ended(engine, race, lease, lease.t0)
    call = race.call
    lease.ok(t)
    latency = t - lease.t0
    hedger = engine.hedger
    if hedger is not None:
        hedger.observe(latency, t)
    call.sample = latency
    call.served_by = lease.state.url
    if race.backups:
        _end(engine, race, "lost", latency)
    race.done = True
    return result


async def primary_raised(engine: Engine, race: _Race, exc: BaseException) -> Any:
    """The primary raised ``exc``: a backup that won (or is still running and wins)
    answers the call; else ``exc`` (or the last attempt's error) is raised."""
    race.primary_running = False
    call = race.call
    lease = race.primary
    t0 = lease.t0
    caller = race.caller
    assert caller is not None
    cancelling = race.cancelling
    if isinstance(exc, asyncio.CancelledError):
        if _backup_ended_it(race) and caller.uncancel() <= cancelling:
            # A backup won (or raised a BaseException) and cancelled us out of the
            # primary: the primary lost the race.
            return _backup_ended(engine, race, lease, t0)
        settle(call, lease, exc, engine.now())
        _end(engine, race, "cut" if call.expired() else "cancel")
        raise exc
    if isinstance(exc, Exception) and caller.cancelling() > cancelling:
        # Cancelled -- by a backup that won, or by the caller -- and the function
        # turned the cancel into its own error.
        if _backup_ended_it(race) and caller.uncancel() <= cancelling:
            return _backup_ended(engine, race, lease, t0)
        _end(engine, race, "cut" if call.expired() else "cancel")
        converted_cancel(call, lease, exc, engine.now())
    settle(call, lease, exc, engine.now())
    if not isinstance(exc, Exception):
        _end(engine, race, "cancel")
        raise exc
    # The primary failed: a backup may have won meanwhile, or may still win.
    try:
        while not race.done:
            pending = [task for task, _ in race.backups if not task.done()]
            if not pending:
                break
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        _end(engine, race, "cut" if call.expired() else "cancel")
        raise
    if _backup_ended_it(race):
        if caller.cancelling() > cancelling:  # sent while the primary was failing
            caller.uncancel()
        return _backup_ended(engine, race, None, t0)
    race.done = True
    raise call.attempts[-1].error


def end_race(race: _Race) -> None:
    """The race is over: drop what it holds of the call (its arguments, the caller's
    task, the result), so a race still queued on the hedge timer keeps nothing alive."""
    race.done = True
    race.args = ()
    race.kwargs = _NO_KWARGS
    if race.winner is not None:
        race.result = None
    race.caller = None
    race.context = _EMPTY


def _backup_ended_it(race: _Race) -> bool:
    return race.winner is not None or race.fatal is not None


def _backup_ended(engine: Engine, race: _Race, primary: Lease | None, t0: float) -> Any:
    """A backup ended the race: it won (its result), or raised a ``BaseException`` (raised
    here).  The primary (when it still holds its lease) lost; the other backups are
    cancelled."""
    t = engine.now()
    fatal = race.fatal
    if fatal is not None:
        if primary is not None:
            primary.cancel()
        _end(engine, race, "cancel")
        raise fatal
    if primary is not None:
        primary.lose(t, race.won_in)
        hedger = engine.hedger
        assert hedger is not None
        hedger.observe(t - t0, t)  # the primary's latency is at least this
    _end(engine, race, "lost", race.won_in)
    race.call.sample = race.won_in
    return race.result
