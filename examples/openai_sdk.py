"""The OpenAI SDK, balanced by lbclient with no other change: one ``httpx`` transport.

    python examples/openai_sdk.py

Works offline: it starts four fake OpenAI-compatible replicas on loopback -- one fails
half its requests (500), one rate-limits with ``Retry-After``, one is a slow GPU, one is
fine -- and sends 40 completions and a few streams through ``openai.AsyncOpenAI``.
Every call succeeds: a 500 is retried on another replica at once, the rate-limited one
cools down for what it asked, slow answers are hedged, and a stream is retried or
hedged only before its first token.  For your own fleet, pass its URLs to the balancer.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import openai

import lbclient
from lbclient.testing import ReplicaConfig, ReplicaFleet


async def main() -> None:
    replicas = {
        "fails half its calls": ReplicaConfig(error_rate=0.5),
        "429 + Retry-After: 2": ReplicaConfig(rate_limit_rate=0.3, retry_after=2.0),
        "slow GPU (0.3x)": ReplicaConfig(speed=0.3),
        "healthy": ReplicaConfig(),
    }
    async with ReplicaFleet(replicas.values(), seed=1) as fleet:
        lb = lbclient.Balancer(
            fleet.urls,
            retry=lbclient.Retry(attempts=3, timeout=30.0),  # the whole call's deadline
            breaker=lbclient.Breaker(),
            hedge=lbclient.Hedge(),
        )
        client = openai.AsyncOpenAI(
            base_url="http://lbclient/v1",  # any host: the transport picks the replica
            api_key="sk-fake",
            max_retries=0,  # lbclient retries -- on another replica, at once
            http_client=httpx.AsyncClient(transport=lbclient.HTTPTransport(lb)),
        )
        messages = [{"role": "user", "content": "Say something."}]

        async def one() -> str:
            raw = await client.chat.completions.with_raw_response.create(
                model="fake-model", messages=messages
            )
            raw.parse()
            return raw.headers["x-lbclient-endpoint"]  # which replica answered

        served = Counter(await asyncio.gather(*(one() for _ in range(40))))
        print("40 completions at once, answered by:")
        for name, url in zip(replicas, fleet.urls, strict=True):
            print(f"  {name:22} {served[url]:3}")

        for _ in range(3):
            stream = await client.chat.completions.create(
                model="fake-model",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},  # settles the token estimate
            )
            text = ""
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            print("stream:", repr(text))

        stats = lb.stats()
        print(
            f"calls {stats.calls}, failed {stats.calls_failed}, retries {dict(stats.retries_by)}, "
            f"Retry-After cooldowns {stats.cooldowns}, hedges {stats.hedges_sent}"
        )
        await client.close()  # closes the transport: every replica's connection pool
        await lb.aclose()


if __name__ == "__main__":
    asyncio.run(main())
