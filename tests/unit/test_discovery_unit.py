"""Discovery providers without a network: validation, the refresh rule (a failure keeps
the last good set), callables sync and async, and the periodic loop on a fake clock."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest

import lbclient
from lbclient._errors import ConfigError
from lbclient.pool.discovery import (
    CallableDiscovery,
    Discovery,
    DnsDiscovery,
    StaticDiscovery,
    _srv_weights,
    discovery_loop,
    refresh_once,
    refresh_retrying,
)
from lbclient.testing import FakeClock

A = "http://10.0.0.1:8000"
B = "http://10.0.0.2:8000"
C = "http://10.0.0.3:8000"


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        (("",), {"port": 80}, "''"),
        (("   ",), {"port": 80}, "'   '"),
        ((42,), {"port": 80}, "42"),
        (("http://llm.test:8000",), {"port": 80}, "'http://llm.test:8000'"),
        (("a" * 64 + ".test",), {"port": 80}, "a" * 64),
        (("llm..test",), {"port": 80}, "'llm..test'"),
        (("llm.test",), {"port": 80, "record": "MX"}, "'MX'"),
        (("llm.test",), {"port": 80, "record": None}, "None"),
        (("llm.test",), {}, "port is required for record='A'"),
        (("llm.test",), {"port": 0}, "port must be an int in 1..65535, got 0"),
        (("llm.test",), {"port": 70000}, "70000"),
        (("llm.test",), {"port": "80"}, "'80'"),
        (("llm.test",), {"port": True}, "True"),
        (("_http._tcp.llm.test",), {"record": "SRV", "port": 80}, "must be None for record='SRV'"),
        (("llm.test",), {"port": 80, "interval": 0}, "interval must be a number of seconds > 0"),
        (("llm.test",), {"port": 80, "interval": -1.0}, "-1.0"),
        (("llm.test",), {"port": 80, "interval": math.nan}, "nan"),
        (("llm.test",), {"port": 80, "scheme": "ftp"}, "'ftp'"),
        (("llm.test",), {"port": 80, "nameservers": "127.0.0.1"}, "'127.0.0.1'"),
        (("llm.test",), {"port": 80, "nameservers": ["dns.local"]}, "'dns.local'"),
        (("llm.test",), {"port": 80, "nameservers": []}, "must not be empty"),
        (("llm.test",), {"port": 80, "nameserver_port": 0}, "nameserver_port"),
        (("llm.test",), {"port": 80, "nameserver_port": 5353}, "pass nameservers="),
        (("llm.test",), {"port": 80, "timeout": 0}, "timeout must be a finite number > 0, got 0"),
        (("llm.test",), {"port": 80, "timeout": math.inf}, "inf"),
        (("llm.test",), {"port": 80, "weight": -2}, "weight must be a finite number > 0, got -2"),
        (("llm.test",), {"port": 80, "region": ""}, "region must be a non-empty str"),
        (("llm.test",), {"port": 80, "zone": 3}, "zone must be a non-empty str or None, got 3"),
    ],
)
def test_dns_discovery_rejects_bad_values_naming_them(
    args: tuple[Any, ...], kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        DnsDiscovery(*args, **kwargs)
    assert named in str(info.value)
    assert "DnsDiscovery" in str(info.value)


def test_dns_discovery_normalises_and_reprs() -> None:
    d = DnsDiscovery(" llm.test. ", port=8000, record="aaaa", scheme="HTTPS", interval=5)
    assert (d.name, d.record, d.scheme, d.interval) == ("llm.test.", "AAAA", "https", 5.0)
    assert repr(d) == (
        "lbclient.DnsDiscovery('llm.test.', port=8000, scheme='https', record='AAAA', interval=5.0)"
    )
    srv = DnsDiscovery("_http._tcp.llm.test", record="SRV", nameservers=["::1", "10.0.0.53"])
    assert srv.port is None
    assert srv.nameservers == ("::1", "10.0.0.53")
    assert isinstance(srv, Discovery)
    assert DnsDiscovery("llm.test", port=1, interval=math.inf).interval == math.inf


def test_dns_discovery_without_dnspython_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "dns" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"pip install 'lbclient\[dns\]'"):
        DnsDiscovery("llm.test", port=8000)


def test_import_lbclient_does_not_import_dnspython() -> None:
    code = (
        "import sys, lbclient, lbclient.pool.discovery; "
        "lbclient.pool.discovery.DnsDiscovery('llm.test', port=1); "
        "sys.exit(1 if any(m == 'dns' or m.startswith('dns.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_srv_weight_mapping() -> None:
    assert _srv_weights([0, 0, 0]) == [1.0, 1.0, 1.0]
    assert _srv_weights([10, 0, 30]) == [10.0, 0.1, 30.0]
    assert _srv_weights([5]) == [5.0]
    assert _srv_weights([]) == []


def test_static_discovery() -> None:
    d = StaticDiscovery([A, lbclient.Endpoint(B, weight=2)])
    assert d.interval == math.inf
    assert [e.url for e in d.endpoints] == [A, B]
    assert isinstance(d, Discovery)
    assert repr(d) == f"lbclient.StaticDiscovery({[A, B]!r})"
    assert asyncio.run(d.resolve()) == d.endpoints
    with pytest.raises(ConfigError, match=r"got \[\]"):
        StaticDiscovery([])
    with pytest.raises(ConfigError, match="'ftp://x'"):
        StaticDiscovery(["ftp://x"])
    with pytest.raises(ConfigError, match="duplicate endpoint url"):
        StaticDiscovery([A, A + "/"])
    with pytest.raises(ConfigError, match="list of URLs"):
        StaticDiscovery(A)  # type: ignore[arg-type]


def test_callable_discovery_validation() -> None:
    with pytest.raises(ConfigError, match="needs a callable, got 'http://x'"):
        CallableDiscovery("http://x")
    with pytest.raises(ConfigError, match=r"CallableDiscovery interval .* got 0"):
        CallableDiscovery(list, interval=0)
    with pytest.raises(ConfigError, match="got True"):
        CallableDiscovery(list, interval=True)
    d = CallableDiscovery(list, interval=2)
    assert d.interval == 2.0
    assert isinstance(d, Discovery)
    assert repr(d) == "lbclient.CallableDiscovery(list, interval=2.0)"


async def test_callable_discovery_takes_sync_and_async_functions() -> None:
    def sync() -> list[str]:
        return [A, B]

    async def asynchronous() -> tuple[lbclient.Endpoint, ...]:
        return (lbclient.Endpoint(C, region="eu-west-1"),)

    assert await CallableDiscovery(sync).resolve() == [A, B]
    assert await CallableDiscovery(asynchronous).resolve() == [
        lbclient.Endpoint(C, region="eu-west-1")
    ]
    # A plain function that returns an awaitable is awaited too.
    assert await CallableDiscovery(lambda: asynchronous()).resolve() == [
        lbclient.Endpoint(C, region="eu-west-1")
    ]
    with pytest.raises(TypeError, match="must return a list"):
        await CallableDiscovery(lambda: A).resolve()


# -------------------------------------------------------------------- refresh_once


class Scripted:
    """A provider that answers from a script: a list to return or an exception."""

    def __init__(self, *answers: Sequence[lbclient.Endpoint | str] | BaseException) -> None:
        self.answers = list(answers)
        self.interval = 10.0
        self.calls = 0

    async def resolve(self) -> Sequence[lbclient.Endpoint | str]:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def __repr__(self) -> str:
        return "Scripted()"


@pytest.mark.parametrize(
    ("bad", "detail"),
    [
        (RuntimeError("registry down"), "RuntimeError: registry down"),
        (TimeoutError(), "TimeoutError: (no message)"),
        ([], "no endpoints in the answer"),
        (["not a url"], "ConfigError"),
        ([42], "ConfigError"),
    ],
)
async def test_refresh_once_keeps_the_last_good_set(
    caplog: pytest.LogCaptureFixture, bad: Any, detail: str
) -> None:
    provider = Scripted([A, B], bad)
    lb = lbclient.Balancer([], discovery=provider)
    assert await refresh_once(lb._pool, provider) is True
    state = lb._pool.members[A]
    with caplog.at_level(logging.WARNING, logger="lbclient"):
        assert await refresh_once(lb._pool, provider) is False
    assert [e.url for e in lb.endpoints] == [A, B]
    assert lb._pool.members[A] is state
    (record,) = [r for r in caplog.records if r.name == "lbclient"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "discovery failed, keeping the last good set of 2 endpoints: Scripted(): "
    )
    assert detail in record.getMessage()
    await lb.aclose()


async def test_refresh_once_syncs_membership_and_keeps_stats() -> None:
    provider = Scripted([A, B], [B, lbclient.Endpoint(C, weight=2)])
    lb = lbclient.Balancer([], discovery=provider)
    await refresh_once(lb._pool, provider)
    survivor = lb._pool.members[B]
    assert await refresh_once(lb._pool, provider) is True
    assert [e.url for e in lb.endpoints] == [B, C]
    assert lb._pool.members[B] is survivor
    assert lb.endpoints[1].weight == 2.0
    await lb.aclose()


async def test_refresh_once_lets_cancellation_through() -> None:
    provider = Scripted(asyncio.CancelledError())
    lb = lbclient.Balancer([A], discovery=provider)
    with pytest.raises(asyncio.CancelledError):
        await refresh_once(lb._pool, provider)
    await lb.aclose()


async def test_refresh_once_on_a_closed_balancer_does_nothing() -> None:
    provider = Scripted([B])
    lb = lbclient.Balancer([A], discovery=provider)
    await lb.aclose()
    assert await refresh_once(lb._pool, provider) is False
    assert provider.calls == 0


# --------------------------------------------------------------------- the loop


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_discovery_loop_refreshes_on_the_balancer_clock_and_survives_failures(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    provider = Scripted([A], RuntimeError("flaky"), [A, B], [C])
    lb = lbclient.Balancer([], discovery=provider, clock=clock)
    await lb.start()  # the first refresh, then the loop
    assert [e.url for e in lb.endpoints] == [A]
    await settle()
    assert clock.slept == [10.0]
    assert provider.calls == 1

    clock.advance(9.9)
    await settle()
    assert provider.calls == 1  # not yet
    with caplog.at_level(logging.WARNING, logger="lbclient"):
        clock.advance(0.1)
        await settle()
    assert provider.calls == 2
    assert [e.url for e in lb.endpoints] == [A]  # the failure kept the set
    assert "flaky" in caplog.text

    clock.advance(10)
    await settle()
    assert [e.url for e in lb.endpoints] == [A, B]
    clock.advance(10)
    await settle()
    assert [e.url for e in lb.endpoints] == [C]

    await lb.aclose()
    assert not lb._background._tasks
    calls = provider.calls
    clock.advance(100)
    await settle()
    assert provider.calls == calls


async def test_discovery_loop_stops_at_once_for_an_infinite_interval(clock: FakeClock) -> None:
    lb = lbclient.Balancer([], discovery=StaticDiscovery([A]), clock=clock)
    await lb.start()
    await settle()
    assert [e.url for e in lb.endpoints] == [A]
    assert clock.slept == []
    assert not lb._background._tasks  # the loop returned
    await lb.aclose()


async def test_a_balancer_started_by_its_first_call_refreshes_at_once(
    clock: FakeClock,
) -> None:
    provider = Scripted([A, B])
    lb = lbclient.Balancer([], discovery=provider, clock=clock)

    async def fn(endpoint: lbclient.Endpoint) -> None:
        await asyncio.sleep(0)

    with pytest.raises(lbclient.NoEndpointAvailable):
        await lb.call(fn)  # starts the background work
    await settle()
    assert [e.url for e in lb.endpoints] == [A, B]  # no need to wait for the interval
    assert provider.calls == 1
    await lb.aclose()


# A short interval makes the backoff start below 1 s: it must not use a deprecated
# tenacity argument (warnings are errors here), or every periodic refresh would fail.
@pytest.mark.parametrize("interval", [0.05, 0.2, 1.0, 7.9])
async def test_a_short_interval_refresh_works_and_warns_nothing(
    clock: FakeClock, interval: float
) -> None:
    provider = Scripted(RuntimeError("blip"), [A, B])
    lb = lbclient.Balancer([C], discovery=provider, clock=clock)
    clock.auto_advance = True
    assert await refresh_retrying(lb._pool, provider, interval) is True  # after one retry
    assert [e.url for e in lb.endpoints] == [A, B]
    assert provider.calls == 2
    await lb.aclose()


async def test_discovery_loop_returns_when_the_balancer_is_closed(clock: FakeClock) -> None:
    provider = Scripted([A])
    lb = lbclient.Balancer([B], discovery=provider, clock=clock)
    await lb.aclose()
    await discovery_loop(lb._pool, provider)  # returns at once
    assert provider.calls == 0
