"""`BalancerConfig`: every ``Balancer(...)`` argument, checked once, frozen.

Each converter turns what a user may pass into what the balancer uses, or raises a
:class:`~lbclient.ConfigError` that names the bad value -- at construction, never at the
first call.  Common mistakes get their own message: a class where an instance is meant
(``strategy=PowerOfTwo``), a ``dict`` of endpoints (whose values would be dropped), the
same endpoint spelled twice (``HTTP://A:80`` and ``http://a``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from . import strategies as _strategies
from ._clock import MONOTONIC, Clock
from ._endpoint import Endpoint, to_endpoint
from ._errors import ConfigError
from ._numbers import is_int, is_number
from .admission.policy import Admission
from .engine.engine import Engine
from .engine.route import check_timeout
from .observe.observer import EventHandler, to_listeners
from .policies.breaker import Breaker
from .policies.cost import CostPolicy, Price
from .policies.geo import GeoTable
from .policies.hedge import Hedge
from .policies.retry import Retry
from .pool.locality import Locality
from .shared.policy import RedisState
from .strategies import Strategy

__all__ = ["BalancerConfig", "chain_of"]


def _instance(value: object, name: str, cls: type, example: str) -> Any:
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, type):
        raise ConfigError(
            f"{name} must be an instance, not the class: {name}={example}, got {value!r}"
        )
    raise ConfigError(f"{name} must be an lbclient.{cls.__name__} or None, got {value!r}")


def _retry(value: object) -> Retry | None:
    return _instance(value, "retry", Retry, "lbclient.Retry()")  # type: ignore[no-any-return]


def _breaker(value: object) -> Breaker | None:
    return _instance(value, "breaker", Breaker, "lbclient.Breaker()")  # type: ignore[no-any-return]


def _hedge(value: object) -> Hedge | None:
    return _instance(value, "hedge", Hedge, "lbclient.Hedge()")  # type: ignore[no-any-return]


def _endpoints(value: object) -> tuple[Endpoint, ...]:
    if isinstance(value, str | Endpoint) or not isinstance(value, Iterable):
        raise ConfigError(f"endpoints must be a list of URLs or Endpoints, got {value!r}")
    if isinstance(value, Mapping):
        raise ConfigError(
            "endpoints must be a list, not a mapping (its values would be silently dropped): "
            f"use [lbclient.Endpoint(url, weight=w), ...], got {value!r}"
        )
    items = list(value)
    eps = tuple(to_endpoint(e) for e in items)
    seen: dict[str, object] = {}
    for given, ep in zip(items, eps, strict=True):
        if ep.url in seen:
            first = seen[ep.url]
            also = "" if first == given else f" (also given as {first!r})"
            raise ConfigError(f"duplicate endpoint url {ep.url!r}: {given!r}{also}")
        seen[ep.url] = given
    return eps


def _strategy(value: object) -> Strategy:
    if isinstance(value, type):
        raise ConfigError(
            f"strategy must be a name or a strategy instance, not the class: "
            f"strategy={value.__name__}(), got {value!r}"
        )
    return _strategies.resolve(value)


def _ewma_decay(value: object) -> float:
    if not is_number(value) or value <= 0:
        raise ConfigError(f"ewma_decay must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _slow_start(value: object) -> float | None:
    return check_timeout(value, "slow_start")


def _region(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"region must be a non-empty str or None, got {value!r}")
    return value.strip()


def _locality(value: object) -> Locality | None:
    if value is True:
        return Locality()
    if value is False or value is None:
        return None
    return _instance(value, "locality", Locality, "lbclient.Locality()")  # type: ignore[no-any-return]


def _health(value: object) -> Any:
    if value is None:
        return None
    if isinstance(value, type):
        raise ConfigError(
            f"health must be an instance, not the class: health=lbclient.HealthCheck(), "
            f"got {value!r}"
        )
    if not callable(getattr(value, "check_loop", None)):
        raise ConfigError(f"health must be an lbclient.HealthCheck or None, got {value!r}")
    return value


def _discovery(value: object) -> Any:
    if value is None:
        return None
    if isinstance(value, type):
        raise ConfigError(
            f"discovery must be an instance, not the class: e.g. "
            f"discovery=lbclient.DnsDiscovery('llm.internal'), got {value!r}"
        )
    if not callable(getattr(value, "resolve", None)):
        raise ConfigError(
            f"discovery must have an async resolve() method (lbclient.DnsDiscovery, "
            f"lbclient.CallableDiscovery, ...), got {value!r}"
        )
    return value


def _on_event(value: object) -> tuple[EventHandler, ...]:
    try:
        return to_listeners(value)
    except TypeError as exc:
        raise ConfigError(
            f"on_event must be a callable, an lbclient.Listener (an object with an "
            f"on_event method) or a list of them, got {exc.args[0]!r}"
        ) from None


def _clock(value: object) -> Clock:
    if value is None:
        return MONOTONIC
    if isinstance(value, type) or not isinstance(value, Clock):
        raise ConfigError(f"clock must implement lbclient.Clock (now, sleep), got {value!r}")
    return value


def _rng(value: object) -> random.Random:
    if isinstance(value, random.Random):
        return value
    if value is None or is_int(value):
        return random.Random(value)
    raise ConfigError(f"rng must be a random.Random, an int seed or None, got {value!r}")


def _admission(value: object) -> Admission | None:
    return _instance(value, "admission", Admission, "lbclient.Admission()")  # type: ignore[no-any-return]


def _cost(value: object) -> CostPolicy | None:
    return _instance(value, "cost", CostPolicy, "lbclient.CostPolicy()")  # type: ignore[no-any-return]


def _shared(value: object) -> RedisState | None:
    return _instance(value, "shared", RedisState, "lbclient.RedisState(url)")  # type: ignore[no-any-return]


def _geo(value: object) -> GeoTable | None:
    return _instance(value, "geo", GeoTable, "lbclient.GeoTable()")  # type: ignore[no-any-return]


def _fallback(value: object) -> Any:
    if value is None:
        return None
    engine = getattr(value, "_engine", None)
    if isinstance(value, type) or not isinstance(engine, Engine):
        raise ConfigError(f"fallback must be an lbclient.Balancer or None, got {value!r}")
    if engine.pool.closed:
        raise ConfigError(f"fallback must be an open balancer, got a closed one: {value!r}")
    return value  # (its chain is walked by Balancer: a cycle anywhere is refused there)


def chain_of(first: object, start: object = None) -> list[object]:
    """The fallback chain from ``first`` on (``first``, its fallback, ...); a balancer
    met twice -- or ``start``, the balancer being built -- is a cycle: ConfigError."""
    chain: list[object] = []
    current: object = first
    while current is not None:
        if current is start or any(current is seen for seen in chain):
            names = " -> ".join(repr(b) for b in [*chain, current])
            raise ConfigError(f"fallback chain has a cycle: {names}")
        chain.append(current)
        current = getattr(current, "_engine").fallback  # noqa: B009
    return chain


def _name(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"name must be a non-empty str or None, got {value!r}")
    return value.strip()


_DEFAULT_STRATEGY: Any = "peak_ewma"


@attrs.frozen(kw_only=True)
class BalancerConfig:
    """The checked arguments of one :class:`~lbclient.Balancer` (see its docstring)."""

    endpoints: tuple[Endpoint, ...] = attrs.field(converter=_endpoints)
    strategy: Strategy = attrs.field(default=_DEFAULT_STRATEGY, converter=_strategy)
    retry: Retry | None = attrs.field(default=None, converter=_retry)
    breaker: Breaker | None = attrs.field(default=None, converter=_breaker)
    hedge: Hedge | None = attrs.field(default=None, converter=_hedge)
    admission: Admission | None = attrs.field(default=None, converter=_admission)
    shared: RedisState | None = attrs.field(default=None, converter=_shared)
    region: str | None = attrs.field(default=None, converter=_region)
    geo: GeoTable | None = attrs.field(default=None, converter=_geo)
    on_event: tuple[EventHandler, ...] = attrs.field(default=None, converter=_on_event)
    ewma_decay: float = attrs.field(default=10.0, converter=_ewma_decay)
    slow_start: float | None = attrs.field(default=None, converter=_slow_start)
    locality: Locality | None = attrs.field(default=None, converter=_locality)
    health: Any = attrs.field(default=None, converter=_health)
    discovery: Any = attrs.field(default=None, converter=_discovery)
    clock: Clock = attrs.field(default=None, converter=_clock)
    rng: random.Random = attrs.field(default=None, converter=_rng)
    cost: CostPolicy | None = attrs.field(default=None, converter=_cost)
    fallback: Any = attrs.field(default=None, converter=_fallback)
    name: str | None = attrs.field(default=None, converter=_name)

    def __attrs_post_init__(self) -> None:
        if not self.endpoints and self.discovery is None:
            raise ConfigError("endpoints must not be empty (or give discovery=): got []")
        if self.locality is not None and self.region is None:
            raise ConfigError("locality needs the client's own region: pass region=")
        if self.cost is not None:
            for ep in self.endpoints:
                Price.of(ep)  # a bad price fails here, naming the endpoint and the key
        if self.ewma_decay < 0.01:
            raise ConfigError(
                f"ewma_decay must be at least 0.01 s (it is how long the latency estimate "
                f"takes to forget), got {self.ewma_decay!r}"
            )
