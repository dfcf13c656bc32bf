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
    ├── NoEndpointAvailable(LBError)            nothing pickable (all removed, draining or ejected,
    │                                           at their limits, or none eligible); ``.reason``
    ├── AttemptsExhausted(LBError)              every attempt failed; ``.attempts`` lists them
    │   └── PoolsExhausted(AttemptsExhausted)   no pool of a fallback chain could serve the call;
    │                                           ``.pools`` says what each one tried
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
    "PoolFailure",
    "PoolsExhausted",
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
    """No endpoint can be picked for the call.  ``reason`` says why:

    * ``"cooling"`` -- every one is cooling down after ``Retry-After``;
    * ``"limits"`` -- every one the call may go to is at its :class:`lbclient.Limits`;
    * ``"ineligible"`` -- none may take this call: refused by the route's ``eligible=``,
      or the call's estimated tokens exceed their ``max_context`` (the message counts
      each);
    * ``"empty"``, ``"draining"``, ``"ejected"``, ``"closed"`` -- the pool itself.

    ``retry_after`` says in how many seconds the first endpoint comes back (cooling, or
    the first limit to free) -- else it is None."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, reason: str = "ejected"
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason


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


@attrs.frozen(kw_only=True)
class PoolFailure:
    """What one pool of a fallback chain did with a call: its ``pool`` name and the
    ``error`` it ended with (its attempts are ``attempts``)."""

    pool: str
    error: BaseException

    @property
    def attempts(self) -> tuple[Attempt, ...]:
        found = getattr(self.error, "attempts", ())
        return tuple(found) if isinstance(found, tuple | list) else ()

    def __str__(self) -> str:
        return f"pool {self.pool!r}: {self.error}"


class PoolsExhausted(AttemptsExhausted):
    """No pool of a fallback chain (``Balancer(fallback=...)``) could serve the call.

    ``pools`` lists each pool in the order tried, with the error it ended with
    (:class:`PoolFailure`); ``attempts`` is every attempt of every pool, in order;
    ``retry_after`` the soonest any pool said it could take the call again (None when
    none said).  Chained (``__cause__``) to the last pool's error.
    """

    def __init__(self, pools: Sequence[PoolFailure]) -> None:
        self.pools: tuple[PoolFailure, ...] = tuple(pools)
        attempts = [a for p in self.pools for a in p.attempts]
        waits = [
            w
            for p in self.pools
            if isinstance(w := getattr(p.error, "retry_after", None), int | float)
        ]
        self.retry_after: float | None = min(waits) if waits else None
        reason = f"no pool could serve the call ({len(self.pools)} pools)"
        super().__init__(attempts, reason)
        lines = "; ".join(str(p) for p in self.pools)
        self.args = (f"{reason}: {lines}",)


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
