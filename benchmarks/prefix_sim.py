"""The prefix-cache benchmark on simulated time: sweeps in seconds, same workload as
``prefix.py``.

The replicas are ``prefix.py``'s fake replicas (``ReplicaFleet`` with its prefix-cache
model, :class:`lbclient.testing.PrefixCache`): ``slots`` concurrent requests, a FIFO
queue, a service time of ``(base x lognormal(sigma 0.25) + prefill x uncached blocks) /
speed``, the cache looked up (and filled) when the request takes its slot.  The client
side is lbclient itself -- a real ``Balancer`` on a fake clock set to simulated time, its
real strategies, leases and load accounting -- so what is swept here is the real picking
code; only the network and the event loop are missing (``prefix.py`` has them).

Besides lbclient's strategies it runs ``sglang``: SGLang's ``cache_aware`` policy as its
router implements it (same radix tree, cache threshold 0.3, balance thresholds 64 / 1.5:
longest match above the threshold, else the worker with the smallest tree; shortest
queue whenever the pool is imbalanced), for comparison.

::

    python benchmarks/prefix_sim.py                 # the scenarios of prefix.py + sweeps
    python benchmarks/prefix_sim.py --quick
    python benchmarks/prefix_sim.py --gains 1,2,4,8 --loads 0.4,0.6,0.8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lbclient
from _chat import Workload, make
from lbclient.pool.load import outstanding
from lbclient.pool.state import EndpointState
from lbclient.strategies import PickContext
from lbclient.strategies._radix import RadixTree, Tenant
from lbclient.testing import FakeClock, PrefixCache
from sim import Replica, Sim, _Req

SIGMA = 0.25


class Fleet:
    """``prefix.py``'s fleet: speeds per replica, slots, decode base, prefill per block."""

    def __init__(
        self,
        speeds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        *,
        slots: int = 4,
        base: float = 0.020,
        prefill: float = 0.0025,
        cache_blocks: int = 5000,
        block: int = 64,
    ) -> None:
        self.speeds = tuple(speeds)
        self.slots = slots
        self.base = base
        self.prefill = prefill
        self.cache_blocks = cache_blocks
        self.block = block


class _TextReq(_Req):
    __slots__ = ("text",)

    def __init__(self, rid: int, text: str, on_done: Any) -> None:
        super().__init__(rid, 0.0, on_done)
        self.text = text


class CacheReplica(Replica):
    """sim.Replica whose service time is drawn when the request starts, from its cache."""

    def __init__(self, sim: Sim, index: int, fleet: Fleet, speed: float, seed: int) -> None:
        super().__init__(sim, index, fleet.slots, speed)
        self.fleet = fleet
        self.cache = PrefixCache(fleet.cache_blocks, fleet.block)
        self.rng = random.Random(seed * 1000 + index)

    def _start(self, req: _Req) -> None:
        f = self.fleet
        assert isinstance(req, _TextReq)
        cached, total = self.cache.serve(req.text)
        mu = -(SIGMA**2) / 2
        req.service = (
            f.base * self.rng.lognormvariate(mu, SIGMA) + f.prefill * (total - cached)
        ) / self.speed
        super()._start(req)


# --------------------------------------------------------------- SGLang's cache_aware


class _SglPicker:
    def __init__(self, states: Sequence[EndpointState], ctx: PickContext, cfg: SGLang) -> None:
        self.cfg = cfg
        self.tree = RadixTree()
        self.tenants = {s: Tenant(s.url, cfg.max_chars) for s in states}
        self.states = tuple(states)
        self.now = ctx.clock.now

    def pick(
        self, call: lbclient.CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        states = [s for s in self.states if not exclude or s not in exclude] or list(self.states)
        now = self.now()
        loads = [outstanding(s, now) for s in states]
        hi, lo = max(loads), min(loads)
        text = (call.prefix if call is not None else None) or ""
        m = self.tree.match(text)
        if hi - lo > self.cfg.abs and hi > lo * self.cfg.rel:
            best = states[loads.index(lo)]
        else:
            held = self.tree.lengths(m, len(states)) if m.path else {}
            top = max(states, key=lambda s: held.get(self.tenants[s], 0))
            rate = held.get(self.tenants[top], 0) / len(text) if text else 0.0
            if rate > self.cfg.threshold:
                best = top
            else:
                best = min(states, key=lambda s: self.tenants[s].chars)
        if text:
            self.tree.insert(self.tenants[best], m)
        return best


class SGLang:
    """SGLang's ``cache_aware`` as its router does it (see the module docstring)."""

    name = "sglang"
    uses_prefix = True  # ChatClient: derive the prompt text for it

    def __init__(self, threshold: float = 0.3, abs_: float = 64, rel: float = 1.5) -> None:
        self.threshold, self.abs, self.rel = threshold, abs_, rel
        self.max_chars = 1_000_000

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _SglPicker:
        return _SglPicker(states, ctx, self)


# ----------------------------------------------------------------------------- runs


def run(
    fleet: Fleet,
    work: Workload,
    strategy: str,
    *,
    seed: int = 0,
    gain: float | None = None,
    prefix: object = None,
    events: Sequence[tuple[float, str, int]] = (),
) -> dict[str, Any]:
    """One strategy over the workload: latency and the replicas' hit ratio."""
    sim = Sim()
    reps = [CacheReplica(sim, i, fleet, s, seed) for i, s in enumerate(fleet.speeds)]
    urls = [f"http://10.0.0.{i + 1}:8000" for i in range(len(reps))]
    by_url = dict(zip(urls, reps, strict=True))
    clock = FakeClock()
    strat: object = strategy
    if strategy == "sglang":
        strat = SGLang()
    elif strategy == "prefix" and gain is not None:
        strat = lbclient.strategies.Prefix(hit_gain=gain)
    if strategy == "prefix" and prefix is not None:
        strat = prefix
    lb = lbclient.Balancer(urls, strategy=strat, clock=clock, rng=seed)
    pool = lb._pool
    lat: list[float] = []
    prompt = lbclient.prompt_text

    def arrive(i: int) -> None:
        r = work.requests[i]
        clock._now = sim.now
        text = prompt(r.messages)
        call = lbclient.CallContext(key=r.conversation, prefix=text, started=r.at)
        lease = pool.acquire(call, None, sim.now)
        req = _TextReq(i, text, lambda q, t: done(lease, r.at, t))
        by_url[lease.state.url].submit(req)

    def done(lease: Any, t0: float, t: float) -> None:
        clock._now = t
        lease.ok(t)
        lat.append(t - t0)

    def event(kind: str, idx: int) -> None:
        if kind == "clear":
            reps[idx].cache.clear()

    for i, r in enumerate(work.requests):
        sim.at(r.at, lambda i=i: arrive(i))
    for at, kind, idx in events:
        sim.at(at, lambda kind=kind, idx=idx: event(kind, idx))
    sim.run()
    hits = sum(r.cache.cached_blocks for r in reps)
    blocks = sum(r.cache.prompt_blocks for r in reps)
    s = sorted(lat)
    return {
        "strategy": strategy if gain is None else f"{strategy}(gain={gain:g})",
        "mean_ms": 1e3 * statistics.fmean(s),
        "p50_ms": 1e3 * s[len(s) // 2],
        "p99_ms": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))],
        "hit_ratio": hits / blocks if blocks else 0.0,
        "share": [round(r.received / len(s), 3) for r in reps],
    }


def capacity(fleet: Fleet, work: Workload, hit: float) -> float:
    """Requests per second the fleet serves if a share ``hit`` of prompt blocks is
    cached (a rough yardstick for choosing the rate)."""
    blocks = work.mean_chars / fleet.block
    service = fleet.base + fleet.prefill * blocks * (1.0 - hit)
    return sum(fleet.slots * s for s in fleet.speeds) / service


STRATEGIES = ("prefix", "power_of_two", "consistent_hash", "round_robin", "sglang")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=0)
    ap.add_argument(
        "--rate", type=float, default=0.0, help="requests/s (default: the base scenario)"
    )
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--gains", default="", help="sweep Prefix(hit_gain=) over these")
    ap.add_argument("--loads", default="", help="sweep the rate: fractions of the base rate")
    ap.add_argument("--seeds", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    n = args.requests or (1500 if args.quick else 4000)
    seeds = args.seeds or (1 if args.quick else 3)
    rate = args.rate or 90.0
    strategies = args.strategies.split(",")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def scenario(name: str, fleet: Fleet, **kw: Any) -> None:
        r = kw.pop("rate", rate)
        unique = kw.pop("unique", False)
        events = kw.pop("events", ())
        strats = kw.pop("strategies", strategies)
        gains = kw.pop("gains", [None])
        for strategy in strats:
            for g in gains if strategy == "prefix" else [None]:
                res = [
                    run(
                        fleet,
                        make(requests=n, rate=r, unique=unique, seed=seed + 1),
                        strategy,
                        seed=seed,
                        gain=g,
                        events=events,
                    )
                    for seed in range(seeds)
                ]
                row = {
                    "scenario": name,
                    "rate": r,
                    "strategy": res[0]["strategy"],
                    **{
                        k: statistics.fmean(x[k] for x in res)
                        for k in ("mean_ms", "p50_ms", "p99_ms", "hit_ratio")
                    },
                    "share": res[0]["share"],
                }
                rows.append(row)
                print(
                    f"{name:>14} {r:6.0f}/s {row['strategy']:>18}  mean {row['mean_ms']:7.1f}  p50 {row['p50_ms']:7.1f}"
                    f"  p99 {row['p99_ms']:7.1f}  hit {row['hit_ratio']:.3f}  share {row['share']}",
                    flush=True,
                )

    base = Fleet()
    if args.gains:
        gains = [float(g) for g in args.gains.split(",")]
        scenario("gain", base, strategies=["prefix"], gains=gains)
        scenario("gain-slow", Fleet((0.5, 1, 1, 1)), strategies=["prefix"], gains=gains)
    elif args.loads:
        for f in (float(x) for x in args.loads.split(",")):
            scenario(f"load {f:g}", base, rate=rate * f)
    else:
        scenario("base", base)
        scenario("slow replica", Fleet((0.5, 1.0, 1.0, 1.0)))
        scenario("unique", base, unique=True, strategies=["prefix", "power_of_two", "peak_ewma"])
        scenario(
            "restart",
            base,
            events=[(n / rate / 2, "clear", 0)],
            strategies=["prefix", "power_of_two"],
        )
        for f in (0.4, 0.7, 1.15):
            scenario(
                f"load {f:g}",
                base,
                rate=rate * f,
                strategies=["prefix", "power_of_two", "consistent_hash"],
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_sim.json").write_text(
        json.dumps(
            {"requests": n, "seeds": seeds, "rows": rows, "loadavg": os.getloadavg()}, indent=1
        )
    )
    print(f"{time.perf_counter() - t0:.0f} s; wrote {out / 'prefix_sim.json'}")
    _ = math
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
