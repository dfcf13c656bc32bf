"""`FleetCounter`: a sum over the whole fleet in fixed windows -- what per-endpoint
:class:`~lbclient.Limits` need to count the fleet's requests and tokens, not one
process's.  (A cost ceiling needs more -- never to grant past it -- and leases instead:
:mod:`lbclient.shared.budget`.)

::

    sent = lb._pool.shared.counter("limit:rpm:http://a", window=60.0)   # internal API
    sent.add(1.0)                 # sync, process memory: the hot path never waits
    others = sent.fleet - sent.own  # the other processes' part, as of the last sync

``add`` accumulates locally; every sync the background task adds what accumulated to
the window's key in Redis (``INCRBYFLOAT``) and reads the fleet total back.  While Redis
is unreachable, :meth:`total` assumes every other live process spends as this one does
(the last fleet total plus this process's unsynced amount times ``peers``), erring on
the safe side for a reader comparing it with a limit.  Windows are
numbered on the Redis server's clock (estimated from ``TIME``), so every process rolls
over at the same moment.  :attr:`own` (what this process put in the synced window)
lets a reader tell the others' part, ``fleet - own`` -- what per-endpoint
:class:`~lbclient.Limits` need (:class:`lbclient.pool.limits.FleetShare`).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["FleetCounter"]


def alone() -> tuple[int, bool]:
    """The status of a process on its own (the default): one peer, connected."""
    return 1, True


class FleetCounter:
    __slots__ = (
        "fleet",
        "lag",
        "name",
        "own",
        "pending",
        "sending",
        "status",
        "window",
        "window_id",
    )

    def __init__(
        self,
        name: str,
        window: float,
        status: Callable[[], tuple[int, bool]] = alone,
        lag: float = 0.0,
    ) -> None:
        self.status = status  # () -> (live peers, connected?): the link's
        # Seconds another process's add may take to show in ``fleet`` here: its sync,
        # then this one's (two sync intervals and a round trip).
        self.lag = lag
        self.name = name
        self.window = window  # seconds
        self.window_id = -1  # the server-clock window the fleet total belongs to
        self.fleet = 0.0  # the fleet total of that window, as of the last sync
        self.own = 0.0  # what this process put in that window (fleet - own: the others')
        self.pending = 0.0  # added here since the last sync
        self.sending = 0.0  # in flight to Redis

    def add(self, amount: float) -> None:
        """Count ``amount`` (sync; sent with the next background sync)."""
        self.pending += amount

    def total(self) -> float:
        """The fleet's total in the current window: the last synced total plus what this
        process added since -- times the live peers while Redis is out of reach (the
        others are assumed to spend alike while nobody can tell)."""
        peers, connected = self.status()
        mine = self.pending + self.sending
        return self.fleet + (mine if connected else mine * max(1, peers))

    def take(self) -> float:
        """Move the pending amount into a sync (``sending``)."""
        amount, self.pending = self.pending, 0.0
        self.sending += amount
        return amount

    def synced(self, window_id: int, fleet: float, sent: float) -> None:
        """Redis took ``sent``; the fleet total of window ``window_id`` is ``fleet``."""
        self.sending = max(0.0, self.sending - sent)
        if window_id != self.window_id:
            self.own = 0.0
        self.own += sent
        self.window_id = window_id
        self.fleet = fleet

    def lost(self, sent: float) -> None:
        """A sync failed: ``sent`` goes back to pending (sent again next time).  A
        sync that timed out may have been applied: counting it twice errs high, which
        is the safe side for a ceiling."""
        self.sending = max(0.0, self.sending - sent)
        self.pending += sent

    def __repr__(self) -> str:
        return f"<FleetCounter {self.name} fleet={self.fleet:.6g} pending={self.pending:.6g}>"
