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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._errors import Attempt
    from .pool.state import EndpointState

__all__ = ["CallContext"]


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
    """

    __slots__ = (
        "attempts",
        "deadline",
        "key",
        "prefix",
        "scope",
        "sent",
        "started",
        "stream",
        "tenant",
        "timeout",
        "tokens",
        "tried",
    )

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
    ) -> None:
        self.key = key
        self.tenant = tenant
        self.tokens = tokens
        self.prefix = prefix
        self.stream = stream
        self.started = started
        self.timeout = timeout
        self.deadline = None if timeout is None else started + timeout
        self.scope: asyncio.Timeout | None = None
        self.tried: set[EndpointState] = set()
        self.attempts: list[Attempt] = []
        self.sent = 0

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
