"""Locality: keep traffic in the client's own region while it can take it.

Envoy's zone-aware routing, for any strategy: the balancer orders regions by network
distance from ``Balancer(region=...)`` (the :class:`GeoTable`) and offers the strategy
only the nearest tier that is healthy enough; when too much of the local region is
ejected, draining or down, the next-closest region joins, and so on -- whole-region
failover is the limit case.  With ``spill_inflight`` set, a pick that lands on a local
endpoint already running that many calls goes to the whole pool instead (saturation
spill-over).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import attrs

from ._errors import ConfigError
from ._state import EndpointState
from .strategies import Picker

__all__ = ["Locality", "LocalityPicker"]


def _share(_i: object, _a: object, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise ConfigError(f"min_healthy must be a number in (0, 1], got {value!r}")


def _spill(_i: object, _a: object, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"spill_inflight must be an int >= 1 or None, got {value!r}")


@attrs.frozen(kw_only=True)
class Locality:
    """Prefer the nearest region; spill over when it is unhealthy or saturated.

    * ``min_healthy`` -- the share of a region's endpoints that must be pickable for it
      to serve alone (default 0.5: with half the local replicas gone, the survivors would
      take double load -- time to bring the next region in).
    * ``spill_inflight`` -- a local endpoint already running this many calls counts as
      saturated and the pick goes to the whole pool (default ``None``: no saturation
      check; set it to the replica's batch size / concurrency limit).
    """

    min_healthy: float = attrs.field(default=0.5, validator=_share)
    spill_inflight: int | None = attrs.field(default=None)

    @spill_inflight.validator
    def _check_spill(self, attribute: object, value: object) -> None:
        _spill(self, attribute, value)


class LocalityPicker:
    """A picker over the nearest tier, falling back to the whole pool when saturated."""

    __slots__ = ("_all", "_limit", "_local")

    def __init__(self, local: Picker, everything: Picker, spill_inflight: int | None) -> None:
        self._local = local
        self._all = everything
        self._limit = spill_inflight

    def pick(self, key: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        s = self._local.pick(key, exclude)
        if s is None:
            return self._all.pick(key, exclude)
        if self._limit is not None and s.inflight >= self._limit:
            # Saturated: the whole pool, minus this endpoint (unless it is all there is).
            busy = {s} if not exclude else {s, *exclude}
            return self._all.pick(key, busy) or s
        return s


def nearest_tier(
    pickable: Sequence[EndpointState],
    members: Sequence[EndpointState],
    distance: dict[str | None, float],
    min_healthy: float,
) -> list[EndpointState]:
    """The pickable endpoints of the nearest regions that are healthy enough.

    Regions are walked nearest first; a region whose pickable share is at least
    ``min_healthy`` ends the walk; a region below it contributes what it has and the
    next region is added.  Draining, ejected and down endpoints all count as members
    that are not pickable.
    """
    by_region: dict[str | None, list[EndpointState]] = {}
    totals: dict[str | None, int] = {}
    for s in members:
        by_region.setdefault(s.endpoint.region, [])
        totals[s.endpoint.region] = totals.get(s.endpoint.region, 0) + 1
    for s in pickable:
        by_region.setdefault(s.endpoint.region, []).append(s)
    tier: list[EndpointState] = []
    for region in sorted(by_region, key=lambda r: (distance.get(r, math.inf), str(r))):
        healthy = by_region[region]
        tier.extend(healthy)
        if healthy and len(healthy) >= min_healthy * totals.get(region, len(healthy)) - 1e-9:
            return tier
    return list(pickable)
