"""The cost model: the playbook's prices, every option covers the load, the spot share
holds, the cheapest one wins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient import ConfigError
from lbclient.ops import DEFAULT_INSTANCES, CostModel, InstanceType

ROOT = Path(__file__).resolve().parents[2]


def test_the_playbook_prices_are_the_default() -> None:
    p3 = {i.name: i for i in DEFAULT_INSTANCES}
    small, big = p3["p3.2xlarge"], p3["p3.8xlarge"]
    assert (small.on_demand, small.spot, small.reserved, small.capacity) == (3.06, 0.92, 1.96, 10)
    assert (big.on_demand, big.spot) == (12.24, 3.67)


def test_constant_load() -> None:
    plan = CostModel().plan(rps=100)
    # all on-demand: 10 x p3.2xlarge x 3.06 $/h x 730 h
    assert plan.baseline.monthly == pytest.approx(10 * 3.06 * 730)
    best = plan.best
    assert best.instance == "p3.2xlarge" and best.strategy == "mix"
    # half the load on spot (counted at 95%), half reserved
    assert best.reserved == 5 and best.spot == (6,) and best.on_demand == (0,)
    assert best.monthly == pytest.approx((5 * 1.96 + 6 * 0.92) * 730)
    assert plan.savings == pytest.approx(1 - best.monthly / plan.baseline.monthly)
    assert 0.45 < plan.savings < 0.55
    text = plan.table()
    assert "cheapest: p3.2xlarge mix" in text and "22,338" in text


def test_no_spot_when_not_allowed() -> None:
    plan = CostModel(max_spot_share=0.0).plan(rps=100)
    assert all(s == 0 for o in plan.options for s in o.spot)
    assert plan.best.strategy == "reserved + on-demand" and plan.best.reserved == 10


def test_reserved_only_for_the_load_that_stays() -> None:
    # 4 hours busy a day: reserving for the peak is dearer than on-demand for it
    hourly = [100.0] * 4 + [10.0] * 20
    plan = CostModel(max_spot_share=0.0).plan(hourly=hourly)
    best = plan.best
    assert best.reserved == 1  # the 10 calls/s that never go away
    assert max(best.on_demand) == 9 and min(best.on_demand) == 0


@settings(max_examples=60, deadline=None)
@given(
    hourly=st.lists(st.floats(min_value=0, max_value=400), min_size=1, max_size=24),
    share=st.floats(min_value=0, max_value=1),
    interruption=st.floats(min_value=0, max_value=0.5),
)
def test_every_option_serves_the_load_and_survives_losing_spot(
    hourly: list[float], share: float, interruption: float
) -> None:
    model = CostModel(max_spot_share=share, spot_interruption=interruption)
    plan = model.plan(hourly=hourly)
    caps = {i.name: i.capacity for i in DEFAULT_INSTANCES}
    for o in plan.options:
        cap = caps[o.instance]
        for x, od, sp in zip(hourly, o.on_demand, o.spot, strict=True):
            firm = (o.reserved + od) * cap
            assert firm + sp * cap * (1 - interruption) >= x - 1e-6
            assert firm >= (1 - share) * x - 1e-6  # losing all spot leaves (1 - share)
    assert plan.best.monthly == min(o.monthly for o in plan.options)
    assert plan.best.monthly <= plan.baseline.monthly + 1e-9


def test_custom_instances_and_bad_values() -> None:
    a100 = InstanceType(name="a100", on_demand=4.1, spot=1.5, capacity=25.0)
    plan = CostModel(instances=(a100,)).plan(rps=50)
    assert {o.instance for o in plan.options} == {"a100"}
    with pytest.raises(ConfigError, match="capacity"):
        InstanceType(name="x", on_demand=1.0, capacity=0)
    with pytest.raises(ConfigError, match="max_spot_share"):
        CostModel(max_spot_share=1.5)
    with pytest.raises(ConfigError, match="not both"):
        CostModel().plan(rps=1, hourly=[1.0])


def test_plot_and_cli(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "cost.png"
    CostModel().plan(hourly=[40] * 8 + [120] * 12 + [60] * 4).plot(str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = subprocess.run(
        [sys.executable, "-m", "lbclient", "cost", "--rps", "100", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["best"]["strategy"] == "mix" and 0.45 < data["savings"] < 0.55
