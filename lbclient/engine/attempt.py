"""One attempt: the wrapped function awaited under a lease, its outcome recorded once.

How an attempt ended decides what its lease records, the same way on every path:

* it returned -> ``lease.ok()``;
* it raised an ``Exception`` -> ``lease.fail(exc)`` (which asks the failure classifier
  whether that is the endpoint's fault) and the call remembers it as an
  :class:`~lbclient.Attempt`;
* it was cancelled because the *call's* deadline passed -> ``lease.cut()``: the endpoint
  was too slow, which counts, and the call remembers a ``TimeoutError``;
* it was cancelled for any other reason (the caller, a won hedge race) or raised a
  ``BaseException`` that is not an ``Exception`` -> ``lease.cancel()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from .._errors import Attempt
from ..policies.classify import is_connection_error, status_of

if TYPE_CHECKING:
    from .._context import CallContext
    from ..pool.lease import Lease

__all__ = ["cut_error", "record", "settle", "start"]

R = TypeVar("R")


def cut_error(lease: Lease) -> TimeoutError:
    return TimeoutError(f"attempt on {lease.state.url} still running at the call's deadline")


def start(call: CallContext, lease: Lease) -> None:
    """The call is about to send an attempt under ``lease``."""
    n = call.sent + 1
    call.sent = n
    if n != 1:  # the first is the class default: no per-lease __dict__ for it
        lease.number = n
    call.add_tried(lease.state)
    if call.tracer is not None:
        lease.on_done = call.tracer.attempt(call, lease)


def record(call: CallContext, lease: Lease, error: BaseException, t: float) -> None:
    """Remember a failed attempt in the call (what ``AttemptsExhausted`` will list)."""
    call.add_attempt(
        Attempt(endpoint=lease.endpoint, error=error, duration=t - lease.t0, hedge=lease.hedge)
    )


def settle(call: CallContext | None, lease: Lease, exc: BaseException, t: float) -> None:
    """Record how an attempt that raised ``exc`` ended (see the module docstring)."""
    if isinstance(exc, Exception):
        lease.fail(exc, t)
        if call is not None:
            record(call, lease, exc, t)
            status = status_of(exc)
            if status == 429 or status == 503:
                call.overloaded = call.rejected = True
            elif status is None and is_connection_error(exc):
                call.rejected = True
    elif call is not None and call.expired():
        lease.cut(t)
        record(call, lease, cut_error(lease), t)
    else:
        lease.cancel()
