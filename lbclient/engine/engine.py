"""`Engine`: what every call path shares -- the pool, the policies, the budgets, the
hedger, the observer -- and the event loop the balancer is bound to.

A balancer outlives event loops (a script calling ``asyncio.run`` twice, a test suite):
the loop-bound parts (the hedge timer, background tasks, drain waits) rebind to the loop
that uses them next.  Two loops running at once (two threads) is refused with a clear
error: a balancer's state lives on one event loop thread, unlocked.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._clock import Clock

if TYPE_CHECKING:
    from ..admission.gate import Gate
    from ..admission.policy import Admission
    from ..observe.histogram import Recorder
    from ..observe.observer import Observer
    from ..policies.budget import Budget
    from ..policies.hedge import Hedge
    from ..policies.retry import Retry
    from ..pool.pool import Pool
    from .hedging import Hedger

__all__ = ["Engine"]


class Engine:
    """The call machinery of one balancer (see the module docstring)."""

    __slots__ = (
        "_loop",
        "_rebind",
        "active",
        "budget",
        "clock",
        "counters",
        "fallback",
        "gate",
        "hedger",
        "name",
        "now",
        "observer",
        "pool",
        "recorder",
        "retry",
        "rng",
        "tracer",
    )

    def __init__(
        self,
        pool: Pool,
        observer: Observer,
        *,
        retry: Retry | None,
        hedge: Hedge | None,
        clock: Clock,
        rng: random.Random,
        admission: Admission | None = None,
        fallback: Any = None,
        name: str | None = None,
    ) -> None:
        self.pool = pool
        # The lbclient.Balancer a call goes to when this pool cannot serve it (or None),
        # and the name errors give this pool.
        self.fallback = fallback
        self.name = name
        self.observer = observer
        self.counters = observer.counters
        self.retry = retry
        self.clock = clock
        self.now = clock.now
        self.rng = rng
        self.budget: Budget | None = retry.make_budget(clock) if retry is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rebind: list[Callable[[asyncio.AbstractEventLoop], None]] = []
        self.recorder: Recorder | None = None  # set when a metrics exporter attaches
        self.tracer: Any = None  # set by lbclient.metrics.OpenTelemetry(spans=True)
        # Calls on the full path (or streaming) right now -- waiting in a queue, between
        # retries, or with attempts in flight; a fast-path call is its one attempt.
        self.active = 0
        self.gate: Gate | None = None
        if admission is not None:
            from ..admission.gate import Gate

            self.gate = Gate(admission, clock, rng, observer)
        self.hedger: Hedger | None = None
        if hedge is not None:
            from .hedging import Hedger

            self.hedger = Hedger(hedge, clock)
            self._rebind.append(self.hedger.rebind)

    def bind(self) -> asyncio.AbstractEventLoop:
        """The running loop, after making sure every loop-bound part belongs to it."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._move(loop)
        return loop

    def _move(self, loop: asyncio.AbstractEventLoop) -> None:
        old = self._loop
        if old is not None and old.is_running() and not old.is_closed():
            raise RuntimeError(
                "this lbclient.Balancer is already in use by another running event loop "
                f"({old!r}); a balancer's state lives on one event loop thread -- create "
                "one Balancer per thread/loop"
            )
        self._loop = loop
        for callback in self._rebind:
            callback(loop)
