"""Immutable snapshots of what the balancer knows: ``lb.stats()``."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["BalancerStats", "EndpointStats"]


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
    new calls can go there now.  ``p50_ms``/``p99_ms`` cover the last 256 calls.
    ``retries`` counts retries sent *to* this endpoint; ``retries_denied`` counts failures
    *here* that the retry budget did not let the balancer retry.
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
    failures: int
    retries: int
    retries_denied: int
    hedges_sent: int
    hedges_won: int
    latency_ewma_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    ttft_ms: float | None
    chunks_per_s: float | None
    server_load: float | None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class BalancerStats:
    """The whole pool: per-endpoint stats plus call-level totals.

    ``calls`` counts calls made through the balancer (one per decorated call, however
    many attempts it took); ``attempts`` counts what reached endpoints (first tries,
    retries and hedges).  ``panic`` is true while the breaker's max-ejection share is
    reached and ejected endpoints are being used anyway.
    """

    strategy: str
    closed: bool
    panic: bool
    calls: int
    calls_failed: int
    attempts: int
    retries: int
    retries_denied: int
    hedges_sent: int
    hedges_won: int
    hedges_denied: int
    hedge_delay_ms: float | None
    in_flight: int
    endpoints: tuple[EndpointStats, ...]

    def endpoint(self, url: str) -> EndpointStats:
        """The stats of one endpoint by url (trailing ``/`` ignored)."""
        url = url.rstrip("/")
        for e in self.endpoints:
            if e.url == url:
                return e
        raise KeyError(url)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

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
