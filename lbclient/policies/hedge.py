"""`Hedge`: when to send a backup request, and how many at most (frozen policy).

"The Tail at Scale" (Dean & Barroso, 2013): a backup request sent after the 95th
percentile latency costs about 5% extra load and cuts the 99.9th percentile many-fold,
because stragglers are rarely correlated across replicas.  Finagle's backup requests and
gRPC's hedging policy (gRFC A6) do the same; lbclient adds a budget so hedges never
exceed ``max_extra`` of the traffic, whatever the latency distribution does.  The engine
that sends them is :mod:`lbclient.engine.hedging`.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number

__all__ = ["Hedge"]


def _seconds_or_none(name: str, *, allow_zero: bool = False) -> Callable[[object], float | None]:
    def convert(value: object) -> float | None:
        if value is None:
            return None
        if not (is_number(value) and (value >= 0 if allow_zero else value > 0)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{name} must be a number of seconds {bound} or None, got {value!r}")
        return float(value)

    return convert


def _delay(value: object) -> float | None:
    return _seconds_or_none("delay")(value)


def _min_delay(value: object) -> float:
    out = _seconds_or_none("min_delay", allow_zero=True)(value)
    if out is None:
        raise ConfigError("min_delay must be a number of seconds >= 0, got None")
    return out


def _initial_delay(value: object) -> float:
    out = _seconds_or_none("initial_delay")(value)
    if out is None:
        raise ConfigError("initial_delay must be a number of seconds > 0, got None")
    return out


def _fraction(name: str, lo_open: bool = True) -> Callable[[object, object, object], None]:
    def check(_i: object, _a: object, value: object) -> None:
        if not (is_number(value) and (0 < value < 1 if lo_open else 0 <= value < 1)):
            raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")

    return check


def _max_hedges(_i: object, _a: object, value: object) -> None:
    if not is_int(value) or not 1 <= value <= 4:
        raise ConfigError(f"max_hedges must be an int from 1 to 4, got {value!r}")


def _warmup(_i: object, _a: object, value: object) -> None:
    if not is_int(value) or value < 1:
        raise ConfigError(f"warmup must be an int >= 1, got {value!r}")


def _fence(value: object) -> float:
    if not is_number(value) or value < 0:
        raise ConfigError(f"fence must be a finite number >= 0, got {value!r}")
    return float(value)


@attrs.frozen(kw_only=True, repr=False)
class Hedge:
    """When to send a backup request, and how many at most.

    >>> lbclient.Hedge()                      # adaptive: after the latency outlier fence
    >>> lbclient.Hedge(delay=0.25)            # fixed: hedge after 250 ms
    >>> lbclient.Hedge(max_extra=0.02)        # adaptive, <= 2% extra load

    * ``delay`` -- seconds before the backup; ``None`` (default) adapts it to recent
      latencies (below).  A fixed delay is simple but goes stale as load changes, and
      on replicas of unequal speed it fires for every call to the slow one.
    * ``max_extra`` -- budget: backups stay under this share of calls (default 0.05: "The
      Tail at Scale" shows hedging the slowest ~5% removes most of the tail), counted
      over a 30 s window so a burst of slow calls (one straggler blocking a replica's
      queue) finds tokens banked, plus a reserve of 0.2 backups/s so a cold or quiet
      client can hedge at all.
    * ``fence`` -- the adaptive delay is Tukey's upper outlier fence of recent call
      latencies, ``p75 + fence x (p75 - p25)`` (default 2.0).  A straggler is an outlier
      of the latency distribution, queueing included; the quartiles hardly move when
      2-5% of calls straggle or when hedged calls (cut at delay + backup) fill the tail,
      and they are sound after a handful of samples.  A high quantile is neither: a
      p97.5 over 32 samples is the largest of them, and it climbs when the hedged calls
      it produced come back.  Measured on a grid from a cold start (``benchmarks/sim.py
      hedge``, base 20-100 ms, 1-8 slots, 0.5-2% stragglers at 20x, 30-70% load), the
      fence cut p99.9 at least 6x in every cell at <= 5% extra load; p97.5 fell to 1.8x.
    * ``quantile`` -- use this quantile of recent latencies as the delay instead of the
      fence (e.g. 0.95); ``None`` (default): the fence.
    * ``min_delay`` -- floor of the adaptive delay (default 5 ms), so a burst of very
      fast calls cannot turn hedging into request duplication.
    * ``initial_delay`` -- used until ``warmup`` latencies have been seen (defaults 1 s
      and 8: conservative for the very first calls, then the fence of what was seen,
      recomputed at 8, 16, 32, 64 and then every 64 samples).
    * ``max_hedges`` -- backups per call (default 1; each waits another delay).
    * ``window`` -- how many recent latencies the estimate is computed over (default
      512); it is recomputed every 64 calls, so the hot path never sorts.

    Each kind of call has its own window: time to first chunk for streams, whole calls
    otherwise.  When a backup is sent, the attempt still running is taken as evidence:
    its endpoint's latency is at least that long, so new calls stop queueing behind it.
    """

    delay: float | None = attrs.field(default=None, converter=_delay)
    max_extra: float = attrs.field(default=0.05, validator=_fraction("max_extra"))
    fence: float = attrs.field(default=2.0, converter=_fence)
    quantile: float | None = attrs.field(default=None)
    min_delay: float = attrs.field(default=0.005, converter=_min_delay)
    initial_delay: float = attrs.field(default=1.0, converter=_initial_delay)
    warmup: int = attrs.field(default=8, validator=_warmup)
    max_hedges: int = attrs.field(default=1, validator=_max_hedges)
    window: int = attrs.field(default=512)

    @quantile.validator
    def _check_quantile(self, _a: object, value: object) -> None:
        if value is None:
            return
        _fraction("quantile")(self, _a, value)
        if self.delay is not None:
            raise ConfigError(
                f"quantile={value!r} only applies to the adaptive delay, but delay="
                f"{self.delay!r} is fixed: give one or the other"
            )

    @window.validator
    def _check_window(self, _a: object, value: object) -> None:
        if not is_int(value) or not 16 <= value <= 65536:
            raise ConfigError(f"window must be an int from 16 to 65536, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.initial_delay < self.min_delay:
            raise ConfigError(
                f"initial_delay ({self.initial_delay!r} s) must not be below min_delay "
                f"({self.min_delay!r} s), the floor of every adaptive delay"
            )

    def __repr__(self) -> str:
        fields = attrs.fields(Hedge)
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields
            if getattr(self, f.name) != f.default
        ]
        return f"lbclient.Hedge({', '.join(parts)})"
