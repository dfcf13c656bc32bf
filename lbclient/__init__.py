"""lbclient: client-side load balancing for LLM inference calls.

Smart replica picking, circuit breaking, retries with budgets, hedged requests and
geo-aware scoring, inside your Python process -- no proxy tier::

    lb = lbclient.Balancer(["http://10.0.1.10:8000", "http://10.0.1.11:8000"])

    @lb.route
    async def complete(endpoint: lbclient.Endpoint, payload: dict) -> dict:
        async with session.post(f"{endpoint.url}/v1/chat/completions", json=payload) as r:
            r.raise_for_status()
            return await r.json()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._balancer import Balancer, DrainResult
from ._clock import Clock, MonotonicClock
from ._context import CallContext, report_usage
from ._endpoint import Endpoint
from ._errors import (
    Attempt,
    AttemptsExhausted,
    BalancerClosed,
    ConfigError,
    DeadlineExceeded,
    LBError,
    NoEndpointAvailable,
    Overloaded,
    PoolFailure,
    PoolsExhausted,
    QuotaExceeded,
    StreamIdleTimeout,
    UnknownEndpoint,
)
from ._prompt import prompt_text
from .admission.policy import Admission, Quota
from .admission.spend import SpendStats
from .observe.events import (
    AdmissionEvent,
    AttemptEvent,
    BreakerEvent,
    CooldownEvent,
    Event,
    FleetEvent,
    HedgeEvent,
    Listener,
    MembershipEvent,
    PanicEvent,
    RetryEvent,
)
from .observe.stats import BalancerStats, EndpointStats
from .policies.breaker import Breaker
from .policies.budget import Budget
from .policies.classify import (
    DEFAULT_RETRY_ON,
    Classifier,
    retry_if,
    retry_if_exception,
    retry_if_status,
)
from .policies.cost import CostPolicy
from .policies.geo import GeoTable
from .policies.hedge import Hedge
from .policies.limits import Limits
from .policies.retry import Retry
from .pool.discovery import CallableDiscovery, Discovery, DnsDiscovery, StaticDiscovery
from .pool.health import HealthCheck
from .pool.locality import Locality
from .serverload import MetricsPoller, ServerMetrics
from .shared.policy import RedisState

if TYPE_CHECKING:
    from .transport import HTTPTransport

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_RETRY_ON",
    "Admission",
    "AdmissionEvent",
    "Attempt",
    "AttemptEvent",
    "AttemptsExhausted",
    "Balancer",
    "BalancerClosed",
    "BalancerStats",
    "Breaker",
    "BreakerEvent",
    "Budget",
    "CallContext",
    "CallableDiscovery",
    "Classifier",
    "Clock",
    "ConfigError",
    "CooldownEvent",
    "CostPolicy",
    "DeadlineExceeded",
    "Discovery",
    "DnsDiscovery",
    "DrainResult",
    "Endpoint",
    "EndpointStats",
    "Event",
    "FleetEvent",
    "GeoTable",
    "HTTPTransport",
    "HealthCheck",
    "Hedge",
    "HedgeEvent",
    "LBError",
    "Limits",
    "Listener",
    "Locality",
    "MembershipEvent",
    "MetricsPoller",
    "MonotonicClock",
    "NoEndpointAvailable",
    "Overloaded",
    "PanicEvent",
    "PoolFailure",
    "PoolsExhausted",
    "Quota",
    "QuotaExceeded",
    "RedisState",
    "Retry",
    "RetryEvent",
    "ServerMetrics",
    "SpendStats",
    "StaticDiscovery",
    "StreamIdleTimeout",
    "UnknownEndpoint",
    "__version__",
    "prompt_text",
    "report_usage",
    "retry_if",
    "retry_if_exception",
    "retry_if_status",
]

_LAZY = {"HTTPTransport": "lbclient.transport"}  # they import an extra (httpx)


def __getattr__(name: str) -> object:
    """The public names whose module imports an optional dependency, loaded on first use
    (``import lbclient`` stays light)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lbclient' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


# Public reprs say ``lbclient.X`` rather than the private module they live in.
for _name in __all__:
    if _name in _LAZY:
        continue
    _obj = globals()[_name]
    if (
        isinstance(_obj, type)
        and _obj.__module__.startswith("lbclient.")
        and not (_obj.__module__.startswith("lbclient.testing"))
    ):
        _obj.__module__ = "lbclient"
del _name, _obj
