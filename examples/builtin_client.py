"""The built-in ChatClient: chat completions and token streams without your own HTTP code.

    python examples/builtin_client.py

Works offline: it starts three fake OpenAI-compatible replicas on loopback (one of them
rate-limits everything it gets, one is slow) and sends one completion and one stream
through ``lbclient.http.ChatClient``; its 429s (``Retry-After: 0``) are retried elsewhere.
"""

from __future__ import annotations

import asyncio

import lbclient
from lbclient.http import ChatClient
from lbclient.testing import ReplicaConfig, ReplicaFleet


async def main() -> None:
    replicas = [
        ReplicaConfig(tokens=6, token_delay=0.02),
        ReplicaConfig(tokens=6, token_delay=0.02, speed=0.3),  # a slow GPU
        ReplicaConfig(rate_limit_rate=1.0, retry_after=0.0),  # sheds all its load
    ]
    async with ReplicaFleet(replicas, seed=1) as fleet:
        lb = lbclient.Balancer(fleet.urls, strategy="round_robin", retry=lbclient.Retry())
        async with lb, ChatClient(lb, api_key="sk-fake", timeout=10.0) as chat:
            messages = [{"role": "user", "content": "Say something."}]

            reply = await chat.create(messages=messages, model="fake-model", max_tokens=6)
            print("create():", repr(reply["choices"][0]["message"]["content"]))
            print("   usage:", reply["usage"])

            print("stream():", end=" ", flush=True)
            async for token in chat.stream(messages=messages, model="fake-model"):
                print(repr(token), end=" ", flush=True)
            print()

            for _ in range(4):  # a few more, so round robin meets the rate-limited one
                await chat.text(messages=messages)

        stats = lb.stats()
        print(f"\ncalls={stats.calls} failed={stats.calls_failed} retries={stats.retries}")
        for ep in stats.endpoints:
            ttft = "-" if ep.ttft_ms is None else f"{ep.ttft_ms:.1f} ms"
            print(
                f"  {ep.url}  requests={ep.requests} failures={ep.failures} "
                f"server_load={ep.server_load} ttft={ttft}"
            )


if __name__ == "__main__":
    asyncio.run(main())
