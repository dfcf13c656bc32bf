"""Smoke test of the benchmark scripts: a tiny ``benchmarks/run.py --quick`` and a tiny
``benchmarks/overhead.py``, each in a subprocess, checking that the JSON and the PNG are
written and that the numbers are sane.  Runs in well under 30 s each.  The
``fleet_shared.py`` ones need a real redis-server (``redis_server_bin``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rich")
pytest.importorskip("matplotlib")

import lbclient

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    """The environment for a benchmark subprocess: this checkout's lbclient first (a
    script's own directory, not the working directory, starts its ``sys.path``, so an
    installed lbclient -- another checkout's -- would be imported instead)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _run(script: str, *args: str, timeout: float = 25.0) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_env(),
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _check_latency(lat: dict[str, float]) -> None:
    assert 10.0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"] < 10_000.0, lat


@pytest.mark.timeout(60)
def test_run_quick_writes_json_and_png(tmp_path: Path) -> None:
    out = _run(
        "run.py",
        "--quick",
        "--scenarios",
        "hetero,failover",
        "--duration",
        "1.5",
        "--warmup",
        "32",
        "--out",
        str(tmp_path),
    )
    assert "hetero" in out and "Targets" in out

    png = tmp_path / "results.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000

    data: dict[str, Any] = json.loads((tmp_path / "results.json").read_text())
    machine = data["machine"]
    for key in ("platform", "python", "cpu_count", "date"):
        assert machine[key], key
    assert set(data["results"]) == {"hetero", "failover"}
    assert set(data["results"]["hetero"]) == {"round_robin", "power_of_two", "peak_ewma"}
    assert set(data["results"]["failover"]) == {"baseline_rr", "peak_ewma+retry+breaker"}

    for scenario, by_policy in data["results"].items():
        n_replicas = len(data["scenarios"][scenario]["replicas"])
        for policy, r in by_policy.items():
            assert r["requests"] > 40, (scenario, policy)
            assert 0.0 <= r["success_pct"] <= 100.0
            _check_latency(r["latency_ms"])
            assert len(r["share_pct"]) == n_replicas
            assert sum(r["share_pct"]) == pytest.approx(100.0, abs=0.1)
            assert r["attempts"] >= r["requests"]

    hetero = data["results"]["hetero"]
    for r in hetero.values():  # no faults, no retries: every request succeeds, once
        assert r["success_pct"] == 100.0
        assert r["attempts_per_request"] == 1.0
        assert abs(r["extra_load_pct"]) < 1.0

    failover = data["results"]["failover"]
    base, resilient = failover["baseline_rr"], failover["peak_ewma+retry+breaker"]
    assert base["phases"]["after"]["success_pct"] < 90.0  # half the fleet refuses
    # Sanity, not the target (that needs the full run): a 1.5 s run leaves ~100 requests
    # after the failure, and a request whose 3 attempts all land on not-yet-ejected dead
    # replicas is possible.
    assert resilient["success_pct"] >= 95.0
    assert resilient["success_pct"] > base["success_pct"] + 10.0
    assert resilient["fault_log"] and resilient["fault_log"][0][1] == "down"
    assert {o["scenario"] for o in data["targets"]} == {"hetero", "failover"}


@pytest.mark.timeout(60)
def test_overhead_tiny_writes_json(tmp_path: Path) -> None:
    _run(
        "overhead.py",
        "--iterations",
        "2000",
        "--repeats",
        "1",
        "--sizes",
        "10,100",
        "--pick-seconds",
        "0.005",
        "--http-requests",
        "100",
        "--http-rounds",
        "1",
        "--out",
        str(tmp_path),
        timeout=50.0,  # a few seconds alone; redis-server and a busy CI machine add more
    )
    data: dict[str, Any] = json.loads((tmp_path / "overhead.json").read_text())
    variants = {r["variant"]: r for r in data["decorator"]}
    floor = next(r for name, r in variants.items() if "floor" in name)
    assert 0 < floor["ns"] < 100_000
    for name in lbclient.strategies.names():
        assert variants[name]["ns"] > 0
    assert any("Hedge" in v for v in variants)

    picks = {(r["strategy"], r["size"]) for r in data["pick"]}
    assert picks == {(s, n) for s in lbclient.strategies.names() for n in (10, 100)}
    assert all(r["pick_ns"] > 0 and r["acquire_release_ns"] > 0 for r in data["pick"])

    if data.get("shared_ab"):  # redis-server installed: shared= timed beside its twin
        assert any("shared=" in v for v in variants)
        for ab in data["shared_ab"]:
            # A loaded CI machine can stretch a Redis reply past the link's 50 ms timeout
            # (it then degrades, as designed, and the benchmark says so): the smoke test
            # checks that the A/B ran and reports the link, not how busy the machine is.
            assert ab["link"]["mode"] in ("connected", "degraded"), ab["link"]
            assert abs(ab["median_extra_ns"]) < 50_000

    http = data["http"]
    assert http["ratio"] > 0
    for mode in http["modes"].values():
        assert mode["cpu_us_per_request"] > 0
    assert data["targets"]


@pytest.mark.timeout(90)
def test_hedging_grid_tiny_writes_json(tmp_path: Path) -> None:
    _run(
        "hedging.py",
        "--cells",
        "ref,b20_s1_r5_l30_het",
        "--calls",
        "200",
        "--out",
        str(tmp_path),
        timeout=80.0,
    )
    data = json.loads((tmp_path / "hedging.json").read_text())
    cells = {c["name"]: c for c in data["cells"]}
    assert set(cells) == {"b40_s4_r2_l50_hom", "b20_s1_r5_l30_het"}
    for cell in cells.values():
        policies = cell["policies"]
        assert set(policies) >= {"none", "hedge", "envoy"}
        for p in policies.values():
            assert p["success_pct"] == 100.0
            lat = p["latency_ms"]
            assert 10.0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] < 10_000.0, p
        assert policies["none"]["extra_load_pct"] == 0.0
    assert 55.0 < cells["b40_s4_r2_l50_hom"]["envoy_delay_ms"] < 70.0


@pytest.mark.timeout(60)
def test_simulator_oracle_and_hedge_cells_are_sane() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import sim
    finally:
        sys.path.remove(str(BENCH))
    cell = sim.Cell(base=0.04, slots=2, speeds=(1.0, 0.5, 0.8), straggler_rate=0.0, load=0.7)
    cell.calls = 3000
    oracle = sim.run_oracle(cell, seed=0).q(0.99)
    pe = sim.run_lbclient(cell, strategy="peak_ewma", seed=0).q(0.99)
    rr = sim.run_lbclient(cell, strategy="round_robin", seed=0).q(0.99)
    assert 0.04 < oracle <= pe < 1.3 * oracle < rr  # latency-aware picking near the limit
    cell = sim.Cell(base=0.04, slots=4, straggler_rate=0.02, load=0.5)
    cell.calls = 3000
    none = sim.run_lbclient(cell, seed=1)
    hedged = sim.run_lbclient(cell, seed=1, hedge=lbclient.Hedge())
    assert hedged.q(0.999) < none.q(0.999) / 4
    assert 0.0 < hedged.extra_load <= 0.05


@pytest.mark.timeout(90)
def test_picking_against_the_oracle_smoke(tmp_path: Path) -> None:
    """A tiny ``benchmarks/picking.py`` run: the hetero fleet at 70% on loopback,
    ``peak_ewma`` and naive round robin against the oracle simulation of the same
    arrivals; the JSON holds sane ratios and overhead."""
    _run(
        "picking.py",
        "--fleets",
        "hetero",
        "--loads",
        "0.7",
        "--strategies",
        "peak_ewma,baseline_rr",
        "--calls",
        "100",
        "--oracle-seeds",
        "1",
        "--overhead-requests",
        "20",
        "--out",
        str(tmp_path),
        timeout=80.0,
    )
    data = json.loads((tmp_path / "picking.json").read_text())
    point = data["fleets"][0]["loads"][0]
    run = point["runs"]["peak_ewma"]
    assert run["success_pct"] == 100
    assert 0.5 < run["ratio"] < 3.0, run
    overhead = data["fleets"][0]["overhead"]["overhead_ms"]
    assert 0.0 <= overhead < 20.0, overhead
    assert (tmp_path / "picking.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(90)
def test_sdk_benchmark_tiny_writes_json_and_png(tmp_path: Path) -> None:
    """A tiny ``benchmarks/sdk.py`` run: the OpenAI SDK through ``HTTPTransport`` and with
    its own retries on the faulty fleet (plain and streaming), the transport's CPU
    overhead, the dead primary falling back.  Sane figures, not the targets."""
    pytest.importorskip("openai")
    _run(
        "sdk.py",
        "--calls",
        "100",
        "--warmup",
        "10",
        "--rounds",
        "1",
        "--rate",
        "120",
        "--overhead-requests",
        "100",
        "--overhead-rounds",
        "3",
        "--fallback-calls",
        "20",
        "--out",
        str(tmp_path),
        timeout=80.0,
    )
    assert (tmp_path / "sdk.png").read_bytes()[:8] == PNG_MAGIC
    data: dict[str, Any] = json.loads((tmp_path / "sdk.json").read_text())
    for part in ("faults", "faults_stream"):
        policies = data[part]["policies"]
        assert set(policies) == {"sdk_retries", "lbclient"}
        ours = policies["lbclient"]
        assert ours["success_pct"] == 100.0, ours  # retried and hedged, never mixed
        _check_latency(ours["latency_ms"])
        assert 1.0 <= ours["attempts_per_call"] < 1.2
        assert ours["share_pct"][0] < 10.0  # the failing replica is left alone
        assert policies["sdk_retries"]["success_pct"] < 100.0  # 1 in 8 fail 3 times there
    assert data["faults_stream"]["policies"]["lbclient"]["ttft_ms"]["p50"] > 0
    overhead = data["overhead"]
    # Sanity only: three rounds of 100 requests on a shared machine are noisy (the target
    # needs the full run's 12 rounds of 500).
    assert 0.6 < overhead["ratio"] < 2.0
    assert len(overhead["pair_ratios"]) == 3
    fallback = data["fallback"]
    assert fallback["served_by_fallback_pct"] == 100.0
    assert fallback["primary_attempts_per_call"] <= 1.0
    assert {t["target"] for t in data["targets"]} >= {"transport client CPU <= 1.15x plain httpx"}


@pytest.mark.timeout(90)
def test_admission_scenarios_on_virtual_time_smoke(tmp_path: Path) -> None:
    """``benchmarks/admission.py --quick --virtual``: the five admission scenarios on
    virtual time (deterministic), every target judged and met, both plots written."""
    _run("admission.py", "--quick", "--virtual", "--out", str(tmp_path), timeout=80.0)
    data = json.loads((tmp_path / "admission.json").read_text())["virtual"]
    assert set(data) == {"noisy", "spike", "sustained", "oscillation", "burst"}
    judged = [t for sc in data.values() for t in sc["targets"] if t.get("met") is not None]
    assert judged and all(t["met"] for t in judged), [t for t in judged if not t["met"]]
    for name in ("admission-spike-virtual.png", "admission-oscillation-virtual.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(60)
def test_prefix_benchmark_tiny_writes_json_and_png(tmp_path: Path) -> None:
    out = _run(
        "prefix.py",
        "--scenarios",
        "base",
        "--strategies",
        "prefix,power_of_two",
        "--requests",
        "120",
        "--out",
        str(tmp_path),
        timeout=50.0,
    )
    assert "prefix" in out and "power_of_two" in out
    data = json.loads((tmp_path / "prefix.json").read_text())
    rows = {r["strategy"]: r for r in data["rows"]}
    assert set(rows) == {"prefix", "power_of_two"}
    for r in rows.values():
        assert r["failed"] == 0
        assert 5.0 < r["p50_ms"] <= r["p99_ms"] < 5_000.0
        assert 0.0 < r["hit_ratio"] < 1.0
    assert rows["prefix"]["hit_ratio"] > rows["power_of_two"]["hit_ratio"]
    assert [c["target"] for c in data["checks"]]
    assert (tmp_path / "prefix.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.timeout(60)
def test_prefix_simulation_tiny(tmp_path: Path) -> None:
    out = _run(
        "prefix_sim.py",
        "--requests",
        "300",
        "--seeds",
        "1",
        "--strategies",
        "prefix,power_of_two",
        "--out",
        str(tmp_path),
    )
    data = json.loads((tmp_path / "prefix_sim.json").read_text())
    base = {r["strategy"]: r for r in data["rows"] if r["scenario"] == "base"}
    assert base["prefix"]["hit_ratio"] > base["power_of_two"]["hit_ratio"]
    assert "base" in out


def _run_fleet_shared(tmp_path: Path, *args: str) -> dict[str, Any]:
    """``benchmarks/fleet_shared.py`` in a subprocess (with this checkout's lbclient: the
    client processes it spawns import it too)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "fleet_shared.py"), *args, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
        env=_env(),
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert (tmp_path / "fleet_shared.png").read_bytes()[:8] == PNG_MAGIC
    data: dict[str, Any] = json.loads((tmp_path / "fleet_shared.json").read_text())
    return data


@pytest.mark.timeout(90)
def test_fleet_shared_quota_and_redis_killed_smoke(tmp_path: Path, redis_server_bin: str) -> None:
    """Two client processes, a fleet-wide quota of 30/s against 2 x 40 offered, then the
    same with redis-server killed and restarted mid-run."""
    data = _run_fleet_shared(
        tmp_path,
        "--scenarios",
        "quota,redis_killed",
        "--processes",
        "2",
        "--rate",
        "40",
        "--quota",
        "30",
        "--duration",
        "4.5",
    )
    quota = data["figures"]["quota"]
    assert quota["per_process"]["admitted_per_s_steady"] > 60  # each admits its own 30+
    assert 20 < quota["shared"]["admitted_per_s_steady"] < 40  # the fleet admits ~30
    assert quota["shared"]["failed_calls"] == 0
    killed = data["figures"]["redis_killed"]
    assert killed["failed_calls"] == 0  # no call failed because Redis was gone
    assert all(d is not None and d < 1.0 for d in killed["degraded_after_kill_s"])
    assert killed["converged_after_restart_s"] is not None
    assert killed["admitted_per_s_during_outage"] < 40
    assert {t["target"].split(":")[0] for t in data["targets"]} == {"quota", "redis killed"}


@pytest.mark.timeout(90)
def test_fleet_shared_ejection_smoke(tmp_path: Path, redis_server_bin: str) -> None:
    """One replica starts failing: processes sharing state eject it together, with fewer
    failed attempts than processes learning alone."""
    data = _run_fleet_shared(
        tmp_path,
        "--scenarios",
        "ejection",
        "--processes",
        "2",
        "--rate",
        "40",
        "--duration",
        "3.5",
        "--no-peak-ewma",
        "--repeat",
        "1",
    )
    e = data["figures"]["ejection"]
    assert set(e) == {"single", "per_process", "shared"}
    assert e["shared"]["failed_calls"] == 0  # retried elsewhere
    assert e["single"]["failed_attempts"] >= 5  # Breaker(failures=5)
    assert e["shared"]["failed_attempts"] < e["per_process"]["failed_attempts"]
    assert e["shared"]["all_ejected_within_s"] is not None
    assert e["shared"]["all_ejected_within_s"] < 1.0


@pytest.mark.timeout(90)
def test_pressure_quick_writes_the_spec_json_and_png(tmp_path: Path) -> None:
    """Two of the ten pressure scenarios (the full suite is ``pressure.py --quick``):
    ``pressure.json`` is SPEC.md's list of ``{scenario, passed, figure, target}``."""
    out = _run(
        "pressure.py",
        "--quick",
        "--scenarios",
        "cost_runaway,burst_10k",
        "--out",
        str(tmp_path),
        timeout=80.0,
    )
    assert "2/2 passed" in out, out
    rows = json.loads((tmp_path / "pressure.json").read_text())
    assert [r["scenario"] for r in rows] == ["cost_runaway", "burst_10k"]
    for r in rows:
        assert set(r) == {"scenario", "passed", "figure", "target"}
        assert r["passed"] is True and r["figure"] and r["target"]
    details = json.loads((tmp_path / "pressure-details.json").read_text())
    spend = details["results"][0]["details"]["spend"]
    assert 0 < spend["spent"] <= spend["ceiling"] and spend["max_overshoot"] == 0.0
    assert details["results"][0]["details"]["admitted"]["success_pct"] == 100.0
    assert (tmp_path / "pressure.png").read_bytes()[:8] == PNG_MAGIC
