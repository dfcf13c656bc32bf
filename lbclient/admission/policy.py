"""`Admission` and `Quota`: how many calls may run, who waits, who is shed (frozen)."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number

__all__ = ["ADAPTIVE", "Admission", "Quota"]

ADAPTIVE = "adaptive"


def _rate(name: str) -> Any:
    def check(_i: object, _a: object, value: object) -> None:
        if value is None:
            return
        if not is_number(value) or value <= 0:
            raise ConfigError(f"Quota {name} must be a finite number > 0 or None, got {value!r}")

    return check


def _burst(_i: object, _a: object, value: object) -> None:
    if not is_number(value) or value <= 0:
        raise ConfigError(f"Quota burst must be a finite number > 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Quota:
    """What one tenant may use: token buckets, charged at admission, settled after.

    >>> lbclient.Quota(tokens_per_minute=200_000, requests_per_second=50)

    * ``tokens_per_minute`` -- estimated tokens (the route's ``tokens=``) a tenant may
      start per minute; the real usage, when the response tells it, settles the estimate
      (unused tokens go back, extra ones are charged).
    * ``requests_per_second`` -- calls a tenant may start per second.
    * ``burst`` -- how much may be used at once, in each quota's own period (default
      1.0: one second of ``requests_per_second``, one minute of ``tokens_per_minute``).

    Over quota, a call fails at once with :class:`lbclient.QuotaExceeded`, whose
    ``retry_after`` is when the bucket will hold enough again.  A cancelled or failed
    call keeps its charge (the replica may have done the work) unless it never reached
    one -- nothing leaks either way: the charge is one withdrawal, settled once.
    """

    tokens_per_minute: float | None = attrs.field(
        default=None, validator=_rate("tokens_per_minute")
    )
    requests_per_second: float | None = attrs.field(
        default=None, validator=_rate("requests_per_second")
    )
    burst: float = attrs.field(default=1.0, validator=_burst)

    def __attrs_post_init__(self) -> None:
        if self.tokens_per_minute is None and self.requests_per_second is None:
            raise ConfigError(
                "Quota needs tokens_per_minute, requests_per_second or both (a quota with "
                "neither limits nothing)"
            )


def _limit(value: object) -> int | str:
    if value == ADAPTIVE:
        return ADAPTIVE
    if not is_int(value) or value < 1:
        raise ConfigError(f"Admission limit must be 'adaptive' or an int >= 1, got {value!r}")
    return value


def _count(name: str, minimum: int) -> Any:
    def check(_i: object, _a: object, value: object) -> None:
        if not is_int(value) or value < minimum:
            raise ConfigError(f"Admission {name} must be an int >= {minimum}, got {value!r}")

    return check


def _seconds(_i: object, a: attrs.Attribute[Any], value: object) -> None:
    if not is_number(value) or value < 0:
        raise ConfigError(
            f"Admission {a.name} must be a finite number of seconds >= 0, got {value!r}"
        )


def _quotas(value: object) -> Mapping[object, Quota]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ConfigError(f"Admission quotas must be a mapping of tenant -> Quota, got {value!r}")
    for tenant, quota in value.items():
        if not isinstance(quota, Quota):
            raise ConfigError(
                f"Admission quotas[{tenant!r}] must be an lbclient.Quota, got {quota!r}"
            )
    return types.MappingProxyType(dict(value))


def _weights(value: object) -> Mapping[object, float]:
    if value is None:
        return types.MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ConfigError(f"Admission weights must be a mapping of tenant -> weight, got {value!r}")
    for tenant, w in value.items():
        if not is_number(w) or w <= 0:
            raise ConfigError(f"Admission weights[{tenant!r}] must be a number > 0, got {w!r}")
    return types.MappingProxyType({k: float(v) for k, v in value.items()})


def _throttle(value: object) -> float | None:
    if value is None:
        return None
    if not is_number(value) or value < 1:
        raise ConfigError(f"Admission throttle must be a number >= 1 (K) or None, got {value!r}")
    return float(value)


@attrs.frozen(kw_only=True)
class Admission:
    """Admission control: how many calls run at once across the pool, who waits, in what
    order, and who is shed -- fast and clearly -- instead of queueing without bound.

    >>> lbclient.Admission()                              # adaptive limit, fair, bounded
    >>> lbclient.Admission(limit=64, max_wait=0.5)        # a fixed limit
    >>> lbclient.Admission(quotas={"*": lbclient.Quota(requests_per_second=50)})

    * ``limit`` -- calls in flight across the pool: an int, or ``"adaptive"`` (default):
      a gradient limiter between ``min_limit`` and ``max_limit`` (starting at
      ``initial_limit``) that grows while latency holds and shrinks when it rises.  It
      reads latency that does not depend on output length -- time to first chunk for
      streams, latency per estimated token for calls that give ``tokens=``, plain latency
      otherwise -- so a long generation is not mistaken for congestion; and it backs off
      at once (x0.9) when replicas answer 429 or 503.
    * ``max_queue`` -- callers that may wait for a slot (default 1000); one more is shed
      at once with :class:`lbclient.Overloaded` ``("queue full")``.
    * ``max_wait`` -- seconds a caller may wait (default 5.0), or less: its own deadline.
      A caller whose expected wait (the queue ahead of it, at the rate slots free up)
      exceeds that is shed at once rather than after waiting -- shedding is fast.  Before
      any call has finished (no rate yet), one round of the limit may queue; the rest of
      a cold burst is shed at once.  A route's ``timeout=`` counts the wait too.
    * ``fair`` -- waiting callers are served by virtual token counters per tenant (VTC,
      "Fairness in Serving Large Language Models", OSDI 2024): the tenant that has
      received the least service, in ``input + 2 x output`` tokens (estimated, then
      settled), goes first; a tenant that becomes active starts at the least counter of
      the waiting ones (or, with nobody waiting, of the tenant served last), so
      idleness banks no credit.  Work-conserving: a lone tenant may
      use every slot.  ``weights`` gives tenants shares (default 1 each).  ``fair=False``:
      first come, first served.  Higher ``priority=`` (on the route) goes first in any
      case.
    * ``quotas`` -- ``{tenant: Quota}``; ``"*"`` is every tenant without its own.
    * ``throttle`` -- client-side throttling when the fleet itself rejects (Google SRE,
      "Handling Overload"): reject locally with probability
      ``max(0, (requests - K x accepts) / (requests + 1))`` over the last ``2`` minutes;
      ``K`` (default 2.0) -- ``None`` turns it off.
    """

    limit: int | str = attrs.field(default=ADAPTIVE, converter=_limit)
    initial_limit: int = attrs.field(default=20, validator=_count("initial_limit", 1))
    min_limit: int = attrs.field(default=4, validator=_count("min_limit", 1))
    max_limit: int = attrs.field(default=1000, validator=_count("max_limit", 1))
    max_queue: int = attrs.field(default=1000, validator=_count("max_queue", 0))
    max_wait: float = attrs.field(default=5.0, validator=_seconds)
    fair: bool = attrs.field(default=True)
    quotas: Mapping[object, Quota] = attrs.field(factory=dict, converter=_quotas)
    weights: Mapping[object, float] = attrs.field(factory=dict, converter=_weights)
    throttle: float | None = attrs.field(default=2.0, converter=_throttle)

    @fair.validator
    def _check_fair(self, _a: object, value: object) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"Admission fair must be a bool, got {value!r}")

    def __attrs_post_init__(self) -> None:
        if self.min_limit > self.max_limit:
            raise ConfigError(
                f"Admission min_limit ({self.min_limit}) must be <= max_limit ({self.max_limit})"
            )
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ConfigError(
                f"Admission initial_limit ({self.initial_limit}) must be within min_limit "
                f"({self.min_limit}) and max_limit ({self.max_limit})"
            )

    @property
    def adaptive(self) -> bool:
        return self.limit == ADAPTIVE

    def quota_for(self, tenant: object) -> Quota | None:
        q = self.quotas.get(tenant)
        return q if q is not None else self.quotas.get("*")
