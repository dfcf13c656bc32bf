"""Fleet scale: several client processes, each its own lbclient, sharing what they learn
through a real Redis (``shared=lbclient.RedisState(...)``) -- against per-process state.

::

    python benchmarks/fleet_shared.py            # three scenarios, ~2 minutes
    python benchmarks/fleet_shared.py --quick    # shorter runs, ~1 minute
    python benchmarks/fleet_shared.py --scenarios quota --duration 10

Every run starts a real ``redis-server`` (``lbclient.testing.RedisServer``: a free
loopback port, no persistence), one :class:`lbclient.testing.ReplicaFleet` in its own
process (``_fleet_server.py``) and ``--processes`` client processes (multiprocessing,
*spawn*, kept across runs): for each run each builds a fresh ``Balancer`` (and
``RedisState``, in a namespace of its own), waits until every process is ready, then offers ``--rate`` calls/s (open loop, Poisson, seeded per
process) for ``--duration`` seconds.  The parent switches faults on at their times
(a replica failing, ``kill -9`` of redis-server and its restart on the same port).

Scenarios (each beside its baseline):

* ``quota`` -- one tenant, ``Quota(requests_per_second=100)``, 4 x 60 calls/s offered.
  Shared: the fleet admits ~100/s (leases); per-process quotas admit all 240/s.
* ``ejection`` -- replica 0 starts answering 500 at t=2 s (``round_robin`` + ``Retry()``
  + ``Breaker()``, so ejection is the breaker's job).  Failed attempts on it across the
  processes until every breaker is open, and when each process stopped sending,
  against one process alone and 4 processes each learning alone; ``peak_ewma`` rows too.
* ``redis_killed`` -- the quota scenario; redis-server is killed (SIGKILL) at 1/3 of
  the run and started again (empty) at 2/3: calls failed (other than quota refusals),
  admitted total against the quota, and how long until every process is connected
  with the full peer count again.

Results: a table, ``fleet_shared.json`` (figures and targets), ``fleet_shared_raw.json``
(every call and attempt of every run) and ``fleet_shared.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

PAYLOAD = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
TENANT = "acme"


# ------------------------------------------------------------------------ the clients


async def _client(spec: dict[str, Any], conn: Any) -> dict[str, Any]:
    import aiohttp

    import lbclient

    urls: list[str] = spec["urls"]
    bad = urls[0]
    events: list[list[Any]] = []

    def on_event(ev: lbclient.Event) -> None:
        if isinstance(ev, lbclient.BreakerEvent) and ev.url == bad:
            events.append([time.time(), "breaker", ev.old, ev.new, ev.reason])
        elif isinstance(ev, lbclient.FleetEvent):
            events.append([time.time(), "fleet", ev.action, ev.url, ev.reason])

    shared = None
    if spec["shared"]:
        shared = lbclient.RedisState(
            spec["redis"], namespace=spec["namespace"], expected_peers=spec["processes"]
        )
    admission = None
    if spec["quota"]:
        admission = lbclient.Admission(
            limit=1000,
            max_wait=1.0,
            quotas={"*": lbclient.Quota(requests_per_second=spec["quota"])},
        )
    lb = lbclient.Balancer(
        urls,
        strategy=spec["strategy"],
        retry=lbclient.Retry(attempts=3),
        breaker=lbclient.Breaker(),
        admission=admission,
        shared=shared,
        on_event=on_event,
        rng=spec["seed"],
    )
    attempts: list[list[Any]] = []  # [t, replica index, status (0: no answer)]
    outcomes: list[list[Any]] = []  # [t scheduled, "ok" | "quota" | error type]
    samples: list[list[Any]] = []  # [t, mode, peers, leasing]
    start_at = 0.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10)
    ) as http:

        async def send(endpoint: lbclient.Endpoint) -> bytes:
            t = time.time() - start_at
            i = urls.index(endpoint.url)
            try:
                async with http.post(endpoint.url + "/v1/chat/completions", json=PAYLOAD) as r:
                    attempts.append([t, i, r.status])
                    r.raise_for_status()
                    return await r.read()
            except aiohttp.ClientResponseError:
                raise
            except Exception:
                attempts.append([t, i, 0])
                raise

        route = lb.route(tenant=lambda: TENANT)(send) if admission else lb.route(send)

        async def sample() -> None:
            while True:
                st = lb.stats().shared
                if st is not None:
                    leasing = all(q.leasing for q in st.quotas) if st.quotas else None
                    samples.append([time.time() - start_at, st.mode, st.peers, leasing])
                await asyncio.sleep(0.05)

        await lb.start()
        deadline = time.monotonic() + 10
        while shared is not None and time.monotonic() < deadline:
            st = lb.stats().shared
            if st is not None and st.mode == "connected":
                break
            await asyncio.sleep(0.02)
        loop = asyncio.get_running_loop()
        conn.send({"ready": os.getpid()})
        start_at = await loop.run_in_executor(None, conn.recv)
        sampler = asyncio.create_task(sample())
        rng = random.Random(spec["seed"])
        arrivals: list[float] = []
        t = rng.expovariate(spec["rate"])
        while t < spec["duration"]:
            arrivals.append(t)
            t += rng.expovariate(spec["rate"])

        async def one(at: float) -> None:
            try:
                await route()
                outcomes.append([at, "ok"])
            except lbclient.QuotaExceeded:
                outcomes.append([at, "quota"])
            except Exception as exc:
                outcomes.append([at, type(exc).__name__])

        tasks = []
        for at in arrivals:
            delay = start_at + at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(at)))
        await asyncio.gather(*tasks)
        sampler.cancel()
        stats = lb.stats()
        await lb.aclose()
    for ev in events:
        ev[0] -= start_at
    return {
        "index": spec["index"],
        "outcomes": outcomes,
        "attempts": attempts,
        "events": events,
        "samples": samples,
        "shared": None if stats.shared is None else stats.shared.to_dict(),
    }


def worker_main(conn: Any) -> None:
    """A client process: runs one client per spec it receives (a fresh Balancer and
    RedisState each time) until told to quit.  Kept across runs: importing lbclient,
    aiohttp and redis-py once saves seconds per run."""
    import logging

    logging.getLogger("lbclient").setLevel(logging.ERROR)  # events are recorded, not logged
    while True:
        spec = conn.recv()
        if spec is None:
            return
        try:
            result = asyncio.run(_client(spec, conn))
        except BaseException as exc:  # report, never hang the parent
            conn.send({"error": f"{type(exc).__name__}: {exc}"})
            continue
        conn.send(result)


# ------------------------------------------------------------------------ the parent


class Fleet:
    """``_fleet_server.py`` in a child process."""

    def __init__(self, replicas: int, seed: int) -> None:
        spec = {
            "replicas": [{"base_latency": 0.02, "sigma": 0.2, "capacity": 8}] * replicas,
            "seed": seed,
            "max_seconds": 900,
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_fleet_server.py"), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.urls: list[str] = json.loads(self.proc.stdout.readline())["urls"]

    def command(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def set(self, index: int, **fields: Any) -> None:
        self.command("set " + json.dumps({"index": index, "fields": fields}))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Workers:
    """``n`` client processes (multiprocessing, spawn), reused by every run."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs = []
        self.conns = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child,), daemon=True)
            p.start()
            self.procs.append(p)
            self.conns.append(parent)

    def recv(self, i: int, timeout: float, label: str) -> dict[str, Any]:
        conn = self.conns[i]
        if not conn.poll(timeout):
            raise RuntimeError(f"{label}: client process {i} gave no answer in {timeout:g} s")
        try:
            msg: dict[str, Any] = conn.recv()
        except EOFError:
            raise RuntimeError(f"{label}: client process {i} died") from None
        if "error" in msg:
            raise RuntimeError(f"{label}: client {i} failed: {msg['error']}")
        return msg

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


def run(
    *,
    label: str,
    processes: int,
    shared: bool,
    strategy: str,
    quota: float | None,
    rate: float,
    duration: float,
    faults: list[tuple[float, str]],
    redis: Any,
    fleet: Fleet,
    workers: Workers,
    seed: int,
) -> dict[str, Any]:
    """One run: ``processes`` clients, faults at their times; the clients' raw results."""
    for i in range(len(fleet.urls)):
        fleet.set(i, error_rate=0.0)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    for i in range(processes):
        workers.conns[i].send(
            {
                "index": i,
                "urls": fleet.urls,
                "redis": redis.url,
                "namespace": namespace,
                "shared": shared,
                "processes": processes,
                "strategy": strategy,
                "quota": quota,
                "rate": rate,
                "duration": duration,
                "seed": seed * 1000 + i,
            }
        )
    try:
        for i in range(processes):
            workers.recv(i, 60, label)  # ready: connected, routes built
        start_at = time.time() + 0.3
        for i in range(processes):
            workers.conns[i].send(start_at)
        for at, action in sorted(faults):
            delay = start_at + at - time.time()
            if delay > 0:
                time.sleep(delay)
            if action == "replica_fails":
                fleet.set(0, error_rate=1.0)
            elif action == "redis_kill":
                redis.kill()
            elif action == "redis_start":
                redis.start()
        results = [workers.recv(i, duration + 60, label) for i in range(processes)]
    finally:
        if not redis.running:
            redis.start()
    return {
        "label": label,
        "processes": processes,
        "shared": shared,
        "strategy": strategy,
        "quota": quota,
        "rate": rate,
        "duration": duration,
        "faults": faults,
        "clients": results,
    }


# ------------------------------------------------------------------------ analysis


def per_second(r: dict[str, Any], outcome: str = "ok") -> list[list[int]]:
    """Per process, calls with ``outcome`` per second of the run."""
    n = int(r["duration"]) + 1
    out = []
    for c in r["clients"]:
        counts = [0] * n
        for at, what in c["outcomes"]:
            if what == outcome:
                counts[min(n - 1, int(at))] += 1
        out.append(counts)
    return out


def quota_figures(r: dict[str, Any], warm: float) -> dict[str, Any]:
    dur = r["duration"]
    admitted = [sum(1 for at, w in c["outcomes"] if w == "ok") for c in r["clients"]]
    steady = [sum(1 for at, w in c["outcomes"] if w == "ok" and at >= warm) for c in r["clients"]]
    errors = sum(1 for c in r["clients"] for at, w in c["outcomes"] if w not in ("ok", "quota"))
    offered = sum(len(c["outcomes"]) for c in r["clients"])
    total_steady = sum(steady) / (dur - warm)
    return {
        "offered_per_s": offered / dur,
        "admitted_per_s": sum(admitted) / dur,
        "admitted_per_s_steady": total_steady,
        "steady_from_s": warm,
        "shares_pct": [100.0 * a / max(1, sum(steady)) for a in steady],
        "failed_calls": errors,
    }


def ejection_figures(r: dict[str, Any], fault_at: float, window: float) -> dict[str, Any]:
    """Failed attempts on replica 0 from the fault until ``window`` s after the first
    ejection (before any cooldown ends), when each process ejected it, and the last
    attempt each process sent it before its cooldown ended."""
    opens: list[float | None] = []
    for c in r["clients"]:
        t_open = None
        for ev in c["events"]:
            if ev[1] == "breaker" and ev[3] == "open" and ev[0] >= fault_at:
                t_open = ev[0]
                break
        opens.append(t_open)
    seen = [t for t in opens if t is not None]
    first = min(seen) if seen else None
    end = (first if first is not None else r["duration"]) + window
    failed = []
    failed_all = 0
    last_sent = []
    for c in r["clients"]:
        bad = [a for a in c["attempts"] if a[1] == 0 and fault_at <= a[0] <= end]
        failed.append(sum(1 for a in bad if a[2] >= 500 or a[2] == 0))
        last_sent.append(max((a[0] for a in bad), default=None))
        failed_all += sum(
            1
            for a in c["attempts"]
            if a[1] == 0 and a[0] >= fault_at and (a[2] >= 500 or a[2] == 0)
        )
    errors = sum(1 for c in r["clients"] for _, w in c["outcomes"] if w != "ok")
    return {
        "failed_attempts": sum(failed),
        "failed_by_process": failed,
        "failed_attempts_to_the_end": failed_all,  # probes after the cooldowns included
        "first_ejection_s": None if first is None else first - fault_at,
        "ejected_after_first_s": [None if t is None or first is None else t - first for t in opens],
        "all_ejected_within_s": None
        if first is None or None in opens
        else max(t for t in opens if t is not None) - first,
        "last_sent_after_first_s": [
            None if t is None or first is None else t - first for t in last_sent
        ],
        "failed_calls": errors,
    }


def merge_ejections(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several repeats of one ejection run: the mean failed attempts, the worst spread."""
    failed = [r["failed_attempts"] for r in runs]
    within = [r["all_ejected_within_s"] for r in runs]
    to_end = [r["failed_attempts_to_the_end"] for r in runs]
    return {
        "failed_attempts": sum(failed) / len(failed),
        "failed_attempts_each": failed,
        "failed_attempts_to_the_end": sum(to_end) / len(to_end),
        "failed_attempts_to_the_end_each": to_end,
        "all_ejected_within_s": None if None in within else max(within),
        "first_ejection_s": [r["first_ejection_s"] for r in runs],
        "failed_calls": sum(r["failed_calls"] for r in runs),
        "repeats": runs,
    }


def redis_figures(r: dict[str, Any], kill_at: float, start_at: float) -> dict[str, Any]:
    q = quota_figures(r, min(2.0, kill_at))
    # Convergence: the first sample after the restart from which every process is
    # connected, counts every peer and leases again.
    procs = len(r["clients"])
    ok_since: list[float | None] = []
    degraded_after: list[float | None] = []
    for c in r["clients"]:
        since = None
        for t, mode, peers, leasing in c["samples"]:
            if t < start_at:
                continue
            good = mode == "connected" and peers == procs and leasing is not False
            if good and since is None:
                since = t
            elif not good:
                since = None
        ok_since.append(since)
        gone = next(
            (t for t, mode, *_ in c["samples"] if t >= kill_at and mode == "degraded"), None
        )
        degraded_after.append(None if gone is None else gone - kill_at)
    outage = [
        sum(1 for at, w in c["outcomes"] if w == "ok" and kill_at <= at < start_at)
        for c in r["clients"]
    ]
    converged = None if None in ok_since else max(t for t in ok_since if t is not None) - start_at
    return {
        **q,
        "admitted_per_s_during_outage": sum(outage) / (start_at - kill_at),
        "degraded_after_kill_s": degraded_after,
        "converged_after_restart_s": converged,
    }


# ------------------------------------------------------------------------ report


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    panels = [k for k in ("quota", "ejection", "redis_killed") if k in runs]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        group = runs[name]
        if name in ("quota", "redis_killed"):
            shared = group["shared"]
            series = per_second(shared)
            secs = list(range(len(series[0])))
            ax.stackplot(secs, *series, labels=[f"process {i}" for i in range(len(series))])
            base = group.get("per_process")
            if base is not None:
                tot = [sum(x) for x in zip(*per_second(base), strict=True)]
                ax.plot(secs, tot, "k--", label="per-process quotas (total)")
            ax.axhline(shared["quota"], color="red", lw=1, label="fleet quota")
            if name == "redis_killed":
                kill, start = group["kill_at"], group["start_at"]
                ax.axvspan(kill, start, color="grey", alpha=0.2, label="redis-server down")
            ax.set_xlabel("second of the run")
            ax.set_ylabel("calls admitted / s")
        else:
            for key, style in (
                ("single", "k-"),
                ("per_process", "r--"),
                ("shared", "g-"),
                ("single_peak_ewma", "k:"),
                ("per_process_peak_ewma", "r:"),
                ("shared_peak_ewma", "g:"),
            ):
                run_ = group.get(key)
                if run_ is None:
                    continue
                fault = group["fault_at"]
                times = sorted(
                    a[0] - fault
                    for c in run_["clients"]
                    for a in c["attempts"]
                    if a[1] == 0 and a[0] >= fault and (a[2] >= 500 or a[2] == 0)
                )
                ax.step(times, range(1, len(times) + 1), style, where="post", label=key)
            ax.set_xlabel("seconds after replica 0 started failing")
            ax.set_ylabel("failed attempts on it (all processes)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def targets(figs: dict[str, Any], quota: float) -> list[dict[str, Any]]:
    out = []
    q = figs.get("quota")
    if q:
        s = q["shared"]
        lo, hi = 0.9 * quota, 1.1 * quota
        out.append(
            {
                "target": f"quota: fleet admits {quota:g}/s +-10% (steady)",
                "measured": f"{s['admitted_per_s_steady']:.1f}/s (per-process quotas: "
                f"{q['per_process']['admitted_per_s_steady']:.1f}/s)",
                "met": lo <= s["admitted_per_s_steady"] <= hi,
            }
        )
        shares = s["shares_pct"]
        even = 100.0 / len(shares)
        out.append(
            {
                "target": "quota: shares roughly even",
                "measured": "/".join(f"{x:.0f}" for x in shares) + " %",
                "met": max(abs(x - even) for x in shares) <= 0.25 * even,
            }
        )
    e = figs.get("ejection")
    if e:
        single, shared = e["single"], e["shared"]
        ratio = shared["failed_attempts"] / max(1, single["failed_attempts"])
        out.append(
            {
                "target": "ejection: failed attempts, 4 processes <= 1.5x one process",
                "measured": f"{shared['failed_attempts']:.1f} vs {single['failed_attempts']:.1f} "
                f"({ratio:.2f}x; per-process state: {e['per_process']['failed_attempts']:.1f}; "
                f"mean of {len(shared['failed_attempts_each'])})",
                "met": ratio <= 1.5,
            }
        )
        within = shared["all_ejected_within_s"]
        out.append(
            {
                "target": "ejection: all processes stop sending within 1 s of the first",
                "measured": "-" if within is None else f"{within * 1000:.0f} ms",
                "met": within is not None and within <= 1.0,
            }
        )
    r = figs.get("redis_killed")
    if r:
        out.append(
            {
                "target": "redis killed: 0 calls fail because of it",
                "measured": f"{r['failed_calls']} failed",
                "met": r["failed_calls"] == 0,
            }
        )
        out.append(
            {
                "target": f"redis killed: admitted <= 1.1x the quota ({quota:g}/s), "
                f"after the first {r['steady_from_s']:g} s",
                "measured": f"{r['admitted_per_s_steady']:.1f}/s ({r['admitted_per_s']:.1f}/s "
                f"with the initial burst), {r['admitted_per_s_during_outage']:.1f}/s while down",
                "met": r["admitted_per_s_steady"] <= 1.1 * quota,
            }
        )
        conv = r["converged_after_restart_s"]
        out.append(
            {
                "target": "redis killed: converged within 2 s of its return",
                "measured": "-" if conv is None else f"{conv:.2f} s",
                "met": conv is not None and conv <= 2.0,
            }
        )
    return out


# ------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--scenarios", default="quota,ejection,redis_killed")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--rate", type=float, default=60.0, help="calls/s offered per process")
    p.add_argument("--quota", type=float, default=100.0, help="fleet-wide requests/s")
    p.add_argument("--duration", type=float, default=None, help="seconds per run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repeat", type=int, default=None, help="ejection runs per variant")
    p.add_argument("--quick", action="store_true", help="shorter runs")
    p.add_argument("--no-peak-ewma", action="store_true", help="skip the peak_ewma rows")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        sys.exit("benchmarks need rich: pip install 'lbclient[bench]'")
    import _report

    from lbclient.testing import RedisServer

    console = Console(width=140)
    info = _report.machine_info()
    console.print(
        f"[b]lbclient fleet_shared[/b] -- {info['cpu_count']} CPU(s), load average "
        f"{info.get('loadavg_at_start')}, {args.processes} processes x {args.rate:g} calls/s"
    )
    quick = args.quick
    if args.repeat is None:
        args.repeat = 1 if quick else 3
    dur = args.duration or (8.0 if quick else 20.0)
    ej_dur = args.duration or (7.0 if quick else 9.0)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    n = args.processes
    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": info,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": {},
        "figures": {},
    }
    redis = RedisServer().start()
    fleet = Fleet(4, args.seed)
    workers = Workers(n)
    common = {
        "redis": redis,
        "fleet": fleet,
        "workers": workers,
        "seed": args.seed,
        "rate": args.rate,
    }
    try:
        if "quota" in scenarios:
            group = {}
            for key, shared in (("shared", True), ("per_process", False)):
                with console.status(f"quota, {key}..."):
                    group[key] = run(
                        label=f"quota/{key}",
                        processes=n,
                        shared=shared,
                        strategy="peak_ewma",
                        quota=args.quota,
                        duration=dur,
                        faults=[],
                        **common,
                    )
            result["runs"]["quota"] = group
            warm = 2.0
            result["figures"]["quota"] = {k: quota_figures(v, warm) for k, v in group.items()}
        if "ejection" in scenarios:
            fault_at = 2.0
            group = {"fault_at": fault_at}
            variants = [("single", 1, False), ("per_process", n, False), ("shared", n, True)]
            strategies = ["round_robin"] + ([] if args.no_peak_ewma else ["peak_ewma"])
            figures: dict[str, Any] = {}
            for strategy in strategies:
                for key, procs, shared in variants:
                    name = key if strategy == "round_robin" else f"{key}_{strategy}"
                    repeats = []
                    for rep in range(args.repeat):
                        with console.status(f"ejection, {name} ({rep + 1}/{args.repeat})..."):
                            repeats.append(
                                run(
                                    label=f"ejection/{name}",
                                    processes=procs,
                                    shared=shared,
                                    strategy=strategy,
                                    quota=None,
                                    duration=ej_dur,
                                    faults=[(fault_at, "replica_fails")],
                                    **{**common, "seed": args.seed + 100 * rep},
                                )
                            )
                    group[name] = repeats[0]  # the one plotted
                    figures[name] = merge_ejections(
                        [ejection_figures(r_, fault_at, window=4.0) for r_ in repeats]
                    )
            result["runs"]["ejection"] = group
            result["figures"]["ejection"] = figures
        if "redis_killed" in scenarios:
            kill_at, start_at = round(dur / 3, 1), round(2 * dur / 3, 1)
            with console.status("redis_killed..."):
                shared_run = run(
                    label="redis_killed",
                    processes=n,
                    shared=True,
                    strategy="peak_ewma",
                    quota=args.quota,
                    duration=dur,
                    faults=[(kill_at, "redis_kill"), (start_at, "redis_start")],
                    **common,
                )
            result["runs"]["redis_killed"] = {
                "shared": shared_run,
                "kill_at": kill_at,
                "start_at": start_at,
            }
            result["figures"]["redis_killed"] = redis_figures(shared_run, kill_at, start_at)
    finally:
        workers.close()
        fleet.close()
        redis.stop()

    figs = result["figures"]
    table = Table(title="[b]Fleet-shared state[/b]", title_justify="left")
    table.add_column("run")
    table.add_column("figures")
    for scenario, by in figs.items():
        if scenario == "redis_killed":
            table.add_row(scenario, json.dumps(by, default=str)[:400])
            continue
        for key, f in by.items():
            brief = {k: v for k, v in f.items() if k != "repeats"}
            table.add_row(f"{scenario}/{key}", json.dumps(brief, default=str)[:400])
    console.print(table)
    result["targets"] = targets(figs, args.quota)
    console.print(_report.targets_table(result["targets"]))
    result["machine"]["loadavg_at_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    result["wall_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, args.out / "fleet_shared.png")
    # Every call and attempt of every run, apart: the figures file stays small.
    _report.write_json(args.out / "fleet_shared_raw.json", {"runs": result.pop("runs")})
    _report.write_json(args.out / "fleet_shared.json", result)
    console.print(
        f"wrote {args.out / 'fleet_shared.json'}, _raw.json and .png in "
        f"{result['wall_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
