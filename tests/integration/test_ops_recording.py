"""Traffic recording on loopback: one record per call on every call path, JSONL and CSV,
rotation within bounds, drops counted instead of blocking, and the planner reading it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import lbclient
from lbclient.ops import CapacityPlanner, TrafficRecorder, load_trace
from lbclient.testing import ReplicaConfig

PAYLOAD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def _post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> Any:
    async with session.post(url + "/v1/chat/completions", json=payload) as r:
        r.raise_for_status()
        body = await r.json()
    lbclient.report_usage(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    return body


def _files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
async def test_every_call_path_is_recorded(
    fleet_factory: Any, session: aiohttp.ClientSession, tmp_path: Path, suffix: str
) -> None:
    fleet = await fleet_factory(
        [
            ReplicaConfig(region="us-east-1", base_latency=0.01),
            ReplicaConfig(region="eu-west-1", base_latency=0.01),
        ]
    )
    eps = [
        lbclient.Endpoint(u, region=r)
        for u, r in zip(fleet.urls, ["us-east-1", "eu-west-1"], strict=True)
    ]
    lb = lbclient.Balancer(eps, admission=lbclient.Admission(limit=4, max_queue=0))
    plain_lb = lbclient.Balancer(fleet.urls)
    path = tmp_path / f"traffic.{suffix}"
    with (
        TrafficRecorder(lb, path, flush_interval=0.05) as rec,
        TrafficRecorder(plain_lb, tmp_path / f"plain.{suffix}", flush_interval=0.05),
    ):

        @lb.route(tenant=lambda p: p["user"], tokens=lambda p: 100)
        async def complete(endpoint: lbclient.Endpoint, p: dict[str, Any]) -> Any:
            return await _post(session, endpoint.url, PAYLOAD)

        @lb.route(tenant=lambda p: p["user"])
        async def admitted(endpoint: lbclient.Endpoint, p: dict[str, Any]) -> Any:
            return await _post(session, endpoint.url, PAYLOAD)

        @lb.route(tokens=lambda: 50)
        async def stream(endpoint: lbclient.Endpoint) -> Any:
            async with session.post(
                endpoint.url + "/v1/chat/completions", json={**PAYLOAD, "stream": True}
            ) as r:
                r.raise_for_status()
                async for line in r.content:
                    if line.startswith(b"data:") and b"[DONE]" not in line:
                        yield line

        @plain_lb.route
        async def fast(endpoint: lbclient.Endpoint) -> Any:
            return await _post(session, endpoint.url, PAYLOAD)

        for i in range(6):
            await complete({"user": f"t{i % 2}"})
        await admitted({"user": "t9"})
        async with contextlib.aclosing(stream()) as chunks:
            n = sum([1 async for _ in chunks])
        assert n >= 8
        await fast()
        async with lb.pick(tenant="t7") as ep:
            await _post(session, ep.url, PAYLOAD)
        # a burst past the limit with no queue: shed at once, recorded as such
        outcomes = await asyncio.gather(
            *(complete({"user": "burst"}) for _ in range(12)), return_exceptions=True
        )
        shed = sum(isinstance(x, lbclient.Overloaded) for x in outcomes)
        assert shed >= 1
        for _ in range(100):
            if rec.written >= 6 + 1 + 1 + 1 + 12:
                break
            await asyncio.sleep(0.05)
    records = load_trace(path)
    assert len(records) == 6 + 1 + 1 + 1 + 12 == rec.written
    assert rec.dropped == 0
    by_tenant = [r for r in records if r.tenant in ("t0", "t1")]
    assert len(by_tenant) == 6
    for r in by_tenant:
        assert r.ok and r.tokens == 100 and r.input_tokens == 1 and r.output_tokens == 8
        assert r.endpoint in fleet.urls and r.region in ("us-east-1", "eu-west-1")
        assert 0.005 < r.latency < 5 and r.t > 1.6e9
    (st,) = [r for r in records if r.stream]
    assert st.ok and st.ttft is not None and 0 < st.ttft <= st.latency and st.tokens == 50
    assert [r.tenant for r in records if r.tenant == "t9"] == ["t9"]
    assert any(r.tenant == "t7" and r.ok for r in records)
    shed_records = [r for r in records if r.shed]
    assert len(shed_records) == shed and all(r.tenant == "burst" for r in shed_records)
    (plain,) = load_trace(tmp_path / f"plain.{suffix}")
    assert plain.ok and plain.tenant is None and plain.endpoint in fleet.urls
    # the planner reads it
    summary = CapacityPlanner(records).traffic()
    assert summary.calls == len(records) and summary.shed == shed
    await lb.aclose()
    await plain_lb.aclose()


async def test_rotation_stays_within_bounds(
    fleet_factory: Any, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fleet = await fleet_factory([ReplicaConfig(base_latency=0.001, sigma=0)])
    lb = lbclient.Balancer(fleet.urls)

    @lb.route(tenant=lambda i: f"tenant-{i}")
    async def call(endpoint: lbclient.Endpoint, i: int) -> None:
        async with session.post(endpoint.url + "/v1/chat/completions", json=PAYLOAD) as r:
            await r.read()

    path = tmp_path / "t.jsonl"
    rec = TrafficRecorder(lb, path, max_bytes=2048, backups=2, flush_interval=0.02).start()
    for i in range(200):
        await call(i)
        if i % 20 == 0:
            await asyncio.sleep(0.03)
    rec.close()
    files = _files(tmp_path)
    assert [f.name for f in files] == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    assert all(f.stat().st_size <= 2048 for f in files)
    records = load_trace(path)
    assert 0 < len(records) < 200 and rec.written == 200  # the oldest rotated away
    tenants = [int(r.tenant.split("-")[1]) for r in records if r.tenant]
    assert tenants == sorted(tenants) and tenants[-1] == 199  # oldest first, newest kept
    json.loads(path.read_text().splitlines()[0])  # each line is JSON
    await lb.aclose()


async def test_a_full_buffer_drops_and_counts_never_blocks(
    fleet_factory: Any, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fleet = await fleet_factory([ReplicaConfig(base_latency=0.001, sigma=0)])
    lb = lbclient.Balancer(fleet.urls)

    @lb.route
    async def call(endpoint: lbclient.Endpoint) -> None:
        async with session.post(endpoint.url + "/v1/chat/completions", json=PAYLOAD) as r:
            await r.read()

    # a writer that does not run in time (an hour between writes), a buffer of 5
    rec = TrafficRecorder(lb, tmp_path / "t.csv", buffer=5, flush_interval=3600).start()
    rec._wake.set = lambda: None  # type: ignore[method-assign]  # no early wake-up either
    for _ in range(20):
        await call()
    assert rec.dropped == 15 and len(rec._queue) == 5
    del rec._wake.set  # type: ignore[method-assign]
    rec.close()  # writes what it holds
    assert rec.written == 5 and len(load_trace(tmp_path / "t.csv")) == 5
    stats = lb.stats()
    assert stats.calls == 20 and stats.calls_failed == 0
    await lb.aclose()


def test_bad_arguments(tmp_path: Path) -> None:
    lb = lbclient.Balancer(["http://a"])
    with pytest.raises(lbclient.ConfigError, match="format"):
        TrafficRecorder(lb, tmp_path / "x.parquet")
    with pytest.raises(lbclient.ConfigError, match="buffer"):
        TrafficRecorder(lb, tmp_path / "x.csv", buffer=0)
    with pytest.raises(lbclient.ConfigError, match="Balancer"):
        TrafficRecorder(object(), tmp_path / "x.csv")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.jsonl")
