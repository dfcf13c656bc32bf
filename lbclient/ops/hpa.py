"""The HorizontalPodAutoscaler's scaling behaviour: the policy, and what the HPA does with it.

:class:`Behavior` is the ``autoscaling/v2`` ``behavior`` block -- the playbook's by
default: **scale up fast** (60 s stabilization; per 60 s the larger of +100% or +4
pods) and **scale down slowly** (300 s stabilization; per 300 s the smaller of -50% or
-2 pods).  LLM replicas take minutes to start (pull a multi-GB image, load weights,
warm up) and a scale-down throws that away, so the asymmetry is the point: follow a
spike at once, wait out a lull before giving capacity back.

:class:`HpaSimulator` replays a metric through the Kubernetes HPA algorithm (as
``pkg/controller/podautoscaler/horizontal.go`` does it): every sync period, the
desired count ``ceil(current x metric / target)`` (unchanged within a 10% tolerance),
stabilized -- up to the *lowest* recommendation of the up window, down to the
*highest* of the down window -- then rate-limited by the policies over their periods,
then clamped to ``[min, max]``.  Replay a recorded demand through it to see how a
behaviour would have scaled before applying it (``python -m lbclient`` and the
pressure suite's oscillation scenario use it).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import attrs

from .._errors import ConfigError
from .._numbers import is_int

__all__ = ["Behavior", "HpaSimulator", "Policy", "Rules"]


def _pos_int(name: str, low: int, high: int) -> Any:
    def check(_i: object, _a: object, value: object) -> None:
        if not is_int(value) or not low <= value <= high:
            raise ConfigError(f"{name} must be an int in [{low}, {high}], got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class Policy:
    """One HPA scaling policy: at most ``value`` pods (``type="Pods"``) or ``value``
    percent (``"Percent"``) of change per ``period`` seconds."""

    type: str = attrs.field()
    value: int = attrs.field(validator=_pos_int("Policy value", 1, 1_000_000))
    period: int = attrs.field(validator=_pos_int("Policy period", 1, 1800))

    @type.validator
    def _check_type(self, _a: object, value: object) -> None:
        if value not in ("Pods", "Percent"):
            raise ConfigError(f"Policy type must be 'Pods' or 'Percent', got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "value": self.value, "periodSeconds": self.period}


def _policies(value: Iterable[Policy]) -> tuple[Policy, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class Rules:
    """Scaling rules for one direction: a stabilization window (seconds), the policies,
    and which of them applies (``"Max"``: the one allowing the most change; ``"Min"``:
    the least)."""

    stabilization: int = attrs.field(validator=_pos_int("stabilization", 0, 3600))
    policies: tuple[Policy, ...] = attrs.field(converter=_policies)
    select: str = attrs.field(default="Max")

    @policies.validator
    def _check_policies(self, _a: object, value: tuple[Policy, ...]) -> None:
        if not value or not all(isinstance(p, Policy) for p in value):
            raise ConfigError(f"Rules policies must be one or more Policy, got {value!r}")

    @select.validator
    def _check_select(self, _a: object, value: object) -> None:
        if value not in ("Max", "Min"):
            raise ConfigError(f"Rules select must be 'Max' or 'Min', got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "stabilizationWindowSeconds": self.stabilization,
            "selectPolicy": self.select,
            "policies": [p.to_dict() for p in self.policies],
        }


@attrs.frozen(kw_only=True)
class Behavior:
    """An HPA ``behavior`` block (default: the playbook's, see the module docstring)."""

    scale_up: Rules = attrs.field(
        factory=lambda: Rules(
            stabilization=60,
            policies=(
                Policy(type="Percent", value=100, period=60),
                Policy(type="Pods", value=4, period=60),
            ),
            select="Max",
        )
    )
    scale_down: Rules = attrs.field(
        factory=lambda: Rules(
            stabilization=300,
            policies=(
                Policy(type="Percent", value=50, period=300),
                Policy(type="Pods", value=2, period=300),
            ),
            select="Min",
        )
    )

    @classmethod
    def none(cls) -> Behavior:
        """No stabilization and no rate limit: every sync goes straight to the
        recommendation (what "thrashing" looks like, for comparison)."""
        unlimited = (Policy(type="Percent", value=1000, period=1),)
        return cls(
            scale_up=Rules(stabilization=0, policies=unlimited),
            scale_down=Rules(stabilization=0, policies=unlimited),
        )

    def scaled(self, factor: float) -> Behavior:
        """Every window and period divided by ``factor`` (at least 1 s): the same
        behaviour on a compressed clock, for tests and benchmarks."""

        def rules(r: Rules) -> Rules:
            return Rules(
                stabilization=max(0, round(r.stabilization / factor)),
                policies=tuple(
                    Policy(type=p.type, value=p.value, period=max(1, round(p.period / factor)))
                    for p in r.policies
                ),
                select=r.select,
            )

        return Behavior(scale_up=rules(self.scale_up), scale_down=rules(self.scale_down))

    def to_dict(self) -> dict[str, Any]:
        """The ``spec.behavior`` of an ``autoscaling/v2`` HorizontalPodAutoscaler."""
        return {"scaleUp": self.scale_up.to_dict(), "scaleDown": self.scale_down.to_dict()}


class HpaSimulator:
    """What an HPA with ``behavior`` does, one sync at a time (see the module docstring).

    The count it starts with is taken as the recommendation so far (an HPA that has
    been running at it).  ``step(now, ratio)``: ``ratio`` is the metric over its target
    (e.g. the demand per replica / the demand a replica should carry; with several
    metrics, the largest ratio -- the HPA takes the largest recommendation).  Returns
    the replica count after this sync.  ``history`` lists ``(time, replicas)`` at every
    change."""

    def __init__(
        self,
        behavior: Behavior | None = None,
        *,
        min_replicas: int = 2,
        max_replicas: int = 10,
        replicas: int | None = None,
        tolerance: float = 0.1,
    ) -> None:
        if min_replicas < 0 or max_replicas < max(1, min_replicas):
            raise ConfigError(
                f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{min_replicas!r}, {max_replicas!r}"
            )
        self.behavior = behavior or Behavior()
        self.min = min_replicas
        self.max = max_replicas
        self.replicas = min_replicas if replicas is None else replicas
        self._initial = self.replicas
        self._started = False
        self.tolerance = tolerance
        self._recs: deque[tuple[float, int]] = deque()  # (time, recommendation)
        self._events: deque[tuple[float, int]] = deque()  # (time, change in replicas)
        self.history: list[tuple[float, int]] = []

    def step(self, now: float, ratio: float) -> int:
        current = self.replicas
        if current == 0:
            rec = 0 if ratio <= 0 else 1  # scale from zero on any demand (KEDA activation)
        elif math.isfinite(ratio) and abs(ratio - 1.0) <= self.tolerance:
            rec = current
        else:
            rec = math.ceil(current * ratio - 1e-9) if math.isfinite(ratio) else self.max
        rec = min(self.max, max(self.min, rec))
        b = self.behavior
        if not self._started:
            # The count so far was the recommendation so far (an HPA that has been
            # running): no scale-down in the first down window, no jump in the first up
            # window.
            self._started = True
            self._recs.append((now, current))
        keep = max(b.scale_up.stabilization, b.scale_down.stabilization)
        self._recs.append((now, rec))
        while self._recs and self._recs[0][0] < now - keep:
            self._recs.popleft()
        up = rec
        down = rec
        for t, r in self._recs:
            if t >= now - b.scale_up.stabilization:
                up = min(up, r)
            if t >= now - b.scale_down.stabilization:
                down = max(down, r)
        desired = current
        if desired < up:
            desired = up
        if desired > down:
            desired = down
        if desired > current:
            desired = min(desired, self._limit(b.scale_up, now, current, up=True))
        elif desired < current:
            desired = max(desired, self._limit(b.scale_down, now, current, up=False))
        desired = min(self.max, max(self.min, desired))
        if desired != current:
            self._events.append((now, desired - current))
            self.history.append((now, desired))
            self.replicas = desired
        return self.replicas

    def _limit(self, rules: Rules, now: float, current: int, *, up: bool) -> int:
        """The furthest the policies let the count move from ``current`` now."""
        horizon = max(p.period for p in rules.policies)
        while self._events and self._events[0][0] < now - horizon:
            self._events.popleft()
        limits = []
        for p in rules.policies:
            changed = sum(d for t, d in self._events if t > now - p.period and (d > 0) == up)
            start = current - changed  # the count at the start of the period
            if up:
                lim = (
                    start + p.value
                    if p.type == "Pods"
                    else math.ceil(start * (1 + p.value / 100.0))
                )
            else:
                lim = (
                    start - p.value
                    if p.type == "Pods"
                    else math.ceil(start * (1 - p.value / 100.0))
                )
            limits.append(lim)
        if up:
            return max(limits) if rules.select == "Max" else min(limits)
        return min(limits) if rules.select == "Max" else max(limits)

    def run(
        self, samples: Iterable[tuple[float, float]], sync: float = 15.0
    ) -> list[tuple[float, int]]:
        """Feed ``(time, ratio)`` samples, syncing every ``sync`` seconds on the latest
        ratio; returns ``(time, replicas)`` at every sync."""
        out = []
        next_sync: float | None = None
        for t, ratio in samples:
            if next_sync is None:
                next_sync = t
            while t >= next_sync:
                out.append((next_sync, self.step(next_sync, ratio)))
                next_sync += sync
        return out

    @property
    def reversals(self) -> int:
        """Changes of direction (up then down, or down then up) so far: thrashing."""
        out = 0
        last = 0
        prev = self._initial
        for _, r in self.history:
            d = 1 if r > prev else -1
            if last and d != last:
                out += 1
            last = d
            prev = r
        return out
