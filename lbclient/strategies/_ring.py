"""A consistent-hash ring: mmh3 points for virtual nodes, built once per membership."""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence

import mmh3

from .._state import EndpointState

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

    Each endpoint gets ``vnodes x weight / mean weight`` points (at least one), scaled
    down when the ring would exceed ``max_size`` points.  Positions depend only on the
    URL, so adding one endpoint to n moves about 1/(n+1) of the keys, all to the newcomer.
    """

    __slots__ = ("owners", "points")

    def __init__(self, states: Sequence[EndpointState], vnodes: int, max_size: int) -> None:
        n = len(states)
        mean_w = sum(s.weight for s in states) / n
        per = min(vnodes, max(1, max_size // n))
        pairs: list[tuple[int, int]] = []
        for idx, s in enumerate(states):
            count = max(1, round(per * s.weight / mean_w))
            pairs.extend((p, idx) for p in _points(s.url, count))
        pairs.sort()
        self.points = [p for p, _ in pairs]
        self.owners = [states[i] for _, i in pairs]

    def start(self, h: int) -> int:
        """Index of the first point clockwise from hash ``h``."""
        i = bisect.bisect_left(self.points, h)
        return 0 if i == len(self.points) else i
