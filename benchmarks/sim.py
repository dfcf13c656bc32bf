"""A discrete-event simulation of a replica fleet, driving lbclient's own picking and
hedging code on simulated time -- and the oracles to compare it with.

Why: a loopback benchmark measures the real thing but is slow and noisy (two cores, a
client and six servers in one machine); a simulation runs a 10,000-call cell in about a
second, the same way every time, so a design can be swept over a grid before it is
confirmed on loopback.  Nothing here is a model of lbclient: the client side *is*
lbclient -- a real ``Balancer`` with a fake clock set to simulated time, its real
``Pool.acquire`` / ``Lease`` outcomes, its real strategies and ``Hedger`` (delay
estimate, budget).  Only the event loop and the replicas are simulated.

The replicas are those of ``lbclient.testing.ReplicaFleet``: ``slots`` concurrent
requests, a FIFO queue, a lognormal service time of mean ``base / speed`` (``sigma``
0.25), multiplied by ``straggler_factor`` with probability ``straggler_rate``; a
cancelled request leaves the queue or frees its slot at once (the fleet's handlers are
cancelled when the client disconnects).

Two oracles bound what a router could do:

* ``oracle`` -- knows every replica's queue and speed (not the service times drawn) and
  sends each request where its expected completion is earliest (issue 8, part 4);
* for hedging, ``Hedge`` policies are compared on the same arrivals and service draws.

Run ``python benchmarks/sim.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import math
import random
import statistics
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lbclient
from lbclient.testing import FakeClock

SIGMA = 0.25


# ------------------------------------------------------------------------- the world


@dataclass
class Cell:
    """One fleet and load: ``speeds`` per replica (its length is the replica count)."""

    base: float = 0.04
    slots: int = 4
    speeds: tuple[float, ...] = (1.0,) * 6
    straggler_rate: float = 0.02
    straggler_factor: float = 20.0
    load: float = 0.5
    calls: int = 10000
    sigma: float = SIGMA

    @property
    def capacity(self) -> float:
        """Requests/s the fleet serves at 100%, stragglers' extra work included (so a
        70% cell is 70% busy, however many stragglers it has)."""
        mean_factor = 1.0 + self.straggler_rate * (self.straggler_factor - 1.0)
        return sum(self.slots * s / (self.base * mean_factor) for s in self.speeds)

    def label(self) -> str:
        hetero = "hetero" if len(set(self.speeds)) > 1 else "homog"
        return (
            f"base={self.base * 1000:.0f}ms slots={self.slots} strag={self.straggler_rate:.1%} "
            f"load={self.load:.0%} {hetero}"
        )


class _Req:
    __slots__ = ("done", "id", "on_done", "replica", "service", "started")

    def __init__(self, rid: int, service: float, on_done: Callable[[_Req, float], None]) -> None:
        self.id = rid
        self.service = service
        self.on_done = on_done
        self.started: float | None = None
        self.done = False
        self.replica: Replica | None = None


class Sim:
    """The event loop: a heap of (time, seq, callback)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn))

    def run(self) -> None:
        heap = self._heap
        while heap:
            t, _, fn = heapq.heappop(heap)
            self.now = t
            fn()


class Replica:
    def __init__(self, sim: Sim, index: int, slots: int, speed: float) -> None:
        self.sim = sim
        self.index = index
        self.slots = slots
        self.speed = speed
        self.busy: set[_Req] = set()
        self.queue: deque[_Req] = deque()
        self.received = 0

    @property
    def outstanding(self) -> int:
        return len(self.busy) + len(self.queue)

    def submit(self, req: _Req) -> None:
        self.received += 1
        req.replica = self
        if len(self.busy) < self.slots:
            self._start(req)
        else:
            self.queue.append(req)

    def _start(self, req: _Req) -> None:
        sim = self.sim
        req.started = sim.now
        self.busy.add(req)
        sim.at(sim.now + req.service, lambda: self._finish(req))

    def _finish(self, req: _Req) -> None:
        if req.done or req not in self.busy:
            return
        self.busy.discard(req)
        req.done = True
        self._next()
        req.on_done(req, self.sim.now)

    def cancel(self, req: _Req) -> None:
        if req.done:
            return
        req.done = True
        if req in self.busy:
            self.busy.discard(req)
            self._next()
        else:
            with contextlib.suppress(ValueError):
                self.queue.remove(req)

    def _next(self) -> None:
        while self.queue and len(self.busy) < self.slots:
            self._start(self.queue.popleft())


@dataclass
class Result:
    latencies: list[float]
    calls: int
    sent: int
    hedges: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def q(self, p: float) -> float:
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(p * len(s)))]

    @property
    def extra_load(self) -> float:
        return self.sent / self.calls - 1.0


def _workload(cell: Cell, seed: int) -> tuple[list[float], list[list[float]]]:
    """Arrival times, and for each call the service time it would draw on each replica
    (the same draw, scaled by speed, so every policy sees the same work)."""
    rng = random.Random(seed)
    rate = cell.load * cell.capacity
    t = 0.0
    arrivals = []
    for _ in range(cell.calls):
        t += rng.expovariate(rate)
        arrivals.append(t)
    draws: list[list[float]] = []
    mu = -(cell.sigma**2) / 2
    for _ in range(cell.calls * 3):  # primary, hedge, retry: independent draws
        base = cell.base * rng.lognormvariate(mu, cell.sigma)
        if rng.random() < cell.straggler_rate:
            base *= cell.straggler_factor
        draws.append([base / s for s in cell.speeds])
    return arrivals, draws


# ----------------------------------------------------------------------- the clients


def run_lbclient(
    cell: Cell,
    *,
    strategy: str = "peak_ewma",
    hedge: lbclient.Hedge | None = None,
    seed: int = 0,
    balancer_kw: dict[str, Any] | None = None,
    attempt_delay: float = 0.0,
    clairvoyant: bool = False,
) -> Result:
    """lbclient picking (and hedging) for ``cell``'s calls, on simulated time.

    ``clairvoyant``: the hedging oracle -- a backup is sent at once (budget permitting)
    for exactly the calls whose primary drew a straggler's service time: the best
    possible choice of what to hedge and when, under the same budget."""
    sim = Sim()
    replicas = [Replica(sim, i, cell.slots, s) for i, s in enumerate(cell.speeds)]
    urls = [f"http://10.0.0.{i + 1}:8000" for i in range(len(replicas))]
    by_url = dict(zip(urls, replicas, strict=True))
    clock = FakeClock()
    lb = lbclient.Balancer(
        urls, strategy=strategy, hedge=hedge, clock=clock, rng=seed, **(balancer_kw or {})
    )
    pool = lb._pool
    hedger = lb._engine.hedger
    arrivals, draws = _workload(cell, seed + 1)
    draw_i = itertools.count()
    latencies: list[float] = []
    sent = 0
    hedges = 0

    def tick() -> None:
        clock._now = sim.now  # the balancer's clock is simulated time

    def arrive(i: int, t0: float) -> None:
        nonlocal sent
        tick()
        call = lbclient.CallContext(started=t0)
        state: dict[str, Any] = {"done": False, "leases": [], "reqs": []}

        def launch(lease: Any) -> float:
            nonlocal sent
            sent += 1
            call.add_tried(lease.state)
            rep = by_url[lease.state.url]
            service = draws[next(draw_i)][rep.index]
            req = _Req(i, service + attempt_delay, lambda r, t, lease=lease: finish(lease, r, t))
            state["leases"].append(lease)
            state["reqs"].append(req)
            rep.submit(req)
            return service * rep.speed / cell.base  # the draw's factor (20x: a straggler)

        def finish(lease: Any, req: _Req, t: float) -> None:
            tick()
            if state["done"]:
                return
            state["done"] = True
            lease.ok(t)
            latencies.append(t - t0)
            if hedger is not None:
                hedger.observe(t - t0, t)
            won_in = t - lease.t0
            for other, r in zip(state["leases"], state["reqs"], strict=True):
                if other is not lease:
                    other.lose(t, won_in)
                    assert r.replica is not None
                    r.replica.cancel(r)

        def fire(delay: float, left: int) -> None:
            nonlocal hedges
            tick()
            if state["done"]:
                return
            assert hedger is not None
            if left > 1:
                sim.at(sim.now + delay, lambda: fire(delay, left - 1))
            for lease in state["leases"]:
                lease.overdue(sim.now)  # as the engine does when a backup is due
            if not hedger.budget.try_withdraw(sim.now):
                return
            from lbclient.engine.hedging import prefer_elsewhere

            try:
                lease = pool.acquire(call, prefer_elsewhere(pool, call.tried), sim.now)
            except lbclient.NoEndpointAvailable:
                return
            if lease.state in call.tried:
                lease.abandon()
                return
            hedges += 1
            launch(lease)

        if hedger is not None:
            hedger.budget.deposit(t0)
        factor = launch(pool.acquire(call, None, t0))
        if hedger is not None:
            if clairvoyant:
                if factor > 0.5 * cell.straggler_factor:
                    fire(0.0, 1)
                return
            delay = hedger.current_delay()
            sim.at(t0 + delay, lambda: fire(delay, hedger.policy.max_hedges))

    for i, t in enumerate(arrivals):
        sim.at(t, lambda i=i, t=t: arrive(i, t))
    sim.run()
    return Result(latencies, cell.calls, sent, hedges)


def run_oracle(cell: Cell, *, seed: int = 0) -> Result:
    """The router that knows every replica's queue and speed (not the service times
    drawn) and picks the earliest expected completion: with ``k`` requests ahead of it
    for ``c`` slots of mean service ``m``, a request starts after about
    ``max(0, k - c + 1) / c * m`` and finishes ``m`` later."""
    sim = Sim()
    replicas = [Replica(sim, i, cell.slots, s) for i, s in enumerate(cell.speeds)]
    arrivals, draws = _workload(cell, seed + 1)
    mean = [cell.base / s for s in cell.speeds]
    latencies: list[float] = []

    def arrive(i: int, t0: float) -> None:
        best, best_t = replicas[0], math.inf
        for r in replicas:
            k = r.outstanding
            wait = max(0, k - r.slots + 1) / r.slots * mean[r.index]
            done = wait + mean[r.index]
            if done < best_t:
                best, best_t = r, done
        req = _Req(i, draws[i][best.index], lambda q, t: latencies.append(t - t0))
        best.submit(req)

    for i, t in enumerate(arrivals):
        sim.at(t, lambda i=i, t=t: arrive(i, t))
    sim.run()
    return Result(latencies, cell.calls, cell.calls)


def unloaded_p95(cell: Cell, samples: int = 200000, seed: int = 7) -> float:
    """Envoy's per-try timeout: the p95 of one request's service time on the fastest
    replica with nothing queued (stragglers included)."""
    rng = random.Random(seed)
    mu = -(cell.sigma**2) / 2
    fastest = max(cell.speeds)
    xs = []
    for _ in range(samples):
        x = cell.base / fastest * rng.lognormvariate(mu, cell.sigma)
        if rng.random() < cell.straggler_rate:
            x *= cell.straggler_factor
        xs.append(x)
    xs.sort()
    return xs[int(0.95 * samples)]


# --------------------------------------------------------------------------- grids


def hedge_grid(quick: bool = False) -> list[Cell]:
    """The issue's grid: base 20-100 ms, 1-8 slots, stragglers 0.5-5%, load 30-70%,
    homogeneous and heterogeneous speeds."""
    hetero = (1.0, 0.5, 0.8, 1.0, 0.5, 0.8)
    homog = (1.0,) * 6
    cells = [Cell(base=0.04, slots=4, straggler_rate=0.02, load=0.5)]  # the reference
    for base, slots, strag, load, speeds in itertools.product(
        (0.02, 0.1), (1, 8), (0.005, 0.05), (0.3, 0.7), (homog, hetero)
    ):
        cells.append(Cell(base=base, slots=slots, straggler_rate=strag, load=load, speeds=speeds))
    if quick:
        cells = cells[:1] + cells[1::5]
    return cells


def _fmt(x: float) -> str:
    return f"{x * 1000:7.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["hedge", "oracle"])
    ap.add_argument("--calls", type=int, default=10000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "hedge":
        policies = ("hedge", "envoy", "envoy@5%", "limit")
        print(
            f"{'cell':<52} {'none':>7}  "
            + "  ".join(f"{p + ' p99.9 / x / extra':>26}" for p in policies)
        )
        for cell in hedge_grid(args.quick):
            cell.calls = args.calls
            d = unloaded_p95(cell)
            rows: dict[str, list[Result]] = {k: [] for k in ("none", *policies)}
            for seed in range(args.seeds):
                rows["none"].append(run_lbclient(cell, seed=seed))
                rows["hedge"].append(run_lbclient(cell, seed=seed, hedge=lbclient.Hedge()))
                for name, budget in (("envoy", 0.5), ("envoy@5%", 0.05)):
                    rows[name].append(
                        run_lbclient(
                            cell,
                            seed=seed,
                            strategy="least_connections",
                            hedge=lbclient.Hedge(delay=d, max_extra=budget),
                        )
                    )
                rows["limit"].append(
                    run_lbclient(cell, seed=seed, hedge=lbclient.Hedge(), clairvoyant=True)
                )
            p = {k: statistics.median(r.q(0.999) for r in v) for k, v in rows.items()}
            ex = {k: max(r.extra_load for r in v) for k, v in rows.items()}
            cols = [
                f"{_fmt(p[k]).strip():>9} {p['none'] / p[k]:5.1f}x {ex[k]:6.1%}" for k in policies
            ]
            print(
                f"{cell.label():<52} {_fmt(p['none']):>7}  " + "  ".join(f"{c:>26}" for c in cols)
            )
    else:
        hetero = (1.0, 0.5, 0.8)
        print(f"{'load':>5} {'oracle p99':>10} " + " ".join(f"{s:>18}" for s in _ORACLE_STRATS))
        for load in (0.5, 0.6, 0.7, 0.8, 0.85):
            cell = Cell(base=0.04, slots=2, speeds=hetero, straggler_rate=0.0, load=load)
            cell.calls = args.calls
            o = statistics.median(run_oracle(cell, seed=s).q(0.99) for s in range(args.seeds))
            cols = []
            for strat in _ORACLE_STRATS:
                v = statistics.median(
                    run_lbclient(cell, strategy=strat, seed=s).q(0.99) for s in range(args.seeds)
                )
                cols.append(f"{_fmt(v)} ({v / o:4.2f}x)")
            print(f"{load:5.0%} {_fmt(o):>10} " + " ".join(f"{c:>18}" for c in cols))
    return 0


_ORACLE_STRATS = ("peak_ewma", "power_of_two", "least_response_time", "round_robin")

if __name__ == "__main__":
    sys.exit(main())
