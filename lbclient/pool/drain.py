"""``await lb.drain(url)``: stop new picks now, then wait until the endpoint is idle."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .._errors import ConfigError

if TYPE_CHECKING:
    from .._clock import Clock
    from .pool import Pool
    from .state import EndpointState

__all__ = ["Drain", "DrainResult"]

log = logging.getLogger("lbclient")


class DrainResult:
    """What ``await lb.drain(url)`` returns: whether the endpoint went idle in time."""

    __slots__ = ("idle", "in_flight", "url", "waited")

    def __init__(self, url: str, idle: bool, in_flight: int, waited: float) -> None:
        self.url, self.idle, self.in_flight, self.waited = url, idle, in_flight, waited

    def __repr__(self) -> str:
        return (
            f"lbclient.DrainResult(url={self.url!r}, idle={self.idle}, "
            f"in_flight={self.in_flight}, waited={self.waited:.3f})"
        )


class Drain:
    """Awaitable returned by ``lb.drain()``: the draining itself already happened.  The
    wait is made in the awaiting loop, so a balancer drains from any loop it is used in."""

    __slots__ = ("_clock", "_state", "_timeout")

    def __init__(self, state: EndpointState, clock: Clock, timeout: float | None) -> None:
        self._state, self._clock, self._timeout = state, clock, timeout

    @classmethod
    def of(cls, pool: Pool, url: str, timeout: object) -> Drain:
        """Drain ``url`` in ``pool`` now; the awaitable waits up to ``timeout`` seconds."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0
        ):
            raise ConfigError(f"drain timeout must be a number of seconds >= 0, got {timeout!r}")
        return cls(pool.drain(url), pool.clock, timeout)

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> DrainResult:
        s = self._state
        t0 = self._clock.now()
        if s.inflight > 0:
            try:
                async with asyncio.timeout(self._timeout):
                    while s.inflight > 0:
                        await s.idle_event().wait()
            except TimeoutError:
                log.warning(
                    "drain of %s timed out after %ss with %d call(s) still in flight",
                    s.url,
                    self._timeout,
                    s.inflight,
                )
        waited = self._clock.now() - t0
        return DrainResult(s.url, s.inflight == 0, s.inflight, waited)
