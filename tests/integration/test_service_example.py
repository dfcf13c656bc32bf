"""``examples/service.py``: the aiohttp service with ``/metrics``, ``/ready``, ``/health``
and ``POST /v1/chat/completions`` over fake replicas on loopback -- in process (its
``make_app``), and as a program (``--demo``: it starts its own fleet and traffic, and
exits cleanly on SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import lbclient
from lbclient.testing import ReplicaConfig, ReplicaFleet

pytest.importorskip("prometheus_client")

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "examples" / "service.py"
FAST: dict[str, Any] = {"base_latency": 0.005, "sigma": 0.0, "token_delay": 0.001, "tokens": 4}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def load_service() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lbclient_example_service", SERVICE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.asynccontextmanager
async def running(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lbs), v in samples(text).items()
        if n == name and all((k, want) in lbs for k, want in labels.items())
    )


async def check_metrics(promtool: str, text: str) -> None:
    out = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=10,
    )
    assert out.returncode == 0 and not out.stdout.strip(), (out.stdout + out.stderr).decode()


async def test_the_service_answers_chat_and_exposes_metrics_ready_health(
    fleet_factory: Any, session: aiohttp.ClientSession, promtool: str
) -> None:
    service = load_service()
    fleet: ReplicaFleet = await fleet_factory([ReplicaConfig(capacity=8, **FAST)] * 3)
    lb = service.make_balancer(fleet.urls)
    async with running(service.make_app(lb, balancer="chat")) as url:
        # Chat, whole and streamed.
        async with session.post(f"{url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
            reply = await r.json()
        assert reply["choices"][0]["message"]["content"].endswith("tok0 tok1 tok2 tok3 ")
        assert reply["model"] == "m"
        async with session.post(f"{url}/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            events = [line for line in (await r.text()).split("\n\n") if line]
        assert events[-1] == "data: [DONE]"
        deltas = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert [d["choices"][0]["delta"]["content"] for d in deltas] == [
            f"tok{i} " for i in range(4)
        ]
        async with session.post(f"{url}/v1/chat/completions", data=b"{nope") as r:
            assert r.status == 400
        async with session.post(f"{url}/v1/chat/completions", json={"model": "m"}) as r:
            assert r.status == 400

        # A replica fails everything: calls still succeed (retried elsewhere), and the
        # metrics say so.
        fleet[1].set(error_rate=1.0)

        async def chat() -> int:
            async with session.post(f"{url}/v1/chat/completions", json=CHAT) as r:
                return r.status

        calls = 2
        for _ in range(10):  # until the balancer has tried the broken replica
            assert await asyncio.gather(*(chat() for _ in range(6))) == [200] * 6
            calls += 6
            if fleet[1].counters.errors:
                break
        async with session.get(f"{url}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
        await check_metrics(promtool, text)
        assert value(text, "lbclient_calls_total", balancer="chat", outcome="ok") == calls
        assert value(text, "lbclient_calls_total", outcome="failed") == 0
        failures = value(text, "lbclient_attempts_total", endpoint=fleet.urls[1], outcome="failure")
        assert failures == fleet[1].counters.errors >= 1
        # Each failure was retried -- unless it was a hedge's backup (the primary went on).
        assert 1 <= value(text, "lbclient_retries_total", reason="status 500") <= failures
        assert value(text, "lbclient_call_duration_seconds_count") in (
            calls - 1,
            calls,
        )  # a stream?
        assert value(text, "lbclient_time_to_first_token_seconds_count") == 1
        assert value(text, "lbclient_admission_limit") > 0
        for name in (
            "lbclient_endpoint_in_flight",
            "lbclient_endpoint_pickable",
            "lbclient_endpoint_server_queue_depth",
            "lbclient_demand_calls",
            "lbclient_hedges_total",
        ):
            assert any(n == name for n, _ in samples(text)), name

        # OpenMetrics when the scraper asks for it (Prometheus does, first).
        accept = "application/openmetrics-text; version=1.0.0"
        async with session.get(f"{url}/metrics", headers={"Accept": accept}) as r:
            assert r.headers["Content-Type"].startswith("application/openmetrics-text")
            families = {f.name for f in parse_openmetrics(await r.text())}
        assert {"lbclient_calls", "lbclient_demand_calls"} <= families

        async with session.get(f"{url}/health") as r:
            health = await r.json()
        assert health["ready"] is True and health["stopping"] is False
        assert [e["url"] for e in health["endpoints"]] == fleet.urls
        assert health["endpoints"][1]["failures"] == failures

        async with session.get(f"{url}/ready") as r:
            assert (r.status, await r.json()) == (200, {"ready": True})
        for u in fleet.urls:
            lb.drain(u)
        async with session.get(f"{url}/ready") as r:
            assert (r.status, await r.json()) == (503, {"ready": False})
        async with session.post(f"{url}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 503  # no endpoint to pick
    await lb.aclose()


async def test_the_service_maps_sheds_and_upstream_failures_to_statuses(
    fleet_factory: Any, session: aiohttp.ClientSession
) -> None:
    service = load_service()
    fleet: ReplicaFleet = await fleet_factory([ReplicaConfig(**{**FAST, "base_latency": 0.3})])
    lb = lbclient.Balancer(
        fleet.urls,
        admission=lbclient.Admission(limit=1, max_queue=0, throttle=None),
        retry=lbclient.Retry(attempts=1),
    )
    async with running(service.make_app(lb)) as url:

        async def post(body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                return r.status, await r.json(), r.headers

        first = asyncio.create_task(post(CHAT))
        await asyncio.sleep(0.1)
        status, body, headers = await post(CHAT)
        assert status == 429
        assert body["error"]["type"] == "overloaded: queue full"
        assert int(headers["Retry-After"]) >= 1
        assert (await first)[0] == 200
        fleet[0].set(error_rate=1.0, base_latency=0.001)
        status, body, _ = await post(CHAT)
        assert status == 502 and body["error"]["type"] == "upstream"
        status, body, _ = await post({**CHAT, "stream": True})  # fails before a token
        assert status == 502
        async with session.get(f"{url}/metrics") as r:
            text = await r.text()
        assert value(text, "lbclient_shed_total", reason="queue full") == 1
        assert value(text, "lbclient_calls_failed_total", reason="shed: queue full") == 1
        assert value(text, "lbclient_calls_total", outcome="failed") == 3
    await lb.aclose()


@pytest.mark.timeout(30)
async def test_the_demo_program_serves_scrapes_and_stops_on_sigterm(
    session: aiohttp.ClientSession, promtool: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVICE),
        "--demo",
        "--port",
        "0",
        "--load",
        "40",
        "--grace",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 8.0)).decode().strip()
        assert line.startswith("serving on http://127.0.0.1:"), line
        url = line.split()[-1]
        text = ""
        for _ in range(40):  # the demo load: calls, and some failures of the flaky replica
            await asyncio.sleep(0.1)
            async with session.get(f"{url}/metrics") as r:
                text = await r.text()
            if value(text, "lbclient_calls_total", outcome="ok") >= 20:
                break
        await check_metrics(promtool, text)
        assert value(text, "lbclient_calls_total", balancer="chat", outcome="ok") >= 20
        assert value(text, "lbclient_time_to_first_token_seconds_count") >= 1
        assert len({lbs for n, lbs in samples(text) if n == "lbclient_endpoint_pickable"}) == 3
        async with session.get(f"{url}/ready") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stdout.read(), 8.0)
        assert await asyncio.wait_for(proc.wait(), 2.0) == 0
        assert rest.decode().strip().endswith("stopped")
        errors = (await proc.stderr.read()).decode()
        assert "Traceback" not in errors, errors
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
