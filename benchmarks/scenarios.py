"""The benchmark scenarios: a registry of plain dataclasses.

A :class:`Scenario` says which fake fleet to start (one :class:`ReplicaConfig` per
replica), the open-loop Poisson arrival rate and its bursts, how long to run, the fault
schedule, which policies to compare, the measurement phases (e.g. before / after a
failure), the scenario's own table columns and the targets it is judged against.

Times in a fault schedule, a burst or a phase are *fractions of the run's duration*, so
``--quick`` and ``--duration`` shrink a scenario without changing its shape.

Capacity of a replica in requests/s is ``capacity * speed / base_latency`` (its slots
divided by the mean service time); every ``rate`` below is chosen against that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lbclient.testing import ReplicaConfig

if TYPE_CHECKING:
    from _harness import RunResult

Results = Mapping[str, "RunResult"]


# ----------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Fault:
    """At ``at`` (fraction of the run), ``action`` on the replicas ``replicas``.

    ``action`` is ``"down"`` (connection refused, open connections dropped), ``"up"``,
    ``"set"`` (change :class:`ReplicaConfig` fields: ``fields``) or ``"spot"`` (an
    interruption notice of ``fields["notice"]`` seconds: lbclient drains the replica and
    removes it when idle; the replica goes down when the notice runs out).
    """

    at: float
    action: str
    replicas: tuple[int, ...]
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Burst:
    """From ``at`` (fraction of the run), ``length`` seconds at ``factor`` x the rate."""

    at: float
    length: float
    factor: float


@dataclass(frozen=True)
class Phase:
    """A measurement window ``[start, end)`` (fractions of the run), by scheduled arrival
    time for requests and by start time for attempts."""

    name: str
    start: float
    end: float


@dataclass(frozen=True)
class Column:
    """A scenario-specific table column: ``fn(result)`` formatted with ``fmt``."""

    header: str
    key: str
    fn: Callable[[RunResult], float | None]
    fmt: str = "{:.1f}"


@dataclass(frozen=True)
class Target:
    """A goal from the issue (or our own, marked so): ``check(results by policy)`` returns
    ``(what was measured, met)``; ``met`` is ``None`` when the needed runs are missing.

    ``full_only``: what the target measures takes the full run to show (round robin's
    queue on an overloaded replica grows with the run's length; a p99.9 needs thousands
    of calls), so a ``--quick`` run reports the figure without judging it."""

    description: str
    check: Callable[[Results], tuple[str, bool | None]]
    full_only: bool = False


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    replicas: tuple[ReplicaConfig, ...]
    rate: float  # requests/s, Poisson
    duration: float  # seconds, the measured window
    quick_duration: float
    policies: tuple[str, ...]
    quick_policies: tuple[str, ...]
    faults: tuple[Fault, ...] = ()
    bursts: tuple[Burst, ...] = ()
    phases: tuple[Phase, ...] = ()
    stream: bool = False
    client_region: str | None = None
    warmup: int = 64  # requests before the measured window (>= 32 so Hedge adapts)
    columns: tuple[Column, ...] = ()
    targets: tuple[Target, ...] = ()
    notes: str = ""

    @property
    def capacity(self) -> float:
        """Nominal fleet capacity in requests/s (stragglers not counted)."""
        return sum(c.capacity * c.speed / c.base_latency for c in self.replicas if c.base_latency)


# ------------------------------------------------------------------- target helpers


def _get(results: Results, policy: str) -> RunResult | None:
    return results.get(policy)


def _phase(r: RunResult, name: str) -> Any:
    return r.phases.get(name)


def _ratio_target(
    better: str, worse: str, metric: Callable[[RunResult], float | None], at_most: float
) -> Callable[[Results], tuple[str, bool | None]]:
    """``metric(better) <= at_most * metric(worse)``."""

    def check(results: Results) -> tuple[str, bool | None]:
        b, w = _get(results, better), _get(results, worse)
        if b is None or w is None:
            return "not run", None
        mb, mw = metric(b), metric(w)
        if mb is None or mw is None or mw <= 0:
            return "no data", None
        ratio = mb / mw
        return f"{mb:.0f} / {mw:.0f} ms = {ratio:.3f} (1/{1 / ratio:.1f})", ratio <= at_most

    return check


def _value_target(
    policy: str,
    metric: Callable[[RunResult], float | None],
    ok: Callable[[float], bool],
    fmt: str = "{:.2f}",
) -> Callable[[Results], tuple[str, bool | None]]:
    def check(results: Results) -> tuple[str, bool | None]:
        r = _get(results, policy)
        if r is None:
            return "not run", None
        v = metric(r)
        if v is None:
            return "no data", None
        return fmt.format(v), ok(v)

    return check


def _all_of(*checks: Callable[[Results], tuple[str, bool | None]]) -> Callable[..., Any]:
    def check(results: Results) -> tuple[str, bool | None]:
        texts, oks = [], []
        for c in checks:
            text, met = c(results)
            texts.append(text)
            oks.append(met)
        ran = [m for m in oks if m is not None]  # a policy not run does not count
        met_all = all(ran) if ran else None
        return "; ".join(texts), met_all

    return check


def p99(r: RunResult) -> float | None:
    return r.latency_ms.get("p99")


def p999(r: RunResult) -> float | None:
    return r.latency_ms.get("p99.9")


def ttft_p99(r: RunResult) -> float | None:
    return r.ttft_ms.get("p99") if r.ttft_ms else None


def phase_value(name: str, what: str) -> Callable[[RunResult], float | None]:
    """``what`` of phase ``name``: ``"success"``, ``"p99"``, ``"attempts"`` (per request),
    ``"extra"`` (extra load %)."""

    def get(r: RunResult) -> float | None:
        p = r.phases.get(name)
        if p is None or p.requests == 0:
            return None
        if what == "success":
            return p.success_pct
        if what == "attempts":
            return p.attempts_per_request
        if what == "extra":
            return p.extra_load_pct
        return p.latency_ms.get(what)

    return get


def group_share(phase: str, replicas: tuple[int, ...]) -> Callable[[RunResult], float | None]:
    """Share (%) of the upstream requests of ``phase`` received by ``replicas``."""

    def get(r: RunResult) -> float | None:
        p = r.phases.get(phase)
        if p is None or not sum(p.received):
            return None
        return 100.0 * sum(p.received[i] for i in replicas) / sum(p.received)

    return get


def share_after_first_trip(replica: int) -> Callable[[RunResult], float | None]:
    """Share (%) of the upstream requests the replica received after its breaker first
    opened (fleet counters snapshotted from the ``on_event`` callback)."""

    def get(r: RunResult) -> float | None:
        trip = r.first_open.get(replica)
        if trip is None:
            return None
        after = [e - s for e, s in zip(r.received_end, trip["received"], strict=True)]
        total = sum(after)
        return 100.0 * after[replica] / total if total else None

    return get


def first_trip_at(replica: int) -> Callable[[RunResult], float | None]:
    def get(r: RunResult) -> float | None:
        trip = r.first_open.get(replica)
        return None if trip is None else trip["at"]

    return get


def ratio_after_before(r: RunResult) -> float | None:
    before, after = phase_value("before", "p99")(r), phase_value("after", "p99")(r)
    if before is None or after is None or before <= 0:
        return None
    return after / before


# ------------------------------------------------------------------------ scenarios

RR = "round_robin"
BASE = "baseline_rr"
P2C = "power_of_two"
PE = "peak_ewma"
LC = "least_connections"
PE_RB = "peak_ewma+retry+breaker"
RR_RB = "round_robin+retry+breaker"
PE_H = "peak_ewma+hedge"
PE_ALL = "peak_ewma+all"
GEO_RB = "geo+retry+breaker"

_BASE_LATENCY = 0.040

HETERO = Scenario(
    name="hetero",
    title="Heterogeneous replicas (speeds 1.0 / 0.5 / 0.8, 2 slots each), 70% load",
    replicas=tuple(
        ReplicaConfig(speed=s, capacity=2, base_latency=_BASE_LATENCY) for s in (1.0, 0.5, 0.8)
    ),
    # capacity = 2/0.04 + 1/0.04 + 1.6/0.04 = 50 + 25 + 40 = 115 req/s; 70% = 80.5 req/s.
    # Round robin sends 26.8 req/s to the slow replica, which serves 25: its queue grows
    # for the whole run, so round robin's p99 grows with the run's length (about 1.7 s
    # after 20 s, 2.3 s after 30 s) while the load-aware policies' p99 stays flat.
    rate=0.70 * 115.0,
    duration=30.0,
    quick_duration=8.0,
    policies=(BASE, RR, LC, P2C, PE),
    quick_policies=(RR, P2C, PE),
    targets=(
        Target(
            "hetero: peak_ewma p99 <= 1/10 of round_robin p99",
            _ratio_target(PE, RR, p99, 0.1),
            full_only=True,
        ),
        Target(
            "hetero: power_of_two p99 <= 1/10 of round_robin p99",
            _ratio_target(P2C, RR, p99, 0.1),
            full_only=True,
        ),
    ),
    notes="round robin ignores speed; the slow replica is overloaded (rho = 1.07).",
)

_STRAGGLER_MEAN = 0.98 * _BASE_LATENCY + 0.02 * 20 * _BASE_LATENCY  # 55.2 ms
TAIL = Scenario(
    name="tail",
    title="Stragglers: 6 replicas, 2% of requests 20x slower, 50% load",
    replicas=tuple(
        ReplicaConfig(
            capacity=4, base_latency=_BASE_LATENCY, straggler_rate=0.02, straggler_factor=20.0
        )
        for _ in range(6)
    ),
    # Stragglers hold a slot 20x longer: the mean service time is 55.2 ms, so the real
    # capacity is 6 * 4 / 0.0552 = 435 req/s; 50% of it is ~217 req/s.
    rate=0.5 * 6 * 4 / _STRAGGLER_MEAN,
    duration=12.0,
    quick_duration=5.0,
    policies=(PE, PE_H, RR),
    quick_policies=(PE, PE_H),
    columns=(
        Column("hedges %", "hedges_pct", lambda r: r.lb.get("hedges_pct")),
        Column("hedge delay ms", "hedge_delay_ms", lambda r: r.lb.get("hedge_delay_ms")),
    ),
    targets=(
        Target(
            "tail: p99.9 with hedging <= 1/5 of without (peak_ewma+hedge vs peak_ewma)",
            _ratio_target(PE_H, PE, p999, 0.2),
            full_only=True,
        ),
        Target(
            "tail: hedging extra load <= 5%",
            _value_target(PE_H, lambda r: r.extra_load_pct, lambda v: v <= 5.0, "{:.2f}%"),
        ),
    ),
)

FAILOVER = Scenario(
    name="failover",
    title="Failover: 6 replicas, 3 go down half way (20% load before, 40% after)",
    replicas=tuple(ReplicaConfig(capacity=4, base_latency=_BASE_LATENCY) for _ in range(6)),
    rate=120.0,
    duration=10.0,
    quick_duration=4.0,
    policies=(BASE, PE, PE_RB, PE_ALL),
    quick_policies=(BASE, PE_RB),
    faults=(Fault(0.5, "down", (0, 1, 2)),),
    phases=(Phase("before", 0.0, 0.5), Phase("after", 0.5, 1.0)),
    columns=(
        Column("ok % before", "ok_before", phase_value("before", "success"), "{:.2f}"),
        Column("ok % after", "ok_after", phase_value("after", "success"), "{:.2f}"),
        Column("p99 before", "p99_before", phase_value("before", "p99"), "{:.0f}"),
        Column("p99 after", "p99_after", phase_value("after", "p99"), "{:.0f}"),
        Column("after/before", "p99_ratio", ratio_after_before, "{:.2f}"),
    ),
    targets=(
        Target(
            "failover: peak_ewma+retry+breaker success >= 99.95%",
            _value_target(PE_RB, lambda r: r.success_pct, lambda v: v >= 99.95, "{:.3f}%"),
        ),
        Target(
            "failover: peak_ewma+retry+breaker p99 after <= 2x p99 before",
            _value_target(PE_RB, ratio_after_before, lambda v: v <= 2.0, "{:.2f}x"),
        ),
    ),
)

BAD = 1  # the browned-out replica
BROWNOUT = Scenario(
    name="brownout",
    title="Brownout: 4 replicas, replica-1 answers 500 to 50% of requests from 1/3 of the run",
    replicas=tuple(ReplicaConfig(capacity=4, base_latency=_BASE_LATENCY) for _ in range(4)),
    rate=100.0,
    duration=9.0,
    quick_duration=4.0,
    # round robin keeps sending to the bad replica, so its breaker trips; peak_ewma
    # prices failures as slow responses and steers away before a breaker is needed.
    policies=(BASE, RR_RB, PE, PE_RB),
    quick_policies=(RR_RB, PE_RB),
    faults=(Fault(1 / 3, "set", (BAD,), {"error_rate": 0.5}),),
    phases=(Phase("before", 0.0, 1 / 3), Phase("after", 1 / 3, 1.0)),
    columns=(
        Column("bad % after fault", "bad_share_fault", group_share("after", (BAD,))),
        Column("first trip s", "first_trip_s", first_trip_at(BAD), "{:.2f}"),
        Column("bad % after trip", "bad_share_trip", share_after_first_trip(BAD)),
    ),
    targets=(
        Target(
            "brownout: peak_ewma+retry+breaker success >= 99.9% (ours)",
            _value_target(PE_RB, lambda r: r.success_pct, lambda v: v >= 99.9, "{:.3f}%"),
        ),
        Target(
            "brownout: bad replica's share after its breaker trips <= 10% (fair 25%; "
            "round_robin+retry+breaker; ours)",
            _value_target(RR_RB, share_after_first_trip(BAD), lambda v: v <= 10.0, "{:.1f}%"),
        ),
        Target(
            "brownout: peak_ewma+retry+breaker bad replica's share after the fault <= 10% (ours)",
            _value_target(PE_RB, group_share("after", (BAD,)), lambda v: v <= 10.0, "{:.1f}%"),
        ),
    ),
)

FLEET_DOWN = Scenario(
    name="fleet_down",
    title="Whole fleet down: 4 replicas all down for the middle third, 200 req/s",
    replicas=tuple(ReplicaConfig(capacity=4, base_latency=_BASE_LATENCY) for _ in range(4)),
    rate=200.0,
    duration=15.0,  # the outage lasts 5 s
    quick_duration=4.5,
    policies=(BASE, PE_RB, PE_ALL),
    quick_policies=(PE_RB,),
    faults=(Fault(1 / 3, "down", (0, 1, 2, 3)), Fault(2 / 3, "up", (0, 1, 2, 3))),
    phases=(Phase("before", 0.0, 1 / 3), Phase("outage", 1 / 3, 2 / 3), Phase("after", 2 / 3, 1.0)),
    columns=(
        Column(
            "attempts/req outage", "attempts_outage", phase_value("outage", "attempts"), "{:.3f}"
        ),
        Column("ok % after", "ok_after", phase_value("after", "success"), "{:.2f}"),
        Column("p99 after", "p99_after", phase_value("after", "p99"), "{:.0f}"),
    ),
    targets=(
        Target(
            "fleet_down: attempts per request during the outage <= 1.25x (retry+breaker, all)",
            _all_of(
                _value_target(PE_RB, phase_value("outage", "attempts"), lambda v: v <= 1.25),
                _value_target(PE_ALL, phase_value("outage", "attempts"), lambda v: v <= 1.25),
            ),
        ),
        Target(
            "fleet_down: p99 after recovery <= 2x baseline_rr's (peak_ewma+retry+breaker; ours)",
            _ratio_target(PE_RB, BASE, phase_value("after", "p99"), 2.0),
        ),
    ),
    notes="refused connections never reach the fleet: attempts are counted client-side.",
)

REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "ap-southeast-1")
NET = (0.002, 0.030, 0.040, 0.100)
REGION_OUTAGE = Scenario(
    name="region_outage",
    title="Region outage: 8 replicas in 4 regions, client in us-east-1, us-east-1 dies half way",
    replicas=tuple(
        ReplicaConfig(capacity=4, base_latency=_BASE_LATENCY, region=region, network_latency=net)
        for region, net in zip(REGIONS, NET, strict=True)
        for _ in range(2)
    ),
    rate=60.0,  # 30% of the local region's 200 req/s
    duration=8.0,
    quick_duration=4.0,
    policies=(GEO_RB, PE_RB),
    quick_policies=(GEO_RB,),
    client_region="us-east-1",
    faults=(Fault(0.5, "down", (0, 1)),),
    phases=(Phase("before", 0.0, 0.5), Phase("after", 0.5, 1.0)),
    columns=(
        Column("local % before", "local_before", group_share("before", (0, 1))),
        Column("us-west-2 % after", "west_after", group_share("after", (2, 3))),
        Column("p99 before", "p99_before", phase_value("before", "p99"), "{:.0f}"),
        Column("p99 after", "p99_after", phase_value("after", "p99"), "{:.0f}"),
    ),
    targets=(
        Target(
            "region_outage: geo keeps >= 90% of traffic local before the outage (ours)",
            _value_target(GEO_RB, group_share("before", (0, 1)), lambda v: v >= 90.0, "{:.1f}%"),
        ),
        Target(
            "region_outage: geo+retry+breaker success >= 99.9% (ours)",
            _value_target(GEO_RB, lambda r: r.success_pct, lambda v: v >= 99.9, "{:.3f}%"),
        ),
    ),
    notes="replica network latency 2 / 30 / 40 / 100 ms by region (fleet-side delay).",
)

BURST = Scenario(
    name="burst",
    title="Bursts: 4 replicas, 40 req/s with two 1 s spikes at 10x (400 req/s = capacity)",
    replicas=tuple(ReplicaConfig(capacity=4, base_latency=_BASE_LATENCY) for _ in range(4)),
    rate=40.0,
    duration=8.0,
    quick_duration=4.0,
    policies=(BASE, P2C, PE, PE_ALL),
    quick_policies=(PE,),
    bursts=(Burst(0.25, 1.0, 10.0), Burst(0.65, 1.0, 10.0)),
    targets=(
        Target(
            "burst: peak_ewma success 100% (ours)",
            _value_target(PE, lambda r: r.success_pct, lambda v: v >= 100.0, "{:.2f}%"),
        ),
    ),
)

STREAM_TAIL = Scenario(
    name="stream_tail",
    title="Streaming: 8 tokens at 5 ms, TTFT ~ 40 ms, 2% stragglers at 20x; hedge on TTFT",
    replicas=tuple(
        ReplicaConfig(
            capacity=4,
            base_latency=_BASE_LATENCY,
            straggler_rate=0.02,
            straggler_factor=20.0,
            tokens=8,
            token_delay=0.005,
        )
        for _ in range(6)
    ),
    rate=100.0,
    duration=8.0,
    quick_duration=4.0,
    policies=(PE, PE_H),
    quick_policies=(PE, PE_H),
    stream=True,
    columns=(
        Column("TTFT p50", "ttft_p50", lambda r: (r.ttft_ms or {}).get("p50"), "{:.0f}"),
        Column("TTFT p99", "ttft_p99", ttft_p99, "{:.0f}"),
        Column("TTFT p99.9", "ttft_p999", lambda r: (r.ttft_ms or {}).get("p99.9"), "{:.0f}"),
        Column("hedges %", "hedges_pct", lambda r: r.lb.get("hedges_pct")),
    ),
    targets=(
        Target(
            "stream_tail: TTFT p99 with hedging <= 1/5 of without (ours)",
            _ratio_target(PE_H, PE, ttft_p99, 0.2),
            full_only=True,
        ),
    ),
    notes="latency columns are the whole stream; TTFT is the first yielded chunk.",
)

SPOT_STORM = Scenario(
    name="spot_storm",
    title="Spot interruption storm: 8 of 10 replicas get a notice within 0.6 s, 100 req/s",
    replicas=tuple(ReplicaConfig(capacity=4, base_latency=_BASE_LATENCY) for _ in range(10)),
    rate=100.0,  # half of what the 2 survivors can serve
    duration=8.0,
    quick_duration=4.0,
    policies=(BASE, PE_RB),
    quick_policies=(BASE, PE_RB),
    # "spot": lbclient drains the replica at the notice (no new picks, in-flight calls
    # finish), removes it when idle, and the instance dies when the notice runs out
    # (1 s here for AWS's 2 minutes).  The baseline cannot drain: it just loses them.
    faults=tuple(
        Fault(0.3 + 0.025 * k, "spot", (2 * k, 2 * k + 1), {"notice": 1.0}) for k in range(4)
    ),
    phases=(Phase("before", 0.0, 0.3), Phase("storm", 0.3, 0.6), Phase("after", 0.6, 1.0)),
    columns=(
        Column("ok % storm", "ok_storm", phase_value("storm", "success"), "{:.2f}"),
        Column("p99 storm", "p99_storm", phase_value("storm", "p99"), "{:.0f}"),
    ),
    targets=(
        Target(
            "spot_storm: 80% of replicas drained under load -> no failed request (retry+breaker)",
            _value_target(PE_RB, lambda r: r.success_pct, lambda v: v >= 100.0, "{:.3f}%"),
        ),
    ),
    notes="spot = drain at the notice, remove when idle, instance down when the notice ends.",
)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        HETERO,
        TAIL,
        FAILOVER,
        BROWNOUT,
        FLEET_DOWN,
        REGION_OUTAGE,
        BURST,
        STREAM_TAIL,
        SPOT_STORM,
    )
}
