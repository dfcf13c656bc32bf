"""`Endpoint`: one replica's address and static attributes (immutable)."""

from __future__ import annotations

import functools
import math
import re
import types
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from ._errors import ConfigError
from ._numbers import is_number
from .policies.limits import Limits

__all__ = ["Endpoint", "EndpointLike", "max_context", "normalize_url", "to_endpoint"]


_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_WEIGHT = 1e6
_MIN_WEIGHT = 1e-6


# Already canonical (the common case): lower-case scheme and host, a port that is not the
# default, an optional path without a trailing "/"; nothing else.  No need to parse it.
_CANONICAL = re.compile(
    r"(?:http://[a-z0-9.-]+(?::(?!80(?:/|$))(?P<p>[1-9][0-9]{0,4}))?"
    r"|https://[a-z0-9.-]+(?::(?!443(?:/|$))(?P<q>[1-9][0-9]{0,4}))?)"
    r"(?:/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*[A-Za-z0-9._~%!$&'()*+,;=:@-])?"
)
_BAD_CHAR = re.compile(r"[\s\x00-\x1f\x7f]")


@functools.lru_cache(maxsize=65536)
def _canonical(value: str) -> str:
    """The canonical form of an endpoint URL, or ValueError saying what is wrong."""
    m = _CANONICAL.fullmatch(value)
    if m is not None and int(m.group("p") or m.group("q") or 0) <= 65535:
        return value
    bad = _BAD_CHAR.search(value)
    if bad is not None:
        what = "whitespace" if bad.group().isspace() else "a control character"
        raise ValueError(f"contains {what}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise ValueError("has no host")
    if parts.query or value.rstrip("/").endswith("?"):
        raise ValueError("has a query string (?...): give the base URL only")
    if parts.fragment or "#" in value:
        raise ValueError("has a fragment (#...): give the base URL only")
    if port == 0:
        raise ValueError("has port 0")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    if parts.username is not None:
        user = parts.username + (f":{parts.password}" if parts.password is not None else "")
        netloc = f"{user}@{netloc}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def normalize_url(value: str, *, strict: bool = True) -> str:
    """``value`` as the pool knows it: scheme and host lower-cased, the default port
    dropped, no trailing ``/`` -- so ``HTTP://Host:80/`` and ``http://host`` are one
    endpoint.  ``strict=False`` (lookups) returns the input stripped of ``/`` instead of
    raising when it is not a valid endpoint URL."""
    try:
        return _canonical(value)
    except ValueError:
        if strict:
            raise
        return value.rstrip("/")


def _url(value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"endpoint url must be a str, got {value!r}")
    try:
        return _canonical(value)
    except ValueError as exc:
        raise ConfigError(f"endpoint url {value!r} {exc}") from None


def _weight(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"endpoint weight must be a number, got {value!r}")
    w = float(value)
    if not math.isfinite(w) or not _MIN_WEIGHT <= w <= _MAX_WEIGHT:
        raise ConfigError(
            f"endpoint weight must be a finite number from {_MIN_WEIGHT:g} to {_MAX_WEIGHT:g} "
            f"(weights are relative: 2 means twice the share of 1), got {value!r}"
        )
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


_NO_METADATA: Mapping[str, Any] = types.MappingProxyType({})


def _metadata(value: object) -> Mapping[str, Any]:
    if value is None or (isinstance(value, dict) and not value):
        return _NO_METADATA
    if not isinstance(value, Mapping):
        raise ConfigError(f"endpoint metadata must be a mapping, got {value!r}")
    context = value.get("max_context")
    if context is not None and (not is_number(context) or context <= 0):
        raise ConfigError(
            f"endpoint metadata['max_context'] must be a number of tokens > 0, got {context!r}"
        )
    return types.MappingProxyType(dict(value))


def _limits(value: object) -> Limits | None:
    if value is None or isinstance(value, Limits):
        return value
    if isinstance(value, type):
        raise ConfigError(
            f"endpoint limits must be an instance, not the class: "
            f"limits=lbclient.Limits(max_in_flight=...), got {value!r}"
        )
    raise ConfigError(f"endpoint limits must be an lbclient.Limits or None, got {value!r}")


def max_context(endpoint: Endpoint) -> float | None:
    """The endpoint's context window in tokens (``metadata["max_context"]``), or None."""
    value = endpoint.metadata.get("max_context")
    return None if value is None else float(value)


@attrs.frozen(repr=False)
class Endpoint:
    """One replica: where it is and how much traffic it should get.

    >>> Endpoint("http://10.0.1.11:8000/", weight=2.0, region="eu-west-1")
    lbclient.Endpoint('http://10.0.1.11:8000', weight=2.0, region='eu-west-1')

    * ``url`` -- ``http://`` or ``https://`` with a host and optionally a base path; no
      query, fragment, whitespace or port 0.  It is the endpoint's identity, so it is made
      canonical: scheme and host lower-cased, a default port (80, 443) and a trailing
      ``/`` removed -- ``f"{endpoint.url}/v1/..."`` is always right.
    * ``weight`` -- relative share of traffic (1e-6 to 1e6; default 1.0). An endpoint of
      weight 2 gets twice the picks of weight 1 under weighted strategies, and counts as
      twice the capacity for load-based ones (load is divided by weight).
    * ``region`` / ``zone`` -- optional labels used by geo scoring, locality and hedging
      (a hedge prefers another zone or region). Unknown or missing regions are allowed.
    * ``metadata`` -- free-form, read-only.  lbclient reads one key: ``"max_context"``,
      the endpoint's context window in tokens -- a call whose estimated tokens
      (``tokens=``) exceed it is never sent there (LiteLLM's pre-call context check);
      your ``eligible=`` predicates may read any (model, tags, tier...).
    * ``limits`` -- what the endpoint may be sent (:class:`lbclient.Limits`: calls in
      flight, requests and tokens per minute); default none.

    A plain ``str`` wherever an endpoint is expected becomes ``Endpoint(str)``.
    """

    url: str = attrs.field(converter=_url)
    weight: float = attrs.field(default=1.0, converter=_weight, kw_only=True)
    region: str | None = attrs.field(default=None, converter=_region, kw_only=True)
    zone: str | None = attrs.field(default=None, converter=_zone, kw_only=True)
    metadata: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_metadata, kw_only=True, hash=False, eq=False
    )
    limits: Limits | None = attrs.field(default=None, converter=_limits, kw_only=True)

    def __repr__(self) -> str:
        extra = "" if self.weight == 1.0 else f", weight={self.weight!r}"
        if self.region is not None:
            extra += f", region={self.region!r}"
        if self.zone is not None:
            extra += f", zone={self.zone!r}"
        if self.metadata:
            extra += f", metadata={dict(self.metadata)!r}"
        if self.limits is not None:
            extra += f", limits={self.limits!r}"
        return f"lbclient.Endpoint({self.url!r}{extra})"


EndpointLike = Endpoint | str


@functools.lru_cache(maxsize=65536)
def _from_url(url: str) -> Endpoint:
    return Endpoint(url)  # immutable: one object per URL string is safe to share


def to_endpoint(value: object) -> Endpoint:
    """Turn a str or Endpoint into an Endpoint; anything else is a ConfigError naming it."""
    if isinstance(value, Endpoint):
        return value
    if isinstance(value, str):
        return _from_url(value)
    raise ConfigError(f"expected an lbclient.Endpoint or a URL str, got {value!r}")
