"""The pickable view of the pool, rebuilt only when something changed.

:func:`build` walks the members once and decides who may be picked now: not draining,
not ejected (breaker open, health check down), not cooling down after ``Retry-After``;
past ``max_ejection`` it enters panic mode and serves the ejected endpoints that failed
longest ago; with locality it offers the nearest healthy tier first.  It asks the strategy
for a picker over the result (reusing the previous picker when it can update itself
incrementally, as the hash ring does) and says when the view goes stale on its own (a
breaker cooldown or a Retry-After ending, a slow-start step).  The pool installs the
result; between two builds a pick reads it and never walks the members.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..policies.geo import GeoTable
from ..strategies import PickContext, Picker, Strategy
from .locality import Locality, LocalityPicker, nearest_tier
from .state import EndpointState

if TYPE_CHECKING:
    from ..policies.breaker import Breaker

__all__ = ["MIN_RAMP", "Snapshot", "build"]

MIN_RAMP = 0.1  # slow start begins at 10% of the weight (Envoy's min_weight_percent)


def _pick_now_of(picker: Picker | None) -> Callable[[float], EndpointState | None]:
    """The fast path's pick: ``picker.pick_now(now)`` where a built-in picker offers it."""
    if picker is None:
        return lambda now: None
    pick_now = getattr(picker, "pick_now", None)
    if callable(pick_now):
        return pick_now  # type: ignore[no-any-return]
    pick = picker.pick
    return lambda now: pick(None, None)


class Snapshot:
    """What a pick reads: the picker, the pickable states, the half-open endpoints due
    a probe, panic mode, and when to rebuild (``next_refresh``, clock time)."""

    __slots__ = (
        "base",
        "cooling_until",
        "healthy",
        "local",
        "next_refresh",
        "panic",
        "pick_now",
        "pickable",
        "picker",
        "probes_due",
    )

    def __init__(self) -> None:
        self.picker: Picker | None = None
        self.base: Picker | None = None  # over every pickable endpoint
        self.local: Picker | None = None  # over the locality tier, when smaller
        self.pick_now: Callable[[float], EndpointState | None] = _pick_now_of(None)
        self.pickable: tuple[EndpointState, ...] = ()
        self.probes_due: list[EndpointState] = []
        self.panic = False
        self.healthy = 0
        self.next_refresh = math.inf
        self.cooling_until = math.inf  # earliest Retry-After end, when all are cooling


def _picker(
    strategy: Strategy, states: Sequence[EndpointState], ctx: PickContext, old: Picker | None
) -> Picker:
    updated = getattr(old, "updated", None)
    if old is not None and callable(updated):
        return updated(states, ctx)  # type: ignore[no-any-return]
    return strategy.picker(states, ctx)


def build(
    members: Sequence[EndpointState],
    now: float,
    *,
    strategy: Strategy,
    ctx: PickContext,
    breaker: Breaker | None,
    ejecting: bool,
    slow_start: float | None,
    locality: Locality | None,
    region: str | None,
    geo: GeoTable | None,
    previous: Snapshot,
) -> Snapshot:
    """A new snapshot over ``members`` (every member, draining ones included) at ``now``.

    Writes only what belongs to the view: slow-start weights, ``available`` flags and
    breaker transitions that time alone makes (open -> half-open after a cooldown)."""
    snap = Snapshot()
    active = [s for s in members if not s.draining]
    pickable: list[EndpointState] = []
    ejected: list[EndpointState] = []
    next_refresh = math.inf
    for s in active:
        if s.ramp_from is not None and slow_start is not None:
            # Slow start: weight grows linearly from 10% to 100% over the window.
            f = (now - s.ramp_from) / slow_start
            if f >= 1.0:
                s.ramp_from = None
                s.set_weight(s.endpoint.weight)
            else:
                s.set_weight(s.endpoint.weight * max(MIN_RAMP, f))
                next_refresh = min(next_refresh, now + slow_start / 10)
        b = s.breaker
        if s.health_down:
            # Out until a health check says otherwise (set_health invalidates): its
            # breaker's own cooldown is no reason to rebuild.
            ejected.append(s)
            continue
        if b is None or b.available(now):
            pickable.append(s)
        else:
            ejected.append(s)
        if b is not None:
            nc = b.next_change(now)
            if nc is not None and nc < next_refresh:
                next_refresh = nc
    healthy = len(pickable)
    panic = False
    if ejected and ejecting:
        # Never eject more than max_ejection of the pool (Envoy's panic threshold): past
        # it, serve from the ejected endpoints that failed least recently.
        share = breaker.max_ejection if breaker is not None else 0.5
        # members - floor(share x members), with a hair of slack for float error
        # (0.7 x 10 must allow exactly 7 ejections, not 6).
        need = len(active) - math.floor(share * len(active) + 1e-9)
        if share < 1.0:
            need = max(1, need)  # max_ejection=1.0 is the only way to eject everything
        if healthy < need:
            panic = True
            ejected.sort(key=lambda s: s.last_failure)
            pickable.extend(ejected[: need - healthy])
    # Retry-After: a cooling endpoint gets no picks until its cooldown ends.
    cooling = [s for s in pickable if s.cooldown_until > now]
    if cooling:
        pickable = [s for s in pickable if s.cooldown_until <= now]
        first_back = min(s.cooldown_until for s in cooling)
        next_refresh = min(next_refresh, first_back)
        if not pickable:
            snap.cooling_until = first_back
    for s in members:
        s.available = False
    for s in pickable:
        s.available = True
    # Half-open endpoints with a free probe slot get the next pick outright: a load-aware
    # strategy would otherwise avoid them (their EWMA still carries the failure penalty)
    # and the breaker would never learn they recovered.
    snap.probes_due = [
        s for s in pickable if s.breaker is not None and s.breaker.state == "half_open"
    ]
    snap.pickable = tuple(pickable)
    snap.panic = panic
    snap.healthy = healthy
    if pickable:
        base = _picker(strategy, snap.pickable, ctx, previous.base)
        snap.base = snap.picker = base
        if locality is not None:
            table = geo or GeoTable.default()
            distance = {
                s.endpoint.region: table.latency(region, s.endpoint.region) for s in members
            }
            # Draining endpoints count as unhealthy members of their region.
            tier = nearest_tier(pickable, members, distance, locality.min_healthy)
            if len(tier) < len(pickable):
                snap.local = _picker(strategy, tier, ctx, previous.local)
                snap.picker = LocalityPicker(
                    snap.local, base, locality.spill_inflight, distance, ctx.clock.now
                )
    snap.pick_now = _pick_now_of(snap.picker)
    snap.next_refresh = next_refresh
    return snap
