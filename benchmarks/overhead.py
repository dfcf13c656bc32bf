"""What lbclient costs the client: per-call overhead, pick time vs pool size, and CPU per
real HTTP request.

::

    python benchmarks/overhead.py              # ~2 minutes
    python benchmarks/overhead.py --quick      # ~20 s, noisier
    python benchmarks/overhead.py --iterations 2000 --repeats 1 --http-requests 200

1. **Decorator overhead** -- µs per ``await f()`` where ``f`` is ``@lb.route`` on
   ``async def noop(ep): return None``, for every registered strategy (10 endpoints) and
   for ``peak_ewma`` with ``Retry()``, ``Breaker()``, both, and ``Hedge(delay=10.0)``
   (armed on every call, never fires), and -- when ``redis-server`` is installed --
   ``Breaker()`` and ``Admission`` with a tenant quota, each with and without
   ``shared=lbclient.RedisState(...)`` (a real redis-server on loopback; the background
   sync runs while the calls are timed), against the floor ``await noop(None)``.  What
   ``shared=`` adds is also measured paired (:func:`shared_ab`: the two twins alternate
   over many short rounds; the median difference).  Calls
   are awaited one after the other in one event loop; best of ``--repeats`` runs of
   ``--iterations`` calls each; the garbage collector is paused while timing.
2. **Pick time vs pool size** -- ns per ``picker.pick(key, None)`` (the strategy alone)
   and per ``pool.acquire(...)`` + ``lease.ok()`` (pick plus the bookkeeping of a
   call) for pools of 10 .. 10,000 endpoints (4 regions, client in us-east-1).  The
   Python loop around the call is included (~20-30 ns).  ``consistent_hash`` is timed
   with keys (``key=None`` would fall back to ``peak_ewma``).
   Metrics variants (``peak_ewma``, 10 endpoints): ``metrics off``, ``Prometheus
   collector on`` (a :class:`lbclient.metrics.PrometheusCollector` registered, so the
   per-call recorder is attached) and ``OpenTelemetry on`` (an SDK ``MeterProvider``
   with an ``InMemoryMetricReader``), interleaved with the rest.
2b. **Scrape time** -- ms per scrape of a balancer with 1,000 endpoints after some
   calls (successes and failures): ``collector.collect()`` with every family built, and
   ``prometheus_client.generate_latest`` of a registry holding the collector, and
   ``lbclient.metrics.render`` of the same registry (the same text, the writer
   ``examples/service.py`` uses): the text a Prometheus server receives.  Best and
   median of the runs.
3. **Client CPU per real HTTP request** -- ``time.process_time()`` per request for
   requests at concurrency 8 to fake replicas (``base_latency=0.001``) running in a
   *separate process*, so only the client's CPU is counted: raw aiohttp with
   ``itertools.cycle`` vs the same function under ``@lb.route`` (``peak_ewma``).  Rounds
   alternate between the two; the median round is reported.

Results are printed as rich tables and saved to ``overhead.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
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
import lbclient
from lbclient import strategies

REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "ap-southeast-1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--iterations", type=int, default=200_000, help="calls per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (best kept)")
    p.add_argument("--sizes", default="10,100,1000,10000", help="pool sizes for pick time")
    p.add_argument("--pick-seconds", type=float, default=0.15, help="target time per pick run")
    p.add_argument("--http-requests", type=int, default=3000, help="requests per CPU round")
    p.add_argument("--http-rounds", type=int, default=3, help="CPU rounds per mode")
    p.add_argument("--skip-http", action="store_true", help="skip the CPU-per-request part")
    p.add_argument("--quick", action="store_true", help="fewer iterations (noisier)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations = min(args.iterations, 20_000)
        args.repeats = min(args.repeats, 3)
        args.pick_seconds = min(args.pick_seconds, 0.05)
        args.http_requests = min(args.http_requests, 1000)
        args.http_rounds = min(args.http_rounds, 2)
    return args


def _urls(n: int) -> list[lbclient.Endpoint]:
    return [
        lbclient.Endpoint(
            f"http://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:8000",
            region=REGIONS[i % len(REGIONS)],
        )
        for i in range(n)
    ]


# --------------------------------------------------------------- 1. decorator overhead


async def noop(ep: object) -> None:
    return None


async def _time_calls(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    """ns per ``await fn()`` over one run of ``n`` sequential calls (GC paused).

    A no-op call never suspends, so the event loop would never run during the loop;
    yielding to it every 1024 calls (amortised: a few ns per call) lets it do its
    housekeeping as in a real program -- e.g. purge the cancelled timers of ``Hedge``.
    """
    sleep = asyncio.sleep
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for i in range(n):
            await fn()
            if not i & 1023:
                await sleep(0)
        dt = time.perf_counter_ns() - t0
    finally:
        gc.enable()
    return dt / n


SHARED_PAIRS = (
    ("peak_ewma + Breaker()", "peak_ewma + Breaker() + shared="),
    ("peak_ewma + Admission(quota)", "peak_ewma + Admission(quota) + shared="),
)
"""(off, on) pairs: what ``shared=lbclient.RedisState(...)`` adds to a decorated call."""


def _shared_variants(redis_url: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """The ``shared=`` variants (a real redis-server) and their twin without it."""
    pe = {"strategy": "peak_ewma"}
    state = lbclient.RedisState(redis_url, namespace="overhead")
    # A quota that never refuses: the admitted path is what is timed.
    quota = lbclient.Admission(limit=1000, quotas={"*": lbclient.Quota(requests_per_second=1e9)})
    tenant = {"tenant": lambda: "acme"}
    return [
        (
            "peak_ewma + Breaker() + shared=",
            {**pe, "breaker": lbclient.Breaker(), "shared": state},
            {},
        ),
        ("peak_ewma + Admission(quota)", {**pe, "admission": quota}, tenant),
        (
            "peak_ewma + Admission(quota) + shared=",
            {**pe, "admission": quota, "shared": state},
            tenant,
        ),
    ]


def _variants() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, Balancer kwargs, route kwargs) of every timed variant."""
    out: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for name in strategies.names():
        out.append((name, {"strategy": name}, {}))
    out.append(
        ("consistent_hash, key=", {"strategy": "consistent_hash"}, {"key": lambda: "user-42"})
    )
    prompt = "system: " + "You are a helpful assistant. " * 140  # ~4,000 characters
    out.append(("prefix, prefix= (4k chars)", {"strategy": "prefix"}, {"prefix": lambda: prompt}))
    pe = {"strategy": "peak_ewma"}
    out += [
        ("peak_ewma + Retry()", {**pe, "retry": lbclient.Retry()}, {}),
        ("peak_ewma + Breaker()", {**pe, "breaker": lbclient.Breaker()}, {}),
        (
            "peak_ewma + Retry() + Breaker()",
            {**pe, "retry": lbclient.Retry(), "breaker": lbclient.Breaker()},
            {},
        ),
        ("peak_ewma + Hedge(delay=10.0)", {**pe, "hedge": lbclient.Hedge(delay=10.0)}, {}),
        ("peak_ewma + Admission()", {**pe, "admission": lbclient.Admission()}, {}),
    ]
    return out


def _metrics_variants() -> list[tuple[str, Callable[[lbclient.Balancer], Callable[[], Any]]]]:
    """(label, attach) of the metrics variants; ``attach(lb)`` returns a cleanup.  A
    variant whose library is not installed is left out."""

    def off(lb: lbclient.Balancer) -> Callable[[], Any]:
        return lambda: None

    out = [("peak_ewma, metrics off", off)]
    try:
        from prometheus_client import CollectorRegistry

        from lbclient.metrics import PrometheusCollector

        def prometheus(lb: lbclient.Balancer) -> Callable[[], Any]:
            CollectorRegistry().register(PrometheusCollector(lb))
            return lambda: None

        out.append(("peak_ewma, Prometheus collector on", prometheus))
    except ImportError:  # pragma: no cover
        pass
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        from lbclient.metrics import OpenTelemetry

        def otel(lb: lbclient.Balancer) -> Callable[[], Any]:
            provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
            OpenTelemetry(lb, meter_provider=provider)
            return provider.shutdown

        out.append(("peak_ewma, OpenTelemetry on", otel))
    except ImportError:  # pragma: no cover
        pass
    return out


async def decorator_overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Best of ``repeats`` per variant.  The repeats are interleaved (every variant once,
    then again...) so a burst of noise from a neighbour on a shared machine spoils one
    run of many variants rather than every run of one."""
    n, repeats = args.iterations, args.repeats

    async def floor() -> None:
        await noop(None)

    timed: list[tuple[str, Callable[[], Awaitable[Any]], lbclient.Balancer | None]] = [
        ("await noop(None)  (floor)", floor, None)
    ]
    variants = _variants()
    redis = _redis_server()
    if redis is not None:
        variants += _shared_variants(redis.url)
    for label, kwargs, route_kw in variants:
        balancer = lbclient.Balancer(_urls(10), region="us-east-1", rng=1, **kwargs)
        route = balancer.route(**route_kw) if route_kw else balancer.route
        timed.append((label, route(noop), balancer))
        if "shared" in kwargs:  # timed while its background sync runs, as in production
            await balancer.start()
            for _ in range(200):
                shared = balancer.stats().shared
                if shared is not None and shared.mode == "connected":
                    break
                await asyncio.sleep(0.01)
            else:
                raise RuntimeError(f"{label}: could not reach {redis.url}")
    cleanups: list[Callable[[], Any]] = []
    for label, attach in _metrics_variants():
        balancer = lbclient.Balancer(_urls(10), region="us-east-1", rng=1, strategy="peak_ewma")
        cleanups.append(attach(balancer))
        timed.append((label, balancer.route(noop), balancer))
    best = {label: float("inf") for label, _, _ in timed}
    for _ in range(repeats):
        for label, call, _ in timed:
            best[label] = min(best[label], await _time_calls(call, n))
    floor_ns = best[timed[0][0]]
    rows: list[dict[str, Any]] = []
    for label, _, maybe_lb in timed:
        if maybe_lb is not None:
            st = maybe_lb.stats()
            assert st.calls == n * repeats and st.in_flight == 0, (label, st)
        row = {"variant": label, "ns": best[label], "overhead_ns": best[label] - floor_ns}
        if maybe_lb is not None and maybe_lb.stats().shared is not None:
            # A tight loop of no-op calls yields to the event loop only every 1024
            # calls, so Redis replies can miss their 50 ms timeout: say whether the link
            # degraded while it was timed (the call path is the same in every mode).
            sh = maybe_lb.stats().shared
            row["shared"] = {
                "rounds": sh.rounds,
                "errors": sh.errors,
                "degraded": sh.degraded_total,
            }
        rows.append(row)
        if maybe_lb is not None:
            await maybe_lb.aclose()
    for cleanup in cleanups:
        cleanup()
    if redis is not None:
        redis.stop()
    return rows


async def shared_ab(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """What ``shared=`` adds to a decorated call, paired: for each (off, on) pair the
    two balancers run alternately, ``rounds`` times ``calls`` calls each, and the
    median of the per-round differences is reported (a neighbour's burst of noise
    spoils one round of both, not the comparison).  The loop yields every 64 calls, so
    the link's Redis replies are served and it stays connected, as in a program that
    awaits I/O; the background sync runs throughout.  None without redis-server."""
    redis = _redis_server()
    if redis is None:
        return None
    rounds = 60 if args.repeats >= 5 else max(6, 4 * args.repeats)
    calls = min(20_000, max(500, args.iterations // 10))
    out = []
    try:
        pairs = {label: (kw, rkw) for label, kw, rkw in _variants() + _shared_variants(redis.url)}
        for off, on in SHARED_PAIRS:
            lbs, routes = [], []
            for label in (off, on):
                kwargs, route_kw = pairs[label]
                lb = lbclient.Balancer(_urls(10), region="us-east-1", rng=1, **kwargs)
                route = lb.route(**route_kw) if route_kw else lb.route
                lbs.append(lb)
                routes.append(route(noop))
                await lb.start()
            for _ in range(200):
                shared = lbs[1].stats().shared
                if shared is not None and shared.mode == "connected":
                    break
                await asyncio.sleep(0.01)
            deltas = []
            for _ in range(rounds):
                ns = []
                for fn in routes:
                    gc.collect()
                    gc.disable()
                    try:
                        t0 = time.perf_counter_ns()
                        for i in range(calls):
                            await fn()
                            if not i & 63:
                                await asyncio.sleep(0)
                        ns.append((time.perf_counter_ns() - t0) / calls)
                    finally:
                        gc.enable()
                deltas.append(ns[1] - ns[0])
            sh = lbs[1].stats().shared
            assert sh is not None
            deltas.sort()
            out.append(
                {
                    "off": off,
                    "on": on,
                    "rounds": rounds,
                    "calls_per_round": calls,
                    "median_extra_ns": statistics.median(deltas),
                    "p25_extra_ns": deltas[len(deltas) // 4],
                    "p75_extra_ns": deltas[3 * len(deltas) // 4],
                    "link": {
                        "mode": sh.mode,
                        "rounds": sh.rounds,
                        "errors": sh.errors,
                        "degraded": sh.degraded_total,
                    },
                }
            )
            for lb in lbs:
                await lb.aclose()
    finally:
        redis.stop()
    return out


def _redis_server() -> Any:
    """A real redis-server for the ``shared=`` variants (None: not installed)."""
    from lbclient.testing import RedisServer

    try:
        return RedisServer().start()
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------- 2b. scrape time


async def scrape_time(args: argparse.Namespace, size: int = 1000) -> dict[str, Any] | None:
    """ms per scrape of a ``size``-endpoint balancer that has served calls: every
    endpoint has latency statistics, some failures, a breaker; the histograms are
    filled.  Runs alternate between ``collect()`` and ``generate_latest``."""
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from lbclient.metrics import PrometheusCollector, render
    except ImportError:  # pragma: no cover
        return None
    lb = lbclient.Balancer(
        _urls(size),
        region="us-east-1",
        rng=1,
        retry=lbclient.Retry(attempts=2, backoff=0.0, max_backoff=0.0),
        breaker=lbclient.Breaker(),
    )
    collector = PrometheusCollector(lb, balancer="bench")
    registry = CollectorRegistry()
    registry.register(collector)
    calls = 0

    @lb.route
    async def work(ep: lbclient.Endpoint) -> None:
        nonlocal calls
        calls += 1
        if calls % 7 == 0:
            raise ConnectionError("injected")  # retried: failures and retries to show

    for _ in range(size * 5):
        await work()
    for _ in range(3):  # warm both paths
        collector.collect()
        generate_latest(registry)
    collect_ms: list[float] = []
    text_ms: list[float] = []
    render_ms: list[float] = []
    samples = 0
    size_bytes = 0
    for _ in range(max(3, args.repeats * 2)):
        gc.collect()
        t0 = time.perf_counter()
        families = collector.collect()
        samples = sum(len(f.samples) for f in families)
        t1 = time.perf_counter()
        size_bytes = len(generate_latest(registry))
        t2 = time.perf_counter()
        render(registry)  # collect() + the text, as a scrape
        t3 = time.perf_counter()
        collect_ms.append((t1 - t0) * 1000)
        text_ms.append((t2 - t1) * 1000)
        render_ms.append((t3 - t2) * 1000)
    await lb.aclose()
    return {
        "endpoints": size,
        "samples": samples,
        "bytes": size_bytes,
        "collect_ms_best": min(collect_ms),
        "collect_ms_median": statistics.median(collect_ms),
        "generate_latest_ms_best": min(text_ms),
        "generate_latest_ms_median": statistics.median(text_ms),
        "render_ms_best": min(render_ms),
        "render_ms_median": statistics.median(render_ms),
        "runs": len(collect_ms),
    }


# ----------------------------------------------------------------- 2. pick vs pool size


def _time_loop(body: Callable[[int], None], seconds: float, repeats: int) -> tuple[float, int]:
    """Best ns per ``body(n)`` iteration, with ``n`` calibrated to ~``seconds``."""
    n = 64
    while True:
        t0 = time.perf_counter_ns()
        body(n)
        dt = time.perf_counter_ns() - t0
        if dt >= seconds * 1e9 / 8 or n >= 1 << 22:
            break
        n *= 4
    n = max(64, int(n * seconds * 1e9 / max(dt, 1)))
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter_ns()
            body(n)
            dt = time.perf_counter_ns() - t0
        finally:
            gc.enable()
        best = min(best, dt / n)
    return best, n


def pick_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    keys = [f"user-{i}" for i in range(1024)]
    rows: list[dict[str, Any]] = []
    for name in strategies.names():
        for size in sizes:
            t0 = time.perf_counter()
            lb = lbclient.Balancer(_urls(size), strategy=name, region="us-east-1", rng=1)
            build_ms = (time.perf_counter() - t0) * 1000
            pool = lb._pool
            picker = pool.snap.picker
            assert picker is not None
            pick = picker.pick
            acquire, now = pool.acquire, pool.now
            keyed = name == "consistent_hash"
            calls = [lbclient.CallContext(key=k) for k in keys]

            def picks(n: int) -> None:
                if keyed:
                    for c in itertools.islice(itertools.cycle(calls), n):
                        pick(c, None)
                else:
                    for _ in range(n):
                        pick(None, None)

            def acquires(n: int) -> None:
                if keyed:
                    for c in itertools.islice(itertools.cycle(calls), n):
                        acquire(c, None, now()).ok()
                else:
                    for _ in range(n):
                        acquire(None, None, now()).ok()

            pick_ns, n_pick = _time_loop(picks, args.pick_seconds, args.repeats)
            acq_ns, _ = _time_loop(acquires, args.pick_seconds, args.repeats)
            rows.append(
                {
                    "strategy": name,
                    "size": size,
                    "pick_ns": pick_ns,
                    "acquire_release_ns": acq_ns,
                    "build_ms": build_ms,
                    "iterations": n_pick,
                }
            )
    return rows


# ---------------------------------------------------------- 3. client CPU per request

_SERVER = textwrap.dedent(
    """
    import asyncio, json, sys
    from lbclient.testing import ReplicaConfig, ReplicaFleet

    async def main():
        cfg = ReplicaConfig(base_latency=0.001, sigma=0.0, capacity=64)
        async with ReplicaFleet([cfg] * 4, seed=1) as fleet:
            print(json.dumps(fleet.urls), flush=True)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sys.stdin.read)   # until the parent closes it

    asyncio.run(main())
    """
)


async def _drive(call: Callable[[], Awaitable[Any]], n: int, concurrency: int) -> None:
    left = itertools.count()

    async def worker() -> None:
        while next(left) < n:
            await call()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def client_cpu(args: argparse.Namespace) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        urls: list[str] = json.loads(proc.stdout.readline())
        payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def post(url: str) -> bytes:
                async with session.post(url + "/v1/chat/completions", json=payload) as r:
                    r.raise_for_status()
                    return await r.read()

            cycle = itertools.cycle(urls)

            async def raw() -> bytes:
                return await post(next(cycle))

            lb = lbclient.Balancer(urls, strategy="peak_ewma", rng=1)

            @lb.route
            async def balanced(endpoint: lbclient.Endpoint) -> bytes:
                return await post(endpoint.url)

            modes: dict[str, Callable[[], Awaitable[Any]]] = {
                "raw aiohttp": raw,
                "@lb.route peak_ewma": balanced,
            }
            n = args.http_requests
            for fn in modes.values():  # warm the connection pool and the code paths
                await _drive(fn, min(500, n), 8)
            rounds: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
            for _ in range(args.http_rounds):
                for mode, fn in modes.items():
                    gc.collect()
                    c0, w0 = time.process_time(), time.perf_counter()
                    await _drive(fn, n, 8)
                    c1, w1 = time.process_time(), time.perf_counter()
                    rounds[mode].append(
                        {"cpu_us": (c1 - c0) / n * 1e6, "wall_us": (w1 - w0) / n * 1e6}
                    )
            await lb.aclose()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out: dict[str, Any] = {"requests_per_round": n, "concurrency": 8, "modes": {}}
    for mode, rs in rounds.items():
        out["modes"][mode] = {
            "cpu_us_per_request": statistics.median(r["cpu_us"] for r in rs),
            "wall_us_per_request": statistics.median(r["wall_us"] for r in rs),
            "rounds": rs,
        }
    raw_cpu = out["modes"]["raw aiohttp"]["cpu_us_per_request"]
    lb_cpu = out["modes"]["@lb.route peak_ewma"]["cpu_us_per_request"]
    out["ratio"] = lb_cpu / raw_cpu if raw_cpu > 0 else None
    return out


# ------------------------------------------------------------------------------ main


def decorator_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(
        title="[b]Decorator overhead[/b] (no-op call, 10 endpoints, sequential awaits)",
        title_justify="left",
    )
    t.add_column("variant")
    t.add_column("µs / call", justify="right")
    t.add_column("overhead µs", justify="right")
    for r in rows:
        t.add_row(r["variant"], f"{r['ns'] / 1000:.2f}", f"{r['overhead_ns'] / 1000:.2f}")
    return t


def pick_table(rows: list[dict[str, Any]]) -> Table:
    sizes = sorted({r["size"] for r in rows})
    t = Table(
        title="[b]Pick time vs pool size[/b] (ns: picker.pick / acquire+release)",
        title_justify="left",
    )
    t.add_column("strategy")
    for size in sizes:
        t.add_column(f"{size:,}", justify="right")
    t.add_column(f"{sizes[-1]:,} / {sizes[0]:,}", justify="right")
    for name in dict.fromkeys(r["strategy"] for r in rows):
        by = {r["size"]: r for r in rows if r["strategy"] == name}
        cells = [f"{by[s]['pick_ns']:,.0f} / {by[s]['acquire_release_ns']:,.0f}" for s in sizes]
        ratio = by[sizes[-1]]["pick_ns"] / by[sizes[0]]["pick_ns"]
        t.add_row(name, *cells, f"{ratio:.1f}x")
    return t


def scrape_table(scrape: dict[str, Any]) -> Table:
    t = Table(
        title=f"[b]Prometheus scrape[/b] ({scrape['endpoints']:,} endpoints, "
        f"{scrape['samples']:,} samples, {scrape['bytes'] / 1e6:.1f} MB of text, "
        f"{scrape['runs']} runs)",
        title_justify="left",
    )
    t.add_column("what")
    t.add_column("best ms", justify="right")
    t.add_column("median ms", justify="right")
    t.add_row(
        "collector.collect()",
        f"{scrape['collect_ms_best']:.1f}",
        f"{scrape['collect_ms_median']:.1f}",
    )
    t.add_row(
        "generate_latest(registry)",
        f"{scrape['generate_latest_ms_best']:.1f}",
        f"{scrape['generate_latest_ms_median']:.1f}",
    )
    t.add_row(
        "lbclient.metrics.render(registry)",
        f"{scrape['render_ms_best']:.1f}",
        f"{scrape['render_ms_median']:.1f}",
    )
    return t


def http_table(http: dict[str, Any]) -> Table:
    t = Table(
        title=f"[b]Client CPU per real HTTP request[/b] ({http['requests_per_round']} "
        f"requests x {len(next(iter(http['modes'].values()))['rounds'])} rounds, "
        "concurrency 8, replicas in another process)",
        title_justify="left",
    )
    t.add_column("mode")
    t.add_column("CPU µs / request", justify="right")
    t.add_column("wall µs / request", justify="right")
    for mode, m in http["modes"].items():
        t.add_row(mode, f"{m['cpu_us_per_request']:.0f}", f"{m['wall_us_per_request']:.0f}")
    t.add_row("[b]ratio[/b]", f"[b]{http['ratio']:.3f}x[/b]", "")
    return t


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    dec = {r["variant"]: r for r in result["decorator"]}
    for name, limit in (
        ("power_of_two", 2.0),
        ("peak_ewma", 2.0),
        ("peak_ewma + Retry() + Breaker()", 2.5),
        ("peak_ewma + Hedge(delay=10.0)", 5.0),
    ):
        if name in dec:
            us = dec[name]["overhead_ns"] / 1000
            out.append(
                {
                    "target": f"decorator overhead of {name} <= {limit} µs",
                    "measured": f"{us:.2f} µs",
                    "met": us <= limit,
                }
            )
    if "peak_ewma" in dec and "peak_ewma + Admission()" in dec:
        extra = (dec["peak_ewma + Admission()"]["ns"] - dec["peak_ewma"]["ns"]) / 1000
        out.append(
            {
                "target": "Admission() with room: <= 1 µs above peak_ewma",
                "measured": f"{extra:+.2f} µs",
                "met": extra <= 1.0,
            }
        )
    off = dec.get("peak_ewma, metrics off")
    if off is not None:
        for label, limit in (("peak_ewma, Prometheus collector on", 0.3),):
            if label in dec:
                extra = (dec[label]["ns"] - off["ns"]) / 1000
                out.append(
                    {
                        "target": f"{label.split(', ')[1]}: <= {limit} µs above metrics off",
                        "measured": f"{extra:+.2f} µs",
                        "met": extra <= limit,
                    }
                )
    scrape = result.get("scrape")
    if scrape:
        ms = scrape["render_ms_median"]
        out.append(
            {
                "target": f"scrape of {scrape['endpoints']:,} endpoints (render) <= 50 ms",
                "measured": f"{ms:.1f} ms (collect() {scrape['collect_ms_median']:.0f} ms, "
                f"generate_latest {scrape['generate_latest_ms_median']:.0f} ms)",
                "met": ms <= 50.0,
            }
        )
    rows = result["pick"]
    sizes = sorted({r["size"] for r in rows})
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for name in dict.fromkeys(r["strategy"] for r in rows):
            if name.startswith("least_") or name == "prefix":
                continue  # O(n) by design: they compare every endpoint
            by = {r["size"]: r["pick_ns"] for r in rows if r["strategy"] == name}
            ratio = by[hi] / by[lo]
            out.append(
                {
                    "target": f"{name}: pick time at {hi:,} <= 3x at {lo:,}",
                    "measured": f"{by[lo]:.0f} -> {by[hi]:.0f} ns ({ratio:.2f}x)",
                    "met": ratio <= 3.0,
                }
            )
    for ab in result.get("shared_ab") or ():
        extra = ab["median_extra_ns"] / 1000
        out.append(
            {
                "target": f"shared= adds <= 0.5 µs to '{ab['off']}' (paired, median)",
                "measured": f"{extra:+.2f} µs (IQR {ab['p25_extra_ns'] / 1000:+.2f} .. "
                f"{ab['p75_extra_ns'] / 1000:+.2f}; link {ab['link']['mode']}, "
                f"{ab['link']['degraded']} degradations)",
                "met": extra <= 0.5,
            }
        )
    http = result.get("http")
    if http and http.get("ratio") is not None:
        out.append(
            {
                "target": "client CPU per request through @lb.route <= 1.25x raw aiohttp",
                "measured": f"{http['ratio']:.3f}x",
                "met": http["ratio"] <= 1.25,
            }
        )
    return out


async def main_async(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    info = _report.machine_info()
    console.print(
        f"[b]lbclient overhead[/b] -- {info['cpu_count']} CPU(s), Python "
        f"{sys.version.split()[0]}, load average {info.get('loadavg_at_start')}"
    )
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}}
    with console.status("decorator overhead..."):
        result["decorator"] = await decorator_overhead(args)
    console.print(decorator_table(result["decorator"]))
    with console.status("shared= paired with its twin..."):
        result["shared_ab"] = await shared_ab(args)
    with console.status("scrape time..."):
        result["scrape"] = await scrape_time(args)
    if result["scrape"] is not None:
        console.print(scrape_table(result["scrape"]))
    with console.status("pick time vs pool size..."):
        result["pick"] = pick_scaling(args)
    console.print(pick_table(result["pick"]))
    if not args.skip_http:
        with console.status("client CPU per HTTP request..."):
            result["http"] = await client_cpu(args)
        console.print(http_table(result["http"]))
    result["targets"] = targets(result)
    console.print(_report.targets_table(result["targets"]))
    result["wall_seconds"] = time.perf_counter() - started
    path = args.out / "overhead.json"
    _report.write_json(path, result)
    console.print(f"wrote {path} in {result['wall_seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
