"""One way out for everything the balancer decides: the :class:`Observer` fan-out and
the :class:`Counters` it keeps.

Every event -- breaker, panic, membership, cooldown, and per call: attempt failed, retry,
hedge -- goes through :meth:`Observer.emit`: to the ``lbclient`` logger at the event's
level, then to every listener given as ``Balancer(on_event=...)``.  Call-level events
are built only when someone wants them (a listener, or the logger enabled at their
level), so a healthy fleet pays nothing; and their log lines are rate-limited, so a dying
fleet does not flood the log (listeners still see every event).

Counters live in one place, plain ints a metrics exporter reads at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from .events import POOL_EVENTS, Event, Listener

__all__ = ["Counters", "Observer", "to_listeners"]

log = logging.getLogger("lbclient")

_LOG_BURST = 5  # call events logged per key and window before the rest are suppressed
_LOG_WINDOW = 1.0  # seconds
# Sheds come in thousands when they come: one line, then a count every 10 s.
_SLOW_LOG: dict[str, tuple[int, float]] = {"AdmissionEvent": (1, 10.0)}


class Counters:
    """Call-level totals of one balancer (per-endpoint ones live on the endpoint state).

    * ``calls`` -- calls started; ``calls_failed`` -- calls that raised, and
      ``failed_by`` the same by reason (``"error"``: the call's own error, raised as it
      is; ``"attempts exhausted"``, ``"deadline"``, ``"no endpoint"``, ``"retry budget
      exhausted"``, ``"panic"``, ``"stream idle"``, ...).
    * ``retries`` -- retries sent, ``retries_by`` by the kind of error retried
      (``"status 503"``, ``"connection"``, ``"timeout"``...); ``retries_denied`` -- by the
      retry budget.
    * ``hedges_sent`` / ``hedges_won`` / ``hedges_denied`` (budget spent).
    * ``cooldowns`` -- Retry-After cooldowns started.
    * ``fallbacks`` -- calls this pool could not serve, sent to its fallback pool.
    """

    __slots__ = (
        "calls",
        "calls_failed",
        "cooldowns",
        "failed_by",
        "fallbacks",
        "hedges_denied",
        "hedges_sent",
        "hedges_won",
        "ok",
        "retries",
        "retries_by",
        "retries_denied",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.ok = 0  # calls that returned (or streams that ended) successfully
        self.calls_failed = 0
        self.failed_by: dict[str, int] = {}
        self.retries = 0
        self.retries_by: dict[str, int] = {}
        self.retries_denied = 0
        self.hedges_sent = 0
        self.hedges_won = 0
        self.hedges_denied = 0
        self.cooldowns = 0
        self.fallbacks = 0

    def failed(self, reason: str) -> None:
        """Count one failed call."""
        self.calls_failed += 1
        self.failed_by[reason] = self.failed_by.get(reason, 0) + 1

    def retried(self, kind: str) -> None:
        """Count one retry sent, after an error of ``kind``."""
        self.retries += 1
        self.retries_by[kind] = self.retries_by.get(kind, 0) + 1

    def __repr__(self) -> str:
        return (
            f"<Counters calls={self.calls} failed={self.calls_failed} retries={self.retries} "
            f"hedges={self.hedges_sent}/{self.hedges_won}>"
        )


EventHandler = Callable[[Event], None]


def to_listeners(value: object) -> tuple[EventHandler, ...]:
    """``on_event=``: a callable, a :class:`lbclient.Listener` (an object with an
    ``on_event`` method), or a list of either.  Anything else raises ``TypeError``."""
    if value is None:
        return ()
    items: Iterable[object]
    if callable(getattr(value, "on_event", None)) or callable(value):
        items = (value,)
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise TypeError(value)
    out: list[EventHandler] = []
    for item in items:
        if isinstance(item, type):
            raise TypeError(item)  # a class, not an instance: on_event=MyListener
        method = getattr(item, "on_event", None)
        if callable(method):
            out.append(method)
        elif callable(item):
            out.append(item)
        else:
            raise TypeError(item)
    return tuple(out)


class _Limit:
    __slots__ = ("count", "start", "suppressed")

    def __init__(self, start: float) -> None:
        self.start = start
        self.count = 0
        self.suppressed = 0


class Observer:
    """Fans every event out to the log and the listeners; owns the :class:`Counters`."""

    __slots__ = ("_limits", "_listeners", "_logger", "_now", "counters")

    def __init__(
        self,
        listeners: tuple[EventHandler, ...] = (),
        *,
        now: Callable[[], float],
        logger: logging.Logger = log,
    ) -> None:
        self._listeners = listeners
        self._logger = logger
        self._now = now
        self._limits: dict[Any, _Limit] = {}
        self.counters = Counters()

    def wants(self, level: int) -> bool:
        """Is a call event of this level worth building?  (Cheap: checked per failure.)"""
        return bool(self._listeners) or self._logger.isEnabledFor(level)

    def emit(self, event: Event) -> None:
        """Log ``event`` and hand it to every listener (a listener that raises is logged
        and skipped: it must never fail the call that caused the event)."""
        level = event.level
        if self._logger.isEnabledFor(level):
            if isinstance(event, POOL_EVENTS):
                self._logger.log(level, "%s", event)
            else:
                self._log_limited(event, level)
        for handler in self._listeners:
            try:
                handler(event)
            except Exception:
                self._logger.exception("on_event listener raised for %r", event)

    def _log_limited(self, event: Event, level: int) -> None:
        key = (type(event), getattr(event, "outcome", None), getattr(event, "reason", None))
        burst, window = _SLOW_LOG.get(type(event).__name__, (_LOG_BURST, _LOG_WINDOW))
        now = self._now()
        limit = self._limits.get(key)
        if limit is None or now - limit.start >= window:
            if limit is not None and limit.suppressed:
                self._logger.log(
                    level,
                    "%d similar %s event(s) not logged in the last %.1f s",
                    limit.suppressed,
                    type(event).__name__,
                    now - limit.start,
                )
            limit = self._limits[key] = _Limit(now)
        limit.count += 1
        if limit.count <= burst:
            self._logger.log(level, "%s", event)
        else:
            limit.suppressed += 1

    @property
    def listeners(self) -> tuple[EventHandler, ...]:
        return self._listeners

    def add_listener(self, handler: EventHandler | Listener) -> None:
        """Add a listener (metrics exporters subscribe this way)."""
        self._listeners = self._listeners + to_listeners(handler)
