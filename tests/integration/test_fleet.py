"""Loopback tests of the fake replica fleet (`lbclient.testing._fleet`): real HTTP on
127.0.0.1, small latencies, every fault checked from the client's side and in the
replica's counters."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from lbclient._errors import ConfigError
from lbclient.testing._fleet import Replica, ReplicaConfig, ReplicaCounters, ReplicaFleet

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
BODY = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # A generous default timeout turns a leaked slot or a stuck request into a failure
    # rather than a hung test run.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def wait_until(predicate: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any] | None = None, **kw: Any
) -> tuple[int, dict[str, str], Any, float]:
    """POST a completion; returns status, headers, parsed JSON body, elapsed seconds."""
    t0 = time.perf_counter()
    async with http.post(url, json=BODY if body is None else body, **kw) as resp:
        data = await resp.json()
        return resp.status, dict(resp.headers), data, time.perf_counter() - t0


def balanced(c: ReplicaCounters) -> bool:
    return c.in_flight == 0 and c.received == c.finished


# ----------------------------------------------------------------- basics


async def test_chat_completion_body_headers_and_counters(http: aiohttp.ClientSession) -> None:
    cfg = ReplicaConfig(base_latency=0.005, region="eu-west-1", zone="eu-west-1a", tokens=3)
    async with ReplicaFleet([ReplicaConfig(base_latency=0.005), cfg]) as fleet:
        assert len(fleet) == 2
        assert all(u.startswith("http://127.0.0.1:") for u in fleet.urls)
        assert len(set(fleet.urls)) == 2
        assert fleet.urls == [fleet[0].url, fleet[1].url]

        status, headers, data, _ = await post(http, fleet.urls[1] + CHAT)
        assert status == 200
        assert headers["x-replica"] == "replica-1"
        assert headers["x-queue-depth"] == "0"  # alone: nobody else queued or running
        assert headers["x-region"] == "eu-west-1"
        assert headers["x-zone"] == "eu-west-1a"
        assert float(headers["x-service-time"]) > 0
        assert data["object"] == "chat.completion"
        assert data["model"] == "test-model"
        message = data["choices"][0]["message"]
        assert message["role"] == "assistant"
        assert message["content"] == "replica-1: tok0 tok1 tok2 "
        assert data["usage"]["completion_tokens"] == 3

        status, headers, data, _ = await post(http, fleet.urls[0] + TEXT, {"prompt": "x"})
        assert status == 200
        assert "x-region" not in headers
        assert data["object"] == "text_completion"
        assert data["model"] == "fake-model"
        assert data["choices"][0]["text"].startswith("replica-0: tok0 ")

        # An empty body is fine (no parsing), so is garbage.
        async with http.post(fleet.urls[0] + CHAT) as resp:
            assert resp.status == 200
        async with http.post(fleet.urls[0] + CHAT, data=b"{not json") as resp:
            assert resp.status == 200

        assert fleet[1].counters.snapshot() == ReplicaCounters(
            received=1, served=1, in_flight=0, max_in_flight=1
        )
        assert fleet[0].counters.served == 3
        assert fleet.total_received == fleet.total_served == 4
        assert fleet.totals().served == 4


async def test_models_health_and_unknown_paths(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet([ReplicaConfig(model="llama-3", name="alpha")]) as fleet:
        url = fleet.urls[0]
        async with http.get(url + "/v1/models") as resp:
            assert resp.status == 200
            assert (await resp.json())["data"][0]["id"] == "llama-3"
        async with http.get(url + "/health") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
            assert resp.headers["x-replica"] == "alpha"
        async with http.get(url + "/nope") as resp:
            assert resp.status == 404
        async with http.post(url + "/v1/embeddings", json={}) as resp:
            assert resp.status == 404

        fleet[0].set(healthy=False)
        async with http.get(url + "/health") as resp:
            assert resp.status == 503
        # `healthy` only affects /health.
        status, _, _, _ = await post(http, url + CHAT)
        assert status == 200
        fleet[0].set(healthy=True)
        async with http.get(url + "/health") as resp:
            assert resp.status == 200

        c = fleet[0].counters
        assert c.health_checks == 3
        assert c.received == 1  # health checks, models and 404s are not completions


# ------------------------------------------------------------ performance


async def test_capacity_one_queues_fifo(http: aiohttp.ClientSession) -> None:
    service = 0.05
    async with ReplicaFleet.uniform(1, capacity=1, base_latency=service, sigma=0) as fleet:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(post(http, fleet.urls[0] + CHAT) for _ in range(3)))
        elapsed = time.perf_counter() - t0
        assert all(status == 200 for status, _, _, _ in results)
        assert 3 * service * 0.95 <= elapsed < 3 * service + 0.1
        # x-queue-depth counts the others still waiting behind the answered request.
        depths = sorted(int(h["x-queue-depth"]) for _, h, _, _ in results)
        assert depths == [0, 1, 2]
        latencies = sorted(t for _, _, _, t in results)
        for rank, latency in enumerate(latencies, start=1):
            assert latency >= rank * service * 0.95
        c = fleet[0].counters
        assert c.max_in_flight == 3
        assert c.in_flight == 0
        assert fleet[0].queue_depth == 0


async def test_capacity_three_serves_concurrently(http: aiohttp.ClientSession) -> None:
    service = 0.05
    async with ReplicaFleet.uniform(1, capacity=3, base_latency=service, sigma=0) as fleet:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(post(http, fleet.urls[0] + CHAT) for _ in range(3)))
        elapsed = time.perf_counter() - t0
        assert all(status == 200 for status, _, _, _ in results)
        assert fleet[0].counters.max_in_flight == 3  # all three were served at once
        assert elapsed < 3 * service  # not one after another


async def test_speed_halves_throughput(http: aiohttp.ClientSession) -> None:
    configs = [
        ReplicaConfig(speed=1.0, base_latency=0.015),
        ReplicaConfig(speed=0.5, base_latency=0.015),
    ]
    async with ReplicaFleet(configs, seed=3) as fleet:

        async def mean_latency(url: str, n: int = 15) -> float:
            total = 0.0
            for _ in range(n):
                status, _, _, elapsed = await post(http, url + CHAT)
                assert status == 200
                total += elapsed
            return total / n

        fast, slow = await asyncio.gather(mean_latency(fleet.urls[0]), mean_latency(fleet.urls[1]))
        assert 0.012 < fast < 0.030
        assert 1.5 < slow / fast < 2.6


async def test_service_time_is_lognormal_with_the_configured_mean(
    http: aiohttp.ClientSession,
) -> None:
    async with ReplicaFleet.uniform(1, base_latency=0.004, sigma=0.5, capacity=8) as fleet:
        results = await asyncio.gather(*(post(http, fleet.urls[0] + CHAT) for _ in range(80)))
        samples = [float(h["x-service-time"]) for _, h, _, _ in results]
        mean = sum(samples) / len(samples)
        assert 0.0032 < mean < 0.0048
        assert len(set(samples)) > 70  # jittered, not constant
        logs = [math.log(s) for s in samples]
        mu = sum(logs) / len(logs)
        sd = math.sqrt(sum((x - mu) ** 2 for x in logs) / (len(logs) - 1))
        assert 0.35 < sd < 0.65


async def test_seed_makes_draws_reproducible(http: aiohttp.ClientSession) -> None:
    async def draws(seed: int) -> list[str]:
        async with ReplicaFleet.uniform(1, base_latency=0.002, seed=seed) as fleet:
            return [(await post(http, fleet.urls[0] + CHAT))[1]["x-service-time"] for _ in range(5)]

    first, again, other = await draws(11), await draws(11), await draws(12)
    assert first == again
    assert first != other


async def test_stragglers_fraction_and_slowness(http: aiohttp.ClientSession) -> None:
    base, factor = 0.003, 5.0
    async with ReplicaFleet.uniform(
        1, base_latency=base, sigma=0, straggler_rate=0.3, straggler_factor=factor,
        capacity=4, seed=5,
    ) as fleet:  # fmt: skip

        async def worker() -> list[tuple[float, float]]:
            out = []
            for _ in range(25):
                status, headers, _, elapsed = await post(http, fleet.urls[0] + CHAT)
                assert status == 200
                out.append((float(headers["x-service-time"]), elapsed))
            return out

        results = [r for rs in await asyncio.gather(*(worker() for _ in range(4))) for r in rs]
        for service, _ in results:
            assert service in (pytest.approx(base), pytest.approx(base * factor))
        slow = [t for service, t in results if service > base * 1.5]
        fast = [t for service, t in results if service <= base * 1.5]
        assert 0.16 <= len(slow) / len(results) <= 0.44
        # Stragglers really are slower, seen from the client.
        assert min(slow) >= base * factor * 0.95
        assert sorted(fast)[len(fast) // 2] < base * factor


# ----------------------------------------------------------------- faults


async def test_error_rate_one_answers_500_after_service_time(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(1, base_latency=0.02, sigma=0, error_rate=1.0) as fleet:
        status, headers, data, elapsed = await post(http, fleet.urls[0] + CHAT)
        assert status == 500
        assert data["error"]["type"] == "server_error"
        assert headers["x-replica"] == "replica-0"
        assert elapsed >= 0.019
        c = fleet[0].counters
        assert (c.received, c.errors, c.served) == (1, 1, 0)


async def test_rate_limit_answers_429_at_once_with_retry_after(
    http: aiohttp.ClientSession,
) -> None:
    async with ReplicaFleet.uniform(
        1, base_latency=1.0, rate_limit_rate=1.0, retry_after=1.2
    ) as fleet:
        status, headers, data, elapsed = await post(http, fleet.urls[0] + CHAT)
        assert status == 429
        assert headers["Retry-After"] == "2"  # whole seconds, rounded up
        assert headers["retry-after-ms"] == "1200"
        assert data["error"]["code"] == "rate_limit_exceeded"
        assert elapsed < 0.5  # did not wait for the 1 s service time
        c = fleet[0].counters
        assert (c.received, c.rejected_429, c.served, c.in_flight) == (1, 1, 0, 0)


async def test_client_timeout_on_slow_replica_counts_cancelled_and_frees_slot(
    http: aiohttp.ClientSession,
) -> None:
    async with ReplicaFleet.uniform(1, capacity=1, base_latency=2.0, sigma=0) as fleet:
        replica = fleet[0]
        short = aiohttp.ClientTimeout(total=0.05)
        # One request holds the slot, two wait in the queue; all give up.
        outcomes = await asyncio.gather(
            *(post(http, fleet.urls[0] + CHAT, timeout=short) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(o, asyncio.TimeoutError) for o in outcomes)
        await wait_until(lambda: replica.counters.in_flight == 0)
        c = replica.counters
        assert (c.received, c.cancelled, c.served, c.dropped) == (3, 3, 0, 0)
        assert c.max_in_flight == 3
        assert replica.queue_depth == 0
        # The slot came back: a fast request is served right away.
        replica.set(base_latency=0.005)
        status, headers, _, elapsed = await post(http, fleet.urls[0] + CHAT)
        assert status == 200
        assert headers["x-queue-depth"] == "0"
        assert elapsed < 0.5


async def test_hang_never_answers_until_client_gives_up(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(1, base_latency=0.005, hang=True) as fleet:
        with pytest.raises(asyncio.TimeoutError):
            await post(http, fleet.urls[0] + CHAT, timeout=aiohttp.ClientTimeout(total=0.1))
        await wait_until(lambda: fleet[0].counters.in_flight == 0)
        assert fleet[0].counters.cancelled == 1
        assert fleet[0].counters.served == 0
        # /health still answers on a hanging replica.
        async with http.get(fleet.urls[0] + "/health") as resp:
            assert resp.status == 200
        fleet[0].set(hang=False)
        status, _, _, _ = await post(http, fleet.urls[0] + CHAT)
        assert status == 200


async def test_network_latency_delays_everything(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(1, base_latency=0.005, sigma=0, network_latency=0.03) as fleet:
        _, _, _, elapsed = await post(http, fleet.urls[0] + CHAT)
        assert elapsed >= 0.034
        t0 = time.perf_counter()
        async with http.get(fleet.urls[0] + "/health") as resp:
            assert resp.status == 200
        assert time.perf_counter() - t0 >= 0.029


async def test_down_refuses_and_up_serves_on_the_same_url(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(2, base_latency=0.005) as fleet:
        url, port = fleet.urls[1], fleet[1].port
        status, _, _, _ = await post(http, url + CHAT)  # leaves a pooled keep-alive connection
        assert status == 200

        await fleet[1].down()
        assert fleet[1].is_down and fleet[1].config.down
        # The pooled connection was dropped, so the session has to reconnect: refused.
        with pytest.raises(aiohttp.ClientConnectorError):
            await post(http, url + CHAT)
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ClientConnectorError):
                await post(fresh, url + CHAT)
        # The other replica is untouched.
        assert (await post(http, fleet.urls[0] + CHAT))[0] == 200

        await fleet[1].up()
        assert not fleet[1].is_down and not fleet[1].config.down
        assert fleet[1].port == port and fleet.urls[1] == url
        status, _, _, _ = await post(http, url + CHAT)
        assert status == 200
        await fleet[1].down()
        await fleet[1].down()  # idempotent
        await fleet[1].up()
        await fleet[1].up()
        assert (await post(http, url + CHAT))[0] == 200
        c = fleet[1].counters
        assert (c.received, c.served, c.dropped) == (3, 3, 0)


async def test_down_drops_requests_in_flight(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(1, base_latency=5.0, sigma=0, capacity=1) as fleet:
        tasks = [asyncio.create_task(post(http, fleet.urls[0] + CHAT)) for _ in range(3)]
        await wait_until(lambda: fleet[0].counters.in_flight == 3)
        t0 = time.perf_counter()
        await fleet[0].down()
        assert time.perf_counter() - t0 < 0.5
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, aiohttp.ClientConnectionError) for o in outcomes), outcomes
        c = fleet[0].counters
        assert (c.received, c.dropped, c.cancelled, c.in_flight) == (3, 3, 0, 0)
        assert fleet[0].queue_depth == 0


async def test_replica_configured_down_starts_refusing(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet([ReplicaConfig(down=True, base_latency=0.005)]) as fleet:
        assert fleet[0].is_down
        with pytest.raises(aiohttp.ClientConnectorError):
            await post(http, fleet.urls[0] + CHAT)
        await fleet[0].up()
        assert (await post(http, fleet.urls[0] + CHAT))[0] == 200


# -------------------------------------------------------------- streaming


async def read_stream(resp: aiohttp.ClientResponse) -> tuple[list[Any], list[float]]:
    """Parsed SSE events (the string "[DONE]" for the end marker) and arrival times."""
    events: list[Any] = []
    times: list[float] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line:
            continue
        assert line.startswith("data: ")
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
        times.append(time.perf_counter())
    return events, times


async def test_stream_exact_tokens_and_ttft(http: aiohttp.ClientSession) -> None:
    ttft, delay = 0.05, 0.01
    cfg = ReplicaConfig(ttft=ttft, token_delay=delay, tokens=5, network_latency=0.01)
    async with ReplicaFleet([cfg]) as fleet:
        t0 = time.perf_counter()
        async with http.post(fleet.urls[0] + CHAT, json={**BODY, "stream": True}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["x-queue-depth"] == "0"
            events, times = await read_stream(resp)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        tokens = [c["choices"][0]["delta"].get("content") for c in chunks]
        assert tokens == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 ", None]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        first = times[0] - t0
        assert 0.01 + ttft <= first < 0.01 + ttft + 0.05
        assert times[4] - times[0] >= 4 * delay * 0.9
        assert fleet[0].counters.served == 1


async def test_text_completion_stream_and_usage(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(1, ttft=0.005, token_delay=0.001, tokens=3) as fleet:
        body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
        async with http.post(fleet.urls[0] + TEXT, json=body) as resp:
            events, _ = await read_stream(resp)
        assert events[-1] == "[DONE]"
        texts = [e["choices"][0]["text"] for e in events[:-1] if e["choices"]]
        assert texts == ["tok0 ", "tok1 ", "tok2 ", ""]
        assert events[-2]["usage"]["completion_tokens"] == 3


async def test_stream_ttft_defaults_to_service_time(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(1, base_latency=0.04, sigma=0, tokens=1) as fleet:
        t0 = time.perf_counter()
        async with http.post(fleet.urls[0] + CHAT, json={"stream": True}) as resp:
            _, times = await read_stream(resp)
        assert 0.04 <= times[0] - t0 < 0.09


async def test_error_after_tokens_breaks_the_stream(http: aiohttp.ClientSession) -> None:
    cfg = ReplicaConfig(ttft=0.005, token_delay=0.002, tokens=6, error_after_tokens=2)
    async with ReplicaFleet([cfg]) as fleet:
        seen: list[str] = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(fleet.urls[0] + CHAT, json={"stream": True}) as resp:
                assert resp.status == 200
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("data: {"):
                        seen.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
        assert seen == ["tok0 ", "tok1 "]
        await wait_until(lambda: fleet[0].counters.in_flight == 0)
        c = fleet[0].counters
        assert (c.received, c.dropped, c.served, c.cancelled) == (1, 1, 0, 0)
        # The replica keeps serving (a fresh connection).
        fleet[0].set(error_after_tokens=None)
        async with http.post(fleet.urls[0] + CHAT, json={"stream": True}) as resp:
            events, _ = await read_stream(resp)
        assert events[-1] == "[DONE]"


async def test_client_leaving_mid_stream_counts_cancelled(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(1, ttft=0.005, token_delay=0.02, tokens=50) as fleet:
        async with http.post(fleet.urls[0] + CHAT, json={"stream": True}) as resp:
            await resp.content.readline()
            resp.close()  # drop the connection with most of the stream unread
        await wait_until(lambda: fleet[0].counters.in_flight == 0)
        c = fleet[0].counters
        assert (c.cancelled, c.served, c.dropped) == (1, 0, 0)


# -------------------------------------------------------------- reconfig


async def test_set_while_running_changes_behaviour(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(2, base_latency=0.005) as fleet:
        url = fleet.urls[0]
        assert (await post(http, url + CHAT))[0] == 200
        fleet[0].set(error_rate=1.0)
        assert (await post(http, url + CHAT))[0] == 500
        fleet[0].set(error_rate=0.0, rate_limit_rate=1.0)
        assert (await post(http, url + CHAT))[0] == 429
        fleet[0].set(rate_limit_rate=0.0, region="ap-south-1", name="mumbai")
        status, headers, _, _ = await post(http, url + CHAT)
        assert status == 200
        assert headers["x-region"] == "ap-south-1"
        assert headers["x-replica"] == "mumbai"
        assert fleet[0].counters.snapshot() == ReplicaCounters(
            received=4, served=2, errors=1, rejected_429=1, max_in_flight=1
        )

        fleet.set_all(error_rate=1.0)
        assert [(await post(http, u + CHAT))[0] for u in fleet.urls] == [500, 500]
        assert fleet.total_errors == 3  # one from before


async def test_raising_capacity_admits_queued_requests(http: aiohttp.ClientSession) -> None:
    service = 0.15
    async with ReplicaFleet.uniform(1, capacity=1, base_latency=service, sigma=0) as fleet:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(post(http, fleet.urls[0] + CHAT)) for _ in range(3)]
        await wait_until(lambda: fleet[0].queue_depth == 3)
        fleet[0].set(capacity=3)
        await asyncio.gather(*tasks)
        assert time.perf_counter() - t0 < 2 * service


async def test_reset_counters_keeps_the_gauge(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(1, base_latency=0.005, hang=True) as fleet:
        task = asyncio.create_task(post(http, fleet.urls[0] + CHAT))
        await wait_until(lambda: fleet[0].counters.in_flight == 1)
        fleet.reset_counters()
        assert fleet[0].counters.snapshot() == ReplicaCounters(in_flight=1, max_in_flight=1)
        task.cancel()
        await wait_until(lambda: fleet[0].counters.in_flight == 0)
        assert fleet[0].counters.cancelled == 1


async def test_mixed_faults_keep_counters_balanced(http: aiohttp.ClientSession) -> None:
    async with ReplicaFleet.uniform(
        3, base_latency=0.003, error_rate=0.3, rate_limit_rate=0.2, capacity=2, seed=1
    ) as fleet:
        urls = fleet.urls * 20
        results = await asyncio.gather(*(post(http, u + CHAT) for u in urls))
        statuses = [s for s, _, _, _ in results]
        assert statuses.count(200) == fleet.total_served
        assert statuses.count(500) == fleet.total_errors
        assert statuses.count(429) == fleet.total_rejected_429
        assert fleet.total_received == 60
        assert fleet.total_in_flight == 0
        assert all(balanced(r.counters) for r in fleet)
        assert 0 < fleet.total_errors < 30 and 0 < fleet.total_rejected_429 < 25


# ------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("speed", 0),
        ("speed", -1.0),
        ("speed", float("nan")),
        ("base_latency", -0.1),
        ("sigma", float("inf")),
        ("capacity", 0),
        ("capacity", 1.5),
        ("capacity", True),
        ("straggler_rate", 1.5),
        ("straggler_factor", 0.5),
        ("error_rate", -0.01),
        ("rate_limit_rate", 2),
        ("retry_after", -1),
        ("hang", "yes"),
        ("healthy", 1),
        ("ttft", -0.5),
        ("token_delay", "fast"),
        ("tokens", -1),
        ("error_after_tokens", -2),
        ("region", ""),
        ("name", 42),
        ("model", None),
    ],
)
def test_config_validation_names_the_bad_value(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        ReplicaConfig(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_config_defaults() -> None:
    cfg = ReplicaConfig()
    assert (cfg.speed, cfg.base_latency, cfg.sigma, cfg.capacity) == (1.0, 0.040, 0.25, 4)
    assert (cfg.straggler_rate, cfg.straggler_factor, cfg.error_rate) == (0.0, 20.0, 0.0)
    assert (cfg.rate_limit_rate, cfg.retry_after, cfg.hang, cfg.down) == (0.0, 1.0, False, False)
    assert (cfg.ttft, cfg.token_delay, cfg.tokens, cfg.error_after_tokens) == (None, 0.005, 8, None)
    assert cfg.healthy and cfg.network_latency == 0.0
    with pytest.raises(TypeError):
        ReplicaConfig(0.5)  # type: ignore[call-arg]  # keyword-only


async def test_set_rejects_bad_values_and_keeps_the_old_config() -> None:
    async with ReplicaFleet.uniform(2) as fleet:
        before = fleet[0].config
        with pytest.raises(ConfigError, match="speed"):
            fleet[0].set(speed=0)
        with pytest.raises(ConfigError, match="bogus"):
            fleet[0].set(bogus=1)
        with pytest.raises(ConfigError, match="down"):
            fleet[0].set(down=True)
        assert fleet[0].config == before
        fleet[1].set(capacity=7)
        with pytest.raises(ConfigError, match="capacity"):
            fleet.set_all(error_rate=0.5, capacity=0)
        assert fleet[0].config.error_rate == 0.0 == fleet[1].config.error_rate  # all or nothing
        assert fleet[1].config.capacity == 7
    with pytest.raises(ConfigError, match="nope"):
        ReplicaFleet.uniform(1, nope=True)
    with pytest.raises(ConfigError, match="-1"):
        ReplicaFleet.uniform(-1)


# -------------------------------------------------------------- lifecycle


async def test_start_and_aclose_without_context_manager(http: aiohttp.ClientSession) -> None:
    fleet = ReplicaFleet.uniform(2, base_latency=0.005, region="us-east-1")
    with pytest.raises(RuntimeError):
        _ = fleet.urls  # not started yet
    await fleet.start()
    try:
        assert isinstance(fleet[0], Replica)
        assert [r.config.region for r in fleet] == ["us-east-1", "us-east-1"]
        assert (await post(http, fleet.urls[1] + CHAT))[0] == 200
        with pytest.raises(RuntimeError):
            await fleet.start()
    finally:
        await fleet.aclose()
    await fleet.aclose()  # idempotent
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(http, fleet.urls[0] + CHAT)


async def test_aclose_is_quick_with_hanging_requests(http: aiohttp.ClientSession) -> None:
    fleet = ReplicaFleet.uniform(2, hang=True)
    await fleet.start()
    tasks = [asyncio.create_task(post(http, u + CHAT)) for u in fleet.urls * 3]
    await wait_until(lambda: fleet.total_in_flight == 6)
    t0 = time.perf_counter()
    await fleet.aclose()
    assert time.perf_counter() - t0 < 1.0
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2.0)
    assert all(isinstance(o, aiohttp.ClientConnectionError) for o in outcomes), outcomes
    assert fleet.total_dropped == 6
    assert fleet.total_in_flight == 0
