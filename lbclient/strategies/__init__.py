"""Replica-picking strategies: a registry by name, and the protocols for your own.

=======================  ==========================================================
name                     picks
=======================  ==========================================================
``round_robin``          each endpoint in turn
``weighted_round_robin`` in proportion to weight, interleaved (EDF)
``random``               weighted random
``least_connections``    fewest in-flight per weight (scans all: O(n))
``least_response_time``  lowest peak-EWMA latency x (in-flight + 1) (scans all: O(n))
``power_of_two``         P2C on in-flight per weight
``peak_ewma``            least peak-EWMA latency x (in-flight + 1) of up to 16 (the default)
``consistent_hash``      key affinity on an mmh3 ring with bounded load
``geo``                  lowest estimated total latency (network + processing + load)
``prefix``               KV-cache affinity on the prompt prefix, priced against load
=======================  ==========================================================

A strategy is any object with a ``name`` and a ``picker(states, ctx)`` method returning
an object with ``pick(key, exclude)`` (see :class:`Strategy`, :class:`Picker`);
:func:`register` adds it to the names ``Balancer(strategy=...)`` accepts.  A strategy
whose class sets ``uses_prefix = True`` (as ``prefix`` does) gets the prompt text from the
built-in :class:`~lbclient.http.ChatClient` in ``call.prefix``.
"""

from __future__ import annotations

from collections.abc import Callable

from .._errors import ConfigError
from ..pool.state import EndpointState
from ._base import PickContext, Picker, Strategy, Totals
from .consistent_hash import ConsistentHash
from .geo import Geo
from .least import LeastConnections, LeastResponseTime
from .p2c import PeakEwma, PowerOfTwo
from .prefix import Prefix
from .random import Random
from .round_robin import RoundRobin
from .weighted_round_robin import WeightedRoundRobin

__all__ = [
    "ConsistentHash",
    "EndpointState",
    "Geo",
    "LeastConnections",
    "LeastResponseTime",
    "PeakEwma",
    "PickContext",
    "Picker",
    "PowerOfTwo",
    "Prefix",
    "Random",
    "RoundRobin",
    "Strategy",
    "Totals",
    "WeightedRoundRobin",
    "names",
    "register",
    "resolve",
]

_REGISTRY: dict[str, Callable[[], Strategy]] = {}


def register(name: str, factory: Callable[[], Strategy]) -> None:
    """Make ``Balancer(strategy=name)`` build ``factory()``.  Re-registering replaces."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"strategy name must be a non-empty str, got {name!r}")
    _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    """Registered strategy names, sorted."""
    return tuple(sorted(_REGISTRY))


def resolve(strategy: object) -> Strategy:
    """A strategy object from a registered name or an object implementing :class:`Strategy`."""
    if isinstance(strategy, str):
        try:
            factory = _REGISTRY[strategy]
        except KeyError:
            raise ConfigError(
                f"unknown strategy {strategy!r}; known: {', '.join(names())}"
            ) from None
        return factory()
    if callable(getattr(strategy, "picker", None)):
        return strategy  # type: ignore[return-value]
    raise ConfigError(
        f"strategy must be a name ({', '.join(names())}) or an object with a "
        f"picker(states, ctx) method, got {strategy!r}"
    )


for _cls in (
    RoundRobin,
    WeightedRoundRobin,
    Random,
    LeastConnections,
    LeastResponseTime,
    PowerOfTwo,
    PeakEwma,
    ConsistentHash,
    Geo,
    Prefix,
):
    register(_cls().name, _cls)  # type: ignore[arg-type]
del _cls
