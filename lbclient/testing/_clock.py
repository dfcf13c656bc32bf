"""`FakeClock`: a clock the test drives, so breakers, EWMAs, slow start and hedge
delays are tested without real sleeps."""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["FakeClock"]


class FakeClock:
    """A manual monotonic clock implementing :class:`lbclient.Clock`.

    ``now()`` returns the current fake time; ``advance(seconds)`` moves it forward and
    wakes every ``sleep()`` whose deadline has come.  With ``auto_advance=True`` a
    ``sleep(d)`` moves the clock forward by ``d`` itself and returns at once (useful to
    run retry backoffs instantly while still checking how long they would have been).

    >>> clock = FakeClock()
    >>> clock.advance(1.5); clock.now()
    1.5
    """

    def __init__(self, start: float = 0.0, *, auto_advance: bool = False) -> None:
        self._now = float(start)
        self.auto_advance = auto_advance
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self.slept: list[float] = []
        """Every duration passed to ``sleep()``, in order."""

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot advance a clock backwards: {seconds!r}")
        self._now += seconds
        while self._waiters and self._waiters[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.auto_advance:
            self.advance(max(0.0, seconds))
            await asyncio.sleep(0)
            return
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many ``sleep()`` calls are still waiting."""
        return sum(1 for _, _, f in self._waiters if not f.done())

    def __repr__(self) -> str:
        return f"lbclient.testing.FakeClock(now={self._now!r})"
