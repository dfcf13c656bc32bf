"""Network distance between regions: a default table from the scaling playbook, overridable.

>>> GeoTable.default().latency("us-east-1", "eu-west-1")
0.09
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import attrs

from .._errors import ConfigError
from .._numbers import is_number

__all__ = ["DEFAULT_LATENCY_MS", "GeoTable"]

DEFAULT_LATENCY_MS: Mapping[frozenset[str], float] = types.MappingProxyType(
    {
        frozenset(("us-east-1", "us-west-2")): 70.0,
        frozenset(("us-east-1", "eu-west-1")): 90.0,
        frozenset(("us-east-1", "ap-southeast-1")): 200.0,
        frozenset(("us-west-2", "eu-west-1")): 150.0,
        frozenset(("us-west-2", "ap-southeast-1")): 130.0,
        frozenset(("eu-west-1", "ap-southeast-1")): 160.0,
    }
)
"""Round-trip milliseconds between AWS regions (playbook figures)."""


def _ms(name: str) -> Callable[[object, object, object], None]:
    def check(_i: object, _a: object, value: object) -> None:
        if not is_number(value) or value < 0:
            raise ConfigError(f"{name} must be a finite number of ms >= 0, got {value!r}")

    return check


def _pairs(value: object) -> Mapping[frozenset[str], float]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"latency_ms must be a mapping of region pairs to ms, got {value!r}")
    out: dict[frozenset[str], float] = {}
    for pair, ms in value.items():
        if (
            isinstance(pair, str)
            or not isinstance(pair, tuple | list | frozenset | set)
            or len(pair) != 2
            or not all(isinstance(r, str) for r in pair)
        ):
            raise ConfigError(f"latency_ms key must be a pair of two region names, got {pair!r}")
        if not is_number(ms) or ms < 0:
            raise ConfigError(
                f"latency_ms[{pair!r}] must be a finite number of ms >= 0, got {ms!r}"
            )
        out[frozenset(pair)] = float(ms)
    return types.MappingProxyType(out)


@attrs.frozen(kw_only=True)
class GeoTable:
    """Round-trip network latency between regions, in milliseconds.

    * ``latency_ms`` -- ``{("us-east-1", "eu-west-1"): 90, ...}``; pairs are unordered.
    * ``same_region_ms`` -- within one region (default 10).
    * ``unknown_ms`` -- a pair not in the table, or an endpoint with no region
      (default 200: far enough that labelled nearby regions win, near enough to be used
      before failing).

    Extend the default with ``GeoTable.default().with_pairs({("a", "b"): 25})``.
    """

    latency_ms: Mapping[frozenset[str], float] = attrs.field(
        factory=lambda: DEFAULT_LATENCY_MS, converter=_pairs
    )
    same_region_ms: float = attrs.field(default=10.0, validator=_ms("same_region_ms"))
    unknown_ms: float = attrs.field(default=200.0, validator=_ms("unknown_ms"))

    @classmethod
    def default(cls) -> GeoTable:
        return cls()

    def with_pairs(self, pairs: Mapping[tuple[str, str], float]) -> GeoTable:
        merged = dict(self.latency_ms)
        merged.update(_pairs(pairs))
        return attrs.evolve(self, latency_ms=merged)

    def latency(self, a: str | None, b: str | None) -> float:
        """Seconds between regions ``a`` and ``b`` (``None`` on either side: unknown)."""
        if a is None or b is None:
            return self.unknown_ms / 1000.0
        if a == b:
            return self.same_region_ms / 1000.0
        return self.latency_ms.get(frozenset((a, b)), self.unknown_ms) / 1000.0
