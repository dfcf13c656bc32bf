"""`CostPolicy` and endpoint prices: what calls cost, and how much may be spent (frozen).

Endpoints carry their price in ``metadata`` (any mix of these keys)::

    lbclient.Endpoint("https://api.vendor-a.com", metadata={
        "price_per_1k_input": 0.15, "price_per_1k_output": 0.60})     # per 1,000 tokens
    lbclient.Endpoint("http://10.0.1.10:8000", metadata={
        "price_per_hour": 3.06, "slots": 8})     # a GPU billed by the hour, 8 calls at once

* ``price_per_1k_input`` / ``price_per_1k_output`` (``price_per_1k_tokens`` sets both) --
  a call costs ``input x p_in / 1000 + output x p_out / 1000`` of the tokens it really
  used (:func:`lbclient.report_usage`; the built-in client and the httpx transport
  report them), or, when nothing was reported, its estimate (the route's ``tokens=``,
  priced at the dearer of the two).
* ``price_per_hour`` -- a replica paid by time (a serverless GPU billed per second of
  use, or your own fleet's cost spread over its calls): a call costs its duration x
  ``price_per_hour / 3600 / slots`` (``slots``: calls the replica serves at once,
  default 1).
* No price: the endpoint is free (your own, already paid for).

The currency is whatever your prices are in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from .._endpoint import Endpoint
from .._errors import ConfigError
from .._numbers import is_int, is_number

__all__ = ["PRICE_KEYS", "CostPolicy", "Price", "PriceBook"]

log = logging.getLogger("lbclient")

PRICE_KEYS = (
    "price_per_hour",
    "price_per_1k_input",
    "price_per_1k_output",
    "price_per_1k_tokens",
    "slots",
)
"""The ``Endpoint.metadata`` keys lbclient reads prices from."""


def _number(meta: Mapping[str, Any], key: str, url: str) -> float | None:
    value = meta.get(key)
    if value is None:
        return None
    if not is_number(value) or value < 0:
        raise ConfigError(f"endpoint {url!r} metadata[{key!r}] must be a price >= 0, got {value!r}")
    return float(value)


@attrs.frozen(kw_only=True)
class Price:
    """One endpoint's price, read from its metadata (see the module docstring)."""

    per_hour: float = 0.0
    per_1k_input: float = 0.0
    per_1k_output: float = 0.0
    slots: int = 1

    @classmethod
    def of(cls, endpoint: Endpoint) -> Price | None:
        """The endpoint's price, ``None`` if it has none; a bad value is a
        :class:`~lbclient.ConfigError` naming it."""
        meta = endpoint.metadata
        if not any(k in meta for k in PRICE_KEYS[:4]):
            return None
        url = endpoint.url
        both = _number(meta, "price_per_1k_tokens", url)
        p_in = _number(meta, "price_per_1k_input", url)
        p_out = _number(meta, "price_per_1k_output", url)
        slots = meta.get("slots", 1)
        if not is_int(slots) or slots < 1:
            raise ConfigError(
                f"endpoint {url!r} metadata['slots'] must be an int >= 1, got {slots!r}"
            )
        return cls(
            per_hour=_number(meta, "price_per_hour", url) or 0.0,
            per_1k_input=p_in if p_in is not None else both or 0.0,
            per_1k_output=p_out if p_out is not None else both or 0.0,
            slots=slots,
        )

    @property
    def per_second(self) -> float:
        """What one call costs per second it runs here (time-priced endpoints)."""
        return self.per_hour / 3600.0 / self.slots

    def cost(self, seconds: float, usage: tuple[float, float] | None) -> float:
        """A call that ran ``seconds`` and used ``usage = (input, output)`` tokens."""
        out = seconds * self.per_second
        if usage is not None:
            out += (usage[0] * self.per_1k_input + usage[1] * self.per_1k_output) / 1000.0
        return out

    def worst(self, tokens: float, seconds: float) -> float:
        """An upper estimate of a call of ``tokens`` tokens lasting ``seconds``: every token
        at the dearer of the two token prices (what a reservation holds)."""
        return (
            tokens * max(self.per_1k_input, self.per_1k_output) / 1000.0 + seconds * self.per_second
        )

    def expected(self, tokens: float, seconds: float, output_share: float) -> float:
        """The expected cost of such a call, ``output_share`` of its tokens being output
        (what picking compares)."""
        blended = (1.0 - output_share) * self.per_1k_input + output_share * self.per_1k_output
        return tokens * blended / 1000.0 + seconds * self.per_second


def _optional_positive(name: str) -> Any:
    def check(_i: object, _a: object, value: object) -> None:
        if value is None:
            return
        if not is_number(value) or value <= 0:
            raise ConfigError(
                f"CostPolicy {name} must be a finite number > 0 or None, got {value!r}"
            )

    return check


def _positive(name: str, *, allow_zero: bool = False) -> Any:
    def check(_i: object, _a: object, value: object) -> None:
        if not is_number(value) or (value < 0 if allow_zero else value <= 0):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"CostPolicy {name} must be a finite number {bound}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class CostPolicy:
    """Cost-aware routing and a spending ceiling: ``Balancer(cost=lbclient.CostPolicy(...))``.

    >>> lbclient.CostPolicy(ceiling=50.0, period=3600)    # at most 50 per hour
    >>> lbclient.CostPolicy(latency_factor=1.2)           # prefer cheap, no ceiling

    * ``ceiling`` -- the most that may be spent per ``period`` (in your prices'
      currency); ``None`` (default): spend is tracked, never capped.  Each call
      *reserves* its worst-case cost before it picks an endpoint (its ``tokens=``
      estimate, or ``estimate_tokens``, at the dearest endpoint's dearer token price,
      plus ``estimate_seconds`` at the dearest time price) and is shed with
      :class:`lbclient.Overloaded` ``("budget")`` -- at once, before any work -- if the
      period's spend plus the reservations in flight plus its own would pass the
      ceiling.  When the call ends the reservation is settled with what it really
      cost (refunded in full if it never ran).  So spend never passes the ceiling by
      more than what the calls in flight spend beyond their reservations (none, when
      estimates are upper bounds) -- however many calls run at once: the check and
      the reservation are one synchronous step (LiteLLM's budgets, checked before and
      counted after, are overrun by concurrent calls: #23714, #26672).
    * ``period`` -- seconds per budget period (default 3600); periods start with the
      balancer's first call and follow one another; ``retry_after`` of a shed call is
      the time left in the period.
    * ``latency_factor`` -- prefer cheaper endpoints while their expected latency stays
      within this factor of the best one's (default 1.5: a cheaper endpoint may be up
      to 50% slower); among those, the cheapest, and among equally cheap ones the
      balancer's own strategy decides (load).  ``None``: route by the strategy alone
      (only the ceiling applies).
    * ``estimate_tokens`` -- the token estimate of a call without ``tokens=`` (default
      1000).
    * ``estimate_seconds`` -- the duration a reservation assumes for endpoints priced
      by time (default 10 s; the settlement uses the real one).
    * ``output_share`` -- the share of a call's tokens expected to be output, to compare
      endpoints whose input and output prices differ (default 0.25).
    """

    ceiling: float | None = attrs.field(default=None, validator=_optional_positive("ceiling"))
    period: float = attrs.field(default=3600.0, validator=_positive("period"))
    latency_factor: float | None = attrs.field(default=1.5)
    estimate_tokens: float = attrs.field(
        default=1000.0, validator=_positive("estimate_tokens", allow_zero=True)
    )
    estimate_seconds: float = attrs.field(default=10.0, validator=_positive("estimate_seconds"))
    output_share: float = attrs.field(default=0.25)

    @latency_factor.validator
    def _check_factor(self, _a: object, value: object) -> None:
        if value is None:
            return
        if not is_number(value) or value < 1:
            raise ConfigError(
                f"CostPolicy latency_factor must be a number >= 1 (1.5: up to 50% slower) "
                f"or None, got {value!r}"
            )

    @output_share.validator
    def _check_share(self, _a: object, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ConfigError(f"CostPolicy output_share must be in [0, 1], got {value!r}")


class PriceBook:
    """Endpoint prices, parsed once per endpoint object (metadata is immutable).  An
    endpoint added later with a bad price is logged and treated as free rather than
    failing the calls that would pick it (the initial endpoints are checked at
    construction)."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Endpoint, Price | None]] = {}

    def get(self, endpoint: Endpoint) -> Price | None:
        hit = self._cache.get(endpoint.url)
        if hit is not None and hit[0] is endpoint:
            return hit[1]
        try:
            price = Price.of(endpoint)
        except ConfigError as exc:
            log.warning("lbclient: %s; the endpoint is treated as free", exc)
            price = None
        self._cache[endpoint.url] = (endpoint, price)
        return price

    def dearest(self, endpoints: Iterable[Endpoint], tokens: float, seconds: float) -> float:
        """The worst-case cost of a call at the dearest of ``endpoints``."""
        worst = 0.0
        for ep in endpoints:
            p = self.get(ep)
            if p is not None:
                w = p.worst(tokens, seconds)
                if w > worst:
                    worst = w
        return worst
