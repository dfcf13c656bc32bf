"""Immutable snapshots of what the balancer knows: ``lb.stats()``."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ..engine.engine import Engine
    from ..pool.pool import Pool
    from ..pool.state import EndpointState

__all__ = [
    "AdmissionStats",
    "BalancerStats",
    "EndpointStats",
    "FleetQuotaStats",
    "SharedStats",
    "TenantStats",
    "health_view",
    "snapshot",
]


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


@attrs.frozen(kw_only=True)
class EndpointStats:
    """One endpoint at the moment of the snapshot.  Latencies in milliseconds.

    ``state`` is ``"active"`` or ``"draining"``; ``breaker`` is ``None`` without a
    breaker, else ``"closed"``, ``"open"`` or ``"half_open"``; ``pickable`` says whether
    new calls can go there now; ``cooling_s`` how long it stays out after a
    ``Retry-After`` (0 when it is not cooling).  ``p50_ms``/``p99_ms`` cover the last 256
    calls, ``ttft_ms`` (an average) and ``ttft_p50_ms``/``ttft_p99_ms`` the last 256
    streams' time to first chunk.

    Attempts sent here (``requests``) end as ``successes``, ``failures`` (counted against
    the endpoint; ``cut`` of them by a call's deadline), ``ignored`` (failed, not its
    fault: a 4xx, a bug in the wrapped code) or ``cancelled`` (``lost`` of them: hedge
    losers held against it).  ``retries`` counts retries sent *to* this endpoint;
    ``retries_denied`` counts failures *here* that the retry budget did not let the
    balancer retry.
    """

    url: str
    region: str | None
    zone: str | None
    weight: float
    effective_weight: float
    state: str
    pickable: bool
    breaker: str | None
    trips: int
    in_flight: int
    requests: int
    successes: int
    failures: int
    ignored: int
    cancelled: int
    cut: int
    lost: int
    retries: int
    retries_denied: int
    hedges_sent: int
    hedges_won: int
    latency_ewma_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    ttft_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    chunks_per_s: float | None
    server_load: float | None
    cooling_s: float

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class TenantStats:
    """One tenant under admission.  ``admitted`` calls got a slot (``waited`` of them after
    queueing); ``queued`` and ``in_flight`` are now; ``shed`` counts refusals by reason
    (``"queue full"``, ``"wait exceeded"``, ``"throttled"``); ``quota_denied`` the calls
    over quota; ``tokens_in_flight`` the estimated tokens of its running calls;
    ``service`` its fairness counter (weighted tokens received, VTC)."""

    tenant: object
    admitted: int
    waited: int
    queued: int
    in_flight: int
    shed: Mapping[str, int]
    quota_denied: int
    tokens_in_flight: float
    service: float


@attrs.frozen(kw_only=True)
class AdmissionStats:
    """The admission gate: the current concurrency ``limit`` (adaptive or fixed), calls
    ``in_flight`` under it and ``queued`` for it, ``tokens_in_flight``, calls ``shed``
    by reason, and per tenant."""

    limit: float
    adaptive: bool
    in_flight: int
    queued: int
    tokens_in_flight: float
    shed: Mapping[str, int]
    tenants: tuple[TenantStats, ...]

    def tenant(self, tenant: object) -> TenantStats:
        for t in self.tenants:
            if t.tenant == tenant:
                return t
        raise KeyError(tenant)


@attrs.frozen(kw_only=True)
class FleetQuotaStats:
    """One tenant's quota dimension (``"requests"`` or ``"tokens"``) in this process:
    ``leasing`` (fed by leases from the fleet bucket) or not (local share: quota /
    peers); ``level`` what it holds now (negative: started on credit);
    ``demand_per_s`` its smoothed demand; ``leased`` units leased in all."""

    tenant: str
    dimension: str
    leasing: bool
    level: float
    demand_per_s: float
    leased: float


@attrs.frozen(kw_only=True)
class SharedStats:
    """The fleet-shared state (``Balancer(shared=lbclient.RedisState(...))``).

    ``mode``: ``"connecting"`` (Redis not reached yet), ``"connected"``, ``"degraded"``
    (unreachable or too slow: running on the last leases and quota / ``peers``) or
    ``"closed"``.  ``scripts`` is False when the server refuses Lua (windowed-counter
    quotas), None before it is known.  ``peers`` is the live process count last seen
    (this one included; ``expected_peers`` before any).  ``synced_ago_s``: seconds
    since the last successful sync (None: never).  ``rounds`` / ``errors``: syncs done
    and failed; ``degraded_total``: times the link lost Redis.  ``events_sent`` /
    ``events_received``: what this process published and heard.  Remote evidence
    applied here: ``ejected`` (endpoints ejected on fleet evidence), ``suspected``
    (probe-only on one peer's word), ``refuted`` (such a probe succeeded),
    ``cooldowns`` (Retry-After shared).  ``quotas``: the leased quota dimensions."""

    mode: str
    namespace: str
    peer: str
    peers: int
    scripts: bool | None
    synced_ago_s: float | None
    rounds: int
    errors: int
    degraded_total: int
    events_sent: int
    events_received: int
    ejected: int
    suspected: int
    refuted: int
    cooldowns: int
    quotas: tuple[FleetQuotaStats, ...]

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class BalancerStats:
    """The whole pool: per-endpoint stats plus call-level totals.

    ``calls`` counts calls made through the balancer (one per decorated call, however
    many attempts it took); ``attempts`` counts what reached endpoints (first tries,
    retries and hedges).  ``failed_by`` counts failed calls by reason, ``retries_by``
    retries by the kind of error retried (``"status 503"``, ``"connection"``...).
    ``panic`` is true while the breaker's max-ejection share is reached and ejected
    endpoints are being used anyway.  ``admission`` is the gate (with ``admission=``),
    ``shared`` the fleet-shared state (with ``shared=``).  ``fallbacks`` counts calls
    this pool could not serve and handed to its ``fallback=`` pool (they count in
    ``calls_failed`` too).
    """

    strategy: str
    closed: bool
    panic: bool
    calls: int
    calls_failed: int
    failed_by: Mapping[str, int]
    attempts: int
    retries: int
    retries_by: Mapping[str, int]
    retries_denied: int
    hedges_sent: int
    hedges_won: int
    hedges_denied: int
    hedge_delay_ms: float | None
    cooldowns: int
    in_flight: int
    endpoints: tuple[EndpointStats, ...]
    admission: AdmissionStats | None = None
    shared: SharedStats | None = None
    fallbacks: int = 0

    def endpoint(self, url: str) -> EndpointStats:
        """The stats of one endpoint by url (trailing ``/`` ignored)."""
        url = url.rstrip("/")
        for e in self.endpoints:
            if e.url == url:
                return e
        raise KeyError(url)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, value_serializer=_plain)

    def __str__(self) -> str:
        lines = [
            f"strategy={self.strategy} calls={self.calls} failed={self.calls_failed} "
            f"attempts={self.attempts} retries={self.retries} hedges={self.hedges_sent} "
            f"in_flight={self.in_flight}{' PANIC' if self.panic else ''}"
        ]
        for e in self.endpoints:
            ewma = "-" if e.latency_ewma_ms is None else f"{e.latency_ewma_ms:.1f}"
            p99 = "-" if e.p99_ms is None else f"{e.p99_ms:.1f}"
            lines.append(
                f"  {e.url} {e.state}{'' if e.breaker in (None, 'closed') else '/' + e.breaker}"
                f" in_flight={e.in_flight} requests={e.requests} failures={e.failures}"
                f" ewma={ewma}ms p99={p99}ms"
            )
        return "\n".join(lines)


def _plain(_inst: object, _field: object, value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


def _ms(values: list[float], q: float) -> float | None:
    return None if not values else _quantile(values, q) * 1000  # type: ignore[operator]


def endpoint_stats(s: EndpointState, now: float) -> EndpointStats:
    lat = sorted(s.call.recent())
    ttft = sorted(s.ttft.recent())
    b = s.breaker
    return EndpointStats(
        url=s.url,
        region=s.endpoint.region,
        zone=s.endpoint.zone,
        weight=s.endpoint.weight,
        effective_weight=s.weight,
        state="draining" if s.draining else "active",
        pickable=s.available and not s.draining,
        breaker=None if b is None else b.state,
        trips=0 if b is None else b.trips,
        in_flight=s.inflight,
        requests=s.requests,
        successes=s.successes,
        failures=s.failures,
        ignored=s.ignored,
        cancelled=s.cancelled,
        cut=s.cut,
        lost=s.lost,
        retries=s.retries_sent,
        retries_denied=s.retries_denied,
        hedges_sent=s.hedges_sent,
        hedges_won=s.hedges_won,
        latency_ewma_ms=s.ewma(now) * 1000 if s.call.count else None,
        p50_ms=_ms(lat, 0.5),
        p99_ms=_ms(lat, 0.99),
        ttft_ms=s.ttft.at(now) * 1000 if s.ttft.count else None,
        ttft_p50_ms=_ms(ttft, 0.5),
        ttft_p99_ms=_ms(ttft, 0.99),
        chunks_per_s=(s.chunks / s.stream_time) if s.stream_time > 0 else None,
        server_load=s.server_load,
        cooling_s=max(0.0, s.cooldown_until - now),
    )


def snapshot(pool: Pool, engine: Engine) -> BalancerStats:
    """``lb.stats()``: every endpoint and the call totals, now."""
    now = pool.now()
    if now >= pool.next_refresh and not pool.closed:
        pool.refresh()  # so ``pickable`` reflects health/breaker changes already made
    eps = tuple(endpoint_stats(s, now) for s in pool.members.values())
    c = engine.counters
    hedger = engine.hedger
    gate = engine.gate
    admission = None
    if gate is not None:
        counters = gate.queue.counters
        admission = AdmissionStats(
            limit=gate.limit,
            adaptive=gate.limiter is not None,
            in_flight=gate.in_flight,
            queued=gate.queue.size,
            tokens_in_flight=gate.tokens_in_flight,
            shed=types.MappingProxyType(dict(gate.shed_total)),
            tenants=tuple(
                TenantStats(
                    tenant=t,
                    admitted=tc.admitted,
                    waited=tc.waited,
                    queued=tc.queued,
                    in_flight=tc.in_flight,
                    shed=types.MappingProxyType(dict(tc.shed)),
                    quota_denied=tc.quota_denied,
                    tokens_in_flight=tc.tokens_in_flight,
                    service=counters.get(t, 0.0),
                )
                for t, tc in gate.tenants.items()
            ),
        )
    return BalancerStats(
        strategy=pool.strategy.name,
        closed=pool.closed,
        panic=pool.panic,
        calls=c.calls,
        calls_failed=c.calls_failed,
        failed_by=types.MappingProxyType(dict(c.failed_by)),
        attempts=sum(e.requests for e in eps),
        retries=c.retries,
        retries_by=types.MappingProxyType(dict(c.retries_by)),
        retries_denied=c.retries_denied,
        hedges_sent=c.hedges_sent,
        hedges_won=c.hedges_won,
        hedges_denied=c.hedges_denied,
        hedge_delay_ms=None if hedger is None else hedger.current_delay() * 1000,
        cooldowns=c.cooldowns,
        in_flight=sum(e.in_flight for e in eps),
        endpoints=eps,
        admission=admission,
        shared=None if pool.shared is None else pool.shared.stats(),
        fallbacks=c.fallbacks,
    )


def health_view(stats: BalancerStats, ready: bool) -> dict[str, Any]:
    """``lb.health()``: what a debug page shows, JSON-able."""
    adm = stats.admission
    return {
        "ready": ready,
        "closed": stats.closed,
        "panic": stats.panic,
        "strategy": stats.strategy,
        "in_flight": stats.in_flight,
        "calls": stats.calls,
        "calls_failed": stats.calls_failed,
        "admission": None
        if adm is None
        else {
            "limit": adm.limit,
            "in_flight": adm.in_flight,
            "queued": adm.queued,
            "shed": dict(adm.shed),
        },
        "shared": None
        if stats.shared is None
        else {
            "mode": stats.shared.mode,
            "peers": stats.shared.peers,
            "scripts": stats.shared.scripts,
            "synced_ago_s": stats.shared.synced_ago_s,
        },
        "endpoints": [
            {
                "url": e.url,
                "region": e.region,
                "state": e.state,
                "pickable": e.pickable,
                "breaker": e.breaker,
                "in_flight": e.in_flight,
                "latency_ewma_ms": e.latency_ewma_ms,
                "p99_ms": e.p99_ms,
                "cooling_s": e.cooling_s,
                "server_load": e.server_load,
                "requests": e.requests,
                "failures": e.failures,
            }
            for e in stats.endpoints
        ],
    }
