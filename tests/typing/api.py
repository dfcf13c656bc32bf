"""Type-checked usage of lbclient's public API: ``mypy --strict tests/typing/api.py``
must pass (``tests/test_public_api.py`` runs it).  Never executed; it only has to
type-check.  Each assignment with an annotation asserts what the API returns."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import lbclient
from lbclient.strategies import ConsistentHash
from lbclient.testing import FakeClock, ReplicaConfig, ReplicaFleet

lb = lbclient.Balancer(
    ["http://10.0.1.10:8000", lbclient.Endpoint("http://10.0.1.11:8000", weight=2.0)],
    strategy="peak_ewma",
    retry=lbclient.Retry(attempts=3, retry_on=lbclient.retry_if_status(429, 503)),
    breaker=lbclient.Breaker(),
    hedge=None,
    region="eu-west-1",
    ewma_decay=10.0,
    clock=lbclient.MonotonicClock(),
    rng=random.Random(0),
)
hashed = lbclient.Balancer(
    ["http://a"], strategy=ConsistentHash(vnodes=50), clock=FakeClock(), rng=1
)


# -- @lb.route: the endpoint argument disappears, the rest of the signature stays ---------


@lb.route
async def complete(endpoint: lbclient.Endpoint, prompt: str, *, max_tokens: int = 16) -> str:
    return f"{endpoint.url}: {prompt} ({max_tokens})"


@lb.route(timeout=5.0)
async def score(endpoint: lbclient.Endpoint, x: int) -> float:
    return float(x) * endpoint.weight


@hashed.route(key=lambda payload: payload["user"])
async def chat(endpoint: lbclient.Endpoint, payload: dict[str, str]) -> dict[str, str]:
    return {"url": endpoint.url, **payload}


@lb.route
async def stream(endpoint: lbclient.Endpoint, n: int) -> AsyncIterator[str]:
    for i in range(n):
        yield f"{endpoint.url}:{i}"


async def f(endpoint: lbclient.Endpoint, x: int) -> str:
    return endpoint.url * x


async def use() -> None:
    s: str = await complete("hi")
    s = await complete("hi", max_tokens=4)
    v: float = await score(3)
    d: dict[str, str] = await chat({"user": "u1"})
    chunks: list[str] = [c async for c in stream(3)]
    r: str = await lb.call(f, 2)
    r = await lb.call(f, 2, key="user-1")
    async with lb.pick() as ep:
        url: str = ep.url
        w: float = ep.weight
    async with lb.pick(key="tenant") as ep2:
        region: str | None = ep2.region

    # membership
    added: lbclient.Endpoint = lb.add("http://10.0.1.12:8000")
    result: lbclient.DrainResult = await lb.drain(added.url, timeout=1.0)
    idle: bool = result.idle
    n: int = result.in_flight
    lb.undrain(added.url)
    removed: lbclient.Endpoint = lb.remove(added.url)
    eps: tuple[lbclient.Endpoint, ...] = lb.endpoints

    # stats
    stats: lbclient.BalancerStats = lb.stats()
    one: lbclient.EndpointStats = stats.endpoint("http://10.0.1.10:8000")
    flight: int = one.in_flight + stats.in_flight
    p99: float | None = one.p99_ms
    outcomes: int = one.successes + one.ignored + one.cancelled + one.cut + one.lost
    ttft99: float | None = one.ttft_p99_ms
    cooling: float = one.cooling_s
    by: int = stats.failed_by.get("deadline", 0) + stats.retries_by.get("status 503", 0)
    cooldowns: int = stats.cooldowns

    # errors
    try:
        await complete("x")
    except lbclient.AttemptsExhausted as exc:
        attempts: tuple[lbclient.Attempt, ...] = exc.attempts
        last: BaseException | None = exc.last_error
        del attempts, last
    except lbclient.DeadlineExceeded as exc2:
        t: float = exc2.timeout
        del t
    except lbclient.NoEndpointAvailable as exc3:
        back: float | None = exc3.retry_after
        del back
    except lbclient.LBError:
        pass

    async with lbclient.Balancer(["http://b"]) as other:
        closed: bool = other.closed
    await lb.aclose()

    async with ReplicaFleet([ReplicaConfig(speed=0.5, capacity=2)], seed=1) as fleet:
        urls: list[str] = fleet.urls
        served: int = fleet[0].counters.served

    del s, v, d, chunks, r, url, w, region, idle, n, removed, eps, one, flight, p99
    del outcomes, ttft99, cooling, by, cooldowns
    del closed, urls, served


def events(event: lbclient.Event) -> None:
    if isinstance(event, lbclient.MembershipEvent):
        action: str = event.action
        print(action)


class Collect:
    """A :class:`lbclient.Listener`: an object with an ``on_event`` method."""

    def __init__(self) -> None:
        self.cooldowns: list[lbclient.CooldownEvent] = []

    def on_event(self, event: lbclient.Event) -> None:
        if isinstance(event, lbclient.CooldownEvent):
            self.cooldowns.append(event)
        elif isinstance(event, lbclient.AttemptEvent):
            counted: bool = event.counted
            del counted
        elif isinstance(event, lbclient.RetryEvent | lbclient.HedgeEvent):
            delay: float = event.delay
            del delay


watched = lbclient.Balancer(["http://c"], on_event=events)
listened = lbclient.Balancer(["http://c"], on_event=Collect())
both = lbclient.Balancer(["http://c"], on_event=[events, Collect()])
listener: lbclient.Listener = Collect()
clock: lbclient.Clock = FakeClock()
policy: lbclient.Classifier = lbclient.DEFAULT_RETRY_ON
budget = lbclient.Budget(ratio=0.2, min_per_second=10.0)
allowed: bool = budget.try_withdraw()
call = lbclient.CallContext(key="user-1", stream=True)
key: object = call.key

# Fleet-shared state: typed configuration, stats and events.
state = lbclient.RedisState("redis://127.0.0.1:6379/0", namespace="chat", expected_peers=4)
fleet_lb = lbclient.Balancer(["http://c"], breaker=lbclient.Breaker(), shared=state)
fleet_stats = fleet_lb.stats().shared
if fleet_stats is not None:
    fleet_mode: str = fleet_stats.mode
    fleet_peers: int = fleet_stats.peers


def on_fleet(event: lbclient.Event) -> None:
    if isinstance(event, lbclient.FleetEvent):
        action: str = event.action
        where: str | None = event.url
        del action, where


# -- cost-aware routing and the operator's tools --------------------------------------------

priced = lbclient.Balancer(
    [
        lbclient.Endpoint(
            "http://d", metadata={"price_per_1k_input": 0.15, "price_per_1k_output": 0.6}
        )
    ],
    cost=lbclient.CostPolicy(ceiling=50.0, period=3600.0, latency_factor=1.5),
)


async def spend() -> None:
    async with priced.pick(tokens=500) as ep:
        host: str = ep.url
        lbclient.report_usage(400, 80)
    s: lbclient.SpendStats = priced.spend()
    left: float | None = s.left
    total: float = s.total + s.spent + s.reserved
    per: float = s.by_endpoint.get("http://d", 0.0)
    try:
        await priced.call(f, 1)
    except lbclient.Overloaded as exc:
        why: str = exc.reason
        del why
    del host, left, total, per


def operate() -> None:
    from lbclient.ops import (
        CapacityPlanner,
        CostModel,
        Manifests,
        TrafficRecorder,
        load_trace,
        manifests,
        synthetic_trace,
        to_yaml,
    )

    with TrafficRecorder(priced, "traffic.jsonl") as recorder:
        dropped: int = recorder.dropped
    plan = CapacityPlanner(load_trace("traffic.jsonl")).plan(2.0, concurrency=8)
    replicas: int = plan.replicas
    plan2 = CapacityPlanner(synthetic_trace(10.0, 600.0)).plan(4.0)
    text: str = to_yaml(manifests(Manifests(name="llm", image="img", max_replicas=plan2.replicas)))
    monthly: float = CostModel().plan(rps=100).monthly
    del dropped, replicas, text, monthly


async def integrations() -> None:
    """The httpx transport, fallback pools, limits and eligibility, typed."""
    import httpx

    limited = lbclient.Endpoint(
        "http://d",
        metadata={"max_context": 8192, "models": ["m"]},
        limits=lbclient.Limits(max_in_flight=4, requests_per_minute=600, tokens_per_minute=9e4),
    )
    vendor = lbclient.Balancer([limited], name="vendor")
    lb = lbclient.Balancer(["http://e"], fallback=vendor, name="self-hosted")
    chain: lbclient.Balancer | None = lb.fallback

    @lb.route(eligible=lambda ep, model: model in ep.metadata["models"], fallback=False)
    async def complete(endpoint: lbclient.Endpoint, model: str) -> str:
        return endpoint.url

    url: str = await complete("m")
    got: str = await lb.call(complete, "m", eligible=lambda ep: ep.region is None)
    async with lb.pick(eligible=lambda ep: True, fallback=False) as endpoint:
        del endpoint
    transport = lbclient.HTTPTransport(
        lb,
        base_path="/v1",
        tenant=lambda request: request.headers.get("x-user"),
        eligible=lambda ep, request: ep.weight > 0,
        headers=lambda ep: {"Authorization": "Bearer k"},
    )
    async with httpx.AsyncClient(transport=transport) as http:
        del http
    try:
        await complete("m")
    except lbclient.PoolsExhausted as exc:
        pools: tuple[lbclient.PoolFailure, ...] = exc.pools
        when: float | None = exc.retry_after
        del pools, when
    except lbclient.NoEndpointAvailable as exc2:
        why: str = exc2.reason
        del why
    del chain, url, got
