"""`Shared`: what the pool and the admission gate call when a balancer shares state with
its fleet (``Balancer(shared=...)``).

Every method is synchronous and must not block: it reads or writes process memory and,
at most, queues something for a background task to send.  The pool calls it only off
the success path -- on a counted failure, a breaker transition, a ``Retry-After`` -- and
the gate when it meets a tenant with a quota for the first time, so a balancer with
``shared=`` set picks and admits exactly as fast as one without.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..admission.policy import Quota
    from ..admission.quota import TenantQuota
    from ..observe.events import BreakerEvent
    from ..observe.stats import SharedStats
    from ..pool.state import EndpointState
    from .counter import FleetCounter

__all__ = ["Shared"]


class Shared(Protocol):
    """The fleet-shared state of one balancer, as the pool and the gate see it."""

    def failed(self, s: EndpointState, now: float) -> None:
        """A failure on ``s`` counted against it (its breaker has seen it)."""

    def breaker_event(self, event: BreakerEvent) -> None:
        """A breaker of this pool changed state (after the observer saw the event)."""

    def cooled(self, s: EndpointState, seconds: float, status: int | None, now: float) -> None:
        """``s`` answered ``Retry-After``: a local cooldown of ``seconds`` started."""

    def quota(self, tenant: object, policy: Quota, now: float) -> TenantQuota:
        """The quota runtime of ``tenant`` under ``policy``: a slice of a fleet-wide one."""
        ...

    def counter(self, name: str, window: float) -> FleetCounter:
        """A fleet-wide sum over ``window`` seconds (per-endpoint limits count in it)."""
        ...

    def stats(self) -> SharedStats:
        """What ``lb.stats().shared`` shows."""
        ...
