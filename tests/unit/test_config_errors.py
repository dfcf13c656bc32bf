"""Configuration mistakes fail at construction with a ConfigError naming the value
(Foundation v2, defect 11)."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest

import lbclient
from lbclient import strategies

URL = "http://10.0.0.1:8000"


def _raises(fragment: str) -> Any:
    return pytest.raises(lbclient.ConfigError, match=fragment)


# -- endpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://h:8000/v1?key=secret", "query"),
        ("http://h:8000#frag", "fragment"),
        ("http://h:8000 ", "whitespace"),
        (" http://h:8000", "whitespace"),
        ("http://h :8000", "whitespace"),
        ("http://h:8000\n", "whitespace"),
        ("http://h\x00:8000", "control character"),
        ("http://h:0", "port 0"),
        ("http://h:70000", "out of range"),
        ("ftp://h", "http:// or https://"),
        ("http://:80", "no host"),
    ],
)
def test_bad_urls_name_the_value(url: str, why: str) -> None:
    with _raises(why) as info:
        lbclient.Endpoint(url)
    assert repr(url) in str(info.value)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("HTTP://Host.Example:80/", "http://host.example"),
        ("https://h:443/v1/", "https://h/v1"),
        ("http://h:08000", "http://h:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_urls_are_canonical(given: str, canonical: str) -> None:
    assert lbclient.Endpoint(given).url == canonical


@pytest.mark.parametrize(
    "pair",
    [
        ["http://A:8000", "http://a:8000"],
        ["http://a:80", "http://a"],
        ["https://a:443/", "HTTPS://A"],
    ],
)
def test_duplicates_that_differ_only_in_spelling_are_refused(pair: list[str]) -> None:
    with _raises("duplicate endpoint url"):
        lbclient.Balancer(pair)


def test_a_dict_of_endpoints_is_refused_rather_than_dropping_its_weights() -> None:
    with _raises("not a mapping") as info:
        lbclient.Balancer({URL: 3.0, "http://10.0.0.2:8000": 1.0})  # type: ignore[arg-type]
    assert "3.0" in str(info.value)


@pytest.mark.parametrize("weight", [1e308, math.inf, 1e7, 1e-9, 0.0, -1.0, math.nan])
def test_weights_out_of_range_are_refused(weight: float) -> None:
    with _raises("weight"):
        lbclient.Endpoint(URL, weight=weight)


def test_extreme_but_valid_weights_build_a_sound_hash_ring() -> None:
    eps = [lbclient.Endpoint(URL, weight=1e6)] + [
        lbclient.Endpoint(f"http://10.0.1.{i}:8000", weight=1e-6) for i in range(20)
    ]
    lb = lbclient.Balancer(eps, strategy="consistent_hash")
    picker = lb._pool.snap.picker
    assert picker is not None
    for k in range(200):
        assert picker.pick(lbclient.CallContext(key=f"user-{k}"), None) is not None


# -- a class where an instance is meant -----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"strategy": strategies.PowerOfTwo}, "strategy=PowerOfTwo()"),
        ({"health": lbclient.HealthCheck}, "health=lbclient.HealthCheck()"),
        ({"retry": lbclient.Retry}, "retry=lbclient.Retry()"),
        ({"breaker": lbclient.Breaker}, "breaker=lbclient.Breaker()"),
        ({"hedge": lbclient.Hedge}, "hedge=lbclient.Hedge()"),
        ({"geo": lbclient.GeoTable}, "geo=lbclient.GeoTable()"),
        ({"region": "us-east-1", "locality": lbclient.Locality}, "locality=lbclient.Locality()"),
        ({"discovery": lbclient.StaticDiscovery}, "not the class"),
        ({"on_event": lbclient.Listener}, "on_event"),
    ],
)
def test_a_class_instead_of_an_instance_is_named(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(lbclient.ConfigError) as info:
        lbclient.Balancer([URL], **kwargs)
    assert fragment in str(info.value)


def test_on_event_takes_callables_listeners_and_lists() -> None:
    seen: list[object] = []

    class Collect(lbclient.Listener):
        def on_event(self, event: lbclient.Event) -> None:
            seen.append(event)

    lb = lbclient.Balancer([URL], on_event=[Collect(), seen.append])
    lb.add("http://10.0.0.2:8000")
    assert len(seen) == 2  # once per listener
    with _raises("on_event"):
        lbclient.Balancer([URL], on_event=42)


# -- routes and calls accept the same callables ----------------------------------------------


async def _async_fn(ep: lbclient.Endpoint, x: int = 0) -> int:
    return x


class _AsyncCallable:
    async def __call__(self, ep: lbclient.Endpoint, x: int = 0) -> int:
        return x + 1


def _plain(ep: lbclient.Endpoint, x: int = 0) -> int:
    return x


@pytest.mark.parametrize(
    "fn",
    [_async_fn, _AsyncCallable(), functools.partial(_async_fn, x=2)],
    ids=["async def", "async __call__", "partial"],
)
async def test_route_and_call_accept_the_same_async_callables(fn: Any) -> None:
    lb = lbclient.Balancer([URL])
    routed = lb.route(fn)
    assert await routed() == await lb.call(fn)


@pytest.mark.parametrize(
    "fn",
    [_plain, lambda ep: _async_fn(ep), _AsyncCallable, 42],
    ids=["plain def", "lambda returning a coroutine", "a class", "not callable"],
)
async def test_route_and_call_refuse_the_same_non_async_callables(fn: Any) -> None:
    lb = lbclient.Balancer([URL])
    with pytest.raises(lbclient.ConfigError):
        lb.route(fn)
    with pytest.raises(lbclient.ConfigError):
        await lb.call(fn)


@pytest.mark.parametrize("value", [math.nan, -1, 0, math.inf, "1"])
def test_idle_timeout_is_checked_on_any_function(value: object) -> None:
    lb = lbclient.Balancer([URL])
    with _raises("idle_timeout"):
        lb.route(idle_timeout=value)(_async_fn)  # type: ignore[arg-type]


def test_idle_timeout_on_a_plain_function_is_refused() -> None:
    lb = lbclient.Balancer([URL])
    with _raises("streaming routes"):
        lb.route(idle_timeout=5.0)(_async_fn)


# -- absurd intervals --------------------------------------------------------------------------


def test_intervals_that_would_spin_the_event_loop_are_refused() -> None:
    with _raises("at least 0.01"):
        lbclient.CallableDiscovery(lambda: [URL], interval=1e-9)
    with _raises("at least 0.01"):
        lbclient.HealthCheck(interval=0.001)
    with _raises("max_cooldown"):
        lbclient.Breaker(cooldown=10.0, max_cooldown=1.0)
    with _raises("ewma_decay"):
        lbclient.Balancer([URL], ewma_decay=1e-6)


# -- what the docs name is exported -----------------------------------------------------------


def test_documented_names_are_exported() -> None:
    assert lbclient.DEFAULT_RETRY_ON is lbclient.Retry().retry_on
    budget = lbclient.Budget(ratio=0.1, min_per_second=0.0, ttl=10.0)
    assert budget.try_withdraw() is False
    assert "DEFAULT_RETRY_ON" in lbclient.__all__ and "Budget" in lbclient.__all__
