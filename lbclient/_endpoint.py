"""`Endpoint`: one replica's address and static attributes (immutable)."""

from __future__ import annotations

import math
import types
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from ._errors import ConfigError

__all__ = ["Endpoint", "EndpointLike", "to_endpoint"]


def _url(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"endpoint url must be a str, got {value!r}")
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(f"endpoint url {value!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"endpoint url {value!r} must start with http:// or https://")
    if not parts.hostname:
        raise ConfigError(f"endpoint url {value!r} has no host")
    return url


def _weight(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"endpoint weight must be a number, got {value!r}")
    w = float(value)
    if not math.isfinite(w) or w <= 0:
        raise ConfigError(f"endpoint weight must be finite and > 0, got {value!r}")
    return w


def _label(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"endpoint {name} must be a non-empty str or None, got {value!r}")
    return value.strip()


def _region(value: object) -> str | None:
    return _label("region", value)


def _zone(value: object) -> str | None:
    return _label("zone", value)


def _metadata(value: object) -> Mapping[str, Any]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ConfigError(f"endpoint metadata must be a mapping, got {value!r}")
    return types.MappingProxyType(dict(value))


@attrs.frozen(repr=False)
class Endpoint:
    """One replica: where it is and how much traffic it should get.

    >>> Endpoint("http://10.0.1.11:8000/", weight=2.0, region="eu-west-1")
    lbclient.Endpoint('http://10.0.1.11:8000', weight=2.0, region='eu-west-1')

    * ``url`` -- ``http://`` or ``https://`` with a host; a trailing ``/`` is removed,
      so ``f"{endpoint.url}/v1/..."`` is always right. The url is the endpoint's identity.
    * ``weight`` -- relative share of traffic (finite, > 0; default 1.0). An endpoint of
      weight 2 gets twice the picks of weight 1 under weighted strategies, and counts as
      twice the capacity for load-based ones (load is divided by weight).
    * ``region`` / ``zone`` -- optional labels used by geo scoring, locality and hedging
      (a hedge prefers another zone or region). Unknown or missing regions are allowed.
    * ``metadata`` -- free-form, read-only; lbclient never looks inside.

    A plain ``str`` wherever an endpoint is expected becomes ``Endpoint(str)``.
    """

    url: str = attrs.field(converter=_url)
    weight: float = attrs.field(default=1.0, converter=_weight, kw_only=True)
    region: str | None = attrs.field(default=None, converter=_region, kw_only=True)
    zone: str | None = attrs.field(default=None, converter=_zone, kw_only=True)
    metadata: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_metadata, kw_only=True, hash=False, eq=False
    )

    def __repr__(self) -> str:
        extra = "" if self.weight == 1.0 else f", weight={self.weight!r}"
        if self.region is not None:
            extra += f", region={self.region!r}"
        if self.zone is not None:
            extra += f", zone={self.zone!r}"
        if self.metadata:
            extra += f", metadata={dict(self.metadata)!r}"
        return f"lbclient.Endpoint({self.url!r}{extra})"


EndpointLike = Endpoint | str


def to_endpoint(value: object) -> Endpoint:
    """Turn a str or Endpoint into an Endpoint; anything else is a ConfigError naming it."""
    if isinstance(value, Endpoint):
        return value
    if isinstance(value, str):
        return Endpoint(value)
    raise ConfigError(f"expected an lbclient.Endpoint or a URL str, got {value!r}")
