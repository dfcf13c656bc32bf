"""A hedge backup runs in its own call's context: ``report_usage`` (and a cost policy's
meter) inside a backup must reach the call the backup belongs to, not whichever call
armed the shared hedge timer."""

from __future__ import annotations

import asyncio
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
