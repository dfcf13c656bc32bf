"""`Budget`: a token bucket shared by retries and hedges (Finagle's ``RetryBudget``).

Every call deposits one request; every retry or hedge must withdraw a token first.
Tokens come from two sources: ``ratio`` of the requests seen in the last ``ttl``
seconds, plus a fixed reserve of ``min_per_second * ttl`` so a quiet client can still
retry its rare failures.

Why a budget and not just ``attempts=3``: when the whole fleet is dying, *every* call
fails, and three attempts per call triple the load at exactly the moment the servers
are overloaded -- a retry storm that keeps them down.  With a budget, retries stay
bounded at ``ratio`` extra load (20 % by default) however many calls fail, while a
single flaky replica among healthy ones (a few percent of calls failing) is still
retried in full.  Envoy's retry budget and gRPC's retry throttling (gRFC A6) exist for
the same reason.
"""

from __future__ import annotations

import math

from .._clock import MONOTONIC, Clock
from .._errors import ConfigError

__all__ = ["Budget"]

_SLOTS = 10  # slots per ttl: the window slides in steps of ttl / 10 (Finagle's WindowedAdder)
_EPSILON = 1e-9  # float slack when comparing fractional token counts


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ConfigError(f"{what} must not be NaN, got {value!r}")
    return number


def check_ratio(value: object, what: str) -> float:
    """``value`` as a float in [0, 1], or a ConfigError naming it."""
    ratio = _number(value, what)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"{what} must be in [0, 1], got {value!r}")
    return ratio


def check_non_negative(value: object, what: str) -> float:
    """``value`` as a finite float >= 0, or a ConfigError naming it."""
    number = _number(value, what)
    if not (math.isfinite(number) and number >= 0.0):
        raise ConfigError(f"{what} must be finite and >= 0, got {value!r}")
    return number


def check_positive(value: object, what: str) -> float:
    """``value`` as a finite float > 0, or a ConfigError naming it."""
    number = _number(value, what)
    if not (math.isfinite(number) and number > 0.0):
        raise ConfigError(f"{what} must be finite and > 0, got {value!r}")
    return number


class Budget:
    """How many retries (or hedges) may be sent right now.

    >>> budget = Budget(ratio=0.2, min_per_second=10.0, ttl=10.0)
    >>> budget.deposit()            # once per call, on the hot path
    >>> budget.try_withdraw()       # before each retry or hedge
    True

    * ``ratio`` -- extra load allowed, as a fraction of requests (in [0, 1]; default 0.2:
      at most one retry per five calls when everything fails).
    * ``min_per_second`` -- a floor, so low-traffic clients can retry at all (>= 0;
      default 10/s).  Both defaults are Finagle's; 0 and 0 means "never retry".
    * ``ttl`` -- how long a deposit counts, seconds (> 0; default 10).
    * ``clock`` -- injectable (:class:`lbclient.testing.FakeClock` in tests).

    The guarantee: at each withdrawal at time ``t``, the withdrawals in ``(t - ttl, t]``
    number at most ``ratio * deposits + min_per_second * ttl``, counting deposits made
    in ``[t - ttl - ttl/10, t]``.  The extra ``ttl/10`` is slot granularity: time is cut
    into 10 slots per ``ttl`` and whole slots expire, so a deposit's credit lasts between
    ``ttl`` and ``1.1 * ttl``; the cap on withdrawals is never loosened.  So with the
    defaults and no traffic, at most 100 retries are ever sent in any 10 s.

    ``deposit()`` is O(1): one clock read (none if the caller passes ``now``), one
    division, one comparison and one increment; slots rotate lazily when time has moved
    on.  Counters ``deposits``, ``withdrawals`` and ``denials`` are cumulative.  Not
    thread-safe: like all balancer state it lives on the event loop.
    """

    __slots__ = (
        "_clock",
        "_min_per_second",
        "_ratio",
        "_reserve",
        "_slot",
        "_start_deposits",
        "_start_withdrawals",
        "_ttl",
        "_width",
        "denials",
        "deposits",
        "withdrawals",
    )

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        ttl: float = 10.0,
        clock: Clock = MONOTONIC,
    ) -> None:
        self._ratio = check_ratio(ratio, "Budget ratio")
        self._min_per_second = check_non_negative(min_per_second, "Budget min_per_second")
        self._ttl = check_positive(ttl, "Budget ttl")
        if not callable(getattr(clock, "now", None)):
            raise ConfigError(f"Budget clock must have a now() method, got {clock!r}")
        self._clock = clock
        self._reserve = self._min_per_second * self._ttl
        self._width = self._ttl / _SLOTS
        self.deposits = 0
        self.withdrawals = 0
        self.denials = 0
        # Cumulative counts at the start of each of the last _SLOTS + 1 slots (a ring
        # indexed by slot number): the window is the current slot plus _SLOTS whole ones,
        # and its counts are "cumulative now" minus "cumulative at the window's start".
        self._start_deposits = [0] * (_SLOTS + 1)
        self._start_withdrawals = [0] * (_SLOTS + 1)
        self._slot = clock.now() // self._width

    @property
    def ratio(self) -> float:
        return self._ratio

    @property
    def min_per_second(self) -> float:
        return self._min_per_second

    @property
    def ttl(self) -> float:
        return self._ttl

    def deposit(self, now: float | None = None) -> None:
        """Count one request (call it once per call).  ``now``: the caller's own
        timestamp on this budget's clock, to save a clock read."""
        slot = (self._clock.now() if now is None else now) // self._width
        if slot > self._slot:
            self._rotate(slot)
        self.deposits += 1

    def try_withdraw(self, now: float | None = None) -> bool:
        """Take one token for a retry or hedge: True if allowed (and counted), False if the
        budget is spent (counted in ``denials``; send no retry)."""
        slot = (self._clock.now() if now is None else now) // self._width
        if slot > self._slot:
            self._rotate(slot)
        if self._available() >= 1.0 - _EPSILON:
            self.withdrawals += 1
            return True
        self.denials += 1
        return False

    def balance(self, now: float | None = None) -> float:
        """Tokens available now (fractional, never negative)."""
        slot = (self._clock.now() if now is None else now) // self._width
        if slot > self._slot:
            self._rotate(slot)
        return max(0.0, self._available())

    def _available(self) -> float:
        oldest = int(self._slot + 1) % (_SLOTS + 1)  # == slot - _SLOTS in the ring
        deposits = self.deposits - self._start_deposits[oldest]
        withdrawals = self.withdrawals - self._start_withdrawals[oldest]
        return self._ratio * deposits + self._reserve - withdrawals

    def _rotate(self, slot: float) -> None:
        # Slots (self._slot, slot] start now: nothing happened between them, so each one's
        # starting count is today's cumulative count.  At most _SLOTS + 1 entries change.
        first = max(int(self._slot) + 1, int(slot) - _SLOTS)
        for s in range(first, int(slot) + 1):
            i = s % (_SLOTS + 1)
            self._start_deposits[i] = self.deposits
            self._start_withdrawals[i] = self.withdrawals
        self._slot = slot

    def __repr__(self) -> str:
        return (
            f"lbclient.Budget(ratio={self._ratio!r}, min_per_second={self.min_per_second!r}, "
            f"ttl={self._ttl!r})"
        )
