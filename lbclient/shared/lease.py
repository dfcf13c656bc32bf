"""Fleet-wide tenant quotas, process side: local buckets fed by leases.

Admission never waits for Redis: it charges a :class:`LeasedBucket` in process memory,
exactly as it charges a local :class:`~lbclient.admission.quota.Bucket`.  What fills
the bucket depends on the link's mode:

* **leasing** (Redis answers) -- only leases: every sync the process asks the fleet
  bucket in Redis for about two syncs' worth of its own demand (:func:`plan`), the
  script grants a slice in proportion to its share of the fleet's demand, and what the
  process holds beyond that is given back.  The fleet total can never exceed what the
  Redis bucket hands out: ``requests_per_second`` (plus one burst) across every
  process, whatever their number.
* **local** (before the first lease, or Redis unreachable) -- the process keeps what it
  holds (its last lease) and refills at the quota divided by ``peers``, the live
  process count last seen (at least ``RedisState.expected_peers``), up to the burst
  divided the same way: never the whole quota per process.  What it spends this way is
  owed: charged to the fleet bucket at the next sync, down to empty (never into debt),
  so neither a restarted Redis (whose buckets come back full) nor an outage grants a
  second burst, and the outage is not charged twice.

While the fleet grants all a process asks for (the quota is not contended), the process
may run on credit, up to its share of the burst, while the next lease is on its way (a
tenant's first calls, a sudden rise): the level goes negative and the next leases repay
it before anything else is admitted.  Once a grant comes back short, no more credit:
under contention, only leases admit.
"""

from __future__ import annotations

from ..admission.policy import Quota
from ..admission.quota import Bucket, TenantQuota

__all__ = ["HORIZON", "LeasedBucket", "SharedTenantQuota", "busy", "plan"]

HORIZON = 2.0  # a lease covers this many sync intervals of demand
_RETURN_AT = 2.0  # give back what is held beyond this many leases' worth
_SMOOTH = 0.5  # demand EWMA weight of the newest sync interval


class LeasedBucket(Bucket):
    """One quota dimension (requests or tokens) of one tenant, in one process."""

    __slots__ = (
        "debt",
        "demand",
        "fb_claimed",
        "fb_share",
        "fb_window",
        "fleet_capacity",
        "fleet_rate",
        "largest",
        "leased",
        "leasing",
        "name",
        "planned_at",
        "rate_ewma",
        "starved",
        "unit",
    )

    def __init__(
        self, name: str, rate: float, capacity: float, now: float, peers: int, unit: float
    ) -> None:
        peers = max(1, peers)
        super().__init__(rate / peers, capacity / peers, now)
        self.name = name  # "requests" or "tokens"
        self.unit = unit  # the smallest useful lease (one request)
        self.fleet_rate = rate
        self.fleet_capacity = capacity
        self.leasing = False
        self.demand = 0.0  # asked since the last sync (admitted or not)
        self.largest = unit  # the largest single ask seen lately
        self.rate_ewma = 0.0  # demand per second, smoothed over syncs
        self.planned_at = now
        self.debt = 0.0  # spent while not leasing: owed to the fleet bucket
        self.leased = 0.0  # units leased from the fleet bucket, in all
        self.starved = False  # the last grant was short of the ask: no credit
        # The windowed-counter fallback (no scripts): this process's share of the
        # fleet's demand, and what it claimed in the current one-second window.
        self.fb_share = 1.0 / peers
        self.fb_window = -1
        self.fb_claimed = 0.0

    # -- admission (sync, process memory only) ------------------------------------------

    def _fill(self, now: float) -> None:
        if self.leasing:
            return  # only leases fill it
        if self.level < self.capacity:
            Bucket._fill(self, now)
        else:
            self.stamp = now  # holding a lease beyond the local share: keep it

    def wait_for(self, amount: float, now: float) -> float:
        self.demand += amount
        if amount > self.largest:
            self.largest = amount
        self._fill(now)
        need = min(amount, self.capacity) - self.level
        if need <= 0:
            return 0.0
        if self.leasing and not self.starved and self.level - amount >= -self.capacity:
            # The fleet has granted all this process asked for (the quota is not
            # contended): go on credit, up to this process's share of the burst, while
            # the next lease is on its way.  The leases repay it before anything else is
            # admitted; once a grant comes back short, no more credit.
            return 0.0
        return need / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount
        if not self.leasing:
            self.debt += amount

    def give(self, amount: float) -> None:
        if self.leasing:
            self.level += amount
        else:
            self.level = min(max(self.capacity, self.level), self.level + amount)
            self.debt = max(0.0, self.debt - amount)

    # -- modes (the link) ---------------------------------------------------------------

    def go_local(self, peers: int, now: float) -> None:
        """Redis is out of reach: refill at the quota / ``peers`` from now on, keeping
        what is held (the last lease; credit taken becomes debt)."""
        peers = max(1, peers)
        self.rate = self.fleet_rate / peers
        self.capacity = self.fleet_capacity / peers
        self.stamp = now
        self.leasing = False
        if self.level < 0:
            # Credit no lease will repay now: owed to the fleet bucket when Redis is
            # back, rather than refused here calls that the local share allows.
            self.debt -= self.level
            self.level = 0.0

    def granted(self, grant: float, ask: float) -> None:
        """A lease of ``grant`` units came back for an ask of ``ask``."""
        self.level += grant
        self.leased += grant
        self.starved = grant < ask - 1e-9

    def go_leasing(self, peers: int) -> None:
        """Redis answers: from now on only leases fill the bucket."""
        peers = max(1, peers)
        self.rate = self.fleet_rate / peers  # only for the retry-after estimate
        self.capacity = self.fleet_capacity / peers
        self.leasing = True

    def __repr__(self) -> str:
        mode = "leasing" if self.leasing else "local"
        return f"<LeasedBucket {self.name} {mode} level={self.level:.3g} debt={self.debt:.3g}>"


class SharedTenantQuota(TenantQuota):
    """A tenant's quota whose buckets are slices of fleet-wide ones."""

    __slots__ = ("_peers", "tenant")

    def __init__(self, quota: Quota, now: float, tenant: str, peers: int) -> None:
        self.tenant = tenant
        self._peers = peers
        super().__init__(quota, now)

    def _bucket(self, name: str, rate: float, capacity: float, now: float) -> LeasedBucket:
        return LeasedBucket(name, rate, capacity, now, self._peers, 1.0)

    def buckets(self) -> list[LeasedBucket]:
        out = []
        for bucket in (self.requests, self.tokens):
            if isinstance(bucket, LeasedBucket):
                out.append(bucket)
        return out


def plan(b: LeasedBucket, now: float, interval: float) -> tuple[float, float, float, float]:
    """What to ask the fleet bucket for at this sync: ``(ask, give, debt, demand)`` --
    units to lease, units to give back, units spent without a lease, and the demand
    rate (units per second) the script weighs shares with.  Moves ``debt`` out of
    the bucket at once (and the caller takes ``give`` out when it sends it): if Redis
    never answers they are lost, which under-admits a little, where keeping them could
    admit twice."""
    dt = now - b.planned_at
    if dt > 1e-3:
        rate = b.demand / dt
        b.demand = 0.0
        b.planned_at = now
        b.rate_ewma = rate if b.rate_ewma <= 0 else b.rate_ewma + _SMOOTH * (rate - b.rate_ewma)
        if b.largest > b.unit:
            b.largest = max(b.unit, b.largest * 0.9)  # forget an old large ask slowly
    if b.rate_ewma < 1e-6:
        b.rate_ewma = 0.0
    demand = b.rate_ewma  # not capped at the rate: a burst may be leased while it lasts
    target = demand * HORIZON * interval
    if demand > 0:
        target = max(target, min(b.largest, b.fleet_capacity))
    ask = max(0.0, target - b.level)  # a negative level (credit) is repaid first
    give = 0.0
    if b.level > _RETURN_AT * target and b.level > 0:
        give = b.level - target
    debt = b.debt
    b.debt = 0.0
    return ask, give, debt, demand


def busy(b: LeasedBucket) -> bool:
    """Is ``b`` worth a round trip this sync (demand, something to give back or owe)?"""
    return b.demand > 0 or b.rate_ewma > 0 or b.debt > 0 or b.level != 0
