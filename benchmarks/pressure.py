"""The playbook's ten pressure scenarios, one command: a pass/fail table, a PNG, a JSON.

::

    python benchmarks/pressure.py               # full run (~8 min)
    python benchmarks/pressure.py --quick       # shorter phases (< 3 min)
    python benchmarks/pressure.py --scenarios spike,cost_runaway --out /tmp/p

Every scenario runs against a fresh :class:`lbclient.testing.ReplicaFleet` in its own
process (this script with ``--fleet-server``, driven over stdin/stdout: take replicas
down, bring them up, change their speed, warm them up), so the replicas' CPU does not
share an event loop or a GIL with the client under test.  The client is lbclient in
this process: one ``aiohttp.ClientSession`` (no connection limit unless said, a 10 s
timeout per request), requests ``POST /v1/chat/completions``.  Load is open loop:
arrival times drawn up front (Poisson, seeded; non-homogeneous by thinning), each
request a task launched at its time, its latency measured from that time (no
coordinated omission).  Replicas: 40 ms mean service (lognormal, sigma 0.25) unless said.

=================  =======================================================================
scenario           what, and the target
=================  =======================================================================
spike              0 -> 1000 req/s in 30 s (quick: 10 s), then 1000 req/s held; 8 replicas
                   x 16 slots.  >= 99.9% success; p99 at the peak <= 3x p99 at low load.
                   The client's event-loop lag is reported beside it: at 1000 req/s the
                   client and the fleet take about one of a 2-core machine's cores, so a
                   busy machine shows up here first (a lag of hundreds of ms is the
                   machine, not the balancer).
half_fail          8 replicas, 300 req/s; 4 of them die at once.  >= 95% success (the
                   playbook's bar; we aim at 100%).
cost_runaway       4 token-priced replicas (2 at 1/1k tokens, 2 at 10/1k), 200 req/s that
                   would spend ~5x the ceiling.  Spend <= ceiling (+ what calls in flight
                   cost beyond their reservations); 100% of admitted calls succeed; the
                   rest shed with Overloaded("budget").
region_failure     client in us-east-1; 3 replicas in each of us-east-1, us-west-2 and
                   eu-west-1 (10/35/45 ms away); the whole local region dies.  >= 99.9%
                   success; mostly local before (>= 80%), mostly (>= 2/3) the nearest region
                   after (Locality spills to the next one when the nearest is busy).
cold_start         2 warm replicas at 60% load; 2 cold ones join (5x slow, warming up
                   over 10 s); slow_start=10.  p99 while they warm <= 1.5x p99 before.
spot_storm         10 replicas, 5 on spot: 4 spot ones (80% of spot capacity) get an
                   interruption notice within 2 min (quick: 12 s) and are drained, then
                   taken away.  No failed request.
oscillation        load between 20% and 90% of capacity (square wave); lbclient's demand
                   metric sampled, replayed through the HPA with the playbook's behaviour
                   (time scaled so a cycle lasts 4 minutes).  >= 99.9% success; at most
                   one change of scaling direction (vs the same HPA without behaviour).
burst_10k          10,000 requests submitted at once to 4 replicas x 64 slots (aiohttp's
                   default 100 connections).  100% success, none hung, <= 60 s.
sustained_sla      traffic recorded at low load (TrafficRecorder) -> CapacityPlanner sizes
                   the fleet for 250 req/s at p95 <= 150 ms -> 60 s (quick: 10 s) at 250
                   req/s on that fleet.  p95 <= 150 ms; >= 99.9% success.
noisy_tenant       admission.py's setup: 4 replicas x 5 slots x 100 ms; 10 tenants at 6% of
                   capacity each, then one goes 10x (114% in all); Admission(max_wait=0.3),
                   fair, each tenant's quota 2x its normal rate.  The 9 quiet tenants:
                   >= 99.9% success and p99 <= 1.5x before.  (Full run: the fair queue
                   alone too, for contrast.)
=================  =======================================================================

Output: a table (each scenario's figure, its target, pass/fail), ``pressure.json`` in
``--out`` (default ``benchmarks/results``): a list of ``{"scenario", "passed",
"figure", "target"}``, one per scenario, as SPEC.md says; ``pressure-details.json``
(every number, the machine, its load average); ``pressure.png`` (one panel per
scenario).  Everything is bounded in time: each fleet process has a watchdog, each
scenario a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import math
import os
import platform
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SELF = str(Path(__file__).resolve())
sys.path.insert(0, str(HERE.parent))  # this checkout's lbclient, wherever we run from

import lbclient
from _harness import PAYLOAD, OpenLoop, quantile
from lbclient.testing import ReplicaConfig, ReplicaFleet

REQUEST_TIMEOUT = 10.0
SCENARIOS = (
    "spike",
    "half_fail",
    "cost_runaway",
    "region_failure",
    "cold_start",
    "spot_storm",
    "oscillation",
    "burst_10k",
    "sustained_sla",
    "noisy_tenant",
)


# ====================================================================== the fleet process


def _watchdog(seconds: float, who: str) -> None:
    def fire() -> None:
        sys.stderr.write(f"pressure.py {who}: watchdog after {seconds:.0f} s, exiting\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


async def _serve(spec: dict[str, Any]) -> None:
    configs = [ReplicaConfig(**fields) for fields in spec["replicas"]]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    ramps: dict[int, asyncio.Task[None]] = {}

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    async def warm(i: int, start: float, seconds: float, fleet: ReplicaFleet) -> None:
        t0 = loop.time()
        while True:
            f = (loop.time() - t0) / seconds
            if f >= 1.0:
                fleet[i].set(speed=1.0)
                return
            fleet[i].set(speed=start + (1.0 - start) * f)
            await asyncio.sleep(0.05)

    async with ReplicaFleet(configs, seed=int(spec.get("seed", 0))) as fleet:
        emit({"urls": fleet.urls, "pid": os.getpid()})
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = json.loads(line)
            op = cmd.get("op")
            targets = [fleet[i] for i in cmd.get("replicas", ())]
            try:
                if op == "quit":
                    emit({"ok": True})
                    return
                if op == "stats":
                    emit({"counters": [r.counters.as_dict() for r in fleet]})
                    continue
                if op == "down":
                    await asyncio.gather(*(r.down() for r in targets))
                elif op == "up":
                    await asyncio.gather(*(r.up() for r in targets))
                elif op == "set":
                    for r in targets:
                        r.set(**cmd["fields"])
                elif op == "warm":
                    for i in cmd["replicas"]:
                        old = ramps.pop(i, None)
                        if old is not None:
                            old.cancel()
                        ramps[i] = loop.create_task(
                            warm(i, float(cmd["from"]), float(cmd["seconds"]), fleet)
                        )
                else:
                    raise ValueError(f"unknown op {op!r}")
                emit({"ok": True})
            except Exception as exc:
                emit({"error": f"{type(exc).__name__}: {exc}"})


def fleet_server_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    _watchdog(float(spec.get("max_seconds", 600.0)), "fleet")
    asyncio.run(_serve(spec))
    return 0


class Fleet:
    """The fleet process, from the client's side."""

    def __init__(self, replicas: Sequence[dict[str, Any]], seed: int, max_seconds: float) -> None:
        self.spec = {"replicas": list(replicas), "seed": seed, "max_seconds": max_seconds}
        self.proc: asyncio.subprocess.Process | None = None
        self.urls: list[str] = []
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Fleet:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SELF,
            "--fleet-server",
            json.dumps(self.spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**22,
        )
        hello = json.loads(await asyncio.wait_for(self._line(), 30.0))
        self.urls = hello["urls"]
        return self

    async def _line(self) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fleet process exited")
        return line

    async def cmd(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        async with self._lock:
            self.proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
            await self.proc.stdin.drain()
            reply: dict[str, Any] = json.loads(await asyncio.wait_for(self._line(), 30.0))
        if "error" in reply:
            raise RuntimeError(f"fleet {op}: {reply['error']}")
        return reply

    async def received(self) -> list[int]:
        return [c["received"] for c in (await self.cmd("stats"))["counters"]]

    async def __aexit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.cmd("quit"), 5.0)
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def replica(**fields: Any) -> dict[str, Any]:
    return {"base_latency": 0.04, "sigma": 0.25, "capacity": 4, **fields}


# ====================================================================== load and outcomes


def arrivals(
    rate: Callable[[float], float], duration: float, peak: float, rng: random.Random
) -> list[float]:
    """Poisson arrivals at ``rate(t)`` per second over ``[0, duration)`` (thinning)."""
    out = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return out
        if rng.random() * peak <= rate(t):
            out.append(t)


@dataclass
class Outcome:
    at: float  # scheduled, seconds from the origin
    latency: float | None = None  # seconds from the scheduled time, successes only
    error: str | None = None
    replica: str | None = None
    tenant: str | None = None
    done_at: float | None = None


@dataclass
class Run:
    outcomes: list[Outcome]
    late_ms: float
    wall: float


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, lbclient.Overloaded):
        return f"Overloaded({exc.reason})"
    name = type(exc).__name__
    cause = exc.__cause__
    if isinstance(exc, lbclient.AttemptsExhausted | lbclient.DeadlineExceeded) and cause:
        name += f"({type(cause).__name__})"
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        name += f"({status})"
    return name


async def drive(
    times: Sequence[float],
    call: Callable[[int], Awaitable[str | None]],
    *,
    tenants: Sequence[str | None] | None = None,
    origin: float | None = None,
    drain: float = 30.0,
) -> Run:
    """Launch ``call(i)`` at each of ``times`` (seconds from ``origin``), open loop."""
    loop = asyncio.get_running_loop()
    t0 = (loop.time() + 0.05) if origin is None else origin
    outs = [
        Outcome(at=t, tenant=None if tenants is None else tenants[i]) for i, t in enumerate(times)
    ]

    async def one(i: int, when: float) -> None:
        o = outs[i]
        try:
            o.replica = await call(i)
            o.latency = loop.time() - when
        except Exception as exc:
            o.error = _error_name(exc)
        o.done_at = loop.time() - t0

    calls = OpenLoop()
    await calls.launch(times, t0, one)
    for t in await calls.drain(drain):
        i = calls.tasks.index(t)
        outs[i].error = outs[i].error or "Hung"
    return Run(outs, calls.late * 1000.0, loop.time() - t0)


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 1)


def stats(outs: Sequence[Outcome]) -> dict[str, Any]:
    ok = sorted(o.latency for o in outs if o.latency is not None)
    errors = Counter(o.error for o in outs if o.error is not None)
    return {
        "n": len(outs),
        "ok": len(ok),
        "success_pct": 100.0 * len(ok) / len(outs) if outs else None,
        "p50_ms": ms(quantile(ok, 0.5)),
        "p95_ms": ms(quantile(ok, 0.95)),
        "p99_ms": ms(quantile(ok, 0.99)),
        "errors": dict(errors.most_common()),
    }


def between(outs: Sequence[Outcome], a: float, b: float) -> list[Outcome]:
    return [o for o in outs if a <= o.at < b]


def series(outs: Sequence[Outcome], duration: float, width: float) -> dict[str, list[Any]]:
    """Per window (by scheduled time): offered req/s, success %, p99 ms."""
    n = max(1, math.ceil(duration / width))
    buckets: list[list[Outcome]] = [[] for _ in range(n)]
    for o in outs:
        i = min(n - 1, max(0, int(o.at / width)))
        buckets[i].append(o)
    return {
        "t": [round((i + 0.5) * width, 3) for i in range(n)],
        "rate": [len(b) / width for b in buckets],
        "success": [stats(b)["success_pct"] for b in buckets],
        "p99_ms": [stats(b)["p99_ms"] for b in buckets],
    }


@dataclass
class Result:
    scenario: str
    passed: bool
    figure: str
    target: str
    details: dict[str, Any] = field(default_factory=dict)
    plot: dict[str, Any] = field(default_factory=dict)


def pct(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 99.995 and x < 100.0:
        return f"{x:.3f}%"
    return f"{x:.2f}%".replace(".00%", "%")


# ====================================================================== the client


class Client:
    """One aiohttp session and the request function every scenario uses."""

    def __init__(self, limit: int = 0) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )

    async def post(self, url: str, payload: dict[str, Any] = PAYLOAD, usage: bool = False) -> str:
        async with self.session.post(url + "/v1/chat/completions", json=payload) as r:
            r.raise_for_status()
            body = await r.json()
            if usage:
                u = body["usage"]
                lbclient.report_usage(u["prompt_tokens"], u["completion_tokens"])
            return r.headers["x-replica"]

    async def aclose(self) -> None:
        await self.session.close()


def policies(**kw: Any) -> dict[str, Any]:
    return {"retry": lbclient.Retry(attempts=3), "breaker": lbclient.Breaker(), **kw}


@contextlib.asynccontextmanager
async def routed(
    endpoints: Iterable[str | lbclient.Endpoint], seed: int, *, limit: int = 0, **kw: Any
) -> AsyncIterator[tuple[lbclient.Balancer, Callable[[], Awaitable[str]]]]:
    """The set-up most scenarios share: a :class:`Client` (``limit`` connections), a
    Balancer over ``endpoints`` with :func:`policies` (``kw`` on top), and ``call()``, one
    request through it.  Both are closed at the end of the block."""
    client = Client(limit)
    lb = lbclient.Balancer(endpoints, **policies(**kw), rng=seed)

    @lb.route
    async def call(endpoint: lbclient.Endpoint) -> str:
        return await client.post(endpoint.url)

    yield lb, call
    await lb.aclose()
    await client.aclose()


# ====================================================================== the scenarios


@dataclass
class Config:
    quick: bool
    seed: int

    def pick(self, full: float, quick: float) -> float:
        return quick if self.quick else full


async def spike(cfg: Config) -> Result:
    ramp = cfg.pick(30.0, 10.0)
    hold = cfg.pick(5.0, 3.0)
    peak = 1000.0
    duration = ramp + hold

    def rate(t: float) -> float:
        return peak * min(1.0, t / ramp)

    times = arrivals(rate, duration, peak, random.Random(f"{cfg.seed}:spike"))
    async with (
        Fleet([replica(capacity=16)] * 8, cfg.seed, 300) as fleet,
        routed(fleet.urls, cfg.seed) as (_, call),
    ):
        run = await drive(times, lambda i: call())
    outs = run.outcomes
    low = stats(between(outs, 0.1 * ramp, 0.3 * ramp))  # 100-300 req/s
    top = stats(between(outs, ramp - 2.0, duration))  # the last of the ramp and the hold
    total = stats(outs)
    ratio = top["p99_ms"] / low["p99_ms"] if low["p99_ms"] and top["p99_ms"] else math.inf
    passed = total["success_pct"] >= 99.9 and ratio <= 3.0
    return Result(
        "spike",
        passed,
        f"{pct(total['success_pct'])} ok of {len(outs)}; p99 at 1000/s {top['p99_ms']} ms = "
        f"{ratio:.2f}x p99 at 100-300/s ({low['p99_ms']} ms); client loop lag <= "
        f"{run.late_ms:.0f} ms",
        ">= 99.9% ok; p99 at the peak <= 3x p99 at low load",
        {"total": total, "low": low, "peak": top, "late_launch_ms": run.late_ms},
        {"series": series(outs, duration, 1.0), "kind": "latency"},
    )


async def half_fail(cfg: Config) -> Result:
    duration = cfg.pick(20.0, 8.0)
    fail_at = duration * 0.4
    rate_ = 300.0
    times = arrivals(lambda t: rate_, duration, rate_, random.Random(f"{cfg.seed}:half"))
    async with (
        Fleet([replica()] * 8, cfg.seed, 300) as fleet,
        routed(fleet.urls, cfg.seed) as (lb, call),
    ):

        async def fault() -> None:
            await asyncio.sleep(fail_at + 0.05)
            await fleet.cmd("down", replicas=[0, 1, 2, 3])

        side = asyncio.create_task(fault())
        run = await drive(times, lambda i: call())
        await side
        lb_stats = lb.stats()
    outs = run.outcomes
    total = stats(outs)
    before = stats(between(outs, 1.0, fail_at))
    after = stats(between(outs, fail_at, duration))
    return Result(
        "half_fail",
        total["success_pct"] >= 95.0,
        f"{pct(total['success_pct'])} ok of {len(outs)} ({pct(after['success_pct'])} after the "
        f"failure); p99 {before['p99_ms']} -> {after['p99_ms']} ms; retries {lb_stats.retries}",
        ">= 95% ok (the playbook's bar; we aim at 100%)",
        {"total": total, "before": before, "after": after, "retries": lb_stats.retries},
        {"series": series(outs, duration, 0.5), "kind": "success", "marks": [fail_at]},
    )


async def cost_runaway(cfg: Config) -> Result:
    duration = cfg.pick(10.0, 5.0)
    rate_ = 200.0
    ceiling = cfg.pick(6.0, 3.0)
    prices = [1.0, 1.0, 10.0, 10.0]  # per 1,000 tokens
    times = arrivals(lambda t: rate_, duration, rate_, random.Random(f"{cfg.seed}:cost"))
    async with Fleet([replica()] * 4, cfg.seed, 300) as fleet:
        client = Client()
        eps = [
            lbclient.Endpoint(u, metadata={"price_per_1k_tokens": p})
            for u, p in zip(fleet.urls, prices, strict=True)
        ]
        lb = lbclient.Balancer(
            eps,
            **policies(),
            cost=lbclient.CostPolicy(ceiling=ceiling, period=3600.0),
            rng=cfg.seed,
        )
        max_reserved = [0.0, 0]

        @lb.route(tokens=lambda: 20)  # prompt + max_tokens: an upper bound (they use 9)
        async def call(endpoint: lbclient.Endpoint) -> str:
            led = lb._meter.ledger  # type: ignore[union-attr]
            if led.reserved > max_reserved[0]:
                max_reserved[:] = [led.reserved, led.in_flight]
            return await client.post(endpoint.url, usage=True)

        loop = asyncio.get_running_loop()
        origin = loop.time() + 0.05
        spent: list[tuple[float, float, float]] = []  # (t, spent, spent + reserved)

        async def sampler() -> None:
            while True:
                led = lb._meter.ledger  # type: ignore[union-attr]
                spent.append((loop.time() - origin, led.spent, led.spent + led.reserved))
                await asyncio.sleep(0.05)

        side = asyncio.create_task(sampler())
        run = await drive(times, lambda i: call(), origin=origin)
        side.cancel()
        spend = lb.spend()
        await lb.aclose()
        await client.aclose()
    outs = run.outcomes
    shed = [o for o in outs if o.error == "Overloaded(budget)"]
    admitted = [o for o in outs if o.error != "Overloaded(budget)"]
    adm = stats(admitted)
    # What the same traffic would have cost with no ceiling: every call at the mean price
    # of what was served.
    per_call = spend.total / max(1, spend.calls)
    would = per_call * len(outs)
    cheap = sum(1 for o in admitted if o.replica in ("replica-0", "replica-1"))
    bound = ceiling + spend.max_overshoot
    passed = (
        spend.spent <= bound + 1e-9
        and spend.max_overshoot == 0.0
        and adm["success_pct"] == 100.0
        and len(shed) > 0
    )
    return Result(
        "cost_runaway",
        passed,
        f"spent {spend.spent:.3f} of a {ceiling:g} ceiling (traffic worth ~{would:.1f}); "
        f"{adm['ok']}/{len(admitted)} admitted ok; {len(shed)} shed (budget); "
        f"{100.0 * cheap / max(1, len(admitted)):.0f}% on the cheap replicas",
        "spend <= ceiling (+ in flight beyond reservations); 100% of admitted ok",
        {
            "spend": {
                "spent": spend.spent,
                "ceiling": ceiling,
                "max_overshoot": spend.max_overshoot,
                "by_endpoint": dict(spend.by_endpoint),
                "max_reserved": max_reserved[0],
                "max_in_flight": max_reserved[1],
            },
            "admitted": adm,
            "shed": len(shed),
            "would_spend": would,
        },
        {"series": series(outs, duration, 0.5), "kind": "spend", "spend": spent[::2],
         "ceiling": ceiling},
    )  # fmt: skip


async def region_failure(cfg: Config) -> Result:
    duration = cfg.pick(20.0, 8.0)
    fail_at = duration * 0.4
    rate_ = 150.0
    regions = ["us-east-1"] * 3 + ["us-west-2"] * 3 + ["eu-west-1"] * 3
    distance = {"us-east-1": 0.01, "us-west-2": 0.035, "eu-west-1": 0.045}
    reps = [replica(region=r, network_latency=distance[r]) for r in regions]
    times = arrivals(lambda t: rate_, duration, rate_, random.Random(f"{cfg.seed}:region"))
    async with (
        Fleet(reps, cfg.seed, 300) as fleet,
        routed(
            [lbclient.Endpoint(u, region=r) for u, r in zip(fleet.urls, regions, strict=True)],
            cfg.seed,
            region="us-east-1",
            locality=True,
        ) as (_, call),
    ):

        async def fault() -> None:
            await asyncio.sleep(fail_at + 0.05)
            await fleet.cmd("down", replicas=[0, 1, 2])

        side = asyncio.create_task(fault())
        run = await drive(times, lambda i: call())
        await side
    outs = run.outcomes
    region_of = {f"replica-{i}": r for i, r in enumerate(regions)}
    before = between(outs, 1.0, fail_at)
    after = between(outs, fail_at + 1.0, duration)

    def share(os_: list[Outcome], region: str) -> float:
        served = [o for o in os_ if o.replica]
        return 100.0 * sum(region_of[o.replica] == region for o in served) / max(1, len(served))  # type: ignore[index]

    total = stats(outs)
    local_before = share(before, "us-east-1")
    west_after = share(after, "us-west-2")
    passed = total["success_pct"] >= 99.9 and local_before >= 80.0 and west_after >= 66.7
    return Result(
        "region_failure",
        passed,
        f"{pct(total['success_pct'])} ok of {len(outs)}; local {local_before:.0f}% before, "
        f"then {west_after:.0f}% to us-west-2 (nearest); p99 after {stats(after)['p99_ms']} ms",
        ">= 99.9% ok; mostly local before (>= 80%), mostly the nearest region after (>= 2/3)",
        {"total": total, "local_before_pct": local_before, "nearest_after_pct": west_after,
         "after": stats(after)},
        {"series": series(outs, duration, 0.5), "kind": "success", "marks": [fail_at]},
    )  # fmt: skip


async def cold_start(cfg: Config) -> Result:
    warm_s = cfg.pick(10.0, 5.0)
    before_s = cfg.pick(8.0, 4.0)
    after_s = warm_s + 2.0
    duration = before_s + after_s
    rate_ = 120.0  # 60% of 2 replicas x 4 slots / 40 ms
    times = arrivals(lambda t: rate_, duration, rate_, random.Random(f"{cfg.seed}:cold"))
    out: dict[str, Any] = {}
    runs: dict[str, Run] = {}
    variants = [("slow_start", warm_s)] + ([] if cfg.quick else [("no slow start", None)])
    for name, slow in variants:
        async with (
            Fleet([replica()] * 4, cfg.seed, 300) as fleet,
            routed(fleet.urls[:2], cfg.seed, slow_start=slow) as (lb, call),
        ):

            async def join() -> None:
                await asyncio.sleep(before_s + 0.05)
                await fleet.cmd("warm", replicas=[2, 3], **{"from": 0.2, "seconds": warm_s})
                lb.add(fleet.urls[2])
                lb.add(fleet.urls[3])

            side = asyncio.create_task(join())
            run = await drive(times, lambda i: call())
            await side
        runs[name] = run
        o = run.outcomes
        b = stats(between(o, 1.0, before_s))
        d = stats(between(o, before_s, before_s + warm_s))
        newcomers = between(o, before_s, before_s + warm_s)
        share = sum(x.replica in ("replica-2", "replica-3") for x in newcomers) / max(
            1, len(newcomers)
        )
        out[name] = {"before": b, "warming": d, "newcomers_share_pct": 100.0 * share,
                     "ratio": (d["p99_ms"] or math.inf) / (b["p99_ms"] or math.inf)}  # fmt: skip
    main = out["slow_start"]
    passed = main["ratio"] <= 1.5 and stats(runs["slow_start"].outcomes)["success_pct"] >= 99.9
    contrast = ""
    if "no slow start" in out:
        contrast = f" (without slow start: {out['no slow start']['ratio']:.2f}x)"
    return Result(
        "cold_start",
        passed,
        f"p99 while 2 cold replicas warm up {main['warming']['p99_ms']} ms = "
        f"{main['ratio']:.2f}x p99 before ({main['before']['p99_ms']} ms){contrast}; "
        f"newcomers took {main['newcomers_share_pct']:.0f}% meanwhile",
        "p99 while warming <= 1.5x p99 before; >= 99.9% ok",
        out,
        {"series": series(runs["slow_start"].outcomes, duration, 0.5), "kind": "latency",
         "marks": [before_s]},
    )  # fmt: skip


async def spot_storm(cfg: Config) -> Result:
    window = cfg.pick(120.0, 12.0)  # the 2 minutes over which the notices arrive
    notice = cfg.pick(10.0, 2.0)  # AWS gives 2 minutes; compressed here
    duration = window + notice + 4.0
    rate_ = 200.0  # 33% of the 6 replicas left
    spot = [5, 6, 7, 8]  # 4 of the 5 spot replicas (5..9): 80% of spot capacity
    times = arrivals(lambda t: rate_, duration, rate_, random.Random(f"{cfg.seed}:spot"))
    async with (
        Fleet([replica()] * 10, cfg.seed, 600) as fleet,
        routed(fleet.urls, cfg.seed) as (lb, call),
    ):
        drained: list[int] = []

        async def interrupt(i: int, at: float) -> None:
            await asyncio.sleep(at)
            result = await lb.drain(fleet.urls[i], timeout=notice)
            drained.append(result.in_flight)
            lb.remove(fleet.urls[i])
            await asyncio.sleep(max(0.0, notice - 0.0))
            await fleet.cmd("down", replicas=[i])

        start = 1.0
        step = (window - start) / (len(spot) - 1)
        side = [asyncio.create_task(interrupt(i, start + k * step)) for k, i in enumerate(spot)]
        run = await drive(times, lambda i: call())
        await asyncio.gather(*side)
    outs = run.outcomes
    total = stats(outs)
    failed = total["n"] - total["ok"]
    return Result(
        "spot_storm",
        failed == 0,
        f"{failed} failed of {len(outs)} while 4 of 5 spot replicas were drained and taken "
        f"away within {window:g} s; p99 {total['p99_ms']} ms",
        "no failed request",
        {"total": total, "left_in_flight_at_notice_end": drained},
        {"series": series(outs, duration, 1.0 if not cfg.quick else 0.5), "kind": "success",
         "marks": [start + k * step for k in range(len(spot))]},
    )  # fmt: skip


async def oscillation(cfg: Config) -> Result:
    from lbclient.metrics import demand
    from lbclient.ops import Behavior, HpaSimulator

    period = cfg.pick(10.0, 4.0)
    cycles = cfg.pick(6, 4)
    duration = period * cycles
    capacity = 4 * 4 / 0.04  # 400 req/s
    low, high = 0.2 * capacity, 0.9 * capacity

    def rate(t: float) -> float:
        return high if (t % period) < period / 2 else low

    times = arrivals(rate, duration, high, random.Random(f"{cfg.seed}:osc"))
    samples: list[tuple[float, float]] = []
    async with (
        Fleet([replica()] * 4, cfg.seed, 300) as fleet,
        routed(fleet.urls, cfg.seed) as (lb, call),
    ):
        loop = asyncio.get_running_loop()
        origin = loop.time() + 0.05

        async def sampler() -> None:
            while True:
                samples.append((loop.time() - origin, demand(lb)[0]))
                await asyncio.sleep(0.05)

        side = asyncio.create_task(sampler())
        run = await drive(times, lambda i: call(), origin=origin)
        side.cancel()
    # Replay the demand through the HPA on a clock where one cycle lasts 4 minutes: load
    # that swings every 2 minutes, shorter than the 5-minute scale-down window.
    scale = 240.0 / period
    per_replica = 3.0  # calls queued + in flight one replica should carry (4 slots, 75%)
    replays = {}
    for name, behavior in (("playbook", Behavior()), ("no behaviour", Behavior.none())):
        sim = HpaSimulator(behavior, min_replicas=2, max_replicas=20)
        # the demand averaged over each 15 s sync (scaled), as a metrics pipeline would
        t_sync = 0.0
        window: list[float] = []
        for t, d in samples:
            window.append(d)
            if t * scale >= t_sync + 15.0:
                avg = sum(window) / len(window)
                window = []
                sim.step(t_sync, avg / (sim.replicas * per_replica))
                t_sync += 15.0
        replays[name] = {"reversals": sim.reversals, "history": sim.history,
                         "final": sim.replicas}  # fmt: skip
    total = stats(run.outcomes)
    pb, nb = replays["playbook"], replays["no behaviour"]
    passed = total["success_pct"] >= 99.9 and pb["reversals"] <= 1
    return Result(
        "oscillation",
        passed,
        f"{pct(total['success_pct'])} ok of {len(run.outcomes)}; HPA on lbclient's demand: "
        f"{pb['reversals']} direction changes with the playbook behaviour (held at "
        f"{pb['final']} replicas) vs {nb['reversals']} without",
        ">= 99.9% ok; <= 1 change of scaling direction",
        {"total": total, "hpa": replays, "time_scale": scale, "demand_samples": len(samples)},
        {"series": series(run.outcomes, duration, 0.5), "kind": "hpa",
         "demand": samples[::4], "hpa": {k: v["history"] for k, v in replays.items()},
         "scale": scale},
    )  # fmt: skip


async def burst_10k(cfg: Config) -> Result:
    n = 10_000
    reps = [replica(capacity=64, base_latency=0.005, sigma=0.0)] * 4
    async with (
        Fleet(reps, cfg.seed, 300) as fleet,
        # limit=100: aiohttp's default connection limit
        routed(fleet.urls, cfg.seed, limit=100) as (lb, call),
    ):
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        run = await drive([0.0] * n, lambda i: call(), drain=120.0)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        st = lb.stats()
    total = stats(run.outcomes)
    hung = total["errors"].get("Hung", 0)
    passed = total["success_pct"] == 100.0 and hung == 0 and wall <= 60.0
    return Result(
        "burst_10k",
        passed,
        f"{total['ok']}/{n} ok in {wall:.1f} s (client CPU {cpu:.1f} s), none hung; "
        f"p99 {total['p99_ms']} ms (queued behind 100 connections)",
        "100% ok, none hung, <= 60 s",
        {"total": total, "wall_s": wall, "cpu_s": cpu, "in_flight_after": st.in_flight},
        {"series": {"t": [o.done_at for o in run.outcomes[:: max(1, n // 400)]],
                    "latency": [o.latency for o in run.outcomes[:: max(1, n // 400)]]},
         "kind": "burst"},
    )  # fmt: skip


async def sustained_sla(cfg: Config) -> Result:
    from lbclient.ops import CapacityPlanner, TrafficRecorder, load_trace

    rate_ = 250.0
    sla = 0.150
    slots = 4
    calib_s = cfg.pick(8.0, 4.0)
    duration = cfg.pick(60.0, 10.0)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"lbclient-pressure-{os.getpid()}.jsonl"
    # 1. record traffic at low load on a fleet big enough not to queue
    async with (
        Fleet([replica()] * 8, cfg.seed, 300) as fleet,
        routed(fleet.urls, cfg.seed) as (lb, call),
    ):
        times = arrivals(lambda t: 40.0, calib_s, 40.0, random.Random(f"{cfg.seed}:calib"))
        with TrafficRecorder(lb, tmp, flush_interval=0.2):
            await drive(times, lambda i: call())
    records = load_trace(tmp)
    for f in tmp.parent.glob(tmp.name + "*"):
        f.unlink()
    # 2. plan: the replicas that hold p95 <= SLA at 250 req/s with the default 20%
    # headroom (exponential service: the conservative M/M/c), min 2
    plan = CapacityPlanner(records).plan(sla, concurrency=slots, rate=rate_)  # 20% headroom
    replicas = plan.replicas
    # 3. run the sustained load on that fleet
    times = arrivals(lambda t: rate_, duration, rate_, random.Random(f"{cfg.seed}:sustained"))
    async with (
        Fleet([replica(capacity=slots)] * replicas, cfg.seed, 300) as fleet,
        routed(fleet.urls, cfg.seed) as (_, call),
    ):
        run = await drive(times, lambda i: call())
    total = stats(run.outcomes)
    measured = total["p95_ms"] or math.inf
    passed = measured <= sla * 1000.0 and total["success_pct"] >= 99.9
    return Result(
        "sustained_sla",
        passed,
        f"p95 {measured} ms at {rate_:g} req/s for {duration:g} s on the {replicas} replicas "
        f"the planner sized from {len(records)} recorded calls (predicted p95 "
        f"{plan.predicted * 1000:.0f} ms); {pct(total['success_pct'])} ok",
        f"p95 <= {sla * 1000:.0f} ms; >= 99.9% ok",
        {"total": total, "plan": plan.to_dict(), "recorded_calls": len(records)},
        {"series": series(run.outcomes, duration, 1.0), "kind": "latency", "sla_ms": sla * 1000},
    )


async def noisy_tenant(cfg: Config) -> Result:
    phase = cfg.pick(20.0, 10.0)
    duration = 2 * phase
    # benchmarks/admission.py's setup: 4 replicas x 5 slots x 100 ms = 200 req/s
    capacity = 4 * 5 / 0.1
    per = 0.06 * capacity  # 12 req/s each, 10 tenants: 60%
    tenants = [f"t{i}" for i in range(10)]
    rng = random.Random(f"{cfg.seed}:noisy")
    events: list[tuple[float, str]] = []
    for t in tenants:
        for at in arrivals(
            lambda s, t=t: per * (10 if t == "t0" and s >= phase else 1),
            duration,
            per * 10 if t == "t0" else per,
            rng,
        ):
            events.append((at, t))
    events.sort()
    times = [e[0] for e in events]
    who = [e[1] for e in events]
    # The operator's tool for a noisy tenant: a per-tenant quota (here 2x a tenant's
    # normal rate) on top of the fair queue.  The fair queue alone (work-conserving: the
    # noisy tenant gets whatever is left over) is run too in the full run, for contrast.
    variants: list[tuple[str, lbclient.Admission]] = [
        (
            "quota",
            lbclient.Admission(
                max_wait=0.3, quotas={"*": lbclient.Quota(requests_per_second=2 * per)}
            ),
        )
    ]
    if not cfg.quick:
        variants.append(("fair queue only", lbclient.Admission(max_wait=0.3)))
    out: dict[str, Any] = {}
    runs: dict[str, Run] = {}
    for name, admission in variants:
        async with Fleet([replica(capacity=5, base_latency=0.1)] * 4, cfg.seed, 300) as fleet:
            client = Client()
            lb = lbclient.Balancer(fleet.urls, **policies(), admission=admission, rng=cfg.seed)

            @lb.route(tenant=lambda tenant: tenant)
            async def call(endpoint: lbclient.Endpoint, tenant: str) -> str:
                return await client.post(endpoint.url)

            run = await drive(times, lambda i: call(who[i]), tenants=who)
            await lb.aclose()
            await client.aclose()
        runs[name] = run
        outs = run.outcomes
        quiet = [o for o in outs if o.tenant != "t0"]
        q_before = stats(between(quiet, 1.0, phase))
        q_noisy = stats(between(quiet, phase + 1.0, duration))
        noisy = stats(between([o for o in outs if o.tenant == "t0"], phase + 1.0, duration))
        out[name] = {
            "quiet_before": q_before,
            "quiet_noisy": q_noisy,
            "noisy": noisy,
            "ratio": (q_noisy["p99_ms"] or math.inf) / (q_before["p99_ms"] or math.inf),
        }
    main = out["quota"]
    passed = main["quiet_noisy"]["success_pct"] >= 99.9 and main["ratio"] <= 1.5
    contrast = ""
    if "fair queue only" in out:
        f = out["fair queue only"]
        contrast = (
            f" (fair queue alone: {f['ratio']:.2f}x, {pct(f['quiet_noisy']['success_pct'])} ok, "
            f"the noisy one {pct(f['noisy']['success_pct'])})"
        )
    return Result(
        "noisy_tenant",
        passed,
        f"quiet tenants {pct(main['quiet_noisy']['success_pct'])} ok, p99 "
        f"{main['quiet_noisy']['p99_ms']} ms = {main['ratio']:.2f}x before "
        f"({main['quiet_before']['p99_ms']} ms) with a 2x per-tenant quota; the noisy one got "
        f"{pct(main['noisy']['success_pct'])}{contrast}",
        "quiet tenants >= 99.9% ok and p99 <= 1.5x before",
        out,
        {"series": series([o for o in runs["quota"].outcomes if o.tenant != "t0"], duration, 0.5),
         "kind": "latency", "marks": [phase]},
    )  # fmt: skip


RUNNERS: dict[str, Callable[[Config], Awaitable[Result]]] = {
    "spike": spike,
    "half_fail": half_fail,
    "cost_runaway": cost_runaway,
    "region_failure": region_failure,
    "cold_start": cold_start,
    "spot_storm": spot_storm,
    "oscillation": oscillation,
    "burst_10k": burst_10k,
    "sustained_sla": sustained_sla,
    "noisy_tenant": noisy_tenant,
}


# ====================================================================== report


def _plot(results: Sequence[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    cols = 2
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
    for ax, r in zip([a for row in axes for a in row], results, strict=False):
        p = r.plot
        s = p.get("series", {})
        kind = p.get("kind")
        color = "tab:green" if r.passed else "tab:red"
        if kind == "burst":
            pts = [(t, lat) for t, lat in zip(s["t"], s["latency"], strict=True) if lat is not None]
            ax.scatter([x for x, _ in pts], [y * 1000 for _, y in pts], s=3)
            ax.set_xlabel("completed at (s)")
            ax.set_ylabel("latency ms")
        elif kind == "spend":
            pts = p["spend"]
            ax.plot([t for t, _, _ in pts], [x for _, x, _ in pts], label="spent")
            ax.plot(
                [t for t, _, _ in pts], [x for _, _, x in pts], ls=":", label="spent + reserved"
            )
            ax.axhline(p["ceiling"], color="tab:red", ls="--", lw=0.8, label="ceiling")
            ax.set_ylabel("spend")
            ax.set_xlabel("seconds")
            ax2 = ax.twinx()
            ax2.plot(s["t"], s["success"], color="tab:gray", lw=0.7, label="admitted % of offered")
            ax2.set_ylim(0, 105)
            ax.legend(fontsize=6, loc="center right")
        elif kind == "hpa":
            scale = p["scale"]
            ax.plot([t for t, _ in p["demand"]], [d for _, d in p["demand"]], lw=0.7,
                    color="tab:gray", label="demand (calls)")  # fmt: skip
            ax.set_ylabel("calls in flight + queued")
            ax2 = ax.twinx()
            for name, hist, style in (("playbook", p["hpa"]["playbook"], "-"),
                                      ("no behaviour", p["hpa"]["no behaviour"], ":")):  # fmt: skip
                xs, ys = [0.0], [2]
                for t, rep in hist:
                    xs += [t / scale, t / scale]
                    ys += [ys[-1], rep]
                xs.append(s["t"][-1] if s.get("t") else xs[-1])
                ys.append(ys[-1])
                ax2.plot(xs, ys, style, label=f"HPA replicas ({name})")
            ax2.legend(fontsize=6, loc="upper right")
            ax.set_xlabel("seconds (HPA clock scaled)")
        else:
            t = s.get("t", [])
            ax.plot(t, s.get("rate", []), color="tab:gray", lw=0.8, label="offered req/s")
            ax.set_ylabel("req/s")
            ax2 = ax.twinx()
            if kind == "success":
                ax2.plot(t, s.get("success", []), color="tab:blue", label="success %")
                ax2.set_ylim(0, 105)
                ax2.set_ylabel("success %")
            else:
                ax2.plot(t, s.get("p99_ms", []), color="tab:orange", label="p99 ms")
                ax2.set_ylabel("p99 ms")
                if "sla_ms" in p:
                    ax2.axhline(p["sla_ms"], color="tab:red", ls="--", lw=0.8)
            ax2.legend(fontsize=6, loc="upper right")
            ax.set_xlabel("seconds")
        for m in p.get("marks", []):
            ax.axvline(m, color="tab:red", ls=":", lw=0.8)
        ax.set_title(f"{r.scenario}: {'PASS' if r.passed else 'FAIL'}", color=color, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in [a for row in axes for a in row][n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(results: Sequence[Result]) -> str:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        lines = [f"{'scenario':<16} {'pass':<5} figure / target"]
        for r in results:
            lines.append(f"{r.scenario:<16} {'PASS' if r.passed else 'FAIL':<5} {r.figure}")
            lines.append(f"{'':<22} target: {r.target}")
        return "\n".join(lines)
    table = Table(title="lbclient under pressure: the playbook's scenarios")
    table.add_column("scenario")
    table.add_column("figure")
    table.add_column("target")
    table.add_column("")
    for r in results:
        table.add_row(r.scenario, r.figure, r.target, "[green]PASS" if r.passed else "[red]FAIL")
    console = Console(width=170, record=True, file=io.StringIO(), force_terminal=False)
    console.print(table)
    return console.export_text()


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


async def run_all(names: Sequence[str], cfg: Config, deadline: float) -> list[Result]:
    results = []
    for name in names:
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        try:
            r = await asyncio.wait_for(RUNNERS[name](cfg), deadline)
        except Exception as exc:  # a broken scenario is a failed one, with the reason
            r = Result(name, False, f"error: {type(exc).__name__}: {exc}", "(did not run)")
        r.details["wall_s"] = round(time.perf_counter() - t0, 2)
        if hasattr(os, "getloadavg"):
            r.details["loadavg"] = list(os.getloadavg())
        print(
            f"    {'PASS' if r.passed else 'FAIL'} {r.figure}  [{r.details['wall_s']} s]",
            flush=True,
        )
        results.append(r)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--fleet-server"]:
        return fleet_server_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases (< 3 min in all)")
    ap.add_argument("--scenarios", help=f"comma-separated, from: {', '.join(SCENARIOS)}")
    ap.add_argument("--out", default=str(HERE / "results"), help="where the JSON and PNG go")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=400.0, help="seconds per scenario")
    ns = ap.parse_args(argv)
    names = list(SCENARIOS) if not ns.scenarios else [s.strip() for s in ns.scenarios.split(",")]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    _watchdog(ns.deadline * len(names) + 60.0, "client")
    # Breakers opening on purpose are the scenarios' point, not news: keep the table clean.
    logging.getLogger("lbclient").setLevel(logging.ERROR)
    info = machine()
    t0 = time.perf_counter()
    results = asyncio.run(run_all(names, Config(quick=ns.quick, seed=ns.seed), ns.deadline))
    wall = time.perf_counter() - t0
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = [
        {"scenario": r.scenario, "passed": r.passed, "figure": r.figure, "target": r.target}
        for r in results
    ]
    (out / "pressure.json").write_text(json.dumps(summary, indent=2) + "\n")
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    details = {
        "machine": info,
        "quick": ns.quick,
        "seed": ns.seed,
        "wall_s": round(wall, 1),
        "results": [{**s, "details": r.details} for s, r in zip(summary, results, strict=True)],
    }
    (out / "pressure-details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
    try:
        _plot(results, out / "pressure.png")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    print()
    print(_table(results))
    passed = sum(r.passed for r in results)
    print(
        f"{passed}/{len(results)} passed in {wall:.0f} s; load average "
        f"{info['loadavg_start']} -> {info['loadavg_end']}; {out / 'pressure.json'}, "
        f"{out / 'pressure.png'}"
    )
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
