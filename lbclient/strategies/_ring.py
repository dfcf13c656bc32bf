"""A consistent-hash ring: mmh3 points for virtual nodes, updated incrementally."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence

import mmh3

from ..pool.state import EndpointState

__all__ = ["Ring", "hash_key"]


def hash_key(key: object) -> int:
    """32-bit unsigned mmh3 of a key (str and bytes as they are, anything else by repr)."""
    if isinstance(key, str | bytes):
        return int(mmh3.hash(key, signed=False))
    return int(mmh3.hash(repr(key), signed=False))


@functools.lru_cache(maxsize=16384)
def _points(url: str, count: int) -> tuple[int, ...]:
    return tuple(int(mmh3.hash(f"{url}#{i}", signed=False)) for i in range(count))


class Ring:
    """Sorted virtual-node points and their owners.

    Each endpoint gets ``per x weight / reference weight`` points (at least one, at most
    4x ``per``), where ``per = min(vnodes, max_size // n)`` is fixed when the ring is
    built.  Positions depend only on the URL, so adding one endpoint to n moves about
    1/(n+1) of the keys, all to the newcomer -- and :meth:`update` inserts or deletes just
    that endpoint's points (a few hundred microseconds at 1,000 endpoints) instead of
    rebuilding.  The ring is rebuilt whole only when the pool has grown or shrunk enough
    that ``per`` should change by 2x (amortised O(1) per change).
    """

    __slots__ = ("_max", "_mine", "_per", "_ref_w", "_vnodes", "owners", "points")

    def __init__(self, states: Sequence[EndpointState], vnodes: int, max_size: int) -> None:
        self._vnodes = vnodes
        self._max = max_size
        self._build(states)

    def _build(self, states: Sequence[EndpointState]) -> None:
        n = max(1, len(states))
        self._per = min(self._vnodes, max(1, self._max // n))
        self._ref_w = sum(s.endpoint.weight for s in states) / n if states else 1.0
        self._mine: dict[str, tuple[EndpointState, tuple[int, ...]]] = {}
        pairs: list[tuple[int, int]] = []
        for idx, s in enumerate(states):
            pts = self._points_of(s)
            self._mine[s.url] = (s, pts)
            pairs.extend((p, idx) for p in pts)
        pairs.sort()
        self.points = [p for p, _ in pairs]
        self.owners = [states[i] for _, i in pairs]

    def _points_of(self, s: EndpointState) -> tuple[int, ...]:
        per = self._per
        count = max(1, min(4 * per, round(per * s.endpoint.weight / self._ref_w)))
        return _points(s.url, count)

    def update(self, states: Sequence[EndpointState]) -> None:
        """Make the ring cover exactly ``states`` (by URL and state object)."""
        n = max(1, len(states))
        per = min(self._vnodes, max(1, self._max // n))
        if per * 2 <= self._per or per >= self._per * 2 or not self.points:
            self._build(states)
            return
        wanted = {s.url: s for s in states}
        for url, (s, pts) in list(self._mine.items()):
            if wanted.get(url) is not s:
                self._delete(s, pts)
                del self._mine[url]
        for url, s in wanted.items():
            if url not in self._mine:
                pts = self._points_of(s)
                self._mine[url] = (s, pts)
                points, owners = self.points, self.owners
                for p in pts:
                    i = bisect.bisect_right(points, p)
                    points.insert(i, p)
                    owners.insert(i, s)

    def _delete(self, s: EndpointState, pts: tuple[int, ...]) -> None:
        points, owners = self.points, self.owners
        for p in pts:
            i = bisect.bisect_left(points, p)
            while i < len(points) and points[i] == p:
                if owners[i] is s:
                    del points[i]
                    del owners[i]
                    break
                i += 1

    def start(self, h: int) -> int:
        """Index of the first point clockwise from hash ``h``."""
        i = bisect.bisect_left(self.points, h)
        return 0 if i == len(self.points) else i
