"""`FleetBudget`: a cost ceiling held by the whole fleet, leased to each process.

A :class:`~lbclient.CostPolicy` ceiling under ``Balancer(shared=RedisState(...))`` is
the fleet's: N processes together spend at most the ceiling per period, not N times it.
As with tenant quotas (:mod:`lbclient.shared.lease`), a call never waits for Redis: the
ledger reserves from the *allowance* this process holds in memory, and the background
task tops the allowance up:

* **leasing** -- every sync the process asks the window's key in Redis for about two
  syncs' worth of its reservations (at least its largest one, and at least 5% of
  ``ceiling / peers``, so an idle process holds a little) beyond what it holds free.
  A small script grants it what is left under the ceiling, at most its ask and at
  most a fair share of what is left (``left / peers``, at least one call's worth: the
  fastest claimer cannot take it all; ``peers`` is the most seen in the window, as a
  restarted Redis counts its peers again from one), in one atomic step; servers that
  refuse scripts get ``INCRBYFLOAT``, whose reply tells what the fleet had claimed
  before the ask (the part refused is given back at once).
  Grants come only from what is left: the fleet's grants never pass the ceiling.  What a
  process holds far beyond its demand is given back, so an idle process does not sit
  on the budget.
* **local** -- before its first grant in a window (the first round after a connect or
  a window's start, a round trip), while Redis is unreachable, and for a second after
  it returns (while the others reconnect and pay their debts), a process may use
  ``ceiling / peers`` (the live processes last counted, at least
  ``expected_peers``), never the whole ceiling.  What it uses beyond its grants is
  *owed*: added to the fleet's key at the next sync, whatever the ceiling says.

Windows are ``period`` seconds on the Redis server's clock, numbered alike by every
process (so the fleet's budget rolls over at the same moment everywhere); calls in
flight at a rollover keep their reservations, counted in the new window.  A process
settles a call by replacing its reservation with its cost (``used`` falls by the
difference, which the next calls may use).
"""

from __future__ import annotations

from collections.abc import Callable

from .counter import alone

__all__ = ["FleetBudget"]

HORIZON = 2.0  # a claim covers this many sync intervals of reservations
FLOOR = 0.05  # ... and at least this share of the ceiling / peers (an idle process's)
GRACE = 1.0  # s after Redis returns: pay debts only, claim nothing new (see ``reconnected``)
_RETURN_AT = 4.0  # give back what is held free beyond this many horizons' worth
_SMOOTH = 0.5  # demand EWMA weight of the newest sync interval


class FleetBudget:
    """One ledger's share of a fleet-wide ceiling (see the module docstring)."""

    __slots__ = (
        "ceiling",
        "claims",
        "demand",
        "fleet",
        "grace",
        "granted",
        "held",
        "in_flight",
        "largest",
        "leased",
        "name",
        "peers",
        "period",
        "reowe",
        "returning",
        "sent_reowe",
        "since",
        "status",
        "used",
        "window_id",
    )

    def __init__(
        self,
        name: str,
        ceiling: float,
        period: float,
        status: Callable[[], tuple[int, bool]] = alone,
    ) -> None:
        self.name = name
        self.ceiling = ceiling
        self.period = period
        self.status = status  # () -> (live peers, connected?): the link's
        self.in_flight: Callable[[], float] = lambda: 0.0  # the ledger's reservations
        self.window_id = -1  # the server-clock window the grants belong to
        self.granted = 0.0  # the fleet's grants to this process in the window
        self.used = 0.0  # reserved and settled here in the window
        self.leased = False  # a claim was answered in this window (else: local share)
        self.returning = 0.0  # granted beyond what the fleet had: given back next round
        self.held = 0.0  # granted when the round in flight was planned
        self.reowe = 0.0  # grants a restarted Redis lost: added again next round
        self.sent_reowe = 0.0  # the part of the round in flight's debt that is ``reowe``
        self.since = 0.0  # reserved since the last sync (demand)
        self.demand = 0.0  # reservations per second, EWMA over syncs
        self.largest = 0.0  # the largest reservation seen (a claim covers at least one)
        self.fleet = 0.0  # the fleet's claims in the window, as of the last reply
        self.claims = 0  # claims answered (stats, tests)
        self.peers = 1  # the most live processes seen in the window
        self.grace = 0  # rounds left of local allowance after Redis returned

    # -- the ledger's side (sync, process memory) ---------------------------------------

    def allowance(self) -> float:
        """What this process may have reserved and spent in the window."""
        peers, connected = self.status()
        if connected and self.leased and not self.grace:
            return self.granted
        # The most peers seen in the window, not the last count: a Redis that just
        # restarted counts the fleet again from one as processes reconnect, and a local
        # share of the whole ceiling then would let each of them spend it.
        return max(self.granted, self.ceiling / max(1, peers, self.peers))

    def room(self) -> float:
        return self.allowance() - self.used

    def reserve(self, amount: float) -> bool:
        """Hold ``amount`` if the allowance has room for it."""
        self.since += amount
        if amount > self.largest:
            self.largest = amount
        if self.used + amount > self.allowance():
            return False
        self.used += amount
        return True

    def settle(self, reserved: float, cost: float) -> None:
        """A call reserved ``reserved`` and cost ``cost``."""
        self.used = max(0.0, self.used + cost - reserved)

    # -- the background task's side -------------------------------------------------------

    def reconnected(self, rounds: int) -> None:
        """Redis is back after an outage: for the next ``rounds`` syncs (about
        :data:`GRACE` seconds, the others' reconnects) stay on the local share and pay
        what is owed, claiming nothing new -- the other processes' outage spending
        reaches the key only as they reconnect, and a claim made before would not see
        it."""
        self.grace = max(self.grace, rounds)

    def roll(self, window_id: int) -> None:
        """The server clock entered window ``window_id``: grants start over; what calls
        in flight reserved is the new window's."""
        if window_id == self.window_id:
            return
        first = self.window_id < 0
        self.window_id = window_id
        self.granted = 0.0
        self.returning = 0.0
        self.reowe = 0.0
        self.leased = False
        self.fleet = 0.0
        self.peers = self.status()[0]
        if not first:  # the first window keeps what was used before any sync
            self.used = self.in_flight()

    def plan(self, elapsed: float, sync_interval: float) -> tuple[float, float, float]:
        """This round's ``(owed, give, ask)``: ``owed - give`` is added to the fleet's
        key unconditionally, ``ask`` is claimed against the ceiling.  Applied to the
        local view at once (:meth:`lost` undoes the owed part)."""
        if elapsed > 0:
            rate = self.since / elapsed
            self.demand = (
                rate if self.demand == 0 else (_SMOOTH * rate + (1 - _SMOOTH) * self.demand)
            )
        self.since = 0.0
        self.held = self.granted
        owed = max(0.0, self.used - self.granted)
        self.granted += owed
        owed += self.reowe  # already in ``granted``
        self.sent_reowe, self.reowe = self.reowe, 0.0
        peers = self.peers = max(self.peers, self.status()[0])
        floor = FLOOR * self.ceiling / max(1, peers)
        target = min(self.ceiling, max(HORIZON * sync_interval * self.demand, self.largest, floor))
        free = self.granted - self.used
        give = self.returning
        self.returning = 0.0
        if self.leased and free > _RETURN_AT * target:
            extra = free - _RETURN_AT * target
            self.granted -= extra
            give += extra
        if self.grace:
            self.grace -= 1
            return owed, give, 0.0
        ask = max(0.0, target - free)
        # A fair share of what is left (the script caps it again with the fresh total).
        ask = min(ask, max(self.largest, (self.ceiling - self.fleet) / max(1, peers)))
        return owed, give, ask

    def answered(self, ask: float, total: float, prev: float, grant: float | None = None) -> None:
        """The fleet's key went from ``prev`` to ``total`` with this round: granted
        ``grant`` (by the script), or -- ``INCRBYFLOAT`` without scripts -- what was
        left under the ceiling before it added ``ask``, the rest given back at once.
        A key holding less than this process's own grants was lost (Redis restarted,
        empty): they are added again next round, so a restart grants no second
        ceiling."""
        if grant is None:
            grant = min(ask, max(0.0, self.ceiling - (total - ask)))
            self.returning += ask - grant
            total -= ask - grant
        if prev + 1e-9 < self.held - self.reowe:
            self.reowe += self.held
        self.granted += grant
        self.fleet = total
        self.leased = True
        self.claims += 1

    def lost(self, owed: float) -> None:
        """A round failed: what it owed is owed again (what it gave back stays given
        up: the fleet may still count it, the safe side)."""
        self.granted -= owed - self.sent_reowe
        self.reowe += self.sent_reowe
        self.sent_reowe = 0.0

    def __repr__(self) -> str:
        return (
            f"<FleetBudget {self.name} used={self.used:.6g} granted={self.granted:.6g} "
            f"ceiling={self.ceiling:g}>"
        )
