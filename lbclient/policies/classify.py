"""Error classification: is this failure worth a retry, and is it the endpoint's fault?

lbclient wraps *your* call, so it sees whatever your HTTP stack raises: aiohttp, httpx,
or an LLM SDK such as openai.  None of them is imported here: their exceptions are
recognised by shape and class name (aiohttp's through ``sys.modules``, since an aiohttp
error cannot exist unless aiohttp was imported), so ``import lbclient`` stays light and
never pins their versions.

Two questions are asked of every failed attempt:

* **Retry?** :func:`is_retryable` -- the default ``retry_on=``.  Connection errors,
  timeouts and the transient statuses in :data:`RETRYABLE_STATUSES` are retried;
  everything else (a 400 is still a 400 on the next replica) is not.
* **Blame the endpoint?** :func:`is_endpoint_failure` -- the breaker's default.  Any
  failure counts against the endpoint except the caller's own mistakes (4xx other than
  408/429, see :func:`is_caller_error`): a client sending malformed prompts must not eject
  healthy replicas.

``asyncio.CancelledError`` (and every other ``BaseException`` that is not an
``Exception``) is never retryable and never the endpoint's fault: cancelling is the
caller's decision, and retrying it would make the call impossible to stop.  Errors
lbclient raises itself (:class:`lbclient.LBError`, e.g. ``DeadlineExceeded``, which is a
``TimeoutError``) are neither either.

Retry predicates compose (:class:`Classifier`)::

    retry_on = lbclient.retry_if_status(503) | lbclient.retry_if_exception(ConnectionError)
    retry_on = lbclient.DEFAULT_RETRY_ON & ~lbclient.retry_if_status(500)
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import attrs

from .._errors import ConfigError, LBError
from .._numbers import is_int

__all__ = [
    "DEFAULT_RETRY_ON",
    "RETRYABLE_STATUSES",
    "Classifier",
    "ClassifierLike",
    "error_kind",
    "headers_of",
    "is_caller_error",
    "is_connection_error",
    "is_endpoint_failure",
    "is_retryable",
    "is_timeout",
    "retry_after",
    "retry_if",
    "retry_if_exception",
    "retry_if_status",
    "status_of",
    "to_classifier",
]

RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504, 529})
"""Statuses worth another try: request timeout, rate limited, and the 5xx an overloaded or
restarting inference server returns (529: Anthropic's API is overloaded).  501/505 (will
never work) are deliberately absent."""

_RETRY_AFTER_STATUSES = frozenset({429, 503})  # RFC 9110 §10.2.3: meaningful with these

# Matched by class name anywhere in the MRO (httpx, httpcore, openai and SDKs built the same
# way, e.g. anthropic), so those libraries need not be importable.
_CONNECTION_NAMES = frozenset(
    {
        "ConnectError",  # httpx / httpcore
        "ReadError",
        "WriteError",
        "RemoteProtocolError",
        "NetworkError",
        "TransportError",
        "APIConnectionError",  # openai / anthropic (APITimeoutError subclasses it)
    }
)
# httpx TransportErrors that are our own bug, not the network's: retrying cannot help.
_LOCAL_TRANSPORT_NAMES = frozenset({"UnsupportedProtocol", "LocalProtocolError"})
_TIMEOUT_NAMES = frozenset({"TimeoutException", "APITimeoutError"})  # httpx, openai
_STDLIB = sys.stdlib_module_names


def _getattr(obj: object, name: str) -> Any:
    # Some exceptions raise from properties (httpx's RequestError.request when unset).
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _http_status(value: object) -> int | None:
    if is_int(value) and 100 <= value <= 599:
        return value
    return None


def _mro_names(exc: BaseException) -> set[str]:
    # Only classes outside the standard library: stdlib network errors are OSErrors anyway,
    # and names like tarfile.ReadError / shutil.ReadError must not look like httpx's.
    return {
        cls.__name__ for cls in type(exc).__mro__ if cls.__module__.partition(".")[0] not in _STDLIB
    }


def status_of(exc: BaseException) -> int | None:
    """The HTTP status carried by ``exc``, or None.

    Recognised shapes: ``exc.status_code`` (openai ``APIStatusError``), ``exc.status``
    (``aiohttp.ClientResponseError``, ``urllib.error.HTTPError``) and
    ``exc.response.status_code`` (httpx ``HTTPStatusError``, requests ``HTTPError``).
    Only an ``int`` in 100..599 counts, so an unrelated exception that happens to have a
    ``status`` attribute (a string, an enum, a process exit code object) is not mistaken
    for an HTTP response.
    """
    for value in (
        _getattr(exc, "status_code"),
        _getattr(exc, "status"),
        _getattr(_getattr(exc, "response"), "status_code"),
    ):
        status = _http_status(value)
        if status is not None:
            return status
    return None


def headers_of(exc: BaseException) -> Mapping[str, str] | None:
    """The response headers carried by ``exc`` (aiohttp ``exc.headers``; httpx and openai
    ``exc.response.headers``), or None when there are none or they are not a mapping."""
    for headers in (_getattr(exc, "headers"), _getattr(_getattr(exc, "response"), "headers")):
        if isinstance(headers, Mapping):
            return headers
    return None


def _header(headers: Mapping[str, str], name: str) -> object:
    value = headers.get(name)  # case-insensitive for aiohttp's and httpx's header types
    if value is not None:
        return value
    lowered = name.lower()
    for key, item in headers.items():  # a plain dict with another spelling
        if isinstance(key, str) and key.lower() == lowered:
            return item
    return None


def _header_text(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value as text (bytes decoded as latin-1), stripped; None if absent or
    blank."""
    value = _header(headers, name)
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    return value.strip() or None


def retry_after(exc: BaseException, now_wall: float | None = None) -> float | None:
    """Seconds the server asked us to wait (``Retry-After``), or None.

    Only honoured on 429 and 503, where RFC 9110 gives it meaning.  ``retry-after-ms``
    (milliseconds, as OpenAI's and Azure's APIs send it) wins when present; otherwise
    ``Retry-After`` is either seconds (``"2"``, ``"1.5"``) or an HTTP-date, read relative
    to ``now_wall`` (Unix seconds, default ``time.time()``; pass it in tests).  A date in
    the past or negative seconds give 0; anything unparsable, NaN or infinite gives None
    (a garbled header must not stall the retry loop).
    """
    if status_of(exc) not in _RETRY_AFTER_STATUSES:
        return None
    headers = headers_of(exc)
    if headers is None:
        return None
    ms = _header_text(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
    text = _header_text(headers, "Retry-After")
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        # "-0000" (and obsolete zone names) parse as naive; HTTP-dates are always GMT.
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - (time.time() if now_wall is None else now_wall)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def is_connection_error(exc: BaseException) -> bool:
    """True when the transport failed: nothing (or a broken) response came back.

    Covers ``OSError`` (``ConnectionError``, refused, reset, DNS) except plain timeouts
    (see :func:`is_timeout`), ``aiohttp.ClientConnectionError`` (server disconnected,
    connector errors), ``aiohttp.ClientPayloadError`` (body cut short), and by class name
    httpx's ``ConnectError``/``ReadError``/``WriteError``/``RemoteProtocolError``/
    ``NetworkError``/``TransportError`` and openai's ``APIConnectionError``.  httpx's
    ``UnsupportedProtocol`` and ``LocalProtocolError`` are excluded: they are our bug.
    """
    if isinstance(exc, LBError):
        return False
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(
        exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError
    ):
        return True
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        return True
    names = _mro_names(exc)
    return not names.isdisjoint(_CONNECTION_NAMES) and names.isdisjoint(_LOCAL_TRANSPORT_NAMES)


def is_timeout(exc: BaseException) -> bool:
    """True for an I/O timeout: ``TimeoutError`` (so ``asyncio.TimeoutError`` and
    aiohttp's ``ServerTimeoutError``), httpx ``TimeoutException``, openai
    ``APITimeoutError``.  Never for lbclient's own ``DeadlineExceeded`` /
    ``StreamIdleTimeout``: they are TimeoutErrors too, but the time they measure is gone
    and a retry cannot bring it back."""
    if isinstance(exc, LBError):
        return False
    if isinstance(exc, TimeoutError):
        return True
    return not _mro_names(exc).isdisjoint(_TIMEOUT_NAMES)


def is_retryable(exc: BaseException) -> bool:
    """The default retry policy (``DEFAULT_RETRY_ON``).

    * never ``CancelledError``, ``KeyboardInterrupt`` or any non-``Exception``;
    * never an :class:`lbclient.LBError` (lbclient's own verdicts are final);
    * a response with a status: retry only the statuses in :data:`RETRYABLE_STATUSES`
      (the status wins, so ``urllib``'s ``HTTPError`` 404, an ``OSError``, is not retried);
    * no status: retry connection errors and timeouts, nothing else (a ``ValueError``
      from your own parsing code would fail the same way on every replica).
    """
    if not isinstance(exc, Exception) or isinstance(exc, LBError):
        return False
    status = status_of(exc)
    if status is not None:
        return status in RETRYABLE_STATUSES
    return is_connection_error(exc) or is_timeout(exc)


def is_caller_error(exc: BaseException) -> bool:
    """True for a 4xx other than 408/429: the request itself is bad (malformed, unauthorised,
    unknown model, context too long), so it is the caller's fault, not the endpoint's."""
    status = status_of(exc)
    return status is not None and 400 <= status <= 499 and status not in (408, 429)


def is_endpoint_failure(exc: BaseException) -> bool:
    """The breaker's default: does this failure count against the endpoint?

    Yes for what only the endpoint (or the network to it) can cause: connection errors
    (:func:`is_connection_error`), timeouts (:func:`is_timeout`), and HTTP 5xx, 408 and
    429 -- a replica that sheds load should get less of it.  No for anything else: a 4xx
    other than 408/429 (the request was bad), an exception raised by your own code (a
    ``KeyError`` parsing the answer fails the same way on every replica), lbclient's own
    errors, and ``CancelledError`` (the caller gave up; the endpoint did nothing wrong).
    """
    if not isinstance(exc, Exception) or isinstance(exc, LBError):
        return False
    status = status_of(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return is_connection_error(exc) or is_timeout(exc)


def error_kind(exc: BaseException) -> str:
    """A short label for what kind of failure ``exc`` is, for counters and metrics:
    ``"status 503"``, ``"connection"``, ``"timeout"`` or ``"other"``."""
    status = status_of(exc)
    if status is not None:
        return f"status {status}"
    if is_timeout(exc):
        return "timeout"
    if is_connection_error(exc):
        return "connection"
    return "other"


# -- composable predicates ---------------------------------------------------------------

_OR, _AND, _NOT, _ATOM = 1, 2, 3, 4  # Python's operator precedence: | < & < ~ < atom


def _describe(predicate: object) -> str:
    name = getattr(predicate, "__qualname__", None)
    return name if isinstance(name, str) else repr(predicate)


@attrs.frozen(repr=False)
class Classifier:
    """A retry predicate with a readable repr, composable with ``|``, ``&`` and ``~``.

    >>> lbclient.retry_if_status(503) | lbclient.retry_if_exception(ConnectionError)
    lbclient.retry_if_status(503) | lbclient.retry_if_exception(ConnectionError)

    Calling it with an exception answers "retry?".  It only ever answers for an
    ``Exception``: ``CancelledError``, ``KeyboardInterrupt`` and other ``BaseException``
    give False whatever the predicate (even under ``~``), so no classifier can make a
    cancelled call retry forever.  The other operand of ``|``/``&`` may be anything
    :func:`to_classifier` accepts (an exception type, a tuple of them, a callable).
    """

    predicate: Callable[[Exception], bool]
    description: str = attrs.field(default="")
    _precedence: int = attrs.field(default=_ATOM, kw_only=True, eq=False)

    def __attrs_post_init__(self) -> None:
        if not callable(self.predicate):
            raise ConfigError(f"Classifier predicate must be callable, got {self.predicate!r}")
        if not self.description:
            object.__setattr__(self, "description", _describe(self.predicate))

    def __call__(self, exc: BaseException) -> bool:
        if not isinstance(exc, Exception):
            return False
        return bool(self.predicate(exc))

    def _operand(self, precedence: int) -> str:
        return self.description if self._precedence >= precedence else f"({self.description})"

    def __or__(self, other: ClassifierLike) -> Classifier:
        return _binary(self, to_classifier(other), _OR)

    def __ror__(self, other: ClassifierLike) -> Classifier:
        return _binary(to_classifier(other), self, _OR)

    def __and__(self, other: ClassifierLike) -> Classifier:
        return _binary(self, to_classifier(other), _AND)

    def __rand__(self, other: ClassifierLike) -> Classifier:
        return _binary(to_classifier(other), self, _AND)

    def __invert__(self) -> Classifier:
        inner = self

        def negated(exc: Exception) -> bool:
            return not inner(exc)

        return Classifier(negated, f"~{self._operand(_NOT)}", precedence=_NOT)

    def __repr__(self) -> str:
        return self.description


def _binary(left: Classifier, right: Classifier, op: int) -> Classifier:
    if op == _OR:

        def either(exc: Exception) -> bool:
            return left(exc) or right(exc)

        predicate, symbol = either, "|"
    else:

        def both(exc: Exception) -> bool:
            return left(exc) and right(exc)

        predicate, symbol = both, "&"
    description = f"{left._operand(op)} {symbol} {right._operand(op)}"
    return Classifier(predicate, description, precedence=op)


ClassifierLike: TypeAlias = (
    Classifier | type[BaseException] | tuple[type[BaseException], ...] | Callable[[Exception], bool]
)
"""What ``retry_on=`` accepts; :func:`to_classifier` turns it into a :class:`Classifier`."""

_NEVER_RETRYABLE = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)


def retry_if_exception(*types: type[BaseException]) -> Classifier:
    """Retry when the error is an instance of one of ``types``.

    ``CancelledError``, ``KeyboardInterrupt``, ``SystemExit`` and ``GeneratorExit`` are
    refused (ConfigError): they are never retryable.
    """
    if not types:
        raise ConfigError("retry_if_exception() needs at least one exception type, got none")
    for tp in types:
        if not (isinstance(tp, type) and issubclass(tp, BaseException)):
            raise ConfigError(f"retry_if_exception() takes exception types, got {tp!r}")
        if issubclass(tp, _NEVER_RETRYABLE):
            raise ConfigError(f"{tp.__qualname__} is never retryable; got {tp!r}")
    description = "lbclient.retry_if_exception({})".format(", ".join(t.__qualname__ for t in types))

    def matches(exc: Exception) -> bool:
        return isinstance(exc, types)

    return Classifier(matches, description)


def retry_if_status(*codes: int) -> Classifier:
    """Retry when the error carries one of the HTTP status ``codes`` (see :func:`status_of`)."""
    if not codes:
        raise ConfigError("retry_if_status() needs at least one status code, got none")
    for code in codes:
        if _http_status(code) is None:
            raise ConfigError(f"retry_if_status() takes HTTP status ints 100..599, got {code!r}")
    wanted = frozenset(codes)
    description = "lbclient.retry_if_status({})".format(", ".join(str(c) for c in codes))

    def matches(exc: Exception) -> bool:
        return status_of(exc) in wanted

    return Classifier(matches, description)


def retry_if(predicate: Callable[[Exception], bool]) -> Classifier:
    """Retry when ``predicate(exc)`` is true (any callable taking the exception)."""
    if isinstance(predicate, Classifier):
        return predicate
    if not callable(predicate) or isinstance(predicate, type):
        raise ConfigError(f"retry_if() takes a callable predicate, got {predicate!r}")
    return Classifier(predicate, f"lbclient.retry_if({_describe(predicate)})")


def to_classifier(value: ClassifierLike) -> Classifier:
    """Normalise a ``retry_on=`` value: a :class:`Classifier` as is, an exception type or a
    tuple of them via :func:`retry_if_exception`, any other callable via :func:`retry_if`.
    Anything else is a ConfigError naming it."""
    if isinstance(value, Classifier):
        return value
    if isinstance(value, type):
        if not issubclass(value, BaseException):
            raise ConfigError(f"retry_on must be an exception type or predicate, got {value!r}")
        return retry_if_exception(value)
    if isinstance(value, tuple):
        return retry_if_exception(*value)
    if callable(value):
        return retry_if(value)
    raise ConfigError(
        f"retry_on must be an exception type, a tuple of them, a Classifier or a callable "
        f"predicate, got {value!r}"
    )


DEFAULT_RETRY_ON = Classifier(is_retryable, "lbclient.DEFAULT_RETRY_ON")
"""Retry connection errors, timeouts and 408/429/500/502/503/504 (:func:`is_retryable`)."""
