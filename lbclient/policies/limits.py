"""`Limits`: how much one endpoint may be sent (frozen).  The counting lives in
:mod:`lbclient.pool.limits`."""

from __future__ import annotations

from typing import Any

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number

__all__ = ["WINDOW", "Limits"]

WINDOW = 60.0
"""Seconds of the sliding window ``requests_per_minute`` and ``tokens_per_minute`` count."""


def _positive(name: str, *, integer: bool = False) -> Any:
    def check(_i: object, _a: object, value: object) -> None:
        if value is None:
            return
        if not is_number(value) or (integer and not is_int(value)) or value <= 0:
            what = "an int >= 1" if integer else "a finite number > 0"
            raise ConfigError(f"Limits {name} must be {what} or None, got {value!r}")

    return check


@attrs.frozen(kw_only=True, repr=False)
class Limits:
    """What one endpoint may be sent: LiteLLM's per-deployment ``rpm``/``tpm`` and
    ``max_parallel_requests``, for a replica or a vendor account that has them.

    >>> lbclient.Endpoint("https://api.vendor.com/v1",
    ...                   limits=lbclient.Limits(requests_per_minute=500,
    ...                                          tokens_per_minute=200_000))

    * ``max_in_flight`` -- attempts running there at once (hedges and retries count).
    * ``requests_per_minute`` -- attempts started there in any 60-second window.
    * ``tokens_per_minute`` -- estimated tokens of the attempts started there in any
      60-second window: a call's ``tokens=`` estimate is counted when it is sent, and
      replaced by its real usage when the answer says (``report_usage``, the built-in
      client and the httpx transport do).  A call whose estimate alone exceeds it never
      goes there.

    An endpoint at a limit is not picked while another can take the call.  When every
    endpoint is at its limit, a call under :class:`lbclient.Admission` waits for one
    (up to ``max_wait`` or its deadline), woken as soon as a slot frees; without
    admission it fails at once with :class:`lbclient.NoEndpointAvailable`, whose
    ``retry_after`` says when the first limit frees.  With a ``fallback=`` pool, the
    call goes there instead.

    The windows slide (every attempt is remembered for 60 s), so a burst at the end of
    one minute and the start of the next cannot double the rate, as fixed per-minute
    buckets allow.  Alone they count this process's calls.  With fleet-shared state
    (``Balancer(shared=lbclient.RedisState(...))``) ``requests_per_minute`` and
    ``tokens_per_minute`` count the whole fleet's (about a sync behind; Redis out of
    reach: ``limit / live processes`` each -- see :mod:`lbclient.pool.limits`), while
    ``max_in_flight`` stays per process: give each process its share of it.
    """

    max_in_flight: int | None = attrs.field(
        default=None, validator=_positive("max_in_flight", integer=True)
    )
    requests_per_minute: float | None = attrs.field(
        default=None, validator=_positive("requests_per_minute")
    )
    tokens_per_minute: float | None = attrs.field(
        default=None, validator=_positive("tokens_per_minute")
    )

    def __attrs_post_init__(self) -> None:
        if (
            self.max_in_flight is None
            and self.requests_per_minute is None
            and self.tokens_per_minute is None
        ):
            raise ConfigError(
                "Limits needs max_in_flight, requests_per_minute or tokens_per_minute "
                "(limits with none of them limit nothing)"
            )

    def __repr__(self) -> str:
        given = ", ".join(
            f"{a.name}={getattr(self, a.name)!r}"
            for a in attrs.fields(type(self))
            if getattr(self, a.name) is not None
        )
        return f"lbclient.Limits({given})"
