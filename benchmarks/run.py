"""lbclient benchmark: load-balancing policies side by side on realistic failure scenarios.

::

    python benchmarks/run.py                          # everything (~6 minutes)
    python benchmarks/run.py --quick                  # shorter runs, fewer policies (~90 s)
    python benchmarks/run.py --scenarios hetero,tail --strategies round_robin,peak_ewma
    python benchmarks/run.py --duration 3 --out /tmp/bench

Each scenario x policy runs against a fresh fleet of fake OpenAI-compatible replicas on
127.0.0.1 (``lbclient.testing.ReplicaFleet``) with open-loop Poisson arrivals; see
``_harness.py`` for how latency is measured and ``scenarios.py`` for the scenarios.
Writes ``results.json`` and ``results.png`` to ``--out`` (default
``benchmarks/results``).

Policies: ``baseline_rr`` is a plain ``itertools.cycle`` over the URLs with aiohttp and
no lbclient; anything else is ``<lbclient strategy>[+retry][+breaker][+hedge]`` or
``<strategy>+all`` (``Retry(attempts=3)``, ``Breaker()``, ``Hedge()`` defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

try:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
except ImportError:  # pragma: no cover
    sys.exit("benchmarks need rich and matplotlib: pip install 'lbclient[bench]'")

import _report
from _harness import RunResult, parse_policy, run_one
from scenarios import SCENARIOS, Scenario


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Compare load-balancing policies on fake LLM replica fleets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="shorter runs and fewer policies")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--strategies",
        default=None,
        help="comma-separated policies to run in every selected scenario, replacing the "
        "scenario's own list (e.g. baseline_rr,power_of_two,peak_ewma+retry+breaker)",
    )
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    p.add_argument("--seed", type=int, default=1, help="seed of arrivals, fleets and balancers")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="override every scenario's measured duration (seconds)",
    )
    p.add_argument("--warmup", type=int, default=None, help="override warm-up request count")
    p.add_argument("--verbose", action="store_true", help="show lbclient's breaker/panic log")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[Scenario, float, list[str]]]:
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}"
        )
    out = []
    for name in names:
        sc = SCENARIOS[name]
        if args.warmup is not None:
            sc = replace(sc, warmup=args.warmup)
        elif args.quick:
            sc = replace(sc, warmup=min(sc.warmup, 40))  # still >= 32: Hedge adapts
        if args.strategies:
            policies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        else:
            policies = list(sc.quick_policies if args.quick else sc.policies)
        for pol in policies:
            try:
                parse_policy(pol)
            except ValueError as exc:
                raise SystemExit(str(exc)) from None
        duration = args.duration or (sc.quick_duration if args.quick else sc.duration)
        out.append((sc, duration, policies))
    return out


async def main_async(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))  # logs/pipes: no wrapping
    if not args.verbose:
        logging.getLogger("lbclient").setLevel(logging.ERROR)
    runs = plan(args)
    info = _report.machine_info()
    total_runs = sum(len(p) for _, _, p in runs)
    est = sum(d * len(p) for _, d, p in runs)
    console.print(
        f"[b]lbclient benchmark[/b] -- {len(runs)} scenario(s), {total_runs} runs, "
        f"~{est:.0f} s of measured load; {info['cpu_count']} CPU(s), "
        f"Python {sys.version.split()[0]}, load average {info.get('loadavg_at_start')}"
    )
    results: dict[str, dict[str, RunResult]] = {}
    scenarios_json = {}
    started = time.perf_counter()
    progress = Progress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        overall = progress.add_task("all runs", total=total_runs)
        for sc, duration, policies in runs:
            scenarios_json[sc.name] = _report.scenario_dict(sc, duration, policies)
            results[sc.name] = {}
            for pol_name in policies:
                policy = parse_policy(pol_name)
                task = progress.add_task(f"  {sc.name} / {pol_name}", total=round(duration))

                def tick(elapsed: float, task: TaskID = task) -> None:
                    progress.update(task, completed=round(elapsed))

                gc.collect()
                r = await run_one(sc, policy, duration=duration, seed=args.seed, progress=tick)
                for col in sc.columns:
                    r.extras[col.key] = col.fn(r)
                results[sc.name][pol_name] = r
                progress.update(task, completed=round(duration), visible=False)
                progress.advance(overall)
            progress.console.print(_report.scenario_table(sc, list(results[sc.name].values())))
    outcomes = _report.evaluate_targets([sc for sc, _, _ in runs], results, quick=args.quick)
    if outcomes:
        console.print(_report.targets_table(outcomes))
    elapsed = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "args": {
            "quick": args.quick,
            "seed": args.seed,
            "duration": args.duration,
            "scenarios": [sc.name for sc, _, _ in runs],
            "strategies": args.strategies,
        },
        "wall_seconds": elapsed,
        "notes": [
            "latency percentiles are over successful requests, measured from each "
            "request's scheduled (Poisson, open-loop) arrival time, in milliseconds",
            "extra_load_pct = upstream requests received by the fleet / client requests - 1",
            "attempts_per_request counts every entry into the request function "
            "(client-side, includes refused connections)",
            "fleet and client share one asyncio event loop in one process",
        ],
        "scenarios": scenarios_json,
        "results": {
            name: {pol: _report.result_dict(r) for pol, r in by_policy.items()}
            for name, by_policy in results.items()
        },
        "targets": outcomes,
    }
    json_path = args.out / "results.json"
    png_path = args.out / "results.png"
    _report.write_json(json_path, payload)
    title = (
        f"lbclient benchmark ({'quick' if args.quick else 'full'}, seed {args.seed}) -- "
        f"{info['platform']}, {info['cpu_count']} CPUs, Python {sys.version.split()[0]}, "
        f"{info['date']}"
    )
    _report.plot(png_path, [sc for sc, _, _ in runs], results, title)
    console.print(f"wrote {json_path} and {png_path} in {elapsed:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
