"""Recovery after a shared outage: panic-mode successes close breakers, and one
endpoint's recovery shortens the others' grown cooldowns."""

from __future__ import annotations

import contextlib

import lbclient
from lbclient.testing import FakeClock

URLS = [f"http://10.0.0.{i}:8000" for i in range(4)]


def _lb(clock: FakeClock) -> lbclient.Balancer:
    return lbclient.Balancer(
        URLS,
        strategy="round_robin",
        breaker=lbclient.Breaker(failures=1, cooldown=1.0, max_cooldown=60.0, jitter=0.0),
        clock=clock,
        rng=3,
    )


async def test_one_recovery_hastens_the_probes_of_the_others() -> None:
    clock = FakeClock()
    lb = _lb(clock)
    down = set(URLS)

    async def call(ep: lbclient.Endpoint) -> str:
        if ep.url in down:
            raise ConnectionError("refused")
        return ep.url

    route = lb.route(call)
    # A long outage: every breaker trips again and again, cooldowns grow to 16 s.
    for _ in range(400):
        with contextlib.suppress(ConnectionError, lbclient.LBError):
            await route()
        clock.advance(0.1)
    grown = [s.breaker.reopen_at - clock.now() for s in lb._pool.members.values() if s.breaker]
    assert max(grown) > 5.0
    # The fleet comes back; the first success (a probe or a panic-mode call) closes one
    # breaker and brings every other probe within one base cooldown (1 s).
    down.clear()
    for _ in range(3):
        await route()
    now = clock.now()
    for s in lb._pool.members.values():
        assert s.breaker is not None
        assert s.breaker.state == "closed" or s.breaker.reopen_at <= now + 1.0
    clock.advance(1.1)
    for _ in range(20):
        await route()
    assert [e.breaker for e in lb.stats().endpoints] == ["closed"] * 4
    assert lb.stats().panic is False
