"""Latency-aware picking against the physical limit, on loopback.

::

    python benchmarks/picking.py                       # 3 fleets x 5 loads x 4 strategies, 3000 calls
    python benchmarks/picking.py --quick               # smoke: 3 fleets, 2 loads, 2 strategies (~1 min)
    python benchmarks/picking.py --fleets hetero --calls 3000
    python benchmarks/picking.py --fleets hetero --loads 0.7 --strategies peak_ewma,baseline_rr \\
        --calls 100 --oracle-seeds 1 --overhead-requests 20 --no-plot --out /tmp/p   # < 30 s
    python benchmarks/picking.py --list                # the plan, with rates and an estimate

For each *fleet* (fake replicas of ``lbclient.testing.ReplicaFleet``: base latency, slots
per replica, per-replica speeds, lognormal service times with sigma 0.25, no stragglers)
and each *load* (a fraction of the fleet's capacity ``sum(slots * speed / base)``):

1. **Loopback.**  Every strategy (``lbclient.strategies`` names, or ``baseline_rr``: plain
   aiohttp cycling over the URLs, as ``_harness.py`` does) runs the same Poisson arrival
   schedule of ``--calls`` calls -- the one ``sim.run_oracle`` draws for seed ``--seed``,
   so the oracle below sees the very same arrivals -- against a fresh fleet in its *own
   process* (``_fleet_server.py``, so the replicas' CPU does not share the client's event
   loop or GIL), through a fresh ``aiohttp.ClientSession`` and a fresh
   ``lbclient.Balancer``: every run is a cold start, no warm-up.  Calls are open loop
   (each launched as its own task at its scheduled time) and latency is measured from the
   *scheduled* arrival (no coordinated omission).  A call that fails (e.g. the request
   timeout) counts as an infinitely slow one in the percentiles.

2. **Oracle.**  ``sim.run_oracle`` on a ``sim.Cell`` with the same base, slots, speeds,
   load and number of calls (stragglers off): an event simulation of the same fleet whose
   router knows every replica's queue and speed (not the service times drawn) and picks
   the earliest expected completion.  Its p99 on the runs' arrivals is the reference;
   the median over ``--oracle-seeds`` seeds is shown too (a 3000-call p99 moves +-10%
   with the schedule's bursts and lulls), and a 30,000-call p99 is in the JSON (a short
   run starting empty has a lower p99 than the steady state: compare like with like).
   The simulation has no HTTP, no event loop, no timer slack: a real router would pay
   those too, so the fleet's **fixed per-request overhead** is measured once per fleet
   on loopback -- ``--overhead-requests`` sequential requests at idle, cycling over the
   replicas, each one's latency minus the service time the replica drew (its
   ``x-service-time`` header); the median of that is the overhead.  The brief's formula,
   median latency minus the fleet's *mean* unloaded service time, is reported too, but
   is not used: the median of a mix of replicas of different speeds is far below the
   mean of their means (-8 ms on ``hetero``, where the real overhead is +2 ms), and even
   for one replica the lognormal's median is 3% below its mean.  **Ratios are p99 /
   (oracle p99 + overhead)**; the raw oracle is reported alongside.

3. **Simulated lbclient.**  For reference, ``sim.run_lbclient`` -- lbclient's real picking
   code on simulated time, on the oracle's seeds (same arrivals and service draws):
   ``sim x`` is the median over the seeds of its p99 / the oracle's.  A strategy whose
   loopback ratio is far above its ``sim x`` loses on something the simulation does not
   have (cold start, HTTP, event-loop lag, timers); one whose ``sim x`` is high loses on
   the picking itself.

Prints a table per fleet (load x strategy -> p99 ms and ratio) and a summary (worst ratio
over the loads; target <= 1.2x), writes ``picking.json`` (rewritten after every load
point) and ``picking.png`` (p99 / oracle vs load, per strategy and fleet) in ``--out``.
Every run has a watchdog (its last arrival + request timeout + slack), every fleet
process its own, and the whole script a hard deadline.  ``loadavg`` is recorded at the
start and end of the script and of every run: the numbers mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import math
import os
import random
import statistics
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
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

import _report
from _report import Progressor
from _harness import CHAT_PATH, PAYLOAD, OpenLoop, poisson_arrivals, quantile
from _fleet_process import FLEET_START_TIMEOUT, FleetProcess, hard_deadline, run_main
import lbclient
import sim
from lbclient.testing import ReplicaConfig

SIGMA = ReplicaConfig().sigma  # 0.25, the fleet's default lognormal shape
RUN_SLACK = 15.0  # watchdog: last arrival + request timeout + this
RUN_OVERHEAD_S = 1.5  # per run: fleet process start and close (for the estimate)
TARGET = 1.2  # the target: p99 <= 1.2x the oracle's
BASELINE = "baseline_rr"
DEFAULT_STRATEGIES = ("peak_ewma", "power_of_two", "least_response_time", "round_robin")
DEFAULT_LOADS = (0.5, 0.6, 0.7, 0.8, 0.85)


# ----------------------------------------------------------------------------- fleets


@dataclass(frozen=True)
class Fleet:
    name: str
    base: float  # seconds: mean service time at speed 1
    slots: int
    speeds: tuple[float, ...]
    note: str = ""

    @property
    def capacity(self) -> float:
        """Requests/s the fleet serves at 100% load."""
        return sum(self.slots * s / self.base for s in self.speeds)

    @property
    def mean_service(self) -> float:
        """Mean unloaded service time of a request sent to each replica in turn."""
        return statistics.fmean(self.base / s for s in self.speeds)

    @property
    def title(self) -> str:
        kind = (
            "homogeneous"
            if len(set(self.speeds)) == 1
            else "speeds " + "/".join(f"{s:g}" for s in self.speeds)
        )
        return (
            f"{len(self.speeds)} replicas x {self.slots} slot(s), base "
            f"{self.base * 1000:g} ms, {kind}, capacity {self.capacity:.0f} req/s"
        )

    def replicas(self) -> list[dict[str, Any]]:
        return [
            {"base_latency": self.base, "capacity": self.slots, "speed": s, "sigma": SIGMA}
            for s in self.speeds
        ]

    def sim_cell(self, load: float, calls: int) -> sim.Cell:
        return sim.Cell(
            base=self.base,
            slots=self.slots,
            speeds=self.speeds,
            straggler_rate=0.0,
            load=load,
            calls=calls,
            sigma=SIGMA,
        )


FLEETS = {
    f.name: f
    for f in (
        Fleet(
            "hetero",
            0.04,
            2,
            (1.0, 0.5, 0.8),
            "benchmarks/scenarios.py's hetero fleet: few replicas, 2x speed spread",
        ),
        Fleet(
            "homog6x4",
            0.08,
            4,
            (1.0,) * 6,
            "identical replicas, several slots each: queueing only (80 ms keeps the "
            "rate <= 255 req/s on a 2-core machine)",
        ),
        Fleet(
            "mixed10x1",
            0.04,
            1,
            (1.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2),
            "ten single-slot replicas, 5x speed spread",
        ),
    )
}

QUICK = {
    "fleets": ",".join(FLEETS),
    "loads": "0.5,0.85",
    "strategies": "peak_ewma,power_of_two",
    "calls": 200,
    "oracle_seeds": 3,
    "overhead_requests": 40,
}


# --------------------------------------------------------------------------- metrics


def summarize_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Percentiles in ms; ``inf`` (a failed call) sorts last and shows as ``None``."""
    v = sorted(x * 1000.0 for x in values_s)
    out: dict[str, float | None] = {}
    for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)):
        x = quantile(v, q)
        out[key] = None if x is None or math.isinf(x) else x
    finite = [x for x in v if not math.isinf(x)]
    out["max_ok"] = finite[-1] if finite else None
    out["mean_ok"] = statistics.fmean(finite) if finite else None
    return out


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# ------------------------------------------------------------------------- overhead


async def measure_overhead(fleet: Fleet, n: int, seed: int) -> dict[str, Any]:
    """``n`` sequential requests at idle, cycling over the replicas (after one unmeasured
    request per replica to open the connections): latency, and latency minus the service
    time the replica drew (``x-service-time``)."""
    loop = asyncio.get_running_loop()
    proc = FleetProcess(fleet.replicas(), seed, max_seconds=FLEET_START_TIMEOUT + 60 + n)
    lat: list[float] = []
    extra: list[float] = []
    try:
        urls = await proc.start()
        timeout = aiohttp.ClientTimeout(total=10.0)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        ) as session:
            for i in range(len(urls) + n):
                url = urls[i % len(urls)]
                t0 = loop.time()
                async with session.post(url + CHAT_PATH, json=PAYLOAD) as resp:
                    resp.raise_for_status()
                    await resp.read()
                    service = float(resp.headers["x-service-time"])
                dt = loop.time() - t0
                if i >= len(urls):
                    lat.append(dt)
                    extra.append(dt - service)
    finally:
        await proc.close()
    extra.sort()
    med_lat = statistics.median(lat)
    return {
        "requests": n,
        "overhead_ms": statistics.median(extra) * 1000,  # used for the adjusted oracle
        "overhead_p10_ms": (quantile(extra, 0.1) or 0.0) * 1000,
        "overhead_p90_ms": (quantile(extra, 0.9) or 0.0) * 1000,
        "overhead_max_ms": extra[-1] * 1000,
        "median_latency_ms": med_lat * 1000,
        "mean_unloaded_service_ms": fleet.mean_service * 1000,
        "overhead_brief_formula_ms": (med_lat - fleet.mean_service) * 1000,
    }


# ------------------------------------------------------------------------------- runs


async def run_one(
    fleet: Fleet,
    strategy: str,
    schedule: list[float],
    *,
    seed: int,
    request_timeout: float,
    prog: Progressor,
) -> dict[str, Any]:
    """One strategy at one load: fresh fleet process, session and Balancer."""
    loop = asyncio.get_running_loop()
    n = len(schedule)
    latency: list[float | None] = [None] * n
    errors: dict[str, int] = {}
    lags: list[float] = []
    calls = OpenLoop()
    budget = (schedule[-1] if schedule else 0.0) + request_timeout + RUN_SLACK
    lb_out: dict[str, Any] = {}
    load0 = loadavg()
    gc.collect()
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    proc = FleetProcess(fleet.replicas(), seed, max_seconds=budget + FLEET_START_TIMEOUT + 60)
    try:
        urls = await proc.start()
        before = await proc.stats()
        timeout = aiohttp.ClientTimeout(total=request_timeout)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=timeout
        ) as session:
            lb: lbclient.Balancer | None = None
            if strategy == BASELINE:
                cycle = itertools.cycle(urls)

                async def call() -> bytes:
                    async with session.post(next(cycle) + CHAT_PATH, json=PAYLOAD) as resp:
                        resp.raise_for_status()
                        return await resp.read()

            else:
                lb = lbclient.Balancer(urls, strategy=strategy, rng=seed)

                @lb.route
                async def call(endpoint: lbclient.Endpoint) -> bytes:
                    async with session.post(endpoint.url + CHAT_PATH, json=PAYLOAD) as resp:
                        resp.raise_for_status()
                        return await resp.read()

            origin = loop.time() + 0.05
            scheduled = [origin + at for at in schedule]

            async def one(i: int) -> None:
                try:
                    await call()
                    latency[i] = loop.time() - scheduled[i]
                except asyncio.CancelledError:
                    errors["cancelled by the run watchdog"] = (
                        errors.get("cancelled by the run watchdog", 0) + 1
                    )
                    raise
                except Exception as exc:  # a failed call is a data point
                    name = (
                        f"HTTP {exc.status}"
                        if isinstance(exc, aiohttp.ClientResponseError)
                        else type(exc).__name__
                    )
                    errors[name] = errors.get(name, 0) + 1
                finally:
                    prog.done += 1

            async def lag_sampler() -> None:
                period = 0.05
                while True:
                    t = loop.time()
                    await asyncio.sleep(period)
                    lags.append(max(0.0, loop.time() - t - period))

            side = loop.create_task(lag_sampler())
            try:
                await calls.run(
                    schedule, origin, lambda i, _when: one(i), budget=budget, side=[side]
                )
            finally:
                if lb is not None:
                    st = lb.stats()
                    lb_out = {
                        "calls": st.calls,
                        "calls_failed": st.calls_failed,
                        "requests_per_endpoint": [e.requests for e in st.endpoints],
                        "latency_ewma_ms_final": [
                            getattr(e, "latency_ewma_ms", None) for e in st.endpoints
                        ],
                    }
                    await lb.aclose()
        after = await proc.stats()
    finally:
        await proc.close()
    received = [
        a["received"] - b.get("received", 0)
        for a, b in zip(after["counters"], before["counters"], strict=True)
    ]
    lat_s = [math.inf if x is None else x for x in latency]
    ok = sum(1 for x in latency if x is not None)
    lags.sort()
    total = sum(received) or 1
    return {
        "strategy": strategy,
        "calls": n,
        "launched": len(calls.tasks),
        "ok": ok,
        "success_pct": 100.0 * ok / n if n else 0.0,
        "errors": errors,
        "latency_ms": summarize_ms(lat_s),
        "share_pct": [100.0 * r / total for r in received],
        "fleet_received": received,
        "lb": lb_out,
        "loop_lag_ms": {
            "p99": (quantile(lags, 0.99) or 0.0) * 1000 if lags else None,
            "max": lags[-1] * 1000 if lags else None,
        },
        "late_launch_ms_max": calls.late * 1000,
        "client_cpu_s": time.process_time() - cpu0,
        "fleet_cpu_s": after["cpu_s"] - before["cpu_s"],
        "wall_s": time.perf_counter() - wall0,
        "timed_out": calls.timed_out,
        "loadavg_at_start": load0,
        "loadavg_at_end": loadavg(),
    }


# ----------------------------------------------------------------------- simulations


def schedule_for(fleet: Fleet, load: float, calls: int, seed: int) -> tuple[list[float], str]:
    """The loopback runs' arrival schedule: the very arrivals ``sim.run_oracle(cell,
    seed=seed)`` sees (``sim._workload(cell, seed + 1)``), so the oracle is paired with
    the runs -- in a 3000-call run, a Poisson burst or lull moves p99 by +-10%, as much as
    the differences being measured.  Falls back to an own Poisson draw if ``sim.py``'s
    private helper is gone."""
    cell = fleet.sim_cell(load, calls)
    try:
        arr, _ = sim._workload(cell, seed + 1)
        if len(arr) == calls:
            return list(arr), "sim._workload (paired with the oracle)"
    except Exception:  # a private helper: may change under us
        pass
    rng = random.Random(f"{seed}:{fleet.name}:{load}:arrivals")
    schedule = poisson_arrivals(load * fleet.capacity, calls, rng)
    return schedule, "own Poisson draw (oracle not paired)"


def oracle_point(fleet: Fleet, load: float, calls: int, seeds: int, seed: int) -> dict[str, Any]:
    """``sim.run_oracle`` p99 for seeds ``seed .. seed + seeds - 1``; the first has the
    loopback runs' arrivals (see :func:`schedule_for`)."""
    p99s = []
    for s in range(seed, seed + seeds):
        r = sim.run_oracle(fleet.sim_cell(load, calls), seed=s)
        p99s.append(quantile(sorted(r.latencies), 0.99) or 0.0)
    long = sim.run_oracle(fleet.sim_cell(load, max(calls, 30000)), seed=seed + 1000)
    return {
        "p99_ms": p99s[0] * 1000,  # same arrivals as the loopback runs
        "p99_ms_median_of_seeds": statistics.median(p99s) * 1000,
        "p99_ms_per_seed": [x * 1000 for x in p99s],
        "seeds": list(range(seed, seed + seeds)),
        "p99_ms_30k_calls": (quantile(sorted(long.latencies), 0.99) or 0.0) * 1000,
        "p50_ms_30k_calls": (quantile(sorted(long.latencies), 0.5) or 0.0) * 1000,
    }


def sim_point(
    fleet: Fleet, load: float, calls: int, oracle: dict[str, Any], strategy: str
) -> dict[str, Any]:
    """lbclient's picking on simulated time, on the oracle's seeds (same arrivals and
    service draws as the oracle, seed by seed): p99 (ms) of the first seed and the median
    over the seeds of p99 / oracle p99 (``baseline_rr`` is ``round_robin`` there: the
    simulation has no HTTP client of its own)."""
    strat = "round_robin" if strategy == BASELINE else strategy
    p99s = []
    for s in oracle["seeds"]:
        r = sim.run_lbclient(fleet.sim_cell(load, calls), strategy=strat, seed=s)
        p99s.append((quantile(sorted(r.latencies), 0.99) or 0.0) * 1000)
    ratios = [a / b for a, b in zip(p99s, oracle["p99_ms_per_seed"], strict=True)]
    return {"p99_ms_per_seed": p99s, "ratio": statistics.median(ratios), "ratios": ratios}


# ---------------------------------------------------------------------------- output


def _style_ratio(x: float | None) -> str:
    if x is None:
        return "[red]failed[/red]"
    color = "green" if x <= TARGET else "yellow" if x <= 1.5 else "red"
    return f"[{color}]{x:.2f}x[/{color}]"


def fleet_table(fr: dict[str, Any], strategies: Sequence[str]) -> Table:
    ov = fr["overhead"]
    t = Table(
        title=f"[b]{fr['name']}[/b]: {fr['title']}; loopback overhead "
        f"{ov['overhead_ms']:.2f} ms (p10-p90 {ov['overhead_p10_ms']:.2f}-"
        f"{ov['overhead_p90_ms']:.2f}; median latency - mean service: "
        f"{ov['overhead_brief_formula_ms']:.2f} ms)",
        title_justify="left",
        caption="cells: loopback p99 ms and its ratio to the oracle + overhead "
        f"(green <= {TARGET}x); 'sim': lbclient's picking on simulated time / raw oracle",
        caption_justify="left",
        min_width=120,
    )
    t.add_column("load", justify="right")
    t.add_column("req/s", justify="right")
    t.add_column("oracle p99\nraw / +ovh\n(seeds' median)", justify="right")
    for s in strategies:
        t.add_column(s, justify="right")
    t.add_column("lag p99 ms\n(max run)", justify="right")
    t.add_column("loadavg", justify="right")
    for pt in fr["loads"]:
        o = pt["oracle"]
        row = [
            f"{pt['load'] * 100:.0f}%",
            f"{pt['rate_rps']:.1f}",
            f"{o['p99_ms']:.1f} / {o['p99_adjusted_ms']:.1f}\n"
            f"[dim]({o['p99_ms_median_of_seeds']:.1f})[/dim]",
        ]
        lags = []
        for s in strategies:
            r = pt["runs"].get(s)
            if r is None:
                row.append(f"[red]{pt.get('failures', {}).get(s, 'not run')}[/red]")
                continue
            p99 = r["latency_ms"]["p99"]
            cell = "failed" if p99 is None else f"{p99:.0f} ms {_style_ratio(r['ratio'])}"
            if r["success_pct"] < 100:
                cell += f" [red]({r['success_pct']:.1f}% ok)[/red]"
            if r["timed_out"]:
                cell += " [red]TIMEOUT[/red]"
            sx = pt["sim"].get(s, {}).get("ratio")
            if sx is not None:
                cell += f"\n[dim]sim {sx:.2f}x[/dim]"
            elif "error" in pt["sim"].get(s, {}):
                cell += "\n[dim]sim failed[/dim]"
            row.append(cell)
            if r["loop_lag_ms"]["p99"] is not None:
                lags.append(r["loop_lag_ms"]["p99"])
        row.append(f"{max(lags):.1f}" if lags else "-")
        la = pt.get("loadavg_at_start")
        row.append("-" if la is None else f"{la[0]:.2f}")
        t.add_row(*row)
    return t


def summary_table(fleets: Sequence[dict[str, Any]], strategies: Sequence[str]) -> Table:
    t = Table(
        min_width=100,
        title=f"[b]worst p99 / oracle over the loads[/b] (target <= {TARGET}x at every load; "
        "oracle = sim.run_oracle p99 + measured loopback overhead)",
        title_justify="left",
    )
    t.add_column("fleet")
    for s in strategies:
        t.add_column(s, justify="right")
    for fr in fleets:
        row = [fr["name"]]
        for s in strategies:
            w = fr["summary"].get(s, {})
            worst = w.get("worst_ratio")
            if worst is None:
                row.append("-")
            else:
                row.append(f"{_style_ratio(worst)} @ {w['worst_load'] * 100:.0f}%")
        t.add_row(*row)
    return t


PLOT_CAP = 3.0  # ratios above are drawn at the top edge, with their value


def plot(path: Path, fleets: Sequence[dict[str, Any]], strategies: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(fleets), figsize=(5.4 * len(fleets), 4.6), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, fr in zip(axes[0], fleets, strict=True):
        loads = [pt["load"] * 100 for pt in fr["loads"]]
        top = TARGET
        for k, s in enumerate(strategies):
            c = colors[k % len(colors)]
            for key, style, kw in (
                ("runs", "o-", {"label": s}),
                ("sim", ":", {"alpha": 0.6}),
            ):
                pts = [
                    (x, pt[key].get(s, {}).get("ratio"))
                    for x, pt in zip(loads, fr["loads"], strict=True)
                ]
                pts = [(x, y) for x, y in pts if y is not None]
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                ys = [min(y, PLOT_CAP) for _, y in pts]
                top = max(top, *ys)
                ax.plot(xs, ys, style, color=c, **kw)
                if key == "runs":
                    for x, y in pts:
                        if y > PLOT_CAP:
                            ax.plot([x], [PLOT_CAP], "^", color=c, ms=9)
                            ax.annotate(
                                f"{y:.0f}x",
                                (x, PLOT_CAP),
                                textcoords="offset points",
                                xytext=(0, -14),
                                ha="center",
                                fontsize=7,
                                color=c,
                            )
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(TARGET, color="green", lw=0.8, ls="--", label=f"target {TARGET}x")
        ax.set_ylim(0.8, max(1.5, top * 1.08))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.set_title(f"{fr['name']}\n" + "\n".join(textwrap.wrap(fr["title"], 60)), fontsize=8)
        ax.set_xlabel("load, % of capacity")
        ax.set_ylabel("p99 / (oracle p99 + loopback overhead)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = (
        "lbclient picking vs the oracle: loopback (solid), lbclient simulated (dotted); "
        f"^ = off scale (> {PLOT_CAP:g}x)"
    )
    fig.suptitle("\n".join(textwrap.wrap(title, 70 * len(fleets))), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="lbclient strategies' p99 on loopback as a multiple of an oracle's "
        "(sim.run_oracle + the measured loopback overhead), per fleet and load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()),
    )
    p.add_argument("--fleets", default=None, help=f"comma-separated, of {','.join(FLEETS)}")
    p.add_argument("--loads", default=None, help="fractions of capacity (default 0.5..0.85)")
    p.add_argument(
        "--strategies",
        default=None,
        help=f"lbclient strategy names and/or {BASELINE} (default {','.join(DEFAULT_STRATEGIES)})",
    )
    p.add_argument("--calls", type=int, default=None, help="calls per run (default 3000)")
    p.add_argument("--oracle-seeds", type=int, default=None, help="seeds (default 5)")
    p.add_argument(
        "--overhead-requests", type=int, default=None, help="sequential idle requests (default 100)"
    )
    p.add_argument("--seed", type=int, default=1, help="seed of arrivals, fleets, balancers")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="hard deadline (default 2x estimate + 5 min)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    q = QUICK if args.quick else {}
    fleets = args.fleets or q.get("fleets") or ",".join(FLEETS)
    loads = args.loads or q.get("loads") or ",".join(map(str, DEFAULT_LOADS))
    strategies = args.strategies or q.get("strategies") or ",".join(DEFAULT_STRATEGIES)
    args.calls = args.calls or q.get("calls") or 3000
    args.oracle_seeds = args.oracle_seeds or q.get("oracle_seeds") or 5
    args.overhead_requests = args.overhead_requests or q.get("overhead_requests") or 100
    try:
        args.fleet_list = [FLEETS[x.strip()] for x in str(fleets).split(",") if x.strip()]
    except KeyError as exc:
        p.error(f"unknown fleet {exc}: choose from {', '.join(FLEETS)}")
    try:
        args.load_list = [float(x) for x in str(loads).split(",") if x.strip()]
    except ValueError:
        p.error(f"bad --loads {loads!r}")
    if not args.load_list or not all(0 < x < 1.5 for x in args.load_list):
        p.error("--loads: fractions of capacity in (0, 1.5)")
    args.strategy_list = [x.strip() for x in str(strategies).split(",") if x.strip()]
    known = set(lbclient.strategies.names()) | {BASELINE}
    bad = [x for x in args.strategy_list if x not in known]
    if bad or not args.strategy_list:
        p.error(f"unknown strategies {bad}: choose from {', '.join(sorted(known))}")
    if args.calls < 10:
        p.error("--calls must be >= 10")
    return args


def estimate_seconds(args: argparse.Namespace) -> float:
    total = 0.0
    for f in args.fleet_list:
        total += 3.0 + args.overhead_requests * (f.mean_service + 0.003)
        for load in args.load_list:
            total += len(args.strategy_list) * (args.calls / (load * f.capacity) + RUN_OVERHEAD_S)
    return total


def plan_table(args: argparse.Namespace) -> Table:
    t = Table(title="[b]plan[/b]", title_justify="left")
    for col in ("fleet", "title", "loads -> req/s", "schedule s per run"):
        t.add_column(col)
    for f in args.fleet_list:
        t.add_row(
            f.name,
            f.title,
            ", ".join(f"{x * 100:g}%->{x * f.capacity:.0f}" for x in args.load_list),
            ", ".join(f"{args.calls / (x * f.capacity):.0f}" for x in args.load_list),
        )
    return t


def summarize_fleet(fr: dict[str, Any], strategies: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in strategies:
        pts = [
            (pt["runs"][s]["ratio"], pt["load"])
            for pt in fr["loads"]
            if s in pt["runs"] and pt["runs"][s]["ratio"] is not None
        ]
        failed = [
            pt["load"] for pt in fr["loads"] if s in pt["runs"] and pt["runs"][s]["ratio"] is None
        ]
        if failed:
            out[s] = {"worst_ratio": None, "worst_load": failed[0], "failed_loads": failed}
        elif pts:
            worst = max(pts)
            out[s] = {
                "worst_ratio": worst[0],
                "worst_load": worst[1],
                "target_met": all(r <= TARGET for r, _ in pts),
                "ratios": {f"{ld:g}": r for r, ld in pts},
            }
    return out


async def main_async(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    estimate = estimate_seconds(args)
    info = _report.machine_info() | {"lbclient_sources_sha256": _report.lbclient_sources_sha256()}
    console.print(
        f"[b]lbclient picking vs the oracle[/b] -- {len(args.fleet_list)} fleet(s) x "
        f"{len(args.load_list)} load(s) x {len(args.strategy_list)} strategies, {args.calls} "
        f"calls per run, cold starts; {info['cpu_count']} CPU(s), Python "
        f"{sys.version.split()[0]}, load average {loadavg()}; estimated {estimate / 60:.1f} min"
    )
    if args.list:
        console.print(plan_table(args))
        return 0
    deadline = args.max_minutes * 60 if args.max_minutes else 2 * estimate + 300
    timer = hard_deadline(deadline, console, "picking.py")
    started = time.perf_counter()
    out: dict[str, Any] = {
        "machine": info,
        "loadavg_at_start": loadavg(),
        "args": {
            k: str(v)
            for k, v in vars(args).items()
            if k not in ("fleet_list", "load_list", "strategy_list")
        }
        | {
            "fleets": [f.name for f in args.fleet_list],
            "loads": args.load_list,
            "strategies": args.strategy_list,
        },
        "definitions": {
            "latency": "ms from the call's scheduled (Poisson) arrival to its answer; a failed "
            "call counts as infinitely slow (a percentile it lands on is null)",
            "oracle.p99_ms": "sim.run_oracle's p99 for a sim.Cell with the fleet's "
            "base/slots/speeds, the load, --calls calls, no stragglers, seed --seed: the "
            "very arrival times the loopback runs used (sim._workload), its own service "
            "draws (the router knows every queue and speed, picks the earliest expected "
            "completion; no HTTP, no event loop)",
            "oracle.p99_ms_median_of_seeds": "the same, median over --oracle-seeds seeds "
            "(--seed, --seed + 1, ...): how much one schedule's luck moves it",
            "oracle.p99_ms_30k_calls": "the same, one 30,000-call run (finite-sample check)",
            "overhead.overhead_ms": "median over --overhead-requests sequential idle requests "
            "(cycling over the replicas) of latency minus the service time the replica drew "
            "(x-service-time): HTTP, both event loops, timer slack",
            "overhead.overhead_brief_formula_ms": "median latency of the same requests minus "
            "the fleet's mean unloaded service time (under-reads by ~3% of the service time: "
            "the lognormal's median is exp(-sigma^2/2) x its mean)",
            "oracle.p99_adjusted_ms": "oracle.p99_ms + overhead.overhead_ms",
            "ratio": "loopback p99 / oracle.p99_adjusted_ms",
            "ratio_oracle_median_of_seeds": "loopback p99 / (oracle.p99_ms_median_of_seeds "
            "+ overhead)",
            "sim.ratio": "median over the oracle's seeds of sim.run_lbclient p99 (lbclient's "
            "picking on simulated time, same arrivals and service draws as the oracle of "
            "that seed; baseline_rr -> round_robin) / oracle p99",
            "loop_lag_ms": "overshoot of a 50 ms asyncio.sleep in the client, sampled",
            "share_pct": "share of the requests each replica received",
        },
        "target": f"p99 <= {TARGET}x the oracle's at every load",
        "fleets": [],
    }
    path = args.out / "picking.json"
    per_fleet = len(args.load_list) * len(args.strategy_list) * args.calls
    total = len(args.fleet_list) * per_fleet
    async with _report.call_progress(console, total) as (progress, bar, prog):
        for fi, fleet in enumerate(args.fleet_list):
            progress.update(bar, description=f"{fleet.name}: overhead at idle")
            overhead = await measure_overhead(fleet, args.overhead_requests, args.seed)
            fr: dict[str, Any] = {
                "name": fleet.name,
                "title": fleet.title,
                "note": fleet.note,
                "config": {
                    "base_latency_s": fleet.base,
                    "slots": fleet.slots,
                    "speeds": list(fleet.speeds),
                    "sigma": SIGMA,
                    "replicas": fleet.replicas(),
                },
                "capacity_rps": fleet.capacity,
                "overhead": overhead,
                "loads": [],
            }
            out["fleets"].append(fr)
            ovh = overhead["overhead_ms"]
            for load in args.load_list:
                rate = load * fleet.capacity
                progress.update(bar, description=f"{fleet.name} {load:.0%}: oracle")
                oracle = oracle_point(fleet, load, args.calls, args.oracle_seeds, args.seed)
                oracle["p99_adjusted_ms"] = oracle["p99_ms"] + ovh
                sims: dict[str, Any] = {}
                for s in args.strategy_list:
                    try:
                        sims[s] = sim_point(fleet, load, args.calls, oracle, s)
                    except Exception as exc:  # the reference only: the run goes on
                        sims[s] = {"error": f"{type(exc).__name__}: {exc}"}
                        continue
                schedule, schedule_source = schedule_for(fleet, load, args.calls, args.seed)
                pt: dict[str, Any] = {
                    "load": load,
                    "rate_rps": rate,
                    "schedule_s": schedule[-1],
                    "schedule_source": schedule_source,
                    "oracle": oracle,
                    "sim": sims,
                    "runs": {},
                    "failures": {},
                    "loadavg_at_start": loadavg(),
                }
                fr["loads"].append(pt)
                for s in args.strategy_list:
                    progress.update(
                        bar,
                        description=f"[{fi + 1}/{len(args.fleet_list)}] "
                        f"{fleet.name} {load:.0%}: {s}",
                    )
                    done0 = prog.done
                    try:
                        r = await run_one(
                            fleet,
                            s,
                            schedule,
                            seed=args.seed,
                            request_timeout=args.request_timeout,
                            prog=prog,
                        )
                    except Exception as exc:  # a broken run is reported, the rest goes on
                        pt["failures"][s] = f"{type(exc).__name__}: {exc}"
                        prog.done = done0 + args.calls
                        continue
                    p99 = r["latency_ms"]["p99"]
                    r["ratio"] = None if p99 is None else p99 / oracle["p99_adjusted_ms"]
                    r["ratio_raw_oracle"] = None if p99 is None else p99 / oracle["p99_ms"]
                    r["ratio_oracle_median_of_seeds"] = (
                        None if p99 is None else p99 / (oracle["p99_ms_median_of_seeds"] + ovh)
                    )
                    pt["runs"][s] = r
                pt["loadavg_at_end"] = loadavg()
                fr["summary"] = summarize_fleet(fr, args.strategy_list)
                out["wall_seconds"] = time.perf_counter() - started
                out["loadavg_at_end"] = loadavg()
                _report.write_json(path, out)
            progress.console.print(fleet_table(fr, args.strategy_list))
    timer.cancel()
    console.print(summary_table(out["fleets"], args.strategy_list))
    out["wall_seconds"] = time.perf_counter() - started
    out["loadavg_at_end"] = loadavg()
    _report.write_json(path, out)
    msg = f"wrote {path}"
    if not args.no_plot:
        try:
            png = args.out / "picking.png"
            plot(png, out["fleets"], args.strategy_list)
            msg += f" and {png}"
        except ImportError:
            msg += " (no plot: pip install matplotlib)"
    console.print(
        f"{msg} in {out['wall_seconds']:.0f} s; load average {out['loadavg_at_start']} at "
        f"start, {out['loadavg_at_end']} at the end"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
