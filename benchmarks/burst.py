"""Bursts: N calls submitted at once to 4 replicas, lbclient vs plain aiohttp round robin.

::

    python benchmarks/burst.py                 # 5 rounds x 4 modes, 10,000 calls each (~80 s)
    python benchmarks/burst.py --quick         # 2 rounds, 2,000 calls (~8 s)
    python benchmarks/burst.py --calls 200 --rounds 1 --profile --out /tmp/b   # smoke (~5 s)
    python benchmarks/burst.py --modes lbclient --rounds 11   # one mode vs aiohttp_rr, tighter
    python benchmarks/burst.py --profile --rounds 0   # only the profiled runs (cProfile)

The target (from the issue): 10,000 calls submitted at once to 4 replicas finish in
<= 1.1x the wall time and client CPU of plain aiohttp round robin, with peak RSS <= 1.1x.

Setup:

* **Replicas** -- 4 fake OpenAI-compatible replicas (``lbclient.testing.ReplicaFleet``)
  in a *separate process* started once for the whole run (as in ``overhead.py``), each
  with ``--capacity`` slots (default 64) and a constant ``--service`` time (default 5 ms,
  ``sigma=0``): 256 slots for at most ``--limit`` (100) requests in flight, so no replica
  queues and the client is what limits (on a 2-core machine the replica process takes
  the other core; its CPU per run is reported too).
* **Clients** -- every *mode x round* is a *fresh client process* (this script with
  ``--child``), so its peak RSS is its own.  A plain-aiohttp client never
  imports lbclient.  In it: one ``aiohttp.ClientSession`` with
  ``TCPConnector(limit=--limit)`` (default 100, aiohttp's default; the same for every
  mode) and a 60 s total timeout per request; ``--warmup`` calls first (default 0: the
  burst hits a cold client, connections included); then the burst: ``N`` tasks created
  at once (``asyncio.create_task`` for each, then ``asyncio.wait`` on all of them).
  Every call ``POST``\\ s ``/v1/chat/completions`` and reads the body.
* **Modes** --

  ===================== ============================================================
  ``aiohttp_rr``        ``itertools.cycle`` over the 4 URLs, plain aiohttp
  ``lbclient``          the same request function under ``@lb.route``,
                        ``lbclient.Balancer(urls)`` (default strategy ``peak_ewma``)
  ``lbclient+policies`` ``Balancer(urls, retry=Retry(), breaker=Breaker())``
  ``lbclient+hedge``    ``Balancer(urls, hedge=Hedge())``
  ===================== ============================================================

* **Measured** per run: wall time from the first task's creation to the last completion;
  client CPU (``time.process_time()`` delta over the same span); peak RSS of the client
  process (``VmHWM``, also read just before the burst: imports + session + warm-up; not
  ``ru_maxrss``, which on Linux inherits the spawning parent's peak across ``execve``);
  successes / failures by exception type -- every call must end (done or failed); a call
  still pending after ``--burst-timeout`` is counted *hung* and fails the run; for
  lbclient modes the ``lb.stats()`` totals (``calls == N`` and ``in_flight == 0``
  asserted); requests the fleet received / served / cancelled during the run (extra load);
  time spent in the garbage collector during the burst (``gc.callbacks``) -- with 10,000
  live tasks a full collection is not cheap, and its cost grows with every object a call
  keeps alive.
* **Rounds** -- the modes are run one after the other, ``--rounds`` times (default 5), the
  order rotated every round so no mode always runs first or last.  Reported: the median
  per mode and its ratio to ``aiohttp_rr`` (ratio of medians; the median of the per-round
  ratios -- paired, so a slow minute on a shared machine cancels -- is in the JSON too).

Reading ``lbclient+hedge``: behind ``--limit`` connections, a call of the burst waits in
aiohttp's connection queue for up to the whole burst, and lbclient times a call from the
pick, so every call outlives ``Hedge().initial_delay`` (1 s: the burst starts before any
latency is known).  Every call's hedge timer fires; the budget lets ~5% through
(``hedges sent``), and those backups queue behind the same connector and are cancelled
when their primaries answer -- they cost client CPU and memory, the fleet never sees them.

``--profile`` adds one run per mode under ``cProfile`` (enabled around the burst only;
not counted in the medians): the profiles are written to ``burst-<mode>.pstats`` in
``--out`` and summarised -- the share of the profiled time per package (lbclient,
aiohttp, asyncio, ...) and the top functions.  cProfile's per-call cost inflates code made
of many small calls (lbclient's) more than the rest: read the shares, not the seconds.

Results: rich tables, and ``burst.json`` in ``--out`` (default ``benchmarks/results``).
Everything is bounded in time: each client process and the replica process have a
watchdog thread (``os._exit``), and the parent kills a child that outlives its timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("aiohttp_rr", "lbclient", "lbclient+policies", "lbclient+hedge")
BASELINE = "aiohttp_rr"
TARGET_RATIO = 1.1
PAYLOAD = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def _watchdog(seconds: float, who: str) -> None:
    """Exit the process (no cleanup) after ``seconds``, whatever it is doing."""

    def fire() -> None:
        sys.stderr.write(f"burst.py {who}: watchdog after {seconds:.0f} s, exiting\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def _ru_maxrss_kb() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def _maxrss_kb() -> int:
    """This process's peak RSS in KiB.

    On Linux ``ru_maxrss`` is *not* the process's own: the kernel carries the peak RSS of
    the address space replaced by ``execve`` over to the new program, so a client spawned
    by this (rich-, lbclient-importing) parent reports at least the parent's peak at spawn
    time -- the same for every mode.  ``VmHWM`` in ``/proc/self/status`` is the high-water
    mark of the current address space only: what the client itself touched.  Elsewhere,
    fall back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return _ru_maxrss_kb()


# ------------------------------------------------------------------ the client process


async def _client(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    mode: str = spec["mode"]
    urls: list[str] = spec["urls"]
    n: int = spec["calls"]
    connector = aiohttp.TCPConnector(limit=spec["limit"])
    timeout = aiohttp.ClientTimeout(total=spec["request_timeout"])
    out: dict[str, Any] = {"mode": mode, "calls": n, "limit": spec["limit"]}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post(url: str) -> bytes:
            async with session.post(url + "/v1/chat/completions", json=PAYLOAD) as r:
                r.raise_for_status()
                return await r.read()

        lb = None
        if mode == BASELINE:
            cycle = itertools.cycle(urls)

            async def call() -> bytes:
                return await post(next(cycle))

        else:
            import lbclient

            kwargs: dict[str, Any] = {}
            if mode == "lbclient+policies":
                kwargs = {"retry": lbclient.Retry(), "breaker": lbclient.Breaker()}
            elif mode == "lbclient+hedge":
                kwargs = {"hedge": lbclient.Hedge()}
            elif mode != "lbclient":
                raise SystemExit(f"unknown mode {mode!r}")
            lb = lbclient.Balancer(urls, rng=spec["seed"], **kwargs)

            @lb.route
            async def call(endpoint: lbclient.Endpoint) -> bytes:
                return await post(endpoint.url)

        if spec["warmup"]:
            left = itertools.count()

            async def worker() -> None:
                while next(left) < spec["warmup"]:
                    await call()

            await asyncio.gather(*(worker() for _ in range(min(spec["limit"] or 100, 100))))
            if lb is not None:
                warm = lb.stats()
                out["warmup_calls"] = warm.calls
        gc.collect()
        out["rss_before_kb"] = _maxrss_kb()
        gc_time = [0.0, 0.0]  # total seconds, start of the collection running
        gc_runs = [0, 0, 0]

        def on_gc(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                gc_time[1] = time.perf_counter()
            else:
                gc_time[0] += time.perf_counter() - gc_time[1]
                gc_runs[info["generation"]] += 1

        gc.callbacks.append(on_gc)

        profiler = None
        if spec.get("profile"):
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        c0, w0 = time.process_time(), time.perf_counter()
        tasks = [asyncio.create_task(call()) for _ in range(n)]
        out["submit_s"] = time.perf_counter() - w0
        done, pending = await asyncio.wait(tasks, timeout=spec["burst_timeout"])
        c1, w1 = time.process_time(), time.perf_counter()
        gc.callbacks.remove(on_gc)
        out["gc_s"], out["gc_collections"] = gc_time[0], gc_runs
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(spec["profile"])
        out["rss_peak_kb"] = _maxrss_kb()
        out["ru_maxrss_kb"] = _ru_maxrss_kb()  # includes the parent's peak: see _maxrss_kb
        out["wall_s"] = w1 - w0
        out["cpu_s"] = c1 - c0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out["cpu_user_total_s"], out["cpu_sys_total_s"] = usage.ru_utime, usage.ru_stime
        errors: Counter[str] = Counter()
        ok = 0
        for t in done:
            exc = t.exception()
            if exc is None:
                ok += 1
            else:
                errors[type(exc).__name__] += 1
        out["ok"], out["failed"], out["hung"] = ok, sum(errors.values()), len(pending)
        out["errors"] = dict(errors)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        if lb is not None:
            st = lb.stats()
            warm_calls = out.get("warmup_calls", 0)
            out["lb"] = {
                "strategy": st.strategy,
                "calls": st.calls - warm_calls,
                "calls_failed": st.calls_failed,
                "attempts": st.attempts - warm_calls,
                "retries": st.retries,
                "retries_denied": st.retries_denied,
                "hedges_sent": st.hedges_sent,
                "hedges_won": st.hedges_won,
                "hedges_denied": st.hedges_denied,
                "hedge_delay_ms": st.hedge_delay_ms,
                "in_flight": st.in_flight,
                "panic": st.panic,
                "requests_per_endpoint": [e.requests for e in st.endpoints],
            }
            await lb.aclose()
    out["loadavg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out


def child_main(spec: dict[str, Any]) -> int:
    _watchdog(spec["burst_timeout"] + 60.0, f"client {spec['mode']}")
    result = asyncio.run(_client(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# ------------------------------------------------------------------- the replica process

_SERVER = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading, time
    from lbclient.testing import ReplicaConfig, ReplicaFleet

    spec = json.loads(sys.argv[1])
    timer = threading.Timer(spec["max_seconds"], lambda: os._exit(3))
    timer.daemon = True
    timer.start()

    def emit(obj):
        sys.stdout.write(json.dumps(obj) + "\\n")
        sys.stdout.flush()

    async def main():
        cfg = ReplicaConfig(base_latency=spec["service"], sigma=0.0, capacity=spec["capacity"])
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async with ReplicaFleet([cfg] * spec["replicas"], seed=1) as fleet:
            emit({"urls": fleet.urls, "pid": os.getpid()})
            while True:
                line = await reader.readline()
                if not line or line.strip() == b"quit":     # quit, or the parent went away
                    return
                t = fleet.totals()
                emit({"received": t.received, "served": t.served, "errors": t.errors,
                      "cancelled": t.cancelled, "dropped": t.dropped,
                      "max_in_flight": t.max_in_flight,
                      "per_replica": [r.counters.received for r in fleet],
                      "cpu_s": time.process_time()})

    asyncio.run(main())
    """
)


class Fleet:
    """The replica process: started once, asked for counters between runs."""

    def __init__(self, args: argparse.Namespace, max_seconds: float) -> None:
        spec = {
            "service": args.service,
            "capacity": args.capacity,
            "replicas": args.replicas,
            "max_seconds": max_seconds,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise SystemExit("the replica process did not start")
        self.urls: list[str] = json.loads(line)["urls"]

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------- the parent side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--calls", type=int, default=10_000, help="calls per burst")
    p.add_argument("--rounds", type=int, default=5, help="rounds (every mode once per round)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of modes")
    p.add_argument("--limit", type=int, default=100, help="aiohttp TCPConnector(limit=)")
    p.add_argument("--warmup", type=int, default=0, help="calls before the burst (unmeasured)")
    p.add_argument("--replicas", type=int, default=4, help="fake replicas")
    p.add_argument("--capacity", type=int, default=64, help="slots per replica")
    p.add_argument("--service", type=float, default=0.005, help="service time per call, s")
    p.add_argument(
        "--burst-timeout", type=float, default=120.0, help="a call still pending after this is hung"
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="aiohttp total timeout")
    p.add_argument("--seed", type=int, default=1, help="lbclient rng seed")
    p.add_argument("--profile", action="store_true", help="one extra cProfile'd run per mode")
    p.add_argument("--quick", action="store_true", help="2 rounds of 2,000 calls")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one client
    args = p.parse_args(argv)
    if args.quick:
        args.calls = min(args.calls, 2_000)
        args.rounds = min(args.rounds, 2)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown mode(s) {sorted(unknown)}; choose from {', '.join(MODES)}")
    if BASELINE not in args.modes:
        args.modes.insert(0, BASELINE)
    if args.calls < 1 or args.rounds < 0:
        p.error("--calls must be >= 1 and --rounds >= 0")
    return args


def run_child(
    args: argparse.Namespace, fleet: Fleet, mode: str, profile: Path | None = None
) -> dict[str, Any]:
    spec = {
        "mode": mode,
        "urls": fleet.urls,
        "calls": args.calls,
        "limit": args.limit,
        "warmup": args.warmup,
        "request_timeout": args.request_timeout,
        "burst_timeout": args.burst_timeout,
        "seed": args.seed,
        "profile": str(profile) if profile else None,
    }
    before = fleet.stats()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=args.burst_timeout + 90.0,
        check=False,
    )
    after = fleet.stats()
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(
            f"client {mode} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    r: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    r["stderr"] = proc.stderr[-2000:] if proc.stderr.strip() else ""
    total = args.calls + args.warmup
    r["fleet"] = {
        k: after[k] - before[k] for k in ("received", "served", "errors", "cancelled", "dropped")
    }
    r["fleet"]["cpu_s"] = after["cpu_s"] - before["cpu_s"]
    r["fleet"]["per_replica"] = [
        a - b for a, b in zip(after["per_replica"], before["per_replica"], strict=True)
    ]
    r["fleet"]["extra_load_pct"] = 100.0 * (r["fleet"]["received"] / total - 1.0)
    r["fleet"]["max_in_flight_so_far"] = after["max_in_flight"]
    check(r, args.calls)
    return r


def check(r: dict[str, Any], n: int) -> None:
    """Every call accounted for; lbclient's books balanced."""
    assert r["ok"] + r["failed"] + r["hung"] == n, r
    assert r["hung"] == 0, f"{r['mode']}: {r['hung']} calls still pending after the timeout"
    lb = r.get("lb")
    if lb is not None:
        assert lb["in_flight"] == 0, f"{r['mode']}: in_flight={lb['in_flight']} after the burst"
        assert lb["calls"] == n, f"{r['mode']}: lb.stats().calls={lb['calls']} != {n}"
        assert lb["calls_failed"] == r["failed"], (lb, r["failed"])


def _median(rs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in rs))


def summarise(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in modes}
    rounds = sorted({r["round"] for r in runs})
    out: dict[str, Any] = {}
    base = by_mode[BASELINE]
    for m, rs in by_mode.items():
        s: dict[str, Any] = {
            "runs": len(rs),
            "wall_s": _median(rs, "wall_s"),
            "cpu_s": _median(rs, "cpu_s"),
            "rss_peak_mb": _median(rs, "rss_peak_kb") / 1024,
            "rss_before_mb": _median(rs, "rss_before_kb") / 1024,
            "submit_s": _median(rs, "submit_s"),
            "gc_s": _median(rs, "gc_s"),
            "fleet_cpu_s": float(statistics.median(r["fleet"]["cpu_s"] for r in rs)),
            "ok": sum(r["ok"] for r in rs),
            "failed": sum(r["failed"] for r in rs),
            "hung": sum(r["hung"] for r in rs),
            "extra_load_pct": float(statistics.median(r["fleet"]["extra_load_pct"] for r in rs)),
        }
        s["calls_per_s"] = rs[0]["calls"] / s["wall_s"]
        s["cpu_us_per_call"] = s["cpu_s"] / rs[0]["calls"] * 1e6
        s["rss_burst_mb"] = s["rss_peak_mb"] - s["rss_before_mb"]
        if rs and "lb" in rs[0]:
            s["hedges_sent"] = float(statistics.median(r["lb"]["hedges_sent"] for r in rs))
            s["hedges_won"] = float(statistics.median(r["lb"]["hedges_won"] for r in rs))
            s["retries"] = float(statistics.median(r["lb"]["retries"] for r in rs))
        ratio: dict[str, float] = {}
        paired: dict[str, float] = {}
        for key, bkey in (("wall", "wall_s"), ("cpu", "cpu_s"), ("rss", "rss_peak_kb")):
            ratio[key] = _median(rs, bkey) / _median(base, bkey)
            per_round = []
            for rd in rounds:
                a = [r for r in rs if r["round"] == rd]
                b = [r for r in base if r["round"] == rd]
                if a and b:
                    per_round.append(a[0][bkey] / b[0][bkey])
            paired[key] = float(statistics.median(per_round)) if per_round else float("nan")
        s["ratio"] = ratio
        s["paired_ratio"] = paired
        out[m] = s
    return out


def targets(summary: dict[str, Any], n: int) -> list[dict[str, Any]]:
    out = []
    for m, s in summary.items():
        if m == BASELINE:
            continue
        for key, what in (("wall", "wall time"), ("cpu", "client CPU"), ("rss", "peak RSS")):
            v = s["ratio"][key]
            out.append(
                {
                    "target": f"{m}: {what} of {n:,} calls at once <= {TARGET_RATIO}x {BASELINE}",
                    "measured": f"{v:.3f}x (paired {s['paired_ratio'][key]:.3f}x)",
                    "met": v <= TARGET_RATIO,
                }
            )
        out.append(
            {
                "target": f"{m}: no call lost or hung; lb.stats() in_flight 0",
                "measured": f"{s['ok']} ok / {s['failed']} failed / {s['hung']} hung",
                "met": s["hung"] == 0,
            }
        )
    return out


def profile_summary(path: Path, top: int = 15) -> dict[str, Any]:
    import pstats

    st = pstats.Stats(str(path))
    stats: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values()) or 1e-12

    def area(filename: str) -> str:
        f = filename.replace("\\", "/")
        for name in ("lbclient", "aiohttp", "yarl", "multidict", "asyncio", "json", "selectors"):
            if f"/{name}/" in f or f.endswith(f"/{name}.py"):
                return name
        if f == "~":
            return "builtins"
        return "other"

    areas: Counter[str] = Counter()
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.items():
        areas[area(filename)] += tt
        rows.append((tt, ct, nc, f"{Path(filename).name}:{line}({func})", area(filename)))
    rows.sort(reverse=True)
    # cumulative time of lbclient's own entry points (what a call through it costs in all)
    return {
        "total_s": total,
        "areas": {k: v / total for k, v in areas.most_common()},
        "top": [
            {
                "func": f,
                "area": a,
                "tottime_s": tt,
                "share": tt / total,
                "cumtime_s": ct,
                "calls": nc,
            }
            for tt, ct, nc, f, a in rows[:top]
        ],
        "lbclient_top": [
            {"func": f, "tottime_s": tt, "share": tt / total, "cumtime_s": ct, "calls": nc}
            for tt, ct, nc, f, a in rows
            if a == "lbclient"
        ][:top],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child))

    import _report
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))
    info = _report.machine_info()
    console.print(
        f"[b]lbclient burst[/b] -- {args.calls:,} calls at once, {args.replicas} replicas "
        f"({args.capacity} slots, {args.service * 1000:g} ms) in another process, "
        f"TCPConnector(limit={args.limit}); {info['cpu_count']} CPU(s), Python "
        f"{sys.version.split()[0]}, aiohttp {info.get('aiohttp')}, "
        f"load average {info.get('loadavg_at_start')}"
    )
    n_runs = args.rounds * len(args.modes) + (len(args.modes) if args.profile else 0)
    deadline = 60.0 + n_runs * (args.burst_timeout + 95.0)
    _watchdog(deadline, "parent")
    started = time.perf_counter()
    fleet = Fleet(args, max_seconds=deadline + 30.0)
    runs: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    try:
        for rd in range(args.rounds):
            order = args.modes[rd % len(args.modes) :] + args.modes[: rd % len(args.modes)]
            for mode in order:
                r = run_child(args, fleet, mode)
                r["round"] = rd
                runs.append(r)
                lb = r.get("lb") or {}
                console.print(
                    f"  round {rd + 1}/{args.rounds} {mode:<18} wall {r['wall_s']:6.3f} s  "
                    f"cpu {r['cpu_s']:6.3f} s  gc {r['gc_s']:5.2f} s  peak RSS {r['rss_peak_kb'] / 1024:6.1f} MB  "
                    f"ok {r['ok']} failed {r['failed']}"
                    + (f"  hedges {lb['hedges_sent']}" if lb.get("hedges_sent") else "")
                    + f"  fleet cpu {r['fleet']['cpu_s']:.2f} s  load {r['loadavg'][0]:.2f}",
                    highlight=False,
                )
        if args.profile:
            args.out.mkdir(parents=True, exist_ok=True)
            for mode in args.modes:
                path = args.out / f"burst-{mode.replace('+', '_')}.pstats"
                r = run_child(args, fleet, mode, profile=path)
                prof = profile_summary(path)
                prof["wall_s"], prof["cpu_s"], prof["path"] = r["wall_s"], r["cpu_s"], str(path)
                profiles[mode] = prof
    finally:
        fleet.close()

    result: dict[str, Any] = {
        "machine": info,
        "args": {k: str(v) for k, v in vars(args).items() if k != "child"},
        "setup": {
            "calls": args.calls,
            "replicas": args.replicas,
            "capacity": args.capacity,
            "service_s": args.service,
            "connector_limit": args.limit,
            "warmup": args.warmup,
            "modes": args.modes,
        },
        "runs": runs,
    }
    if runs:
        summary = summarise(runs, args.modes)
        result["summary"] = summary
        t = Table(
            title=f"[b]Burst[/b]: {args.calls:,} calls at once, median of {args.rounds} "
            f"round(s); x rr = ratio of medians to {BASELINE} (per-round paired ratios: "
            "Targets)",
            title_justify="left",
        )
        for col in (
            "mode",
            "wall s",
            "x rr",
            "calls/s",
            "CPU s",
            "x rr",
            "µs/call",
            "GC s",
            "peak RSS MB",
            "x rr",
            "pre-burst MB",
            "hedges sent/won",
            "ok/fail/hung",
            "extra %",
            "fleet CPU s",
        ):
            t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
        for m, s in summary.items():
            ra, pa = s["ratio"], s["paired_ratio"]

            def cell(key: str, ra: dict[str, float] = ra, pa: dict[str, float] = pa) -> str:
                v = ra[key]
                colour = "green" if v <= TARGET_RATIO else "red"
                return f"[{colour}]{v:.3f}[/{colour}]"

            t.add_row(
                m,
                f"{s['wall_s']:.3f}",
                cell("wall"),
                f"{s['calls_per_s']:,.0f}",
                f"{s['cpu_s']:.3f}",
                cell("cpu"),
                f"{s['cpu_us_per_call']:.0f}",
                f"{s['gc_s']:.2f}",
                f"{s['rss_peak_mb']:.1f}",
                cell("rss"),
                f"{s['rss_before_mb']:.1f}",
                f"{s['hedges_sent']:.0f}/{s['hedges_won']:.0f}" if "hedges_sent" in s else "-",
                f"{s['ok']}/{s['failed']}/{s['hung']}",
                f"{s['extra_load_pct']:+.2f}",
                f"{s['fleet_cpu_s']:.2f}",
            )
        console.print(t)
        result["targets"] = targets(summary, args.calls)
        console.print(_report.targets_table(result["targets"]))
    if profiles:
        result["profiles"] = profiles
        t = Table(
            title="[b]cProfile[/b] of one burst per mode: share of profiled time by package",
            title_justify="left",
        )
        names = sorted({a for p in profiles.values() for a in p["areas"]})
        t.add_column("mode")
        t.add_column("profiled s", justify="right")
        for a in names:
            t.add_column(a, justify="right")
        for m, p in profiles.items():
            t.add_row(
                m, f"{p['total_s']:.2f}", *(f"{100 * p['areas'].get(a, 0):.1f}%" for a in names)
            )
        console.print(t)
        for m, p in profiles.items():
            if m == BASELINE:
                continue
            t = Table(title=f"[b]{m}[/b]: lbclient functions by own time", title_justify="left")
            for col in ("function", "own s", "share", "cum s", "calls"):
                t.add_column(col, justify="left" if col == "function" else "right")
            for row in p["lbclient_top"][:12]:
                t.add_row(
                    row["func"],
                    f"{row['tottime_s']:.3f}",
                    f"{100 * row['share']:.1f}%",
                    f"{row['cumtime_s']:.3f}",
                    str(row["calls"]),
                )
            console.print(t)
    info["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_seconds"] = time.perf_counter() - started
    path = args.out / "burst.json"
    _report.write_json(path, result)
    console.print(
        f"wrote {path} in {result['wall_seconds']:.0f} s (load average at end "
        f"{info['loadavg_at_end']})"
    )
    failed = [o for o in result.get("targets", []) if "hung" in o["measured"] and not o["met"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
