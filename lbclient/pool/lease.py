"""`Lease`: one attempt's hold on an endpoint, given back by exactly one outcome.

``pool.acquire(...)`` picks an endpoint and takes an in-flight slot on it; the returned
lease is how the attempt reports what happened (grpc-go's ``PickResult.Done``, Finagle's
load-metric ``start()/end()``).  Every path -- the decorated fast path, retries, hedges,
streams, ``lb.pick()`` -- ends each attempt with one of:

* :meth:`Lease.ok` -- it succeeded: a latency sample, the slot back, the breaker told;
* :meth:`Lease.fail` -- it raised: counted against the endpoint if the failure
  classifier says so (connection errors, timeouts, 5xx, 408, 429 by default: a bug in
  the wrapped code or a 4xx is not the endpoint's fault), priced as a slow answer, fed
  to the breaker; a ``Retry-After`` starts a cooldown;
* :meth:`Lease.cut` -- the call's deadline passed while it ran: the endpoint was too
  slow, which counts (a hung replica must get ejected whatever path found it);
* :meth:`Lease.cancel` -- the caller gave up: the slot back, no verdict;
* :meth:`Lease.lose` -- a hedge race was won elsewhere: a cancel, but if the attempt had
  already run far longer than its endpoint usually takes, that is evidence (a replica
  that swallows requests must be avoided even while hedges keep winning).

Only the first outcome counts; later ones are ignored and return ``False``.  The lease
module and the pool are the only writers of :class:`EndpointState`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..observe.events import AttemptEvent
from ..policies.classify import retry_after, status_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._context import CallContext
    from .._endpoint import Endpoint
    from .limits import Charge
    from .pool import Pool
    from .state import EndpointState

__all__ = ["PANIC_PICK", "Lease"]

log = logging.getLogger("lbclient")

PANIC_PICK = -1  # probe token of a call sent to an ejected endpoint in panic mode
FAILURE_PENALTY = 4.0  # a failure counts as this many times the current latency estimate
MAX_PENALTY = 10.0  # seconds: the penalty stops growing here (it decays from there)
LOST_FACTOR = 2.0  # a hedge loser running this many times its expected latency is evidence


class Lease:
    """An in-flight slot on ``state`` taken at clock time ``t0``.

    ``endpoint`` is what the attempt sends to; ``stream`` marks a streaming attempt
    (its latency sample is the time to the first chunk, reported with
    :meth:`first_chunk`); ``hedge`` a backup; ``number`` the attempt's number in its call;
    ``tokens`` the estimated tokens it holds in flight.  ``done`` is True once an
    outcome was recorded.
    """

    # The attributes every lease sets are slots; the rarely set ones live in a lazily
    # created __dict__ and read their class default until set: a plain call's lease is
    # five stores.
    __slots__ = ("__dict__", "done", "endpoint", "pool", "probe", "state", "t0")

    stream = False
    hedge = False
    number = 1
    tokens = 0.0
    first_at: float | None = None
    chunks = 0  # a stream's chunks after the first
    # Told ``(outcome, error)`` when the lease ends -- tracing hangs an attempt's span
    # here (outcome: "ok", "failed", "ignored", "cut", "cancelled", "lost").
    on_done: Callable[[str, BaseException | None], None] | None = None
    # A tokens-per-minute charge on the endpoint's limits, settled by the call's real
    # usage when the attempt succeeds (only on endpoints with such a limit).
    charge: Charge | None = None
    call: CallContext | None = None

    def __init__(self, pool: Pool, state: EndpointState, t0: float, probe: int) -> None:
        self.pool = pool
        self.state = state
        self.endpoint: Endpoint = state.endpoint
        self.t0 = t0
        self.probe = probe
        self.done = False

    # -- outcomes ---------------------------------------------------------------------------

    def ok(self, t: float | None = None) -> bool:
        """The attempt succeeded (for a stream: it ended cleanly)."""
        if self.done:
            return False
        self.done = True
        pool = self.pool
        if t is None:
            t = pool.now()
        if self.charge is not None:
            self._settle(t)
        if self.stream:
            if self.first_at is None:  # an empty stream: its whole time is its TTFT
                self.state.observe_ttft(t - self.t0, t)
            self._stream_ended(t)
            pool.succeeded(self.state, self.t0, t, self.probe, self.tokens, False)
        else:
            pool.succeeded(self.state, self.t0, t, self.probe, self.tokens)
        if self.on_done is not None:
            self.on_done("ok", None)
        return True

    def first_chunk(self, t: float) -> None:
        """A stream's first chunk arrived at ``t``: its time-to-first-token sample."""
        if self.first_at is None and not self.done:
            self.first_at = t
            self.state.observe_ttft(t - self.t0, t)

    def fail(self, exc: BaseException, t: float | None = None) -> bool:
        """The attempt raised ``exc``.  Returns whether it counted against the endpoint."""
        if self.done:
            return False
        self.done = True
        pool = self.pool
        s = self.state
        if t is None:
            t = pool.now()
        try:
            counted = bool(pool.is_failure(exc))
        except Exception:  # a broken user predicate must not lose the call's own error
            log.exception("breaker is_failure predicate raised; counting as a failure")
            counted = True
        self._stream_ended(t)
        pool.release(s, self.tokens)
        if counted:
            self._charge(t)
        else:
            s.ignored += 1
            if not self.stream:
                s.observe(t - self.t0, t)  # a real answer (a 4xx), or our own bug after one
            b = s.breaker
            if b is not None:
                b.on_ignored(t, self.probe)
                if self.probe:
                    pool.invalidate()
        if pool.cooldown_cap is not None:
            seconds = retry_after(exc)
            if seconds is not None and seconds > 0:
                pool.cool(s, min(seconds, pool.cooldown_cap), status_of(exc), t)
        self._event("failed" if counted else "ignored", exc, counted, t)
        if self.on_done is not None:
            self.on_done("failed" if counted else "ignored", exc)
        return counted

    def cut(self, t: float | None = None) -> bool:
        """The call's own deadline passed while this attempt ran.  Returns whether this
        ended the attempt.  That the endpoint was too slow counts against it (on every
        path) -- if the attempt had run longer than the endpoint usually takes: a backup
        or retry sent just before the deadline says nothing about its endpoint, and is
        given back like a cancelled one."""
        if self.done:
            return False
        pool = self.pool
        s = self.state
        if t is None:
            t = pool.now()
        if self.first_at is None:
            est = s.ttft if self.stream else s
            # (An estimate is evidence once the endpoint has answered; before, it is the
            # pool's prior, and a cut counts.)
            if est.count and t - self.t0 <= est.at(self.t0):
                return self.cancel()
        self.done = True
        self._stream_ended(t)
        pool.release(s, self.tokens)
        s.cut += 1
        self._charge(t)
        self._event("cut", None, True, t)
        if self.on_done is not None:
            self.on_done("cut", None)
        return True

    def cancel(self) -> bool:
        """The caller gave up on the attempt: no verdict on the endpoint."""
        if self.done:
            return False
        self.done = True
        pool = self.pool
        s = self.state
        s.cancelled += 1
        if self.first_at is not None:
            self._stream_ended(pool.now())
        pool.release(s, self.tokens)
        b = s.breaker
        if b is not None and self.probe:
            b.on_ignored(pool.now(), self.probe)
            pool.invalidate()
        if self.on_done is not None:
            self.on_done("cancelled", None)
        return True

    def lose(self, t: float | None = None, winner: float | None = None) -> bool:
        """A hedge race was won by another attempt while this one still ran.  Returns
        whether the loss was held against the endpoint: when the attempt had run more
        than :data:`LOST_FACTOR` times what was expected of it -- the winning attempt's
        own latency (``winner``, seconds), else its endpoint's estimate -- its running
        time is a latency sample (the real one is at least that) and a soft failure for
        the breaker, so a replica that swallows requests is left even while hedges win."""
        if self.done:
            return False
        pool = self.pool
        s = self.state
        if t is None:
            t = pool.now()
        ran = t - self.t0
        expected = s.ttft.at(self.t0) if self.stream else s.at(self.t0)
        if winner is not None and winner < expected:
            expected = winner
        if ran <= LOST_FACTOR * expected:
            self.cancel()
            return False
        self.done = True
        s.cancelled += 1
        s.lost += 1
        if self.stream:
            s.observe_ttft(ran, t)
        else:
            s.observe(ran, t)
        pool.release(s, self.tokens)
        b = s.breaker
        if b is not None:
            before = b.state
            b.on_failure(t, self.probe)
            if b.state != before or self.probe:
                pool.invalidate()
        self._event("lost", None, True, t)
        if self.on_done is not None:
            self.on_done("lost", None)
        return True

    def overdue(self, t: float) -> None:
        """The attempt is still running at ``t`` -- long enough that a backup is being
        sent -- so its endpoint's latency right now is at least ``t - t0``: taken as a
        peak sample at once (not waiting for the answer), so the pickers stop queueing
        calls behind a stuck request.  The real sample replaces it when it ends."""
        if self.done:
            return
        s = self.state
        ran = t - self.t0
        est = s.ttft if self.stream else s
        if ran > est.at(t):  # above the estimate as a pick reads it now (decayed)
            est.cost = ran
            est.stamp = t
            if est is s:
                s.rekey(t)

    def abandon(self) -> None:
        """The attempt was never sent (a backup that found only tried endpoints): give
        the slot back as if it had never been taken."""
        if self.done:
            return
        self.done = True
        s = self.state
        s.requests -= 1
        self.pool.release(s, self.tokens)
        b = s.breaker
        if b is not None and self.probe:
            b.on_ignored(self.pool.now(), self.probe)
            self.pool.invalidate()

    def _settle(self, t: float) -> None:
        """Replace the estimated tokens charged to the endpoint's tokens-per-minute
        window with what the call really used, when its answer said."""
        call = self.call
        usage = call.usage if call is not None else None
        lim = self.state.limit
        if usage is not None and lim is not None and self.charge is not None:
            lim.settle(self.charge, usage[0] + usage[1], t)

    def _stream_ended(self, t: float) -> None:
        first = self.first_at
        if first is not None:
            s = self.state
            s.chunks += self.chunks + 1
            s.stream_time += t - first

    # -- what kind of attempt it is (per-endpoint counters) ----------------------------------

    def sent_as_retry(self) -> None:
        self.state.retries_sent += 1

    def sent_as_hedge(self) -> None:
        self.hedge = True
        self.state.hedges_sent += 1

    def won_as_hedge(self) -> None:
        self.state.hedges_won += 1

    # -- shared ------------------------------------------------------------------------------

    def _charge(self, t: float) -> None:
        """A counted failure: priced as a slow response (so load-aware strategies steer
        away even before a breaker trips), and fed to the breaker."""
        pool = self.pool
        s = self.state
        s.failures += 1
        s.last_failure = t
        ran = t - self.t0
        # priced from the estimate its pick compared (decayed to the attempt's start)
        s.penalize(max(ran, min(FAILURE_PENALTY * s.at(self.t0), MAX_PENALTY)), t, MAX_PENALTY)
        b = s.breaker
        if b is not None:
            before = b.state
            b.on_failure(t, self.probe)
            shared = pool.shared
            if shared is not None:
                shared.failed(s, t)  # queues the fleet's copy; may eject on fleet evidence
            if b.state != before or self.probe:
                pool.invalidate()
                return
        if pool.snap.panic and (s.health_down or (b is not None and b.state != "closed")):
            # Panic mode serves the ejected endpoints that failed longest ago: this one
            # just failed, so the ranking must be made again.
            pool.invalidate()

    def _event(self, outcome: str, exc: BaseException | None, counted: bool, t: float) -> None:
        observer = self.pool.observer
        if observer.wants(logging.DEBUG):
            if exc is None:
                error = (
                    "still running at the call's deadline"
                    if outcome == "cut"
                    else ("lost the hedge race after running far longer than expected")
                )
            else:
                error = repr(exc)
            observer.emit(
                AttemptEvent(
                    url=self.state.url,
                    outcome=outcome,
                    error=error,
                    counted=counted,
                    attempt=self.number,
                    hedge=self.hedge,
                    duration=t - self.t0,
                    at=t,
                )
            )

    def __repr__(self) -> str:
        state = "done" if self.done else "held"
        return f"<Lease {self.state.url} {state} t0={self.t0:.3f}>"
