"""The public surface: ``lbclient.__all__`` is deliberate, every name resolves, public
classes say ``lbclient.X``, importing lbclient stays light, and typed usage passes
``mypy --strict`` (tests/typing/api.py)."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tempfile

import pytest

import lbclient

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Changing this list is an API change: update it on purpose, with a CHANGELOG entry.
EXPECTED_ALL = [
    "DEFAULT_RETRY_ON",
    "Admission",
    "AdmissionEvent",
    "Attempt",
    "AttemptEvent",
    "AttemptsExhausted",
    "Balancer",
    "BalancerClosed",
    "BalancerStats",
    "Breaker",
    "BreakerEvent",
    "Budget",
    "CallContext",
    "CallableDiscovery",
    "Classifier",
    "Clock",
    "ConfigError",
    "CooldownEvent",
    "CostPolicy",
    "DeadlineExceeded",
    "Discovery",
    "DnsDiscovery",
    "DrainResult",
    "Endpoint",
    "EndpointStats",
    "Event",
    "FleetEvent",
    "GeoTable",
    "HTTPTransport",
    "HealthCheck",
    "Hedge",
    "HedgeEvent",
    "LBError",
    "Limits",
    "Listener",
    "Locality",
    "MembershipEvent",
    "MetricsPoller",
    "MonotonicClock",
    "NoEndpointAvailable",
    "Overloaded",
    "PanicEvent",
    "PoolFailure",
    "PoolsExhausted",
    "Quota",
    "QuotaExceeded",
    "RedisState",
    "Retry",
    "RetryEvent",
    "ServerMetrics",
    "SpendStats",
    "StaticDiscovery",
    "StreamIdleTimeout",
    "UnknownEndpoint",
    "__version__",
    "prompt_text",
    "report_usage",
    "retry_if",
    "retry_if_exception",
    "retry_if_status",
]


def _isort_style(name: str) -> tuple[int, str]:
    """ruff's RUF022 order for ``__all__``: CONSTANTS, then Classes, then the rest."""
    if name.isupper():
        return 0, name
    if name[:1].isupper():
        return 1, name
    return 2, name


def test_all_is_the_expected_list() -> None:
    assert sorted(lbclient.__all__, key=_isort_style) == EXPECTED_ALL


def test_all_is_sorted_and_unique() -> None:
    assert list(lbclient.__all__) == sorted(set(lbclient.__all__), key=_isort_style)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_every_name_resolves(name: str) -> None:
    assert getattr(lbclient, name) is not None


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from lbclient import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(lbclient.__all__)


@pytest.mark.parametrize(
    "name", [n for n in EXPECTED_ALL if isinstance(getattr(lbclient, n, None), type)]
)
def test_public_classes_live_in_lbclient(name: str) -> None:
    cls = getattr(lbclient, name)
    assert cls.__module__ == "lbclient"
    assert f"{cls.__module__}.{cls.__qualname__}" == f"lbclient.{name}"


def test_the_classes_we_expect_are_classes() -> None:
    for name in ["Balancer", "Endpoint", "Retry", "Breaker", "Hedge", "ConfigError", "Locality"]:
        assert isinstance(getattr(lbclient, name), type), name


@pytest.mark.parametrize(
    ("obj", "prefix"),
    [
        (lbclient.Endpoint("http://a"), "lbclient.Endpoint("),
        (lbclient.Retry(), "lbclient.Retry("),
        (lbclient.Breaker(), "lbclient.Breaker("),
        (lbclient.Hedge(), "lbclient.Hedge("),
        (lbclient.MonotonicClock(), "lbclient.MonotonicClock("),
        (lbclient.Balancer(["http://a"]), "<lbclient.Balancer "),
        (lbclient.DEFAULT_RETRY_ON, "lbclient.DEFAULT_RETRY_ON"),
        (lbclient.Budget(), "lbclient.Budget("),
    ],
)
def test_reprs_name_the_public_module(obj: object, prefix: str) -> None:
    assert repr(obj).startswith(prefix)


def test_exception_tree() -> None:
    e = lbclient
    assert issubclass(e.ConfigError, e.LBError) and issubclass(e.ConfigError, ValueError)
    assert issubclass(e.BalancerClosed, e.LBError) and issubclass(e.BalancerClosed, RuntimeError)
    assert issubclass(e.UnknownEndpoint, e.LBError) and issubclass(e.UnknownEndpoint, LookupError)
    assert issubclass(e.DeadlineExceeded, e.LBError) and issubclass(
        e.DeadlineExceeded, TimeoutError
    )
    assert issubclass(e.StreamIdleTimeout, TimeoutError)
    for name in ["NoEndpointAvailable", "AttemptsExhausted"]:
        assert issubclass(getattr(e, name), e.LBError)


def test_version() -> None:
    assert isinstance(lbclient.__version__, str)
    assert lbclient.__version__.count(".") >= 2


def test_py_typed_is_shipped() -> None:
    assert (pathlib.Path(lbclient.__file__).parent / "py.typed").is_file()


def test_import_stays_light() -> None:
    """Optional extras (rich, matplotlib, prometheus_client, dnspython, httpx) load lazily."""
    extras = "('rich','matplotlib','prometheus_client','dns','dnslib','httpx','httpx2','openai')"
    code = f"import lbclient, sys; print([m for m in {extras} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_typed_usage_passes_mypy_strict() -> None:
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "mypy",
                "--strict",
                "--cache-dir",
                cache,
                str(pathlib.Path("tests", "typing", "api.py")),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    assert out.returncode == 0, out.stdout + out.stderr
