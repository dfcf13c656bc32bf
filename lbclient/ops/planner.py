"""`CapacityPlanner`: how many replicas a recorded (or synthetic) traffic needs.

::

    from lbclient.ops import CapacityPlanner, load_trace

    planner = CapacityPlanner(load_trace("traffic.jsonl"))
    print(planner.traffic())                       # rates, peak hours, burstiness
    plan = planner.plan(target=2.0, percentile=0.95, concurrency=8)
    print(plan.table())                            # inputs, the formula, the result
    plan.plot("plan.png")                          # replicas vs p95 (matplotlib)

**The model** -- an M/M/c queue (Erlang's delay system), fed with what the recording
measured:

* arrivals: Poisson at rate ``lambda`` -- a percentile of the recorded per-window rates
  (default the 95th of per-minute rates: size for the busy minutes, not the average),
  times ``1 + headroom``;
* service: exponential with the recorded mean latency of successful calls ``S``
  (``mu = 1 / S``) -- or give ``service_time=``; ``service="empirical"`` uses the
  recorded latencies themselves for the service part of the latency;
* servers: ``c = replicas x concurrency`` -- a replica's batch slots at which its
  per-token latency still holds (one server per slot; vLLM's ``max_num_seqs`` is an
  upper bound, not the right number).

Little's law gives the busy slots, ``a = lambda x S`` (Erlangs): at least ``a / c < 1``.
Erlang C gives the probability that a call waits, ``C(c, a)``, and the tail of the wait
``P(W > t) = C x exp(-(c mu - lambda) t)``; a call's latency is its wait plus its
service, so ``P(T > t) = (1 - C) e^(-mu t) + C (theta e^(-mu t) - mu e^(-theta t)) /
(theta - mu)`` with ``theta = c mu - lambda``.  The plan is the smallest number of
replicas whose latency at ``percentile`` is within ``target``, then clamped to
``[min_replicas, max_replicas]`` (``min_replicas >= 2``: one replica is no availability).

The exponential service time is a conservative choice for LLM calls (its p95 is 3x its
mean; real service times spread less): the planner errs towards more replicas.
:meth:`CapacityPlanner.simulate` replays the recorded arrivals and latencies themselves
through ``c`` first-come-first-served slots -- no distribution assumed -- to check a plan
against the trace.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number
from .recording import TrafficRecord

__all__ = [
    "CapacityPlan",
    "CapacityPlanner",
    "TrafficSummary",
    "erlang_c",
    "latency_quantile",
    "latency_tail",
    "replay",
    "synthetic_trace",
]

_RATE_STATS = ("mean", "p50", "p90", "p95", "p99", "peak")


# -- queueing theory ---------------------------------------------------------------------


def erlang_c(servers: int, load: float) -> float:
    """Erlang C: the probability that a call waits in an M/M/c queue with ``servers``
    servers and ``load = lambda / mu`` Erlangs (1.0 when ``load >= servers``).

    Computed through the Erlang B recursion ``B(k) = a B(k-1) / (k + a B(k-1))``, stable
    for thousands of servers, then ``C = c B / (c - a (1 - B))``."""
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers!r}")
    if load <= 0:
        return 0.0
    if load >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1.0 - b))


def latency_tail(
    t: float, servers: int, rate: float, service: float, samples: Sequence[float] | None = None
) -> float:
    """``P(T > t)``: the probability that a call's latency (wait + service) exceeds ``t``
    seconds in an M/M/c queue (``rate`` calls/s, mean ``service`` seconds).

    With ``samples`` (service times), the service part is the empirical distribution
    and the wait stays Erlang C's exponential tail -- an M/G/c approximation."""
    mu = 1.0 / service
    theta = servers * mu - rate
    if theta <= 0:
        return 1.0
    c = erlang_c(servers, rate * service)
    if t <= 0:
        return 1.0
    if samples:
        over = 0.0
        for s in samples:
            over += 1.0 if s > t else math.exp(-theta * (t - s))
        p_served_late = sum(1 for s in samples if s > t) / len(samples)
        return (1.0 - c) * p_served_late + c * over / len(samples)
    if abs(theta - mu) < 1e-12 * mu:
        sum_tail = (1.0 + mu * t) * math.exp(-mu * t)
    else:
        sum_tail = (theta * math.exp(-mu * t) - mu * math.exp(-theta * t)) / (theta - mu)
    return (1.0 - c) * math.exp(-mu * t) + c * sum_tail


def latency_quantile(
    q: float, servers: int, rate: float, service: float, samples: Sequence[float] | None = None
) -> float:
    """The ``q``-quantile of latency (seconds) in the M/M/c queue (``inf`` if unstable)."""
    if servers * (1.0 / service) <= rate:
        return math.inf
    want = 1.0 - q
    hi = service
    while latency_tail(hi, servers, rate, service, samples) > want:
        hi *= 2.0
        if hi > 1e9:
            return math.inf
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if latency_tail(mid, servers, rate, service, samples) > want:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6 * hi:
            break
    return hi


# -- the traffic ---------------------------------------------------------------------------


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    n = len(sorted_values)
    if n == 0:
        return math.nan
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@attrs.frozen(kw_only=True)
class TrafficSummary:
    """What a recording says about the traffic.  Rates in calls/s, times in seconds."""

    calls: int
    ok: int
    shed: int
    duration: float
    window: float
    rates: dict[str, float]  # mean, p50, p90, p95, p99, peak of the per-window rates
    burstiness: float  # peak / mean
    peak_hours: list[tuple[int, float]]  # (hour of day UTC, mean rate), busiest first
    hourly: dict[int, float]  # hour of day (UTC) -> mean rate
    latency: dict[str, float]  # mean, p50, p95, p99 of successful calls
    tokens_per_call: float | None  # mean real (else estimated) tokens per call
    by_region: dict[str, int]
    by_tenant: dict[str, int]

    def table(self) -> str:
        r = self.rates
        lines = [
            f"calls            {self.calls} ({self.ok} ok, {self.shed} shed) over "
            f"{self.duration:.0f} s",
            f"rate (calls/s)   mean {r['mean']:.3g}  p50 {r['p50']:.3g}  p95 {r['p95']:.3g}  "
            f"p99 {r['p99']:.3g}  peak {r['peak']:.3g}   ({self.window:g} s windows)",
            f"burstiness       {self.burstiness:.2f} (peak / mean)",
            "peak hours (UTC) " + ", ".join(f"{h:02d}h {v:.3g}/s" for h, v in self.peak_hours[:3]),
            f"latency (s)      mean {self.latency.get('mean', math.nan):.3g}  p50 "
            f"{self.latency.get('p50', math.nan):.3g}  p95 {self.latency.get('p95', math.nan):.3g}"
            f"  p99 {self.latency.get('p99', math.nan):.3g}",
        ]
        if self.tokens_per_call is not None:
            lines.append(f"tokens per call  {self.tokens_per_call:.0f}")
        return "\n".join(lines)


# -- the plan -------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CapacityPlan:
    """The replicas a traffic needs, and the model behind the number."""

    target: float  # seconds, at `percentile`
    percentile: float
    rate: float  # calls/s planned for (the rate statistic x (1 + headroom))
    rate_stat: str
    headroom: float
    service_time: float  # mean seconds
    service: str  # "exponential" or "empirical"
    concurrency: int  # slots per replica
    replicas_needed: int  # from the queue alone
    replicas: int  # clamped to [min_replicas, max_replicas]
    min_replicas: int
    max_replicas: int | None
    predicted: float  # latency at `percentile` with `replicas` (seconds)
    wait_probability: float  # Erlang C with `replicas`
    utilization: float  # lambda S / c with `replicas`
    in_flight: float  # Little's law: mean calls in flight (waiting + served)
    by_rate: dict[str, int]  # replicas needed at each rate statistic (with headroom)
    curve: list[tuple[int, float]]  # (replicas, latency at percentile)
    capped: bool  # max_replicas is below what the target needs
    floor: float  # the service time's own quantile: the latency with unlimited replicas

    @property
    def formula(self) -> str:
        return (
            "a = lambda x S  (Little: busy slots, Erlangs);  c = replicas x concurrency\n"
            "C(c, a) = Erlang C = c B / (c - a (1 - B)),  B = Erlang B(c, a)\n"
            "P(W > t) = C exp(-(c mu - lambda) t)       (mu = 1 / S)\n"
            "P(T > t) = (1 - C) e^(-mu t) + C (theta e^(-mu t) - mu e^(-theta t)) / "
            "(theta - mu),  theta = c mu - lambda\n"
            f"replicas = min r such that t_{self.percentile:g}(r x concurrency) <= target, "
            "clamped to [min, max]"
        )

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["curve"] = [[r, None if math.isinf(v) else v] for r, v in self.curve]
        d["formula"] = self.formula
        return d

    def table(self) -> str:
        p = f"p{self.percentile * 100:g}"
        lines = [
            "inputs",
            f"  rate             {self.rate:.4g} calls/s ({self.rate_stat} of the recorded "
            f"rates x {1 + self.headroom:g} headroom)",
            f"  service time     {self.service_time:.4g} s mean ({self.service})",
            f"  concurrency      {self.concurrency} slots per replica",
            f"  target           {p} <= {self.target:g} s",
            "model",
            *("  " + line for line in self.formula.splitlines()),
            "result",
            f"  replicas needed  {self.replicas_needed}"
            + (f"  (capped at max {self.max_replicas})" if self.capped else ""),
            f"  replicas         {self.replicas}  (min {self.min_replicas}, max "
            f"{self.max_replicas if self.max_replicas is not None else '-'})",
            f"  predicted {p}    {self.predicted:.4g} s (service alone: {self.floor:.3g} s)",
            f"  P(wait)          {self.wait_probability:.3g}",
            f"  utilization      {self.utilization:.1%}",
            f"  in flight        {self.in_flight:.3g} calls (Little's law)",
            "  by rate          " + ", ".join(f"{k} {v}" for k, v in self.by_rate.items()),
            f"curve (replicas -> {p} s)",
            "  "
            + "  ".join(
                f"{r}:{'inf' if math.isinf(v) else f'{v:.3g}'}" for r, v in self.curve[:24]
            ),
        ]
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Replicas vs latency at the percentile, the target and the plan (PNG)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [r for r, v in self.curve if math.isfinite(v)]
        ys = [v for _, v in self.curve if math.isfinite(v)]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(xs, ys, marker="o", ms=3, label=f"p{self.percentile * 100:g} latency (M/M/c)")
        ax.axhline(self.target, color="tab:red", ls="--", label=f"target {self.target:g} s")
        ax.axhline(self.floor, color="tab:gray", ls=":", label=f"service alone {self.floor:.3g} s")
        ax.axvline(self.replicas, color="tab:green", ls=":", label=f"plan: {self.replicas}")
        ax.axvspan(
            self.min_replicas,
            self.max_replicas if self.max_replicas is not None else max(xs or [1]),
            color="tab:green",
            alpha=0.06,
            label="min..max replicas",
        )
        ax.set_yscale("log")
        ax.set_xlabel(f"replicas ({self.concurrency} slots each)")
        ax.set_ylabel("seconds")
        ax.set_title(
            f"{self.rate:.3g} calls/s, S = {self.service_time:.3g} s: "
            f"{self.replicas} replicas (utilization {self.utilization:.0%})"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _positive(name: str, value: object, *, integer: bool = False, allow_zero: bool = False) -> None:
    if (
        not is_number(value)
        or (integer and not is_int(value))
        or (value < 0 if allow_zero else value <= 0)
    ):
        what = "an int" if integer else "a finite number"
        raise ConfigError(f"{name} must be {what} {'>=' if allow_zero else '>'} 0, got {value!r}")


class CapacityPlanner:
    """The capacity planner over a recording (see the module docstring).

    ``records``: :class:`~lbclient.ops.TrafficRecord` s (from :func:`load_trace` or
    :func:`synthetic_trace`).  ``window``: seconds per rate sample (default 60)."""

    def __init__(self, records: Iterable[TrafficRecord], *, window: float = 60.0) -> None:
        _positive("window", window)
        self.records = sorted(records, key=lambda r: r.t)
        if not self.records:
            raise ConfigError("CapacityPlanner needs at least one traffic record")
        self.window = float(window)
        t0 = self.records[0].t
        t1 = self.records[-1].t
        self.duration = max(t1 - t0, 1e-9)
        served = [r for r in self.records if not r.shed]
        self._latencies = sorted(r.latency for r in served if r.ok)
        self._rates = self._window_rates(t0)

    def _window_rates(self, t0: float) -> list[float]:
        """Calls per second in each window (shed calls count: they are demand)."""
        window = min(self.window, self.duration)
        n = max(1, math.ceil(self.duration / window - 1e-9))
        counts = [0] * n
        for r in self.records:
            i = min(n - 1, int((r.t - t0) / window))
            counts[i] += 1
        # The last window may be partial: scale it by its real length.
        last = self.duration - (n - 1) * window
        rates = [c / window for c in counts[:-1]]
        rates.append(counts[-1] / max(last, window * 0.5) if n > 1 else counts[-1] / window)
        return rates

    # -- what the traffic is -------------------------------------------------------------

    @property
    def mean_rate(self) -> float:
        return len(self.records) / self.duration if len(self.records) > 1 else 0.0

    def rate(self, stat: str | float) -> float:
        """A rate statistic: ``"mean"``, ``"p50"``, ``"p90"``, ``"p95"``, ``"p99"``,
        ``"peak"`` (of the per-window rates), or a number of calls/s given as is."""
        if not isinstance(stat, str):
            _positive("rate", stat)
            return float(stat)
        if stat == "mean":
            return self.mean_rate
        s = sorted(self._rates)
        if stat == "peak":
            return s[-1]
        if stat in _RATE_STATS:
            return _quantile(s, float(stat[1:]) / 100.0)
        raise ConfigError(f"rate must be one of {', '.join(_RATE_STATS)} or a number, got {stat!r}")

    def traffic(self) -> TrafficSummary:
        """Rates, peak hours, burstiness, latency and mix of the recording."""
        rates = {k: self.rate(k) for k in _RATE_STATS}
        mean = rates["mean"]
        hours: Counter[int] = Counter()
        seconds_in: dict[int, float] = {}
        for r in self.records:
            hours[time.gmtime(r.t).tm_hour] += 1
        # The time the recording spent in each hour of day (a day-long trace: 3600 each).
        t = self.records[0].t
        end = self.records[-1].t
        while t < end:
            h = time.gmtime(t).tm_hour
            step = min(end, (math.floor(t / 3600.0) + 1) * 3600.0) - t
            seconds_in[h] = seconds_in.get(h, 0.0) + max(step, 1e-9)
            t += max(step, 1e-9)
        hourly = {h: hours[h] / max(seconds_in.get(h, 0.0), 1.0) for h in sorted(hours)}
        peak_hours = sorted(hourly.items(), key=lambda kv: -kv[1])
        lat = self._latencies
        latency: dict[str, float] = {}
        if lat:
            latency = {
                "mean": sum(lat) / len(lat),
                "p50": _quantile(lat, 0.5),
                "p95": _quantile(lat, 0.95),
                "p99": _quantile(lat, 0.99),
            }
        tokens = []
        for r in self.records:
            if r.input_tokens is not None or r.output_tokens is not None:
                tokens.append((r.input_tokens or 0.0) + (r.output_tokens or 0.0))
            elif r.tokens is not None:
                tokens.append(r.tokens)
        return TrafficSummary(
            calls=len(self.records),
            ok=sum(1 for r in self.records if r.ok),
            shed=sum(1 for r in self.records if r.shed),
            duration=self.duration,
            window=min(self.window, self.duration),
            rates=rates,
            burstiness=rates["peak"] / mean if mean > 0 else math.nan,
            peak_hours=peak_hours,
            hourly=hourly,
            latency=latency,
            tokens_per_call=sum(tokens) / len(tokens) if tokens else None,
            by_region=dict(Counter(r.region or "-" for r in self.records).most_common()),
            by_tenant=dict(Counter(r.tenant or "-" for r in self.records).most_common()),
        )

    def service_time(self) -> float:
        """Mean latency of the successful calls (seconds): the service time the plan
        uses unless given one.  It includes any queueing the replicas did while
        recording -- record on a fleet that was not saturated, or pass ``service_time=``."""
        if not self._latencies:
            raise ConfigError("the recording has no successful call to measure a service time")
        return sum(self._latencies) / len(self._latencies)

    # -- the plan ------------------------------------------------------------------------

    def plan(
        self,
        target: float,
        *,
        percentile: float = 0.95,
        concurrency: int = 1,
        headroom: float = 0.2,
        rate: str | float = "p95",
        service_time: float | None = None,
        service: str = "exponential",
        min_replicas: int = 2,
        max_replicas: int | None = None,
    ) -> CapacityPlan:
        """The replicas needed to hold latency at ``percentile`` within ``target`` seconds.

        * ``concurrency`` -- calls one replica serves at once (batch slots).
        * ``headroom`` -- plan for the rate x (1 + headroom) (default 20%: the time the
          autoscaler takes to react, and the error of a rate measured in the past).
        * ``rate`` -- which rate to plan for (see :meth:`rate`; default ``"p95"``).
        * ``service_time`` -- mean seconds per call at one slot (default: measured).
        * ``service`` -- ``"exponential"`` (M/M/c) or ``"empirical"`` (the recorded
          latencies as the service distribution, Erlang C's wait).
        * ``min_replicas`` (>= 2, for availability) / ``max_replicas`` -- the bounds.

        Raises :class:`~lbclient.ConfigError` when no number of replicas can meet the
        target (it is below the service time's own quantile)."""
        _positive("target", target)
        if not 0 < percentile < 1:
            raise ConfigError(f"percentile must be in (0, 1), e.g. 0.95, got {percentile!r}")
        _positive("concurrency", concurrency, integer=True)
        _positive("headroom", headroom, allow_zero=True)
        if not is_int(min_replicas) or min_replicas < 2:
            raise ConfigError(
                f"min_replicas must be an int >= 2 (one replica is no availability: a "
                f"restart or a node drain takes the service down), got {min_replicas!r}"
            )
        if max_replicas is not None:
            _positive("max_replicas", max_replicas, integer=True)
            if max_replicas < min_replicas:
                raise ConfigError(
                    f"max_replicas ({max_replicas}) must be >= min_replicas ({min_replicas})"
                )
        if service not in ("exponential", "empirical"):
            raise ConfigError(f"service must be 'exponential' or 'empirical', got {service!r}")
        s_mean = self.service_time() if service_time is None else float(service_time)
        _positive("service_time", s_mean)
        samples: list[float] | None = None
        if service == "empirical":
            if not self._latencies:
                raise ConfigError("service='empirical' needs successful calls in the recording")
            step = max(1, len(self._latencies) // 2000)
            scale = s_mean / self.service_time()
            samples = [x * scale for x in self._latencies[::step]]
        lam = self.rate(rate) * (1.0 + headroom)
        stat = rate if isinstance(rate, str) else "given"
        floor_p = _service_quantile(percentile, s_mean, samples)
        if floor_p >= target:
            raise ConfigError(
                f"target p{percentile * 100:g} = {target:g} s is at or below the service "
                f"time's own p{percentile * 100:g} ({floor_p:.3g} s): no number of replicas "
                "can meet it (make calls faster, or relax the target)"
            )

        def needed(lam_: float) -> int:
            return _replicas_for(target, percentile, lam_, s_mean, concurrency, samples)

        r_need = needed(lam)
        r = max(min_replicas, r_need)
        capped = max_replicas is not None and r > max_replicas
        if max_replicas is not None:
            r = min(r, max_replicas)
        c = r * concurrency
        a = lam * s_mean
        predicted = latency_quantile(percentile, c, lam, s_mean, samples)
        hi = max(r_need, r) * 2 + 4
        lo = max(1, math.floor(a / concurrency))
        curve = [
            (k, latency_quantile(percentile, k * concurrency, lam, s_mean, samples))
            for k in range(lo, hi + 1)
        ]
        # Mean latency: S + E[W], E[W] = C / (c mu - lambda).
        mean_t = s_mean + erlang_c(c, a) / (c / s_mean - lam) if a < c else math.inf
        by_rate = {k: needed(self.rate(k) * (1.0 + headroom)) for k in _RATE_STATS}
        return CapacityPlan(
            target=float(target),
            percentile=percentile,
            rate=lam,
            rate_stat=stat,
            headroom=float(headroom),
            service_time=s_mean,
            service=service,
            concurrency=concurrency,
            replicas_needed=r_need,
            replicas=r,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            predicted=predicted,
            wait_probability=erlang_c(c, a),
            utilization=a / c,
            in_flight=lam * mean_t,
            by_rate=by_rate,
            curve=curve,
            capped=capped,
            floor=floor_p,
        )

    # -- a model-free check ----------------------------------------------------------------

    def simulate(self, replicas: int, *, concurrency: int = 1, percentile: float = 0.95) -> float:
        """Replay the recording through ``replicas x concurrency`` first-come-first-
        served slots -- its own arrival times, its own latencies as service times -- and
        return the latency at ``percentile`` (seconds).  No distribution assumed: a
        check of a plan against the trace itself."""
        arrivals = [r.t for r in self.records if r.ok]
        services = [r.latency for r in self.records if r.ok]
        lat = replay(arrivals, services, replicas * concurrency)
        lat.sort()
        return _quantile(lat, percentile)


def replay(arrivals: Sequence[float], services: Sequence[float], servers: int) -> list[float]:
    """Latencies of calls arriving at ``arrivals`` (sorted) with ``services`` seconds of
    work each, through ``servers`` first-come-first-served servers."""
    free = [arrivals[0] if arrivals else 0.0] * servers
    heapq.heapify(free)
    out = []
    for at, s in zip(arrivals, services, strict=True):
        start = max(at, free[0])
        heapq.heapreplace(free, start + s)
        out.append(start + s - at)
    return out


def _service_quantile(q: float, mean: float, samples: Sequence[float] | None) -> float:
    if samples:
        return _quantile(sorted(samples), q)
    return -mean * math.log(1.0 - q)


def _replicas_for(
    target: float,
    percentile: float,
    rate: float,
    service: float,
    concurrency: int,
    samples: Sequence[float] | None,
) -> int:
    """The smallest replica count meeting the target (the tail falls as replicas grow)."""
    if rate <= 0:
        return 1
    lo = max(1, math.floor(rate * service / concurrency))  # Little: busy slots / slots

    def ok(r: int) -> bool:
        return latency_quantile(percentile, r * concurrency, rate, service, samples) <= target

    if ok(lo):
        while lo > 1 and ok(lo - 1):
            lo -= 1
        return lo
    hi = lo + 1
    while not ok(hi):
        lo = hi
        hi *= 2
        if hi > 10_000_000:
            raise ConfigError("no replica count up to 10 million meets the target")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def synthetic_trace(
    rate: float,
    duration: float,
    *,
    service_time: float = 1.0,
    service: str = "exponential",
    start: float = 1_700_000_000.0,
    diurnal: float = 0.0,
    seed: int | None = 0,
) -> list[TrafficRecord]:
    """Synthetic traffic: Poisson arrivals at ``rate`` calls/s for ``duration`` seconds,
    each "served" in an exponential (or ``"constant"``) ``service_time``, recorded as
    its latency.  ``diurnal`` in [0, 1): the rate swings by that share over a day
    (``rate x (1 + diurnal x sin(...))``, peak at 14:00 UTC) -- peak hours to find."""
    _positive("rate", rate)
    _positive("duration", duration)
    _positive("service_time", service_time)
    if not 0 <= diurnal < 1:
        raise ConfigError(f"diurnal must be in [0, 1), got {diurnal!r}")
    if service not in ("exponential", "constant"):
        raise ConfigError(f"service must be 'exponential' or 'constant', got {service!r}")
    rng = random.Random(seed)
    peak = rate * (1.0 + diurnal)
    out = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)  # thinning (Lewis-Shedler) for the diurnal swing
        if t >= duration:
            break
        at = start + t
        if diurnal:
            phase = 2 * math.pi * (((at / 3600.0) % 24.0) - 8.0) / 24.0
            if rng.random() * peak > rate * (1.0 + diurnal * math.sin(phase)):
                continue
        s = rng.expovariate(1.0 / service_time) if service == "exponential" else service_time
        out.append(TrafficRecord(t=at, latency=s))
    return out
