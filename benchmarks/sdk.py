"""The OpenAI SDK balanced by ``lbclient.HTTPTransport``, against the same SDK doing it
itself: its own retries, one client per replica, round robin over the base URLs.

::

    python benchmarks/sdk.py                  # every part, ~4 min
    python benchmarks/sdk.py --quick          # shorter runs, ~70 s
    python benchmarks/sdk.py --parts faults --calls 5000 --rate 120
    python benchmarks/sdk.py --no-stream      # the fault scenario without its stream=True run

Three parts, each against fake OpenAI-compatible replicas (``lbclient.testing``) in their
*own process* (``_fleet_server.py``), so the replicas' CPU does not share the client's
event loop:

* ``faults`` -- 4 replicas (40 ms mean service, 4 slots each): replica 0 fails 50% of its
  requests (500), replica 1 straggles (2% of its requests take 20x), 2 and 3 are healthy.
  Calls arrive open loop (seeded Poisson, latency measured from the scheduled arrival, so
  a stalled client cannot hide queueing) through the real ``openai.AsyncOpenAI``:

  - ``sdk_retries`` -- four ``AsyncOpenAI`` clients, one per replica's base URL, the
    SDK's default ``max_retries=2`` (its backoff: 0.5 s doubling, jittered), calls
    spread round robin: what a service does without a balancer;
  - ``lbclient`` -- one ``AsyncOpenAI(base_url="http://lbclient/v1", max_retries=0,
    http_client=httpx.AsyncClient(transport=HTTPTransport(lb)))``, ``lb`` =
    ``peak_ewma`` + ``Retry(attempts=3)`` + ``Breaker()`` + ``Hedge()``.

  The two run in alternating rounds (``--rounds``), each policy on its own fleet, so a
  shared machine's load drift hits both alike.  Target: ``lbclient`` 100% success and
  p99.9 <= 1/5 of ``sdk_retries``'.  Then the
  same with ``stream=True`` (latency to the last token, and time to the first), at half
  the rate -- a stream holds its slot twice as long (40 ms to the first token, 8 tokens
  5 ms apart), so the fleet carries the same load -- each stream's text checked whole:
  one replica's 8 tokens, never a token twice (a retry or hedge after the first chunk
  would show as a "mixed stream" failure).
* ``overhead`` -- client CPU per request (``time.process_time``) of a plain
  ``httpx.AsyncClient`` posting a chat request to one replica, against the same client
  through ``HTTPTransport`` (a balancer of that replica): alternating rounds at
  concurrency 8; the figure is the median of each transport round's ratio to the plain
  round just before it.  Target: <= 1.15x.
* ``fallback`` -- a self-hosted pool whose 2 replicas are down, falling back to a
  vendor pool of 2: once the primary's breakers are open, every call must be served by
  the fallback with at most one extra attempt each (panic mode's) on the dead pool.

Results: a table per part, ``sdk.json`` and ``sdk.png`` in ``--out`` (default
``benchmarks/results``).  The load average is recorded: on a busy machine, rerun.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):  # this checkout's lbclient, not an installed one
    if path not in sys.path:
        sys.path.insert(0, path)

try:
    import httpx
    import openai
    from rich.console import Console
    from rich.table import Table
except ImportError:  # pragma: no cover
    sys.exit("benchmarks/sdk.py needs httpx, openai and rich: pip install 'lbclient[test]'")

from _fleet_process import FleetProcess
from _harness import poisson_arrivals, summarize
from _report import machine_info, write_json

import lbclient

MESSAGES = [{"role": "user", "content": "Say hi in one short sentence, please."}]
TOKENS = 8  # each fake answer: "tok0 " ... "tok7 "
TARGET_RATIO = 5.0  # lbclient's p99.9 at most 1/5 of the SDK's own retries'
TARGET_OVERHEAD = 1.15
console = Console()


# -------------------------------------------------------------------------- the fleets


FAULTS = [
    {"error_rate": 0.5, "name": "failing"},
    {"straggler_rate": 0.02, "straggler_factor": 20.0, "name": "straggler"},
    {"name": "healthy-a"},
    {"name": "healthy-b"},
]


def sdk_client(http: httpx.AsyncClient, base_url: str, max_retries: int) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url, api_key="bench", max_retries=max_retries, http_client=http
    )


def balancer(urls: Sequence[str]) -> lbclient.Balancer:
    return lbclient.Balancer(
        urls,
        retry=lbclient.Retry(attempts=3),
        breaker=lbclient.Breaker(),
        hedge=lbclient.Hedge(),
        rng=1,
    )


# ------------------------------------------------------------------------ open loop


class Tally:
    """What the calls of one policy gave, over every round."""

    def __init__(self) -> None:
        self.calls = 0
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.errors: dict[str, int] = {}

    def result(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "success_pct": 100.0 * len(self.latencies) / max(self.calls, 1),
            "errors": self.errors,
            "latency_ms": summarize(self.latencies),
            "ttft_ms": summarize(self.ttfts) if self.ttfts else None,
        }


async def open_loop(
    call: Callable[[], Awaitable[tuple[float | None, str | None]]],
    n: int,
    rate: float,
    seed: int,
    tally: Tally | None = None,
) -> Tally:
    """``n`` calls at Poisson arrivals of ``rate``/s, each its own task, latency from its
    scheduled arrival, added to ``tally``.  ``call`` returns (the time its first token
    came, or None; an error, or None)."""
    tally = Tally() if tally is None else tally
    schedule = poisson_arrivals(rate, n, random.Random(seed))
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(at: float) -> None:
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            first, problem = await call()
        except Exception as exc:  # a failed call: counted, not timed
            first, problem = None, type(exc).__name__
        if problem is not None:
            tally.errors[problem] = tally.errors.get(problem, 0) + 1
            return
        done = loop.time()
        tally.latencies.append(done - (start + at))
        if first is not None:
            tally.ttfts.append(first - (start + at))

    tally.calls += n
    await asyncio.gather(*(one(at) for at in schedule))
    return tally


def make_call(
    clients: Sequence[openai.AsyncOpenAI], stream: bool
) -> Callable[[], Awaitable[tuple[float | None, str | None]]]:
    """One chat call, round robin over ``clients``; a stream's text is checked whole."""
    turn = itertools.cycle(clients)
    loop = asyncio.get_running_loop()

    async def call() -> tuple[float | None, str | None]:
        client = next(turn)
        if not stream:
            reply = await client.chat.completions.create(model="m", messages=MESSAGES)
            text = reply.choices[0].message.content or ""
            return None, None if text.endswith("tok7 ") else "bad answer"
        first = None
        parts = []
        response = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = loop.time()
                parts.append(chunk.choices[0].delta.content)
        text = "".join(parts)
        whole = "".join(f"tok{i} " for i in range(TOKENS))
        return first, None if text == whole else "mixed stream"

    return call


async def part_faults(args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    """Both policies, each on its own fleet, in alternating rounds: on a shared machine
    whose load drifts, both see the same drift."""
    rate = args.rate / 2 if stream else args.rate  # the same load: a stream lasts twice as long
    policies = ("sdk_retries", "lbclient")
    async with contextlib.AsyncExitStack() as stack:
        # A fresh fleet per policy (the same seed: the same draws for the same arrivals),
        # started together.
        fleets = [FleetProcess(FAULTS, args.seed, 600) for _ in policies]
        await asyncio.gather(*(stack.enter_async_context(f) for f in fleets))
        calls: dict[str, Callable[[], Awaitable[tuple[float | None, str | None]]]] = {}
        lb = balancer(fleets[1].urls)
        for policy, fleet in zip(policies, fleets, strict=True):
            if policy == "sdk_retries":
                http = httpx.AsyncClient(limits=httpx.Limits(max_connections=1000))
                clients = [sdk_client(http, url + "/v1", 2) for url in fleet.urls]
            else:
                http = httpx.AsyncClient(transport=lbclient.HTTPTransport(lb))
                clients = [sdk_client(http, "http://lbclient/v1", 0)]
            stack.push_async_callback(http.aclose)
            calls[policy] = make_call(clients, stream)
        # Warm up, unmeasured: the SDK's first calls in a process are slow (its models
        # are built), connections open, the hedge delay and latency estimates learn.
        warm = args.warmup if args.warmup is not None else max(100, args.calls // 10)
        for policy in policies:
            await open_loop(calls[policy], warm, rate, args.seed + 1)
        before = [(await f.stats())["counters"] for f in fleets]
        stats_before = lb.stats()
        tallies = {policy: Tally() for policy in policies}
        rounds = max(1, args.rounds)
        per_round = max(1, args.calls // rounds)
        for i in range(rounds):
            order = policies if i % 2 == 0 else policies[::-1]
            for policy in order:
                await open_loop(calls[policy], per_round, rate, args.seed + 10 + i, tallies[policy])
        after = [(await f.stats())["counters"] for f in fleets]
        stats = lb.stats()
        await lb.aclose()
    results: dict[str, Any] = {}
    for k, policy in enumerate(policies):
        result = tallies[policy].result()
        result["rate"] = rate
        got = [a["received"] - b["received"] for a, b in zip(after[k], before[k], strict=True)]
        result["attempts_per_call"] = sum(got) / tallies[policy].calls
        result["share_pct"] = [round(100.0 * x / max(sum(got), 1), 1) for x in got]
        results[policy] = result
        console.print(f"  {'stream' if stream else 'plain'} {policy}: {_line(result)}")
    hedger = lb._engine.hedger
    results["lbclient"]["lbclient"] = {
        "retries": stats.retries - stats_before.retries,
        "hedges_sent": stats.hedges_sent - stats_before.hedges_sent,
        "hedges_won": stats.hedges_won - stats_before.hedges_won,
        "hedges_denied": stats.hedges_denied - stats_before.hedges_denied,
        "hedge_delay_ms": None if hedger is None else hedger.current_delay(stream) * 1000,
        "failed_by": dict(stats.failed_by),
    }
    base = results["sdk_retries"]["latency_ms"].get("p99.9")
    ours = results["lbclient"]["latency_ms"].get("p99.9")
    ratio = base / ours if base and ours else None
    return {"policies": results, "p999_ratio": ratio, "rate": rate, "rounds": rounds}


def _line(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return (
        f"success {r['success_pct']:.2f}%  p50 {lat.get('p50', 0):.0f}  p99 {lat.get('p99', 0):.0f}"
        f"  p99.9 {lat.get('p99.9', 0):.0f} ms  attempts/call {r['attempts_per_call']:.3f}"
    )


# ---------------------------------------------------------------------------- overhead


async def part_overhead(args: argparse.Namespace) -> dict[str, Any]:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hello " * 100}], "max_tokens": 16}
    ).encode()
    headers = {"content-type": "application/json"}
    replica = {"base_latency": 0.002, "sigma": 0.0, "capacity": 64}
    async with FleetProcess([replica], args.seed, 600) as fleet:
        url = fleet.urls[0]
        plain = httpx.AsyncClient()
        lb = lbclient.Balancer([url])
        through = httpx.AsyncClient(transport=lbclient.HTTPTransport(lb))
        targets = {
            "httpx": (plain, url + "/v1/chat/completions"),
            "httpx + HTTPTransport": (through, "http://lbclient/v1/chat/completions"),
        }

        async def round_of(client: httpx.AsyncClient, target: str, n: int) -> float:
            sem = asyncio.Semaphore(8)

            async def one() -> None:
                async with sem:
                    r = await client.post(target, content=body, headers=headers)
                    r.json()

            gc.collect()
            t0 = time.process_time()
            await asyncio.gather(*(one() for _ in range(n)))
            return (time.process_time() - t0) / n * 1e6

        for client, target in targets.values():
            await round_of(client, target, 200)  # warm: connections, caches
        rounds: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.overhead_rounds):
            for name, (client, target) in targets.items():
                rounds[name].append(await round_of(client, target, args.overhead_requests))
        await plain.aclose()
        await through.aclose()
        await lb.aclose()
    cpu = {name: statistics.median(v) for name, v in rounds.items()}
    # Each round of the transport against the plain round just before it: on a shared
    # machine whose load drifts, the median of these ratios is steadier than the ratio
    # of the medians (both are kept).
    pairs = [t / p for p, t in zip(rounds["httpx"], rounds["httpx + HTTPTransport"], strict=True)]
    ratio = statistics.median(pairs)
    console.print(
        f"  client CPU per request: httpx {cpu['httpx']:.0f} us, through the transport "
        f"{cpu['httpx + HTTPTransport']:.0f} us: {ratio:.3f}x"
    )
    return {
        "cpu_us_per_request": cpu,
        "rounds_us": rounds,
        "ratio": ratio,
        "ratio_of_medians": cpu["httpx + HTTPTransport"] / cpu["httpx"],
        "pair_ratios": pairs,
        "requests_per_round": args.overhead_requests,
        "concurrency": 8,
    }


# ---------------------------------------------------------------------------- fallback


async def part_fallback(args: argparse.Namespace) -> dict[str, Any]:
    async with FleetProcess([{}, {}], args.seed + 1, 600) as vendor_fleet:
        vendor = lbclient.Balancer(vendor_fleet.urls, name="vendor", retry=lbclient.Retry())
        down = [f"http://127.0.0.1:{_free_port()}" for _ in range(2)]  # nothing listens
        primary = lbclient.Balancer(
            down,
            name="self-hosted",
            fallback=vendor,
            retry=lbclient.Retry(attempts=3),
            breaker=lbclient.Breaker(failures=5, cooldown=60.0),
        )
        http = httpx.AsyncClient(transport=lbclient.HTTPTransport(primary))
        client = sdk_client(http, "http://lbclient/v1", 0)
        warm = 0
        while any(e.breaker != "open" for e in primary.stats().endpoints) and warm < 200:
            await client.chat.completions.create(model="m", messages=MESSAGES)
            warm += 1
        before = primary.stats()
        served: dict[str, int] = {}
        failures = 0
        n = args.fallback_calls
        for _ in range(n):
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="m", messages=MESSAGES
                )
                where = raw.headers["x-lbclient-endpoint"]
                served[where] = served.get(where, 0) + 1
            except Exception:
                failures += 1
        after = primary.stats()
        await http.aclose()
        await primary.aclose()
        await vendor.aclose()
    by_fallback = sum(v for k, v in served.items() if k in vendor_fleet.urls)
    extra = (after.attempts - before.attempts) / n
    console.print(
        f"  primary down: {100.0 * by_fallback / n:.1f}% served by the fallback, "
        f"{extra:.2f} attempts per call on the dead pool (after {warm} warm-up calls)"
    )
    return {
        "calls": n,
        "warmup_calls": warm,
        "success_pct": 100.0 * (n - failures) / n,
        "served_by_fallback_pct": 100.0 * by_fallback / n,
        "primary_attempts_per_call": extra,
        "fallbacks": after.fallbacks - before.fallbacks,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ report


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key in ("faults", "faults_stream"):
        part = data.get(key)
        if part is None:
            continue
        ours = part["policies"]["lbclient"]
        ratio = part["p999_ratio"]
        what = "stream" if key.endswith("stream") else "plain"
        out.append(
            {
                "target": f"SDK via HTTPTransport ({what}): 100% success",
                "measured": f"{ours['success_pct']:.2f}%",
                "met": ours["success_pct"] == 100.0,
            }
        )
        out.append(
            {
                "target": f"({what}) p99.9 <= 1/{TARGET_RATIO:g} of the SDK's own retries",
                "measured": "n/a" if ratio is None else f"1/{ratio:.1f}",
                "met": ratio is not None and ratio >= TARGET_RATIO,
            }
        )
    if "overhead" in data:
        r = data["overhead"]["ratio"]
        out.append(
            {
                "target": f"transport client CPU <= {TARGET_OVERHEAD}x plain httpx",
                "measured": f"{r:.3f}x",
                "met": r <= TARGET_OVERHEAD,
            }
        )
    if "fallback" in data:
        f = data["fallback"]
        out.append(
            {
                "target": "primary down: 100% served by the fallback, <= 1 extra attempt each",
                "measured": f"{f['served_by_fallback_pct']:.1f}%, "
                f"{f['primary_attempts_per_call']:.2f} extra",
                "met": f["served_by_fallback_pct"] == 100.0
                and f["primary_attempts_per_call"] <= 1.0,
            }
        )
    return out


def print_tables(data: dict[str, Any]) -> None:
    for key in ("faults", "faults_stream"):
        part = data.get(key)
        if part is None:
            continue
        table = Table(title=f"[b]{key}[/b]: 4 replicas, one failing 50%, one straggling 2% at 20x")
        for col in (
            "policy",
            "success",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "attempts/call",
            "share %",
        ):
            table.add_column(col, justify="right")
        for name, r in part["policies"].items():
            lat = r["latency_ms"]
            table.add_row(
                name,
                f"{r['success_pct']:.2f}%",
                f"{lat.get('p50', 0):.0f}",
                f"{lat.get('p99', 0):.0f}",
                f"{lat.get('p99.9', 0):.0f}",
                f"{r['attempts_per_call']:.3f}",
                " / ".join(f"{x:.0f}" for x in r["share_pct"]),
            )
        console.print(table)
    table = Table(title="[b]Targets[/b]")
    for col in ("target", "measured", "met"):
        table.add_column(col)
    for t in targets(data):
        table.add_row(
            t["target"], t["measured"], "[green]yes[/green]" if t["met"] else "[red]NO[/red]"
        )
    console.print(table)


def plot(data: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    parts = [k for k in ("faults", "faults_stream") if k in data]
    fig, axes = plt.subplots(
        1, len(parts) + ("overhead" in data), figsize=(5 * (len(parts) + 1), 4)
    )
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, key in zip(axes, parts, strict=False):
        policies = data[key]["policies"]
        quantiles = ("p50", "p99", "p99.9")
        width = 0.38
        for i, (name, r) in enumerate(policies.items()):
            values = [r["latency_ms"].get(q, 0) for q in quantiles]
            xs = [j + i * width for j in range(len(quantiles))]
            ax.bar(xs, values, width, label=f"{name} ({r['success_pct']:.1f}% ok)")
        ax.set_xticks([j + width / 2 for j in range(len(quantiles))], quantiles)
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title(f"{key}: 1 of 4 fails 50%, 1 straggles")
        ax.legend(fontsize=8)
    if "overhead" in data:
        ax = axes[-1]
        cpu = data["overhead"]["cpu_us_per_request"]
        ax.bar(list(cpu), list(cpu.values()), color=["#888", "#36c"])
        ax.set_ylabel("client CPU per request (us)")
        ax.set_title(f"transport overhead: {data['overhead']['ratio']:.3f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def main(args: argparse.Namespace) -> int:
    parts = set(args.parts.split(","))
    data: dict[str, Any] = {
        "machine": machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "versions": {"openai": openai.__version__, "httpx": httpx.__version__},
    }
    started = time.monotonic()
    timings: dict[str, float] = {}

    async def timed(name: str, part: Awaitable[dict[str, Any]]) -> None:
        t0 = time.monotonic()
        data[name] = await part
        timings[name] = round(time.monotonic() - t0, 1)

    if "faults" in parts:
        console.print("[b]faults[/b]")
        await timed("faults", part_faults(args, stream=False))
        if not args.no_stream:
            await timed("faults_stream", part_faults(args, stream=True))
    if "overhead" in parts:
        console.print("[b]overhead[/b]")
        await timed("overhead", part_overhead(args))
    if "fallback" in parts:
        console.print("[b]fallback[/b]")
        await timed("fallback", part_fallback(args))
    data["part_seconds"] = timings
    data["targets"] = targets(data)
    data["seconds"] = time.monotonic() - started
    if hasattr(os, "getloadavg"):
        data["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out = Path(args.out)
    write_json(out / "sdk.json", data)
    plot(data, out / "sdk.png")
    print_tables(data)
    console.print(f"wrote {out / 'sdk.json'} and sdk.png in {data['seconds']:.0f} s")
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter runs (~40 s)")
    p.add_argument("--parts", default="faults,overhead,fallback")
    p.add_argument("--no-stream", action="store_true", help="skip the streaming fault run")
    p.add_argument("--calls", type=int, default=None, help="calls per fault run (3000; quick 800)")
    p.add_argument("--rate", type=float, default=100.0, help="calls per second (100)")
    p.add_argument("--overhead-requests", type=int, default=None, help="per round (500; 200)")
    p.add_argument("--overhead-rounds", type=int, default=None, help="rounds (12; quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured calls first (calls/10)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (6; quick 2)")
    p.add_argument("--fallback-calls", type=int, default=200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.calls is None:
        args.calls = 800 if args.quick else 3000
    if args.overhead_requests is None:
        args.overhead_requests = 200 if args.quick else 500
    if args.overhead_rounds is None:
        args.overhead_rounds = 4 if args.quick else 12
    if args.rounds is None:
        args.rounds = 2 if args.quick else 6
    if args.quick:
        args.fallback_calls = min(args.fallback_calls, 100)
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
