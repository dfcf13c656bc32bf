"""Quickstart: wrap an aiohttp call in @lb.route, against fake replicas on loopback.

    python examples/quickstart.py

Works offline: it starts three fake OpenAI-compatible replicas (one of them slow, one
that fails half its requests) and sends 200 chat completions through lbclient.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

import lbclient
from lbclient.testing import ReplicaConfig, ReplicaFleet


async def main() -> None:
    replicas = [
        ReplicaConfig(speed=1.0, capacity=4),
        ReplicaConfig(speed=0.3, capacity=4),  # a slow GPU
        ReplicaConfig(speed=1.0, capacity=4, error_rate=0.5),  # a sick one
    ]
    async with ReplicaFleet(replicas, seed=1) as fleet, aiohttp.ClientSession() as session:
        lb = lbclient.Balancer(
            fleet.urls,
            strategy="peak_ewma",
            retry=lbclient.Retry(attempts=3),
            breaker=lbclient.Breaker(failures=5, cooldown=5.0),
        )

        @lb.route
        async def complete(endpoint: lbclient.Endpoint, payload: dict[str, Any]) -> str:
            url = f"{endpoint.url}/v1/chat/completions"
            async with session.post(url, json=payload) as r:
                lb.report_load(endpoint, r.headers.get("x-queue-depth"))
                r.raise_for_status()
                body = await r.json()
                return str(body["choices"][0]["message"]["content"])

        async with lb:
            payload = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
            replies = await asyncio.gather(*(complete(payload) for _ in range(200)))
            print(f"{len(replies)} replies, first: {replies[0]!r}")
            print(lb.stats())
            for i, replica in enumerate(fleet):
                print(f"replica {i}: served {replica.counters.served}")


if __name__ == "__main__":
    asyncio.run(main())
