"""Reporting: rich tables, the JSON file and the PNG plot."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _harness import RunResult
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
from rich.table import Table
from scenarios import Scenario

import lbclient


@dataclass
class Progressor:
    """Calls finished so far, counted by the runs, shown by :func:`call_progress`."""

    done: int = 0


@contextlib.asynccontextmanager
async def call_progress(
    console: Console, total: int
) -> AsyncIterator[tuple[Progress, TaskID, Progressor]]:
    """A progress bar of ``total`` calls that follows a :class:`Progressor` (4 times a
    second) while the block runs: yields the ``Progress``, its bar and the counter."""
    prog = Progressor()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("starting", total=total)

        async def ticker() -> None:
            while True:
                progress.update(bar, completed=prog.done)
                await asyncio.sleep(0.25)

        tick = asyncio.get_running_loop().create_task(ticker())
        try:
            yield progress, bar, prog
        finally:
            tick.cancel()


def _fmt(value: float | None, fmt: str = "{:.1f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def _success(pct: float) -> str:
    text = f"{pct:.2f}" if pct < 100 else "100"
    if pct < 99.0:
        return f"[red]{text}[/red]"
    if pct < 99.95:
        return f"[yellow]{text}[/yellow]"
    return f"[green]{text}[/green]"


def scenario_table(scenario: Scenario, results: Sequence[RunResult]) -> Table:
    """Policy, success %, p50/p99/p99.9, extra load %, share per replica %, then the
    scenario's own columns."""
    table = Table(
        title=f"[b]{scenario.name}[/b]: {scenario.title}",
        caption=scenario.notes or None,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("policy", no_wrap=True)
    table.add_column("requests", justify="right")
    table.add_column("success %", justify="right")
    for q in ("p50", "p99", "p99.9"):
        table.add_column(f"{q} ms", justify="right")
    table.add_column("extra load %", justify="right")
    table.add_column("attempts/req", justify="right")
    table.add_column("share per replica %", no_wrap=True)
    for col in scenario.columns:
        table.add_column(col.header, justify="right")
    for r in results:
        lat = r.latency_ms
        share = "/".join(f"{s:.0f}" for s in r.share_pct)
        row = [
            r.policy,
            str(r.requests),
            _success(r.success_pct),
            _fmt(lat.get("p50"), "{:.1f}"),
            _fmt(lat.get("p99"), "{:.0f}"),
            _fmt(lat.get("p99.9"), "{:.0f}"),
            f"{r.extra_load_pct:+.1f}",
            f"{r.attempts_per_request:.3f}",
            share,
        ]
        row += [_fmt(r.extras.get(col.key), col.fmt) for col in scenario.columns]
        table.add_row(*row)
    return table


FULL_RUN = "full run"


def evaluate_targets(
    scenarios: Sequence[Scenario],
    results: Mapping[str, Mapping[str, RunResult]],
    quick: bool = False,
) -> list[dict[str, Any]]:
    """Each target's figure and verdict.  In a quick run, a target that takes the full
    run to show is reported but not judged (``met`` is the string ``"full run"``)."""
    out = []
    for sc in scenarios:
        if sc.name not in results:
            continue
        for t in sc.targets:
            measured, met = t.check(results[sc.name])
            verdict: bool | str | None = FULL_RUN if quick and t.full_only else met
            out.append(
                {"scenario": sc.name, "target": t.description, "measured": measured, "met": verdict}
            )
    return out


def targets_table(outcomes: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="[b]Targets[/b]", title_justify="left")
    table.add_column("target")
    table.add_column("measured")
    table.add_column("met", justify="center")
    for o in outcomes:
        met = o["met"]
        if met == FULL_RUN:
            mark = "[dim]full run[/dim]"
        else:
            mark = (
                "[green]yes[/green]"
                if met
                else "[dim]n/a[/dim]"
                if met is None
                else "[red]NO[/red]"
            )
        table.add_row(o["target"], o["measured"], mark)
    if any(o["met"] == FULL_RUN for o in outcomes):
        table.caption = (
            "full run: a quick run is too short to show this (round robin's queue on the "
            "overloaded replica grows with the run; a p99.9 needs thousands of calls) -- "
            "python benchmarks/run.py judges it"
        )
    return table


def lbclient_sources_sha256() -> str:
    """A hash (16 hex) of the lbclient sources on disk, as imported: the tree may hold
    uncommitted edits, and others may commit while a long run goes on (the client keeps
    what it imported)."""
    root = Path(lbclient.__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "lbclient": lbclient.__version__,
        "lbclient_path": str(Path(lbclient.__file__).resolve().parent),
    }
    try:
        import aiohttp

        info["aiohttp"] = aiohttp.__version__
    except ImportError:  # pragma: no cover
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        if commit:
            info["git_commit"] = commit
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    return obj


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")


def result_dict(r: RunResult) -> dict[str, Any]:
    return asdict(r)


def scenario_dict(sc: Scenario, duration: float, policies: Sequence[str]) -> dict[str, Any]:
    return {
        "title": sc.title,
        "replicas": [
            {k: v for k, v in asdict_attrs(c).items() if v is not None} for c in sc.replicas
        ],
        "rate": sc.rate,
        "capacity_rps": sc.capacity,
        "load_pct_of_nominal_capacity": 100.0 * sc.rate / sc.capacity if sc.capacity else None,
        "duration_s": duration,
        "policies": list(policies),
        "faults": [
            {
                "at_s": f.at * duration,
                "action": f.action,
                "replicas": list(f.replicas),
                "fields": dict(f.fields),
            }
            for f in sc.faults
        ],
        "bursts": [
            {"at_s": b.at * duration, "length_s": b.length, "factor": b.factor} for b in sc.bursts
        ],
        "phases": [
            {"name": p.name, "start_s": p.start * duration, "end_s": p.end * duration}
            for p in sc.phases
        ],
        "stream": sc.stream,
        "client_region": sc.client_region,
        "warmup_requests": sc.warmup,
        "notes": sc.notes,
    }


def asdict_attrs(obj: Any) -> dict[str, Any]:
    import attrs

    return attrs.asdict(obj)


# ------------------------------------------------------------------------------ plot


def _latencies(r: RunResult, stream: bool) -> list[float]:
    src = r.ttft_ms if stream and r.ttft_ms else r.latency_ms
    return [src.get(q) or 0.0 for q in ("p50", "p99", "p99.9")]


def plot(
    path: Path,
    scenarios: Sequence[Scenario],
    results: Mapping[str, Mapping[str, RunResult]],
    title: str,
) -> None:
    """One row per scenario: grouped p50/p99/p99.9 bars per policy (log scale; TTFT for
    streaming scenarios) and success % per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [sc for sc in scenarios if results.get(sc.name)]
    if not rows:
        return
    fig, axes = plt.subplots(
        len(rows),
        2,
        figsize=(14, 2.9 * len(rows) + 0.8),
        gridspec_kw={"width_ratios": [3, 1]},
        squeeze=False,
    )
    quantiles = ("p50", "p99", "p99.9")
    colors = ("#4C72B0", "#DD8452", "#C44E52")
    for row, sc in enumerate(rows):
        runs = list(results[sc.name].values())
        names = [r.policy for r in runs]
        ax = axes[row][0]
        width = 0.8 / len(quantiles)
        for k, (q, color) in enumerate(zip(quantiles, colors, strict=True)):
            vals = [_latencies(r, sc.stream)[k] for r in runs]
            xs = [i + (k - 1) * width for i in range(len(runs))]
            bars = ax.bar(xs, vals, width, label=q, color=color)
            for bar, v in zip(bars, vals, strict=True):
                if v > 0:
                    ax.annotate(
                        f"{v:.0f}",
                        (bar.get_x() + bar.get_width() / 2, v),
                        ha="center",
                        va="bottom",
                        fontsize=6,
                    )
        ax.set_yscale("log")
        positive = [v for r in runs for v in _latencies(r, sc.stream) if v > 0]
        if positive:
            ax.set_ylim(
                bottom=10 ** math.floor(math.log10(min(positive) * 0.8)), top=max(positive) * 2.0
            )
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(names, fontsize=8)
        what = "TTFT" if sc.stream else "latency"
        ax.set_ylabel(f"{what} ms (log)")
        ax.set_title(f"{sc.name}: {sc.title}", fontsize=9, loc="left")
        ax.grid(axis="y", which="both", alpha=0.25)
        if row == 0:
            fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncol=3, loc="upper right")

        ax2 = axes[row][1]
        succ = [r.success_pct for r in runs]
        bar_colors = [
            "#55A868" if s >= 99.95 else "#CCB974" if s >= 99.0 else "#C44E52" for s in succ
        ]
        ax2.barh(range(len(runs)), succ, color=bar_colors)
        ax2.set_yticks(range(len(runs)))
        ax2.set_yticklabels(names, fontsize=7)
        ax2.invert_yaxis()
        lo = min(succ)
        ax2.set_xlim(max(0.0, min(lo - (100 - lo) * 0.3, 99.0)), 100.05)
        ax2.set_xlabel("success %", fontsize=8)
        for i, s in enumerate(succ):
            ax2.text(ax2.get_xlim()[0], i, f" {s:.2f}", va="center", fontsize=7)
        ax2.grid(axis="x", alpha=0.25)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
