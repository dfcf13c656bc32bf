"""Circuit breaking: the :class:`Breaker` policy and the per-endpoint :class:`BreakerState`.

The policy is frozen configuration shared by every endpoint; the state machine is one
small mutable object per endpoint, owned by the balancer and driven with explicit
timestamps (no clock reads, no I/O, no asyncio), so tests step it with a fake clock.

::

               N consecutive failures, or failure rate >= R over the window
      closed ──────────────────────────────────────────────────────────────▶ open
        ▲                                                                      │
        │ probe succeeded                                  cooldown elapsed    │
        │                                  probe failed                        ▼
        └─────────────────────────────── half_open ◀───────────────────────────┘
                                           │  ▲
                                           └──┘ (back to open, longer cooldown)

``force_open`` / ``force_close`` (active health checks) jump straight to open / closed;
``suspect`` (another process ejected the endpoint, :mod:`lbclient.shared`) goes from
closed straight to half-open, so one probe confirms or refutes it.  Every transition
emits exactly one :class:`~lbclient.BreakerEvent`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Final

import attrs

from .._errors import ConfigError
from .._numbers import is_int
from ..observe.events import BreakerEvent

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "NOT_PROBE",
    "OPEN",
    "Breaker",
    "BreakerState",
    "default_is_failure",
]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

NOT_PROBE: Final = 0
"""The token :meth:`BreakerState.on_pick` returns for an ordinary (non-probe) call."""

_SLOTS: Final = 10  # the failure-rate window is kept as 10 time slots
_NO_SLOT: Final = -(2**62)  # slot id meaning "empty"


def default_is_failure(exc: BaseException) -> bool:
    """Does this error count against the endpoint?  (lbclient's default classifier.)

    Yes for connection errors, timeouts, HTTP 5xx, 408 and 429; no for other HTTP 4xx
    (the request was bad, not the replica), ``asyncio.CancelledError`` (the caller gave
    up, e.g. a lost hedge) and lbclient's own errors.
    """
    from .classify import is_endpoint_failure  # lazy: keeps import order free

    return is_endpoint_failure(exc)


# -- converters (int -> float) then validators (type and range; messages name the value) --


def _to_float(value: float) -> float:
    # Only normalises ints; anything else is left for the validator to reject by name.
    if is_int(value):
        return float(value)
    return value


def _to_optional_float(value: float | None) -> float | None:
    return None if value is None else _to_float(value)


_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _int_at_least(minimum: int) -> _Validator:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_int(value) or value < minimum:
            raise ConfigError(
                f"Breaker {attribute.name} must be an int >= {minimum}, got {value!r}"
            )

    return check


def _number(
    what: str,
    ok: Callable[[float], bool],
    *,
    optional: bool = False,
) -> _Validator:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None and optional:
            return
        if not isinstance(value, float) or not math.isfinite(value) or not ok(value):
            disabled = " or None" if optional else ""
            raise ConfigError(
                f"Breaker {attribute.name} must be a finite number {what}{disabled}, got {value!r}"
            )

    return check


def _max_cooldown(instance: Breaker, attribute: attrs.Attribute[Any], value: Any) -> None:
    _number(">= cooldown", lambda _: True)(instance, attribute, value)
    if value < instance.cooldown:
        raise ConfigError(
            f"Breaker max_cooldown must be >= cooldown ({instance.cooldown!r}), got {value!r}"
        )


def _callable(_: Any, attribute: attrs.Attribute[Any], value: object) -> None:
    if not callable(value):
        raise ConfigError(f"Breaker is_failure must be callable, got {value!r}")


_POSITIVE = _number("> 0", lambda v: v > 0)
_FRACTION = _number("between 0 and 1", lambda v: 0.0 <= v <= 1.0)


@attrs.frozen(kw_only=True, repr=False)
class Breaker:
    """When to stop sending calls to an endpoint, and when to try it again.

    ::

        lb = lbclient.Balancer(urls, breaker=lbclient.Breaker(failures=3, cooldown=2.0))
        strict = attrs.evolve(policy, failure_rate=0.5)   # variants via attrs.evolve

    **Tripping.** ``failures`` consecutive failures open the circuit (the endpoint is
    ejected: no longer picked).  The default 5 is Envoy's ``consecutive_5xx`` and
    Finagle's failure-accrual default.  It is a deliberately long run: a healthy replica
    with a 1% background error rate produces 5 in a row with probability 1e-10, so false
    trips essentially never happen, while a dead replica is found after 5 calls -- about
    one second for a client sending 20 calls/s over 4 replicas, and each of those 5 is
    retried elsewhere, not lost.  A consecutive count misses a replica that fails *some*
    calls (at 30% errors, 5 in a row has probability 0.24%); set ``failure_rate`` to
    catch those too: the circuit also opens when failures are at least that share of the
    outcomes of the last ``window`` seconds (10 s; kept in 10 slots, so resolution is
    ``window / 10``), once at least ``min_calls`` (20) outcomes were seen in it.  The
    minimum matters: at a true 5% error rate, 3 failures in 5 calls (60%) happen with
    probability 1.2e-3, whereas 10 in 20 happen with probability 1e-8.

    **Cooldown.** An open circuit stays open ``cooldown`` seconds (5 s), then goes
    half-open.  Envoy ejects for 30 s (``base_ejection_time``); we start much shorter
    because LLM inference replicas mostly fail transiently -- a full batch queue, an
    overload 503, a restart that reloads cached weights -- and recover in seconds, while
    ejection is expensive: with 4 replicas, ejecting one for 30 s removes 25% of capacity
    and pushes 33% more load on each of the other three, which for replicas running near
    their KV-cache limit can push them into overload and trip them in turn.  So we eject
    briefly, and lengthen the ejection only when the replica proves it is still broken.

    **Growth.** Each re-trip multiplies the cooldown by ``multiplier`` (2.0) up to
    ``max_cooldown`` (60 s): 5, 10, 20, 40, 60, 60 s...  A replica that stays down then
    costs one failed probe per minute instead of one every 5 s.  The growth index is the
    number of trips since the breaker last stayed closed for ``reset_after`` seconds
    (default: ``max_cooldown``); after such a healthy stretch the next trip starts from
    ``cooldown`` again.  ``jitter`` (0.1) multiplies every cooldown by a uniform factor in
    ``[1 - jitter, 1 + jitter]``: when one replica dies, every client process trips at
    the same moment, and +-10% of 5 s spreads their probes over one second instead of
    landing them together.  ``max_cooldown`` caps the cooldown *before* jitter, so the
    longest possible ejection is ``max_cooldown * (1 + jitter)`` (66 s by default).

    **Half-open.** After the cooldown, up to ``half_open_probes`` (1) calls at a time are
    admitted as trial calls ("probes").  The first probe to succeed closes the circuit;
    one that fails reopens it with a longer cooldown.  One probe, because a replica back
    from a restart may still be broken or cold (empty prefix cache, CUDA graphs being
    captured): if it is, exactly one call fails (and is retried elsewhere) instead of
    the endpoint's full share of traffic.

    **Panic.** ``max_ejection`` (0.5) is the largest share of the pool the balancer
    ejects; beyond it the balancer enters panic mode and ignores breakers (Envoy's
    ``max_ejection_percent`` and healthy panic threshold, Finagle's ``PanicMode``).  If
    half the fleet looks bad at once the problem is probably on our side -- the network,
    DNS, our own overload, a request that fails everywhere -- and ejecting everything
    would turn a partial outage into a total one.  ``1.0`` disables panic mode.

    **What counts.** ``is_failure(exc)`` decides whether an error counts against the
    endpoint.  The default counts connection errors, timeouts, 5xx, 408 and 429, and not
    other 4xx, cancellations or lbclient's own errors (those release a half-open probe
    slot without a verdict).  Pass your own predicate to change it.

    Units: every duration is in seconds; every share is a fraction in ``[0, 1]``.
    """

    failures: int = attrs.field(default=5, validator=_int_at_least(1))
    failure_rate: float | None = attrs.field(
        default=None,
        converter=_to_optional_float,
        validator=_number("in (0, 1]", lambda v: 0.0 < v <= 1.0, optional=True),
    )
    window: float = attrs.field(default=10.0, converter=_to_float, validator=_POSITIVE)
    min_calls: int = attrs.field(default=20, validator=_int_at_least(1))
    cooldown: float = attrs.field(default=5.0, converter=_to_float, validator=_POSITIVE)
    max_cooldown: float = attrs.field(default=60.0, converter=_to_float, validator=_max_cooldown)
    multiplier: float = attrs.field(
        default=2.0, converter=_to_float, validator=_number(">= 1", lambda v: v >= 1.0)
    )
    jitter: float = attrs.field(default=0.1, converter=_to_float, validator=_FRACTION)
    half_open_probes: int = attrs.field(default=1, validator=_int_at_least(1))
    reset_after: float | None = attrs.field(
        default=None,
        converter=_to_optional_float,
        validator=_number("> 0", lambda v: v > 0, optional=True),
    )
    max_ejection: float = attrs.field(default=0.5, converter=_to_float, validator=_FRACTION)
    is_failure: Callable[[BaseException], bool] = attrs.field(
        default=default_is_failure, validator=_callable
    )

    @property
    def reset_period(self) -> float:
        """Seconds of healthy closed time that reset the cooldown growth (``reset_after``
        or, when it is ``None``, ``max_cooldown``)."""
        return self.max_cooldown if self.reset_after is None else self.reset_after

    def base_cooldown(self, trip: int) -> float:
        """The un-jittered cooldown of trip ``trip`` (0-based) since the last reset:
        ``min(max_cooldown, cooldown * multiplier ** trip)``."""
        if trip <= 0:
            return self.cooldown
        try:
            grown = self.cooldown * self.multiplier**trip
        except OverflowError:
            return self.max_cooldown
        return min(self.max_cooldown, grown)

    def __repr__(self) -> str:
        parts = []
        for field in attrs.fields(Breaker):
            value = getattr(self, field.name)
            if value == field.default:
                continue
            if field.name == "is_failure":
                shown = getattr(value, "__qualname__", None) or repr(value)
            else:
                shown = repr(value)
            parts.append(f"{field.name}={shown}")
        return f"lbclient.Breaker({', '.join(parts)})"


class BreakerState:
    """One endpoint's circuit breaker: an explicit ``closed / open / half_open`` machine.

    Owned and driven by the balancer on the event loop; every method takes the current
    time ``now`` (seconds, the balancer's clock) and never reads a clock itself.

    The call protocol::

        if state.available(now):           # may move open -> half_open
            probe = state.on_pick(now)     # NOT_PROBE (0), or a half-open episode id
            ...                            # send the call
            state.on_success(now, probe)   # or on_failure(now, probe) / on_ignored(now, probe)

    **The probe token.** ``on_pick`` returns ``NOT_PROBE`` (``0``, falsy) for an ordinary
    call and, for a trial call admitted while half-open, a positive int naming that
    half-open episode (so ``if probe:`` means "this call was admitted as a probe"). Hand it
    back unchanged to the outcome method; any value that is not the current episode's int (``0``,
    ``None``, an old token, anything else) is treated as an ordinary call. Only an outcome
    carrying the *current* episode's token gives a verdict (closes or reopens) and frees a
    probe slot. So a call sent while the circuit was closed that finishes after it went
    half-open cannot close it (it says nothing about the replica *after* the cooldown), and
    a probe from an earlier half-open episode (the breaker was forced open or closed
    meanwhile) cannot free a slot it no longer holds. Such stale outcomes while open or
    half-open change nothing except ``last_failure_at``; while closed every outcome counts,
    whatever its token (a late probe finishing after its sibling closed the circuit is still
    a real observation of the replica's health).

    Attributes (read-only for everyone but this class): ``state``, ``trips`` (total
    transitions to open), ``streak`` (trips since the growth last reset, no longer
    counted once the cooldown reaches ``max_cooldown``: the next cooldown is
    ``policy.base_cooldown(streak)``), ``consecutive_failures`` (failures
    counted since the last success or close, probes included), ``opened_at`` /
    ``reopen_at`` (of the current or last open period; ``-inf`` before any),
    ``last_failure_at`` (``-inf`` before any), ``probes_in_flight``.
    """

    __slots__ = (
        "_calls",
        "_closed_since",
        "_emit",
        "_episode",
        "_fails",
        "_rng",
        "_slot_ids",
        "_slot_width",
        "consecutive_failures",
        "last_failure_at",
        "opened_at",
        "policy",
        "probes_in_flight",
        "reopen_at",
        "state",
        "streak",
        "trips",
        "url",
    )

    def __init__(
        self,
        policy: Breaker,
        url: str,
        *,
        rng: random.Random,
        emit: Callable[[BreakerEvent], None] | None = None,
    ) -> None:
        self.policy = policy
        self.url = url
        self._rng = rng
        self._emit = emit
        self.state: str = CLOSED
        self.trips = 0
        self.streak = 0
        self.consecutive_failures = 0
        self.opened_at = -math.inf
        self.reopen_at = -math.inf
        self.last_failure_at = -math.inf
        self.probes_in_flight = 0
        self._episode = 0  # id of the current/last half-open episode (probe tokens)
        self._closed_since: float | None = None  # None: closed since creation
        rated = policy.failure_rate is not None
        self._slot_width = policy.window / _SLOTS
        self._slot_ids = [_NO_SLOT] * _SLOTS if rated else []
        self._calls = [0] * _SLOTS if rated else []
        self._fails = [0] * _SLOTS if rated else []

    # -- picking -----------------------------------------------------------------------

    def available(self, now: float) -> bool:
        """Can this endpoint be picked at ``now``?

        Closed: yes.  Open: no, until ``reopen_at``, when it turns half-open (emitting an
        event).  Half-open: only while fewer than ``half_open_probes`` probes are out.
        """
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if now < self.reopen_at:
                return False
            self._half_open(now)
        return self.probes_in_flight < self.policy.half_open_probes

    def on_pick(self, now: float) -> int:
        """A call is being sent to this endpoint; returns its probe token.

        ``NOT_PROBE`` (0) unless the breaker is half-open with a free probe slot, in which
        case the slot is taken and the current episode id (an int > 0) is returned.  Picking an
        endpoint that is open or has no free slot (panic mode does) sends an ordinary call.
        """
        if self.state == HALF_OPEN and self.probes_in_flight < self.policy.half_open_probes:
            self.probes_in_flight += 1
            return self._episode
        return NOT_PROBE

    # -- outcomes ----------------------------------------------------------------------

    def on_success(self, now: float, probe: object = NOT_PROBE) -> None:
        """The call succeeded.  Closed: resets the failure run.  A current probe: closes."""
        if self.state == CLOSED:
            self.consecutive_failures = 0
            if self._slot_ids:
                self._record(now, failed=False)
        elif self._is_current_probe(probe):
            self.probes_in_flight -= 1
            self._close(now, "probe succeeded")

    def on_failure(self, now: float, probe: object = NOT_PROBE) -> None:
        """The call failed (``policy.is_failure`` said so).

        Closed: extends the failure run and may trip on it or on the failure rate.  A
        current probe: reopens with a longer cooldown.  Stale calls: only noted.
        """
        self.last_failure_at = now
        if self.state == CLOSED:
            self.consecutive_failures += 1
            n = self.consecutive_failures
            if n >= self.policy.failures:
                self._open(now, f"{n} consecutive failure{'s' if n != 1 else ''}")
            elif self._slot_ids:
                self._record(now, failed=True)
                self._check_rate(now)
        elif self._is_current_probe(probe):
            self.probes_in_flight -= 1
            self.consecutive_failures += 1
            self._open(now, "probe failed")

    def on_ignored(self, now: float, probe: object = NOT_PROBE) -> None:
        """The call ended without a verdict (cancelled, or an error that is not the
        endpoint's fault such as a 4xx): frees a probe slot, changes nothing else."""
        if self._is_current_probe(probe):
            self.probes_in_flight -= 1

    # -- health checks -----------------------------------------------------------------

    def force_open(self, now: float, reason: str = "health check failed") -> bool:
        """Open now (from closed or half-open), with the next cooldown of the growth.

        Returns whether a transition happened: an already-open breaker keeps its
        ``reopen_at``, and no event is emitted.
        """
        if self.state == OPEN:
            return False
        self._open(now, reason)
        return True

    def force_close(self, now: float, reason: str = "health check passed") -> bool:
        """Close now (from open or half-open).  Returns whether a transition happened."""
        if self.state == CLOSED:
            return False
        self._close(now, reason)
        return True

    def allow_probe(self, now: float) -> bool:
        """Let an open breaker through to half-open now (a passing health check): the
        next pick is a probe.  Returns whether anything changed."""
        if self.state != OPEN:
            return False
        self.reopen_at = now
        return True

    def suspect(self, now: float, reason: str) -> bool:
        """Closed -> half-open at once, without a trip: the next call is a probe whose
        outcome decides (success closes, failure opens with the usual cooldown).  What
        another process's ejection does here when nothing local agrees yet
        (:mod:`lbclient.shared`): one call confirms or refutes it.  Unlike
        :meth:`force_open` it neither counts a trip nor grows the next cooldown.
        Returns whether a transition happened (only a closed breaker moves)."""
        if self.state != CLOSED:
            return False
        self.state = HALF_OPEN
        self.probes_in_flight = 0
        self._episode += 1
        self._event(CLOSED, now, reason, None)
        return True

    def next_change(self, now: float) -> float | None:
        """When this breaker changes availability on its own: ``reopen_at`` while open
        (it turns half-open then; may already be past, meaning "refresh now"), else
        ``None`` (closed and half-open change only on outcomes)."""
        return self.reopen_at if self.state == OPEN else None

    # -- internals ---------------------------------------------------------------------

    def _is_current_probe(self, probe: object) -> bool:
        return (
            type(probe) is int  # not a bool: True == 1 would match episode 1
            and probe == self._episode
            and self.state == HALF_OPEN
            and self.probes_in_flight > 0
        )

    def _open(self, now: float, reason: str) -> None:
        policy = self.policy
        old = self.state
        since = self._closed_since
        if old == CLOSED and since is not None and now - since >= policy.reset_period:
            self.streak = 0
        base = policy.base_cooldown(self.streak)
        if base < policy.max_cooldown:
            self.streak += 1  # stops growing at the cap, so the power cannot overflow
        jitter = policy.jitter
        cooldown = base * self._rng.uniform(1.0 - jitter, 1.0 + jitter) if jitter else base
        self.state = OPEN
        self.trips += 1
        self.opened_at = now
        self.reopen_at = now + cooldown
        self.probes_in_flight = 0
        self._clear_window()
        self._event(old, now, reason, cooldown)

    def _half_open(self, now: float) -> None:
        self.state = HALF_OPEN
        self.probes_in_flight = 0
        self._episode += 1
        self._event(OPEN, now, f"cooldown {self.reopen_at - self.opened_at:.1f} s elapsed", None)

    def _close(self, now: float, reason: str) -> None:
        old = self.state
        self.state = CLOSED
        self.probes_in_flight = 0
        self._closed_since = now
        self._clear_window()
        failures = self.consecutive_failures
        self.consecutive_failures = 0
        self._event(old, now, reason, None, failures)

    def _event(
        self,
        old: str,
        now: float,
        reason: str,
        cooldown: float | None,
        failures: int | None = None,
    ) -> None:
        # State is fully updated before the listener runs, so a listener that raises or
        # re-enters (reads available()) sees a consistent machine.
        if self._emit is not None:
            self._emit(
                BreakerEvent(
                    self.url,
                    old,
                    self.state,
                    now,
                    reason,
                    self.consecutive_failures if failures is None else failures,
                    cooldown,
                )
            )

    # Sliding failure-rate window: _SLOTS buckets of window/_SLOTS seconds each, keyed by
    # absolute slot number (floor(now / width)); a bucket whose id is stale is reused.
    # The window therefore spans between 9/10 and 10/10 of `window` seconds.

    def _record(self, now: float, *, failed: bool) -> None:
        slot = int(now // self._slot_width)
        i = slot % _SLOTS
        if self._slot_ids[i] != slot:
            self._slot_ids[i] = slot
            self._calls[i] = 0
            self._fails[i] = 0
        self._calls[i] += 1
        if failed:
            self._fails[i] += 1

    def _check_rate(self, now: float) -> None:
        policy = self.policy
        rate_limit = policy.failure_rate
        assert rate_limit is not None
        newest = int(now // self._slot_width)
        oldest = newest - _SLOTS + 1
        calls = fails = 0
        for i in range(_SLOTS):
            if oldest <= self._slot_ids[i] <= newest:
                calls += self._calls[i]
                fails += self._fails[i]
        if calls >= policy.min_calls and fails / calls >= rate_limit:
            self._open(
                now, f"failure rate {fails / calls:.0%} over {policy.window:g} s ({calls} calls)"
            )

    def _clear_window(self) -> None:
        if self._slot_ids:
            for i in range(_SLOTS):
                self._slot_ids[i] = _NO_SLOT

    def __repr__(self) -> str:
        return (
            f"<BreakerState {self.url} {self.state} trips={self.trips} "
            f"consecutive_failures={self.consecutive_failures}>"
        )
