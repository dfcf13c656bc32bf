"""Per-tenant quotas as token buckets, charged by the estimate and settled by real use.

A bucket holds up to ``capacity`` units and refills at ``rate`` units per second.  A
call takes its units at admission (one request, its estimated tokens); when it ends, its
real token use (if known) settles the difference -- unused tokens go back, extra ones
are taken (the bucket may go below zero: a debt that delays the tenant's next calls).
One withdrawal and one settlement per call, exactly: there is no counter to leak.
"""

from __future__ import annotations

from .policy import Quota

__all__ = ["Bucket", "TenantQuota"]


class Bucket:
    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.stamp = now

    def _fill(self, now: float) -> None:
        dt = now - self.stamp
        if dt > 0:
            self.level = min(self.capacity, self.level + dt * self.rate)
            self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` can be taken (0: now)."""
        self._fill(now)
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount

    def give(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class TenantQuota:
    """One tenant's buckets (requests, tokens) under its :class:`Quota`."""

    __slots__ = ("quota", "requests", "tokens")

    def __init__(self, quota: Quota, now: float) -> None:
        self.quota = quota
        b = quota.burst
        rps, tpm = quota.requests_per_second, quota.tokens_per_minute
        self.requests = (
            None if rps is None else self._bucket("requests", rps, max(1.0, rps * b), now)
        )
        self.tokens = None if tpm is None else self._bucket("tokens", tpm / 60.0, tpm * b, now)

    def _bucket(self, name: str, rate: float, capacity: float, now: float) -> Bucket:
        """One dimension's bucket (a fleet-shared quota makes leased ones)."""
        return Bucket(rate, capacity, now)

    def check(self, tokens: float, now: float) -> float:
        """Seconds until a call of ``tokens`` estimated tokens fits (0: it fits now)."""
        wait = 0.0
        if self.requests is not None:
            wait = self.requests.wait_for(1.0, now)
        if self.tokens is not None and tokens > 0:
            wait = max(wait, self.tokens.wait_for(tokens, now))
        return wait

    def charge(self, tokens: float) -> None:
        if self.requests is not None:
            self.requests.take(1.0)
        if self.tokens is not None and tokens > 0:
            self.tokens.take(tokens)

    def refund(self, tokens: float) -> None:
        """Undo :meth:`charge`: a call that never got a slot."""
        if self.requests is not None:
            self.requests.give(1.0)
        if self.tokens is not None and tokens > 0:
            self.tokens.give(tokens)

    def settle(self, estimated: float, used: float) -> None:
        """The call used ``used`` tokens where ``estimated`` were taken."""
        if self.tokens is None:
            return
        if used < estimated:
            self.tokens.give(estimated - used)
        elif used > estimated:
            self.tokens.take(used - estimated)
