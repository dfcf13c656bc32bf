"""The pool's background work: discovery refreshes, active health checks and the sync
with the fleet's shared state.

Started by the first pick (or ``await lb.start()`` / ``async with``), stopped by
``aclose()``.  Tasks belong to an event loop; when that loop ends (``asyncio.run``
returns) they die with it, and the next pick in a new loop starts them again there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..shared.link import FleetLink
    from .discovery import Discovery
    from .health import HealthCheck
    from .pool import Pool

__all__ = ["Background"]


class Background:
    """Runs ``discovery`` and ``health`` loops (and the ``shared`` state's sync) for
    ``pool`` in whatever loop uses it."""

    __slots__ = (
        "_health",
        "_loop",
        "_tasks",
        "discovered",
        "discovery",
        "engine",
        "pool",
        "shared",
    )

    def __init__(
        self,
        pool: Pool,
        engine: Engine,
        discovery: Discovery | None,
        health: HealthCheck | None,
        shared: FleetLink | None = None,
    ) -> None:
        self.pool = pool
        self.engine = engine
        self.discovery = discovery
        self._health = health
        self.shared = shared
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.discovered = False  # has start() seen a first discovery result

    @property
    def wanted(self) -> bool:
        return self.discovery is not None or self._health is not None or self.shared is not None

    def ensure(self) -> None:
        """Make sure the loops run in the running event loop (if there is one)."""
        if not self.wanted or self.pool.closed:
            return
        try:
            loop = self.engine.bind()
        except RuntimeError as exc:
            if "no running event loop" in str(exc):
                return  # not in a loop yet: the next pick tries again
            raise
        if loop is self._loop and self._tasks:
            return
        self._loop = loop
        self._tasks = set()
        if self.discovery is not None:
            from .discovery import discovery_loop

            self._spawn(loop, discovery_loop(self.pool, self.discovery))
        if self._health is not None:
            self._spawn(loop, self._health.check_loop(self.pool))
        if self.shared is not None:
            self._spawn(loop, self.shared.run())

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> None:
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the loops log their own errors
        if not self.pool.closed:
            # Ended with its loop (or crashed): the next pick checks and restarts it.
            self.pool.invalidate()

    async def start(self) -> None:
        """Resolve discovery once (so the first call has endpoints), then start the loops."""
        if self.discovery is not None and not self.discovered:
            from .discovery import refresh_once

            self.discovered = await refresh_once(self.pool, self.discovery)
        self.ensure()

    async def stop(self) -> None:
        if self.shared is not None:
            await self.shared.aclose()  # gives leases back while its task still runs
        tasks, self._tasks = list(self._tasks), set()
        loop = asyncio.get_running_loop()
        mine = [t for t in tasks if not t.done() and t.get_loop() is loop]
        for task in mine:
            task.cancel()
        if mine:
            await asyncio.gather(*mine, return_exceptions=True)
