"""Prefix-cache affinity over real HTTP: the fake replicas' cache model and ``/metrics``,
the metrics poller, ChatClient deriving the prompt text, and the hit-ratio advantage of
``prefix`` on a multi-turn chat."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest
from conftest import FleetFactory

import lbclient
from lbclient.http import ChatClient
from lbclient.serverload import parse_prometheus
from lbclient.strategies.prefix import PrefixPicker
from lbclient.testing import PrefixCache, ReplicaConfig


def msgs(system: str, turns: int, conv: int) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}]
    for t in range(turns):
        out.append({"role": "user", "content": f"conv {conv} turn {t} " + "u" * 150})
        out.append({"role": "assistant", "content": f"answer {t} " + "a" * 200})
    out.append({"role": "user", "content": f"conv {conv} turn {turns} " + "u" * 150})
    return out


def test_prefix_cache_model_counts_leading_blocks_and_evicts_lru() -> None:
    c = PrefixCache(capacity=10, block_chars=4)
    assert c.serve("aaaabbbbcc") == (0, 3)  # 2 full blocks cached, the partial one never
    assert c.serve("aaaabbbbccdd") == (2, 3)
    assert c.serve("aaaaXbbb") == (1, 2)  # the second block differs: only one reused
    assert c.serve("zzzzbbbb") == (0, 2)  # same text, other prefix: a different block
    assert c.usage <= 1.0
    for i in range(20):
        c.serve(f"{i:04d}" * 2)
    assert len(c._lru) <= 10
    assert c.serve("aaaabbbb") == (0, 2)  # evicted by 20 newer prompts
    c.clear()
    assert c.usage == 0.0


async def test_fake_replica_prefill_depends_on_its_cache(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [ReplicaConfig(base_latency=0.001, sigma=0, kv_cache_blocks=1000, prefill_per_block=0.002)]
    )
    body = {"messages": msgs("S" * 2000, 2, 0)}
    times = []
    for _ in range(2):
        async with session.post(fleet.urls[0] + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            times.append(float(resp.headers["x-service-time"]))
    blocks = -(-len(lbclient.prompt_text(body["messages"])) // 64)
    assert times[0] == pytest.approx(0.001 + 0.002 * blocks, rel=0.01)
    assert times[1] == pytest.approx(0.001 + 0.002, rel=0.01)  # only the partial block
    c = fleet[0].counters
    assert c.prompt_blocks == 2 * blocks and c.cached_blocks == blocks - 1
    assert 0.45 < c.hit_ratio < 0.5


@pytest.mark.parametrize("fmt", ["vllm", "sglang"])
async def test_poller_reads_a_fake_replicas_metrics_over_http(
    fleet_factory: FleetFactory, fmt: str
) -> None:
    fleet = await fleet_factory(
        [
            ReplicaConfig(base_latency=2.0, sigma=0, capacity=1, metrics_format=fmt),
            ReplicaConfig(base_latency=0.001, metrics_format=fmt),
        ]
    )
    lb = lbclient.Balancer(fleet.urls, strategy="round_robin")
    busy = fleet[0]
    async with aiohttp.ClientSession() as http:
        # Three requests to replica 0: one running, two waiting.
        tasks = [
            asyncio.create_task(http.post(busy.url + "/v1/chat/completions", json={}))
            for _ in range(3)
        ]
        for _ in range(200):
            if busy.queue_depth == 3:
                break
            await asyncio.sleep(0.01)
        assert busy.queue_depth == 3
        async with http.get(busy.url + "/metrics") as resp:
            text = await resp.text()
        names = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
        assert sum(parse_prometheus(text, names).values()) == 2.0
        poller = lbclient.MetricsPoller(lb, lbclient.ServerMetrics(interval=0.05), session=http)
        got = await poller.poll_once()
        assert got[busy.url].running == 1.0 and got[busy.url].waiting == 2.0
        assert got[fleet.urls[1]].load == 0.0
        state = lb._pool.state_of(busy.url)
        assert state.server_load == 3.0
        assert poller.errors == 0
        # In the background too, and it stops.
        async with poller:
            await asyncio.sleep(0.12)
            assert poller.running
        assert not poller.running
        assert poller.polls >= 4
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await lb.aclose()


async def test_poller_weighs_a_full_kv_cache_and_survives_a_dead_endpoint(
    fleet_factory: FleetFactory, session: aiohttp.ClientSession
) -> None:
    fleet = await fleet_factory(
        [
            ReplicaConfig(base_latency=1.0, sigma=0, kv_cache_blocks=4),
            ReplicaConfig(),
        ]
    )
    lb = lbclient.Balancer(fleet.urls)
    # Fill replica 0's cache (usage 1.0) while one request runs.
    task = asyncio.create_task(
        session.post(fleet.urls[0] + "/v1/completions", json={"prompt": "x" * 64 * 10})
    )
    for _ in range(200):
        if fleet[0].queue_depth == 1:
            break
        await asyncio.sleep(0.01)
    await fleet[1].down()
    poller = lbclient.MetricsPoller(lb, session=session)
    got = await poller.poll_once()
    assert got[fleet.urls[0]].kv_usage == 1.0
    assert got[fleet.urls[0]].load == 2.0  # 1 running, doubled by a full KV cache
    assert fleet.urls[1] not in got and poller.errors == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await lb.aclose()


def test_server_metrics_validation_and_parsing() -> None:
    with pytest.raises(lbclient.ConfigError, match="interval"):
        lbclient.ServerMetrics(interval=0)
    with pytest.raises(lbclient.ConfigError, match="path"):
        lbclient.ServerMetrics(path="metrics")
    with pytest.raises(lbclient.ConfigError, match="kv_high"):
        lbclient.ServerMetrics(kv_high=1.5)
    with pytest.raises(lbclient.ConfigError, match="metric names"):
        lbclient.ServerMetrics(running=("",))
    assert lbclient.ServerMetrics(waiting="my_queue").waiting == ("my_queue",)
    text = (
        "# HELP q queue\n# TYPE q gauge\n"
        'q{model="a"} 2\nq{model="b",x="}"} 3.5\nq 1e0\nother 9\nq{bad} notanumber\nq\n'
        "q NaN\n"
    )
    assert parse_prometheus(text, ["q"]) == {"q": 6.5}


async def test_chat_client_derives_the_prompt_text_for_the_prefix_strategy(
    fleet_factory: FleetFactory,
) -> None:
    fleet = await fleet_factory([ReplicaConfig(base_latency=0.001) for _ in range(3)])
    lb = lbclient.Balancer(fleet.urls, strategy="prefix")
    async with ChatClient(lb) as chat:
        m = msgs("You are terse. " * 30, 1, 7)
        await chat.create(messages=m)
        p = lb._pool.snap.base
        assert isinstance(p, PrefixPicker)
        text = lbclient.prompt_text(m)
        held = p.tree.lengths(p.tree.match(text), 3)
        assert sorted(held.values()) == [len(text)]
        # The next turn goes to the same replica, streamed or not.
        served = {r.url for r in fleet if r.counters.served}
        m2 = msgs("You are terse. " * 30, 2, 7)
        chunks = [c async for c in chat.stream(messages=m2)]
        assert chunks
        await chat.create(messages=msgs("You are terse. " * 30, 3, 7))
        assert {r.url for r in fleet if r.counters.served} == served
    await lb.aclose()


async def test_prefix_beats_round_robin_on_replica_hit_ratio(
    fleet_factory: FleetFactory,
) -> None:
    """A small multi-turn chat on loopback: 4 replicas with small caches, 30
    conversations, turns sent a few at a time."""

    async def run(strategy: str) -> float:
        configs = [
            ReplicaConfig(base_latency=0.001, sigma=0, kv_cache_blocks=300, prefill_per_block=0.0)
            for _ in range(4)
        ]
        fleet = await fleet_factory(configs)
        lb = lbclient.Balancer(fleet.urls, strategy=strategy, rng=3)
        rng = random.Random(5)
        systems = [f"system {i}: " + "s" * 500 for i in range(3)]
        turns = [0] * 30
        async with ChatClient(lb) as chat:
            for _ in range(30):
                batch: list[Any] = []
                for _ in range(4):
                    c = rng.randrange(30)
                    turns[c] += 1
                    batch.append(chat.create(messages=msgs(systems[c % 3], turns[c], c)))
                await asyncio.gather(*batch)
        await lb.aclose()
        totals = fleet.totals()
        return totals.cached_blocks / totals.prompt_blocks

    prefix, rr = await run("prefix"), await run("round_robin")
    print(f"hit ratio: prefix {prefix:.3f}, round_robin {rr:.3f}")
    assert prefix > 0.6
    assert prefix > rr + 0.2, (prefix, rr)


async def test_chat_client_derives_the_prompt_text_for_a_prefix_fallback(
    fleet_factory: FleetFactory,
) -> None:
    """The primary picks without prompts, its fallback by prefix: calls that fall back
    still carry the prompt text (the client looks at the whole chain, as the transport
    does)."""
    down = await fleet_factory([ReplicaConfig(base_latency=0.001, error_rate=1.0)])
    up = await fleet_factory([ReplicaConfig(base_latency=0.001) for _ in range(3)])
    fallback = lbclient.Balancer(up.urls, strategy="prefix")
    lb = lbclient.Balancer(down.urls, strategy="power_of_two", fallback=fallback)
    async with ChatClient(lb) as chat:
        m = msgs("You are terse. " * 30, 1, 7)
        await chat.create(messages=m)
        p = fallback._pool.snap.base
        assert isinstance(p, PrefixPicker)
        text = lbclient.prompt_text(m)
        held = p.tree.lengths(p.tree.match(text), 3)
        assert sorted(held.values()) == [len(text)]
    assert down.total_served == 0 and up.total_served == 1
    await lb.aclose()
    await fallback.aclose()
