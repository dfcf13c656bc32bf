"""`lbclient.Endpoint`: normalisation, immutability, and a ConfigError naming every bad
value (url, weight, region, zone, metadata)."""

from __future__ import annotations

import math
import re
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import bad_weights, weights

import lbclient
from lbclient._endpoint import to_endpoint


def named(value: object) -> str:
    """A regex matching ``repr(value)`` inside an error message."""
    return re.escape(repr(value))


# -- good values -------------------------------------------------------------------------


def test_defaults_and_normalisation() -> None:
    ep = lbclient.Endpoint("http://10.0.1.11:8000/")
    assert ep.url == "http://10.0.1.11:8000"
    assert (ep.weight, ep.region, ep.zone, dict(ep.metadata)) == (1.0, None, None, {})
    assert isinstance(ep.weight, float)


def test_labels_are_stripped_and_weight_is_a_float() -> None:
    ep = lbclient.Endpoint("https://h/", weight=2, region=" eu-west-1 ", zone="eu-west-1a ")
    assert ep.weight == 2.0 and isinstance(ep.weight, float)
    assert (ep.region, ep.zone) == ("eu-west-1", "eu-west-1a")


def test_repr_names_the_public_class() -> None:
    ep = lbclient.Endpoint("http://10.0.1.11:8000/", weight=2.0, region="eu-west-1")
    assert repr(ep) == "lbclient.Endpoint('http://10.0.1.11:8000', weight=2.0, region='eu-west-1')"
    assert repr(lbclient.Endpoint("http://a")) == "lbclient.Endpoint('http://a')"
    assert "metadata={'gpu': 'h100'}" in repr(
        lbclient.Endpoint("http://a", metadata={"gpu": "h100"})
    )


def test_frozen_and_evolvable() -> None:
    ep = lbclient.Endpoint("http://a", weight=2.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ep.weight = 3.0  # type: ignore[misc]
    heavier = attrs.evolve(ep, weight=5)
    assert heavier.weight == 5.0 and ep.weight == 2.0
    with pytest.raises(lbclient.ConfigError, match="-1"):
        attrs.evolve(ep, weight=-1)


def test_metadata_is_read_only_copy_and_not_part_of_identity() -> None:
    source = {"gpu": "a100"}
    ep = lbclient.Endpoint("http://a", metadata=source)
    source["gpu"] = "changed"
    assert ep.metadata["gpu"] == "a100"
    with pytest.raises(TypeError):
        ep.metadata["gpu"] = "x"  # type: ignore[index]
    other = lbclient.Endpoint("http://a", metadata={"gpu": "h100"})
    assert ep == other and hash(ep) == hash(other)
    assert lbclient.Endpoint("http://a", weight=2) != lbclient.Endpoint("http://a")


def test_to_endpoint() -> None:
    ep = lbclient.Endpoint("http://a")
    assert to_endpoint(ep) is ep
    assert to_endpoint("http://a/") == ep
    with pytest.raises(lbclient.ConfigError, match=named(42)):
        to_endpoint(42)


@settings(max_examples=50, deadline=None)
@given(w=weights | st.floats(min_value=1e-6, max_value=1e6))
def test_any_weight_from_1e_6_to_1e6_is_accepted(w: float) -> None:
    assert lbclient.Endpoint("http://a", weight=w).weight == w


@settings(max_examples=50, deadline=None)
@given(
    host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    port=st.none() | st.integers(1, 65535),
    scheme=st.sampled_from(["http", "https"]),
    slash=st.booleans(),
)
def test_valid_urls_round_trip(host: str, port: int | None, scheme: str, slash: bool) -> None:
    base = f"{scheme}://{host}" + ("" if port is None else f":{port}")
    ep = lbclient.Endpoint(base + ("/" if slash else ""))
    default = {"http": 80, "https": 443}[scheme]
    assert ep.url == (f"{scheme}://{host}" if port == default else base)
    assert not ep.url.endswith("/")
    assert lbclient.Endpoint(ep.url) == ep  # canonical: a fixed point


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("HTTP://Host.Example:8000/", "http://host.example:8000"),
        ("https://API.example.com:443", "https://api.example.com"),
        ("http://10.0.0.1:80/", "http://10.0.0.1"),
        ("http://10.0.0.1:443", "http://10.0.0.1:443"),  # not http's default port
        ("https://h:80", "https://h:80"),
        ("http://h/v1/", "http://h/v1"),
        ("http://[::1]:8000/", "http://[::1]:8000"),
    ],
)
def test_urls_are_canonical(given: str, canonical: str) -> None:
    assert lbclient.Endpoint(given).url == canonical
    assert lbclient.Endpoint(given) == lbclient.Endpoint(canonical)


def test_two_spellings_of_one_url_are_a_duplicate() -> None:
    with pytest.raises(lbclient.ConfigError, match="duplicate endpoint url 'http://a'"):
        lbclient.Balancer(["HTTP://A:80/", "http://a"])


# -- bad values: every one is a ConfigError (also a ValueError) naming the value ---------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x",
        "http://",
        "https://",
        "10.0.0.1:8000",
        "x",
        "",
        "   ",
        "http://h:99999",
        "http://h:port",
        "grpc://h:1",
        "  http://10.0.1.11:8000/  ",  # whitespace is not stripped: it is an error
        "http://h /v1",
        "http://h\t",
        "http://h\x00",
        "http://h\x7f",
        "http://h/v1?model=x",
        "http://h?",
        "http://h/#frag",
        "http://h#",
        "http://h:0",
    ],
)
def test_bad_url(url: str) -> None:
    with pytest.raises(lbclient.ConfigError, match=named(url)) as info:
        lbclient.Endpoint(url)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("url", [None, 123, b"http://a", ["http://a"]])
def test_url_not_a_str(url: Any) -> None:
    with pytest.raises(lbclient.ConfigError, match=r"url must be a str.*" + named(url)):
        lbclient.Endpoint(url)


def test_scheme_message_says_what_is_allowed() -> None:
    with pytest.raises(
        lbclient.ConfigError, match=r"'ftp://x' must start with http:// or https://"
    ):
        lbclient.Endpoint("ftp://x")
    with pytest.raises(lbclient.ConfigError, match=r"'http://' has no host"):
        lbclient.Endpoint("http://")


@settings(max_examples=50, deadline=None)
@given(w=bad_weights)
def test_bad_weight(w: Any) -> None:
    with pytest.raises(lbclient.ConfigError, match="weight") as info:
        lbclient.Endpoint("http://a", weight=w)
    msg = str(info.value)
    if isinstance(w, float) and math.isnan(w):
        assert "nan" in msg
    else:
        assert repr(w) in msg


@pytest.mark.parametrize(
    "w", [0, -1, float("nan"), float("inf"), "2", True, 1e-7, 1e6 * 1.0001, 1e300]
)
def test_bad_weight_listed(w: Any) -> None:
    with pytest.raises(lbclient.ConfigError, match=r"weight .*" + named(w)):
        lbclient.Endpoint("http://a", weight=w)


@pytest.mark.parametrize("field", ["region", "zone"])
@pytest.mark.parametrize("value", ["", "   ", 3, b"eu"])
def test_bad_labels(field: str, value: Any) -> None:
    with pytest.raises(lbclient.ConfigError, match=rf"endpoint {field} .*" + named(value)):
        lbclient.Endpoint("http://a", **{field: value})


@pytest.mark.parametrize("value", [[("a", 1)], "k=v", 3])
def test_bad_metadata(value: Any) -> None:
    with pytest.raises(lbclient.ConfigError, match=r"metadata must be a mapping.*" + named(value)):
        lbclient.Endpoint("http://a", metadata=value)


def test_none_metadata_is_empty() -> None:
    assert dict(lbclient.Endpoint("http://a", metadata=None).metadata) == {}


def test_keyword_only_fields() -> None:
    with pytest.raises(TypeError):
        lbclient.Endpoint("http://a", 2.0)  # type: ignore[misc]
