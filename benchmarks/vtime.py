"""Run lbclient's real async code -- admission, retries, hedging, streams -- on virtual
time, against simulated replicas.

:class:`VirtualLoop` is an asyncio event loop whose clock jumps to the next timer
whenever nothing is ready to run, so ``await asyncio.sleep(30)`` takes no real time and
a 60-second load test finishes in a couple of seconds, the same way every time.  The
replicas (:class:`Replica`) are coroutines on that clock with the fake fleet's model:
``slots`` concurrent requests, a FIFO queue, lognormal service time of mean
``base / speed``, stragglers; a cancelled request leaves the queue or frees its slot.

Used by ``benchmarks/admission.py`` to sweep designs quickly; the loopback benchmarks
confirm on real HTTP.  Private attributes of asyncio's base loop (``_ready``,
``_scheduled``) are read: this is a benchmark tool, not library code.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import lbclient

__all__ = ["LoopClock", "Replica", "VirtualLoop", "run_virtual"]

T = TypeVar("T")


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: when no callback is ready, time jumps to the next
    scheduled one."""

    def __init__(self) -> None:
        super().__init__()
        self._virtual = 0.0

    def time(self) -> float:
        return self._virtual

    def _run_once(self) -> None:
        ready = self._ready  # type: ignore[attr-defined]
        scheduled = self._scheduled  # type: ignore[attr-defined]
        if not ready and scheduled:
            when = scheduled[0]._when
            if when > self._virtual:
                self._virtual = when
        super()._run_once()  # type: ignore[misc]


class LoopClock:
    """An :class:`lbclient.Clock` reading the running loop's (virtual) time."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


class Overload(Exception):
    """A replica's 429 (queue over its limit)."""

    status = 429

    def __init__(self) -> None:
        super().__init__("429 too many requests")
        self.headers: dict[str, str] = {}


class Replica:
    """A simulated inference server (see the module docstring).  ``max_queue``: beyond
    that many waiting, it answers 429 at once (None: it queues without bound)."""

    def __init__(
        self,
        url: str,
        *,
        slots: int,
        base: float,
        speed: float = 1.0,
        sigma: float = 0.25,
        straggler_rate: float = 0.0,
        straggler_factor: float = 20.0,
        max_queue: int | None = None,
        rng: random.Random,
    ) -> None:
        self.endpoint = lbclient.Endpoint(url)
        self.slots = slots
        self.base = base
        self.speed = speed
        self.sigma = sigma
        self.straggler_rate = straggler_rate
        self.straggler_factor = straggler_factor
        self.max_queue = max_queue
        self._rng = rng
        self._busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.served = 0
        self.rejected = 0

    @property
    def outstanding(self) -> int:
        return self._busy + len(self._waiters)

    def draw(self) -> float:
        x = self.base / self.speed * self._rng.lognormvariate(-(self.sigma**2) / 2, self.sigma)
        if self._rng.random() < self.straggler_rate:
            x *= self.straggler_factor
        return x

    async def serve(self, service: float | None = None) -> float:
        """One request: wait for a slot, hold it for the service time, return it."""
        if self.max_queue is not None and len(self._waiters) >= self.max_queue:
            self.rejected += 1
            raise Overload()
        if self._busy >= self.slots or self._waiters:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release()
                else:
                    self._waiters.remove(fut)
                raise
        else:
            self._busy += 1
        try:
            t = self.draw() if service is None else service
            await asyncio.sleep(t)
            self.served += 1
            return t
        finally:
            self._release()

    def _release(self) -> None:
        self._busy -= 1
        while self._waiters and self._busy < self.slots:
            fut = self._waiters.popleft()
            if not fut.done():
                self._busy += 1
                fut.set_result(None)


def fleet(
    n: int,
    *,
    slots: int,
    base: float,
    speeds: tuple[float, ...] | None = None,
    seed: int = 0,
    **kw: Any,
) -> dict[str, Replica]:
    """``n`` replicas keyed by URL."""
    rng = random.Random(seed)
    speeds = speeds or (1.0,) * n
    out = {}
    for i in range(n):
        url = f"http://10.9.0.{i + 1}:8000"
        out[url] = Replica(
            url, slots=slots, base=base, speed=speeds[i % len(speeds)], rng=rng, **kw
        )
    return out
