"""Counting an endpoint's :class:`~lbclient.Limits`: in flight, and two sliding windows.

A :class:`LimitState` lives on the :class:`~lbclient.pool.state.EndpointState` of an
endpoint that has limits (``state.limit``; ``None`` for every other endpoint, so pools
without limits never run this code).  The pool asks it, at pick time, whether the
endpoint can take a call (:meth:`LimitState.full`), charges it when an attempt is sent
(:meth:`LimitState.charge`) and settles a token charge with the real usage
(:meth:`LimitState.settle`).  Everything is synchronous and reads the pool's clock.

Under fleet-shared state (``Balancer(shared=lbclient.RedisState(...))``) the per-minute
limits are the fleet's, not each process's: every limited window gets a
:class:`FleetShare` -- a :class:`~lbclient.shared.counter.FleetCounter` the charges are
added to (the background task sums them in Redis) and a sliding window of what the
*other* processes sent, fed from the counter's synced totals.  Picking still reads only
process memory; see :class:`FleetShare` for the arithmetic.  ``max_in_flight`` stays per
process: a slot is held by a connection of this process for the length of a call, freed
by its answer -- something only this process sees at once (a fleet count of it would be
a sync behind both ways).
"""

from __future__ import annotations

import collections
import heapq
import math
from typing import TYPE_CHECKING

from ..policies.limits import WINDOW, Limits

if TYPE_CHECKING:
    from ..shared.counter import FleetCounter
    from ..shared.protocol import Shared
    from .state import EndpointState

__all__ = ["Charge", "FleetShare", "LimitState", "Window", "fits"]


Charge = list[float]
"""One entry of a window: ``[time, amount]`` (a list, so a settlement can change it)."""


def fits(total: float, need: float, limit: float) -> bool:
    """Does ``need`` more fit in a window holding ``total`` under ``limit``?  An empty
    window always takes one more (a call bigger than the limit is refused elsewhere)."""
    return total <= 0 or (total < limit and total + need <= limit)


class Window:
    """A sliding sum over the last ``span`` seconds: entries ``[t, amount]`` oldest
    first, and their running ``total`` (amortised O(1) per operation)."""

    __slots__ = ("entries", "span", "total")

    def __init__(self, span: float = WINDOW) -> None:
        self.entries: collections.deque[Charge] = collections.deque()
        self.span = span
        self.total = 0.0

    def expire(self, now: float) -> float:
        """Drop what left the window; returns the total."""
        entries = self.entries
        edge = now - self.span
        while entries and entries[0][0] <= edge:
            self.total -= entries.popleft()[1]
        if not entries:
            self.total = 0.0  # no float drift survives an empty window
        return self.total

    def add(self, now: float, amount: float) -> Charge:
        entry = [now, amount]
        self.entries.append(entry)
        self.total += amount
        return entry

    def settle(self, entry: Charge, amount: float, now: float) -> None:
        """``entry`` really amounted to ``amount`` (if it is still in the window)."""
        if entry[0] > now - self.span and amount >= 0:
            self.total += amount - entry[1]
            entry[1] = amount

    def take_back(self, amount: float) -> None:
        """Lower the newest entries by ``amount`` in all (none below zero)."""
        for entry in reversed(self.entries):
            if amount <= 0:
                break
            cut = min(entry[1], amount)
            entry[1] -= cut
            self.total -= cut
            amount -= cut
        if self.total < 0:
            self.total = 0.0

    def room_at(self, now: float, limit: float, need: float) -> float:
        """Clock time from which ``need`` more fits under ``limit`` (``now`` if it does
        already), from the entries expiring in order."""
        total = self.expire(now)
        if fits(total, need, limit):
            return now
        for t, amount in self.entries:
            total -= amount
            if fits(total, need, limit):
                return t + self.span
        return now  # pragma: no cover - the loop empties the window


class FleetShare:
    """One per-minute limit counted across the fleet (requests or tokens of one endpoint).

    * Charges and settlements of this process go to :attr:`counter` (a
      :class:`~lbclient.shared.counter.FleetCounter`, synced every ``sync_interval``),
      besides the local :class:`Window`.
    * :attr:`others` is a sliding window of what the other processes sent: at each read,
      the counter's synced ``fleet - own`` (the others' part of the current server-clock
      window) is compared with the last one seen and the growth is added, stamped now
      (a peer's settlement that lowered it takes back from the newest entries).  So the
      fleet's usage is ``local + others``, sliding like the local window, about a sync
      behind.
    * What the others sent too recently to show yet is taken to be what this process
      sent over that time (the counter's ``lag``: two syncs and a round trip), once per
      other live process: so N processes starting a burst together do not each spend
      the whole room before a sync tells them about each other (each stops near its
      share), while at a steady rate the estimate is a sliver of a minute's limit.
    * While Redis is out of reach (or not reached yet) the local window is held to
      ``limit / peers`` (the live count last seen, at least ``expected_peers``), as the
      fleet's quotas are -- and to ``limit`` with what the others sent last known.

    Missed: the others' last sync of a server-clock window if this process read that
    window before it (up to one ``sync_interval`` of their traffic, once a minute).
    """

    __slots__ = ("counter", "limit", "others", "recent", "seen", "seen_window")

    def __init__(self, counter: FleetCounter, limit: float) -> None:
        self.counter = counter
        self.limit = limit
        self.others = Window()
        self.recent = Window(counter.lag)  # what this process sent within the lag
        self.seen_window = counter.window_id
        self.seen = counter.fleet - counter.own

    def add(self, now: float, amount: float) -> None:
        """This process sent ``amount`` (a settlement's correction when < 0)."""
        self.counter.add(amount)
        if amount > 0:
            self.recent.add(now, amount)

    def read(self, now: float) -> float:
        """What the other processes sent in the last minute, as of the last sync."""
        c = self.counter
        others = c.fleet - c.own
        if c.window_id != self.seen_window:
            self.seen_window = c.window_id
            grown = others  # a new window: all of it is new
        else:
            grown = others - self.seen
        self.seen = others
        window = self.others
        if grown > 0:
            window.add(now, grown)
        elif grown < 0:
            window.take_back(-grown)
        return window.expire(now)

    def full(self, now: float, local: float, need: float) -> bool:
        """Is the fleet at the limit for ``need`` more, ``local`` being this process's
        window total?"""
        limit = self.limit
        others = self.read(now)
        peers, connected = self.counter.status()
        if not fits(local + others, need, limit):
            return True
        if not connected:
            c = self.counter
            if c.pending > local:  # what left the window need not reach Redis any more
                c.pending = max(0.0, local)
            return not fits(local, need, limit / max(1, peers))
        if peers > 1:
            unseen = (peers - 1) * self.recent.expire(now)
            return not fits(local + others + unseen, need, limit)
        return False

    def free_at(self, now: float, mine: Window, need: float) -> float:
        """When ``need`` more could fit, from both windows' entries expiring (or about a
        lag away, for a call held back by what the others may have sent unseen)."""
        limit = self.limit
        local = mine.expire(now)
        others = self.read(now)
        peers, connected = self.counter.status()
        when = now
        total = local + others
        if not fits(total, need, limit):
            entries = heapq.merge(mine.entries, self.others.entries, key=lambda e: e[0])
            for t, amount in entries:
                total -= amount
                if fits(total, need, limit):
                    when = t + mine.span
                    break
        if not connected:
            when = max(when, mine.room_at(now, limit / max(1, peers), need))
        elif self.full(now, local, need) and when <= now:
            when = now + self.counter.lag  # held back for what the others may have sent
        return when

    def carry(self, old: FleetShare) -> None:
        if old.counter is self.counter:
            self.others, self.seen, self.seen_window = old.others, old.seen, old.seen_window
            self.recent = old.recent


class LimitState:
    """The runtime side of one endpoint's :class:`~lbclient.Limits`."""

    __slots__ = (
        "fleet_requests",
        "fleet_tokens",
        "limits",
        "max_in_flight",
        "requests",
        "rpm",
        "tokens",
        "tpm",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.max_in_flight = limits.max_in_flight
        self.rpm = limits.requests_per_minute
        self.tpm = limits.tokens_per_minute
        self.requests = Window() if self.rpm is not None else None
        self.tokens = Window() if self.tpm is not None else None
        self.fleet_requests: FleetShare | None = None
        self.fleet_tokens: FleetShare | None = None

    def share(self, shared: Shared, url: str) -> None:
        """Count the per-minute limits across the fleet (``Balancer(shared=...)``)."""
        if self.rpm is not None:
            counter = shared.counter(f"limit:rpm:{url}", WINDOW)
            self.fleet_requests = FleetShare(counter, self.rpm)
        if self.tpm is not None:
            counter = shared.counter(f"limit:tpm:{url}", WINDOW)
            self.fleet_tokens = FleetShare(counter, self.tpm)

    def carry(self, old: LimitState) -> None:
        """The endpoint's limits changed: keep what the old windows counted."""
        if self.requests is not None and old.requests is not None:
            self.requests = old.requests
        if self.tokens is not None and old.tokens is not None:
            self.tokens = old.tokens
        if self.fleet_requests is not None and old.fleet_requests is not None:
            self.fleet_requests.carry(old.fleet_requests)
        if self.fleet_tokens is not None and old.fleet_tokens is not None:
            self.fleet_tokens.carry(old.fleet_tokens)

    def too_big(self, tokens: float | None) -> bool:
        """A call of this many estimated tokens can never be sent here."""
        return tokens is not None and self.tpm is not None and tokens > self.tpm

    def full(self, s: EndpointState, now: float, tokens: float | None) -> bool:
        """Is the endpoint at a limit for a call of ``tokens`` estimated tokens?"""
        cap = self.max_in_flight
        if cap is not None and s.inflight >= cap:
            return True
        requests = self.requests
        if requests is not None:
            local = requests.expire(now)
            fleet = self.fleet_requests
            if fleet is None:
                if not fits(local, 1.0, self.rpm):  # type: ignore[arg-type]
                    return True
            elif fleet.full(now, local, 1.0):
                return True
        window = self.tokens
        if window is None:
            return False
        local = window.expire(now)
        fleet = self.fleet_tokens
        if fleet is None:
            return not fits(local, tokens or 0.0, self.tpm)  # type: ignore[arg-type]
        return fleet.full(now, local, tokens or 0.0)

    def charge(self, now: float, tokens: float | None) -> Charge | None:
        """An attempt is sent now: count it; returns the token charge to settle."""
        if self.requests is not None:
            self.requests.add(now, 1.0)
            if self.fleet_requests is not None:
                self.fleet_requests.add(now, 1.0)
        if self.tokens is not None:
            if self.fleet_tokens is not None:
                self.fleet_tokens.add(now, tokens or 0.0)
            return self.tokens.add(now, tokens or 0.0)
        return None

    def settle(self, charge: Charge, used: float, now: float) -> None:
        """The attempt's answer said it used ``used`` tokens (input + output)."""
        window = self.tokens
        if window is not None:
            before = charge[1]
            window.settle(charge, used, now)
            fleet = self.fleet_tokens
            if fleet is not None and charge[1] != before:
                fleet.add(now, charge[1] - before)

    def free_at(self, s: EndpointState, now: float, tokens: float | None) -> float:
        """Clock time the endpoint could next take this call, as far as the windows
        tell; ``math.inf`` when only calls in flight finishing can free it."""
        when = now
        cap = self.max_in_flight
        if cap is not None and s.inflight >= cap:
            when = math.inf
        if self.requests is not None:
            if self.fleet_requests is not None:
                when = max(when, self.fleet_requests.free_at(now, self.requests, 1.0))
            else:
                when = max(when, self.requests.room_at(now, self.rpm, 1.0))  # type: ignore[arg-type]
        if self.tokens is not None:
            need = tokens or 0.0
            if self.fleet_tokens is not None:
                when = max(when, self.fleet_tokens.free_at(now, self.tokens, need))
            else:
                when = max(when, self.tokens.room_at(now, self.tpm, need))  # type: ignore[arg-type]
        return when

    def describe(self, s: EndpointState, now: float) -> str:
        """What the endpoint is at, for an error message."""
        parts = []
        cap = self.max_in_flight
        if cap is not None and s.inflight >= cap:
            parts.append(f"{s.inflight}/{cap} in flight")
        for window, fleet, limit, what in (
            (self.requests, self.fleet_requests, self.rpm, "requests"),
            (self.tokens, self.fleet_tokens, self.tpm, "tokens"),
        ):
            if window is None or limit is None:
                continue
            local = window.expire(now)
            if fleet is None:
                if (what == "tokens" and local > 0) or not fits(local, 1.0, limit):
                    parts.append(f"{local:.0f}/{limit:g} {what} in the last minute")
            else:
                others = fleet.read(now)
                if (what == "tokens" and local + others > 0) or fleet.full(now, local, 1.0):
                    parts.append(
                        f"{local + others:.0f}/{limit:g} {what} in the last minute across "
                        f"the fleet ({local:.0f} from this process)"
                    )
        return ", ".join(parts) or "at its limits"
