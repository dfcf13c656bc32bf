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

    python benchmarks/prefix_sim.py                 # prefix.py's scenarios and more, 3 seeds
    python benchmarks/prefix_sim.py --quick         # 1 seed, 1500 requests (~30 s)
    python benchmarks/prefix_sim.py --gains 4,8,32 --strategies prefix   # sweep hit_gain

Scenarios: prefix.py's (``base``, ``slow``, ``unique``, ``hot``, ``load0.6``,
``load1.2``), ``one-system`` (every conversation under one 2,000-character system
prompt), and the same chat on another fleet shape, 4 replicas x 4 slots (``4x4``,
``4x4-slow``; the rate scaled to the same capacity).
"""

from __future__ import annotations

import argparse
import json
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
from _chat import FLEET, RATE, WORKLOAD, Workload, make
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
        speeds: Sequence[float] = (1.0,) * int(FLEET["replicas"]),
        *,
        slots: int = int(FLEET["slots"]),
        base: float = FLEET["base"],
        prefill: float = FLEET["prefill"],
        cache_blocks: int = int(FLEET["cache_blocks"]),
        block: int = int(FLEET["block"]),
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


STRATEGIES = ("prefix", "power_of_two", "consistent_hash", "round_robin", "sglang")
N = int(FLEET["replicas"])
SLOW = (0.5,) + (1.0,) * (N - 1)
# name -> (fleet kwargs, rate factor, workload overrides, unique, strategies or None: all)
SCENARIOS: dict[str, tuple[dict[str, Any], float, dict[str, Any], bool, tuple[str, ...] | None]] = {
    "base": ({}, 1.0, {}, False, None),
    "slow": ({"speeds": SLOW}, 1.0, {}, False, None),
    "unique": ({}, 1.0, {}, True, ("prefix", "power_of_two", "peak_ewma")),
    "hot": ({}, 1.0, {"system_zipf": 1.5, "system_chars": 4000, "max_turns": 4}, False, None),
    "one-system": ({}, 0.85, {"system_prompts": 1, "system_chars": 2000}, False, None),
    "load0.6": ({}, 0.6, {}, False, None),
    "load1.2": ({}, 1.2, {}, False, None),
    "4x4": ({"speeds": (1.0,) * 4, "slots": 4, "cache_blocks": 5000}, 1.0, {}, False, None),
    "4x4-slow": (
        {"speeds": (0.5, 1.0, 1.0, 1.0), "slots": 4, "cache_blocks": 5000},
        1.0,
        {},
        False,
        None,
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 seed, 1500 requests")
    ap.add_argument("--requests", type=int, default=0, help="per run (default 3000)")
    ap.add_argument("--seeds", type=int, default=0, help="runs per cell, averaged (default 3)")
    ap.add_argument("--scenarios", default="", help=",".join(SCENARIOS))
    ap.add_argument("--strategies", default="", help="default: " + ",".join(STRATEGIES))
    ap.add_argument("--gains", default="", help="also sweep Prefix(hit_gain=) over these")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    n = args.requests or (1500 if args.quick else 3000)
    seeds = args.seeds or (1 if args.quick else 3)
    only = args.strategies.split(",") if args.strategies else None
    gains: list[float | None] = [None] + [float(g) for g in args.gains.split(",") if g]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in args.scenarios.split(",") if args.scenarios else SCENARIOS:
        fleet_kw, factor, wk, unique, strats = SCENARIOS[name]
        fleet = Fleet(**fleet_kw)
        # The same rate per slot as the base fleet (the 4x4 shape has as many slots).
        rate = RATE * factor * fleet.slots * len(fleet.speeds) / (int(FLEET["slots"]) * N)
        works = [
            make(requests=n, rate=rate, unique=unique, seed=seed + 1, **{**WORKLOAD, **wk})
            for seed in range(seeds)
        ]
        for strategy in only or strats or STRATEGIES:
            for g in gains if strategy == "prefix" else [None]:
                res = [
                    run(fleet, works[seed], strategy, seed=seed, gain=g) for seed in range(seeds)
                ]
                row = {
                    "scenario": name,
                    "rate": round(rate, 1),
                    "strategy": res[0]["strategy"],
                    **{
                        k: statistics.fmean(x[k] for x in res)
                        for k in ("mean_ms", "p50_ms", "p99_ms", "hit_ratio")
                    },
                    "share": res[0]["share"],
                }
                rows.append(row)
                print(
                    f"{name:>10} {rate:5.0f}/s {row['strategy']:>18}  mean {row['mean_ms']:7.1f}"
                    f"  p50 {row['p50_ms']:7.1f}  p99 {row['p99_ms']:7.1f}"
                    f"  hit {row['hit_ratio']:.3f}",
                    flush=True,
                )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"requests": n, "seeds": seeds, "rows": rows, "loadavg": os.getloadavg()}
    (out / "prefix_sim.json").write_text(json.dumps(result, indent=1))
    print(f"{time.perf_counter() - t0:.0f} s; wrote {out / 'prefix_sim.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
