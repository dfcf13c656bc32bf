"""Admission control under overload: the admission issue's scenarios, on loopback or on
virtual time.

::

    python benchmarks/admission.py                         # every scenario, loopback (~13 min)
    python benchmarks/admission.py --virtual               # the same on virtual time (~30 s)
    python benchmarks/admission.py --quick                 # short phases, loopback (< 1 min)
    python benchmarks/admission.py --quick --virtual       # smoke (a few seconds)
    python benchmarks/admission.py --scenarios noisy,spike --policies none,admission,fifo

**The fleet** -- 4 fake OpenAI-compatible replicas x 5 slots x 100 ms mean service
(lognormal, sigma 0.25): a capacity of **200 req/s**.  On loopback it is
``lbclient.testing.ReplicaFleet`` in its own process (``_fleet_server.py``), one for the
whole invocation, idle (nothing in flight) between runs; each run gets a fresh event loop,
session and ``Balancer``, and the client makes ``POST /v1/chat/completions`` through one
``aiohttp.ClientSession`` (aiohttp's default connector limit of 100 connections, a 10 s
total timeout per request -- a client that gives up, as real ones do; the fleet cancels a
request whose client went away) inside ``@lb.route(tenant=...)``.  With ``--virtual`` the
same client code runs on ``vtime.VirtualLoop`` against ``vtime``'s simulated replicas
(same slots, FIFO queue and service times; the connector limit and the 10 s timeout
are reproduced with a semaphore and ``asyncio.timeout``): deterministic, seconds instead
of minutes.

**Policies** -- ``none``: ``lbclient.Balancer(urls)`` (``peak_ewma``), no admission;
``admission``: ``Balancer(urls, admission=lbclient.Admission(max_wait=0.3))`` --
adaptive limit, fair (VTC) queue, the defaults otherwise.  ``max_wait`` is 3 x the
unloaded call latency (100 ms): a caller should wait at most a few call-times for a
slot; past that, an immediate ``Overloaded`` is worth more to it (retry elsewhere,
degrade) than a late answer.  ``fifo`` (opt-in): the same with ``fair=False``.

**Load** -- open loop: Poisson arrivals (non-homogeneous, by thinning; seeded, the same
schedule for every policy), each call its own task launched at its time; latency is
measured from the *scheduled* arrival, and so is the time-to-error of a shed call.

**Scenarios** (full length; ``--quick`` shortens every phase):

* ``noisy`` -- 10 tenants at 12 req/s each (60% of capacity) for 30 s; then tenant
  ``t0`` jumps to 10x (120 req/s; 114% in all) for 30 s.  Targets: the 9 quiet tenants'
  success >= 99.9% and p99 in the noisy phase <= 1.5x their quiet-phase p99; total goodput
  >= 90% of capacity (the noisy tenant gets what is left over).
* ``spike`` -- 20% of capacity for 10 s, a ramp to 300% over 10 s, 300% for 20 s, then
  50% for 20 s.  Targets during the 300% hold: goodput >= 90% of capacity, p99 of
  admitted calls <= 3x the pre-spike p99; shed calls fail in <= 10 ms (p99); after the
  drop, the p99 (1 s windows by arrival) stays under 2x the pre-spike p99 from <= 2 s on.
* ``burst`` -- 10,000 calls at once (each mode a fresh client process, for its own peak
  RSS): every call succeeds or is shed with ``Overloaded``, none lost or hung; wall time
  (to the last outcome) and peak RSS against plain aiohttp round robin.  A 120 s request
  timeout here, so plain aiohttp can finish all 10,000 (50 s at 200 req/s).
* ``sustained`` -- 10% of capacity for 15 s (the unloaded latency), then 90% for 60 s.
  Target: p95 at 90% <= 2x the unloaded p95; and (ours) success >= 99.9%.
* ``oscillation`` -- 30% and 130% of capacity alternating every 10 s, 6 cycles.  Targets
  (ours): in the 130% phases goodput >= 90% of capacity and p99 <= 3x the 30% phases'
  p99 (the limit follows the load), and the limit does not thrash (see ``--help``'s
  epilog for the definition).  The limit's trace is plotted against the offered load.

Per window: calls, offered req/s, success %, shed %, goodput (successful completions per
second, counted by completion time; % of capacity), p50/p95/p99 of *admitted* calls (all
calls not shed: a call that timed out counts with its time to failure), p99 of shed
calls' time-to-error, the admission limit (mean, min-max of a 100 ms sampler).

Output: a table per scenario (per window and policy), a targets table (each target, the
figure with admission, met?, the same figure without admission), JSON in
``--out``/``admission.json`` (one section per mode -- ``loopback``, ``virtual`` -- and
scenario, each replaced when rerun), and PNGs: ``admission-spike[-virtual].png`` (offered
load, goodput, latency and the limit over time) and ``admission-oscillation[-virtual].png``
(the limit's trace against the offered load).  The client's event-loop lag and the
machine's load average are recorded for every loopback run (2-core machines shared with
other work make loopback figures noisy).  Everything is bounded in time: a watchdog per
run, a hard deadline for the script, and the fleet and burst processes have their own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

try:
    from rich.console import Console
    from rich.table import Table
except ImportError:  # pragma: no cover
    sys.exit("benchmarks need rich: pip install 'lbclient[bench]'")

import aiohttp
import vtime
from _harness import CHAT_PATH, PAYLOAD, OpenLoop
from _fleet_process import (
    FLEET_SERVER,
    FLEET_START_TIMEOUT,
    hard_deadline,
    kill_live,
    live_pids,
)

import lbclient

BURST_CHILD = HERE / "_admission_burst.py"

N_REPLICAS = 4
SLOTS = 5
BASE = 0.100  # mean service time, s
SIGMA = 0.25  # lognormal shape (ReplicaConfig's default; vtime's too)
CAPACITY = N_REPLICAS * SLOTS / BASE  # 200 req/s
UNLOADED = BASE  # the unloaded call latency
MAX_WAIT = 3 * UNLOADED  # 0.3 s
MAX_WAIT_WHY = (
    f"max_wait = {MAX_WAIT:g} s = 3 x the unloaded call latency ({UNLOADED * 1000:.0f} ms "
    "mean service): a caller should wait at most a few call-times for a slot -- past that, "
    "an immediate Overloaded (retry elsewhere, degrade) is worth more than a late answer"
)
REQUEST_TIMEOUT = 10.0  # aiohttp total timeout per request
BURST_REQUEST_TIMEOUT = 120.0  # long enough for plain aiohttp to finish 10,000 at 200/s
CONNECTOR_LIMIT = 100  # aiohttp's default
SAMPLE_PERIOD = 0.1
RUN_SLACK = REQUEST_TIMEOUT + MAX_WAIT + 10.0  # last arrival + this: the run's watchdog
TENANT = "default"
SHED_FAST = 0.010  # s: "shed calls fail in <= 10 ms"


def lbclient_fingerprint() -> str:
    """sha256 (12 hex) of lbclient's sources on disk: others may edit them while a long run
    goes on -- this process keeps what it imported, burst children import afresh."""
    h = hashlib.sha256()
    root = Path(lbclient.__file__).resolve().parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


IMPORTED_SOURCE = lbclient_fingerprint()  # (about) what this process imported


# ------------------------------------------------------------------------------ policies


def make_admission(name: str) -> lbclient.Admission | None:
    if name == "none":
        return None
    if name == "admission":
        return lbclient.Admission(max_wait=MAX_WAIT)
    if name == "fifo":
        return lbclient.Admission(max_wait=MAX_WAIT, fair=False)
    raise ValueError(f"unknown policy {name!r}")


POLICY_TEXT = {
    "none": "Balancer(urls) -- peak_ewma, no admission",
    "admission": f"Balancer(urls, admission=Admission(max_wait={MAX_WAIT:g})) -- adaptive "
    "limit, fair (VTC), defaults otherwise",
    "fifo": f"Admission(max_wait={MAX_WAIT:g}, fair=False) -- first come, first served",
}


# ----------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Window:
    """A measurement window: calls *arriving* in its intervals (and of its tenants)."""

    name: str
    intervals: tuple[tuple[float, float], ...]
    tenants: frozenset[str] | None = None

    @property
    def span(self) -> float:
        return sum(b - a for a, b in self.intervals)

    def holds(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.intervals)


@dataclass
class Stream:
    tenant: str
    rate: Callable[[float], float]  # req/s at time t
    peak: float  # an upper bound of rate (for thinning)


@dataclass
class Scenario:
    name: str
    title: str
    duration: float
    streams: list[Stream]
    windows: list[Window]
    marks: list[tuple[float, str]] = field(default_factory=list)  # (t, label) for plots
    params: dict[str, Any] = field(default_factory=dict)

    def offered(self, t: float) -> float:
        return sum(s.rate(t) for s in self.streams)


def _w(name: str, a: float, b: float, tenants: frozenset[str] | None = None) -> Window:
    return Window(name, ((a, b),), tenants)


def noisy(quick: bool) -> Scenario:
    half = 2.0 if quick else 30.0
    skip = 0.5 if quick else 2.0
    per = 12.0
    tenants = [f"t{i}" for i in range(10)]
    quiet = frozenset(tenants[1:])

    def rate_of(tenant: str) -> Callable[[float], float]:
        if tenant == "t0":
            return lambda t: per * (10 if t >= half else 1)
        return lambda t: per

    streams = [Stream(t, rate_of(t), per * 10) for t in tenants]
    return Scenario(
        "noisy",
        f"10 tenants x {per:g} req/s (60% of capacity) for {half:g} s, then t0 at 10x "
        f"({per * 10:g} req/s; 114% in all) for {half:g} s",
        2 * half,
        streams,
        [
            _w("quiet phase: 9 quiet tenants", skip, half, quiet),
            _w("quiet phase: all", skip, half),
            _w("noisy phase: 9 quiet tenants", half, 2 * half, quiet),
            _w("noisy phase: noisy t0", half, 2 * half, frozenset({"t0"})),
            _w("noisy phase: all", half, 2 * half),
        ],
        marks=[(half, "t0 x10")],
        params={"tenants": 10, "rate_per_tenant": per, "noisy_factor": 10, "phase_s": half},
    )


def spike(quick: bool) -> Scenario:
    pre, ramp, hold, after = (1.5, 1.5, 2.0, 2.5) if quick else (10.0, 10.0, 20.0, 20.0)
    skip = 0.5 if quick else 2.0
    lo, hi, end = 0.2, 3.0, 0.5
    t1, t2, t3 = pre, pre + ramp, pre + ramp + hold

    def rate(t: float) -> float:
        if t < t1:
            return lo * CAPACITY
        if t < t2:
            return CAPACITY * (lo + (hi - lo) * (t - t1) / ramp)
        if t < t3:
            return hi * CAPACITY
        return end * CAPACITY

    return Scenario(
        "spike",
        f"{lo:.0%} of capacity for {pre:g} s, ramp to {hi:.0%} over {ramp:g} s, hold "
        f"{hold:g} s, drop to {end:.0%} for {after:g} s",
        t3 + after,
        [Stream(TENANT, rate, hi * CAPACITY)],
        [
            _w("pre-spike (20%)", skip, t1),
            _w("ramp 20->300%", t1, t2),
            _w("overload (300%)", t2, t3),
            _w("after drop: first 2 s", t3, t3 + 2.0),
            _w("after drop: rest (50%)", t3 + 2.0, t3 + after),
        ],
        marks=[(t1, "ramp"), (t2, "hold 300%"), (t3, "drop to 50%")],
        params={"pre_s": pre, "ramp_s": ramp, "hold_s": hold, "after_s": after, "drop_at": t3},
    )


def sustained(quick: bool) -> Scenario:
    warm, loaded = (1.5, 3.0) if quick else (15.0, 60.0)
    skip = 0.5 if quick else 2.0
    lo, hi = 0.1, 0.9
    return Scenario(
        "sustained",
        f"{lo:.0%} of capacity for {warm:g} s (unloaded latency), then {hi:.0%} for {loaded:g} s",
        warm + loaded,
        [Stream(TENANT, lambda t: (lo if t < warm else hi) * CAPACITY, hi * CAPACITY)],
        [_w("unloaded (10%)", skip, warm), _w("loaded (90%)", warm, warm + loaded)],
        marks=[(warm, "90%")],
        params={"unloaded_s": warm, "loaded_s": loaded},
    )


def oscillation(quick: bool) -> Scenario:
    half, cycles = (1.25, 2) if quick else (10.0, 6)
    skip = 0.5 if quick else 2.0
    lo, hi = 0.3, 1.3

    def rate(t: float) -> float:
        return (hi if int(t // half) % 2 else lo) * CAPACITY

    lows = tuple((max(skip, 2 * k * half), (2 * k + 1) * half) for k in range(cycles))
    highs = tuple(((2 * k + 1) * half, (2 * k + 2) * half) for k in range(cycles))
    return Scenario(
        "oscillation",
        f"{lo:.0%} <-> {hi:.0%} of capacity every {half:g} s, {cycles} cycles",
        2 * half * cycles,
        [Stream(TENANT, rate, hi * CAPACITY)],
        [
            _w("first 30% phase (before any overload)", skip, half),
            Window("30% phases", lows),
            Window("130% phases", highs),
        ],
        marks=[(a, "") for a, _ in highs],
        params={"half_period_s": half, "cycles": cycles, "low": lo, "high": hi},
    )


SCENARIOS: dict[str, Callable[[bool], Scenario]] = {
    "noisy": noisy,
    "spike": spike,
    "burst": lambda quick: Scenario("burst", "", 0.0, [], []),  # not a time series
    "sustained": sustained,
    "oscillation": oscillation,
}
BURST_CALLS = 10_000
BURST_CALLS_QUICK = 300
BURST_MODES = ("aiohttp", "none", "admission")


def schedule(sc: Scenario, seed: int) -> list[tuple[float, str]]:
    """Poisson arrivals per tenant stream (thinning), merged and sorted."""
    out: list[tuple[float, str]] = []
    for s in sc.streams:
        rng = random.Random(f"{seed}:{sc.name}:{s.tenant}")
        t = 0.0
        while True:
            t += rng.expovariate(s.peak)
            if t >= sc.duration:
                break
            if rng.random() * s.peak < s.rate(t):
                out.append((t, s.tenant))
    out.sort()
    return out


# ------------------------------------------------------------------------------ fleets


@dataclass
class Fleet:
    urls: list[str]
    send: Callable[[lbclient.Endpoint], Awaitable[Any]]
    clock: Any
    stats: Callable[[], Awaitable[dict[str, int]]]


class FleetProcess:
    """``_fleet_server.py`` in a child process, one for the whole loopback run (every
    scenario uses the same fleet; it idles between runs).  Blocking pipes, so it outlives
    the event loops of the runs; it exits on its own after ``max_seconds`` (its
    watchdog) or when this process goes away (end of its stdin)."""

    def __init__(self, seed: int, max_seconds: float) -> None:
        replica = {"base_latency": BASE, "capacity": SLOTS, "sigma": SIGMA}
        self.spec = {"replicas": [replica] * N_REPLICAS, "seed": seed, "max_seconds": max_seconds}
        self.proc: subprocess.Popen[bytes] | None = None
        self.urls: list[str] = []
        self._lock = threading.Lock()

    def start(self) -> list[str]:
        self.proc = subprocess.Popen(
            [sys.executable, str(FLEET_SERVER), json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        live_pids.add(self.proc.pid)
        hello = self._line(FLEET_START_TIMEOUT)
        self.urls = list(hello["urls"])
        return self.urls

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"fleet process silent for {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fleet process exited (code {self.proc.poll()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def stats_sync(self) -> dict[str, int]:
        assert self.proc is not None and self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(b"stats\n")
            self.proc.stdin.flush()
            return _sum_counters(self._line(10.0))

    async def stats(self) -> dict[str, int]:
        return await asyncio.to_thread(self.stats_sync)

    async def idle(self, seconds: float = 5.0) -> dict[str, int]:
        """Wait (<= ``seconds``) until the fleet has nothing in flight."""
        st = await self.stats()
        deadline = time.monotonic() + seconds
        while st["in_flight"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            st = await self.stats()
        return st

    def close(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(Exception):
            if proc.stdin is not None:
                proc.stdin.write(b"quit\n")
                proc.stdin.close()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        live_pids.discard(proc.pid)


def _sum_counters(st: dict[str, Any]) -> dict[str, int]:
    keys = ("received", "served", "cancelled", "dropped", "errors", "in_flight")
    return {k: sum(int(c.get(k, 0)) for c in st["counters"]) for k in keys} | {
        "cpu_ms": int(1000 * st["cpu_s"])
    }


@contextlib.asynccontextmanager
async def loopback_client(proc: FleetProcess) -> AsyncIterator[Fleet]:
    """A fresh session on the running fleet process; on the way out, wait until the fleet
    has nothing in flight (a closed session cancels whatever it left behind)."""
    connector = aiohttp.TCPConnector(limit=CONNECTOR_LIMIT)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    await proc.idle()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(endpoint: lbclient.Endpoint) -> bytes:
            async with session.post(endpoint.url + CHAT_PATH, json=PAYLOAD) as resp:
                resp.raise_for_status()
                return await resp.read()

        yield Fleet(proc.urls, send, None, proc.stats)
    await proc.idle()


@contextlib.asynccontextmanager
async def virtual_fleet(seed: int) -> AsyncIterator[Fleet]:
    replicas = vtime.fleet(N_REPLICAS, slots=SLOTS, base=BASE, sigma=SIGMA, seed=seed)
    sem = asyncio.Semaphore(CONNECTOR_LIMIT)  # aiohttp's connector limit

    async def send(endpoint: lbclient.Endpoint) -> float:
        async with asyncio.timeout(REQUEST_TIMEOUT):  # aiohttp's total timeout
            async with sem:
                return await replicas[endpoint.url].serve()

    async def stats() -> dict[str, int]:
        return {"served": sum(r.served for r in replicas.values())}

    yield Fleet(list(replicas), send, vtime.LoopClock(), stats)


# ------------------------------------------------------------------------------ one run


@dataclass
class RunData:
    scenario: str
    policy: str
    virtual: bool
    arrival: list[float]
    tenant: list[str]
    end: list[float | None]
    outcome: list[str | None]
    samples: list[
        tuple[float, float | None, int, int, int]
    ]  # t, limit, adm in-flight, queued, pool in-flight
    lags: list[float]
    late_launch_s: float
    timed_out: bool
    lb: dict[str, Any]
    fleet: dict[str, int]
    wall_s: float
    client_cpu_s: float
    loadavg_before: list[float] | None
    loadavg_after: list[float] | None


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _error_name(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return type(exc).__name__ + (f" {status}" if isinstance(status, int) else "")


async def run_policy(
    sc: Scenario,
    sched: Sequence[tuple[float, str]],
    policy: str,
    fleet_cm: contextlib.AbstractAsyncContextManager[Fleet],
    virtual: bool,
    seed: int,
) -> RunData:
    """One policy on one scenario: a fresh session (or simulated fleet) and Balancer."""
    loop = asyncio.get_running_loop()
    n = len(sched)
    arrival = [a for a, _ in sched]
    tenants = [t for _, t in sched]
    end: list[float | None] = [None] * n
    outcome: list[str | None] = [None] * n
    samples: list[tuple[float, float | None, int, int, int]] = []
    lags: list[float] = []
    calls = OpenLoop()
    lb_out: dict[str, Any] = {}
    budget = sc.duration + RUN_SLACK
    gc.collect()
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    load0 = _loadavg()
    async with fleet_cm as fleet:
        before = await fleet.stats()
        lb = lbclient.Balancer(
            fleet.urls, admission=make_admission(policy), clock=fleet.clock, rng=seed
        )
        send = fleet.send

        @lb.route(tenant=lambda tenant: tenant)
        async def call(endpoint: lbclient.Endpoint, tenant: str) -> Any:
            return await send(endpoint)

        origin = loop.time() + 0.05

        async def one(i: int) -> None:
            try:
                await call(tenants[i])
                outcome[i] = "ok"
            except lbclient.Overloaded as exc:
                outcome[i] = "shed:" + exc.reason
            except asyncio.CancelledError:
                outcome[i] = "cancelled by the run watchdog"
                raise
            except Exception as exc:  # a failed call is a data point
                outcome[i] = "error:" + _error_name(exc)
            finally:
                end[i] = loop.time() - origin

        async def sampler() -> None:
            while True:
                t = loop.time()
                st = lb.stats()
                adm = st.admission
                if adm is not None:
                    samples.append((t - origin, adm.limit, adm.in_flight, adm.queued, st.in_flight))
                else:
                    samples.append((t - origin, None, st.in_flight, 0, st.in_flight))
                await asyncio.sleep(SAMPLE_PERIOD)
                lags.append(max(0.0, loop.time() - t - SAMPLE_PERIOD))

        side = loop.create_task(sampler())
        try:
            await calls.run(arrival, origin, lambda i, _when: one(i), budget=budget, side=[side])
        finally:
            st = lb.stats()
            lb_out = {
                "calls": st.calls,
                "calls_failed": st.calls_failed,
                "failed_by": dict(st.failed_by),
                "in_flight_after": st.in_flight,
            }
            if st.admission is not None:
                lb_out |= {
                    "limit_after": st.admission.limit,
                    "in_flight_after_admission": st.admission.in_flight,
                    "queued_after": st.admission.queued,
                    "shed": dict(st.admission.shed),
                    "tenants": {
                        str(t.tenant): {
                            "admitted": t.admitted,
                            "waited": t.waited,
                            "shed": dict(t.shed),
                            "service": t.service,
                        }
                        for t in st.admission.tenants
                    },
                }
            await lb.aclose()
        after = await fleet.stats()
    return RunData(
        scenario=sc.name,
        policy=policy,
        virtual=virtual,
        arrival=arrival,
        tenant=tenants,
        end=end,
        outcome=outcome,
        samples=samples,
        lags=lags,
        late_launch_s=calls.late,
        timed_out=calls.timed_out,
        lb=lb_out,
        fleet={k: v - before.get(k, 0) for k, v in after.items()},
        wall_s=time.perf_counter() - wall0,
        client_cpu_s=time.process_time() - cpu0,
        loadavg_before=load0,
        loadavg_after=_loadavg(),
    )


def execute(
    sc: Scenario,
    sched: Sequence[tuple[float, str]],
    policies: Sequence[str],
    virtual: bool,
    seed: int,
    on_start: Callable[[str], None],
    on_done: Callable[[str, RunData], None],
    fleet: FleetProcess | None = None,
) -> dict[str, RunData]:
    """Every policy on ``sc``, one after the other.  Virtual: each on a fresh
    ``VirtualLoop`` and simulated fleet.  Loopback: on ``fleet`` (idle between runs), a
    fresh event loop, session and Balancer per policy."""
    runs: dict[str, RunData] = {}
    if virtual:
        for pol in policies:
            on_start(pol)

            async def one(pol: str = pol) -> RunData:
                return await run_policy(sc, sched, pol, virtual_fleet(seed), True, seed)

            runs[pol] = vtime.run_virtual(one)
            on_done(pol, runs[pol])
        return runs

    assert fleet is not None
    for pol in policies:
        on_start(pol)
        runs[pol] = asyncio.run(run_policy(sc, sched, pol, loopback_client(fleet), False, seed))
        on_done(pol, runs[pol])
    return runs


# ------------------------------------------------------------------------------ metrics


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank of a sorted sequence (None if empty)."""
    if not values:
        return None
    k = max(0, min(len(values) - 1, math.ceil(q * len(values)) - 1))
    return values[k]


def _ms(x: float | None) -> float | None:
    return None if x is None else 1000.0 * x


def window_stats(d: RunData, w: Window) -> dict[str, Any]:
    idx = [
        i
        for i, a in enumerate(d.arrival)
        if w.holds(a) and (w.tenants is None or d.tenant[i] in w.tenants)
    ]
    span = w.span
    n = len(idx)
    ok = [i for i in idx if d.outcome[i] == "ok"]
    shed = [i for i in idx if (d.outcome[i] or "").startswith("shed:")]
    errors: dict[str, int] = {}
    for i in idx:
        o = d.outcome[i]
        if o is None or not (o == "ok" or o.startswith("shed:")):
            key = o or "unfinished"
            errors[key] = errors.get(key, 0) + 1
    shed_by: dict[str, int] = {}
    for i in shed:
        r = (d.outcome[i] or "")[5:]
        shed_by[r] = shed_by.get(r, 0) + 1

    def lat(i: int) -> float:
        e = d.end[i]
        return math.inf if e is None else e - d.arrival[i]

    shed_set = set(shed)
    admitted = sorted(lat(i) for i in idx if i not in shed_set)
    shed_lat = sorted(lat(i) for i in shed)
    done_ok = 0  # successful completions in the window (by completion time)
    for i, o in enumerate(d.outcome):
        e = d.end[i]
        ours = w.tenants is None or d.tenant[i] in w.tenants
        if o == "ok" and e is not None and w.holds(e) and ours:
            done_ok += 1
    goodput = done_ok / span if span > 0 else 0.0
    lim = [s[1] for s in d.samples if s[1] is not None and w.holds(s[0])]
    infl = [s[2] for s in d.samples if w.holds(s[0])]
    queued = [s[3] for s in d.samples if w.holds(s[0])]
    return {
        "window": w.name,
        "intervals": [list(x) for x in w.intervals],
        "calls": n,
        "offered_rps": n / span if span > 0 else 0.0,
        "success_pct": 100.0 * len(ok) / n if n else None,
        "shed_pct": 100.0 * len(shed) / n if n else None,
        "shed_by": shed_by,
        "errors": errors,
        "goodput_rps": goodput,
        "goodput_pct_capacity": 100.0 * goodput / CAPACITY,
        "admitted": len(admitted),
        "p50_ms": _ms(quantile(admitted, 0.50)),
        "p95_ms": _ms(quantile(admitted, 0.95)),
        "p99_ms": _ms(quantile(admitted, 0.99)),
        "max_ms": _ms(admitted[-1]) if admitted else None,
        "shed_p50_ms": _ms(quantile(shed_lat, 0.50)),
        "shed_p99_ms": _ms(quantile(shed_lat, 0.99)),
        "shed_max_ms": _ms(shed_lat[-1]) if shed_lat else None,
        "shed_slow": sum(1 for x in shed_lat if x > SHED_FAST),
        "limit_mean": sum(lim) / len(lim) if lim else None,
        "limit_min": min(lim) if lim else None,
        "limit_max": max(lim) if lim else None,
        "in_flight_mean": sum(infl) / len(infl) if infl else None,
        "queued_mean": sum(queued) / len(queued) if queued else None,
    }


def series(d: RunData, duration: float, width: float = 0.5) -> dict[str, list[Any]]:
    """Per ``width`` s bin: offered (arrivals), goodput (ok completions), shed rate, and
    p50/p99 of admitted latency by arrival."""
    nb = max(1, math.ceil(duration / width))
    arr = [0] * nb
    good = [0] * nb
    shed = [0] * nb
    lat: list[list[float]] = [[] for _ in range(nb)]
    for i, a in enumerate(d.arrival):
        b = min(nb - 1, int(a / width))
        arr[b] += 1
        o = d.outcome[i] or ""
        if o.startswith("shed:"):
            shed[b] += 1
        else:
            e = d.end[i]
            lat[b].append(math.inf if e is None else e - a)
        e = d.end[i]
        if o == "ok" and e is not None and 0 <= e < duration:
            good[min(nb - 1, int(e / width))] += 1
    for x in lat:
        x.sort()
    return {
        "t": [(k + 0.5) * width for k in range(nb)],
        "offered_rps": [c / width for c in arr],
        "goodput_rps": [c / width for c in good],
        "shed_rps": [c / width for c in shed],
        "p50_ms": [_ms(quantile(x, 0.5)) for x in lat],
        "p99_ms": [_ms(quantile(x, 0.99)) for x in lat],
    }


def admitted_p99_between(d: RunData, a: float, b: float) -> tuple[float | None, int]:
    xs = sorted(
        (math.inf if d.end[i] is None else d.end[i] - t)  # type: ignore[operator]
        for i, t in enumerate(d.arrival)
        if a <= t < b and not (d.outcome[i] or "").startswith("shed:")
    )
    return quantile(xs, 0.99), len(xs)


def recovery_time(
    d: RunData, drop: float, end: float, threshold: float, window: float = 1.0, step: float = 0.25
) -> tuple[float | None, list[tuple[float, float | None]]]:
    """Seconds after ``drop`` from which every ``window``-s window (by arrival, sliding by
    ``step``) has an admitted p99 <= ``threshold`` (None: never within the run)."""
    trace: list[tuple[float, float | None]] = []
    t = drop
    while t + window <= end + 1e-9:
        p, _ = admitted_p99_between(d, t, t + window)
        trace.append((t - drop, p))
        t += step
    rec: float | None = 0.0
    for off, p in trace:
        if p is not None and p > threshold:
            rec = off + step
    if trace and rec is not None and rec > trace[-1][0]:
        rec = None
    return rec, trace


def limit_thrash(d: RunData, w: Window, band: float = 0.05) -> dict[str, Any]:
    """How the limit moved inside ``w``: reversals of direction (ignoring moves smaller
    than ``band`` of the value, hysteresis), per minute; its coefficient of variation in
    the second half of each interval (steady state); and its relative step sizes."""
    reversals = 0
    cvs: list[float] = []
    steps: list[float] = []
    for a, b in w.intervals:
        xs = [s[1] for s in d.samples if a <= s[0] < b and s[1] is not None]
        if not xs:
            continue
        ext = xs[0]
        direction = 0
        for x in xs[1:]:
            if direction >= 0 and x > ext:
                ext, direction = x, 1
            elif direction <= 0 and x < ext:
                ext, direction = x, -1
            elif direction == 1 and x < ext * (1 - band):
                reversals += 1
                ext, direction = x, -1
            elif direction == -1 and x > ext * (1 + band):
                reversals += 1
                ext, direction = x, 1
        for x0, x1 in itertools.pairwise(xs):
            if x0 > 0 and x1 != x0:
                steps.append(abs(x1 - x0) / x0)
        tail = [s[1] for s in d.samples if (a + b) / 2 <= s[0] < b and s[1] is not None]
        if len(tail) > 1:
            m = sum(tail) / len(tail)
            sd = math.sqrt(sum((x - m) ** 2 for x in tail) / (len(tail) - 1))
            cvs.append(sd / m if m else 0.0)
    minutes = w.span / 60.0
    steps.sort()
    return {
        "reversals": reversals,
        "reversals_per_min": reversals / minutes if minutes else None,
        "steady_cv_max": max(cvs) if cvs else None,
        "steady_cv_mean": sum(cvs) / len(cvs) if cvs else None,
        "step_p99": quantile(steps, 0.99),
    }


# ------------------------------------------------------------------------------ targets


def _fmt(x: float | None, f: str = "{:.0f}") -> str:
    return "-" if x is None else f.format(x)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


TargetFn = Callable[[dict[str, Any]], tuple[float | None, str]]


@dataclass
class Target:
    text: str
    fn: TargetFn  # policy summary -> (value, shown)
    ok: Callable[[float], bool] | None  # None: reported, not judged
    ours: bool = False


def _by(summary: dict[str, Any], name: str) -> dict[str, Any]:
    for w in summary["windows"]:
        if w["window"] == name:
            return w  # type: ignore[no-any-return]
    raise KeyError(name)


def _growth(key: str, before: str, after: str) -> TargetFn:
    """Window ``after``'s ``key`` (a latency, ms) over window ``before``'s."""

    def fn(s: dict[str, Any]) -> tuple[float | None, str]:
        a = _by(s, before)[key]
        b = _by(s, after)[key]
        r = _ratio(b, a)
        return r, f"{_fmt(r, '{:.2f}')}x ({_fmt(b)} vs {_fmt(a)} ms)"

    return fn


def _goodput(window: str) -> TargetFn:
    """Window ``window``'s goodput, % of capacity."""

    def fn(s: dict[str, Any]) -> tuple[float | None, str]:
        w = _by(s, window)
        return w["goodput_pct_capacity"], (
            f"{w['goodput_pct_capacity']:.1f}% ({w['goodput_rps']:.0f} req/s)"
        )

    return fn


def scenario_targets(name: str) -> list[Target]:
    if name == "noisy":

        def quiet_success(s: dict[str, Any]) -> tuple[float | None, str]:
            v = _by(s, "noisy phase: 9 quiet tenants")["success_pct"]
            return v, f"{_fmt(v, '{:.2f}')}%"

        quiet_p99 = _growth(
            "p99_ms", "quiet phase: 9 quiet tenants", "noisy phase: 9 quiet tenants"
        )

        goodput = _goodput("noisy phase: all")

        def leftover(s: dict[str, Any]) -> tuple[float | None, str]:
            q = _by(s, "noisy phase: 9 quiet tenants")["goodput_rps"]
            t0 = _by(s, "noisy phase: noisy t0")
            left = CAPACITY - q
            r = 100.0 * t0["goodput_rps"] / left if left > 0 else None
            return r, (
                f"t0 {t0['goodput_rps']:.0f} req/s of {left:.0f} left over ({_fmt(r, '{:.0f}')}%)"
                f"; t0 success {_fmt(t0['success_pct'], '{:.1f}')}%, shed "
                f"{round(t0['calls'] * (t0['shed_pct'] or 0) / 100)} ({t0['shed_slow']} of them "
                "after > 10 ms)"
            )

        return [
            Target(
                "quiet tenants' success in the noisy phase >= 99.9%",
                quiet_success,
                lambda v: v >= 99.9,
            ),
            Target(
                "quiet tenants' p99: noisy phase <= 1.5x quiet phase", quiet_p99, lambda v: v <= 1.5
            ),
            Target(
                "total goodput in the noisy phase >= 90% of capacity", goodput, lambda v: v >= 90.0
            ),
            Target("the noisy tenant gets the capacity left over", leftover, None),
        ]
    if name == "spike":
        good = _goodput("overload (300%)")

        p99 = _growth("p99_ms", "pre-spike (20%)", "overload (300%)")

        def shed_fast(s: dict[str, Any]) -> tuple[float | None, str]:
            sh = s["shed_all"]
            if not sh["count"]:
                return None, "nothing shed"
            return sh["p99_ms"], (
                f"p99 {sh['p99_ms']:.2f} ms, max {sh['max_ms']:.0f} ms ({sh['count']} shed, "
                f"{sh['slow']} after > 10 ms)"
            )

        def recovery(s: dict[str, Any]) -> tuple[float | None, str]:
            r = s["recovery"]
            if r["seconds"] is None:
                return math.inf, f"not within the run ({r['threshold_ms']:.0f} ms threshold)"
            return r["seconds"], (
                f"{r['seconds']:.2f} s (threshold {r['threshold_ms']:.0f} ms; p99 of calls "
                f"arriving >= 2 s after: {_fmt(r['p99_after_2s_ms'])} ms)"
            )

        return [
            Target("overload: goodput >= 90% of capacity", good, lambda v: v >= 90.0),
            Target("overload: p99 of admitted calls <= 3x pre-spike p99", p99, lambda v: v <= 3.0),
            Target(
                "shed calls fail in <= 10 ms (p99, from arrival)", shed_fast, lambda v: v <= 10.0
            ),
            Target(
                "after the drop: p99 under 2x pre-spike p99 within 2 s",
                recovery,
                lambda v: v <= 2.0,
            ),
        ]
    if name == "sustained":
        sla = _growth("p95_ms", "unloaded (10%)", "loaded (90%)")

        def succ(s: dict[str, Any]) -> tuple[float | None, str]:
            w = _by(s, "loaded (90%)")
            return w["success_pct"], (
                f"{_fmt(w['success_pct'], '{:.2f}')}% (goodput {w['goodput_rps']:.0f} req/s)"
            )

        return [
            Target("p95 at 90% of capacity <= 2x the unloaded p95", sla, lambda v: v <= 2.0),
            Target("success at 90% of capacity >= 99.9%", succ, lambda v: v >= 99.9, ours=True),
        ]
    if name == "oscillation":

        def good(s: dict[str, Any]) -> tuple[float | None, str]:
            v, shown = _goodput("130% phases")(s)
            return v, f"{shown}; worst phase {s['worst_high_goodput_pct']:.1f}%"

        p99 = _growth("p99_ms", "first 30% phase (before any overload)", "130% phases")

        def thrash(s: dict[str, Any]) -> tuple[float | None, str]:
            th = s.get("thrash_high")
            if th is None:
                return None, "no limit (no admission)"
            return th["steady_cv_max"], (
                f"CV {_fmt(th['steady_cv_max'], '{:.3f}')}; {th['reversals']} reversals "
                f"(>5%) in the 130% phases, {th['reversals_all']} in all; "
                f"step p99 {_fmt(th['step_p99'] and 100 * th['step_p99'], '{:.1f}')}%"
            )

        return [
            Target("130% phases: goodput >= 90% of capacity", good, lambda v: v >= 90.0, ours=True),
            Target(
                "130% phases: p99 <= 3x the p99 before any overload",
                p99,
                lambda v: v <= 3.0,
                ours=True,
            ),
            Target(
                "no thrashing: limit CV <= 0.10 in each 130% phase's second half",
                thrash,
                lambda v: v <= 0.10,
                ours=True,
            ),
        ]
    return []


def summarize(sc: Scenario, d: RunData) -> dict[str, Any]:
    s: dict[str, Any] = {
        "policy": d.policy,
        "calls": len(d.arrival),
        "windows": [window_stats(d, w) for w in sc.windows],
        "timed_out": d.timed_out,
        "unfinished": sum(1 for o in d.outcome if o is None),
        "lb": d.lb,
        "fleet": d.fleet,
        "client": {
            "wall_s": d.wall_s,
            "cpu_s": d.client_cpu_s,
            "late_launch_ms": 1000 * d.late_launch_s,
            "loop_lag_p99_ms": _ms(quantile(sorted(d.lags), 0.99)),
            "loop_lag_max_ms": _ms(max(d.lags, default=None)),
            "loadavg_before": d.loadavg_before,
            "loadavg_after": d.loadavg_after,
        },
    }
    shed = sorted(
        (d.end[i] or math.inf) - a
        for i, a in enumerate(d.arrival)
        if (d.outcome[i] or "").startswith("shed:")
    )
    s["shed_all"] = {
        "count": len(shed),
        "p50_ms": _ms(quantile(shed, 0.5)),
        "p99_ms": _ms(quantile(shed, 0.99)),
        "max_ms": _ms(shed[-1]) if shed else None,
        "slow": sum(1 for x in shed if x > SHED_FAST),
    }
    if sc.name == "spike":
        pre = _by(s, "pre-spike (20%)")["p99_ms"]
        drop = sc.params["drop_at"]
        thr = 2.0 * (pre or 0.0) / 1000.0
        rec, trace = recovery_time(d, drop, sc.duration, thr)
        p_after, _ = admitted_p99_between(d, drop + 2.0, sc.duration)
        s["recovery"] = {
            "seconds": rec,
            "threshold_ms": 1000 * thr,
            "p99_after_2s_ms": _ms(p_after),
            "trace": [(round(t, 2), _ms(p)) for t, p in trace],
        }
    if sc.name == "oscillation":
        highs = next(w for w in sc.windows if w.name == "130% phases")
        per = [window_stats(d, Window(f"high {k}", (iv,))) for k, iv in enumerate(highs.intervals)]
        s["per_high_phase"] = [
            {
                k: p[k]
                for k in (
                    "window",
                    "goodput_pct_capacity",
                    "p99_ms",
                    "shed_pct",
                    "limit_mean",
                    "limit_min",
                    "limit_max",
                )
            }
            for p in per
        ]
        s["worst_high_goodput_pct"] = min(p["goodput_pct_capacity"] for p in per)
        if any(x[1] is not None for x in d.samples):
            th = limit_thrash(d, highs)
            th["reversals_all"] = limit_thrash(d, Window("all", ((0.0, sc.duration),)))["reversals"]
            s["thrash_high"] = th
    return s


def evaluate(sc_name: str, summaries: dict[str, dict[str, Any]], main: str) -> list[dict[str, Any]]:
    out = []
    for t in scenario_targets(sc_name):
        row: dict[str, Any] = {"target": t.text + (" (ours)" if t.ours else "")}
        for pol, s in summaries.items():
            value, shown = t.fn(s)
            met = None if t.ok is None or value is None else bool(t.ok(value))
            row[pol] = {"value": value, "shown": shown, "met": met}
        row["met"] = row.get(main, {}).get("met")
        out.append(row)
    return out


# ------------------------------------------------------------------------------ tables


def _mark(met: bool | None) -> str:
    return "[dim]-[/dim]" if met is None else "[green]yes[/green]" if met else "[red]NO[/red]"


def windows_table(sc: Scenario, summaries: dict[str, dict[str, Any]], mode: str) -> Table:
    t = Table(
        title=f"[b]{sc.name}[/b] ({mode}): {sc.title}",
        title_justify="left",
        caption="latency ms from the scheduled arrival, of admitted calls (not shed); goodput "
        "= successful completions/s (by completion time), % of 200 req/s; limit: mean "
        "[min-max]",
        caption_justify="left",
    )
    for col in ("policy", "window"):
        t.add_column(col, no_wrap=True)
    for col in (
        "calls",
        "offered/s",
        "success %",
        "shed %",
        "goodput/s (%)",
        "p50",
        "p95",
        "p99",
        "shed p50/p99",
        "limit",
        "errors",
    ):
        t.add_column(col, justify="right")
    for pol, s in summaries.items():
        for k, w in enumerate(s["windows"]):
            lim = "-"
            if w["limit_mean"] is not None:
                lim = f"{w['limit_mean']:.1f} [{w['limit_min']:.0f}-{w['limit_max']:.0f}]"
            err = ", ".join(f"{k2.removeprefix('error:')} {v}" for k2, v in w["errors"].items())
            t.add_row(
                pol if k == 0 else "",
                w["window"],
                str(w["calls"]),
                f"{w['offered_rps']:.0f}",
                _fmt(w["success_pct"], "{:.2f}"),
                _fmt(w["shed_pct"], "{:.1f}"),
                f"{w['goodput_rps']:.0f} ({w['goodput_pct_capacity']:.0f}%)",
                _fmt(w["p50_ms"]),
                _fmt(w["p95_ms"]),
                _fmt(w["p99_ms"]),
                "-"
                if w["shed_p99_ms"] is None
                else f"{w['shed_p50_ms']:.1f}/{w['shed_p99_ms']:.1f}",
                lim,
                err or "-",
                end_section=k == len(s["windows"]) - 1,
            )
    return t


def targets_table(
    name: str,
    mode: str,
    rows: list[dict[str, Any]],
    policies: Sequence[str],
    main: str,
    quick: bool = False,
) -> Table:
    t = Table(title=f"[b]{name} targets[/b] ({mode}; judged on `{main}`)", title_justify="left")
    if quick:
        t.caption = "quick run: phases too short to judge -- the verdicts are indicative only"
        t.caption_justify = "left"
    t.add_column("target")
    t.add_column(main)
    t.add_column("met", justify="center")
    others = [p for p in policies if p != main]
    for p in others:
        t.add_column(p)
    for r in rows:
        mark = _mark(r["met"])
        if quick and r["met"] is not None:
            mark = "[dim]yes (quick)[/dim]" if r["met"] else "[yellow]no (quick)[/yellow]"
        cells = [r["target"], r[main]["shown"] if main in r else "-", mark]
        for p in others:
            if p in r:
                mark = "" if r[p]["met"] is None else (" (met)" if r[p]["met"] else " (not met)")
                cells.append(r[p]["shown"] + mark)
            else:
                cells.append("-")
        t.add_row(*cells)
    return t


# ------------------------------------------------------------------------------ plots


def _shade(ax: Any, sc: Scenario) -> None:
    for x, label in sc.marks:
        ax.axvline(x, color="grey", lw=0.8, ls=":")
        if label:
            ax.text(
                x,
                0.01,
                " " + label,
                transform=ax.get_xaxis_transform(),
                fontsize=7,
                va="bottom",
                color="grey",
            )


POLICY_COLORS = {"none": "#C44E52", "admission": "#4C72B0", "fifo": "#55A868"}


def _panels() -> tuple[Any, Any]:
    """A figure of three panels sharing the time axis (12 x 10 in, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(3, 1, figsize=(12, 10), sharex=True)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spike(
    path: Path, sc: Scenario, runs: dict[str, RunData], s: dict[str, Any], mode: str
) -> None:
    fig, axes = _panels()
    ax0, ax1, ax2 = axes
    first = next(iter(runs.values()))
    ser0 = series(first, sc.duration)
    ax0.plot(ser0["t"], ser0["offered_rps"], color="black", lw=1, label="offered (arrivals/s)")
    ax0.axhline(CAPACITY, color="grey", ls="--", lw=0.8, label="capacity 200 req/s")
    ax0.axhline(0.9 * CAPACITY, color="grey", ls=":", lw=0.8, label="90% of capacity")
    for pol, d in runs.items():
        ser = series(d, sc.duration)
        c = POLICY_COLORS.get(pol)
        ax0.plot(ser["t"], ser["goodput_rps"], color=c, lw=1.4, label=f"goodput: {pol}")
        if any(ser["shed_rps"]):
            ax0.plot(ser["t"], ser["shed_rps"], color=c, lw=0.8, ls="--", label=f"shed/s: {pol}")
        p99 = [math.nan if v is None or v == math.inf else v for v in ser["p99_ms"]]
        p50 = [math.nan if v is None or v == math.inf else v for v in ser["p50_ms"]]
        ax1.plot(ser["t"], p99, color=c, lw=1.4, label=f"p99: {pol}")
        ax1.plot(ser["t"], p50, color=c, lw=0.8, ls="--", label=f"p50: {pol}")
        lim = [(x[0], x[1]) for x in d.samples if x[1] is not None]
        if lim:  # the gate's view: its limit, calls holding a permit, callers waiting
            ax2.plot(
                [x[0] for x in lim], [x[1] for x in lim], color=c, lw=1.4, label=f"limit: {pol}"
            )
            ax2.plot(
                [x[0] for x in d.samples],
                [x[2] for x in d.samples],
                color=c,
                lw=0.7,
                alpha=0.7,
                label=f"in flight: {pol}",
            )
            ax2.plot(
                [x[0] for x in d.samples],
                [x[3] for x in d.samples],
                color=c,
                lw=0.7,
                ls=":",
                label=f"queued: {pol}",
            )
        else:
            peak = max((x[2] for x in d.samples), default=0)
            ax2.plot([], [], color=c, lw=0.7, label=f"{pol}: no limit; in flight peaked at {peak}")
    pre = s.get("admission", s[next(iter(s))])
    pre_p99 = _by(pre, "pre-spike (20%)")["p99_ms"]
    if pre_p99:
        ax1.axhline(3 * pre_p99, color="grey", ls="--", lw=0.8, label="3x pre-spike p99")
        ax1.axhline(2 * pre_p99, color="grey", ls=":", lw=0.8, label="2x pre-spike p99")
    ax0.set_ylabel("req/s")
    ax0.set_title(f"spike ({mode}): {sc.title} -- 0.5 s bins", fontsize=10, loc="left")
    ax1.set_yscale("log")
    ax1.set_ylabel("admitted latency ms (by arrival)")
    ax2.set_ylabel("calls (admission gate)")
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("s")
    for ax in axes:
        _shade(ax, sc)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, ncol=3, loc="best")
    _save(fig, path)


def plot_oscillation(path: Path, sc: Scenario, runs: dict[str, RunData], mode: str) -> None:
    fig, axes = _panels()
    ax0, ax1, ax2 = axes
    first = next(iter(runs.values()))
    ser0 = series(first, sc.duration)
    ts = [i * 0.05 for i in range(int(sc.duration / 0.05) + 1)]
    for pol, d in runs.items():
        c = POLICY_COLORS.get(pol)
        lim = [(x[0], x[1]) for x in d.samples if x[1] is not None]
        if lim:
            ax0.plot(
                [x[0] for x in lim],
                [x[1] for x in lim],
                color=c,
                lw=1.6,
                label=f"admission limit: {pol}",
            )
            ax0.plot(
                [x[0] for x in d.samples],
                [x[2] for x in d.samples],
                color=c,
                lw=0.6,
                alpha=0.6,
                label=f"in flight: {pol}",
            )
        else:
            peak = max((x[2] for x in d.samples), default=0)
            ax0.plot([], [], color=c, lw=0.7, label=f"{pol}: no limit; in flight peaked at {peak}")
        ser = series(d, sc.duration)
        ax1.plot(ser["t"], ser["goodput_rps"], color=c, lw=1.4, label=f"goodput: {pol}")
        p99 = [math.nan if v is None or v == math.inf else v for v in ser["p99_ms"]]
        ax2.plot(ser["t"], p99, color=c, lw=1.4, label=f"p99: {pol}")
    ax0.axhline(N_REPLICAS * SLOTS, color="grey", ls="--", lw=0.8, label="fleet slots (20)")
    ax0.set_ylabel("calls (limit, in flight)")
    ax0.set_ylim(bottom=0)
    twin = ax0.twinx()
    twin.plot(
        ts,
        [sc.offered(t) for t in ts],
        color="black",
        lw=0.9,
        alpha=0.6,
        label="offered load (req/s)",
    )
    twin.set_ylabel("offered req/s")
    twin.set_ylim(0, max(sc.offered(t) for t in ts) * 1.6)
    twin.legend(fontsize=7, loc="upper right")
    ax1.plot(
        ser0["t"],
        ser0["offered_rps"],
        color="black",
        lw=0.9,
        alpha=0.6,
        label="offered (arrivals/s)",
    )
    ax1.axhline(CAPACITY, color="grey", ls="--", lw=0.8, label="capacity")
    ax1.set_ylabel("req/s")
    ax2.set_yscale("log")
    ax2.set_ylabel("admitted p99 ms")
    ax2.set_xlabel("s")
    ax0.set_title(
        f"oscillation ({mode}): {sc.title} -- the limit's trace vs offered load",
        fontsize=10,
        loc="left",
    )
    for ax in axes:
        _shade(ax, sc)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    _save(fig, path)


# ------------------------------------------------------------------------------ burst


async def _burst_mode(
    mode: str,
    calls: int,
    virtual: bool,
    seed: int,
    fleet: FleetProcess | None,
    urls: list[str] | None,
) -> dict[str, Any]:
    watchdog = BURST_REQUEST_TIMEOUT + 120.0
    spec: dict[str, Any] = {
        "mode": mode,
        "calls": calls,
        "virtual": virtual,
        "seed": seed,
        "request_timeout": BURST_REQUEST_TIMEOUT,
        "burst_timeout": BURST_REQUEST_TIMEOUT + 30.0,
        "max_wait": MAX_WAIT,
        "connector_limit": CONNECTOR_LIMIT,
        "replicas": N_REPLICAS,
        "slots": SLOTS,
        "base": BASE,
        "watchdog": watchdog,
        "urls": urls,
    }
    before: dict[str, int] = {}
    if fleet is not None:
        before = await fleet.idle()
    load0 = _loadavg()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BURST_CHILD),
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    live_pids.add(proc.pid)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), watchdog + 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return {"mode": mode, "error": "the burst child outlived its timeout (killed)"}
    finally:
        live_pids.discard(proc.pid)
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"mode": mode, "error": f"exit {proc.returncode}: {err.decode()[-2000:]}"}
    res: dict[str, Any] = json.loads(lines[-1])
    res["loadavg_before"] = load0
    res["loadavg_after"] = _loadavg()
    if fleet is not None:
        after = await fleet.idle()  # the child's connections are gone
        res["fleet"] = {k: v - before.get(k, 0) for k, v in after.items()}
    return res


def run_burst(
    calls: int,
    virtual: bool,
    seed: int,
    modes: Sequence[str],
    console: Console,
    fleet: FleetProcess | None,
) -> dict[str, Any]:
    """Each mode in its own client process (on loopback, against ``fleet``)."""
    results: dict[str, Any] = {}
    for mode in modes:
        console.print(f"  burst: {mode} ({calls} calls at once) ...")
        t0 = time.perf_counter()
        urls = fleet.urls if fleet is not None else None
        results[mode] = asyncio.run(_burst_mode(mode, calls, virtual, seed, fleet, urls))
        console.print(f"    done in {time.perf_counter() - t0:.1f} s")
    return results


def burst_targets(res: dict[str, Any], calls: int) -> list[dict[str, Any]]:
    base = res.get("aiohttp", {})

    def row(
        text: str, fn: Callable[[dict[str, Any]], tuple[float | None, str, bool | None]]
    ) -> dict[str, Any]:
        r: dict[str, Any] = {"target": text}
        for m, v in res.items():
            if "error" in v:
                r[m] = {"value": None, "shown": "run failed: " + v["error"][:80], "met": False}
                continue
            value, shown, met = fn(v)
            r[m] = {"value": value, "shown": shown, "met": met}
        r["met"] = r.get("admission", {}).get("met")
        return r

    def accounted(v: dict[str, Any]) -> tuple[float | None, str, bool | None]:
        good = v["ok"] + v["shed"]
        others = {k: c for k, c in v["outcomes"].items() if k != "ok" and not k.startswith("shed:")}
        shown = f"{v['ok']} ok + {v['shed']} Overloaded = {good}/{calls}"
        if others:
            shown += "; " + ", ".join(f"{k} {c}" for k, c in others.items())
        return good, shown, good == calls

    def hung(v: dict[str, Any]) -> tuple[float | None, str, bool | None]:
        lb = v.get("lb") or {}
        stuck = lb.get("in_flight_after", 0) + lb.get("admission_queued_after", 0)
        n = v["hung"] + v["lost"]
        return (
            n,
            f"{v['hung']} hung, {v['lost']} lost; after: {stuck} in flight/queued",
            (n == 0 and stuck == 0),
        )

    def shed_time(v: dict[str, Any]) -> tuple[float | None, str, bool | None]:
        st = v["shed_time_s"]
        if not v["shed"]:
            return None, "nothing shed", None
        return (
            st["p99"],
            (
                f"p50 {1000 * st['p50']:.1f} / p99 {1000 * st['p99']:.1f} ms; "
                f"{v['shed_within_10ms']}/{v['shed']} within 10 ms"
            ),
            None,
        )

    def wall(v: dict[str, Any]) -> tuple[float | None, str, bool | None]:
        r = _ratio(v["wall_s"], base.get("wall_s"))
        return (
            v["wall_s"],
            f"{v['wall_s']:.2f} s ({_fmt(r, '{:.3f}')}x aiohttp); CPU {v['client_cpu_s']:.2f} s",
            None,
        )

    def rss(v: dict[str, Any]) -> tuple[float | None, str, bool | None]:
        r = _ratio(v["peak_rss_kb"], base.get("peak_rss_kb"))
        grew = (v["peak_rss_kb"] or 0) - (v["peak_rss_before_kb"] or 0)
        return (
            v["peak_rss_kb"],
            (
                f"{v['peak_rss_kb'] / 1024:.0f} MB ({_fmt(r, '{:.2f}')}x aiohttp; +{grew / 1024:.0f}"
                " MB in the burst)"
            ),
            None,
        )

    def ok_lat(v: dict[str, Any]) -> tuple[float | None, str, bool | None]:
        lat = v["ok_latency_s"]
        if lat["p50"] is None:
            return None, "-", None
        return lat["p99"], f"p50 {lat['p50']:.2f} s / p99 {lat['p99']:.2f} s", None

    return [
        row("every call succeeds or is shed with Overloaded", accounted),
        row("none lost or hung (and nothing left in flight/queued)", hung),
        row("time-to-error of shed calls (from submission)", shed_time),
        row("latency of successful calls", ok_lat),
        row("wall time to the last outcome (and client CPU)", wall),
        row("peak RSS of the client process", rss),
    ]


# ------------------------------------------------------------------------------ main


def _finite(obj: Any) -> Any:
    """JSON has no infinity: an infinite latency (a call that never ended) becomes null."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Admission control under overload (see the module docstring).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Thrashing (oscillation): the limit, sampled every 100 ms, in the second half "
        "of each 130% phase (its steady state) -- its coefficient of variation must stay "
        "<= 0.10; reversals of direction by more than 5% are counted too.\n" + MAX_WAIT_WHY,
    )
    p.add_argument("--virtual", action="store_true", help="run on virtual time (vtime)")
    p.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--policies", default="none,admission", help="comma-separated, from none,admission,fifo"
    )
    p.add_argument(
        "--burst-calls",
        type=int,
        default=None,
        help=f"calls at once (default {BURST_CALLS}, --quick {BURST_CALLS_QUICK})",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--max-minutes", type=float, default=None, help="hard deadline")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--verbose", action="store_true", help="let lbclient's log through")
    args = p.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in args.scenario_list:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r} (choose from {', '.join(SCENARIOS)})")
    args.policy_list = [s.strip() for s in args.policies.split(",") if s.strip()]
    for s in args.policy_list:
        if s not in POLICY_TEXT:
            p.error(f"unknown policy {s!r}")
    if args.burst_calls is None:
        args.burst_calls = BURST_CALLS_QUICK if args.quick else BURST_CALLS
    return args


def _estimate(args: argparse.Namespace) -> float:
    if args.virtual:
        return 120.0
    total = 0.0
    for name in args.scenario_list:
        if name == "burst":
            total += 3 * (args.burst_calls / CAPACITY + 5)
        else:
            total += len(args.policy_list) * (SCENARIOS[name](args.quick).duration + 3)
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    log = logging.getLogger("lbclient")
    if not args.verbose:
        # lbclient's shed events are still built (a real client's cost), not printed.
        log.addHandler(logging.NullHandler())
        log.propagate = False
    import _report

    mode = "virtual" if args.virtual else "loopback"
    info = _report.machine_info()
    estimate = _estimate(args)
    deadline = args.max_minutes * 60 if args.max_minutes else 3 * estimate + 300
    timer = hard_deadline(deadline, console, "admission.py")
    console.print(
        f"[b]lbclient admission[/b] ({mode}{', quick' if args.quick else ''}) -- fleet "
        f"{N_REPLICAS} x {SLOTS} slots x {BASE * 1000:.0f} ms = {CAPACITY:.0f} req/s; "
        f"{info['cpu_count']} CPU(s), load average {info.get('loadavg_at_start')}; "
        f"scenarios {', '.join(args.scenario_list)}; policies {', '.join(args.policy_list)}"
        f"{'' if args.virtual else f'; about {estimate / 60:.1f} min'}"
    )
    console.print(f"[dim]{MAX_WAIT_WHY}[/dim]")
    console.print(
        f"[dim]lbclient {lbclient.__version__} from {info['lbclient_path']}, git "
        f"{info.get('git_commit')}, sources {IMPORTED_SOURCE}[/dim]"
    )
    path = args.out / "admission.json"
    try:
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            doc = {}
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("definitions", {})
    doc["definitions"] = {
        "fleet": f"{N_REPLICAS} replicas x {SLOTS} slots x {BASE * 1000:.0f} ms mean service "
        f"(lognormal sigma {SIGMA}) = {CAPACITY:.0f} req/s",
        "client": f"one aiohttp session, connector limit {CONNECTOR_LIMIT}, total timeout "
        f"{REQUEST_TIMEOUT:g} s per request ({BURST_REQUEST_TIMEOUT:g} s in burst); virtual: "
        "the same by a semaphore and asyncio.timeout",
        "policies": {p: POLICY_TEXT[p] for p in POLICY_TEXT},
        "max_wait": MAX_WAIT_WHY,
        "latency": "s from the scheduled (Poisson) arrival to the outcome; p50/p95/p99 over "
        "admitted calls (all not shed; a failed call with its time to failure)",
        "goodput": "successful completions per second whose completion falls in the window",
        "shed time": "time-to-error of calls shed with Overloaded, from the scheduled arrival",
        "recovery": "spike: seconds after the drop from which every 1 s window (by arrival, "
        "sliding by 0.25 s) has an admitted p99 <= 2x the pre-spike p99",
        "thrash": "oscillation: coefficient of variation of the limit (100 ms samples) in the "
        "second half of each 130% phase; reversals = changes of direction by > 5%",
    }
    section = doc.setdefault(mode, {})
    started = time.perf_counter()
    main_policy = "admission" if "admission" in args.policy_list else args.policy_list[-1]
    all_met: list[bool] = []
    fleet: FleetProcess | None = None
    if not args.virtual:
        fleet = FleetProcess(args.seed, deadline + 60)
        fleet.start()
    try:
        _run_all(args, console, fleet, doc, section, info, path, main_policy, all_met, mode)
    finally:
        if fleet is not None:
            fleet.close()
    timer.cancel()
    console.print(
        f"targets met (on `{main_policy}`): {sum(all_met)}/{len(all_met)}"
        f"{' (quick run: indicative only)' if args.quick else ''}; wrote {path} in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


def _run_all(
    args: argparse.Namespace,
    console: Console,
    fleet: FleetProcess | None,
    doc: dict[str, Any],
    section: dict[str, Any],
    info: dict[str, Any],
    path: Path,
    main_policy: str,
    all_met: list[bool],
    mode: str,
) -> None:
    import _report

    for name in args.scenario_list:
        sc = SCENARIOS[name](args.quick)
        t_sc = time.perf_counter()
        entry: dict[str, Any] = {
            "run": {
                "quick": args.quick,
                "seed": args.seed,
                "date": info["date"],
                "git_commit": info.get("git_commit"),
                "cpu_count": info["cpu_count"],
                "loadavg_at_start": _loadavg(),
                "lbclient_source_imported": IMPORTED_SOURCE,
                "lbclient_source_on_disk": lbclient_fingerprint(),
            }
        }
        if name == "burst":
            modes = [m for m in BURST_MODES if not (args.quick and m == "none")]
            res = run_burst(args.burst_calls, args.virtual, args.seed, modes, console, fleet)
            rows = burst_targets(res, args.burst_calls)
            entry |= {"calls": args.burst_calls, "modes": res, "targets": rows}
            console.print(
                targets_table(
                    f"burst: {args.burst_calls} calls at once",
                    mode,
                    rows,
                    modes,
                    "admission",
                    args.quick,
                )
            )
            all_met += [r["met"] for r in rows if r["met"] is not None]
        else:
            sched = schedule(sc, args.seed)
            summaries: dict[str, dict[str, Any]] = {}
            t_run = [time.perf_counter()]

            def on_start(pol: str, sc: Scenario = sc, n: int = len(sched)) -> None:
                t_run[0] = time.perf_counter()
                console.print(f"  {sc.name}: {pol} ({n} calls over {sc.duration:g} s) ...")

            def on_done(pol: str, d: RunData, sc: Scenario = sc) -> None:
                summaries[pol] = summarize(sc, d)
                c = summaries[pol]["client"]
                console.print(
                    f"    done in {time.perf_counter() - t_run[0]:.1f} s"
                    + (
                        ""
                        if args.virtual
                        else f"; client loop lag p99 {_fmt(c['loop_lag_p99_ms'], '{:.1f}')} ms, "
                        f"late launch max {c['late_launch_ms']:.1f} ms, load average "
                        f"{c['loadavg_after'] and round(c['loadavg_after'][0], 2)}"
                    )
                    + (" [red]-- the run watchdog fired[/red]" if d.timed_out else "")
                )

            runs = execute(
                sc, sched, args.policy_list, args.virtual, args.seed, on_start, on_done, fleet
            )
            rows = evaluate(name, summaries, main_policy)
            entry |= {
                "title": sc.title,
                "duration_s": sc.duration,
                "params": sc.params,
                "windows": [
                    {
                        "name": w.name,
                        "intervals": w.intervals,
                        "tenants": sorted(w.tenants) if w.tenants else None,
                    }
                    for w in sc.windows
                ],
                "policies": summaries,
                "targets": rows,
                "series": {p: series(d, sc.duration) for p, d in runs.items()},
                "limit_trace": {
                    p: [(round(x[0], 3), x[1], x[2], x[3]) for x in d.samples]
                    for p, d in runs.items()
                    if any(x[1] is not None for x in d.samples)
                },
            }
            console.print(windows_table(sc, summaries, mode))
            console.print(
                targets_table(name, mode, rows, args.policy_list, main_policy, args.quick)
            )
            all_met += [r["met"] for r in rows if r["met"] is not None]
            suffix = "-virtual" if args.virtual else ""
            if not args.no_plots and name == "spike":
                png = args.out / f"admission-spike{suffix}.png"
                plot_spike(png, sc, runs, summaries, mode)
                entry["png"] = str(png)
            if not args.no_plots and name == "oscillation":
                png = args.out / f"admission-oscillation{suffix}.png"
                plot_oscillation(png, sc, runs, mode)
                entry["png"] = str(png)
        disk = lbclient_fingerprint()
        entry["run"]["lbclient_source_on_disk_at_end"] = disk
        if disk != IMPORTED_SOURCE or entry["run"]["lbclient_source_on_disk"] != IMPORTED_SOURCE:
            console.print(
                f"[yellow]lbclient's sources changed on disk since this process imported them "
                f"({IMPORTED_SOURCE} -> {disk}): this scenario's "
                f"{'children ran the new code' if name == 'burst' else 'client ran the old code'}"
                "[/yellow]"
            )
        entry["run"]["wall_s"] = time.perf_counter() - t_sc
        entry["run"]["loadavg_at_end"] = _loadavg()
        section[name] = entry
        doc["machine"] = info
        _report.write_json(path, _finite(doc))


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        kill_live()
