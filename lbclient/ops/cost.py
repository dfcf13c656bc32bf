"""`CostModel`: the cheapest mix of on-demand, spot and reserved instances for a load.

::

    from lbclient.ops import CostModel

    plan = CostModel().plan(rps=100)                 # a constant 100 calls/s
    plan = CostModel().plan(hourly=[40] * 8 + [120] * 12 + [60] * 4)   # a daily profile
    print(plan.table())                              # every option, $/month, savings
    plan.plot("cost.png")

**Prices** default to the playbook's table (USD per hour, AWS us-east-1): p3.2xlarge
on-demand 3.06, spot 0.92, reserved 1.96 (1 year, no upfront), serving 10 calls/s;
p3.8xlarge on-demand 12.24, spot 3.67 -- four times the GPUs, so 40 calls/s (derived:
the playbook gives no capacity or reserved price for it).  Pass your own
:class:`InstanceType` s (measure ``capacity`` with the planner: the calls/s one
instance holds at your latency target).

**The mix**, for each instance type and each hour of the profile:

* *reserved* instances are paid every hour, used or not: worth it for the load that is
  always there (at 1.96 vs 3.06, for an instance busy more than 64% of the hours);
* *spot* instances are the cheapest (0.92) but can be taken back with 2 minutes'
  notice: at most ``max_spot_share`` of the load rides on spot (the rest survives
  losing all of it), and spot capacity is counted at ``1 - spot_interruption`` (the
  share expected to be away at any time, being replaced);
* *on-demand* covers the rest.

It tries every reserved count and keeps the cheapest; the result is compared with
running everything on-demand.  Monthly = hourly x 730.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from .._errors import ConfigError
from .._numbers import is_number

__all__ = ["DEFAULT_INSTANCES", "CostModel", "CostPlan", "InstanceType", "Option"]

HOURS_PER_MONTH = 730.0


def _price(optional: bool) -> Any:
    def check(_i: object, a: attrs.Attribute[Any], value: object) -> None:
        if value is None and optional:
            return
        if not is_number(value) or value < 0:
            more = " or None" if optional else ""
            raise ConfigError(f"InstanceType {a.name} must be a price >= 0{more}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class InstanceType:
    """One instance type: hourly prices (USD) and the calls/s one instance serves."""

    name: str
    on_demand: float = attrs.field(validator=_price(False))
    spot: float | None = attrs.field(default=None, validator=_price(True))
    reserved: float | None = attrs.field(default=None, validator=_price(True))
    capacity: float = attrs.field()

    @capacity.validator
    def _check_capacity(self, _a: object, value: object) -> None:
        if not is_number(value) or value <= 0:
            raise ConfigError(f"InstanceType capacity must be calls/s > 0, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstanceType:
        try:
            return cls(**d)
        except TypeError as exc:
            raise ConfigError(f"bad instance type {d!r}: {exc}") from None


DEFAULT_INSTANCES: tuple[InstanceType, ...] = (
    InstanceType(name="p3.2xlarge", on_demand=3.06, spot=0.92, reserved=1.96, capacity=10.0),
    InstanceType(name="p3.8xlarge", on_demand=12.24, spot=3.67, reserved=None, capacity=40.0),
)
"""The playbook's prices (USD/hour) and capacity (calls/s per instance)."""


@attrs.frozen(kw_only=True)
class Option:
    """One way to serve the profile: counts per tier (reserved: all day; on-demand and
    spot: per hour of the profile) and the monthly cost."""

    instance: str
    strategy: str  # "on-demand", "reserved + on-demand", "mix"
    reserved: int
    on_demand: tuple[int, ...]  # per hour of the profile
    spot: tuple[int, ...]
    hourly_cost: float  # mean USD per hour
    monthly: float

    @property
    def peak_instances(self) -> int:
        return max(self.reserved + o + s for o, s in zip(self.on_demand, self.spot, strict=True))


@attrs.frozen(kw_only=True)
class CostPlan:
    """The cheapest option and every option considered."""

    hourly_load: tuple[float, ...]
    best: Option
    options: tuple[Option, ...]
    baseline: Option  # the cheapest all-on-demand option
    max_spot_share: float
    spot_interruption: float
    instances: tuple[InstanceType, ...]

    @property
    def monthly(self) -> float:
        return self.best.monthly

    @property
    def savings(self) -> float:
        """Share saved against running everything on-demand."""
        if self.baseline.monthly <= 0:
            return 0.0
        return 1.0 - self.best.monthly / self.baseline.monthly

    def to_dict(self) -> dict[str, Any]:
        return {
            "hourly_load": list(self.hourly_load),
            "max_spot_share": self.max_spot_share,
            "spot_interruption": self.spot_interruption,
            "best": attrs.asdict(self.best),
            "baseline": attrs.asdict(self.baseline),
            "savings": self.savings,
            "options": [attrs.asdict(o) for o in self.options],
        }

    def table(self) -> str:
        def counts(xs: Sequence[int]) -> str:
            lo, hi = min(xs), max(xs)
            return str(lo) if lo == hi else f"{lo}-{hi}"

        load = self.hourly_load
        lines = [
            f"load: {min(load):.4g}-{max(load):.4g} calls/s"
            + (f" over {len(load)} hours" if len(load) > 1 else "")
            + f"; spot <= {self.max_spot_share:.0%} of the load, "
            f"{self.spot_interruption:.0%} of spot away at any time",
            f"{'instance':<14}{'strategy':<22}{'reserved':>9}{'on-demand':>11}{'spot':>7}"
            f"{'$/month':>12}{'savings':>9}",
        ]
        base = self.baseline.monthly
        for o in sorted(self.options, key=lambda o: o.monthly):
            mark = " *" if o is self.best else ""
            saved = 1.0 - o.monthly / base if base > 0 else 0.0
            lines.append(
                f"{o.instance:<14}{o.strategy:<22}{o.reserved:>9}{counts(o.on_demand):>11}"
                f"{counts(o.spot):>7}{o.monthly:>12,.0f}{saved:>9.0%}{mark}"
            )
        lines.append(
            f"cheapest: {self.best.instance} {self.best.strategy}, "
            f"${self.best.monthly:,.0f}/month, {self.savings:.0%} less than all on-demand "
            f"(${base:,.0f})"
        )
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Monthly cost per option (stacked by tier), cheapest first (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        opts = sorted(self.options, key=lambda o: o.monthly)
        labels = [f"{o.instance}\n{o.strategy}" for o in opts]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(opts)), 4.2))
        tiers = ("reserved", "on-demand", "spot")
        bottoms = [0.0] * len(opts)
        for tier, color in zip(tiers, ("tab:blue", "tab:orange", "tab:green"), strict=True):
            vals = [self._tier_monthly(o, tier) for o in opts]
            ax.bar(labels, vals, bottom=bottoms, color=color, label=tier)
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
        for i, total in enumerate(bottoms):
            ax.text(i, total, f"${total:,.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("USD per month")
        ax.set_title(
            f"cheapest: {self.best.instance} {self.best.strategy} ({self.savings:.0%} saved)"
        )
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _tier_monthly(self, o: Option, tier: str) -> float:
        it = next(i for i in self.instances if i.name == o.instance)
        n = len(self.hourly_load)
        if tier == "reserved":
            return o.reserved * (it.reserved or 0.0) * HOURS_PER_MONTH
        if tier == "on-demand":
            return sum(o.on_demand) / n * it.on_demand * HOURS_PER_MONTH
        return sum(o.spot) / n * (it.spot or 0.0) * HOURS_PER_MONTH


def _share(name: str, value: object, *, below_one: bool) -> float:
    if not is_number(value) or value < 0 or (value >= 1 if below_one else value > 1):
        bound = "[0, 1)" if below_one else "[0, 1]"
        raise ConfigError(f"CostModel {name} must be in {bound}, got {value!r}")
    return float(value)


def _instances(value: Iterable[InstanceType]) -> tuple[InstanceType, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class CostModel:
    """The cost model (see the module docstring).

    * ``instances`` -- the instance types to consider (default: the playbook's).
    * ``max_spot_share`` -- the largest share of the load served by spot instances
      (default 0.5: losing every spot instance at once leaves half the capacity -- the
      admission layer sheds the rest, and the autoscaler replaces it on-demand).
    * ``spot_interruption`` -- the share of spot capacity expected to be away at any
      time (default 0.05: AWS's most common "<5%" interruption frequency band).
    """

    instances: tuple[InstanceType, ...] = attrs.field(
        default=DEFAULT_INSTANCES, converter=_instances
    )
    max_spot_share: float = attrs.field(default=0.5)
    spot_interruption: float = attrs.field(default=0.05)

    def __attrs_post_init__(self) -> None:
        if not self.instances or not all(isinstance(i, InstanceType) for i in self.instances):
            raise ConfigError(
                f"CostModel instances must be one or more InstanceType, got {self.instances!r}"
            )
        _share("max_spot_share", self.max_spot_share, below_one=False)
        _share("spot_interruption", self.spot_interruption, below_one=True)

    def plan(self, rps: float | None = None, *, hourly: Sequence[float] | None = None) -> CostPlan:
        """The cheapest way to serve ``rps`` calls/s all the time, or an ``hourly``
        profile (calls/s for each hour of a typical day, e.g. the planner's
        ``traffic().hourly``)."""
        if (rps is None) == (hourly is None):
            raise ConfigError("give the load as rps= (a constant) or hourly= (a profile), not both")
        load = [rps] if rps is not None else list(hourly or ())
        if not load or any(not is_number(x) or x < 0 for x in load):
            raise ConfigError(f"load must be calls/s >= 0, got {load!r}")
        load_f = tuple(float(x) for x in load)
        options: list[Option] = []
        for it in self.instances:
            options.append(self._option(it, load_f, "on-demand", spot=False, reserved=False))
            if it.reserved is not None:
                options.append(
                    self._option(it, load_f, "reserved + on-demand", spot=False, reserved=True)
                )
            if it.spot is not None and self.max_spot_share > 0:
                options.append(
                    self._option(it, load_f, "mix", spot=True, reserved=it.reserved is not None)
                )
        best = min(options, key=lambda o: (o.monthly, o.peak_instances))
        baseline = min((o for o in options if o.strategy == "on-demand"), key=lambda o: o.monthly)
        return CostPlan(
            hourly_load=load_f,
            best=best,
            options=tuple(options),
            baseline=baseline,
            max_spot_share=self.max_spot_share,
            spot_interruption=self.spot_interruption,
            instances=self.instances,
        )

    def _option(
        self,
        it: InstanceType,
        load: tuple[float, ...],
        strategy: str,
        *,
        spot: bool,
        reserved: bool,
    ) -> Option:
        cap = it.capacity
        spot_cap = cap * (1.0 - self.spot_interruption)
        best: tuple[float, int, list[int], list[int]] | None = None
        top = math.ceil(max(load) / cap - 1e-9) if reserved else 0
        for r in range(top + 1):
            od_h: list[int] = []
            spot_h: list[int] = []
            cost = r * (it.reserved or 0.0) * len(load)
            for x in load:
                base = r * cap
                if spot:
                    # Non-spot capacity must carry (1 - share) of the load on its own.
                    need_firm = max(0.0, (1.0 - self.max_spot_share) * x - base)
                    od = math.ceil(need_firm / cap - 1e-9)
                    rest = max(0.0, x - base - od * cap)
                    s = math.ceil(rest / spot_cap - 1e-9)
                    # Rounding spot up past the share may cost more than one on-demand.
                    if s and rest <= cap and it.on_demand < s * (it.spot or 0.0):
                        od, s = od + 1, 0
                else:
                    od = math.ceil(max(0.0, x - base) / cap - 1e-9)
                    s = 0
                od_h.append(od)
                spot_h.append(s)
                cost += od * it.on_demand + s * (it.spot or 0.0)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, r, od_h, spot_h)
        assert best is not None
        cost, r, od_h, spot_h = best
        hourly_cost = cost / len(load)
        return Option(
            instance=it.name,
            strategy=strategy,
            reserved=r,
            on_demand=tuple(od_h),
            spot=tuple(spot_h),
            hourly_cost=hourly_cost,
            monthly=hourly_cost * HOURS_PER_MONTH,
        )
