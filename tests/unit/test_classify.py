"""Error classification: duck-typed statuses, Retry-After, retryability, composition."""

from __future__ import annotations

import asyncio
import email.utils
import tarfile
import urllib.error
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from lbclient._errors import (
    AttemptsExhausted,
    ConfigError,
    DeadlineExceeded,
    NoEndpointAvailable,
    StreamIdleTimeout,
)
from lbclient.policies.classify import (
    DEFAULT_RETRY_ON,
    RETRYABLE_STATUSES,
    Classifier,
    headers_of,
    is_caller_error,
    is_connection_error,
    is_endpoint_failure,
    is_retryable,
    is_timeout,
    retry_after,
    retry_if,
    retry_if_exception,
    retry_if_status,
    status_of,
    to_classifier,
)

# -- fakes shaped like httpx / openai exceptions (neither library is imported) ------------


class _Response:
    def __init__(self, status_code: int, headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status_code
        self.headers = dict(headers or {})


class HTTPStatusError(Exception):  # httpx.HTTPStatusError: .response.status_code
    def __init__(self, status_code: int, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status_code}")
        self.request = object()
        self.response = _Response(status_code, headers)


class APIError(Exception):  # openai.APIError
    pass


class APIStatusError(APIError):  # openai.APIStatusError: .status_code and .response
    def __init__(self, status_code: int, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"Error code: {status_code}")
        self.response = _Response(status_code, headers)
        self.status_code = status_code


class RateLimitError(APIStatusError):
    pass


class APIConnectionError(APIError):  # openai
    pass


class APITimeoutError(APIConnectionError):  # openai: a timeout is a connection error there
    pass


class TransportError(Exception):  # httpx hierarchy, by name
    pass


class NetworkError(TransportError):
    pass


class ReadError(NetworkError):
    pass


class ConnectError(NetworkError):
    pass


class RemoteProtocolError(TransportError):
    pass


class TimeoutException(TransportError):
    pass


class ReadTimeout(TimeoutException):
    pass


class UnsupportedProtocol(TransportError):
    pass


def aiohttp_error(status: int, headers: Any = None) -> Exception:
    info = aiohttp.RequestInfo(
        URL("http://10.0.0.1:8000/v1/chat/completions"),
        "POST",
        CIMultiDictProxy(CIMultiDict()),
        URL("http://10.0.0.1:8000/v1/chat/completions"),
    )
    return aiohttp.ClientResponseError(
        request_info=info, history=(), status=status, headers=headers
    )


# -- status_of / headers_of --------------------------------------------------------------


def test_status_from_real_aiohttp_error() -> None:
    exc = aiohttp_error(503, {"Retry-After": "2"})
    assert status_of(exc) == 503
    headers = headers_of(exc)
    assert headers is not None and headers["Retry-After"] == "2"
    assert retry_after(exc) == 2.0


def test_aiohttp_multidict_headers_are_case_insensitive() -> None:
    exc = aiohttp_error(429, CIMultiDictProxy(CIMultiDict({"retry-after": "7"})))
    assert retry_after(exc) == 7.0


def test_status_from_httpx_and_openai_shapes() -> None:
    assert status_of(HTTPStatusError(502)) == 502
    assert status_of(APIStatusError(429)) == 429
    assert status_of(RateLimitError(429)) == 429
    assert headers_of(HTTPStatusError(503, {"Retry-After": "1"})) == {"Retry-After": "1"}
    assert headers_of(APIStatusError(429, {"retry-after": "3"})) == {"retry-after": "3"}


def test_status_from_urllib_http_error() -> None:
    exc = urllib.error.HTTPError("http://x", 404, "Not Found", None, None)  # type: ignore[arg-type]
    assert status_of(exc) == 404
    assert not is_retryable(exc)  # an OSError, but the status decides


class _Odd(Exception):
    def __init__(self, status: Any = None, status_code: Any = None, response: Any = None) -> None:
        super().__init__("odd")
        self.status = status
        self.status_code = status_code
        self.response = response


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("x"),
        _Odd(status="503"),
        _Odd(status=True),
        _Odd(status=42),
        _Odd(status_code=600),
        _Odd(status_code=503.0),
        _Odd(response="not a response"),
        _Odd(response=_Response(status_code=-1)),
    ],
)
def test_status_ignores_unrelated_attributes(exc: BaseException) -> None:
    assert status_of(exc) is None
    assert not is_caller_error(exc)


def test_status_survives_raising_property() -> None:
    class Sneaky(Exception):
        @property
        def response(self) -> Any:
            raise RuntimeError("no response set")

    assert status_of(Sneaky()) is None
    assert headers_of(Sneaky()) is None


def test_headers_must_be_a_mapping() -> None:
    assert headers_of(_Odd(response=_Response(503))) == {}
    exc = _Odd()
    exc.headers = "Retry-After: 2"  # type: ignore[attr-defined]
    assert headers_of(exc) is None
    assert headers_of(aiohttp_error(503)) is None


# -- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("2", 2.0), (" 1.5 ", 1.5), ("0", 0.0), ("-5", 0.0), ("120", 120.0)],
)
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert retry_after(APIStatusError(429, {"Retry-After": value})) == expected
    assert retry_after(HTTPStatusError(503, {"retry-after": value})) == expected


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    future = email.utils.formatdate(now + 30, usegmt=True)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert retry_after(aiohttp_error(503, {"Retry-After": future}), now_wall=now) == 30.0
    assert retry_after(aiohttp_error(429, {"Retry-After": past}), now_wall=now) == 0.0
    # "-0000" parses as a naive datetime: still read as GMT.
    naive = email.utils.formatdate(now + 10).replace("+0000", "-0000")
    assert retry_after(HTTPStatusError(503, {"Retry-After": naive}), now_wall=now) == 10.0


@pytest.mark.parametrize("value", ["soon", "", "   ", "nan", "inf", "-inf", "Mon, 99 Foo"])
def test_retry_after_garbage(value: str) -> None:
    assert retry_after(APIStatusError(429, {"Retry-After": value})) is None


@pytest.mark.parametrize("status", [200, 400, 404, 500, 502, 504])
def test_retry_after_only_for_429_and_503(status: int) -> None:
    assert retry_after(APIStatusError(status, {"Retry-After": "2"})) is None


def test_retry_after_missing() -> None:
    assert retry_after(APIStatusError(429)) is None
    assert retry_after(ConnectionResetError()) is None


# -- connection errors, timeouts ---------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(),
        ConnectionResetError(),
        OSError("network unreachable"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectionError(),
        aiohttp.ClientPayloadError("truncated"),
        ReadError(),
        ConnectError(),
        RemoteProtocolError(),
        NetworkError(),
        APIConnectionError(),
    ],
)
def test_connection_errors(exc: BaseException) -> None:
    assert is_connection_error(exc)
    assert is_retryable(exc)
    assert is_endpoint_failure(exc)


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        aiohttp.ServerTimeoutError(),
        aiohttp.ConnectionTimeoutError(),
        aiohttp.SocketTimeoutError(),
        ReadTimeout(),
        APITimeoutError(),
    ],
)
def test_timeouts(exc: BaseException) -> None:
    assert is_timeout(exc)
    assert is_retryable(exc)
    assert is_endpoint_failure(exc)


def test_plain_timeout_is_not_a_connection_error() -> None:
    assert not is_connection_error(TimeoutError())


@pytest.mark.parametrize(
    "exc",
    [
        ValueError(),
        KeyError("choices"),
        tarfile.ReadError(),  # stdlib classes named like httpx's do not count
        UnsupportedProtocol(),  # our bug, not the network's
    ],
)
def test_not_connection_errors(exc: BaseException) -> None:
    assert not is_connection_error(exc)
    assert not is_timeout(exc)
    assert not is_retryable(exc)


# -- retryability and blame --------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(RETRYABLE_STATUSES))
def test_retryable_statuses(status: int) -> None:
    for exc in (aiohttp_error(status), HTTPStatusError(status), APIStatusError(status)):
        assert is_retryable(exc)
        assert DEFAULT_RETRY_ON(exc)
        assert is_endpoint_failure(exc)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_caller_errors_are_not_retryable(status: int) -> None:
    for exc in (aiohttp_error(status), HTTPStatusError(status), APIStatusError(status)):
        assert not is_retryable(exc)
        assert is_caller_error(exc)
        assert not is_endpoint_failure(exc)


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_retryable_and_count_against_the_endpoint(status: int) -> None:
    exc = APIStatusError(status)
    assert is_retryable(exc)
    assert not is_caller_error(exc)
    assert is_endpoint_failure(exc)


@pytest.mark.parametrize("status", [501, 505, 300, 200])
def test_other_statuses_not_retryable(status: int) -> None:
    assert not is_retryable(APIStatusError(status))
    assert not is_caller_error(APIStatusError(status))


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.CancelledError(),
        KeyboardInterrupt(),
        SystemExit(1),
        DeadlineExceeded(5.0),
        StreamIdleTimeout("idle"),
        NoEndpointAvailable("empty"),
        AttemptsExhausted([]),
    ],
)
def test_never_retryable(exc: BaseException) -> None:
    assert not is_retryable(exc)
    assert not is_timeout(exc)
    assert not is_connection_error(exc)
    assert not is_endpoint_failure(exc)
    assert not DEFAULT_RETRY_ON(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad json from server"),
        RuntimeError("bug"),
        KeyError("choices"),
        Exception("plain"),
    ],
)
def test_the_callers_own_exceptions_are_neither_endpoint_failures_nor_retryable(
    exc: Exception,
) -> None:
    # Only connection errors, timeouts, 5xx, 408 and 429 are the endpoint's fault: an
    # exception from the caller's own code fails the same way on every replica.
    assert not is_endpoint_failure(exc)
    assert not is_retryable(exc)


# -- Classifier composition --------------------------------------------------------------


def test_composition_or_and_not() -> None:
    on_503 = retry_if_status(503)
    on_conn = retry_if_exception(ConnectionError)
    either = on_503 | on_conn
    assert either(APIStatusError(503)) and either(ConnectionResetError())
    assert not either(APIStatusError(502))
    both = DEFAULT_RETRY_ON & ~retry_if_status(500)
    assert both(APIStatusError(502))
    assert not both(APIStatusError(500))
    assert not both(ValueError())
    assert (~on_503)(ValueError())
    assert not (~on_503)(APIStatusError(503))


def test_composition_reprs() -> None:
    on_503 = retry_if_status(503)
    on_conn = retry_if_exception(ConnectionError)
    assert repr(on_503 | on_conn) == (
        "lbclient.retry_if_status(503) | lbclient.retry_if_exception(ConnectionError)"
    )
    assert repr((on_503 | on_conn) & ~on_503) == (
        "(lbclient.retry_if_status(503) | lbclient.retry_if_exception(ConnectionError))"
        " & ~lbclient.retry_if_status(503)"
    )
    assert repr(on_503 & on_conn | on_503) == (
        "lbclient.retry_if_status(503) & lbclient.retry_if_exception(ConnectionError)"
        " | lbclient.retry_if_status(503)"
    )
    assert repr(~(on_503 | on_conn)) == (
        "~(lbclient.retry_if_status(503) | lbclient.retry_if_exception(ConnectionError))"
    )
    assert repr(retry_if_status(502, 503)) == "lbclient.retry_if_status(502, 503)"
    assert repr(DEFAULT_RETRY_ON) == "lbclient.DEFAULT_RETRY_ON"


def test_composition_with_plain_types_and_callables() -> None:
    combined = retry_if_status(503) | ConnectionError
    assert combined(ConnectionResetError())
    reflected = ConnectionError | retry_if_status(503)
    assert isinstance(reflected, Classifier)
    assert reflected(APIStatusError(503))
    anded = (lambda e: "overloaded" in str(e)) & retry_if_exception(RuntimeError)
    assert anded(RuntimeError("overloaded"))
    assert not anded(RuntimeError("fine"))


def test_cancelled_never_retryable_whatever_the_classifier_says() -> None:
    cancelled = asyncio.CancelledError()
    for classifier in (
        retry_if(lambda e: True),
        ~retry_if_status(503),
        ~~retry_if(lambda e: True),
        retry_if_exception(Exception) | retry_if(lambda e: True),
        to_classifier(lambda e: True),
    ):
        assert not classifier(cancelled)
        assert not classifier(KeyboardInterrupt())


def test_retry_if_exception_and_status() -> None:
    assert retry_if_exception(KeyError, IndexError)(IndexError())
    assert not retry_if_exception(KeyError)(ValueError())
    assert retry_if_status(429)(aiohttp_error(429))
    assert not retry_if_status(429)(ValueError())


def test_retry_if_predicate_result_is_bool() -> None:
    def marker(exc: Exception) -> bool:
        return "x" in str(exc)

    classifier = retry_if(marker)
    assert classifier(ValueError("x")) is True
    assert classifier(ValueError("y")) is False
    assert "marker" in repr(classifier)
    assert retry_if(classifier) is classifier


def test_to_classifier_accepts() -> None:
    assert to_classifier(DEFAULT_RETRY_ON) is DEFAULT_RETRY_ON
    assert to_classifier(ConnectionError)(ConnectionResetError())
    by_tuple = to_classifier((KeyError, ConnectionError))
    assert by_tuple(KeyError()) and by_tuple(ConnectionResetError())
    assert to_classifier(is_retryable)(APIStatusError(503))


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (None, "None"),
        ("ConnectionError", "'ConnectionError'"),
        (503, "503"),
        (int, "<class 'int'>"),
        ((), "got none"),
        ((KeyError, "x"), "'x'"),
        (asyncio.CancelledError, "CancelledError"),
        ((KeyboardInterrupt,), "KeyboardInterrupt"),
    ],
)
def test_to_classifier_rejects(value: Any, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        to_classifier(value)
    assert named in str(info.value)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: retry_if_status(), "got none"),
        (lambda: retry_if_status(99), "99"),
        (lambda: retry_if_status(600), "600"),
        (lambda: retry_if_status("503"), "'503'"),  # type: ignore[arg-type]
        (lambda: retry_if_status(True), "True"),
        (lambda: retry_if_exception(), "got none"),
        (lambda: retry_if_exception(ValueError()), "ValueError()"),  # type: ignore[arg-type]
        (lambda: retry_if(42), "42"),  # type: ignore[arg-type]
        (lambda: retry_if(ValueError), "ValueError"),  # type: ignore[arg-type]
        (lambda: Classifier(42), "42"),  # type: ignore[arg-type]
    ],
)
def test_constructor_errors_name_the_value(call: Any, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        call()
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)
