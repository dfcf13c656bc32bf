"""The three faces of a balanced call: ``@lb.route``, ``lb.call(fn, ...)`` and
``async with lb.pick() as endpoint``."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import _call
from ._endpoint import Endpoint
from ._errors import BalancerClosed, ConfigError, NoEndpointAvailable

if TYPE_CHECKING:
    from ._balancer import Balancer
    from ._state import EndpointState

__all__ = ["PickedEndpoint", "make_route"]


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"timeout must be a number of seconds > 0 or None, got {value!r}")
    return float(value)


def make_route(
    lb: Balancer,
    fn: Callable[..., Any],
    key: Callable[..., object] | None,
    timeout: float | None,
    idle_timeout: float | None = None,
) -> Callable[..., Any]:
    """Wrap ``fn(endpoint, *args, **kwargs)`` so callers call ``wrapped(*args, **kwargs)``."""
    if key is not None and not callable(key):
        raise ConfigError(f"route key must be a callable taking the call's arguments, got {key!r}")
    deadline = _timeout(timeout)
    if deadline is None and lb._retry is not None:
        deadline = lb._retry.timeout
    if inspect.isasyncgenfunction(fn):
        from ._stream import make_stream_route

        return make_stream_route(lb, fn, key, deadline, _timeout(idle_timeout))
    if not inspect.iscoroutinefunction(fn) and not callable(fn):
        raise ConfigError(f"@lb.route needs an async function, got {fn!r}")
    if not inspect.iscoroutinefunction(fn) and not inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects are fine
    ):
        raise ConfigError(
            f"@lb.route needs an 'async def' function (or async generator), got {fn!r}"
        )
    hedged = lb._hedge is not None
    if hedged:
        from ._hedge import _hedged, run_hedged

        if deadline is None and key is None:

            async def hedged_plain(*args: Any, **kwargs: Any) -> Any:
                return await _hedged(lb, fn, args, kwargs, None, None)

            return functools.wraps(fn)(hedged_plain)

        async def hedged_call(*args: Any, **kwargs: Any) -> Any:
            k = key(*args, **kwargs) if key is not None else None
            return await run_hedged(lb, fn, args, kwargs, k, deadline)

        return functools.wraps(fn)(hedged_call)
    if deadline is not None:
        run_deadline = _call.run_with_deadline

        async def deadline_call(*args: Any, **kwargs: Any) -> Any:
            k = key(*args, **kwargs) if key is not None else None
            return await run_deadline(lb, fn, args, kwargs, k, deadline)

        return functools.wraps(fn)(deadline_call)
    if key is not None:
        run = _call.run

        async def keyed_call(*args: Any, **kwargs: Any) -> Any:
            return await run(lb, fn, args, kwargs, key(*args, **kwargs))

        return functools.wraps(fn)(keyed_call)
    if lb._retry is None:
        return functools.wraps(fn)(_fast_route(lb, fn))
    run = _call.run

    async def call(*args: Any, **kwargs: Any) -> Any:
        return await run(lb, fn, args, kwargs, None)

    return functools.wraps(fn)(call)


def _fast_route(lb: Balancer, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    """The hot path with no retry, hedge, key or deadline: inlined for the last µs.

    Equivalent to ``_call.run`` without retries; the bookkeeping of ``_acquire`` and
    ``_succeeded`` is written out here because each Python call costs ~50-100 ns.
    """
    if lb._breaker is not None:
        run = _call.run

        async def generic(*args: Any, **kwargs: Any) -> Any:
            return await run(lb, fn, args, kwargs, None)

        return generic
    now_fn = lb._now
    failed = lb._failed
    cancelled = lb._cancelled
    totals = lb._totals
    exp = math.exp

    async def call(*args: Any, **kwargs: Any) -> Any:
        now = now_fn()
        if now >= lb._next_refresh:  # also -inf when closed: one compare for both
            if lb._closed:
                raise BalancerClosed("this lbclient.Balancer is closed; create a new one")
            lb._rebuild()
        lb._calls += 1
        s = lb._pick_now(now)
        if s is None:
            lb._calls_failed += 1
            raise NoEndpointAvailable(lb._why_empty())
        n = s.inflight + 1
        s.inflight = n
        if n > s.peak_inflight:
            s.peak_inflight = n
        s.requests += 1
        totals.inflight += 1
        try:
            result = await fn(s.endpoint, *args, **kwargs)
        except Exception as exc:
            failed(s, now, exc, 0)
            lb._calls_failed += 1
            raise
        except BaseException:
            cancelled(s, 0)
            raise
        # EndpointState.observe + Balancer._release, inlined.
        t = now_fn()
        rtt = t - now
        cost = s.cost
        n = s.inflight
        if n > s.cap_seen and rtt <= 2.0 * cost:
            s.cap_seen = n
        if rtt > cost:
            s.cost = rtt
        else:
            decay = s.decay
            dt = t - s.stamp
            # exp(-dt/decay) > 0.97 (the clamp) whenever dt < 0.0304 decay: skip the exp.
            w = 0.97 if dt < 0.0304 * decay else exp(-dt / decay)
            s.cost = cost * w + rtt * (1.0 - w)
        s.stamp = t
        i = s._lat_i
        s._lat[i & 255] = rtt
        s._lat_i = i + 1
        n -= 1
        if n >= 0:
            s.inflight = n
            if totals.inflight > 0:
                totals.inflight -= 1
        if n <= 0 and s.idle is not None:
            s.idle.set()
        return result

    return call


class PickedEndpoint:
    """``async with lb.pick(key=...) as endpoint:`` -- one attempt, for code that cannot be
    decorated.  An exception leaving the block counts as that endpoint's failure (and is
    re-raised); ``CancelledError`` only releases the slot.  No retry or hedge: a block
    cannot be re-run for you -- use ``lb.call`` or ``@lb.route`` for those.
    """

    __slots__ = ("_key", "_lb", "_probe", "_state", "_t0")

    def __init__(self, lb: Balancer, key: object) -> None:
        self._lb = lb
        self._key = key
        self._state: EndpointState | None = None
        self._probe = 0
        self._t0 = 0.0

    async def __aenter__(self) -> Endpoint:
        lb = self._lb
        lb._check_open()
        if self._state is not None:
            raise RuntimeError("this lb.pick() context is already in use; call lb.pick() again")
        lb._calls += 1
        self._t0 = lb._now()
        budget = lb._budget
        if budget is not None:
            budget.deposit(self._t0)
        self._state, self._probe = lb._acquire_first(self._key, self._t0)
        return self._state.endpoint

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        s, lb = self._state, self._lb
        if s is None:
            return
        if exc is None:
            lb._succeeded(s, self._t0, self._probe)
        elif isinstance(exc, Exception):
            lb._failed(s, self._t0, exc, self._probe)
            lb._calls_failed += 1
        else:
            lb._cancelled(s, self._probe)
