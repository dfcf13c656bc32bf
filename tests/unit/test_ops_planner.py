"""The capacity planner: Erlang C and the M/M/c latency tail against known values and a
direct simulation of the same queue."""

from __future__ import annotations

import heapq
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lbclient import ConfigError
from lbclient.ops import (
    CapacityPlanner,
    TrafficRecord,
    erlang_c,
    latency_quantile,
    latency_tail,
    replay,
    synthetic_trace,
)

ROOT = Path(__file__).resolve().parents[2]


def test_erlang_c_known_values() -> None:
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # textbook: c=2, a=1
    # c=10, a=8: 0.4092 (Erlang C tables)
    assert erlang_c(10, 8.0) == pytest.approx(0.4092, abs=5e-4)
    assert erlang_c(5, 5.0) == 1.0  # saturated
    assert erlang_c(3, 0.0) == 0.0
    # stable for thousands of servers (no factorial overflow)
    assert 0.0 < erlang_c(5000, 4900.0) < 1.0


def test_mm1_latency_is_exponential() -> None:
    # M/M/1 sojourn time ~ Exp(mu - lambda): P(T > t) = exp(-(mu - lambda) t).
    for t in (0.1, 0.5, 2.0):
        assert latency_tail(t, 1, 0.6, 1.0) == pytest.approx(math.exp(-0.4 * t), rel=1e-9)
    assert latency_quantile(0.95, 1, 0.6, 1.0) == pytest.approx(-math.log(0.05) / 0.4, rel=1e-4)
    assert latency_quantile(0.95, 2, 3.0, 1.0) == math.inf  # unstable


def _simulate_mmc(rate: float, service: float, servers: int, n: int, seed: int) -> float:
    """p95 latency of an M/M/c FCFS queue, simulated directly (own arrivals/services)."""
    rng = random.Random(seed)
    free = [0.0] * servers
    t = 0.0
    lat = []
    for _ in range(n):
        t += rng.expovariate(rate)
        s = rng.expovariate(1.0 / service)
        start = max(t, free[0])
        heapq.heapreplace(free, start + s)
        lat.append(start + s - t)
    lat.sort()
    return lat[int(0.95 * (n - 1))]


def _sim_replicas(rate: float, service: float, slots: int, target: float, start: int) -> int:
    r = max(1, start - 3)
    while _simulate_mmc(rate, service, r * slots, 40_000, seed=r) > target:
        r += 1
    return r


@pytest.mark.parametrize("load", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_plan_matches_a_direct_mmc_simulation(load: float) -> None:
    """The issue's check: planner replicas within one of a direct M/M/c simulation, for
    loads from 10% to 90% of a 20-replica x 4-slot fleet (service 1 s, target p95 4 s)."""
    slots, service, target = 4, 1.0, 4.0
    rate = load * 20 * slots / service
    trace = synthetic_trace(rate, 30_000 / rate, service_time=service, seed=int(load * 100))
    plan = CapacityPlanner(trace).plan(
        target, concurrency=slots, headroom=0.0, rate="mean", min_replicas=2
    )
    simulated = _sim_replicas(rate, service, slots, target, plan.replicas_needed)
    assert abs(plan.replicas_needed - simulated) <= 1, (plan.replicas_needed, simulated)
    # the trace-driven replay (no distribution assumed) agrees too
    planner = CapacityPlanner(trace)
    assert planner.simulate(plan.replicas_needed + 1, concurrency=slots) <= target
    if plan.replicas_needed > 2:
        assert planner.simulate(plan.replicas_needed - 2, concurrency=slots) > target


def test_plan_shows_its_model() -> None:
    trace = synthetic_trace(30.0, 1200.0, service_time=0.5, seed=3)
    plan = CapacityPlanner(trace).plan(2.0, concurrency=4)
    assert "Erlang C" in plan.formula and "Little" in plan.formula
    table = plan.table()
    for word in ("inputs", "model", "result", "curve", "utilization", "P(wait)"):
        assert word in table
    # headroom: planned for p95 of per-minute rates x 1.2
    assert plan.rate == pytest.approx(CapacityPlanner(trace).rate("p95") * 1.2)
    # the curve falls to the service time's own p95 and crosses the target at the plan
    lat = dict(plan.curve)
    assert lat[plan.replicas] <= 2.0 < lat[plan.replicas - 1]
    assert plan.floor == pytest.approx(-0.5 * math.log(0.05), rel=0.05)
    assert plan.predicted == pytest.approx(lat[plan.replicas])
    assert 0 < plan.utilization < 1 and 0 <= plan.wait_probability <= 1
    assert plan.in_flight == pytest.approx(plan.rate * plan.service_time, rel=0.5)
    d = plan.to_dict()
    assert d["replicas"] == plan.replicas and "formula" in d


def test_min_and_max_replicas() -> None:
    trace = synthetic_trace(1.0, 600.0, service_time=0.2, seed=1)
    plan = CapacityPlanner(trace).plan(2.0, concurrency=8)
    assert plan.replicas_needed == 1 and plan.replicas == 2  # min 2 for availability
    busy = synthetic_trace(200.0, 120.0, service_time=1.0, seed=1)
    capped = CapacityPlanner(busy).plan(4.0, concurrency=4, max_replicas=10)
    assert capped.capped and capped.replicas == 10 and capped.replicas_needed > 10
    with pytest.raises(ConfigError, match="min_replicas must be an int >= 2"):
        CapacityPlanner(trace).plan(2.0, min_replicas=1)
    with pytest.raises(ConfigError, match="max_replicas"):
        CapacityPlanner(trace).plan(2.0, min_replicas=4, max_replicas=3)


def test_an_impossible_target_says_why() -> None:
    trace = synthetic_trace(5.0, 600.0, service_time=1.0, seed=1)
    with pytest.raises(ConfigError, match="no number of replicas"):
        CapacityPlanner(trace).plan(2.0)  # p95 of an exponential 1 s service is 3 s


def test_empirical_service_plans_fewer_for_steady_service() -> None:
    trace = synthetic_trace(50.0, 600.0, service_time=1.0, service="constant", seed=2)
    planner = CapacityPlanner(trace)
    exp = planner.plan(3.5, concurrency=4, headroom=0.0, rate="mean")
    emp = planner.plan(3.5, concurrency=4, headroom=0.0, rate="mean", service="empirical")
    assert emp.replicas_needed <= exp.replicas_needed
    assert planner.simulate(emp.replicas_needed, concurrency=4) <= 3.5


def test_traffic_summary_finds_peak_hours_and_burstiness() -> None:
    trace = synthetic_trace(2.0, 2 * 86400.0, service_time=0.5, diurnal=0.8, seed=5)
    s = CapacityPlanner(trace, window=300.0).traffic()
    assert s.peak_hours[0][0] in (13, 14, 15)  # the synthetic peak is at 14:00 UTC
    assert s.rates["peak"] > s.rates["p95"] > s.rates["p50"]
    assert s.burstiness == pytest.approx(s.rates["peak"] / s.rates["mean"])
    assert s.burstiness > 1.5
    assert len(s.hourly) == 24
    assert "peak hours" in s.table()


def test_shed_calls_count_as_demand_not_service() -> None:
    recs = [TrafficRecord(t=float(i), latency=1.0) for i in range(100)]
    recs += [TrafficRecord(t=i + 0.5, latency=0.001, outcome="Overloaded") for i in range(100)]
    planner = CapacityPlanner(recs)
    assert planner.mean_rate == pytest.approx(200 / 99.5, rel=0.01)
    assert planner.service_time() == pytest.approx(1.0)
    s = planner.traffic()
    assert s.shed == 100 and s.ok == 100


def test_replay_is_fcfs() -> None:
    # two servers, three calls at once of 1 s: the third waits 1 s
    assert replay([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 2) == [1.0, 1.0, 2.0]


def test_bad_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        CapacityPlanner([])
    trace = synthetic_trace(5.0, 60.0, seed=1)
    with pytest.raises(ConfigError, match="percentile"):
        CapacityPlanner(trace).plan(5.0, percentile=95)
    with pytest.raises(ConfigError, match="rate must be one of"):
        CapacityPlanner(trace).plan(5.0, rate="p42")
    with pytest.raises(ConfigError, match="diurnal"):
        synthetic_trace(1.0, 10.0, diurnal=1.5)


def test_cli_plans_from_a_recording(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    trace = tmp_path / "traffic.jsonl"
    with open(trace, "w") as f:
        for r in synthetic_trace(30.0, 300.0, service_time=0.5, seed=4):
            f.write(json.dumps(r.to_dict()) + "\n")
    png = tmp_path / "plan.png"
    out = subprocess.run(
        [sys.executable, "-m", "lbclient", "plan", "--trace", str(trace), "--target-p95", "2",
         "--concurrency", "4", "--plot", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "Erlang C" in out.stdout and "replicas needed" in out.stdout
    assert "burstiness" in out.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(
        subprocess.run(
            [sys.executable, "-m", "lbclient", "plan", "--trace", str(trace), "--target-p95",
             "2", "--concurrency", "4", "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
        ).stdout
    )  # fmt: skip
    expected = CapacityPlanner(synthetic_trace(30.0, 300.0, service_time=0.5, seed=4))
    assert data["plan"]["replicas"] == expected.plan(2.0, concurrency=4).replicas
