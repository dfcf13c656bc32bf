"""Model groups: a self-hosted pool that falls back to a vendor API pool.

    python examples/vendor_fallback.py

Works offline: one fake fleet plays the self-hosted replicas, another the vendor's API
(two regions).  The self-hosted pool serves what it can; a call it cannot serve -- every
replica down, or all of them at their limits -- goes to the vendor pool, which has its
own API key, its own model name, per-deployment rate limits (LiteLLM's rpm/tpm) and
context windows.  Calls whose prompt is too long for the self-hosted model's context go
straight to the vendor.
"""

from __future__ import annotations

import asyncio

import httpx
import openai

import lbclient
from lbclient.testing import ReplicaConfig, ReplicaFleet


async def ask(client: openai.AsyncOpenAI, prompt: str) -> str:
    raw = await client.chat.completions.with_raw_response.create(
        model="llama-3-8b", messages=[{"role": "user", "content": prompt}], max_tokens=64
    )
    raw.parse()
    return raw.headers["x-lbclient-endpoint"]


async def main() -> None:
    async with (
        ReplicaFleet([ReplicaConfig(), ReplicaConfig()], seed=1) as own,
        ReplicaFleet([ReplicaConfig(region="eu"), ReplicaConfig(region="us")], seed=2) as api,
    ):
        vendor = lbclient.Balancer(
            [
                lbclient.Endpoint(
                    url,
                    # The vendor's name for the model, its context window, and the
                    # account's limits for that deployment.
                    metadata={"model": "vendor-8b-instruct", "max_context": 128_000},
                    limits=lbclient.Limits(requests_per_minute=600, tokens_per_minute=200_000),
                )
                for url in api.urls
            ],
            name="vendor",
            retry=lbclient.Retry(attempts=2),
        )
        self_hosted = lbclient.Balancer(
            [
                lbclient.Endpoint(
                    url, metadata={"max_context": 8192}, limits=lbclient.Limits(max_in_flight=8)
                )
                for url in own.urls
            ],
            name="self-hosted",
            fallback=vendor,  # what this pool cannot serve goes there
            retry=lbclient.Retry(attempts=2),
            breaker=lbclient.Breaker(failures=3),
        )
        vendor_keys = {url: "Bearer sk-vendor-key" for url in api.urls}
        transport = lbclient.HTTPTransport(
            self_hosted,
            # The vendor's API key on the requests sent there (read once per endpoint).
            headers=lambda endpoint: (
                {"Authorization": vendor_keys[endpoint.url]}
                if endpoint.url in vendor_keys
                else None
            ),
        )
        client = openai.AsyncOpenAI(
            base_url="http://lbclient/v1",
            api_key="self-hosted-key",
            max_retries=0,
            http_client=httpx.AsyncClient(transport=transport),
        )

        where = [await ask(client, "Hi") for _ in range(4)]
        print(
            "normal day:          ",
            sorted({"self-hosted" if u in own.urls else "vendor" for u in where}),
        )
        long_prompt = "word " * 40_000  # ~40,000 tokens: over the self-hosted 8k window
        print(
            "a 40k-token prompt:  ", "vendor" if await ask(client, long_prompt) in api.urls else "?"
        )

        for replica in own:
            await replica.down()  # the self-hosted fleet goes away
        where = [await ask(client, "Hi") for _ in range(10)]
        by_vendor = sum(u in api.urls for u in where)
        print(f"self-hosted down:     {by_vendor}/10 served by the vendor pool")
        print("self-hosted pool:", self_hosted.stats().fallbacks, "calls handed to its fallback")

        vendor.drain(api.urls[0])
        vendor.drain(api.urls[1])  # now the vendor cannot serve either
        try:
            await ask(client, "Hi")
        except lbclient.PoolsExhausted as exc:  # what each pool tried
            print("every pool failed:", str(exc)[:160], "...")

        await client.close()
        await self_hosted.aclose()
        await vendor.aclose()


if __name__ == "__main__":
    asyncio.run(main())
