"""What other processes report about an endpoint, and what it is worth here.

Each process publishes, per endpoint, its current run of consecutive failures (``run``,
0 once a success ended it) and its breaker trips (``open``, with the time left).  A
receiver keeps the latest report of each peer and weighs them with its own breaker's
run (``local``):

* **eject** -- ``fleet = local + the peers' runs`` (a tripped peer counts at least the
  breaker's ``failures``) reaches ``failures`` *and* at least two independent sources
  agree (this process's own failures count as one, each peer as one).  So when a
  replica dies, the fleet trips after about ``failures`` failures *in all* instead of
  ``failures`` per process -- the failures are counted together -- yet no single
  source is obeyed.
* **suspect** -- exactly one independent peer has tripped and nothing else agrees: the
  endpoint is not ejected but made half-open here, so the next call is a probe.  A
  probe that fails confirms (the breaker opens with its usual cooldown); one that
  succeeds refutes -- and the peers that reported it are not believed about that
  endpoint for ``refute_for`` seconds (one process whose network is flaky costs the
  others one probe per ``refute_for``, not an ejection).
* **none** -- otherwise.

A peer that ejected on fleet evidence reports its trip as *derived*: it counts as its
own run (its local failures), not as a trip, so evidence is not counted twice.  Reports
expire: runs after ``ttl`` seconds without news, trips when their cooldown ends.  All
times are the balancer's clock at receipt (no clock is shared between processes: trips
travel as "seconds left").
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["EJECT", "NONE", "SUSPECT", "Evidence", "Report"]

_FORGET: Final = 60.0  # s: a report with nothing to say for this long is dropped

NONE: Final = "none"
SUSPECT: Final = "suspect"
EJECT: Final = "eject"


class Report:
    """The latest word of one peer about one endpoint."""

    __slots__ = ("at", "derived", "open_until", "run")

    def __init__(self) -> None:
        self.run = 0
        self.at = -math.inf
        self.open_until = -math.inf
        self.derived = False


class Evidence:
    """Peer reports per endpoint url, and the verdict they support (module docstring)."""

    __slots__ = ("_by_url", "_refuted", "refute_for", "ttl")

    def __init__(self, *, ttl: float = 5.0, refute_for: float = 30.0) -> None:
        self.ttl = ttl
        self.refute_for = refute_for
        self._by_url: dict[str, dict[str, Report]] = {}
        self._refuted: dict[str, dict[str, float]] = {}

    def _report(self, url: str, peer: str) -> Report:
        peers = self._by_url.get(url)
        if peers is None:
            peers = self._by_url[url] = {}
        r = peers.get(peer)
        if r is None:
            r = peers[peer] = Report()
        return r

    # -- what peers say ------------------------------------------------------------------

    def run(self, url: str, peer: str, run: int, now: float) -> None:
        """``peer`` has seen ``run`` failures in a row on ``url`` (0: a success)."""
        r = self._report(url, peer)
        r.run = max(0, run)
        r.at = now
        if run == 0:
            r.open_until = -math.inf  # a success: whatever it tripped on is over there

    def opened(
        self, url: str, peer: str, seconds: float, run: int, derived: bool, now: float
    ) -> None:
        """``peer``'s breaker opened on ``url`` for ``seconds`` more."""
        r = self._report(url, peer)
        r.open_until = now + max(0.0, seconds)
        r.run = max(0, run)
        r.at = now
        r.derived = derived

    def closed(self, url: str, peer: str, now: float) -> None:
        """``peer``'s breaker closed on ``url`` (its probe succeeded)."""
        r = self._report(url, peer)
        r.open_until = -math.inf
        r.run = 0
        r.at = now

    def forget(self, url: str) -> None:
        """``url`` left the pool."""
        self._by_url.pop(url, None)
        self._refuted.pop(url, None)

    # -- refutation -------------------------------------------------------------------------

    def refute(self, url: str, peers: set[str], now: float) -> None:
        """A probe here succeeded after ``peers`` reported ``url``: disbelieve them about
        it for ``refute_for`` seconds."""
        until = now + self.refute_for
        refuted = self._refuted.setdefault(url, {})
        for peer in peers:
            refuted[peer] = until
            r = self._by_url.get(url, {}).get(peer)
            if r is not None:
                r.open_until = -math.inf
                r.run = 0

    def _believed(self, url: str, now: float) -> list[tuple[str, Report]]:
        peers = self._by_url.get(url)
        if not peers:
            return []
        refuted = self._refuted.get(url)
        out = []
        for peer, r in list(peers.items()):
            if r.open_until <= now and now - r.at > _FORGET:
                del peers[peer]  # a peer long silent (restarted under a new id, gone)
                continue
            if refuted:
                until = refuted.get(peer)
                if until is not None:
                    if until > now:
                        continue
                    del refuted[peer]
            out.append((peer, r))
        return out

    # -- the verdict --------------------------------------------------------------------

    def weigh(self, url: str, local: int, needed: int, now: float) -> tuple[str, int, set[str]]:
        """``(verdict, fleet run, sources)`` for ``url``, given this process's own run of
        ``local`` failures and a breaker that trips at ``needed``.  ``sources`` names the
        peers whose reports count (``"local"`` for this process)."""
        fleet = local
        sources: set[str] = {"local"} if local > 0 else set()
        tripped: set[str] = set()
        for peer, r in self._believed(url, now):
            if r.open_until > now:
                if r.derived:
                    if r.run > 0:
                        fleet += r.run
                        sources.add(peer)
                else:
                    fleet += max(r.run, needed)
                    sources.add(peer)
                    tripped.add(peer)
            elif r.run > 0 and now - r.at <= self.ttl:
                fleet += r.run
                sources.add(peer)
        if fleet >= needed and len(sources) >= 2:
            return EJECT, fleet, sources
        if tripped:
            return SUSPECT, fleet, tripped
        return NONE, fleet, sources

    def __repr__(self) -> str:
        return f"<Evidence urls={len(self._by_url)} refuted={len(self._refuted)}>"
