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
    ├── StreamIdleTimeout(LBError, TimeoutError) a stream went quiet between chunks for too long
    └── Overloaded(LBError)                     shed at admission: ``.reason``, ``.retry_after``
        └── QuotaExceeded(Overloaded)           a tenant over its quota; ``.tenant``
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
    "Overloaded",
    "QuotaExceeded",
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


class Overloaded(LBError):
    """The call was shed at admission, at once, instead of queueing without bound.

    ``reason`` says why: ``"queue full"``, ``"wait exceeded"`` (it waited ``max_wait`` or
    its own deadline without getting a slot, or would have: the queue ahead of it
    drains too slowly), ``"throttled"`` (the fleet itself is rejecting calls: lbclient
    rejects a share locally), ``"quota"`` (see :class:`QuotaExceeded`), ``"budget"`` (a
    cost ceiling), ``"closed"``.  ``retry_after`` is when to come back, in seconds (an
    estimate; ``None`` when unknown).  ``tenant`` is the call's tenant, if it had one.
    """

    def __init__(
        self,
        reason: str,
        message: str | None = None,
        *,
        retry_after: float | None = None,
        tenant: object = None,
    ) -> None:
        self.reason = reason
        self.retry_after = retry_after
        self.tenant = tenant
        text = message or reason
        if retry_after is not None:
            text += f"; retry after {retry_after:.3g} s"
        super().__init__(text)


class QuotaExceeded(Overloaded):
    """A tenant is over its :class:`lbclient.Quota`; ``retry_after`` is when its bucket
    will hold enough again."""
