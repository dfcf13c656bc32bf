"""The one exception tree of lbclient.

Everything lbclient raises on its own account derives from :class:`LBError`;
an error raised by *your* wrapped call reaches you unchanged unless lbclient
had to combine several of them (then :class:`AttemptsExhausted` carries each
one, chained to the last).

::

    LBError
    ├── ConfigError(LBError, ValueError)        bad configuration, at construction
    ├── BalancerClosed(LBError, RuntimeError)   use after ``aclose()`` (a Balancer or a ChatClient)
    ├── UnknownEndpoint(LBError, LookupError)   ``remove``/``drain`` of a URL not in the pool
    ├── NoEndpointAvailable(LBError)            nothing pickable (all removed, draining or ejected)
    ├── AttemptsExhausted(LBError)              every attempt failed; ``.attempts`` lists them
    ├── DeadlineExceeded(LBError, TimeoutError) the call's overall ``timeout=`` ran out
    └── StreamIdleTimeout(LBError, TimeoutError) a stream went quiet between chunks for too long
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from ._endpoint import Endpoint

__all__ = [
    "Attempt",
    "AttemptsExhausted",
    "BalancerClosed",
    "ConfigError",
    "DeadlineExceeded",
    "LBError",
    "NoEndpointAvailable",
    "StreamIdleTimeout",
    "UnknownEndpoint",
]


class LBError(Exception):
    """Root of every exception lbclient raises on its own account."""


class ConfigError(LBError, ValueError):
    """A configuration value is invalid; the message names the value."""


class BalancerClosed(LBError, RuntimeError):
    """A balancer (or an ``lbclient.http.ChatClient``) was used after ``aclose()``."""


class UnknownEndpoint(LBError, LookupError):
    """A URL named in ``remove``/``drain``/``undrain`` is not in the pool."""


class NoEndpointAvailable(LBError):
    """No endpoint can be picked: the pool is empty, draining, every one is ejected, or
    every one is cooling down after ``Retry-After`` -- then ``retry_after`` says in how
    many seconds the first comes back (else it is None)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@attrs.frozen(kw_only=True)
class Attempt:
    """One attempt of a call: where it went, how it ended and how long it took (seconds)."""

    endpoint: Endpoint | None
    error: BaseException
    duration: float
    hedge: bool = False

    def __str__(self) -> str:
        where = self.endpoint.url if self.endpoint is not None else "<no endpoint>"
        kind = "hedge" if self.hedge else "attempt"
        return f"{kind} on {where} failed after {self.duration * 1000:.1f} ms: {self.error!r}"


class AttemptsExhausted(LBError):
    """Every attempt of a call failed (or no further attempt was allowed).

    ``attempts`` lists each attempt in order (endpoint, error, duration); the
    exception is chained (``__cause__``) to the last error.
    """

    def __init__(self, attempts: Sequence[Attempt], reason: str = "all attempts failed") -> None:
        self.attempts: tuple[Attempt, ...] = tuple(attempts)
        self.reason = reason
        lines = "; ".join(str(a) for a in self.attempts)
        super().__init__(f"{reason} ({len(self.attempts)} attempt(s)): {lines}")

    @property
    def last_error(self) -> BaseException | None:
        return self.attempts[-1].error if self.attempts else None


class DeadlineExceeded(LBError, TimeoutError):
    """The call's overall deadline (``timeout=``) passed; ``.attempts`` lists what was tried."""

    def __init__(self, timeout: float, attempts: Sequence[Attempt] = ()) -> None:
        self.timeout = timeout
        self.attempts: tuple[Attempt, ...] = tuple(attempts)
        tried = "; ".join(str(a) for a in self.attempts) or "no attempt finished"
        super().__init__(f"deadline of {timeout:g} s exceeded: {tried}")


class StreamIdleTimeout(LBError, TimeoutError):
    """A committed stream produced no chunk for ``idle_timeout`` seconds."""
