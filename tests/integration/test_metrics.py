"""``lbclient.metrics.PrometheusCollector`` against real balancers and fake replicas on
loopback: every family with its type, labels and plausible values, read at scrape time;
retries rising and a breaker flipping when a replica fails; hedges, sheds, in-flight
tokens and the demand gauge (also with every replica gone); the histograms' buckets;
several balancers in one collector; scrapes from another thread; ``promtool check
metrics`` on every exposition; and the Grafana dashboard's queries checked against a real
scrape (names, labels, PromQL syntax and non-empty results with ``promtool``)."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

import lbclient
from lbclient.http import ChatClient
from lbclient.metrics import PrometheusCollector, recorder_of
from lbclient.observe.histogram import DURATION_BUCKETS, TTFT_BUCKETS, Histogram, Recorder
from lbclient.testing import FakeClock, ReplicaConfig, ReplicaFleet

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import (
    generate_latest as generate_openmetrics,
)
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "examples" / "grafana-dashboard.json"
MESSAGES = [{"role": "user", "content": "hi"}]
FAST: dict[str, Any] = {"base_latency": 0.005, "sigma": 0.0, "token_delay": 0.001, "tokens": 4}

# name -> (type, label names); every family the collector writes, per the module docs.
FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    "lbclient_calls": ("counter", frozenset({"balancer", "outcome"})),
    "lbclient_calls_failed": ("counter", frozenset({"balancer", "reason"})),
    "lbclient_call_duration_seconds": ("histogram", frozenset({"balancer"})),
    "lbclient_time_to_first_token_seconds": ("histogram", frozenset({"balancer"})),
    "lbclient_retries": ("counter", frozenset({"balancer", "reason"})),
    "lbclient_retries_denied": ("counter", frozenset({"balancer"})),
    "lbclient_hedges": ("counter", frozenset({"balancer", "result"})),
    "lbclient_cooldowns": ("counter", frozenset({"balancer"})),
    "lbclient_shed": ("counter", frozenset({"balancer", "reason"})),
    "lbclient_attempts": ("counter", frozenset({"balancer", "endpoint", "outcome"})),
    "lbclient_endpoint_in_flight": ("gauge", frozenset({"balancer", "endpoint"})),
    "lbclient_endpoint_tokens_in_flight": ("gauge", frozenset({"balancer", "endpoint"})),
    "lbclient_endpoint_pickable": ("gauge", frozenset({"balancer", "endpoint"})),
    "lbclient_endpoint_breaker_state": ("gauge", frozenset({"balancer", "endpoint", "state"})),
    "lbclient_endpoint_server_queue_depth": ("gauge", frozenset({"balancer", "endpoint"})),
    "lbclient_endpoint_latency_ewma_seconds": ("gauge", frozenset({"balancer", "endpoint"})),
    "lbclient_endpoint_cooling_seconds": ("gauge", frozenset({"balancer", "endpoint"})),
    "lbclient_panic": ("gauge", frozenset({"balancer"})),
    "lbclient_admission_limit": ("gauge", frozenset({"balancer"})),
    "lbclient_admission_queued": ("gauge", frozenset({"balancer"})),
    "lbclient_demand_calls": ("gauge", frozenset({"balancer"})),
    "lbclient_demand_tokens": ("gauge", frozenset({"balancer"})),
}
OUTCOMES = ("success", "failure", "deadline", "ignored", "cancelled", "lost")
GENAI_DURATION = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                  40.96, 81.92)  # fmt: skip


# -- helpers ------------------------------------------------------------------------------


class Scrape:
    """One exposition, parsed: ``value(sample_name, **labels)``, ``types``, ``labels``."""

    def __init__(self, text: bytes) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text.decode()):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples.append((s.name, dict(s.labels), s.value))

    def all(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (lb, v)
            for n, lb, v in self.samples
            if n == name and all(lb.get(k) == want for k, want in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float | None:
        found = self.all(name, **labels)
        assert len(found) <= 1, f"{name} {labels}: {len(found)} series"
        return found[0][1] if found else None

    def total(self, name: str, **labels: str) -> float:
        return sum(v for _, v in self.all(name, **labels))

    def sample_names(self) -> set[str]:
        return {n for n, _, _ in self.samples}

    def label_names(self, name: str) -> set[str]:
        return {k for n, lb, _ in self.samples if n == name for k in lb}


def registry_of(lb: lbclient.Balancer, balancer: str = "default") -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(PrometheusCollector(lb, balancer=balancer))
    return registry


def scrape(registry: CollectorRegistry, promtool: str | None = None) -> Scrape:
    text = generate_latest(registry)
    if promtool is not None:
        check_with_promtool(promtool, text)
    return Scrape(text)


def check_with_promtool(promtool: str, text: bytes) -> None:
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=10
    )
    assert out.returncode == 0, (out.stdout + out.stderr).decode()
    # ``check metrics`` prints lint problems (naming, units...) and still exits 0 on some.
    assert not (out.stdout + out.stderr).strip(), (out.stdout + out.stderr).decode()


def buckets(s: Scrape, name: str, **labels: str) -> dict[float, float]:
    return {float(lb["le"]): v for lb, v in s.all(f"{name}_bucket", **labels)}


async def chat_calls(chat: ChatClient, n: int, **kwargs: Any) -> list[Any]:
    return [await chat.create(messages=MESSAGES, **kwargs) for _ in range(n)]


async def stream_calls(chat: ChatClient, n: int) -> None:
    for _ in range(n):
        assert [t async for t in chat.stream(messages=MESSAGES)] == [f"tok{i} " for i in range(4)]


async def burst(chat: ChatClient, n: int) -> list[Any]:
    """``n`` calls at once: with ``Admission(limit=4, max_queue=0)`` the ones past 4 are
    shed before any completes."""
    return await asyncio.gather(
        *(chat.create(messages=MESSAGES) for _ in range(n)), return_exceptions=True
    )


def in_order() -> Any:
    """Picks the first endpoint not excluded: the first attempt always goes to endpoint
    0, a retry or a backup to endpoint 1 (each test knows which endpoint saw what)."""
    from lbclient.strategies import PickContext

    class Picker:
        def __init__(self, states: Any) -> None:
            self.states = tuple(states)

        def pick(self, key: object, exclude: Any) -> Any:
            for s in self.states:
                if not exclude or s not in exclude:
                    return s
            return None

    class InOrder:
        name = "in_order"

        def picker(self, states: Any, ctx: PickContext) -> Picker:
            return Picker(states)

    return InOrder()


# -- every family -------------------------------------------------------------------------


def test_every_family_has_its_type_labels_and_passes_promtool(promtool: str) -> None:
    lb = lbclient.Balancer(
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
        breaker=lbclient.Breaker(),
        admission=lbclient.Admission(limit=8),
    )
    registry = registry_of(lb, "chat")
    assert lb._engine.recorder is not None  # attached by the collector
    s = scrape(registry, promtool)
    assert s.types == {name: kind for name, (kind, _) in FAMILIES.items()}
    for name, (kind, labels) in FAMILIES.items():
        sample_names = {
            "counter": [f"{name}_total"],
            "gauge": [name],
            "histogram": [f"{name}_bucket", f"{name}_count", f"{name}_sum"],
        }[kind]
        for sample in sample_names:
            got = s.label_names(sample) - {"le"}
            assert not got or got == labels, (sample, got)
    # Families that exist before anything happened, with their zero values.
    assert s.value("lbclient_calls_total", balancer="chat", outcome="ok") == 0
    assert s.value("lbclient_calls_total", balancer="chat", outcome="failed") == 0
    for url in ("http://10.0.0.1:8000", "http://10.0.0.2:8000"):
        assert s.value("lbclient_endpoint_pickable", endpoint=url) == 1
        assert s.value("lbclient_endpoint_in_flight", endpoint=url) == 0
        states = {
            lb_["state"]: v for lb_, v in s.all("lbclient_endpoint_breaker_state", endpoint=url)
        }
        assert states == {"closed": 1, "half_open": 0, "open": 0}
        # success and failure always; the rare outcomes once they happen (fewer series)
        assert {lb_["outcome"] for lb_, _ in s.all("lbclient_attempts_total", endpoint=url)} == {
            "success",
            "failure",
        }
        # No latency estimate before a call, nor a queue depth before a server said one.
        assert s.value("lbclient_endpoint_latency_ewma_seconds", endpoint=url) is None
        assert s.value("lbclient_endpoint_server_queue_depth", endpoint=url) is None
    assert s.value("lbclient_admission_limit", balancer="chat") == 8
    assert s.value("lbclient_demand_calls", balancer="chat") == 0
    assert s.value("lbclient_panic", balancer="chat") == 0
    assert s.value("lbclient_call_duration_seconds_count", balancer="chat") == 0
    # The OpenMetrics exposition (what Prometheus negotiates first) parses too.
    families = list(parse_openmetrics(generate_openmetrics(registry).decode()))
    assert {f.name for f in families} == set(FAMILIES)


def test_without_admission_the_admission_gauges_have_no_series_but_demand_does() -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"])
    s = scrape(registry_of(lb))
    assert s.all("lbclient_admission_limit") == []
    assert s.all("lbclient_admission_queued") == []
    assert s.all("lbclient_shed_total") == []
    assert s.value("lbclient_demand_calls", balancer="default") == 0
    assert s.value("lbclient_demand_tokens", balancer="default") == 0


# -- a fleet with faults ------------------------------------------------------------------


async def run_fault_scenario(
    fleet: ReplicaFleet, promtool: str, check: Callable[[str, Scrape], None] | None = None
) -> list[Scrape]:
    """Healthy traffic, then replica 1 answering 500 to everything, then more traffic;
    a burst past the admission limit after each phase.  Returns the three scrapes."""
    lb = lbclient.Balancer(
        fleet.urls,
        strategy="round_robin",
        retry=lbclient.Retry(attempts=3, backoff=0.001, max_backoff=0.002),
        breaker=lbclient.Breaker(failures=3, cooldown=30.0),
        admission=lbclient.Admission(limit=4, max_queue=0, throttle=None),
    )
    registry = registry_of(lb, "chat")
    scrapes: list[Scrape] = []
    async with ChatClient(lb, timeout=5.0) as chat:
        await chat_calls(chat, 12)
        await stream_calls(chat, 2)
        scrapes.append(scrape(registry, promtool))
        if check:
            check("healthy", scrapes[-1])
        fleet[1].set(error_rate=1.0)
        await chat_calls(chat, 12)
        results = await burst(chat, 8)
        scrapes.append(scrape(registry, promtool))
        if check:
            check("failing", scrapes[-1])
            shed = [r for r in results if isinstance(r, lbclient.Overloaded)]
            assert len(shed) == 4 and all(r.reason == "queue full" for r in shed)
        await chat_calls(chat, 6)
        await stream_calls(chat, 1)
        await burst(chat, 8)
        scrapes.append(scrape(registry, promtool))
    await lb.aclose()
    return scrapes


async def test_a_fleet_with_a_failing_replica_shows_every_family_plausibly(
    fleet_factory: Any, promtool: str
) -> None:
    fleet: ReplicaFleet = await fleet_factory([ReplicaConfig(capacity=8, **FAST)] * 3)
    good = [fleet.urls[0], fleet.urls[2]]
    bad = fleet.urls[1]

    def check(phase: str, s: Scrape) -> None:
        ok = s.value("lbclient_calls_total", balancer="chat", outcome="ok")
        if phase == "healthy":
            assert ok == 14
            assert s.value("lbclient_calls_total", outcome="failed") == 0
            assert s.all("lbclient_calls_failed_total") == []
            assert s.all("lbclient_retries_total") == []
            # Non-streaming calls land in the duration histogram, streams in TTFT (a
            # stream's whole duration is not recorded today: the + 2 allows for it).
            assert s.value("lbclient_call_duration_seconds_count") in (12, 12 + 2)
            assert s.value("lbclient_time_to_first_token_seconds_count") == 2
            assert 0 < s.value("lbclient_call_duration_seconds_sum") < 12 * 1.0  # type: ignore[operator]
            assert s.total("lbclient_attempts_total", outcome="success") == 14
            for url in fleet.urls:
                assert s.value("lbclient_endpoint_breaker_state", endpoint=url, state="closed") == 1
                assert s.value("lbclient_endpoint_pickable", endpoint=url) == 1
                ewma = s.value("lbclient_endpoint_latency_ewma_seconds", endpoint=url)
                assert ewma is not None and 0.001 < ewma < 1.0
                # The replicas answer x-queue-depth; ChatClient reports it.
                assert s.value("lbclient_endpoint_server_queue_depth", endpoint=url) == 0
            return
        # Replica 1 failed 3 times in a row: each failure was retried elsewhere, then its
        # breaker opened and it got nothing more.
        assert ok == 14 + 12 + 4
        assert s.value("lbclient_retries_total", reason="status 500") == 3
        assert s.value("lbclient_attempts_total", endpoint=bad, outcome="failure") == 3
        for url in good:
            assert s.value("lbclient_attempts_total", endpoint=url, outcome="failure") == 0
        assert s.value("lbclient_endpoint_breaker_state", endpoint=bad, state="open") == 1
        assert s.value("lbclient_endpoint_breaker_state", endpoint=bad, state="closed") == 0
        assert s.value("lbclient_endpoint_pickable", endpoint=bad) == 0
        assert all(s.value("lbclient_endpoint_pickable", endpoint=u) == 1 for u in good)
        assert s.value("lbclient_panic") == 0
        # The burst: 4 admitted, 4 shed at once -- counted as shed and as failed calls.
        assert s.value("lbclient_shed_total", reason="queue full") == 4
        assert s.value("lbclient_calls_failed_total", reason="shed: queue full") == 4
        assert s.value("lbclient_calls_total", outcome="failed") == 4
        assert s.value("lbclient_call_duration_seconds_count") in (32, 32 + 2)  # + shed ones
        # Nothing is running now.
        assert s.total("lbclient_endpoint_in_flight") == 0
        assert s.value("lbclient_demand_calls") == 0
        assert s.value("lbclient_admission_queued") == 0

    scrapes = await run_fault_scenario(fleet, promtool, check)
    first, second, last = scrapes
    # Round robin gave the bad replica its third of the healthy calls, and no success
    # since it broke.
    served = first.value("lbclient_attempts_total", endpoint=bad, outcome="success")
    assert served in (4, 5)
    assert second.value("lbclient_attempts_total", endpoint=bad, outcome="success") == served
    # Counters only grow between scrapes.
    for name, labels, value in first.samples:
        if name.endswith("_total") or name.endswith("_count") or name.endswith("_bucket"):
            later = last.value(name, **labels)
            assert later is not None and later >= value, (name, labels)
    assert last.value("lbclient_time_to_first_token_seconds_count") == 3
    assert last.value("lbclient_shed_total", reason="queue full") == 8


async def test_hedges_sent_and_won_are_counted(fleet_factory: Any, promtool: str) -> None:
    fleet: ReplicaFleet = await fleet_factory(
        [ReplicaConfig(**{**FAST, "base_latency": 0.5}), ReplicaConfig(**FAST)]
    )
    lb = lbclient.Balancer(
        fleet.urls, strategy=in_order(), hedge=lbclient.Hedge(delay=0.05, max_extra=0.9)
    )
    registry = registry_of(lb)
    async with ChatClient(lb, timeout=5.0) as chat:
        for _ in range(3):  # endpoint 0 is slow: its backup on endpoint 1 wins each time
            reply = await chat.create(messages=MESSAGES)
            assert reply["system_fingerprint"] == "replica-1"
    s = scrape(registry, promtool)
    assert s.value("lbclient_hedges_total", result="sent") == 3
    assert s.value("lbclient_hedges_total", result="won") == 3
    assert s.value("lbclient_hedges_total", result="denied") == 0
    assert s.value("lbclient_attempts_total", endpoint=fleet.urls[0], outcome="lost") == 3
    assert s.value("lbclient_attempts_total", endpoint=fleet.urls[1], outcome="success") == 3
    # The calls took the backup's time, not the slow replica's.
    assert s.value("lbclient_call_duration_seconds_bucket", le="0.16") == 3
    await lb.aclose()


# -- in flight, tokens, admission, demand --------------------------------------------------


async def test_in_flight_tokens_queue_and_demand_are_read_at_scrape_time() -> None:
    urls = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    lb = lbclient.Balancer(
        urls,
        strategy="round_robin",
        admission=lbclient.Admission(limit=2, max_queue=10, max_wait=5.0, throttle=None),
    )
    registry = registry_of(lb, "chat")
    release = asyncio.Event()
    started = 0

    async def work(ep: lbclient.Endpoint) -> str:
        nonlocal started
        started += 1
        await release.wait()
        return ep.url

    # 2 run, 2 wait (a cold gate queues at most one round of its limit).
    tasks = [asyncio.create_task(lb.call(work, tokens=100.0 * (i + 1))) for i in range(4)]
    for _ in range(50):
        await asyncio.sleep(0.01)
        if started == 2 and lb.stats().admission.queued == 2:  # type: ignore[union-attr]
            break
    s = scrape(registry)
    assert s.total("lbclient_endpoint_in_flight", balancer="chat") == 2
    assert {v for _, v in s.all("lbclient_endpoint_in_flight")} == {1}  # round robin
    assert s.total("lbclient_endpoint_tokens_in_flight") == 100 + 200
    assert s.value("lbclient_admission_queued") == 2
    assert s.value("lbclient_admission_limit") == 2
    # Demand: every call the application wants to run, queued or running, and its tokens.
    assert s.value("lbclient_demand_calls") == 4
    assert s.value("lbclient_demand_tokens") == 100 + 200 + 300 + 400

    # Every replica gone: no endpoint series any more, but the demand is still there.
    for url in urls:
        lb.remove(url)
    s = scrape(registry)
    assert s.all("lbclient_endpoint_in_flight") == []
    assert s.all("lbclient_endpoint_pickable") == []
    assert s.value("lbclient_demand_calls") == 4
    assert s.value("lbclient_demand_tokens") == 1000

    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sorted(results[:2]) == urls  # type: ignore[type-var]
    assert all(isinstance(r, lbclient.NoEndpointAvailable) for r in results[2:]), results
    s = scrape(registry)
    assert s.value("lbclient_demand_calls") == 0
    assert s.value("lbclient_demand_tokens") == 0
    assert s.value("lbclient_calls_total", outcome="ok") == 2
    assert s.value("lbclient_calls_failed_total", reason="no endpoint") == 2
    await lb.aclose()


async def test_demand_without_admission_counts_attempts_in_flight() -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
    registry = registry_of(lb)
    release = asyncio.Event()

    async def work(ep: lbclient.Endpoint) -> None:
        await release.wait()

    tasks = [asyncio.create_task(lb.call(work, tokens=50.0)) for _ in range(3)]
    await asyncio.sleep(0.02)
    s = scrape(registry)
    assert s.value("lbclient_demand_calls") == 3
    assert s.value("lbclient_demand_tokens") == 150
    assert s.total("lbclient_endpoint_in_flight") == 3
    release.set()
    await asyncio.gather(*tasks)
    assert scrape(registry).value("lbclient_demand_calls") == 0
    await lb.aclose()


async def test_server_reported_queue_depth_is_exported(fleet_factory: Any) -> None:
    fleet: ReplicaFleet = await fleet_factory(
        [ReplicaConfig(capacity=1, **{**FAST, "base_latency": 0.05})]
    )
    lb = lbclient.Balancer(fleet.urls)
    registry = registry_of(lb)
    async with ChatClient(lb, timeout=5.0) as chat:
        tasks = [asyncio.create_task(chat.create(messages=MESSAGES)) for _ in range(4)]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # The first answer left 3 others waiting on a 1-slot replica: it said so.
        depth = scrape(registry).value("lbclient_endpoint_server_queue_depth")
        await asyncio.gather(*tasks)
    assert depth == 3
    await lb.aclose()


async def test_panic_gauge_when_too_many_endpoints_are_ejected(promtool: str) -> None:
    urls = ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    lb = lbclient.Balancer(urls, breaker=lbclient.Breaker(failures=1, cooldown=60.0))
    registry = registry_of(lb)

    @lb.route
    async def fail(ep: lbclient.Endpoint) -> None:
        raise ConnectionError("down")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await fail()
    s = scrape(registry, promtool)
    assert s.value("lbclient_panic") == 1
    # Both breakers are open, and panic mode still serves one of them (max_ejection 0.5).
    assert all(
        s.value("lbclient_endpoint_breaker_state", endpoint=u, state="open") == 1 for u in urls
    )
    assert s.total("lbclient_endpoint_pickable") == 1
    assert s.value("lbclient_calls_failed_total", reason="error") == 2
    assert s.value("lbclient_calls_total", outcome="failed") == 2
    await lb.aclose()


# -- histograms ---------------------------------------------------------------------------


def test_bucket_bounds_are_the_genai_ones_extended_for_long_tails() -> None:
    assert DURATION_BUCKETS[: len(GENAI_DURATION)] == pytest.approx(GENAI_DURATION)
    assert DURATION_BUCKETS[len(GENAI_DURATION) :] == (163.84, 327.68, 655.36, 1310.72)
    assert TTFT_BUCKETS[:16] == (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)  # fmt: skip
    assert TTFT_BUCKETS[16:] == (20.0, 40.0, 80.0, 160.0)
    lb = lbclient.Balancer(["http://10.0.0.1:8000"])
    s = scrape(registry_of(lb))
    les = [lb_["le"] for lb_, _ in s.all("lbclient_call_duration_seconds_bucket")]
    assert les == [repr(b) for b in DURATION_BUCKETS] + ["+Inf"]
    les = [lb_["le"] for lb_, _ in s.all("lbclient_time_to_first_token_seconds_bucket")]
    assert les == [repr(b) for b in TTFT_BUCKETS] + ["+Inf"]


def test_a_histogram_counts_a_value_on_a_bound_in_that_bucket() -> None:
    h = Histogram((1.0, 2.0, 4.0))
    for v in (0.0, 1.0, 1.0000001, 2.0, 4.0, 4.5, 1e9):
        h.observe(v)
    assert h.counts == [2, 2, 1, 2]
    assert h.cumulative() == [(1.0, 2), (2.0, 4), (4.0, 5), (math.inf, 7)]
    assert h.count == 7
    assert h.sum == pytest.approx(0 + 1 + 1.0000001 + 2 + 4 + 4.5 + 1e9)
    with pytest.raises(ValueError):
        Histogram((1.0, 1.0, 2.0))
    with pytest.raises(ValueError):
        Histogram(())


async def test_call_durations_land_in_the_right_buckets(clock: FakeClock, promtool: str) -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"], clock=clock)
    registry = registry_of(lb)

    @lb.route
    async def call(ep: lbclient.Endpoint, seconds: float, fail: bool = False) -> None:
        clock.advance(seconds)
        if fail:
            raise ValueError("the caller's bug")

    durations = [0.005, 0.01, 0.0100001, 3.0, 100.0, 2000.0]
    for d in durations:
        await call(d)
    with pytest.raises(ValueError):
        await call(0.3, fail=True)  # failed calls are durations too
    s = scrape(registry, promtool)
    b = buckets(s, "lbclient_call_duration_seconds")
    assert b[0.01] == 2  # 0.005 and exactly 0.01 (le is inclusive)
    assert b[0.02] == 3
    assert b[0.32] == 4  # + the failed 0.3
    assert b[5.12] == 5
    assert b[163.84] == 6  # 100 s: a long tail the GenAI buckets alone would lose
    assert b[1310.72] == 6
    assert b[math.inf] == 7  # 2000 s: past every bound
    assert s.value("lbclient_call_duration_seconds_count") == 7
    assert s.value("lbclient_call_duration_seconds_sum") == pytest.approx(sum(durations) + 0.3)
    assert s.value("lbclient_time_to_first_token_seconds_count") == 0
    await lb.aclose()


async def test_streams_record_time_to_first_chunk_and_a_failed_stream_its_duration(
    clock: FakeClock,
) -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"], clock=clock)
    registry = registry_of(lb)

    @lb.route
    async def gen(ep: lbclient.Endpoint, first: float, fail: bool) -> Any:
        clock.advance(first)
        if fail:
            raise ValueError("broken before the first chunk")
        yield "a"
        await asyncio.sleep(0.01)  # the next chunk is awaited, as from a socket
        clock.advance(100.0)  # after the first chunk: not part of the TTFT
        yield "b"

    assert [c async for c in gen(0.05, False)] == ["a", "b"]
    assert [c async for c in gen(0.3, False)] == ["a", "b"]
    with pytest.raises(ValueError):
        [c async for c in gen(7.0, True)]
    s = scrape(registry)
    ttft = buckets(s, "lbclient_time_to_first_token_seconds")
    assert (ttft[0.04], ttft[0.06], ttft[0.25], ttft[0.5], ttft[math.inf]) == (0, 1, 1, 2, 2)
    assert s.value("lbclient_time_to_first_token_seconds_sum") == pytest.approx(0.35)
    # The stream that never had a first chunk is a 7 s (failed) operation, not a TTFT.
    duration = buckets(s, "lbclient_call_duration_seconds")
    assert (duration[5.12], duration[10.24], duration[81.92]) == (0, 1, 1)
    assert s.value("lbclient_calls_total", outcome="ok") == 2
    await lb.aclose()


def test_recorder_sends_failed_streams_to_duration_and_calls_its_hooks() -> None:
    rec = Recorder()
    seen: list[tuple[Any, ...]] = []
    rec.hooks.append(lambda *a: seen.append(a))
    rec.call(0.2, True, "http://a", None, True)
    rec.call(0.5, False, None, "500", True)
    rec.call(1.0, True, "http://a")
    assert (rec.ttft.count, rec.duration.count) == (1, 2)
    assert rec.duration.sum == pytest.approx(1.5)
    assert seen == [
        (0.2, True, "http://a", None, True),
        (0.5, False, None, "500", True),
        (1.0, True, "http://a", None, False),
    ]


# -- several balancers, bad configuration ---------------------------------------------------


def test_several_balancers_share_one_collector_told_apart_by_label(promtool: str) -> None:
    chat = lbclient.Balancer(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])
    embed = lbclient.Balancer(["http://10.0.1.1:8000"], admission=lbclient.Admission(limit=3))
    collector = PrometheusCollector(chat, balancer="chat").add(embed, balancer="embed")
    assert collector.balancers == {"chat": chat, "embed": embed}
    registry = CollectorRegistry()
    registry.register(collector)
    s = scrape(registry, promtool)
    assert s.types == {name: kind for name, (kind, _) in FAMILIES.items()}
    assert {lb_["balancer"] for lb_, _ in s.all("lbclient_calls_total")} == {"chat", "embed"}
    assert {lb_["endpoint"] for lb_, _ in s.all("lbclient_endpoint_pickable", balancer="chat")} == {
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
    }
    assert [
        lb_["endpoint"] for lb_, _ in s.all("lbclient_endpoint_pickable", balancer="embed")
    ] == ["http://10.0.1.1:8000"]
    assert s.value("lbclient_admission_limit", balancer="embed") == 3
    assert s.value("lbclient_admission_limit", balancer="chat") is None
    assert len(s.all("lbclient_call_duration_seconds_count")) == 2
    # A second collector in the same registry would write every family twice (an
    # exposition Prometheus rejects): the registry refuses it.
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(PrometheusCollector(lbclient.Balancer(["http://10.0.2.1:8000"])))
    # The same label, or the same balancer twice, is a configuration error.
    with pytest.raises(lbclient.ConfigError, match="already has"):
        collector.add(lbclient.Balancer(["http://10.0.3.1:8000"]), balancer="chat")
    with pytest.raises(lbclient.ConfigError, match="already exports"):
        collector.add(chat, balancer="again")


def test_bad_configuration_is_a_config_error() -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"])
    with pytest.raises(lbclient.ConfigError):
        PrometheusCollector(object(), balancer="x")  # type: ignore[arg-type]
    with pytest.raises(lbclient.ConfigError):
        PrometheusCollector(lb, balancer="")
    with pytest.raises(lbclient.ConfigError):
        PrometheusCollector(lb, prefix="my-app")  # not a metric name
    c = PrometheusCollector(lb, prefix="myapp_lb")
    assert {m.name for m in c.collect()} == {n.replace("lbclient", "myapp_lb") for n in FAMILIES}
    assert recorder_of(lb) is lb._engine.recorder  # one recorder, shared by exporters


# -- scraping from another thread ---------------------------------------------------------


async def test_scraping_from_another_thread_while_endpoints_come_and_go() -> None:
    """``start_http_server`` scrapes on its own thread while the event loop changes the
    pool: a scrape must never fail with "dictionary changed size during iteration"."""
    lb = lbclient.Balancer([f"http://10.0.{i // 250}.{i % 250}:8000" for i in range(300)])
    registry = registry_of(lb)
    errors: list[BaseException] = []
    scrapes = 0
    stop = threading.Event()

    def scraper() -> None:
        nonlocal scrapes
        while not stop.is_set():
            try:
                generate_latest(registry)
                scrapes += 1
            except Exception as exc:  # pragma: no cover - the failure being tested
                errors.append(exc)

    thread = threading.Thread(target=scraper)
    thread.start()
    try:
        for k in range(2000):
            url = f"http://10.9.{k // 250}.{k % 250}:8000"
            lb.add(url)
            await asyncio.sleep(0)
            lb.remove(url)
            if k % 50 == 0:
                await asyncio.sleep(0.001)  # let the scraper thread run
    finally:
        stop.set()
        thread.join(5.0)
    assert scrapes > 0
    assert errors == []
    await lb.aclose()


async def test_a_scrape_off_the_event_loop_only_reads(clock: FakeClock) -> None:
    """On the balancer's loop a scrape lets time-driven changes happen first (a breaker's
    cooldown ending: open -> half-open), like ``lb.stats()``; from another thread it must
    not change the balancer (nor run listeners there)."""
    events: list[tuple[str, lbclient.Event]] = []
    lb = lbclient.Balancer(
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
        breaker=lbclient.Breaker(failures=1, cooldown=5.0, jitter=0.0),
        clock=clock,
        on_event=lambda e: events.append((threading.current_thread().name, e)),
    )
    registry = registry_of(lb)

    @lb.route
    async def fail(ep: lbclient.Endpoint) -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await fail()
    url = next(s.url for s in lb.stats().endpoints if s.breaker == "open")
    clock.advance(10.0)
    events.clear()
    got: list[Scrape] = []
    thread = threading.Thread(target=lambda: got.append(scrape(registry)), name="scraper")
    thread.start()
    thread.join(5.0)
    assert events == []
    assert got[0].value("lbclient_endpoint_breaker_state", endpoint=url, state="open") == 1
    s = scrape(registry)  # on the loop
    assert s.value("lbclient_endpoint_breaker_state", endpoint=url, state="half_open") == 1
    assert s.value("lbclient_endpoint_pickable", endpoint=url) == 1
    assert [type(e).__name__ for _, e in events] == ["BreakerEvent"]
    assert {name for name, _ in events} == {threading.current_thread().name}
    await lb.aclose()


# -- the Grafana dashboard ----------------------------------------------------------------

REQUIRED_PANELS = {
    "in flight": r"lbclient_endpoint_in_flight",
    "p99 latency": r"histogram_quantile\(0\.99,.*lbclient_call_duration_seconds_bucket",
    "breaker states": r"lbclient_endpoint_breaker_state",
    "retries": r"lbclient_retries_total",
    "hedges": r"lbclient_hedges_total",
    "sheds": r"lbclient_shed_total",
    "demand": r"lbclient_demand_(calls|tokens)",
}
_SELECTOR = re.compile(r"\b(lbclient_[a-zA-Z0-9_:]+)\s*(\{([^}]*)\})?")
_GROUPING = re.compile(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")


def dashboard_queries() -> list[tuple[str, str]]:
    """``[(panel title, expr)]`` of every target of every panel."""
    data = json.loads(DASHBOARD.read_text())
    out = []
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def to_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for."""
    return expr.replace("$__rate_interval", "1m").replace("$balancer", ".*")


def test_the_dashboard_is_a_well_formed_grafana_model() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["title"] and data["uid"] and isinstance(data["schemaVersion"], int)
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "lbclient_calls_total" in variables["balancer"]["definition"]
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for p in data["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    # No two panels overlap.
    cells = set()
    for p in data["panels"]:
        pos = p["gridPos"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
    exprs = "\n".join(e for _, e in dashboard_queries())
    for what, pattern in REQUIRED_PANELS.items():
        assert re.search(pattern, exprs), f"no panel shows {what}"


async def test_every_dashboard_query_works_on_a_real_scrape(
    fleet_factory: Any, promtool: str, tmp_path: Path
) -> None:
    fleet: ReplicaFleet = await fleet_factory([ReplicaConfig(capacity=8, **FAST)] * 3)
    scrapes = await run_fault_scenario(fleet, promtool)
    last = scrapes[-1]
    exported = last.sample_names()
    queries = dashboard_queries()
    assert len(queries) >= 15

    # 1. Names and labels: every series a query selects is exported, with those labels.
    for title, expr in queries:
        names = [m.group(1) for m in _SELECTOR.finditer(expr)]
        assert names, (title, expr)
        labels_of_expr: set[str] = set()
        for m in _SELECTOR.finditer(expr):
            name = m.group(1)
            assert name in exported, f"{title}: {name} is not exported"
            known = last.label_names(name)
            labels_of_expr |= known
            for label in _MATCHER.findall(m.group(3) or ""):
                assert label in known, f"{title}: {name} has no label {label!r}"
        for group in _GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in labels_of_expr, f"{title}: no series has label {label!r}"

    # 2. PromQL: every query parses (promtool check rules), and gives a non-empty result
    # over the three scrapes (promtool test rules: absent(q) is empty iff q is not).
    def rule_file(path: Path, exprs: Iterable[str]) -> Path:
        rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
        path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
        return path

    rules = rule_file(tmp_path / "rules.json", (to_promql(e) for _, e in queries))
    out = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "rules", str(rules)], capture_output=True, timeout=20
    )
    assert out.returncode == 0, (out.stdout + out.stderr).decode()

    series: dict[str, list[str]] = {}
    for i, s in enumerate(scrapes):
        for name, labels, value in s.samples:
            key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
            values = series.setdefault(key, ["_"] * len(scrapes))
            values[i] = "NaN" if math.isnan(value) else repr(float(value))
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    {"series": key, "values": " ".join(values)} for key, values in series.items()
                ],
                "promql_expr_test": [
                    {"expr": f"absent({to_promql(e)})", "eval_time": "30s", "exp_samples": []}
                    for _, e in queries
                ],
            }
        ],
    }
    test_file = tmp_path / "dashboard_test.json"
    test_file.write_text(json.dumps(tests))
    out = await asyncio.to_thread(
        subprocess.run, [promtool, "test", "rules", str(test_file)], capture_output=True, timeout=30
    )
    report = (out.stdout + out.stderr).decode()
    assert out.returncode == 0, "queries with no result on a real scrape:\n" + report


def test_render_writes_what_generate_latest_writes(promtool: str, tmp_path: Any) -> None:
    """``lbclient.metrics.render`` (the fast text writer) gives the same lines as
    prometheus_client's ``generate_latest`` -- values compared as numbers -- and passes
    promtool."""
    import subprocess

    from prometheus_client import CollectorRegistry, generate_latest

    from lbclient.metrics import render

    lb = lbclient.Balancer([f"http://10.9.0.{i}:8000" for i in range(1, 40)])
    lb.report_load("http://10.9.0.3:8000", 7)
    collector = PrometheusCollector(lb, balancer='we"ird\\name')
    registry = CollectorRegistry()
    registry.register(collector)

    def lines(text: bytes) -> list[str]:
        out = []
        for line in text.decode().splitlines():
            if not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                line = f"{name} {float(value.replace('+Inf', 'inf'))!r}"
            out.append(line)
        return out

    fast = render(registry)
    assert lines(fast) == lines(generate_latest(registry))
    path = tmp_path / "scrape.txt"
    path.write_bytes(fast)
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=fast, capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
