"""`CallContext`: what travels with one call from the route to every attempt.

Built once per call (not on the plain fast path, which has nothing to carry), it is the
one place where a call's identity and progress live: its affinity key, tenant, estimated
tokens and prompt prefix (what pickers and admission read), its deadline, and what it has
tried so far (the endpoints, and each failed :class:`~lbclient.Attempt` for the error it
may end with).  Pickers receive it as ``pick(call, exclude)`` and may read any field; only
the engine writes it.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._endpoint import Endpoint
    from ._errors import Attempt
    from .pool.state import EndpointState

__all__ = ["ATTEMPT", "CURRENT", "CallContext", "UsageSink", "report_usage"]

_NONE_TRIED: frozenset[Any] = frozenset()
_new = object.__new__


class CallContext:
    """One call in progress.

    * ``key`` -- affinity key (``consistent_hash``), or None.
    * ``tenant`` -- who the call is for (fairness, quotas), or None.
    * ``tokens`` -- estimated token cost, or None (then load is counted in requests).
    * ``prefix`` -- prompt text for prefix-cache affinity, or None.
    * ``stream`` -- True for a streaming call (its latency is time to first chunk).
    * ``started`` -- clock time the call started; ``deadline`` -- clock time it must end
      by (``None``: none); ``scope`` -- the ``asyncio.timeout`` enforcing it.
    * ``tried`` -- endpoints this call has sent an attempt to; ``attempts`` -- each
      failed attempt, in order; ``sent`` -- attempts sent (first, retries and hedges).
    * ``priority`` -- admission order (higher first).
    * ``eligible`` -- the endpoints this call may go to (a predicate on
      :class:`~lbclient.Endpoint`), or None: any.
    * What the engine learns for admission: ``sample`` (the successful attempt's latency,
      or a stream's time to first chunk), ``overloaded`` (an attempt met 429/503),
      ``rejected`` (the fleet refused it: 429/503 or no connection), ``usage`` (real
      ``(input, output)`` tokens, from :func:`report_usage`).
    """

    # The fields every call sets are slots; the rarely set ones read a class default
    # until set (into a lazily made __dict__): building a context is a few stores.
    __slots__ = (
        "__dict__",
        "attempts",
        "deadline",
        "key",
        "sample",
        "sent",
        "served_by",
        "started",
        "stream",
        "tenant",
        "timeout",
        "tokens",
        "tried",
    )

    prefix: str | None = None
    priority = 0
    scope: asyncio.Timeout | None = None
    overloaded = False
    rejected = False
    usage: tuple[float, float] | None = None
    ttft: float | None = None  # a stream's time to first chunk (set for traffic recording)
    tracer: Any = None  # the engine's tracer while spans are on (see lbclient.metrics)
    span: Any = None  # this call's span, parent of its attempts' spans
    eligible: Callable[[Endpoint], bool] | None = None
    limit_until: float | None = None  # how long it may wait for an endpoint under its limits

    def __init__(
        self,
        *,
        key: object = None,
        tenant: object = None,
        tokens: float | None = None,
        prefix: str | None = None,
        stream: bool = False,
        started: float = 0.0,
        timeout: float | None = None,
        priority: int = 0,
    ) -> None:
        self.key = key
        self.tenant = tenant
        self.tokens = tokens
        self.stream = stream
        self.started = started
        self.timeout = timeout
        self.deadline = None if timeout is None else started + timeout
        # Made on first use: most calls never fail or hedge, and a burst of 10,000 waiting
        # calls should not carry 10,000 empty sets and lists (memory, and GC passes).
        self.tried: AbstractSet[EndpointState] = _NONE_TRIED
        self.attempts: Sequence[Attempt] = ()
        self.sent = 0
        self.sample: float | None = None
        self.served_by: str | None = None  # the URL of the endpoint whose answer it got
        if prefix is not None:
            self.prefix = prefix
        if priority:
            self.priority = priority

    @staticmethod
    def keyed(key: object, started: float) -> CallContext:
        """``CallContext(key=key, started=started)`` without the keyword parsing: half
        the cost, for the hedged path's per-call context (a test keeps the two equal)."""
        c = _new(CallContext)
        c.key = key
        c.tenant = None
        c.tokens = None
        c.stream = False
        c.started = started
        c.timeout = None
        c.deadline = None
        c.tried = _NONE_TRIED
        c.attempts = ()
        c.sent = 0
        c.sample = None
        c.served_by = None
        return c

    def add_tried(self, s: EndpointState) -> None:
        """The call sent an attempt to ``s``."""
        tried = self.tried
        if tried is _NONE_TRIED:
            self.tried = {s}
        else:
            tried.add(s)  # type: ignore[attr-defined]

    def add_attempt(self, attempt: Attempt) -> None:
        """A failed attempt of this call."""
        attempts = self.attempts
        if isinstance(attempts, list):
            attempts.append(attempt)
        else:
            self.attempts = [attempt]

    def expired(self) -> bool:
        """Has the call's own deadline cut it off (as opposed to a caller's cancel)?"""
        scope = self.scope
        return scope is not None and scope.expired()

    def left(self, now: float) -> float | None:
        """Seconds to the deadline (may be negative), or None without one."""
        return None if self.deadline is None else self.deadline - now

    def __repr__(self) -> str:
        fields: dict[str, Any] = {"key": self.key, "tenant": self.tenant, "tokens": self.tokens}
        shown = " ".join(f"{k}={v!r}" for k, v in fields.items() if v is not None)
        return f"<CallContext {shown} tried={len(self.tried)} sent={self.sent}>".replace("  ", " ")


CURRENT: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "lbclient_call", default=None
)
"""The call the running code belongs to, while admission or a cost policy needs to hear
about its real token use (the built-in client and the httpx transport report it)."""


class UsageSink(Protocol):
    """Where :func:`report_usage` also writes: one attempt's spend record under a
    :class:`lbclient.CostPolicy` (see :mod:`lbclient.engine.metered`)."""

    usage: tuple[float, float] | None


ATTEMPT: contextvars.ContextVar[UsageSink | None] = contextvars.ContextVar(
    "lbclient_attempt", default=None
)
"""The attempt the running code belongs to, while a cost policy meters it."""


def report_usage(input_tokens: float, output_tokens: float) -> None:
    """Tell lbclient how many tokens the current call really used (e.g. from the
    response's ``usage``), from inside a balanced function::

        lbclient.report_usage(body["usage"]["prompt_tokens"],
                              body["usage"]["completion_tokens"])

    It settles the call's estimate (``tokens=``) in tenant quotas and fairness, and its
    spend under a :class:`lbclient.CostPolicy` (priced per token).  Outside
    a balanced call, or with nothing to settle, it does nothing.  Bad values are ignored
    (a malformed ``usage`` must never fail a call)."""
    call = CURRENT.get()
    attempt = ATTEMPT.get()
    if call is None and attempt is None:
        return
    try:
        pair = (float(input_tokens), float(output_tokens))
    except (TypeError, ValueError):
        return
    if all(math.isfinite(x) and x >= 0 for x in pair):
        if call is not None:
            call.usage = pair
        if attempt is not None:
            attempt.usage = pair
