"""Counting an endpoint's :class:`~lbclient.Limits`: in flight, and two sliding windows.

A :class:`LimitState` lives on the :class:`~lbclient.pool.state.EndpointState` of an
endpoint that has limits (``state.limit``; ``None`` for every other endpoint, so pools
without limits never run this code).  The pool asks it, at pick time, whether the
endpoint can take a call (:meth:`LimitState.full`), charges it when an attempt is sent
(:meth:`LimitState.charge`) and settles a token charge with the real usage
(:meth:`LimitState.settle`).  Everything is synchronous and reads the pool's clock.
"""

from __future__ import annotations

import collections
import math
from typing import TYPE_CHECKING

from ..policies.limits import WINDOW, Limits

if TYPE_CHECKING:
    from .state import EndpointState

__all__ = ["Charge", "LimitState", "Window", "fits"]

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


class LimitState:
    """The runtime side of one endpoint's :class:`~lbclient.Limits`."""

    __slots__ = ("limits", "max_in_flight", "requests", "rpm", "tokens", "tpm")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.max_in_flight = limits.max_in_flight
        self.rpm = limits.requests_per_minute
        self.tpm = limits.tokens_per_minute
        self.requests = Window() if self.rpm is not None else None
        self.tokens = Window() if self.tpm is not None else None

    def carry(self, old: LimitState) -> None:
        """The endpoint's limits changed: keep what the old windows counted."""
        if self.requests is not None and old.requests is not None:
            self.requests = old.requests
        if self.tokens is not None and old.tokens is not None:
            self.tokens = old.tokens

    def too_big(self, tokens: float | None) -> bool:
        """A call of this many estimated tokens can never be sent here."""
        return tokens is not None and self.tpm is not None and tokens > self.tpm

    def full(self, s: EndpointState, now: float, tokens: float | None) -> bool:
        """Is the endpoint at a limit for a call of ``tokens`` estimated tokens?"""
        cap = self.max_in_flight
        if cap is not None and s.inflight >= cap:
            return True
        requests = self.requests
        if requests is not None and not fits(requests.expire(now), 1.0, self.rpm):  # type: ignore[arg-type]
            return True
        window = self.tokens
        return window is not None and not fits(window.expire(now), tokens or 0.0, self.tpm)  # type: ignore[arg-type]

    def charge(self, now: float, tokens: float | None) -> Charge | None:
        """An attempt is sent now: count it; returns the token charge to settle."""
        if self.requests is not None:
            self.requests.add(now, 1.0)
        if self.tokens is not None:
            return self.tokens.add(now, tokens or 0.0)
        return None

    def settle(self, charge: Charge, used: float, now: float) -> None:
        """The attempt's answer said it used ``used`` tokens (input + output)."""
        if self.tokens is not None:
            self.tokens.settle(charge, used, now)

    def free_at(self, s: EndpointState, now: float, tokens: float | None) -> float:
        """Clock time the endpoint could next take this call, as far as the windows
        tell; ``math.inf`` when only calls in flight finishing can free it."""
        when = now
        cap = self.max_in_flight
        if cap is not None and s.inflight >= cap:
            when = math.inf
        if self.requests is not None:
            when = max(when, self.requests.room_at(now, self.rpm, 1.0))  # type: ignore[arg-type]
        if self.tokens is not None:
            when = max(when, self.tokens.room_at(now, self.tpm, tokens or 0.0))  # type: ignore[arg-type]
        return when

    def describe(self, s: EndpointState, now: float) -> str:
        """What the endpoint is at, for an error message."""
        parts = []
        cap = self.max_in_flight
        if cap is not None and s.inflight >= cap:
            parts.append(f"{s.inflight}/{cap} in flight")
        if self.requests is not None and not fits(self.requests.expire(now), 1.0, self.rpm):  # type: ignore[arg-type]
            parts.append(f"{self.requests.total:.0f}/{self.rpm:g} requests in the last minute")
        if self.tokens is not None and self.tokens.expire(now) > 0:
            parts.append(f"{self.tokens.total:.0f}/{self.tpm:g} tokens in the last minute")
        return ", ".join(parts) or "at its limits"
