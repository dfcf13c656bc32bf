"""Immutable event records, and the :class:`Listener` protocol that receives them.

The balancer reports what it decides as events rather than log lines, so that you choose
where they go (a logger, metrics, a test's list).  Pool events:

* :class:`BreakerEvent` -- an endpoint's circuit breaker changed state
  (``closed -> open -> half_open -> closed``, or forced by an active health check).
* :class:`PanicEvent` -- too large a share of the pool was ejected (more than
  ``Breaker.max_ejection``), so the balancer entered panic mode and picks from every
  endpoint again; or it left panic mode.
* :class:`MembershipEvent` -- an endpoint was added, removed, drained or undrained.
* :class:`CooldownEvent` -- an endpoint answered 429/503 with ``Retry-After``: it is not
  picked for that long.

Call events (one call, one or more attempts):

* :class:`AttemptEvent` -- an attempt failed, was cut by the call's deadline, or lost a
  hedge race while still running; says whether it counted against the endpoint.
* :class:`RetryEvent` -- a retry was scheduled (with its delay and why), or refused
  (budget, attempts, panic...: ``retry=False``).
* :class:`HedgeEvent` -- a backup was sent, won, or denied by the hedging budget.
* :class:`AdmissionEvent` -- a call was shed at admission, or the adaptive limit moved.

Fleet events (``Balancer(shared=lbclient.RedisState(...))``):

* :class:`FleetEvent` -- the link to the shared state changed mode (connected, degraded,
  scripts blocked), or what other processes reported changed an endpoint here (ejected
  on fleet evidence, suspected and probed, a suspicion refuted, a cooldown shared).

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
    "AdmissionEvent",
    "AttemptEvent",
    "BreakerEvent",
    "CooldownEvent",
    "Event",
    "EventHook",
    "FleetEvent",
    "HedgeEvent",
    "Listener",
    "LoggingListener",
    "MembershipEvent",
    "PanicEvent",
    "RetryEvent",
]

_STATES: Final = ("closed", "open", "half_open")
_OUTCOMES: Final = ("failed", "ignored", "cut", "lost")
_HEDGE_ACTIONS: Final = ("sent", "won", "denied")
_ADMISSION_ACTIONS: Final = ("shed", "limit")
_FLEET_ACTIONS: Final = (
    "connected",
    "degraded",
    "scripts",
    "eject",
    "suspect",
    "refuted",
    "cooldown",
)
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


@attrs.frozen
class CooldownEvent:
    """Endpoint ``url`` answered ``status`` with ``Retry-After``: it gets no new picks for
    ``seconds`` (the server's value, capped by ``Retry.max_retry_after``).  ``INFO``."""

    url: str
    seconds: float
    status: int | None
    at: float

    @property
    def level(self) -> int:
        return logging.INFO

    def message(self) -> str:
        why = f"{self.status} with " if self.status is not None else ""
        return f"endpoint {self.url} cooling down for {self.seconds:.3g} s ({why}Retry-After)"

    def __str__(self) -> str:
        return self.message()


@attrs.frozen
class AttemptEvent:
    """One attempt of a call ended badly on ``url`` at time ``at`` after ``duration`` s.

    ``outcome``: ``"failed"`` (it raised ``error`` and that counted against the endpoint),
    ``"ignored"`` (it raised, but the error is not the endpoint's fault: a 4xx, a bug in
    the wrapped code), ``"cut"`` (still running when the call's deadline passed: counted),
    ``"lost"`` (a hedge race was won elsewhere while this attempt had already run much
    longer than its endpoint usually takes: priced as a slow answer).  ``attempt`` is the
    attempt's number in its call (1 = the first), ``hedge`` whether it was a backup.
    ``DEBUG``; a dying fleet is rate-limited in the log (listeners see every event).
    """

    url: str
    outcome: str = attrs.field(validator=attrs.validators.in_(_OUTCOMES))
    error: str
    counted: bool
    attempt: int
    hedge: bool
    duration: float
    at: float

    @property
    def level(self) -> int:
        return logging.DEBUG

    def message(self) -> str:
        kind = "hedge" if self.hedge else f"attempt {self.attempt}"
        verdict = "counted against it" if self.counted else "not its fault"
        return (
            f"{kind} on {self.url} {self.outcome} after {self.duration * 1000:.1f} ms "
            f"({verdict}): {self.error}"
        )

    def __str__(self) -> str:
        return self.message()


@attrs.frozen
class RetryEvent:
    """After attempt ``attempt`` failed on ``url``: retry after ``delay`` s (``retry``) or
    give up.  ``reason``: ``"retry"``, ``"cooldown"`` (every endpoint is cooling down after
    ``Retry-After``: the delay waits for the first to come back), or why not:
    ``"not retryable"``, ``"attempts exhausted"``, ``"deadline"``, ``"retry budget
    exhausted"``, ``"panic"``, ``"no endpoint"``.  A retry is ``DEBUG``; a budget
    denial a ``WARNING`` (rate-limited: the fleet is failing faster than the budget).
    """

    url: str | None
    retry: bool
    reason: str
    delay: float
    attempt: int
    at: float

    @property
    def level(self) -> int:
        return logging.WARNING if self.reason == "retry budget exhausted" else logging.DEBUG

    def message(self) -> str:
        where = f" on {self.url}" if self.url is not None else ""
        if self.retry:
            return f"attempt {self.attempt}{where} failed: retrying in {self.delay * 1000:.1f} ms"
        return f"attempt {self.attempt}{where} failed: giving up ({self.reason})"

    def __str__(self) -> str:
        return self.message()


@attrs.frozen
class HedgeEvent:
    """A backup request: ``"sent"`` to ``url`` after ``delay`` s, ``"won"`` (it answered
    first), or ``"denied"`` (the hedging budget is spent; ``url`` is None).  ``DEBUG``."""

    action: str = attrs.field(validator=attrs.validators.in_(_HEDGE_ACTIONS))
    url: str | None
    delay: float
    at: float

    @property
    def level(self) -> int:
        return logging.DEBUG

    def message(self) -> str:
        if self.action == "denied":
            return f"hedge after {self.delay * 1000:.1f} ms denied: hedging budget spent"
        return f"hedge {self.action} on {self.url} (after {self.delay * 1000:.1f} ms)"

    def __str__(self) -> str:
        return self.message()


@attrs.frozen
class AdmissionEvent:
    """Admission control acted at time ``at``.

    ``action``: ``"shed"`` -- a call of ``tenant`` was refused at once (``reason``: ``"queue
    full"``, ``"wait exceeded"``, ``"throttled"``, ``"quota"``, ``"budget"``), a
    ``WARNING`` (rate-limited in the log); ``"limit"`` -- the adaptive concurrency limit
    moved (``reason``: ``"increase"`` or ``"decrease"``), ``DEBUG``.  ``limit``,
    ``in_flight`` and ``queued`` are the gate's state at that moment.
    """

    action: str = attrs.field(validator=attrs.validators.in_(_ADMISSION_ACTIONS))
    reason: str
    tenant: object
    limit: float
    in_flight: int
    queued: int
    at: float

    @property
    def level(self) -> int:
        return logging.WARNING if self.action == "shed" else logging.DEBUG

    def message(self) -> str:
        if self.action == "limit":
            return (
                f"admission limit {self.reason}d to {self.limit:.1f} "
                f"({self.in_flight} in flight, {self.queued} waiting)"
            )
        who = "" if self.tenant is None else f" of tenant {self.tenant!r}"
        return (
            f"call{who} shed ({self.reason}): limit {self.limit:.0f}, {self.in_flight} in "
            f"flight, {self.queued} waiting"
        )

    def __str__(self) -> str:
        return self.message()


@attrs.frozen
class FleetEvent:
    """The fleet-shared state (:class:`lbclient.RedisState`) acted at time ``at``.

    ``action``:

    * ``"connected"`` -- Redis answers: leases, events and heartbeats flow (``INFO``).
    * ``"degraded"`` -- Redis is unreachable or too slow (``reason`` says which): this
      process runs on what it knows -- its last leases, then each quota divided by
      ``peers``, the live process count last seen (``WARNING``).  No call waits or fails
      because of it.
    * ``"scripts"`` -- the server refuses Lua scripts (a proxy, an ACL): quotas use the
      windowed-counter fallback instead of leases (``WARNING``; never silent).
    * ``"eject"`` -- ``url`` was ejected here on fleet evidence: ``reason`` says how many
      failures in a row how many processes saw (``WARNING``, as a local ejection).
    * ``"suspect"`` -- one other process ejected ``url`` and nothing here agrees yet:
      the next call there is a probe that confirms or refutes it (``INFO``).
    * ``"refuted"`` -- that probe succeeded: the reporting process(es) are not believed
      about ``url`` for a while (``INFO``).
    * ``"cooldown"`` -- another process got ``Retry-After`` from ``url``: it is not
      picked here either for the rest of that time (``INFO``).

    ``peers`` is the number of live lbclient processes sharing the namespace, this one
    included, as last seen.
    """

    action: str = attrs.field(validator=attrs.validators.in_(_FLEET_ACTIONS))
    reason: str
    url: str | None
    peers: int
    at: float

    @property
    def level(self) -> int:
        if self.action in ("degraded", "scripts", "eject"):
            return logging.WARNING
        return logging.INFO

    def message(self) -> str:
        where = f" {self.url}" if self.url is not None else ""
        return f"fleet {self.action}{where}: {self.reason} ({self.peers} peer(s))"

    def __str__(self) -> str:
        return self.message()


Event: TypeAlias = (
    BreakerEvent
    | PanicEvent
    | MembershipEvent
    | CooldownEvent
    | AttemptEvent
    | RetryEvent
    | HedgeEvent
    | AdmissionEvent
    | FleetEvent
)
"""Any event the balancer reports."""

POOL_EVENTS: Final = (BreakerEvent, PanicEvent, MembershipEvent, CooldownEvent, FleetEvent)
"""Events about the pool (logged at their level, never rate-limited)."""

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
