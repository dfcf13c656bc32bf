"""Locality: keep traffic in the client's own region while it can take it.

Envoy's zone-aware routing, for any strategy: the pool orders regions by network distance
from ``Balancer(region=...)`` (the :class:`GeoTable`) and offers the strategy only the
nearest tier that is healthy enough; when too much of the local region is ejected,
draining or down, the next-closest region joins, and so on -- whole-region failover is
the limit case.

Saturation spill-over is on by default: a pick that lands on a local endpoint already
running as many calls as it can serve without queueing (its ``metadata["capacity"]``, or
the concurrency it was seen to sustain) is compared with the best pick of the whole pool,
network distance included, and goes wherever it is expected to finish first -- so a
busy local replica shares its queue with idle remote ones instead of growing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number
from .load import outstanding
from .state import EndpointState

if TYPE_CHECKING:
    from .._context import CallContext
    from ..strategies import Picker

__all__ = ["Locality", "LocalityPicker", "capacity", "nearest_tier"]


def _share(_i: object, _a: object, value: object) -> None:
    if not is_number(value) or not 0 < value <= 1:
        raise ConfigError(f"min_healthy must be a number in (0, 1], got {value!r}")


def _spill(_i: object, _a: object, value: object) -> None:
    if value is None or value == "auto":
        return
    if not is_int(value) or value < 1:
        raise ConfigError(f"spill_inflight must be 'auto', an int >= 1 or None, got {value!r}")


def capacity(s: EndpointState) -> int:
    """Concurrent calls ``s`` serves without queueing: ``metadata["capacity"]`` when it
    is a number >= 1, else the most it was seen to finish without slowing down."""
    value = s.endpoint.metadata.get("capacity")
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 1:
        return int(value)
    return max(s.cap_seen, s.ttft.cap_seen)


@attrs.frozen(kw_only=True)
class Locality:
    """Prefer the nearest region; spill over when it is unhealthy or saturated.

    * ``min_healthy`` -- the share of a region's endpoints that must be pickable for it
      to serve alone (default 0.5: with half the local replicas gone, the survivors would
      take double load -- time to bring the next region in).
    * ``spill_inflight`` -- when a local pick counts as saturated: ``"auto"`` (default)
      when it runs as many calls as its capacity (``metadata["capacity"]`` or learned),
      and then the call goes wherever it is expected to finish first, network distance
      included; an int -- at that many calls in flight, always to the whole pool (the
      replica's batch size, say); ``None`` -- never (local until unhealthy).
    """

    min_healthy: float = attrs.field(default=0.5, validator=_share)
    spill_inflight: int | str | None = attrs.field(default="auto")

    @spill_inflight.validator
    def _check_spill(self, attribute: object, value: object) -> None:
        _spill(self, attribute, value)


class LocalityPicker:
    """A picker over the nearest tier, spilling to the whole pool when saturated."""

    __slots__ = ("_all", "_dist", "_limit", "_local", "_now")

    def __init__(
        self,
        local: Picker,
        everything: Picker,
        spill_inflight: int | str | None,
        distance: Mapping[str | None, float],
        now: Callable[[], float],
    ) -> None:
        self._local = local
        self._all = everything
        self._limit = spill_inflight
        self._dist = distance
        self._now = now

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        s = self._local.pick(call, exclude)
        if s is None:
            return self._all.pick(call, exclude)
        limit = self._limit
        if limit is None:
            return s
        if limit == "auto":
            if s.inflight < capacity(s):
                return s
        elif s.inflight < limit:  # type: ignore[operator]
            return s
        # Saturated: the whole pool, minus this endpoint (unless it is all there is).
        busy = {s} if not exclude else {s, *exclude}
        other = self._all.pick(call, busy)
        if other is None:
            return s
        if limit != "auto":
            return other
        stream = call is not None and call.stream
        now = self._now()
        return other if self._expected(other, now, stream) < self._expected(s, now, stream) else s

    def _expected(self, s: EndpointState, now: float, stream: bool) -> float:
        """When a call placed on ``s`` now is expected to finish (seconds from now):
        its latency estimate (plus the network distance, if it was never measured),
        stretched by the queue beyond its capacity."""
        latency = s.ttft_ewma(now) if stream else s.ewma(now)
        if not s.sampled:
            latency += self._dist.get(s.endpoint.region, 0.0)
        c = capacity(s)
        queued = outstanding(s, now) + 1 - c
        return latency * (1.0 + queued / c) if queued > 0 else latency


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
