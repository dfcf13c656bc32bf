"""DNS discovery against a real DNS server on 127.0.0.1 (dnslib, ephemeral UDP port).

The server runs in a thread; its records live in a lock-protected dict the test edits
while the balancer refreshes, so every lookup goes through dnspython's real asyncio
resolver, the wire format and UDP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSLabel, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

import lbclient
from lbclient.pool.discovery import CallableDiscovery, DnsDiscovery, refresh_once
from lbclient.testing import ReplicaConfig, ReplicaFleet

INTERVAL = 0.2
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# ------------------------------------------------------------------------ a DNS server


class Zone(BaseResolver):  # type: ignore[misc]
    """Records the test changes while the server answers (a dict behind a lock).

    ``records[(name, type)]`` lists rdata objects; ``additional[name]`` lists extra
    records put in the additional section of every answer for ``name``; ``rcode`` set
    to an RCODE answers every query with it (SERVFAIL, NXDOMAIN...).  A name with no
    record of any type answers NXDOMAIN; a known name without the asked type answers
    an empty NOERROR (dnspython's NoAnswer).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], list[Any]] = {}
        self._additional: dict[str, list[RR]] = {}
        self._rcode: int | None = None
        self.queries: list[tuple[str, str]] = []

    @staticmethod
    def _key(name: str) -> str:
        return name.lower().rstrip(".") + "."

    def set(self, name: str, rtype: str, rdatas: list[Any]) -> None:
        with self._lock:
            self._records[(self._key(name), rtype)] = list(rdatas)

    def set_a(self, name: str, *ips: str) -> None:
        self.set(name, "A", [A(ip) for ip in ips])

    def set_srv(self, name: str, *records: tuple[int, int, int, str]) -> None:
        """``(priority, weight, port, target)`` per record."""
        self.set(name, "SRV", [SRV(p, w, port, target) for p, w, port, target in records])

    def add_additional(self, name: str, target: str, *ips: str) -> None:
        with self._lock:
            self._additional.setdefault(self._key(name), []).extend(
                RR(target, QTYPE.A, rdata=A(ip), ttl=0) for ip in ips
            )

    def fail_with(self, rcode: int | None) -> None:
        with self._lock:
            self._rcode = rcode

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        qname: DNSLabel = request.q.qname
        key = self._key(str(qname))
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((key, qtype))
            rcode = self._rcode
            rdatas = list(self._records.get((key, qtype), []))
            known = any(name == key for name, _ in self._records)
            extra = list(self._additional.get(key, []))
        if rcode is not None:
            reply.header.rcode = rcode
        elif not known:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for rdata in rdatas:
                reply.add_answer(RR(qname, getattr(QTYPE, qtype), rdata=rdata, ttl=0))
            for rr in extra:
                reply.add_ar(rr)
        return reply


class DnsServer:
    """A dnslib UDP server on 127.0.0.1:<ephemeral>, serving :class:`Zone`."""

    def __init__(self) -> None:
        self.zone = Zone()
        quiet = DNSLogger("-request,-reply,-truncated,-error", prefix=False)
        self._server = DNSServer(self.zone, port=0, address="127.0.0.1", logger=quiet)
        self.port: int = self._server.server.server_address[1]
        # serve_forever with a short poll interval: stop() returns in ~50 ms, not 0.5 s.
        self._thread = threading.Thread(
            target=self._server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self._stopped = False

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.server.shutdown()
        self._server.server.server_close()
        self._thread.join(timeout=5)

    def discovery(self, name: str, **kw: Any) -> DnsDiscovery:
        kw.setdefault("timeout", 0.5)
        kw.setdefault("interval", INTERVAL)
        if kw.get("record", "A") != "SRV":
            kw.setdefault("port", 8000)
        return DnsDiscovery(name, nameservers=["127.0.0.1"], nameserver_port=self.port, **kw)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


# ----------------------------------------------------------------------------- helpers


async def wait_until(predicate: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {within} s")
        await asyncio.sleep(0.01)


def urls(lb: lbclient.Balancer) -> set[str]:
    return {e.url for e in lb.endpoints}


def requests_by_url(lb: lbclient.Balancer) -> dict[str, int]:
    return {e.url: e.requests for e in lb.stats().endpoints}


async def noop(endpoint: lbclient.Endpoint) -> str:
    return endpoint.url


# ------------------------------------------------------------------------------- tests


async def test_a_records_become_the_balancer_endpoints(dns: DnsServer) -> None:
    dns.zone.set_a("llm.test", "127.0.0.1", "127.0.0.2")
    async with lbclient.Balancer([], discovery=dns.discovery("llm.test")) as lb:
        assert urls(lb) == {"http://127.0.0.1:8000", "http://127.0.0.2:8000"}
        assert await lb.call(noop) in urls(lb)


async def test_aaaa_records_give_bracketed_ipv6_urls(dns: DnsServer) -> None:
    dns.zone.set("llm6.test", "AAAA", [AAAA("::1"), AAAA("fd00::2")])
    discovery = dns.discovery("llm6.test", record="AAAA", port=9000, scheme="https")
    assert {e.url for e in await discovery.resolve()} == {
        "https://[::1]:9000",
        "https://[fd00::2]:9000",
    }


async def test_membership_follows_record_changes_and_survivors_keep_stats(
    dns: DnsServer,
) -> None:
    dns.zone.set_a("llm.test", "127.0.0.1", "127.0.0.2")
    lb = lbclient.Balancer([], discovery=dns.discovery("llm.test"), strategy="round_robin")
    async with lb:
        for _ in range(10):
            await lb.call(noop)
        before = requests_by_url(lb)
        survivor = "http://127.0.0.2:8000"
        survivor_state = lb._pool.members[survivor]
        assert before[survivor] == 5

        dns.zone.set_a("llm.test", "127.0.0.2", "127.0.0.3")  # +.3, -.1
        await wait_until(
            lambda: urls(lb) == {survivor, "http://127.0.0.3:8000"}, within=2 * INTERVAL + 0.2
        )
        after = requests_by_url(lb)
        assert after[survivor] == 5  # statistics survived the refresh
        assert after["http://127.0.0.3:8000"] == 0
        assert lb._pool.members[survivor] is survivor_state


async def test_removed_endpoint_with_a_call_in_flight_drains_then_disappears(
    dns: DnsServer,
) -> None:
    dns.zone.set_a("llm.test", "127.0.0.1", "127.0.0.2")
    release = asyncio.Event()
    leaving = "http://127.0.0.1:8000"

    async def slow(endpoint: lbclient.Endpoint) -> str:
        if endpoint.url == leaving:
            await release.wait()
        return endpoint.url

    lb = lbclient.Balancer([], discovery=dns.discovery("llm.test"), strategy="round_robin")
    async with lb:
        calls = [asyncio.create_task(lb.call(slow)) for _ in range(2)]
        await wait_until(lambda: lb._pool.members[leaving].inflight == 1, within=1.0)

        dns.zone.set_a("llm.test", "127.0.0.2")
        await wait_until(
            lambda: {e.url: e.state for e in lb.stats().endpoints}.get(leaving) == "draining",
            within=2 * INTERVAL + 0.2,
        )
        assert urls(lb) == {leaving, "http://127.0.0.2:8000"}  # still a member: in flight
        for _ in range(6):
            assert await lb.call(slow) == "http://127.0.0.2:8000"  # but never picked

        release.set()
        assert sorted(await asyncio.gather(*calls)) == [leaving, "http://127.0.0.2:8000"]
        await wait_until(lambda: leaving not in urls(lb), within=1.0)
        assert urls(lb) == {"http://127.0.0.2:8000"}


@pytest.mark.parametrize(
    ("failure", "detail"),
    [
        ("servfail", "SERVFAIL"),
        ("nxdomain", "does not exist"),
        ("no-records", "NoAnswer"),
    ],
)
async def test_a_failed_lookup_keeps_the_last_good_set_and_warns(
    dns: DnsServer, caplog: pytest.LogCaptureFixture, failure: str, detail: str
) -> None:
    dns.zone.set_a("llm.test", "127.0.0.1", "127.0.0.2")
    async with lbclient.Balancer([], discovery=dns.discovery("llm.test")) as lb:
        good = urls(lb)
        assert len(good) == 2
        if failure == "servfail":
            dns.zone.fail_with(RCODE.SERVFAIL)
        elif failure == "nxdomain":
            dns.zone.fail_with(RCODE.NXDOMAIN)
        else:
            dns.zone.set_a("llm.test")  # the name exists, with no A record
            dns.zone.set_a("other.test", "127.0.0.9")

        def warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

        with caplog.at_level(logging.WARNING, logger="lbclient"):
            assert await refresh_once(lb._pool, lb._background.discovery) is False  # type: ignore[arg-type]
            # ...and so does the periodic loop.
            await wait_until(lambda: len(warnings()) >= 2, within=2 * INTERVAL + 0.2)
        assert urls(lb) == good
        assert all(
            w.startswith("discovery failed, keeping the last good set of 2 endpoints: ")
            for w in warnings()
        )
        assert detail in warnings()[0]

        dns.zone.fail_with(None)
        dns.zone.set_a("llm.test", "127.0.0.3")
        await wait_until(lambda: urls(lb) == {"http://127.0.0.3:8000"}, within=2 * INTERVAL + 0.2)


async def test_a_stopped_dns_server_keeps_the_last_good_set(
    dns: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    dns.zone.set_a("llm.test", "127.0.0.1")
    discovery = dns.discovery("llm.test", timeout=0.3, interval=60.0)
    async with lbclient.Balancer([], discovery=discovery) as lb:
        assert urls(lb) == {"http://127.0.0.1:8000"}
        dns.stop()
        with caplog.at_level(logging.WARNING, logger="lbclient"):
            t0 = time.monotonic()
            assert await refresh_once(lb._pool, discovery) is False
            assert time.monotonic() - t0 < 2.0
        assert urls(lb) == {"http://127.0.0.1:8000"}
        assert "keeping the last good set of 1 endpoints" in caplog.text
        assert await lb.call(noop) == "http://127.0.0.1:8000"


async def test_srv_records_carry_ports_and_weights(dns: DnsServer) -> None:
    z = dns.zone
    z.set_srv(
        "_http._tcp.llm.test",
        (10, 3, 8001, "a.llm.test."),  # resolved by an A lookup
        (10, 1, 8002, "b.llm.test."),  # two addresses, from the additional section
        (10, 2, 8003, "127.0.0.7."),  # the target is an IP itself
        (10, 0, 8004, "a.llm.test."),  # weight 0 among positive weights: tiny
        (10, 1, 8005, "gone.llm.test."),  # NXDOMAIN: skipped
        (20, 50, 9000, "backup.llm.test."),  # a backup priority: not used
    )
    z.set_a("a.llm.test", "127.0.0.1")
    z.set_a("backup.llm.test", "127.0.0.99")
    z.add_additional("_http._tcp.llm.test", "b.llm.test.", "127.0.0.2", "127.0.0.3")
    discovery = dns.discovery("_http._tcp.llm.test", record="SRV", region="eu-west-1")
    endpoints = {e.url: e for e in await discovery.resolve()}
    assert {url: e.weight for url, e in endpoints.items()} == {
        "http://127.0.0.1:8001": 3.0,
        "http://127.0.0.2:8002": 1.0,
        "http://127.0.0.3:8002": 1.0,
        "http://127.0.0.7:8003": 2.0,
        "http://127.0.0.1:8004": 0.01,
    }
    assert {e.region for e in endpoints.values()} == {"eu-west-1"}
    # b.llm.test came from the additional section: never asked for separately.
    assert ("b.llm.test.", "A") not in z.queries
    assert ("a.llm.test.", "A") in z.queries

    # All weights zero: every endpoint equal.
    z.set_srv("_http._tcp.llm.test", (0, 0, 8001, "a.llm.test."), (0, 0, 8002, "127.0.0.7."))
    assert {e.url: e.weight for e in await discovery.resolve()} == {
        "http://127.0.0.1:8001": 1.0,
        "http://127.0.0.7:8002": 1.0,
    }

    # The balancer takes the weights over, and a weight change, without losing stats.
    async with lbclient.Balancer([], discovery=discovery) as lb:
        await lb.call(noop)
        z.set_srv("_http._tcp.llm.test", (0, 4, 8001, "a.llm.test."), (0, 1, 8002, "127.0.0.7."))
        await wait_until(
            lambda: {e.url: e.weight for e in lb.endpoints}.get("http://127.0.0.1:8001") == 4.0,
            within=2 * INTERVAL + 0.2,
        )
        assert sum(e.requests for e in lb.stats().endpoints) == 1


async def test_srv_with_a_failing_target_lookup_fails_the_refresh(dns: DnsServer) -> None:
    dns.zone.set_srv("_http._tcp.llm.test", (0, 1, 8001, "a.llm.test."))
    dns.zone.set_a("a.llm.test", "127.0.0.1")
    discovery = dns.discovery("_http._tcp.llm.test", record="SRV")
    async with lbclient.Balancer([], discovery=discovery) as lb:
        assert urls(lb) == {"http://127.0.0.1:8001"}
        dns.zone.set_srv("_http._tcp.llm.test", (0, 1, 8001, "gone.llm.test."))
        # Every target gone: the answer is empty, which keeps the last good set.
        assert await refresh_once(lb._pool, discovery) is False
        assert urls(lb) == {"http://127.0.0.1:8001"}


async def test_an_empty_balancer_gets_its_endpoints_from_the_first_refresh(
    dns: DnsServer,
) -> None:
    dns.zone.set_a("llm.test", "127.0.0.1", "127.0.0.2", "127.0.0.3")
    lb = lbclient.Balancer(endpoints=[], discovery=dns.discovery("llm.test", interval=60.0))
    assert lb.endpoints == ()
    async with lb:
        assert len(lb.endpoints) == 3  # before any periodic refresh
        assert await lb.call(noop) in urls(lb)
    assert lb.closed
    assert not lb._background._tasks


async def test_callable_discovery_follows_its_function() -> None:
    current = ["http://127.0.0.1:8000"]
    calls = 0

    async def registry() -> list[str]:
        nonlocal calls
        calls += 1
        return list(current)

    lb = lbclient.Balancer([], discovery=CallableDiscovery(registry, interval=0.05))
    async with lb:
        assert urls(lb) == {"http://127.0.0.1:8000"}
        current[:] = ["http://127.0.0.1:8000", "http://127.0.0.2:8000"]
        await wait_until(lambda: len(lb.endpoints) == 2, within=0.5)
        current[:] = ["http://127.0.0.2:8000"]
        await wait_until(lambda: urls(lb) == {"http://127.0.0.2:8000"}, within=0.5)
    seen = calls
    await asyncio.sleep(0.12)
    assert calls == seen  # closed: no more refreshes


async def test_end_to_end_calls_reach_a_fleet_discovered_by_srv(
    dns: DnsServer, http: aiohttp.ClientSession
) -> None:
    configs = [ReplicaConfig(base_latency=0.002, sigma=0) for _ in range(3)]
    async with ReplicaFleet(configs) as fleet:
        ports = [r.port for r in fleet]
        dns.zone.set_a("replicas.llm.test", "127.0.0.1")
        dns.zone.set_srv("_http._tcp.llm.test", *((0, 1, p, "replicas.llm.test.") for p in ports))
        lb = lbclient.Balancer(
            [], discovery=dns.discovery("_http._tcp.llm.test", record="SRV"), strategy="round_robin"
        )

        @lb.route
        async def complete(endpoint: lbclient.Endpoint) -> str:
            async with http.post(endpoint.url + CHAT, json=BODY) as resp:
                resp.raise_for_status()
                await resp.json()
                return resp.headers["x-replica"]

        async with lb:
            assert urls(lb) == set(fleet.urls)
            names = await asyncio.gather(*(complete() for _ in range(30)))
            assert sorted(set(names)) == ["replica-0", "replica-1", "replica-2"]
            assert [r.counters.served for r in fleet] == [10, 10, 10]

            # Scale in: replica 2 leaves the SRV set; calls stop going there.
            dns.zone.set_srv(
                "_http._tcp.llm.test", *((0, 1, p, "replicas.llm.test.") for p in ports[:2])
            )
            await wait_until(lambda: urls(lb) == set(fleet.urls[:2]), within=2 * INTERVAL + 0.2)
            fleet.reset_counters()
            names = await asyncio.gather(*(complete() for _ in range(20)))
            assert set(names) == {"replica-0", "replica-1"}
            assert fleet[2].counters.received == 0
