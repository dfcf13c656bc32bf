"""`Retry`: the retry policy (frozen) and its pure decision function.

The policy only *decides*; the engine drives: it calls :meth:`Retry.decide` after a
failed attempt, withdraws a budget token if the decision is to retry, sleeps on its
clock and picks another endpoint.  No event loop is needed to test a decision.

``Retry-After`` is not a sleep: the endpoint that sent it is cooled down (not picked for
that long, capped by ``max_retry_after``) and the retry goes to another endpoint at once;
the call only waits when every endpoint is cooling down.
"""

from __future__ import annotations

import random

import attrs

from .._clock import MONOTONIC, Clock
from .._errors import BalancerClosed, ConfigError, DeadlineExceeded
from .._numbers import is_int
from .budget import Budget, check_non_negative, check_positive, check_ratio
from .classify import DEFAULT_RETRY_ON, Classifier, to_classifier

__all__ = ["Retry", "RetryDecision"]

_BUDGET_TTL = 10.0  # seconds a deposit counts in the retry budget (Finagle's default)


def _attempts(value: object) -> int:
    if not is_int(value) or value < 1:
        raise ConfigError(f"Retry attempts must be an int >= 1, got {value!r}")
    return value


def _backoff(value: object) -> float:
    return check_non_negative(value, "Retry backoff")


def _max_backoff(value: object) -> float:
    return check_non_negative(value, "Retry max_backoff")


def _max_retry_after(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"Retry max_retry_after must be a number >= 0, got {value!r}")
    return float(value)  # math.inf allowed: always honour Retry-After


def _timeout(value: object) -> float | None:
    return None if value is None else check_positive(value, "Retry timeout")


def _ratio(value: object) -> float:
    return check_ratio(value, "Retry budget_ratio")


def _min_per_second(value: object) -> float:
    return check_non_negative(value, "Retry budget_min_per_second")


def _respect_retry_after(value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"Retry respect_retry_after must be a bool, got {value!r}")
    return value


@attrs.frozen(kw_only=True)
class RetryDecision:
    """What to do after a failed attempt.

    ``retry`` -- try again; ``delay`` -- seconds to sleep first (0 when giving up);
    ``reason`` -- why, one of: ``"retry"``, ``"not retryable"``, ``"attempts exhausted"``,
    ``"deadline"`` (the delay would reach the call's deadline).  The engine adds
    ``"retry budget exhausted"`` when it cannot withdraw a token.
    """

    retry: bool
    delay: float
    reason: str


def _give_up(reason: str) -> RetryDecision:
    return RetryDecision(retry=False, delay=0.0, reason=reason)


@attrs.frozen(kw_only=True, repr=False)
class Retry:
    """How a failed call is retried on another endpoint.

    ::

        policy = lbclient.Retry(attempts=3)             # the defaults, spelled out
        policy = lbclient.Retry(attempts=2, timeout=30.0, retry_on=lbclient.retry_if_status(503))
        no_retries = attrs.evolve(policy, attempts=1)

    * ``attempts`` -- total attempts including the first (int >= 1; default 3).  Three is
      enough to step over one or two bad replicas (a crashed pod, a draining node) while
      bounding the worst case at 3x the latency of a single attempt.
    * ``backoff`` / ``max_backoff`` -- seconds; the n-th retry sleeps a uniformly random
      time in ``[0, min(max_backoff, backoff * 2**(n-1))]`` ("full jitter", AWS
      "Exponential Backoff And Jitter", 2015: of the jitter variants it does the least
      total work and spreads a synchronised wave of failures the most).  Default 25 ms
      base, 1 s cap: an LLM call takes seconds, so a failover after at most 25 ms is
      invisible, while the cap spreads a retry storm over a second instead of letting
      it grow to the tens of seconds plain doubling reaches by the tenth retry.
    * ``retry_on`` -- which errors to retry: a :class:`lbclient.Classifier`, an exception
      type or tuple of types, or a predicate (default ``lbclient.DEFAULT_RETRY_ON``:
      connection errors, timeouts, 408/429/500/502/503/504).  ``CancelledError`` is
      never retried, whatever this says.
    * ``respect_retry_after`` -- on a 429/503 with ``Retry-After`` (or
      ``retry-after-ms``), the endpoint that sent it gets no new calls for that long --
      from any call -- and the retry goes to another endpoint at once (default True).
      ``max_retry_after`` caps that cooldown (default 30 s), and is the longest a call
      waits when *every* endpoint is cooling down; beyond it the call gives up.
    * ``budget_ratio`` / ``budget_min_per_second`` -- the retry budget shared by all
      calls through one balancer (:class:`lbclient.Budget`; defaults 20 % of calls plus
      10/s, Finagle's): without it, ``attempts=3`` triples the load on a fleet that is
      already failing.
    * ``timeout`` -- overall deadline for the call, seconds > 0, covering every attempt
      and every backoff (default None: no deadline).

    Order of checks after a failure: classify (``retry_on``) -> attempts left ->
    backoff vs deadline -> budget.  The budget comes last, and is the engine's job, so a
    token is only spent on a retry that will really be sent.

    Foot-guns: a retry re-sends the request.  Completions are usually safe to repeat,
    but a call with side effects (a tool that sends mail, a paid job submission) is
    not idempotent -- use ``attempts=1`` for it, or make it idempotent with a request
    id.  And retries multiply load: keep the budget on unless you know the fleet can
    take ``attempts`` times its traffic.
    """

    attempts: int = attrs.field(default=3, converter=_attempts)
    backoff: float = attrs.field(default=0.025, converter=_backoff)
    max_backoff: float = attrs.field(default=1.0, converter=_max_backoff)
    retry_on: Classifier = attrs.field(default=DEFAULT_RETRY_ON, converter=to_classifier)
    respect_retry_after: bool = attrs.field(default=True, converter=_respect_retry_after)
    max_retry_after: float = attrs.field(default=30.0, converter=_max_retry_after)
    budget_ratio: float = attrs.field(default=0.2, converter=_ratio)
    budget_min_per_second: float = attrs.field(default=10.0, converter=_min_per_second)
    timeout: float | None = attrs.field(default=None, converter=_timeout)

    @max_backoff.validator
    def _check_max_backoff(self, _attribute: object, value: float) -> None:
        if value < self.backoff:
            raise ConfigError(
                f"Retry max_backoff must be >= backoff ({self.backoff!r}), got {value!r}"
            )

    def backoff_for(self, retry_number: int, rng: random.Random) -> float:
        """Seconds to sleep before retry number ``retry_number`` (1 = the first retry):
        uniform in ``[0, min(max_backoff, backoff * 2**(retry_number - 1))]``.

        Computed directly rather than with tenacity's ``wait_exponential``, which needs a
        ``RetryCallState`` for one line of arithmetic.
        """
        if retry_number < 1:
            raise ValueError(f"retry_number must be >= 1, got {retry_number!r}")
        # 2.0**1000 is finite; beyond that the cap has long applied (and the product may be
        # inf, which min() turns back into max_backoff).
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** min(retry_number - 1, 1000))
        return rng.uniform(0.0, ceiling)

    def decide(
        self,
        error: BaseException,
        attempt_number: int,
        *,
        elapsed: float = 0.0,
        deadline_left: float | None = None,
        rng: random.Random,
    ) -> RetryDecision:
        """Decide what follows failed attempt number ``attempt_number`` (1 = the first).

        ``elapsed`` -- seconds since the call started (with ``timeout`` it gives the time
        left); ``deadline_left`` -- seconds left on a deadline the caller tracks itself
        (the tighter of the two applies); ``rng`` draws the jitter.

        Pure: no clock read, no sleep, no budget; the caller must still
        ``try_withdraw()`` from the budget when this says ``retry``.
        """
        if (
            not isinstance(error, Exception)
            or isinstance(error, DeadlineExceeded | BalancerClosed)
            or not self.retry_on(error)
        ):
            return _give_up("not retryable")
        if attempt_number >= self.attempts:
            return _give_up("attempts exhausted")
        delay = self.backoff_for(attempt_number, rng)
        left = deadline_left
        if self.timeout is not None:
            mine = self.timeout - elapsed
            left = mine if left is None else min(left, mine)
        # A retry that starts at the deadline has no time to succeed: give up instead.
        if left is not None and delay >= left:
            return _give_up("deadline")
        return RetryDecision(retry=True, delay=delay, reason="retry")

    def make_budget(self, clock: Clock = MONOTONIC) -> Budget:
        """A fresh :class:`lbclient.Budget` with this policy's ratio and floor (ttl 10 s),
        to be shared by every call through one balancer."""
        return Budget(
            ratio=self.budget_ratio,
            min_per_second=self.budget_min_per_second,
            ttl=_BUDGET_TTL,
            clock=clock,
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{a.name}={getattr(self, a.name)!r}" for a in attrs.fields(type(self)))
        return f"lbclient.Retry({fields})"
