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

from ._balancer import Balancer, DrainResult
from ._breaker import Breaker
from ._classify import Classifier, retry_if, retry_if_exception, retry_if_status
from ._clock import Clock, MonotonicClock
from ._discovery import CallableDiscovery, Discovery, DnsDiscovery, StaticDiscovery
from ._endpoint import Endpoint
from ._errors import (
    Attempt,
    AttemptsExhausted,
    BalancerClosed,
    ConfigError,
    DeadlineExceeded,
    LBError,
    NoEndpointAvailable,
    StreamIdleTimeout,
    UnknownEndpoint,
)
from ._events import BreakerEvent, Event, Listener, MembershipEvent, PanicEvent
from ._geo import GeoTable
from ._health import HealthCheck
from ._hedge import Hedge
from ._locality import Locality
from ._retry import Retry
from ._stats import BalancerStats, EndpointStats

__version__ = "0.1.0"

__all__ = [
    "Attempt",
    "AttemptsExhausted",
    "Balancer",
    "BalancerClosed",
    "BalancerStats",
    "Breaker",
    "BreakerEvent",
    "CallableDiscovery",
    "Classifier",
    "Clock",
    "ConfigError",
    "DeadlineExceeded",
    "Discovery",
    "DnsDiscovery",
    "DrainResult",
    "Endpoint",
    "EndpointStats",
    "Event",
    "GeoTable",
    "HealthCheck",
    "Hedge",
    "LBError",
    "Listener",
    "Locality",
    "MembershipEvent",
    "MonotonicClock",
    "NoEndpointAvailable",
    "PanicEvent",
    "Retry",
    "StaticDiscovery",
    "StreamIdleTimeout",
    "UnknownEndpoint",
    "__version__",
    "retry_if",
    "retry_if_exception",
    "retry_if_status",
]

# Public reprs say ``lbclient.X`` rather than the private module they live in.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("lbclient._"):
        _obj.__module__ = "lbclient"
del _name, _obj
