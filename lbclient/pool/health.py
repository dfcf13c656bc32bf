"""Active health checks: the :class:`HealthCheck` policy and the loop that runs it.

The policy is frozen configuration.  The loop (``HealthCheck.check_loop``, started by
the balancer) owns one aiohttp session and the per-endpoint streaks; every round it
probes each member concurrently and hands the verdicts to the pool's ``set_health``.
Deciding is separate from probing: :class:`HealthTracker` turns pass/fail results into
up/down transitions without I/O or an event loop, so the thresholds are unit-testable.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from .._errors import ConfigError, UnknownEndpoint
from .._numbers import is_int, is_number

if TYPE_CHECKING:
    import aiohttp

    from .pool import Pool
    from .state import EndpointState

__all__ = ["HealthCheck", "HealthTracker"]

log = logging.getLogger("lbclient")

_USER_AGENT = "lbclient-health-check"
_WORD = {True: "healthy", False: "unhealthy"}


# -- converters then validators: messages name the bad value ------------------------------


def _seconds(name: str, value: object) -> float:
    if not is_number(value) or value <= 0:
        raise ConfigError(
            f"HealthCheck {name} must be a finite number of seconds > 0, got {value!r}"
        )
    return float(value)


def _interval(value: object) -> float:
    return _seconds("interval", value)


def _timeout(value: object) -> float:
    return _seconds("timeout", value)


def _count(name: str, value: object) -> int:
    if not is_int(value) or value < 1:
        raise ConfigError(f"HealthCheck {name} must be an int >= 1, got {value!r}")
    return value


def _unhealthy_threshold(value: object) -> int:
    return _count("unhealthy_threshold", value)


def _healthy_threshold(value: object) -> int:
    return _count("healthy_threshold", value)


def _jitter(value: object) -> float:
    if not is_number(value) or not 0 <= value < 1:
        raise ConfigError(f"HealthCheck jitter must be a fraction in [0, 1), got {value!r}")
    return float(value)


def _path(value: object) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or any(c.isspace() for c in value)
        or "#" in value
    ):
        raise ConfigError(
            f"HealthCheck path must start with '/' and contain no spaces (e.g. '/health'), "
            f"got {value!r}"
        )
    return value


@attrs.frozen(kw_only=True, repr=False)
class HealthCheck:
    """Probe every endpoint with ``GET {url}{path}`` in the background; eject the ones
    that fail, re-admit them when they pass again.

    ::

        lb = lbclient.Balancer(urls, health=lbclient.HealthCheck(path="/health"))
        fast = attrs.evolve(policy, interval=1.0)     # variants via attrs.evolve

    Passive checks (the breaker) judge endpoints by the calls you send; active checks
    find what calls cannot: a replica that is still loading its weights (``/health``
    answers 503 until ready), one that died while no traffic went to it, one that is
    back.  A check passes on a ``2xx`` answer within ``timeout``; any other status
    (redirects are not followed), a connection error or a timeout is a failure.

    **Defaults, compared.**  Envoy makes you choose every value (``interval``,
    ``timeout`` and both thresholds are required fields); Kubernetes readiness probes
    default to every 10 s, 1 s timeout, 3 failures to mark down, 1 success to mark up;
    an AWS ALB target group to every 30 s, 5 s timeout, 2 failures down, 5 successes up.

    * ``interval`` (5 s) -- time between the starts of two rounds.  Each client process
      checks each replica once per interval: 100 processes cost a replica 20 cheap
      requests per second.  A dead replica that gets no traffic is found in
      ``interval * unhealthy_threshold`` (about 10 s); under traffic the breaker is
      faster.
    * ``timeout`` (1 s, as Kubernetes) -- a health endpoint answers in milliseconds; a
      replica that cannot answer it in a second is too overloaded to send work to.
    * ``unhealthy_threshold`` (2) -- consecutive failed checks before the endpoint is
      marked down.  One lost check (a GC pause, a dropped SYN, a check landing on a
      restarting worker) must not eject a replica; two in a row at 5 s apart rarely
      come from a healthy one.  Down means no new picks; with a breaker, it opens.
    * ``healthy_threshold`` (1) -- consecutive passes to mark it up again.  One is
      enough because re-admission is careful anyway: with a breaker the endpoint goes
      half-open and gets a single probe call first (a real request that fails reopens
      it), and slow start, if enabled, ramps its weight back up.  Raise it (ALB uses 5)
      for replicas that flap.  Endpoints start *up*: a new member is pickable at once
      and the checks must fail ``unhealthy_threshold`` times to take it out.
    * ``jitter`` (0.1) -- each wait is ``interval`` times a uniform factor in
      ``[1 - jitter, 1 + jitter]`` (Envoy's ``interval_jitter_percent``): a fleet of
      client processes started by one deploy would otherwise probe every replica in
      lockstep.
    * ``path`` (``"/health"``) -- appended to the endpoint URL.

    Units: seconds.  The balancer never ejects more than its panic threshold allows
    (``Breaker.max_ejection``, else half the pool), whatever the checks say.
    """

    path: str = attrs.field(default="/health", converter=_path)
    interval: float = attrs.field(default=5.0, converter=_interval)
    timeout: float = attrs.field(default=1.0, converter=_timeout)
    unhealthy_threshold: int = attrs.field(default=2, converter=_unhealthy_threshold)
    healthy_threshold: int = attrs.field(default=1, converter=_healthy_threshold)
    jitter: float = attrs.field(default=0.1, converter=_jitter)

    def __attrs_post_init__(self) -> None:
        if self.interval < 0.01:
            raise ConfigError(
                f"HealthCheck interval must be at least 0.01 s (checks that often would "
                f"spin the event loop), got {self.interval!r}"
            )

    def __repr__(self) -> str:
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in attrs.fields(HealthCheck)
            if getattr(self, f.name) != f.default
        ]
        return f"lbclient.HealthCheck({', '.join(parts)})"

    def next_wait(self, rng: random.Random) -> float:
        """One jittered interval, in seconds."""
        if self.jitter == 0:
            return self.interval
        return self.interval * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))

    # -- driving ------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        import aiohttp  # lazily: ``import lbclient`` does not import aiohttp

        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            # No pool limit: a round probes every member at once, and a check waiting
            # for a pooled connection would eat its own timeout and fail falsely.
            connector=aiohttp.TCPConnector(limit=0),
            headers={"User-Agent": _USER_AGENT},
        )

    async def probe(self, session: aiohttp.ClientSession, url: str) -> str | None:
        """Check one endpoint: ``None`` if it passed, else why it failed.  Never raises
        (except ``CancelledError``)."""
        try:
            async with (
                asyncio.timeout(self.timeout),
                session.get(url + self.path, allow_redirects=False) as resp,
            ):
                await resp.read()  # a read body lets the connection be reused
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}"
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    async def _check_all(self, pool: Pool, session: aiohttp.ClientSession) -> dict[str, str | None]:
        urls = list(pool.members)
        if not urls:
            return {}
        reasons = await asyncio.gather(*(self.probe(session, url) for url in urls))
        return dict(zip(urls, reasons, strict=True))

    async def check_once(self, pool: Pool, session: aiohttp.ClientSession) -> dict[str, bool]:
        """Probe every current member once, concurrently: ``{url: passed}``.

        Only probes; it does not change the pool (the loop's :class:`HealthTracker`
        decides that from consecutive results)."""
        results = await self._check_all(pool, session)
        return {url: reason is None for url, reason in results.items()}

    async def check_loop(self, pool: Pool) -> None:
        """Check every member each ``interval`` until the pool closes or the task is
        cancelled (``lb.aclose()`` does both).  Owns one aiohttp session, closed on the
        way out.  Nothing raised by a check or by the pool ends the loop.

        A failed probe is not retried (tenacity has no place here): each probe is one
        sample, and the thresholds exist to count consecutive failures -- retrying a
        probe until it passes would hide exactly what they measure."""
        clock = pool.clock
        # A private RNG seeded from the pool's: injected randomness, without the loop's
        # draws shifting the picker's sequence.
        rng = random.Random(pool.rng.random())
        tracker = HealthTracker(self)
        async with self._session() as session:
            while not pool.closed:
                started = clock.now()
                try:
                    results = await self._check_all(pool, session)
                    if pool.closed:
                        break
                    tracker.apply(pool, results)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("health check round failed; checks go on")
                wait = self.next_wait(rng) - (clock.now() - started)
                await clock.sleep(max(0.0, wait))


class _Streak:
    """One endpoint's consecutive results, as the checks see it."""

    __slots__ = ("down", "fails", "passes", "state")

    def __init__(self, state: EndpointState) -> None:
        self.state = state
        self.down = bool(state.health_down)
        self.passes = 0
        self.fails = 0


class HealthTracker:
    """Turns check results into up/down verdicts with the policy's thresholds.

    Synchronous and free of I/O.  Keeps one streak per URL across rounds, forgets URLs
    that left the pool, and restarts the streak of a URL that was removed and added
    again (a new member starts as the balancer sees it).
    """

    __slots__ = ("_policy", "_streaks")

    def __init__(self, policy: HealthCheck) -> None:
        self._policy = policy
        self._streaks: dict[str, _Streak] = {}

    def record(self, state: EndpointState, passed: bool) -> bool | None:
        """Record one result for ``state``; returns ``False`` (mark down), ``True``
        (mark up) or ``None`` (no change)."""
        streak = self._streaks.get(state.url)
        if streak is None or streak.state is not state:
            streak = self._streaks[state.url] = _Streak(state)
        policy = self._policy
        if passed:
            streak.fails = 0
            streak.passes += 1
            if streak.down and streak.passes >= policy.healthy_threshold:
                streak.down = False
                return True
        else:
            streak.passes = 0
            streak.fails += 1
            if not streak.down and streak.fails >= policy.unhealthy_threshold:
                streak.down = True
                return False
        return None

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drop the streaks of URLs for which ``keep(url)`` is false."""
        for url in [u for u in self._streaks if not keep(u)]:
            del self._streaks[url]

    def apply(self, pool: Pool, results: Mapping[str, str | None]) -> None:
        """Record a round (``{url: None if passed else reason}``) and tell the pool about
        every transition."""
        members = pool.members
        self.forget(members.__contains__)
        for url, reason in results.items():
            state = members.get(url)
            if state is None:
                continue  # removed while the round ran
            verdict = self.record(state, reason is None)
            if verdict is None:
                continue
            try:
                pool.set_health(url, verdict)
            except Exception as exc:
                # Not applied, so not recorded: the next result retries the transition.
                self._streaks[url].down = verdict  # as it was before this transition
                if not isinstance(exc, UnknownEndpoint):  # removed meanwhile: expected
                    log.exception("health check: marking %s %s failed", url, _WORD[verdict])
                continue
            if verdict:
                log.info(
                    "health check: %s passed %d check(s) in a row; marked healthy",
                    url,
                    self._policy.healthy_threshold,
                )
            else:
                log.warning(
                    "health check: %s failed %d check(s) in a row (last: %s); marked unhealthy",
                    url,
                    self._policy.unhealthy_threshold,
                    reason,
                )

    def __repr__(self) -> str:
        down = sorted(u for u, s in self._streaks.items() if s.down)
        return f"<lbclient.HealthTracker tracking={len(self._streaks)} down={down!r}>"
