"""What a :class:`~lbclient.Balancer` runs on, built from its checked configuration: the
observer, the pool, the call engine and the background work -- and how they stop."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .engine.engine import Engine
from .observe.observer import Observer
from .policies.classify import is_endpoint_failure
from .pool.background import Background
from .pool.pool import Pool

if TYPE_CHECKING:
    from ._config import BalancerConfig
    from .policies.retry import Retry

__all__ = ["LOSER_GRACE", "build", "shutdown"]

LOSER_GRACE = 1.0  # seconds aclose() gives cancelled hedge losers to finish their cleanup


def build(cfg: BalancerConfig) -> tuple[Observer, Pool, Engine, Background]:
    """Wire a balancer's parts from ``cfg`` and add its initial endpoints."""
    observer = Observer(cfg.on_event, now=cfg.clock.now)
    strategy = cfg.strategy
    if cfg.cost is not None and cfg.cost.latency_factor is not None:
        from .strategies.cheapest import Cheapest

        strategy = Cheapest(strategy, cfg.cost)  # cheaper endpoints within the factor
    pool = Pool(
        strategy=strategy,
        breaker=cfg.breaker,
        health=cfg.health is not None,
        slow_start=cfg.slow_start,
        locality=cfg.locality,
        region=cfg.region,
        geo=cfg.geo,
        decay=cfg.ewma_decay,
        clock=cfg.clock,
        rng=cfg.rng,
        observer=observer,
        is_failure=cfg.breaker.is_failure if cfg.breaker is not None else is_endpoint_failure,
        cooldown_cap=_cooldown_cap(cfg.retry),
    )
    engine = Engine(
        pool,
        observer,
        retry=cfg.retry,
        hedge=cfg.hedge,
        clock=cfg.clock,
        rng=cfg.rng,
        admission=cfg.admission,
        fallback=cfg.fallback,
        name=cfg.name,
    )
    link = None
    if cfg.shared is not None:
        from .shared.link import FleetLink

        link = FleetLink(cfg.shared, pool, observer, cfg.clock)
        pool.shared = link  # before the members: their breakers report to it
        if engine.gate is not None:
            engine.gate.shared = link
    background = Background(pool, engine, cfg.discovery, cfg.health, link)
    for ep in cfg.endpoints:
        pool.add(ep, initial=True)
    pool.refresh()
    if background.wanted:
        pool.on_refresh = background.ensure
        pool.invalidate()  # the first pick starts the background work
    return observer, pool, engine, background


async def shutdown(
    pool: Pool, engine: Engine, background: Background, seconds: float | None
) -> None:
    """Close: no new calls; with ``seconds``, wait up to that long for the calls in
    flight; then stop hedging (letting lost backups finish their cleanup) and the
    background work."""
    if pool.closed:
        return
    pool.close()
    if seconds is not None:
        seconds = await _wait_idle(pool, engine, seconds)
    hedger = engine.hedger
    if hedger is not None:
        hedger.close()
        await hedger.wait_backups(LOSER_GRACE if seconds is None else seconds)
    await background.stop()


async def _wait_idle(pool: Pool, engine: Engine, seconds: float) -> float:
    """Wait up to ``seconds`` (event-loop time, whatever the balancer's clock) until no
    call is under way: no attempt in flight, none between retries, none queued for
    admission.  Returns the seconds left."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    gate = engine.gate

    def busy() -> bool:
        return bool(pool.totals.inflight or engine.active or (gate is not None and gate.queue.size))

    while busy():
        left = deadline - loop.time()
        if left <= 0:
            return 0.0
        await asyncio.sleep(min(0.01, left))
    return max(0.0, deadline - loop.time())


def _cooldown_cap(retry: Retry | None) -> float | None:
    """How long a ``Retry-After`` may keep an endpoint out (None: not at all)."""
    if retry is None:
        return 30.0
    return retry.max_retry_after if retry.respect_retry_after else None
