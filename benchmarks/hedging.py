"""Hedged requests on a grid of fleets, every run from a cold start.

::

    python benchmarks/hedging.py                      # the default grid (17 cells, ~25 min)
    python benchmarks/hedging.py --quick              # 4 cells, 500 calls per run (~1 min)
    python benchmarks/hedging.py --cells ref --calls 3000
    python benchmarks/hedging.py --cells 0,3,b100_s1_r5_l30_hom --out /tmp/h
    python benchmarks/hedging.py --list               # the grid, with rates and durations

A *cell* is a fleet of 6 fake replicas (``lbclient.testing.ReplicaFleet``): base latency
(mean service time at speed 1), slots per replica, straggler rate (x20 service time),
load and per-replica speeds.  Its name spells it: ``b40_s4_r2_l50_hom`` is 40 ms, 4 slots,
2% stragglers, 50% load, homogeneous speeds (``het``: 1/0.5/0.8/1/0.5/0.8); any such name
works with ``--cells``, in the grid or not.

Load is a fraction of the fleet's *real* capacity, ``sum(slots * speed / base) / (1 +
rate * (factor - 1))``: stragglers hold a slot ``factor`` times longer, so the mean service
time is ``base * (1 + rate * (factor - 1))`` (5% stragglers at x20 almost halve the
capacity; 70% of the nominal ``sum(slots * speed / base)`` would then be 137% of what the
fleet can serve).  ``--nominal-load`` uses the nominal capacity instead.

Every cell runs three policies on the same seeded Poisson arrival schedule, each against a
fresh fleet (same seed, so the same service-time draws for the same arrival order) in a
*separate process* (``_fleet_server.py``), through a fresh ``lbclient.Balancer`` (a cold
start: no warm-up calls) and one shared ``aiohttp.ClientSession``:

* ``none``  -- ``Balancer(urls, strategy="peak_ewma")``;
* ``hedge`` -- ``peak_ewma`` + ``lbclient.Hedge()`` (adaptive delay, 5% budget);
* ``envoy`` -- Envoy's rule: ``least_connections`` + ``Hedge(delay=D, max_extra=0.5)``,
  ``D`` = the unloaded p95 service time of the fastest replica (the lognormal/straggler
  mixture the fleet draws from, see :func:`mixture_quantile`) -- a fixed per-try timeout
  with ``hedge_on_per_try_timeout``, no budget to speak of.

Calls are open loop: each is launched as its own task at its scheduled time and its
latency is measured *from the scheduled time* (no coordinated omission).  Cells whose
rate is at most ``--parallel-max-rate`` run their three policies at the same time (each
with its own fleet process): at such rates the client is nearly idle, and slow cells would
otherwise take minutes per policy.

Per cell and policy: success %, p50/p99/p99.9 of successful calls, p99.9 of the calls that
started after the hedger's warm-up (``warm``: at least ``Hedge().warmup`` calls had
completed), extra load (requests the fleet received / calls - 1), hedges sent/denied, the
adaptive delay, and -- the diagnosis -- the calls slower than the target ``T = p99.9(none)
/ 6`` sorted by why hedging did not save them:

* ``cold``   -- the call started before the hedger had its warm-up samples, so its delay was
  ``initial_delay`` (1 s): unhedged and faster than that, or hedged only after it;
* ``delay``  -- the delay was too long: unhedged and faster than the delay in force, or
  hedged and the backup took no longer than a normal call (p90 of ``none``) -- it was
  sent too late;
* ``budget`` -- unhedged although it outlived the delay: the hedge budget said no (or no
  other endpoint was free);
* ``backup`` -- hedged, but the backup itself was slower than a normal call (it queued, or
  was a straggler too).

p99.9 <= T needs at most about ``calls / 1000`` of them.  ``lag p99`` is the client event
loop's lag (a 50 ms sleep's overshoot): when it nears the base latency, the machine was
too busy for the numbers to mean much.  Per cell: the p99.9 ratio
none/hedge (target >= 6 at <= 5% extra load) and hedge vs envoy.  Tables are printed as
cells finish; ``hedging.json`` in ``--out`` (default ``benchmarks/results``) is rewritten
after every cell.  Every run has a watchdog, and the whole script a hard deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import itertools
import math
import random
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
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
import attrs

import _report
from _report import Progressor
from _harness import CHAT_PATH, PAYLOAD, OpenLoop, poisson_arrivals, quantile
from _fleet_process import FLEET_START_TIMEOUT, FleetProcess, hard_deadline, run_main
import lbclient
from lbclient.testing import ReplicaConfig

REQUEST_TIMEOUT = 10.0  # seconds per aiohttp request: nothing hangs
RUN_SLACK = 2 * REQUEST_TIMEOUT + 15.0  # watchdog: last arrival + this, then cancel
N_REPLICAS = 6
STRAGGLER_FACTOR = 20.0
SIGMA = ReplicaConfig().sigma  # the fleet's default lognormal shape
HOM = (1.0,) * N_REPLICAS
HET = (1.0, 0.5, 0.8, 1.0, 0.5, 0.8)
TARGET_RATIO = 6.0  # p99.9 with hedging <= 1/6 of without ...
TARGET_EXTRA_PCT = 5.0  # ... at <= 5% extra load
_HEDGE_DEFAULTS = lbclient.Hedge()
WARMUP = _HEDGE_DEFAULTS.warmup
INITIAL_DELAY = _HEDGE_DEFAULTS.initial_delay
OVERHEAD_S = 1.5  # per run: fleet process start + drain (for the time estimates)


# ------------------------------------------------------------------------------ cells


@dataclass(frozen=True)
class Cell:
    base: float  # seconds, mean service time at speed 1
    slots: int
    straggler_rate: float
    load: float  # fraction of capacity
    speeds: tuple[float, ...] = HOM
    straggler_factor: float = STRAGGLER_FACTOR
    label: str | None = None  # e.g. "ref"

    @property
    def name(self) -> str:
        speeds = "hom" if self.speeds == HOM else "het" if self.speeds == HET else "x"
        if speeds == "x":
            speeds = "v" + "-".join(f"{s:g}" for s in self.speeds)
        return (
            f"b{self.base * 1000:g}_s{self.slots}_r{self.straggler_rate * 100:g}"
            f"_l{self.load * 100:g}_{speeds}"
        )

    @property
    def title(self) -> str:
        kind = (
            "homogeneous"
            if len(set(self.speeds)) == 1
            else "speeds " + "/".join(f"{s:g}" for s in self.speeds)
        )
        return (
            f"{self.base * 1000:g} ms, {self.slots} slot(s), {self.straggler_rate * 100:g}% "
            f"stragglers x{self.straggler_factor:g}, {self.load * 100:g}% load, {kind}"
        )

    @property
    def mean_factor(self) -> float:
        """Mean service time / base latency, stragglers included."""
        return 1.0 + self.straggler_rate * (self.straggler_factor - 1.0)

    @property
    def nominal_capacity(self) -> float:
        return sum(self.slots * s / self.base for s in self.speeds)

    @property
    def capacity(self) -> float:
        return self.nominal_capacity / self.mean_factor

    def rate(self, nominal: bool = False) -> float:
        return self.load * (self.nominal_capacity if nominal else self.capacity)

    def replicas(self) -> list[dict[str, Any]]:
        return [
            {
                "base_latency": self.base,
                "capacity": self.slots,
                "speed": s,
                "straggler_rate": self.straggler_rate,
                "straggler_factor": self.straggler_factor,
                "sigma": SIGMA,
            }
            for s in self.speeds
        ]

    def envoy_delay(self) -> float:
        """Unloaded p95 service time of the fastest replica (Envoy's per-try timeout)."""
        return mixture_quantile(
            0.95,
            self.base / max(self.speeds),
            SIGMA,
            self.straggler_rate,
            self.straggler_factor,
        )

    def envoy_delay_sampled(self, n: int = 100_000, seed: int = 12345) -> float:
        """The same p95 estimated by drawing like the fleet does (a cross-check)."""
        rng = random.Random(seed)
        mean = self.base / max(self.speeds)
        mu = -SIGMA * SIGMA / 2
        draws = []
        for _ in range(n):
            factor = self.straggler_factor if rng.random() < self.straggler_rate else 1.0
            x = mean * factor
            if SIGMA > 0:
                x *= rng.lognormvariate(mu, SIGMA)
            draws.append(x)
        draws.sort()
        return draws[min(n - 1, int(0.95 * n))]


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def mixture_quantile(q: float, mean: float, sigma: float, rate: float, factor: float) -> float:
    """Quantile ``q`` of the fleet's service time at mean ``mean``: ``mean * F * Y`` with
    ``F = factor`` with probability ``rate`` (else 1) and ``Y ~ LogNormal(-sigma**2/2,
    sigma)`` (mean 1), so

        P(X <= x) = (1 - rate) * Phi((ln(x / mean) + sigma**2 / 2) / sigma)
                  +      rate * Phi((ln(x / (factor * mean)) + sigma**2 / 2) / sigma)

    solved for ``P(X <= x) = q`` by bisection on ``ln x``."""
    if sigma == 0:
        return mean if q <= 1.0 - rate else mean * factor

    def cdf(x: float) -> float:
        s2 = sigma * sigma / 2
        a = _phi((math.log(x / mean) + s2) / sigma)
        b = _phi((math.log(x / (factor * mean)) + s2) / sigma)
        return (1.0 - rate) * a + rate * b

    lo = math.log(mean) - 12 * sigma - 1
    hi = math.log(mean * factor) + 12 * sigma + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        if cdf(math.exp(mid)) < q:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


_NAME = re.compile(
    r"^b(?P<base>[\d.]+)_s(?P<slots>\d+)_r(?P<rate>[\d.]+)_l(?P<load>[\d.]+)"
    r"_(?P<speeds>hom|het|v[\d.]+(?:-[\d.]+)*)$"
)


def parse_cell_name(name: str) -> Cell:
    m = _NAME.match(name)
    if m is None:
        raise ValueError(
            f"bad cell {name!r}: an index, 'ref', or a name like b40_s4_r2_l50_hom "
            "(base ms, slots, straggler %, load %, hom|het|v1-0.5-...)"
        )
    sp = m["speeds"]
    speeds = (
        HOM if sp == "hom" else HET if sp == "het" else tuple(float(x) for x in sp[1:].split("-"))
    )
    if len(speeds) != N_REPLICAS:
        raise ValueError(f"bad cell {name!r}: {N_REPLICAS} speeds needed")
    cell = Cell(
        base=float(m["base"]) / 1000,
        slots=int(m["slots"]),
        straggler_rate=float(m["rate"]) / 100,
        load=float(m["load"]) / 100,
        speeds=speeds,
    )
    if not (cell.base > 0 and cell.slots >= 1 and 0 <= cell.straggler_rate <= 1 and cell.load > 0):
        raise ValueError(f"bad cell {name!r}: out of range")
    return cell


REF = Cell(base=0.04, slots=4, straggler_rate=0.02, load=0.5, label="ref")


def default_grid() -> list[Cell]:
    """The issue's reference cell, then a 2^(5-1) half fraction over (base 20/100 ms,
    slots 1/8, stragglers 0.5/5%, load 30/70%, homogeneous/heterogeneous): every
    combination of the first four factors once, speeds set by their parity (defining
    relation I = ABCDE, resolution V: main effects and two-factor interactions are
    not aliased with each other)."""
    cells = [REF]
    for base, slots, rate, load in itertools.product(
        (0.02, 0.1), (1, 8), (0.005, 0.05), (0.3, 0.7)
    ):
        odd = ((base == 0.1) + (slots == 8) + (rate == 0.05) + (load == 0.7)) % 2 == 1
        cells.append(Cell(base, slots, rate, load, HET if odd else HOM))
    return cells


QUICK = ("ref", "b20_s8_r5_l30_hom", "b20_s1_r0.5_l70_het", "b100_s8_r0.5_l70_het")


def select_cells(spec: str | None, quick: bool) -> list[Cell]:
    grid = default_grid()
    if spec is None:
        spec = ",".join(QUICK) if quick else "all"
    if spec.strip() == "all":
        return grid
    by_name = {c.name: c for c in grid}
    out: list[Cell] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok.isdigit():
            i = int(tok)
            if not 0 <= i < len(grid):
                raise ValueError(f"cell index {i} out of range 0..{len(grid) - 1}")
            out.append(grid[i])
        elif tok == "ref":
            out.append(REF)
        else:
            out.append(by_name.get(tok) or parse_cell_name(tok))
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Policy:
    name: str
    strategy: str
    hedge: str  # "off" | "adaptive" | "fixed"

    def balancer(self, urls: Sequence[str], cell: Cell, seed: int) -> lbclient.Balancer:
        hedge: lbclient.Hedge | None = None
        if self.hedge == "adaptive":
            hedge = lbclient.Hedge()
        elif self.hedge == "fixed":
            hedge = lbclient.Hedge(delay=cell.envoy_delay(), max_extra=0.5)
        return lbclient.Balancer(list(urls), strategy=self.strategy, hedge=hedge, rng=seed)

    @property
    def description(self) -> str:
        return {
            "off": f"{self.strategy}, no hedge",
            "adaptive": f"{self.strategy} + Hedge()",
            "fixed": f"{self.strategy} + Hedge(delay=D, max_extra=0.5)",
        }[self.hedge]


POLICIES = {
    "none": Policy("none", "peak_ewma", "off"),
    "hedge": Policy("hedge", "peak_ewma", "adaptive"),
    "envoy": Policy("envoy", "least_connections", "fixed"),
}


# --------------------------------------------------------------------------- metrics


def summarize_ms(values_s: Sequence[float]) -> dict[str, float]:
    v = sorted(x * 1000.0 for x in values_s)
    out: dict[str, float] = {"n": float(len(v))}
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)):
        x = quantile(v, q)
        if x is not None:
            out[key] = x
    if v:
        out["max"] = v[-1]
    return out


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}"
    return type(exc).__name__


@dataclass
class RunData:
    """Raw outcome of one policy run (not all of it goes to the JSON)."""

    policy: str
    schedule: list[float]
    latency: list[float | None]
    error: list[str | None]
    attempts: list[list[float]]  # per call: attempt start offsets from the scheduled time, s
    delay_samples: list[tuple[float, float]]  # (run time s, adaptive hedge delay s)
    lags: list[float]  # event-loop lag samples, s
    lb: dict[str, Any]
    received: list[int]
    fleet_counters: list[dict[str, int]]
    late_launch_s: float
    client_cpu_s: float
    fleet_cpu_s: float | None
    wall_s: float
    timed_out: bool
    launched: int
    fixed_delay: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _cold_flags(d: RunData) -> list[bool]:
    """Per call: did it start before ``WARMUP`` calls had completed successfully (the
    hedger's latency window was still empty, its delay ``initial_delay``)?"""
    ends = sorted(
        at + lat for at, lat in zip(d.schedule, d.latency, strict=True) if lat is not None
    )
    return [bisect.bisect_left(ends, at) < WARMUP for at in d.schedule]


def _delay_at(d: RunData, t: float) -> float | None:
    if d.fixed_delay is not None:
        return d.fixed_delay
    if not d.delay_samples:
        return None
    i = bisect.bisect_right(d.delay_samples, (t, math.inf)) - 1
    return d.delay_samples[max(0, i)][1]


def classify(
    d: RunData, threshold_s: float, normal_s: float
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Calls slower than ``threshold_s``, by why hedging did not save them (see module
    docstring), and the 10 slowest calls.  ``normal_s``: how long a normal call takes (p90
    of the unhedged run): a backup no slower than that, sent too late, blames the delay."""
    cold = _cold_flags(d)
    hedging = d.policy != "none"
    counts: Counter[str] = Counter()
    for i, lat in enumerate(d.latency):
        if lat is None or lat <= threshold_s:
            continue
        counts["total"] += 1
        if not hedging:
            continue
        offs = d.attempts[i]
        adaptive = d.fixed_delay is None
        if len(offs) >= 2:
            if adaptive and cold[i] and offs[1] >= 0.9 * INITIAL_DELAY:
                why = "cold"
            else:
                why = "delay" if lat - offs[1] <= normal_s else "backup"
        else:
            delay = INITIAL_DELAY if adaptive and cold[i] else _delay_at(d, d.schedule[i])
            if delay is not None and lat < delay:
                why = "cold" if adaptive and cold[i] else "delay"
            else:
                why = "budget"
        counts[why] += 1
    worst = sorted(
        (i for i, lat in enumerate(d.latency) if lat is not None),
        key=lambda i: -(d.latency[i] or 0.0),
    )[:10]
    rows = [
        {
            "call": i,
            "at_s": round(d.schedule[i], 4),
            "latency_ms": round((d.latency[i] or 0.0) * 1000, 1),
            "attempt_offsets_ms": [round(o * 1000, 1) for o in d.attempts[i]],
            "cold": cold[i],
        }
        for i in worst
    ]
    return dict(counts), rows


def hedge_fire_stats(d: RunData, cold: Sequence[bool]) -> dict[str, Any] | None:
    """When the backups went out: offset from the scheduled arrival (ms), and how much
    later than the delay in force at the call's start (the primary's own launch lag
    included) -- a hedge timer that fires late shows here."""
    if d.policy == "none":
        return None
    offs, lag = [], []
    for i, a in enumerate(d.attempts):
        if len(a) < 2:
            continue
        offs.append(a[1] * 1000)
        delay = INITIAL_DELAY if d.fixed_delay is None and cold[i] else _delay_at(d, d.schedule[i])
        if delay is not None:
            lag.append((a[1] - a[0] - delay) * 1000)
    offs.sort()
    lag.sort()
    return {
        "hedged_calls": len(offs),
        "offset_p50": quantile(offs, 0.5),
        "offset_max": offs[-1] if offs else None,
        "after_delay_p50": quantile(lag, 0.5),
        "after_delay_p90": quantile(lag, 0.9),
        "after_delay_max": lag[-1] if lag else None,
    }


def result_dict(d: RunData) -> dict[str, Any]:
    n = len(d.schedule)
    ok = [x for x in d.latency if x is not None]
    cold = _cold_flags(d)
    warm_ok = [x for x, c in zip(d.latency, cold, strict=True) if x is not None and not c]
    received = sum(d.received)
    lags = sorted(x * 1000 for x in d.lags)
    delays = [s * 1000 for _, s in d.delay_samples]
    warm_delays = [x for x in delays if x != INITIAL_DELAY * 1000]
    errors = Counter(e for e in d.error if e is not None)
    return {
        "policy": d.policy,
        "description": POLICIES[d.policy].description,
        "calls": n,
        "ok": len(ok),
        "success_pct": 100.0 * len(ok) / n if n else 0.0,
        "latency_ms": summarize_ms(ok),
        "warm_latency_ms": summarize_ms(warm_ok),
        "cold_calls": sum(cold),
        "errors": dict(errors.most_common()),
        "fleet_received": received,
        "fleet_received_per_replica": d.received,
        "fleet_cancelled": sum(c.get("cancelled", 0) for c in d.fleet_counters),
        # over the calls launched: a run stopped by its watchdog launched fewer
        "extra_load_pct": 100.0 * (received / d.launched - 1.0) if d.launched else 0.0,
        "launched": d.launched,
        "attempts_client": sum(len(a) for a in d.attempts),
        # backups that reached the request function (lb's hedges_sent also counts backups
        # cancelled before their task first ran, when the primary answered just then)
        "hedges_ran": sum(len(a) - 1 for a in d.attempts if len(a) > 1),
        "lb": d.lb,
        "hedge_delay_ms": {
            "fixed": None if d.fixed_delay is None else d.fixed_delay * 1000,
            "median": statistics.median(delays) if delays else None,
            "min": min(delays) if delays else None,
            "max": max(delays) if delays else None,
            "max_warm": max(warm_delays) if warm_delays else None,
            "final": d.lb.get("hedge_delay_ms"),
            # (run time s, delay ms), at most ~100 points
            "series": [
                [round(t, 2), round(x * 1000, 1)]
                for t, x in d.delay_samples[:: max(1, len(d.delay_samples) // 100)]
            ],
        },
        "hedge_fire_ms": hedge_fire_stats(d, cold),
        "loop_lag_ms": {"p99": quantile(lags, 0.99), "max": lags[-1] if lags else None},
        "late_launch_ms_max": d.late_launch_s * 1000,
        "client_cpu_s": d.client_cpu_s,
        "fleet_cpu_s": d.fleet_cpu_s,
        "wall_s": d.wall_s,
        "timed_out": d.timed_out,
        **d.extra,
    }


# -------------------------------------------------------------------------------- run


async def run_policy(
    cell: Cell, policy: Policy, schedule: list[float], *, seed: int, prog: Progressor
) -> RunData:
    """One policy on one cell: fresh fleet process, fresh session, fresh Balancer."""
    loop = asyncio.get_running_loop()
    n = len(schedule)
    latency: list[float | None] = [None] * n
    error: list[str | None] = [None] * n
    attempts: list[list[float]] = [[] for _ in range(n)]
    samples: list[tuple[float, float]] = []
    lags: list[float] = []
    calls = OpenLoop()
    budget = (schedule[-1] if schedule else 0.0) + RUN_SLACK
    lb_out: dict[str, Any] = {}
    gc.collect()  # start each run without garbage from the previous ones
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    fleet = FleetProcess(cell.replicas(), seed, max_seconds=budget + FLEET_START_TIMEOUT + 60)
    try:
        await fleet.start()
        before = await fleet.stats()
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            lb = policy.balancer(fleet.urls, cell, seed)
            origin = loop.time() + 0.05
            scheduled = [origin + at for at in schedule]

            @lb.route
            async def call(endpoint: lbclient.Endpoint, i: int) -> bytes:
                attempts[i].append(loop.time() - scheduled[i])
                async with session.post(endpoint.url + CHAT_PATH, json=PAYLOAD) as resp:
                    resp.raise_for_status()
                    return await resp.read()

            async def one(i: int) -> None:
                try:
                    await call(i)
                    latency[i] = loop.time() - scheduled[i]
                except asyncio.CancelledError:
                    error[i] = "cancelled by the run watchdog"
                    raise
                except Exception as exc:  # a failed call is a data point
                    error[i] = _error_name(exc)
                finally:
                    prog.done += 1

            async def sampler() -> None:
                period = 0.05
                while True:
                    t = loop.time()
                    await asyncio.sleep(period)
                    lags.append(max(0.0, loop.time() - t - period))
                    if policy.hedge == "adaptive":
                        ms = lb.stats().hedge_delay_ms
                        if ms is not None:
                            samples.append((loop.time() - origin, ms / 1000))

            side = loop.create_task(sampler())
            try:
                await calls.run(
                    schedule, origin, lambda i, _when: one(i), budget=budget, side=[side]
                )
            finally:
                st = lb.stats()
                lb_out = {
                    "calls": st.calls,
                    "calls_failed": st.calls_failed,
                    "attempts": st.attempts,
                    "hedges_sent": st.hedges_sent,
                    "hedges_won": st.hedges_won,
                    "hedges_denied": st.hedges_denied,
                    "hedge_delay_ms": st.hedge_delay_ms,
                    "requests_per_endpoint": [e.requests for e in st.endpoints],
                }
                await lb.aclose()
        after = await fleet.stats()
    finally:
        await fleet.close()
    counters = [
        {k: a[k] - b.get(k, 0) for k in ("received", "served", "errors", "cancelled", "dropped")}
        for a, b in zip(after["counters"], before["counters"], strict=True)
    ]
    return RunData(
        policy=policy.name,
        schedule=schedule,
        latency=latency,
        error=error,
        attempts=attempts,
        delay_samples=samples,
        lags=lags,
        lb=lb_out,
        received=[c["received"] for c in counters],
        fleet_counters=counters,
        late_launch_s=calls.late,
        client_cpu_s=time.process_time() - cpu0,
        fleet_cpu_s=after["cpu_s"] - before["cpu_s"],
        wall_s=time.perf_counter() - wall0,
        timed_out=calls.timed_out,
        launched=len(calls.tasks),
        fixed_delay=cell.envoy_delay() if policy.hedge == "fixed" else None,
    )


async def run_cell(
    cell: Cell,
    policies: Sequence[Policy],
    args: argparse.Namespace,
    prog: Progressor,
    on_start: Callable[[str], None],
) -> dict[str, Any]:
    rate = cell.rate(args.nominal_load)
    schedule = poisson_arrivals(
        rate, args.calls, random.Random(f"{args.seed}:{cell.name}:arrivals")
    )
    parallel = rate <= args.parallel_max_rate
    runs: dict[str, RunData] = {}
    failures: dict[str, str] = {}

    async def guarded(p: Policy) -> None:
        try:
            runs[p.name] = await run_policy(cell, p, schedule, seed=args.seed, prog=prog)
        except Exception as exc:  # a broken run is reported, the grid goes on
            failures[p.name] = f"{type(exc).__name__}: {exc}"

    if parallel:
        on_start(f"{cell.name}: {', '.join(p.name for p in policies)} (in parallel)")
        await asyncio.gather(*(guarded(p) for p in policies))
    else:
        for p in policies:
            on_start(f"{cell.name}: {p.name}")
            await guarded(p)
    runs = {p.name: runs[p.name] for p in policies if p.name in runs}  # policy order
    results = {name: result_dict(d) for name, d in runs.items()}
    none = results.get("none")
    threshold_ms = normal_ms = None
    if none and "p99.9" in none["latency_ms"]:
        threshold_ms = none["latency_ms"]["p99.9"] / TARGET_RATIO
        normal_ms = none["latency_ms"]["p90"]
    for name, d in runs.items():
        if threshold_ms is not None and normal_ms is not None:
            counts, worst = classify(d, threshold_ms / 1000, normal_ms / 1000)
            results[name]["over_target"] = {
                "threshold_ms": threshold_ms,
                "normal_ms": normal_ms,
                "allowed": int(0.001 * len(d.schedule)),
                **{k: counts.get(k, 0) for k in ("total", "cold", "delay", "budget", "backup")},
            }
        else:
            _, worst = classify(d, math.inf, math.inf)
        results[name]["slowest_calls"] = worst
    return {
        "name": cell.name,
        "label": cell.label,
        "title": cell.title,
        "config": {
            "base_latency_s": cell.base,
            "slots": cell.slots,
            "straggler_rate": cell.straggler_rate,
            "straggler_factor": cell.straggler_factor,
            "load": cell.load,
            "load_basis": "nominal" if args.nominal_load else "real (stragglers included)",
            "speeds": list(cell.speeds),
            "sigma": SIGMA,
            "replicas": cell.replicas(),
        },
        "capacity_rps": cell.capacity,
        "nominal_capacity_rps": cell.nominal_capacity,
        "rate_rps": rate,
        "schedule_s": schedule[-1] if schedule else 0.0,
        "mode": "parallel" if parallel else "sequential",
        "envoy_delay_ms": cell.envoy_delay() * 1000,
        "envoy_delay_sampled_ms": cell.envoy_delay_sampled() * 1000,
        "policies": results,
        "failures": failures,
        "summary": summarize_cell(results),
    }


def summarize_cell(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def p999(name: str) -> float | None:
        r = results.get(name)
        return None if r is None else r["latency_ms"].get("p99.9")

    none, hedge, envoy = p999("none"), p999("hedge"), p999("envoy")
    out: dict[str, Any] = {"p99.9_none": none, "p99.9_hedge": hedge, "p99.9_envoy": envoy}
    out["improvement_hedge"] = none / hedge if none and hedge else None
    out["improvement_envoy"] = none / envoy if none and envoy else None
    out["hedge_over_envoy"] = hedge / envoy if hedge and envoy else None
    if "hedge" in results:
        h = results["hedge"]
        out["extra_load_hedge_pct"] = h["extra_load_pct"]
        imp = out["improvement_hedge"]
        timed_out = any(r["timed_out"] for r in results.values())
        out["timed_out"] = timed_out
        out["target_met"] = (
            None
            if imp is None or timed_out
            else imp >= TARGET_RATIO
            and h["extra_load_pct"] <= TARGET_EXTRA_PCT
            and h["success_pct"] >= 99.9
        )
    if "envoy" in results:
        out["extra_load_envoy_pct"] = results["envoy"]["extra_load_pct"]
    if hedge and envoy:
        out["hedge_beats_envoy"] = hedge <= envoy
    lags = [r["loop_lag_ms"]["p99"] for r in results.values() if r["loop_lag_ms"]["p99"]]
    out["loop_lag_p99_ms_max"] = max(lags) if lags else None
    return out


# ---------------------------------------------------------------------------- output


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def cell_table(cell: dict[str, Any]) -> Table:
    t = Table(
        title=f"[b]{cell['name']}[/b]{' (' + cell['label'] + ')' if cell['label'] else ''}: "
        f"{cell['title']} -- {cell['rate_rps']:.0f} req/s, envoy D = "
        f"{cell['envoy_delay_ms']:.1f} ms, {cell['mode']}",
        title_justify="left",
        caption="over T: calls slower than T = p99.9(none)/6 (allowed ~calls/1000), by cause "
        "cold/delay/budget/backup",
        caption_justify="left",
    )
    for col, just in (
        ("policy", "left"),
        ("ok %", "right"),
        ("p50", "right"),
        ("p99", "right"),
        ("p99.9", "right"),
        ("p99.9 warm", "right"),
        ("extra %", "right"),
        ("hedges sent/ran", "right"),
        ("denied", "right"),
        ("delay ms med/final", "right"),
        ("over T / allowed (cold/delay/budget/backup)", "right"),
        ("lag p99 ms", "right"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, r in cell["policies"].items():
        lat, warm, lb = r["latency_ms"], r["warm_latency_ms"], r["lb"]
        hd = r["hedge_delay_ms"]
        if hd["fixed"] is not None:
            delay = f"{hd['fixed']:.1f} fixed"
        elif name == "hedge":
            delay = f"{_f(hd['median'], '{:.1f}')}/{_f(hd['final'], '{:.1f}')}"
        else:
            delay = ""
        ov = r.get("over_target")
        over = ""
        if ov:
            over = f"{ov['total']}/{ov['allowed']}"
            if name != "none":
                over += f" ({ov['cold']}/{ov['delay']}/{ov['budget']}/{ov['backup']})"
        ok = r["success_pct"]
        okf = f"{ok:.2f}" if ok < 100 else "100"
        if r["timed_out"]:
            okf = f"[red]{okf} TIMEOUT[/red]"
        t.add_row(
            name,
            okf,
            _f(lat.get("p50"), "{:.1f}"),
            _f(lat.get("p99")),
            _f(lat.get("p99.9")),
            _f(warm.get("p99.9")),
            f"{r['extra_load_pct']:+.2f}",
            "" if name == "none" else f"{lb.get('hedges_sent', 0)}/{r['hedges_ran']}",
            "" if name == "none" else str(lb.get("hedges_denied", 0)),
            delay,
            over,
            _f(r["loop_lag_ms"]["p99"], "{:.1f}"),
        )
    for name, why in cell.get("failures", {}).items():
        t.add_row(name, f"[red]run failed: {why}[/red]")
    return t


def summary_table(cells: Sequence[dict[str, Any]]) -> Table:
    t = Table(
        title="[b]p99.9 with and without hedging[/b] (target: none/hedge >= 6 at <= 5% extra "
        "load; envoy = least_connections + fixed delay D = unloaded p95)",
        title_justify="left",
    )
    for col in (
        "#",
        "cell",
        "req/s",
        "D ms",
        "none p99.9",
        "hedge p99.9",
        "envoy p99.9",
        "none/hedge",
        "none/envoy",
        "hedge extra %",
        "envoy extra %",
        "hedge/envoy",
        "target",
        "lag p99 ms",
    ):
        t.add_column(col, justify="left" if col == "cell" else "right")
    for c in cells:
        s = c["summary"]
        met = s.get("target_met")
        mark = "-" if met is None else "[green]yes[/green]" if met else "[red]no[/red]"
        if s.get("timed_out"):
            mark = "[red]timeout[/red]"
        he = s.get("hedge_over_envoy")
        hef = _f(he, "{:.2f}")
        if he is not None:
            hef = f"[green]{hef}[/green]" if he <= 1 else f"[red]{hef}[/red]"
        t.add_row(
            "-" if c["index"] is None else str(c["index"]),
            c["name"] + (f" ({c['label']})" if c["label"] else ""),
            f"{c['rate_rps']:.0f}",
            f"{c['envoy_delay_ms']:.0f}",
            _f(s.get("p99.9_none")),
            _f(s.get("p99.9_hedge")),
            _f(s.get("p99.9_envoy")),
            _f(s.get("improvement_hedge"), "1/{:.1f}"),
            _f(s.get("improvement_envoy"), "1/{:.1f}"),
            _f(s.get("extra_load_hedge_pct"), "{:.2f}"),
            _f(s.get("extra_load_envoy_pct"), "{:.2f}"),
            hef,
            mark,
            _f(s.get("loop_lag_p99_ms_max"), "{:.1f}"),
        )
    return t


def grid_table(cells: Sequence[tuple[int | None, Cell]], args: argparse.Namespace) -> Table:
    t = Table(title="[b]cells[/b]", title_justify="left")
    for col in ("#", "cell", "title", "req/s", "D ms", "schedule s", "mode", "est. s"):
        t.add_column(col, justify="left" if col in ("cell", "title") else "right")
    for i, c in cells:
        rate = c.rate(args.nominal_load)
        t.add_row(
            "-" if i is None else str(i),
            c.name + (f" ({c.label})" if c.label else ""),
            c.title,
            f"{rate:.1f}",
            f"{c.envoy_delay() * 1000:.1f}",
            f"{args.calls / rate:.1f}",
            "parallel" if rate <= args.parallel_max_rate else "sequential",
            f"{estimate_seconds(c, args):.0f}",
        )
    return t


def estimate_seconds(cell: Cell, args: argparse.Namespace) -> float:
    rate = cell.rate(args.nominal_load)
    per_run: float = args.calls / rate + OVERHEAD_S
    return per_run if rate <= args.parallel_max_rate else per_run * len(args.policy_list)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Hedged requests from a cold start on a grid of fake fleets: p99.9 "
        "without hedging, with lbclient.Hedge() and with Envoy's fixed-delay rule.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help=f"cells {','.join(QUICK)}, 500 calls")
    p.add_argument(
        "--cells",
        default=None,
        help="'all', or comma-separated indices into the grid (see --list), 'ref', or "
        "names like b40_s4_r2_l50_hom (any such name, in the grid or not)",
    )
    p.add_argument(
        "--calls", type=int, default=None, help="calls per run (default 3000; 500 with --quick)"
    )
    p.add_argument("--policies", default="none,hedge,envoy", help=f"subset of {','.join(POLICIES)}")
    p.add_argument("--seed", type=int, default=1, help="seed of arrivals, fleets and balancers")
    p.add_argument(
        "--parallel-max-rate",
        type=float,
        default=60.0,
        help="cells at or below this rate (req/s) run their policies at the same time, "
        "each with its own fleet process (0: never)",
    )
    p.add_argument(
        "--nominal-load",
        action="store_true",
        help="load as a fraction of sum(slots*speed/base), ignoring the stragglers' share "
        "of slot time (5%% stragglers at x20 then overload the fleet at 70%%)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="hard deadline for the whole script (default: 2 x the estimate + 5 min)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    p.add_argument("--list", action="store_true", help="print the selected cells and exit")
    args = p.parse_args(argv)
    if args.calls is None:
        args.calls = 500 if args.quick else 3000
    if args.calls < 10:
        p.error("--calls must be >= 10")
    try:
        args.cell_list = select_cells(args.cells, args.quick)
    except ValueError as exc:
        p.error(str(exc))
    names = [x.strip() for x in args.policies.split(",") if x.strip()]
    bad = [x for x in names if x not in POLICIES]
    if bad or not names:
        p.error(f"unknown policies {bad}: choose from {', '.join(POLICIES)}")
    args.policy_list = [POLICIES[x] for x in names]
    return args


def source_fingerprint() -> dict[str, Any]:
    """Which lbclient was measured: a hash of its sources (the working tree may hold
    uncommitted changes) and the ``Hedge()`` defaults."""
    return {
        "lbclient_sources_sha256": _report.lbclient_sources_sha256(),
        "hedge_defaults": repr(_HEDGE_DEFAULTS),
        "hedge_fields": {
            f.name: getattr(_HEDGE_DEFAULTS, f.name) for f in attrs.fields(lbclient.Hedge)
        },
    }


async def main_async(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 180))
    grid = default_grid()
    index = {c: i for i, c in enumerate(grid)}
    cells = [(index.get(c), c) for c in args.cell_list]  # index None: not in the grid
    estimate = sum(estimate_seconds(c, args) for _, c in cells)
    info = _report.machine_info() | source_fingerprint()
    console.print(
        f"[b]lbclient hedging grid[/b] -- {len(cells)} cell(s) x "
        f"{len(args.policy_list)} policies, {args.calls} calls per run, cold starts; "
        f"{info['cpu_count']} CPU(s), Python {sys.version.split()[0]}, load average "
        f"{info.get('loadavg_at_start')}; estimated {estimate / 60:.1f} min"
    )
    if args.list:
        console.print(grid_table(cells, args))
        return 0
    deadline = args.max_minutes * 60 if args.max_minutes else 2 * estimate + 300
    timer = hard_deadline(deadline, console, "hedging.py")
    started = time.perf_counter()
    out: dict[str, Any] = {
        "machine": info,
        "args": {k: str(v) for k, v in vars(args).items() if k not in ("cell_list", "policy_list")},
        "definitions": {
            "latency": "ms from the call's scheduled (Poisson) arrival to its answer; "
            "percentiles of successful calls",
            "warm_latency_ms": "calls that started after Hedge().warmup calls had completed",
            "extra_load_pct": "requests the fleet received / calls - 1",
            "envoy_delay_ms": "unloaded p95 service time of the fastest replica (formula); "
            "envoy_delay_sampled_ms: the same by sampling",
            "over_target": "calls slower than T = p99.9(none) / 6, by cause: cold (hedger "
            "not warm: 1 s initial delay), delay (unhedged and faster than the delay in "
            "force, or hedged with a backup no slower than p90(none): sent too late), budget "
            "(unhedged though it outlived the delay: budget denied or no other endpoint), "
            "backup (hedged, backup slower than p90(none)); allowed = calls / 1000",
            "envoy_delay_note": "when straggler_rate ~ 5%, the unloaded p95 falls in the gap "
            "between the normal and the straggler modes, where the CDF is nearly flat at "
            "0.95: the formula's exact root and a sampled p95 can differ several-fold",
            "capacity_rps": "sum(slots * speed / base) / (1 + rate * (factor - 1))",
            "hedges_ran": "backups that reached the request function; lb.hedges_sent also "
            "counts backups cancelled before their task first ran",
            "client_cpu_s": "process CPU of the client during the run (shared by the "
            "policies of a parallel cell)",
            "loop_lag_ms": "overshoot of a 50 ms asyncio.sleep in the client, sampled",
            "hedge_fire_ms": "backup start offset from the scheduled arrival, and how long "
            "after (primary start + delay in force) it started",
        },
        "policies": {p.name: p.description for p in args.policy_list},
        "cells": [],
    }
    path = args.out / "hedging.json"
    total = len(cells) * len(args.policy_list) * args.calls
    async with _report.call_progress(console, total) as (progress, bar, prog):
        for k, (i, cell) in enumerate(cells):
            base_done = k * len(args.policy_list) * args.calls

            def on_start(what: str, k: int = k) -> None:
                progress.update(bar, description=f"[{k + 1}/{len(cells)}] {what}")

            res = await run_cell(cell, args.policy_list, args, prog, on_start)
            prog.done = base_done + len(args.policy_list) * args.calls
            res["index"] = i
            out["cells"].append(res)
            out["wall_seconds"] = time.perf_counter() - started
            _report.write_json(path, out)
            progress.console.print(cell_table(res))
    timer.cancel()
    console.print(summary_table(out["cells"]))
    met = [c["summary"].get("target_met") for c in out["cells"]]
    beats = [c["summary"].get("hedge_beats_envoy") for c in out["cells"]]
    out["targets"] = {
        "cells_meeting_target": sum(1 for m in met if m),
        "cells_beating_envoy": sum(1 for b in beats if b),
        "cells": len(out["cells"]),
    }
    out["wall_seconds"] = time.perf_counter() - started
    _report.write_json(path, out)
    console.print(
        f"target met in {out['targets']['cells_meeting_target']}/{len(cells)} cell(s), hedge "
        f"<= envoy in {out['targets']['cells_beating_envoy']}/{len(cells)}; wrote {path} in "
        f"{out['wall_seconds']:.0f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
