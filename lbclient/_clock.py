"""Time, injectable: everything that reads time or sleeps takes a :class:`Clock`.

Production uses :data:`MONOTONIC` (``time.monotonic`` and ``asyncio.sleep``);
tests pass :class:`lbclient.testing.FakeClock` and drive time with ``advance()``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable

__all__ = ["MONOTONIC", "Clock", "MonotonicClock"]


@runtime_checkable
class Clock(Protocol):
    """A monotonic clock in seconds, and a way to wait on it."""

    def now(self) -> float:
        """Monotonic time in seconds."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    __slots__ = ()
    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "lbclient.MonotonicClock()"


MONOTONIC = MonotonicClock()
