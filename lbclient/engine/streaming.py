"""Streaming calls: ``@lb.route`` on an async generator (LLM tokens).

The same path as a plain call -- leases from :func:`~lbclient.engine.retrying.acquire`,
the retry decision of :func:`~lbclient.engine.retrying.next_retry`, backups from
:func:`~lbclient.engine.hedging.send_backup` -- with one difference: an attempt succeeds
when its first chunk arrives, not when it returns.  Until then a stream may be hedged (on
time to first chunk) and retried.  The first attempt to yield is *committed*: every other
attempt is cancelled (and judged, as a hedge loser), and from then on there is no retry
and no hedge -- the caller never sees duplicated or interleaved output.  An error after
the first chunk reaches the caller as it is.

Each attempt runs in its own task (its *pump*), so the wrapped generator always runs in
one task from start to end (aiohttp's and asyncio's timeouts rely on that), and hands
chunks to the caller through a small bounded channel: a slow consumer slows the pump,
and through it the network read, instead of lbclient buffering the whole answer.
Whatever the generator raises -- an ``Exception``, or a ``BaseException`` such as
``KeyboardInterrupt`` or your own shutdown signal -- reaches the consumer.

For streams the call's ``timeout`` bounds the time to the *first* chunk, and
``idle_timeout`` every gap after it (a long generation is not an error; a silent one is).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from .._context import CURRENT, CallContext
from .._errors import BalancerClosed, DeadlineExceeded, Overloaded, StreamIdleTimeout
from .attempt import record, start
from .hedging import hedge_won, send_backup
from .retrying import acquire, counted_retry, next_retry
from .route import admit, error_type, release

if TYPE_CHECKING:
    from ..pool.lease import Lease
    from .engine import Engine
    from .route import Extract

__all__ = ["BUFFER", "make_stream_route"]

_CHUNK, _END, _ERROR, _RAISE = 0, 1, 2, 3
BUFFER = 16
"""Chunks a committed stream may run ahead of its consumer before its pump waits."""

Item = tuple[int, Any]


class _Attempt:
    """One stream attempt: its lease, its pump task and the channel it fills.
    ``stopped``: the race is done with it -- its pump stops at its next chunk even if
    the generator swallowed the cancel."""

    __slots__ = ("channel", "lease", "stopped", "task")

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.channel: asyncio.Queue[Item] = asyncio.Queue(BUFFER)
        self.task: asyncio.Task[None] | None = None
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        if self.task is not None:
            self.task.cancel()

    def ended(self, task: asyncio.Task[None]) -> None:
        self.lease.cancel()


async def _pump(
    engine: Engine,
    att: _Attempt,
    fn: Callable[..., AsyncIterator[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    signals: asyncio.Queue[tuple[_Attempt, int, Any]],
) -> None:
    """Run one attempt's generator; its first item (or its end) is a signal to the race,
    every later item goes through the attempt's bounded channel."""
    lease = att.lease
    first = True
    item: Item
    agen = fn(lease.endpoint, *args, **kwargs)
    try:
        async for chunk in agen:
            if att.stopped:  # the generator swallowed its cancel: stop it here
                break
            if first:
                first = False
                lease.first_chunk(engine.now())
                signals.put_nowait((att, _CHUNK, chunk))
            else:
                lease.chunks += 1
                await att.channel.put((_CHUNK, chunk))
    except asyncio.CancelledError:
        lease.cancel()  # a no-op when the race already judged it (lost, cut)
        raise
    except Exception as exc:
        lease.fail(exc, engine.now())
        item = (_ERROR, exc)
    except BaseException as exc:  # KeyboardInterrupt, GeneratorExit, a user's Shutdown...
        lease.cancel()
        item = (_RAISE, exc)
    else:
        if att.stopped:
            lease.cancel()  # a no-op when the race already judged it
            return
        lease.ok()
        item = (_END, None)
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await aclose()
    if first:
        signals.put_nowait((att, item[0], item[1]))
    else:
        await att.channel.put(item)


def make_stream_route(
    engine: Engine,
    fn: Callable[..., AsyncIterator[Any]],
    extract: Extract,
    timeout: float | None,
    idle_timeout: float | None,
) -> Callable[..., AsyncGenerator[Any, None]]:
    counters = engine.counters
    now = engine.now

    async def stream(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        if engine.pool.closed:
            raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
        call = extract.context(args, kwargs, timeout=timeout, stream=True)
        t = call.started = now()
        if timeout is not None:
            call.deadline = t + timeout
        counters.calls += 1
        if engine.budget is not None:
            engine.budget.deposit(t)
        if engine.hedger is not None:
            engine.hedger.budget.deposit(t)
        permit = None
        gate = engine.gate
        if gate is not None:
            try:
                permit = await admit(engine, call, t)
            except Overloaded as exc:
                rec = engine.recorder
                if rec is not None and rec.traffic:
                    rec.traffic_only(now() - t, False, None, error_type(exc), True, call)
                raise
        ok = ended = False
        span = None
        engine.active += 1
        if engine.tracer is not None:
            call.tracer = engine.tracer
            span = engine.tracer.call(call)
            span.__enter__()
        try:
            # aclosing: closing this stream closes the inner one (and frees its slot) now.
            async with contextlib.aclosing(
                _stream_call(engine, call, fn, args, kwargs, idle_timeout)
            ) as inner:
                async for item in inner:
                    yield item
            ok = ended = True
            counters.ok += 1
            rec = engine.recorder
            if rec is not None:  # the whole stream (its first chunk was recorded then)
                rec.call(engine.now() - t, True, call.served_by, call=call)
                if call.usage is not None:
                    rec.usage(call.usage, call.served_by)
        except Exception as exc:
            rec = engine.recorder
            ended = True
            if rec is not None:
                rec.call(engine.now() - t, False, call.served_by, error_type(exc), call=call)
            raise
        finally:
            engine.active -= 1
            rec = engine.recorder
            if not ended and rec is not None and rec.traffic and call.served_by is not None:
                # closed by its consumer after the first chunk: no outcome recorded above
                rec.traffic_only(engine.now() - t, False, call.served_by, "closed", True, call)
            if permit is not None:
                release(permit, call, ok or call.sample is not None)
            if span is not None:
                span.__exit__(*sys.exc_info())

    return functools.wraps(fn)(stream)


async def _stream_call(
    engine: Engine,
    call: CallContext,
    fn: Callable[..., AsyncIterator[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    idle_timeout: float | None,
) -> AsyncGenerator[Any, None]:
    loop = engine.bind()
    hedger = engine.hedger
    counters = engine.counters
    signals: asyncio.Queue[tuple[_Attempt, int, Any]] = asyncio.Queue()
    live: list[_Attempt] = []
    hedges_left = hedger.policy.max_hedges if hedger is not None else 0
    deadline = call.deadline

    # The generators run in their own tasks, in a copy of this context where the call is
    # current (for report_usage) -- never set in the consumer's own context.
    ctx = contextvars.copy_context()
    ctx.run(CURRENT.set, call)

    def launch(lease: Lease) -> None:
        lease.stream = True
        att = _Attempt(lease)
        # Each pump its own copy: what one attempt sets (a cost meter's attempt record)
        # must not leak into, or be reset under, a concurrent one.
        task = loop.create_task(_pump(engine, att, fn, args, kwargs, signals), context=ctx.copy())
        task.add_done_callback(att.ended)  # a no-op unless it was cancelled before running
        att.task = task
        live.append(att)

    def cut_all(t: float) -> None:
        for att in live:
            if att.lease.cut(t):
                record(call, att.lease, TimeoutError("no first chunk by the deadline"), t)

    def expired(t: float) -> DeadlineExceeded:
        cut_all(t)
        counters.failed("deadline")
        return DeadlineExceeded(call.timeout or 0.0, call.attempts)

    committed: _Attempt | None = None
    try:
        lease = await acquire(engine, call, None)
        start(call, lease)
        launch(lease)
        delay = hedger.current_delay(stream=True) if hedger is not None else 0.0
        next_hedge = call.started + delay if hedger is not None and hedges_left else None
        # Phase 1: race for the first chunk.
        while committed is None:
            t = engine.now()
            wait = None if next_hedge is None else max(0.0, next_hedge - t)
            if deadline is not None:
                left = deadline - t
                if left <= 0:
                    raise expired(t)
                wait = left if wait is None else min(wait, left)
            try:
                if wait is None:
                    att, kind, payload = await signals.get()
                else:
                    async with asyncio.timeout(wait):
                        att, kind, payload = await signals.get()
            except TimeoutError:
                t = engine.now()
                if deadline is not None and t >= deadline:
                    raise expired(t) from (call.attempts[-1].error if call.attempts else None)
                if next_hedge is not None and t >= next_hedge:
                    assert hedger is not None
                    hedges_left -= 1
                    for att in live:
                        att.lease.overdue(t)  # no first chunk yet: that is evidence
                    backup = send_backup(engine, call, delay, t)
                    delay = hedger.current_delay(stream=True)
                    next_hedge = t + delay if hedges_left > 0 else None
                    if backup is not None:
                        launch(backup)
                continue
            if kind == _ERROR:
                live.remove(att)
                record(call, att.lease, payload, engine.now())
                if live:
                    continue  # another attempt may still produce the first chunk
                pause = next_retry(engine, call, payload)
                if pause > 0:
                    await engine.clock.sleep(pause)
                lease = await acquire(engine, call, payload)
                counted_retry(engine, lease, payload)
                start(call, lease)
                launch(lease)
                if hedger is not None and hedges_left:
                    delay = hedger.current_delay(stream=True)
                    next_hedge = engine.now() + delay
                continue
            if kind == _RAISE:
                live.remove(att)
                counters.failed("error")
                raise payload
            # The first chunk (or an empty stream's end): commit to this attempt.
            committed = att
            t = engine.now()
            won_in = t - att.lease.t0
            call.sample = won_in
            call.served_by = att.lease.state.url
            if engine.recorder is not None:
                engine.recorder.call(t - call.started, True, call.served_by, None, True, call)
            for other in live:
                if other is not att:
                    other.lease.lose(t, won_in)
                    other.stop()
            live[:] = [att]
            if att.lease.hedge:
                hedge_won(engine, att.lease, delay)
            if hedger is not None:
                hedger.observe(t - call.started, t, stream=True)
            if kind == _END:
                return
            yield payload
        # Phase 2: relay the committed stream; no retry, no hedge from here on.
        channel = committed.channel
        while True:
            if idle_timeout is None:
                kind, payload = await channel.get()
            else:
                try:
                    async with asyncio.timeout(idle_timeout):
                        kind, payload = await channel.get()
                except TimeoutError:
                    committed.lease.cut()
                    counters.failed("stream idle")
                    raise StreamIdleTimeout(
                        f"stream from {committed.lease.state.url} sent no chunk for "
                        f"{idle_timeout:g} s"
                    ) from None
            if kind == _CHUNK:
                yield payload
            elif kind == _END:
                return
            else:
                counters.failed("error")
                raise payload
    finally:
        pending = [a.task for a in live if a.task is not None and not a.task.done()]
        for a in live:
            a.stop()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
