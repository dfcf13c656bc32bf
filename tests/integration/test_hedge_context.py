"""A hedge backup runs in its own call's context: ``report_usage`` (and a cost policy's
meter) inside a backup must reach the call the backup belongs to, not whichever call
armed the shared hedge timer."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from typing import Any

import aiohttp

import lbclient
from lbclient._context import CURRENT
from lbclient.testing import ReplicaConfig


async def test_backups_see_their_own_call(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [ReplicaConfig(base_latency=0.3, sigma=0), ReplicaConfig(base_latency=0.005, sigma=0)]
    )
    lb = lbclient.Balancer(
        fleet.urls, strategy="round_robin", hedge=lbclient.Hedge(delay=0.03, max_extra=0.9)
    )
    seen: list[tuple[int, object, bool]] = []

    @lb.route(key=lambda i: i, tokens=lambda i: 10)
    async def call(endpoint: lbclient.Endpoint, i: int) -> None:
        current = CURRENT.get()
        seen.append((i, None if current is None else current.key, endpoint.url == fleet.urls[1]))
        async with session.post(endpoint.url + "/v1/chat/completions", json={}) as r:
            await r.read()
        lbclient.report_usage(i, i)

    async def one(i: int) -> None:
        await asyncio.sleep(0.002 * i)  # staggered: the timer is armed by earlier calls
        await call(i)

    await asyncio.gather(*(one(i) for i in range(12)))
    calls = [i for i, _, _ in seen]
    assert any(calls.count(i) > 1 for i in calls), "no hedge was sent"
    assert all(i == key for i, key, _ in seen), seen
    assert lb.stats().hedges_sent >= 1
    await lb.aclose()


_ATTEMPT_VAR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "test_attempt", default=None
)


async def test_stream_attempts_do_not_share_a_context(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    """Each stream attempt (pump) runs in its own copy of the call's context: a variable
    one attempt sets and resets (a tracing span, a cost meter's record) is not reset
    under a concurrent one -- they shared one Context object before."""
    fleet = await fleet_factory(
        [
            ReplicaConfig(base_latency=0.3, sigma=0, token_delay=0.01),
            ReplicaConfig(base_latency=0.005, sigma=0, token_delay=0.01),
        ]
    )
    lb = lbclient.Balancer(
        fleet.urls, strategy="round_robin", hedge=lbclient.Hedge(delay=0.03, max_extra=0.9)
    )
    wrong: list[tuple[str, str | None]] = []

    @lb.route
    async def stream(endpoint: lbclient.Endpoint) -> Any:
        token = _ATTEMPT_VAR.set(endpoint.url)
        try:
            body = {"model": "m", "messages": [], "stream": True}
            async with session.post(endpoint.url + "/v1/chat/completions", json=body) as r:
                async for line in r.content:
                    if _ATTEMPT_VAR.get() != endpoint.url:
                        wrong.append((endpoint.url, _ATTEMPT_VAR.get()))
                    if line.startswith(b"data:"):
                        yield line
        finally:
            _ATTEMPT_VAR.reset(token)

    for _ in range(4):
        async with contextlib.aclosing(stream()) as chunks:
            assert len([c async for c in chunks]) >= 8
    assert lb.stats().hedges_sent >= 1
    assert not wrong, wrong
    await lb.aclose()
