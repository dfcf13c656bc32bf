"""Immutable event records, and the :class:`Listener` protocol that receives them.

The balancer reports what it decides about the pool as events rather than log lines, so
that you choose where they go (a logger, metrics, a test's list).  Three kinds exist:

* :class:`BreakerEvent` -- an endpoint's circuit breaker changed state
  (``closed -> open -> half_open -> closed``, or forced by an active health check).
* :class:`PanicEvent` -- too large a share of the pool was ejected (more than
  ``Breaker.max_ejection``), so the balancer entered panic mode and picks from every
  endpoint again; or it left panic mode.
* :class:`MembershipEvent` -- an endpoint was added, removed, drained or undrained.

Every event is an ``attrs`` frozen record: safe to keep, compare and hand to another
thread.  ``str(event)`` (same as ``event.message()``) is a one-line log message and
``event.level`` the :mod:`logging` level it deserves: an endpoint being ejected or the
pool panicking is a ``WARNING``; recovery and membership changes are ``INFO``.

::

    class Collect:
        def __init__(self) -> None:
            self.events: list[lbclient.Event] = []

        def on_event(self, event: lbclient.Event) -> None:
            self.events.append(event)

A listener must be quick and must not raise: it runs inline, on the event loop, inside
the call that caused the transition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Protocol, TypeAlias, runtime_checkable

import attrs

__all__ = [
    "BreakerEvent",
    "Event",
    "EventHook",
    "Listener",
    "LoggingListener",
    "MembershipEvent",
    "PanicEvent",
]

_STATES: Final = ("closed", "open", "half_open")
_ACTIONS: Final = ("add", "remove", "drain", "undrain")
_DONE: Final = {"add": "added", "remove": "removed", "drain": "draining", "undrain": "undrained"}


@attrs.frozen
class BreakerEvent:
    """An endpoint's circuit breaker moved from ``old`` to ``new`` state at time ``at``.

    * ``url`` -- the endpoint's url (its identity).
    * ``old`` / ``new`` -- one of ``"closed"``, ``"open"``, ``"half_open"``; never equal.
    * ``at`` -- clock time of the transition, in seconds (the balancer's clock).
    * ``reason`` -- why, for humans: ``"5 consecutive failures"``,
      ``"failure rate 62% over 10 s (25 calls)"``, ``"cooldown 5.0 s elapsed"``,
      ``"probe succeeded"``, ``"probe failed"``, ``"health check failed"``...
    * ``consecutive_failures`` -- the breaker's consecutive-failure count at that moment,
      before any reset the transition itself does (so a close reports the run it ended).
    * ``cooldown`` -- seconds the endpoint stays open (jitter included) when ``new`` is
      ``"open"``; ``None`` for every other transition.

    ``level`` is ``logging.WARNING`` when the circuit opens (an endpoint leaves the
    pool), ``logging.INFO`` otherwise.
    """

    url: str
    old: str = attrs.field(validator=attrs.validators.in_(_STATES))
    new: str = attrs.field(validator=attrs.validators.in_(_STATES))
    at: float
    reason: str
    consecutive_failures: int
    cooldown: float | None = None

    @property
    def level(self) -> int:
        return logging.WARNING if self.new == "open" else logging.INFO

    def message(self) -> str:
        text = f"breaker {self.url}: {self.old} -> {self.new} ({self.reason})"
        if self.cooldown is not None:
            text += f"; ejected for {self.cooldown:.1f} s"
        return text

    def __str__(self) -> str:
        return self.message()


@attrs.frozen
class PanicEvent:
    """The balancer entered (``entered=True``) or left panic mode at time ``at``.

    ``pickable`` of ``total`` endpoints were healthy at that moment.  In panic mode more
    than ``Breaker.max_ejection`` of the pool is ejected, so the balancer ignores the
    breakers and picks from every endpoint: when half the fleet looks broken at once the
    fault is more likely ours (network, DNS, our own overload), and routing to all of
    them keeps the partly-working ones serving.  Entering is a ``WARNING``, leaving an
    ``INFO``.
    """

    entered: bool
    at: float
    pickable: int
    total: int

    @property
    def level(self) -> int:
        return logging.WARNING if self.entered else logging.INFO

    def message(self) -> str:
        if self.entered:
            return (
                f"panic mode entered: only {self.pickable} of {self.total} endpoints "
                "healthy; also serving the ejected ones that failed longest ago"
            )
        return f"panic mode left: {self.pickable} of {self.total} endpoints healthy"

    def __str__(self) -> str:
        return self.message()


@attrs.frozen
class MembershipEvent:
    """Endpoint ``url`` was added, removed, drained or undrained at time ``at``.

    ``action`` is one of ``"add"``, ``"remove"``, ``"drain"``, ``"undrain"``.  Level
    ``INFO``: membership changes are routine (deploys, autoscaling, discovery refresh).
    """

    url: str
    action: str = attrs.field(validator=attrs.validators.in_(_ACTIONS))
    at: float

    @property
    def level(self) -> int:
        return logging.INFO

    def message(self) -> str:
        return f"endpoint {self.url} {_DONE[self.action]}"

    def __str__(self) -> str:
        return self.message()


Event: TypeAlias = BreakerEvent | PanicEvent | MembershipEvent
"""Any event the balancer reports."""

EventHook: TypeAlias = Callable[[Event], None]
"""A plain function that receives events (the callable face of :class:`Listener`)."""


@runtime_checkable
class Listener(Protocol):
    """Receives every event.  Subclass it for the no-op default, or just match its shape.

    ``on_event`` runs inline on the event loop: keep it quick and do not raise.
    """

    def on_event(self, event: Event) -> None:
        """Called once per event, in the order the events happened."""
        return None


class LoggingListener:
    """A :class:`Listener` that logs each event at its ``level`` to a :mod:`logging` logger.

    The default logger is ``logging.getLogger("lbclient")``.
    """

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger if logger is not None else logging.getLogger("lbclient")

    def on_event(self, event: Event) -> None:
        self.logger.log(event.level, "%s", event)

    def __repr__(self) -> str:
        return f"lbclient.LoggingListener({self.logger.name!r})"
