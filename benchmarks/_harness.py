"""The benchmark runner: policies, open-loop load generation and metrics.

One *run* is one scenario under one policy, against a fresh :class:`ReplicaFleet` on
127.0.0.1 (same event loop) and a fresh ``aiohttp.ClientSession``:

1. warm-up: ``scenario.warmup`` requests at the scenario's rate, awaited, not measured
   (so latency estimates and the adaptive hedge delay have samples);
2. the measured window: arrival times are drawn up front from an exponential
   distribution (Poisson process, seeded, identical for every policy of a scenario);
   each request is launched as its own task *at its scheduled time* whatever the
   completions do (open loop), and its latency is measured *from the scheduled time*,
   so a stalled client or event loop cannot hide queueing (no coordinated omission);
3. faults fire at their scheduled times; fleet counters are snapshotted at every phase
   boundary and whenever a circuit breaker first opens;
4. every request is awaited (each has a 10 s aiohttp timeout), then the numbers are
   computed.

Latency percentiles are over *successful* requests; failures are counted in the success
rate.  "Extra load" is upstream requests received by the fleet / client requests - 1;
"attempts" are counted client-side (every entry into the request function), so refused
connections -- which the fleet never sees -- count too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp
from scenarios import Scenario

import lbclient
from lbclient.testing import ReplicaFleet

CHAT_PATH = "/v1/chat/completions"
REQUEST_TIMEOUT = 10.0  # seconds, per aiohttp request: nothing can hang
DRAIN_TIMEOUT = 30.0  # seconds to wait for the last requests after the schedule ends
PAYLOAD = {"model": "fake-model", "messages": [{"role": "user", "content": "Say hi."}]}


# -------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    """How requests are routed.  ``strategy=None`` is the baseline: a plain
    ``itertools.cycle`` over the URLs with aiohttp, no lbclient at all."""

    name: str
    strategy: str | None
    retry: bool = False
    breaker: bool = False
    hedge: bool = False

    def balancer(
        self,
        endpoints: Sequence[lbclient.Endpoint],
        *,
        region: str | None,
        on_event: Callable[[lbclient.Event], None] | None,
        seed: int,
    ) -> lbclient.Balancer:
        assert self.strategy is not None
        return lbclient.Balancer(
            endpoints,
            strategy=self.strategy,
            retry=lbclient.Retry(attempts=3) if self.retry else None,
            breaker=lbclient.Breaker() if self.breaker else None,
            hedge=lbclient.Hedge() if self.hedge else None,
            region=region,
            on_event=on_event,
            rng=seed,
        )


BASELINE = "baseline_rr"


def parse_policy(name: str) -> Policy:
    """``baseline_rr`` or ``<strategy>[+retry][+breaker][+hedge]`` (``+all`` = all
    three), e.g. ``peak_ewma+retry+breaker``."""
    name = name.strip()
    if name == BASELINE:
        return Policy(name, None)
    strategy, *mods = name.split("+")
    if strategy not in lbclient.strategies.names():
        raise ValueError(
            f"unknown policy {name!r}: strategy {strategy!r} is not one of "
            f"{', '.join(lbclient.strategies.names())} (or use {BASELINE!r})"
        )
    flags = {"retry": False, "breaker": False, "hedge": False}
    for m in mods:
        if m == "all":
            flags = dict.fromkeys(flags, True)
        elif m in flags:
            flags[m] = True
        else:
            raise ValueError(
                f"unknown policy modifier {m!r} in {name!r} (retry, breaker, hedge, all)"
            )
    return Policy(name, strategy, **flags)


# -------------------------------------------------------------------------- metrics


def quantile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); ``inf`` allowed (a
    failed call counted as infinitely slow): it is the answer only where it is weighed."""
    n = len(sorted_values)
    if n == 0:
        return None
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    a, b = sorted_values[lo], sorted_values[hi]
    if math.isinf(b):
        return b if pos > lo else a
    return a + (b - a) * (pos - lo)


def summarize(values_s: Sequence[float]) -> dict[str, float]:
    """Percentiles of a list of seconds, in milliseconds."""
    if not values_s:
        return {}
    v = sorted(x * 1000.0 for x in values_s)
    out = {
        "n": float(len(v)),
        "mean": sum(v) / len(v),
        "p50": quantile(v, 0.50),
        "p90": quantile(v, 0.90),
        "p99": quantile(v, 0.99),
        "p99.9": quantile(v, 0.999),
        "max": v[-1],
    }
    return {k: float(x) for k, x in out.items() if x is not None}


@dataclass
class PhaseResult:
    name: str
    start_s: float
    end_s: float
    requests: int
    ok: int
    success_pct: float
    latency_ms: dict[str, float]
    ttft_ms: dict[str, float] | None
    attempts: int
    attempts_per_request: float | None
    received: list[int]  # per replica, fleet counters
    extra_load_pct: float | None
    share_pct: list[float]


@dataclass
class RunResult:
    scenario: str
    policy: str
    duration_s: float
    rate: float
    requests: int
    ok: int
    success_pct: float
    latency_ms: dict[str, float]
    ttft_ms: dict[str, float] | None
    attempts: int  # client-side, every entry into the request function
    attempts_per_request: float
    fleet_received: int
    extra_load_pct: float
    share_pct: list[float]  # of the fleet-received requests, per replica
    received_start: list[int]
    received_end: list[int]
    errors: dict[str, int]
    phases: dict[str, PhaseResult]
    lb: dict[str, Any]  # lb.stats() deltas over the measured window (lbclient policies)
    first_open: dict[int, dict[str, Any]]  # replica -> {"at": s, "received": [...]}
    breaker_events: list[list[Any]]  # [t_s, replica, old, new] (first 200)
    fault_log: list[list[Any]]  # [t_s, action, replicas]
    wall_s: float
    late_launch_ms_max: float  # how late the scheduler launched the latest request
    extras: dict[str, float | None] = field(default_factory=dict)


# ------------------------------------------------------------------------- arrivals


def poisson_arrivals(rate: float, n: int, rng: random.Random) -> list[float]:
    """``n`` arrival times (s from 0) of a Poisson process of ``rate``/s."""
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(n)))


def arrivals(scenario: Scenario, duration: float, rng: random.Random) -> list[float]:
    """Poisson arrival times in ``[0, duration)``, piecewise-constant rate (bursts).

    The exponential is memoryless, so at a rate change we restart the draw at the
    boundary instead of carrying a gap drawn at the old rate across it."""
    changes = sorted(
        {0.0, duration}
        | {b.at * duration for b in scenario.bursts}
        | {min(duration, b.at * duration + b.length) for b in scenario.bursts}
    )

    def rate_at(t: float) -> float:
        r = scenario.rate
        for b in scenario.bursts:
            if b.at * duration <= t < b.at * duration + b.length:
                r *= b.factor
        return r

    out: list[float] = []
    t = 0.0
    while t < duration:
        boundary = next((c for c in changes if c > t), duration)
        dt = rng.expovariate(rate_at(t))
        if t + dt >= boundary:
            t = boundary
            continue
        t += dt
        out.append(t)
    return out


# ------------------------------------------------------------------------ open loop


@dataclass
class OpenLoop:
    """Open-loop launching: each call is started as its own task at its scheduled time,
    whatever the earlier ones do (no coordinated omission)."""

    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    late: float = 0.0  # seconds: how late the latest launch was
    timed_out: bool = False

    async def launch(
        self,
        times: Sequence[float],
        origin: float,
        start: Callable[[int, float], Coroutine[Any, Any, None]],
    ) -> None:
        """``start(i, when)`` as a task at loop time ``when = origin + times[i]``."""
        loop = asyncio.get_running_loop()
        for i, at in enumerate(times):
            when = origin + at
            delay = when - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.late = max(self.late, loop.time() - when)
            self.tasks.append(loop.create_task(start(i, when)))

    async def drain(self, timeout: float) -> set[asyncio.Task[None]]:
        """Wait up to ``timeout`` seconds for every call, then cancel those still running
        and wait for them; return those."""
        if not self.tasks:
            return set()
        _, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        return pending

    async def run(
        self,
        times: Sequence[float],
        origin: float,
        start: Callable[[int, float], Coroutine[Any, Any, None]],
        *,
        budget: float,
        side: Sequence[asyncio.Task[Any]] = (),
    ) -> None:
        """:meth:`launch`, then wait for every call; a watchdog of ``budget`` seconds
        cancels whatever is left (``timed_out``).  On the way out the ``side`` tasks and
        any unfinished call are cancelled and awaited."""
        try:
            async with asyncio.timeout(budget):
                await self.launch(times, origin, start)
                if self.tasks:
                    await asyncio.wait(self.tasks)
        except TimeoutError:
            self.timed_out = True
        finally:
            for s in side:
                s.cancel()
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*side, *self.tasks, return_exceptions=True)


# --------------------------------------------------------------------------- clients


class Recorder:
    """Per-request outcomes of the measured window, plus client-side attempt times."""

    def __init__(self) -> None:
        self.measuring = False
        self.attempt_times: list[float] = []  # loop time of every attempt while measuring
        self.warmup_attempts = 0

    def attempt(self, now: float) -> None:
        if self.measuring:
            self.attempt_times.append(now)
        else:
            self.warmup_attempts += 1


async def _post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> bytes:
    async with session.post(url + CHAT_PATH, json=payload) as resp:
        resp.raise_for_status()
        return await resp.read()


async def _sse(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any]
) -> AsyncIterator[bytes]:
    async with session.post(url + CHAT_PATH, json=payload) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield data


class Client:
    """``call(payload)`` / ``stream(payload)`` through one policy."""

    def __init__(
        self,
        policy: Policy,
        urls: Sequence[str],
        regions: Sequence[str | None],
        session: aiohttp.ClientSession,
        rec: Recorder,
        *,
        client_region: str | None,
        on_event: Callable[[lbclient.Event], None],
        seed: int,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.lb: lbclient.Balancer | None = None
        self.call: Callable[[dict[str, Any]], Awaitable[Any]]
        self.stream: Callable[[dict[str, Any]], AsyncGenerator[bytes, None]]
        if policy.strategy is None:
            cycle = itertools.cycle(urls)

            async def call(payload: dict[str, Any]) -> bytes:
                url = next(cycle)
                rec.attempt(loop.time())
                return await _post(session, url, payload)

            async def stream(payload: dict[str, Any]) -> AsyncGenerator[bytes, None]:
                url = next(cycle)
                rec.attempt(loop.time())
                async for chunk in _sse(session, url, payload):
                    yield chunk

            self.call, self.stream = call, stream
            return
        endpoints = [lbclient.Endpoint(u, region=r) for u, r in zip(urls, regions, strict=True)]
        lb = policy.balancer(endpoints, region=client_region, on_event=on_event, seed=seed)
        self.lb = lb

        @lb.route
        async def lb_call(endpoint: lbclient.Endpoint, payload: dict[str, Any]) -> bytes:
            rec.attempt(loop.time())
            return await _post(session, endpoint.url, payload)

        @lb.route
        async def lb_stream(
            endpoint: lbclient.Endpoint, payload: dict[str, Any]
        ) -> AsyncIterator[bytes]:
            rec.attempt(loop.time())
            async for chunk in _sse(session, endpoint.url, payload):
                yield chunk

        # lbclient types a streaming route as an AsyncIterator; it is an async generator.
        self.call, self.stream = lb_call, cast(Any, lb_stream)

    async def aclose(self) -> None:
        if self.lb is not None:
            await self.lb.aclose()


def _error_name(exc: BaseException) -> str:
    name = type(exc).__name__
    if isinstance(exc, lbclient.AttemptsExhausted | lbclient.DeadlineExceeded):
        cause = exc.__cause__
        if cause is not None:
            name += f"({type(cause).__name__})"
    elif isinstance(exc, aiohttp.ClientResponseError):
        name += f"({exc.status})"
    return name


_LB_COUNTERS = (
    "calls",
    "calls_failed",
    "attempts",
    "retries",
    "retries_denied",
    "hedges_sent",
    "hedges_won",
    "hedges_denied",
)


# ------------------------------------------------------------------------------- run


async def run_one(
    scenario: Scenario,
    policy: Policy,
    *,
    duration: float,
    seed: int,
    progress: Callable[[float], None] | None = None,
) -> RunResult:
    """Run ``scenario`` under ``policy`` for ``duration`` seconds (measured window)."""
    loop = asyncio.get_running_loop()
    wall0 = loop.time()
    schedule = arrivals(scenario, duration, random.Random(f"{seed}:{scenario.name}"))
    warm_rng = random.Random(f"{seed}:{scenario.name}:warmup")
    # Warm up at the scenario's rate, or faster for slow scenarios (at most 100 req/s and
    # 70% of capacity), so a run does not spend seconds on requests it does not measure.
    warm_rate = max(scenario.rate, min(100.0, 0.7 * scenario.capacity))
    warm = poisson_arrivals(warm_rate, scenario.warmup, warm_rng)
    payload = dict(PAYLOAD, stream=True) if scenario.stream else dict(PAYLOAD)

    n = len(schedule)
    latency: list[float | None] = [None] * n
    ttft: list[float | None] = [None] * n
    error: list[str | None] = [None] * n
    rec = Recorder()
    t0 = math.inf  # loop time of the measured window's origin
    first_open: dict[int, dict[str, Any]] = {}
    breaker_events: list[list[Any]] = []
    fault_log: list[list[Any]] = []
    snapshots: dict[float, list[int]] = {}

    fleet = ReplicaFleet(scenario.replicas, seed=seed)
    await fleet.start()
    try:
        urls = fleet.urls
        index = {u: i for i, u in enumerate(urls)}

        def received() -> list[int]:
            return [r.counters.received for r in fleet]

        def on_event(ev: lbclient.Event) -> None:
            if not rec.measuring:
                return
            t = loop.time() - t0
            if isinstance(ev, lbclient.BreakerEvent):
                i = index.get(ev.url, -1)
                if len(breaker_events) < 200:
                    breaker_events.append([round(t, 4), i, ev.old, ev.new])
                if ev.new == "open" and i not in first_open:
                    first_open[i] = {"at": t, "received": received()}
            elif isinstance(ev, lbclient.PanicEvent) and len(breaker_events) < 200:
                breaker_events.append(
                    [round(t, 4), -1, "panic", "enter" if ev.entered else "leave"]
                )

        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            client = Client(
                policy,
                urls,
                [c.region for c in scenario.replicas],
                session,
                rec,
                client_region=scenario.client_region,
                on_event=on_event,
                seed=seed,
            )
            try:

                async def one(i: int, scheduled: float, record: bool) -> None:
                    try:
                        if scenario.stream:
                            first: float | None = None
                            async with contextlib.aclosing(client.stream(payload)) as chunks:
                                async for _ in chunks:
                                    if first is None:
                                        first = loop.time()
                            if record and first is not None:
                                ttft[i] = first - scheduled
                        else:
                            await client.call(payload)
                        if record:
                            latency[i] = loop.time() - scheduled
                    except Exception as exc:  # a failed request is a data point
                        if record:
                            error[i] = _error_name(exc)

                # 1. warm-up (not measured)
                warm_up = OpenLoop()
                await warm_up.launch(warm, loop.time(), lambda i, when: one(i, when, False))
                await asyncio.wait(warm_up.tasks, timeout=DRAIN_TIMEOUT)
                lb_before = client.lb.stats() if client.lb is not None else None

                # 2. the measured window
                t0 = loop.time() + 0.02
                rec.measuring = True
                received_start = received()
                snapshots[0.0] = received_start

                async def fault(f: Any) -> None:
                    await asyncio.sleep(max(0.0, t0 + f.at * duration - loop.time()))
                    targets = [fleet[i] for i in f.replicas]
                    if f.action == "down":
                        await asyncio.gather(*(r.down() for r in targets))
                    elif f.action == "up":
                        await asyncio.gather(*(r.up() for r in targets))
                    elif f.action == "set":
                        for r in targets:
                            r.set(**f.fields)
                    elif f.action == "spot":
                        notice = float(f.fields.get("notice", 1.0))

                        async def interrupted(r: Any) -> None:
                            start = loop.time()
                            lb = client.lb
                            if lb is not None:
                                await lb.drain(r.url, timeout=notice)
                                with contextlib.suppress(Exception):
                                    lb.remove(r.url)
                            await asyncio.sleep(max(0.0, start + notice - loop.time()))
                            await r.down()

                        await asyncio.gather(*(interrupted(r) for r in targets))
                    else:
                        raise ValueError(f"unknown fault action {f.action!r}")
                    fault_log.append([round(loop.time() - t0, 4), f.action, list(f.replicas)])

                async def checkpoint(frac: float) -> None:
                    await asyncio.sleep(max(0.0, t0 + frac * duration - loop.time()))
                    snapshots[frac] = received()

                async def ticker() -> None:
                    while True:
                        if progress is not None:
                            progress(min(duration, max(0.0, loop.time() - t0)))
                        await asyncio.sleep(0.25)

                side = [loop.create_task(fault(f)) for f in scenario.faults]
                bounds = {p.start for p in scenario.phases} | {p.end for p in scenario.phases}
                side += [loop.create_task(checkpoint(b)) for b in sorted(bounds) if 0 < b < 1]
                tick = loop.create_task(ticker())
                try:
                    measured = OpenLoop()
                    await measured.launch(schedule, t0, lambda i, when: one(i, when, True))
                    late = measured.late
                    await asyncio.gather(*side)
                    await measured.drain(DRAIN_TIMEOUT)
                finally:
                    tick.cancel()
                    for t in side:
                        t.cancel()
                rec.measuring = False
                received_end = received()
                snapshots[1.0] = received_end
                lb_after = client.lb.stats() if client.lb is not None else None
            finally:
                await client.aclose()
    finally:
        await fleet.aclose()
    if progress is not None:
        progress(duration)

    # ---- metrics
    attempt_offsets = [t - t0 for t in rec.attempt_times]
    ok_lat = [x for x in latency if x is not None]
    ok_ttft = [x for x in ttft if x is not None]
    errors = Counter(e for e in error if e is not None)
    for i in range(n):
        if latency[i] is None and error[i] is None:
            errors["CancelledAtDrain"] += 1
    total_received = sum(received_end) - sum(received_start)
    per_replica = [e - s for e, s in zip(received_end, received_start, strict=True)]
    lb: dict[str, Any] = {}
    if lb_before is not None and lb_after is not None:
        for k in _LB_COUNTERS:
            lb[k] = getattr(lb_after, k) - getattr(lb_before, k)
        lb["hedge_delay_ms"] = lb_after.hedge_delay_ms
        lb["hedges_pct"] = 100.0 * lb["hedges_sent"] / lb["calls"] if lb["calls"] else None
        lb["retries_pct"] = 100.0 * lb["retries"] / lb["calls"] if lb["calls"] else None
        lb["endpoints"] = [
            {
                "url": e.url,
                "breaker": e.breaker,
                "trips": e.trips,
                "requests": e.requests,
                "failures": e.failures,
                "latency_ewma_ms": e.latency_ewma_ms,
            }
            for e in lb_after.endpoints
        ]

    phases: dict[str, PhaseResult] = {}
    for ph in scenario.phases:
        lo, hi = ph.start * duration, ph.end * duration
        idx = [i for i, at in enumerate(schedule) if lo <= at < hi]
        p_ok = [latency[i] for i in idx if latency[i] is not None]
        p_ttft = [ttft[i] for i in idx if ttft[i] is not None]
        p_attempts = sum(1 for t in attempt_offsets if lo <= t < hi)
        start_snap, end_snap = snapshots.get(ph.start), snapshots.get(ph.end)
        if start_snap is not None and end_snap is not None:
            recv = [e - s for e, s in zip(end_snap, start_snap, strict=True)]
        else:
            recv = [0] * len(scenario.replicas)
        phases[ph.name] = PhaseResult(
            name=ph.name,
            start_s=lo,
            end_s=hi,
            requests=len(idx),
            ok=len(p_ok),
            success_pct=100.0 * len(p_ok) / len(idx) if idx else 0.0,
            latency_ms=summarize(p_ok),  # type: ignore[arg-type]
            ttft_ms=summarize(p_ttft) if scenario.stream else None,  # type: ignore[arg-type]
            attempts=p_attempts,
            attempts_per_request=p_attempts / len(idx) if idx else None,
            received=recv,
            extra_load_pct=100.0 * (sum(recv) / len(idx) - 1) if idx else None,
            share_pct=[100.0 * r / sum(recv) if sum(recv) else 0.0 for r in recv],
        )

    result = RunResult(
        scenario=scenario.name,
        policy=policy.name,
        duration_s=duration,
        rate=scenario.rate,
        requests=n,
        ok=len(ok_lat),
        success_pct=100.0 * len(ok_lat) / n if n else 0.0,
        latency_ms=summarize(ok_lat),
        ttft_ms=summarize(ok_ttft) if scenario.stream else None,
        attempts=len(attempt_offsets),
        attempts_per_request=len(attempt_offsets) / n if n else 0.0,
        fleet_received=total_received,
        extra_load_pct=100.0 * (total_received / n - 1) if n else 0.0,
        share_pct=[100.0 * r / total_received if total_received else 0.0 for r in per_replica],
        received_start=received_start,
        received_end=received_end,
        errors=dict(errors.most_common()),
        phases=phases,
        lb=lb,
        first_open=first_open,
        breaker_events=breaker_events,
        fault_log=fault_log,
        wall_s=loop.time() - wall0,
        late_launch_ms_max=late * 1000.0,
    )
    # Raw per-request data for ad-hoc analysis (not a dataclass field: not in the JSON).
    result.raw = {"schedule": schedule, "latency": latency, "ttft": ttft, "error": error}  # type: ignore[attr-defined]
    return result
