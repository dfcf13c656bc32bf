"""The spend ledger of a :class:`~lbclient.CostPolicy`: reserve, then settle.

::

    charge = ledger.reserve(estimate, now)     # sync: sheds Overloaded("budget") if it
                                               # would pass the ceiling; else holds it
    ...                                        # the call: picks, attempts (each one
                                               # recorded on the charge)
    ledger.settle(charge, now)                 # the real cost replaces the reservation

The admission check and the reservation are one synchronous step on the event loop, so
no number of concurrent calls can all pass a check that only one of them fits (the race
that defeats budgets checked before a call and counted after it).  At any moment
``spent + reserved <= ceiling`` holds for every call admitted; the spend of a period can
only pass the ceiling by what calls in flight cost *beyond* their reservations.

Under shared state (``Balancer(shared=RedisState(...))``) the ceiling is the fleet's:
a reservation must also fit in the allowance this process leased from the fleet
(:class:`~lbclient.shared.budget.FleetBudget`, topped up in the background, never
awaited), and the fleet's grants never pass the ceiling.

Periods are fixed windows of ``period`` seconds from the first reservation.  A
reservation outlives its period: a call reserved at 09:59:59 and settled at 10:00:02 is
charged to the period it ends in (that money is spent now), and its reservation counts
against the new period until then.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from .._errors import Overloaded

if TYPE_CHECKING:
    from ..policies.cost import CostPolicy, Price
    from ..shared.budget import FleetBudget

__all__ = ["AttemptSpend", "Charge", "Ledger", "SpendStats", "spend_stats"]

log = logging.getLogger("lbclient")


class AttemptSpend:
    """One attempt of a metered call: where it ran, how long, what it used.
    :func:`lbclient.report_usage` writes ``usage`` while the attempt runs."""

    __slots__ = ("end", "ok", "price", "start", "url", "usage")

    def __init__(self, url: str, price: Price | None, start: float) -> None:
        self.url = url
        self.price = price
        self.start = start
        self.end: float | None = None
        self.ok = False
        self.usage: tuple[float, float] | None = None

    def cost(self, now: float, estimate_tokens: float) -> float:
        """What it cost: its usage and time at its endpoint's price.  A successful
        attempt on a token-priced endpoint that reported no usage costs its estimate."""
        price = self.price
        if price is None:
            return 0.0
        seconds = max(0.0, (self.end if self.end is not None else now) - self.start)
        usage = self.usage
        if usage is None and self.ok and (price.per_1k_input or price.per_1k_output):
            return price.worst(estimate_tokens, seconds)
        return price.cost(seconds, usage)


class Charge:
    """One call's reservation and its attempts."""

    __slots__ = ("amount", "attempts", "done", "tokens")

    def __init__(self, amount: float, tokens: float) -> None:
        self.amount = amount
        self.tokens = tokens
        self.attempts: list[AttemptSpend] = []
        self.done = False

    def attempt(self, url: str, price: Price | None, start: float) -> AttemptSpend:
        a = AttemptSpend(url, price, start)
        self.attempts.append(a)
        return a


class Ledger:
    """Spend per period, reservations in flight, and what was shed (one balancer)."""

    def __init__(self, policy: CostPolicy, fleet: FleetBudget | None = None) -> None:
        self.policy = policy
        self.fleet = fleet  # this process's lease of the fleet's ceiling, or None
        if fleet is not None:
            fleet.in_flight = lambda: self.reserved
        self.ceiling = policy.ceiling
        self.period = policy.period
        self.period_start: float | None = None
        self.spent = 0.0  # settled this period
        self.reserved = 0.0  # held by calls in flight
        self.in_flight = 0
        self.total = 0.0  # settled since the start
        self.calls = 0  # settled calls
        self.shed = 0  # calls refused by the ceiling
        self.max_overshoot = 0.0  # the most spent + reserved ever passed the ceiling by
        self.by_endpoint: dict[str, float] = {}
        self.history: collections.deque[tuple[float, float]] = collections.deque(maxlen=48)

    def _roll(self, now: float) -> None:
        start = self.period_start
        if start is None:
            self.period_start = now
            return
        if now - start >= self.period:
            n = math.floor((now - start) / self.period)
            self.history.append((start, self.spent))
            self.period_start = start + n * self.period
            self.spent = 0.0

    def ends_in(self, now: float) -> float:
        """Seconds until the current period ends."""
        self._roll(now)
        assert self.period_start is not None
        return max(0.0, self.period_start + self.period - now)

    def reserve(self, amount: float, tokens: float, now: float) -> Charge:
        """Hold ``amount`` for a call, or raise :class:`Overloaded` ``("budget")``."""
        self._roll(now)
        ceiling = self.ceiling
        fleet = self.fleet
        if ceiling is not None and (
            self.spent + self.reserved + amount > ceiling
            or (fleet is not None and not fleet.reserve(amount))
        ):
            self.shed += 1
            left = max(0.0, ceiling - self.spent - self.reserved)
            if fleet is not None and self.spent + self.reserved + amount <= ceiling:
                raise Overloaded(
                    "budget",
                    f"shed (budget): this call may cost up to {amount:.4g}; the fleet has "
                    f"claimed {fleet.fleet:.4g} of the {ceiling:g} ceiling this period and "
                    f"this process holds {max(0.0, fleet.room()):.4g} of it free",
                    retry_after=min(1.0, self.ends_in(now)),
                )
            raise Overloaded(
                "budget",
                f"shed (budget): this call may cost up to {amount:.4g}; {self.spent:.4g} spent "
                f"and {self.reserved:.4g} reserved by {self.in_flight} calls in flight leave "
                f"{left:.4g} of the {ceiling:g} ceiling this period",
                retry_after=self.ends_in(now),
            )
        self.reserved += amount
        self.in_flight += 1
        return Charge(amount, tokens)

    def settle(self, charge: Charge, now: float) -> float:
        """The call ended: its real cost replaces its reservation.  Returns the cost."""
        if charge.done:
            return 0.0
        charge.done = True
        self._roll(now)
        self.in_flight -= 1
        # Exactly zero with nothing in flight (float sums drift).
        self.reserved = self.reserved - charge.amount if self.in_flight else 0.0
        cost = 0.0
        by = self.by_endpoint
        for a in charge.attempts:
            c = a.cost(now, charge.tokens)
            if c:
                by[a.url] = by.get(a.url, 0.0) + c
                cost += c
        self.spent += cost
        self.total += cost
        self.calls += 1
        if self.fleet is not None:
            self.fleet.settle(charge.amount, cost)
        ceiling = self.ceiling
        if ceiling is not None:
            over = self.spent + self.reserved - ceiling
            if over > self.max_overshoot:
                self.max_overshoot = over
                log.warning(
                    "lbclient: spend passed the %g ceiling by %.4g (calls cost more than "
                    "their reservations: raise estimate_tokens / estimate_seconds)",
                    ceiling,
                    over,
                )
        return cost


@attrs.frozen(kw_only=True)
class SpendStats:
    """``lb.spend()``: what a :class:`~lbclient.CostPolicy` counted (your prices' currency).

    * ``ceiling`` / ``period`` -- the policy's (``None``: no ceiling).
    * ``spent`` -- settled this period; ``reserved`` -- held by the ``in_flight`` calls;
      ``left`` -- what may still be reserved this period (``None`` without a ceiling);
      ``period_ends_in`` -- seconds.
    * ``total`` -- settled since the start, over ``calls`` calls; ``shed`` -- calls
      refused at the ceiling; ``by_endpoint`` -- total spend per endpoint URL.
    * ``max_overshoot`` -- the most ``spent + reserved`` ever passed the ceiling by
      (0 unless calls cost more than their reservations).
    * ``history`` -- ``(period start, spent)`` of past periods, oldest first.
    * ``fleet_claimed`` -- under shared state, what the fleet's processes have claimed
      of the ceiling in the current window (granted to them, spent or held), as of
      this process's last claim; ``None`` without shared state.
    """

    ceiling: float | None
    period: float
    spent: float
    reserved: float
    in_flight: int
    left: float | None
    period_ends_in: float
    total: float
    calls: int
    shed: int
    max_overshoot: float
    by_endpoint: Mapping[str, float]
    history: tuple[tuple[float, float], ...]
    fleet_claimed: float | None = None


def _left(ledger: Ledger, ceiling: float) -> float:
    left = max(0.0, ceiling - ledger.spent - ledger.reserved)
    fleet = ledger.fleet
    return left if fleet is None else min(left, max(0.0, fleet.room()))


def spend_stats(ledger: Ledger, now: float) -> SpendStats:
    ends = ledger.ends_in(now) if ledger.period_start is not None else ledger.period
    ceiling = ledger.ceiling
    return SpendStats(
        ceiling=ceiling,
        period=ledger.period,
        spent=ledger.spent,
        reserved=ledger.reserved,
        in_flight=ledger.in_flight,
        left=None if ceiling is None else _left(ledger, ceiling),
        period_ends_in=ends,
        total=ledger.total,
        calls=ledger.calls,
        shed=ledger.shed,
        max_overshoot=ledger.max_overshoot,
        by_endpoint=dict(ledger.by_endpoint),
        history=tuple(ledger.history),
        fleet_claimed=None if ledger.fleet is None else ledger.fleet.fleet,
    )
