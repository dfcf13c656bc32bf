"""Streaming calls: ``@lb.route`` on an async generator (LLM tokens).

Until the first chunk arrives a stream is just an attempt: it may be hedged (on
time-to-first-token) and retried.  The first stream to yield is *committed*: every other
attempt is closed and cancelled, and from then on there is no retry and no hedge -- the
caller never sees duplicated or interleaved output.  An error after the first chunk
reaches the caller as it is.

Each attempt runs in its own task and hands chunks over through a queue, so the wrapped
generator always runs in one task from start to end (aiohttp's and asyncio's timeouts
rely on that).  For streams, the call's ``timeout`` bounds the time to the *first*
chunk, and ``idle_timeout`` bounds every gap after it (a long generation is not an error;
a silent one is).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ._call import _avoid, next_retry
from ._errors import (
    Attempt,
    AttemptsExhausted,
    BalancerClosed,
    DeadlineExceeded,
    NoEndpointAvailable,
    StreamIdleTimeout,
)
from ._state import EndpointState

if TYPE_CHECKING:
    from ._balancer import Balancer

__all__ = ["make_stream_route"]

_CHUNK, _END, _ERROR = 0, 1, 2
_TTFT_ALPHA = 0.2  # weight of a new sample in the per-endpoint TTFT average (stats only)


class _StreamAttempt:
    __slots__ = ("first_at", "hedge", "probe", "started", "state", "t0", "task")

    def __init__(self, state: EndpointState, probe: int, t0: float, hedge: bool) -> None:
        self.state = state
        self.probe = probe
        self.t0 = t0
        self.hedge = hedge
        self.first_at: float | None = None
        self.started = False
        self.task: asyncio.Task[None] | None = None


async def _pump(
    lb: Balancer,
    att: _StreamAttempt,
    fn: Callable[..., AsyncIterator[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: asyncio.Queue[tuple[_StreamAttempt, int, Any]],
) -> None:
    att.started = True  # from here on every exit path releases the slot
    s = att.state
    chunks = 0
    agen = fn(s.endpoint, *args, **kwargs)
    try:
        async for chunk in agen:
            if chunks == 0:
                now = lb._now()
                att.first_at = now
                ttft = now - att.t0
                s.observe(ttft, now)  # for streams, load-aware picking uses TTFT
                s.ttft = ttft if s.ttft is None else s.ttft + _TTFT_ALPHA * (ttft - s.ttft)
            chunks += 1
            out.put_nowait((att, _CHUNK, chunk))
    except asyncio.CancelledError:
        lb._cancelled(s, att.probe)
        raise
    except Exception as exc:
        lb._failed(s, att.t0, exc, att.probe)
        out.put_nowait((att, _ERROR, exc))
    except BaseException:
        lb._cancelled(s, att.probe)
        raise
    else:
        lb._succeeded(s, att.t0, att.probe, observe=att.first_at is None)
        out.put_nowait((att, _END, None))
    finally:
        if att.first_at is not None:
            s.chunks += chunks
            s.stream_time += lb._now() - att.first_at
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await aclose()


def make_stream_route(
    lb: Balancer,
    fn: Callable[..., AsyncIterator[Any]],
    key: Callable[..., object] | None,
    timeout: float | None,
    idle_timeout: float | None = None,
) -> Callable[..., AsyncGenerator[Any, None]]:
    async def stream(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        k = key(*args, **kwargs) if key is not None else None
        # aclosing: closing this stream closes the inner one (and frees its slot) at once.
        async with contextlib.aclosing(
            _stream_call(lb, fn, args, kwargs, k, timeout, idle_timeout)
        ) as inner:
            async for item in inner:
                yield item

    return functools.wraps(fn)(stream)


async def _stream_call(
    lb: Balancer,
    fn: Callable[..., AsyncIterator[Any]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    key: object,
    timeout: float | None,
    idle_timeout: float | None,
) -> AsyncGenerator[Any, None]:
    if lb._closed:
        raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
    lb._calls += 1
    loop = asyncio.get_running_loop()
    started = lb._now()
    hedger = lb._hedger
    budget = lb._budget
    retry = lb._retry
    if hedger is not None:
        hedger.budget.deposit(started)
    if budget is not None:
        budget.deposit(started)
    out: asyncio.Queue[tuple[_StreamAttempt, int, Any]] = asyncio.Queue()
    live: list[_StreamAttempt] = []
    tried: set[EndpointState] = set()
    attempts: list[Attempt] = []
    hedges_left = hedger.policy.max_hedges if hedger is not None else 0
    deadline = None if timeout is None else started + timeout

    def launch(exclude: set[EndpointState] | None, hedge: bool) -> _StreamAttempt | None:
        now = lb._now()
        s, probe = lb._acquire(key, exclude, now)
        if hedge and s in tried:
            lb._cancelled(s, probe)
            s.requests -= 1
            return None
        att = _StreamAttempt(s, probe, now, hedge)
        att.task = loop.create_task(_pump(lb, att, fn, args, kwargs, out))

        def never_ran(task: asyncio.Task[None], att: _StreamAttempt = att) -> None:
            if not att.started:
                lb._cancelled(att.state, att.probe)

        att.task.add_done_callback(never_ran)
        live.append(att)
        tried.add(s)
        return att

    committed: _StreamAttempt | None = None
    try:
        try:
            launch(None, False)
        except NoEndpointAvailable:
            lb._calls_failed += 1
            raise
        next_hedge = (
            started + hedger.current_delay() if hedger is not None and hedges_left else None
        )
        # Phase 1: race for the first chunk.
        while committed is None:
            now = lb._now()
            wait = None
            if next_hedge is not None:
                wait = max(0.0, next_hedge - now)
            if deadline is not None:
                left = deadline - now
                if left <= 0:
                    lb._calls_failed += 1
                    raise DeadlineExceeded(timeout or 0.0, attempts)
                wait = left if wait is None else min(wait, left)
            try:
                if wait is None:
                    att, kind, payload = await out.get()
                else:
                    async with asyncio.timeout(wait):
                        att, kind, payload = await out.get()
            except TimeoutError:
                now = lb._now()
                if deadline is not None and now >= deadline:
                    lb._calls_failed += 1
                    raise DeadlineExceeded(timeout or 0.0, attempts) from (
                        attempts[-1].error if attempts else None
                    )
                if next_hedge is not None and now >= next_hedge:
                    assert hedger is not None
                    hedges_left -= 1
                    next_hedge = now + hedger.current_delay() if hedges_left > 0 else None
                    if hedger.budget.try_withdraw():
                        from ._hedge import _prefer_elsewhere

                        try:
                            att2 = launch(_prefer_elsewhere(lb, tried), True)
                        except NoEndpointAvailable:
                            att2 = None
                        if att2 is not None:
                            att2.state.hedges_sent += 1
                            lb._hedges_sent += 1
                    else:
                        lb._hedges_denied += 1
                continue
            if kind == _ERROR:
                live.remove(att)
                attempts.append(
                    Attempt(
                        endpoint=att.state.endpoint,
                        error=payload,
                        duration=lb._now() - att.t0,
                        hedge=att.hedge,
                    )
                )
                if live:
                    continue  # another attempt may still produce the first chunk
                if retry is None:
                    lb._calls_failed += 1
                    if len(attempts) == 1:
                        raise payload
                    raise AttemptsExhausted(attempts, "every stream attempt failed") from payload
                delay = next_retry(lb, payload, attempts, tried, started, deadline)
                if delay > 0:
                    await lb._clock.sleep(delay)
                try:
                    att2 = launch(_avoid(lb, tried, lb._now()), False)
                except NoEndpointAvailable as exc:
                    lb._calls_failed += 1
                    raise AttemptsExhausted(
                        attempts, f"no endpoint to retry on: {exc}"
                    ) from payload
                assert att2 is not None
                att2.state.retries_sent += 1
                lb._retries += 1
                if hedger is not None and hedges_left:
                    next_hedge = lb._now() + hedger.current_delay()
                continue
            # First chunk (or an empty stream): commit to this attempt.
            committed = att
            for other in live:
                if other is not att and other.task is not None:
                    other.task.cancel()
            live[:] = [att]
            if att.hedge:
                att.state.hedges_won += 1
                lb._hedges_won += 1
            if hedger is not None:
                t = lb._now()
                hedger.window.add(t - started, t)
            if kind == _END:
                return
            yield payload
        # Phase 2: relay the committed stream; no retry, no hedge from here on.
        while True:
            if idle_timeout is None:
                att, kind, payload = await out.get()
            else:
                try:
                    async with asyncio.timeout(idle_timeout):
                        att, kind, payload = await out.get()
                except TimeoutError:
                    lb._calls_failed += 1
                    raise StreamIdleTimeout(
                        f"stream from {committed.state.url} sent no chunk for {idle_timeout:g} s"
                    ) from None
            if att is not committed:
                continue  # a cancelled loser's leftovers
            if kind == _CHUNK:
                yield payload
            elif kind == _END:
                return
            else:
                lb._calls_failed += 1
                raise payload
    finally:
        for a in live:
            if a.task is not None and not a.task.done():
                a.task.cancel()
        pending = [a.task for a in live if a.task is not None and not a.task.done()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
