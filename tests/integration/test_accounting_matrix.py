"""The accounting contract, asserted the same way on every entry point.

Every attempt takes a lease (an in-flight slot) and gives it back with exactly one
outcome, whichever path sent it:

* success -> ``successes`` +1 (and a latency sample);
* the endpoint's fault (a connection error, an HTTP 5xx) -> ``failures`` +1, breaker told;
* a user bug (``ValueError`` from the wrapped code) -> ``ignored`` +1, not held against the
  endpoint, the exception reaches the caller unchanged;
* a deadline cut (the call's own ``timeout``) -> ``failures`` +1 and ``cut`` +1, the caller
  gets :class:`lbclient.DeadlineExceeded`;
* the caller cancels -> ``cancelled`` +1, no verdict.

The matrix is entry point x outcome (x breaker or not): the decorated fast path, the
decorated path with a ``Retry(attempts=1)`` and a ``Breaker``, ``lb.call``, ``async with
lb.pick()``, a hedged route whose backup never fires, and a streaming route whose outcome
happens before the first chunk -- or after it.  The wrapped functions do no HTTP: they
sleep a little and raise.  Each case checks the per-endpoint counters of the endpoint
that was picked (the other one must stay untouched), the call totals, ``in_flight == 0``
everywhere, what the caller got, and -- with ``Breaker(failures=1)`` -- that only the
endpoint's own faults (a failure, a cut) open the circuit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

import lbclient

A, B = "http://10.9.0.1:8000", "http://10.9.0.2:8000"
URLS = [A, B]
T = 0.05  # seconds: the deadline of a "cut" case
HANG = 2.0  # seconds: how long a cut/cancelled attempt would run if nothing stopped it

OUTCOMES = ["success", "connection", "status_503", "user_bug", "cut", "cancel"]
COUNTED = {"connection", "status_503", "cut"}  # held against the endpoint


class HTTPStatusError(Exception):
    """An HTTP error the way aiohttp shapes it: an int ``status`` attribute."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class Probe:
    """What one wrapped function saw and did: the endpoints it ran on, the exception it
    raised, and an event set once the attempt is running (for the cancel cases)."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.started = asyncio.Event()
        self.raised: BaseException | None = None
        self.chunks: list[str] = []

    def error(self, outcome: str) -> Exception:
        exc: Exception
        if outcome == "connection":
            exc = ConnectionError("connection refused")
        elif outcome == "status_503":
            exc = HTTPStatusError(503)
        else:
            assert outcome == "user_bug"
            exc = ValueError("the caller's own bug")
        self.raised = exc
        return exc


async def act(probe: Probe, outcome: str) -> str:
    """The attempt's body: succeed, raise, or hang (until cut or cancelled)."""
    probe.started.set()
    if outcome == "success":
        await asyncio.sleep(0.001)
        return "answer"
    if outcome in ("cut", "cancel"):
        await asyncio.sleep(HANG)
        return "too late"
    await asyncio.sleep(0.001)
    raise probe.error(outcome)


def plain_fn(probe: Probe, outcome: str) -> Callable[..., Coroutine[Any, Any, str]]:
    async def complete(endpoint: lbclient.Endpoint, payload: str) -> str:
        assert payload == "payload"
        probe.urls.append(endpoint.url)
        return await act(probe, outcome)

    return complete


def stream_fn(
    probe: Probe, outcome: str, *, after_first: bool
) -> Callable[..., AsyncIterator[str]]:
    """An async generator whose outcome comes before its first chunk, or after it."""

    async def generate(endpoint: lbclient.Endpoint, payload: str) -> AsyncIterator[str]:
        assert payload == "payload"
        probe.urls.append(endpoint.url)
        if after_first:
            yield "first"
        result = await act(probe, outcome)
        yield result
        yield "last"

    return generate


# -- entry points: (lb, the call to make, the route variant expected) --------------------------

Runner = Callable[[], Awaitable[Any]]


def breaker_of(with_breaker: bool) -> lbclient.Breaker | None:
    return lbclient.Breaker(failures=1) if with_breaker else None


def variant_of(fn: object) -> str:
    """The route variant ``@lb.route`` compiled (``_fast``, ``_full``...)."""
    code = getattr(fn, "__code__", None)
    qualname = getattr(code, "co_qualname", "")
    return qualname.split(".")[0]


def entry_decorated(probe: Probe, outcome: str, breaker: bool) -> tuple[Any, Runner, str]:
    lb = lbclient.Balancer(URLS, breaker=breaker_of(breaker), rng=1)
    fn = plain_fn(probe, outcome)
    f = lb.route(timeout=T)(fn) if outcome == "cut" else lb.route(fn)
    return lb, lambda: f("payload"), variant_of(f)


def entry_policies(probe: Probe, outcome: str, breaker: bool) -> tuple[Any, Runner, str]:
    assert breaker
    retry = lbclient.Retry(attempts=1, timeout=T if outcome == "cut" else None)
    lb = lbclient.Balancer(URLS, retry=retry, breaker=lbclient.Breaker(failures=1), rng=1)
    f = lb.route(plain_fn(probe, outcome))
    return lb, lambda: f("payload"), variant_of(f)


def entry_call(probe: Probe, outcome: str, breaker: bool) -> tuple[Any, Runner, str]:
    # lb.call takes its deadline from Retry(timeout=)
    retry = lbclient.Retry(attempts=1, timeout=T) if outcome == "cut" else None
    lb = lbclient.Balancer(URLS, retry=retry, breaker=breaker_of(breaker), rng=1)
    fn = plain_fn(probe, outcome)
    return lb, lambda: lb.call(fn, "payload"), "run_call"


def entry_pick(probe: Probe, outcome: str, breaker: bool) -> tuple[Any, Runner, str]:
    lb = lbclient.Balancer(URLS, breaker=breaker_of(breaker), rng=1)

    async def run() -> str:
        async with lb.pick(timeout=T if outcome == "cut" else None) as ep:
            probe.urls.append(ep.url)
            return await act(probe, outcome)

    return lb, run, "pick"


def entry_hedged(probe: Probe, outcome: str, breaker: bool) -> tuple[Any, Runner, str]:
    lb = lbclient.Balancer(
        URLS, hedge=lbclient.Hedge(delay=10.0), breaker=breaker_of(breaker), rng=1
    )
    fn = plain_fn(probe, outcome)
    f = lb.route(timeout=T)(fn) if outcome == "cut" else lb.route(fn)
    return lb, lambda: f("payload"), variant_of(f)


def _entry_stream(
    probe: Probe, outcome: str, breaker: bool, *, after_first: bool
) -> tuple[Any, Runner, str]:
    lb = lbclient.Balancer(URLS, breaker=breaker_of(breaker), rng=1)
    fn = stream_fn(probe, outcome, after_first=after_first)
    if outcome == "cut":
        # before the first chunk the call's timeout applies; after it, idle_timeout
        f = lb.route(idle_timeout=T)(fn) if after_first else lb.route(timeout=T)(fn)
    else:
        f = lb.route(fn)

    async def run() -> list[str]:
        async with contextlib.aclosing(f("payload")) as agen:
            async for chunk in agen:
                probe.chunks.append(chunk)
        return probe.chunks

    return lb, run, "stream"


def entry_stream(probe: Probe, outcome: str, breaker: bool) -> tuple[Any, Runner, str]:
    return _entry_stream(probe, outcome, breaker, after_first=False)


def entry_stream_after_first(probe: Probe, outcome: str, breaker: bool) -> tuple[Any, Runner, str]:
    return _entry_stream(probe, outcome, breaker, after_first=True)


def entry_probe(probe: Probe, outcome: str, breaker: bool) -> tuple[Any, Runner, str]:
    """The decorated path whose pick is a half-open probe: the fast path hands the pick
    (with its probe token) over to the full path."""
    assert breaker
    lb = lbclient.Balancer(URLS, breaker=lbclient.Breaker(failures=1), rng=1)
    lb.set_health(A, False)
    lb.set_health(A, True)  # back up: A's next pick is its half-open probe
    fn = plain_fn(probe, outcome)
    f = lb.route(timeout=T)(fn) if outcome == "cut" else lb.route(fn)
    return lb, lambda: f("payload"), variant_of(f)


ENTRIES: dict[str, Callable[[Probe, str, bool], tuple[Any, Runner, str]]] = {
    "decorated": entry_decorated,
    "policies": entry_policies,
    "call": entry_call,
    "pick": entry_pick,
    "hedged": entry_hedged,
    "stream": entry_stream,
    "stream_after_first": entry_stream_after_first,
    "probe": entry_probe,
}

# The route variant each decorated entry must compile to (so the matrix covers each).
EXPECTED_VARIANT = {
    ("decorated", False): "_fast",
    ("decorated", True): "_full",  # a deadline
    ("policies", False): "_fast_then_retry",
    ("policies", True): "_full",  # Retry(timeout=) is a deadline
    ("hedged", False): "_hedged",
    ("probe", False): "_fast",
    ("probe", True): "_full",
    ("hedged", True): "_full",
}

CASES = [
    pytest.param(
        entry, outcome, breaker, id=f"{entry}-{outcome}-{'breaker' if breaker else 'plain'}"
    )
    for entry in ENTRIES
    for outcome in OUTCOMES
    for breaker in ((True,) if entry in ("policies", "probe") else (False, True))
]


# -- expectations ------------------------------------------------------------------------------


def expected_counts(outcome: str) -> dict[str, int]:
    zero = dict(requests=1, successes=0, failures=0, ignored=0, cancelled=0, cut=0, lost=0)
    if outcome == "success":
        zero["successes"] = 1
    elif outcome in ("connection", "status_503"):
        zero["failures"] = 1
    elif outcome == "user_bug":
        zero["ignored"] = 1
    elif outcome == "cut":
        zero["failures"] = 1
        zero["cut"] = 1
    else:
        zero["cancelled"] = 1
    return zero


def expected_failed_by(entry: str, outcome: str) -> dict[str, int]:
    if outcome in ("success", "cancel"):
        return {}
    if outcome == "cut":
        return {"stream idle": 1} if entry == "stream_after_first" else {"deadline": 1}
    if outcome in ("connection", "status_503") and entry == "policies":
        return {"attempts exhausted": 1}  # Retry(attempts=1): retryable, none left
    return {"error": 1}


def check_caller_error(entry: str, outcome: str, probe: Probe, exc: BaseException) -> None:
    if outcome == "cut":
        if entry == "stream_after_first":
            assert type(exc) is lbclient.StreamIdleTimeout, repr(exc)
        else:
            assert type(exc) is lbclient.DeadlineExceeded, repr(exc)
        return
    assert probe.raised is not None
    if outcome in ("connection", "status_503") and entry == "policies":
        assert type(exc) is lbclient.AttemptsExhausted, repr(exc)
        assert exc.__cause__ is probe.raised
        return
    # the wrapped code's own exception, unchanged (the very object it raised)
    assert exc is probe.raised, f"caller got {exc!r}, the function raised {probe.raised!r}"


async def wait_until(predicate: Callable[[], bool], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


# -- the matrix --------------------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "outcome", "breaker"), CASES)
async def test_accounting(entry: str, outcome: str, breaker: bool) -> None:
    probe = Probe()
    lb, run, variant = ENTRIES[entry](probe, outcome, breaker)
    key = (entry, outcome == "cut")
    if key in EXPECTED_VARIANT:
        assert variant == EXPECTED_VARIANT[key]

    t0 = time.monotonic()
    task = asyncio.ensure_future(run())
    if outcome == "cancel":
        await asyncio.wait_for(probe.started.wait(), 1.0)
        if entry == "stream_after_first":
            await wait_until(lambda: probe.chunks == ["first"])
        await asyncio.sleep(0.002)
        task.cancel()
    result: Any = None
    error: BaseException | None = None
    try:
        result = await task
    except BaseException as exc:  # the caller's view is what we check
        error = exc
    elapsed = time.monotonic() - t0
    assert elapsed < HANG / 2, f"the attempt was not stopped ({elapsed:.2f} s)"

    # -- what the caller got
    if outcome == "success":
        assert error is None, repr(error)
        if entry.startswith("stream"):
            want = ["answer", "last"]
            assert result == (["first", *want] if entry == "stream_after_first" else want)
        else:
            assert result == "answer"
    elif outcome == "cancel":
        assert isinstance(error, asyncio.CancelledError), repr(error)
        assert task.cancelled()
    else:
        assert error is not None, f"expected a failure, got {result!r}"
        check_caller_error(entry, outcome, probe, error)
    if entry == "stream_after_first" and outcome != "success":
        assert probe.chunks == ["first"]  # the committed chunk reached the caller

    # -- per endpoint: the picked one has exactly the outcome, the other nothing
    assert len(probe.urls) == 1, probe.urls
    picked = probe.urls[0]
    stats = lb.stats()
    for e in stats.endpoints:
        assert e.in_flight == 0, e
        got = dict(
            requests=e.requests,
            successes=e.successes,
            failures=e.failures,
            ignored=e.ignored,
            cancelled=e.cancelled,
            cut=e.cut,
            lost=e.lost,
        )
        if e.url == picked:
            assert got == expected_counts(outcome), f"{entry}/{outcome}: {got}"
        else:
            assert got == dict.fromkeys(got, 0), f"{entry}/{outcome} other endpoint: {got}"
        assert e.retries == 0 and e.hedges_sent == 0 and e.hedges_won == 0
    state = lb._pool.members[picked]
    # a counted failure is priced as a slow answer; nothing else leaves a penalty
    if outcome in COUNTED:
        assert state.penalty > 0, f"{entry}/{outcome}: no failure penalty"
        assert state.last_failure > -math.inf
    else:
        assert state.penalty == 0, f"{entry}/{outcome}: penalty {state.penalty}"
        assert state.last_failure == -math.inf
    # a success leaves a latency sample (a stream's: its time to first chunk)
    if outcome == "success":
        e = stats.endpoint(picked)
        if entry.startswith("stream"):
            assert e.ttft_p50_ms is not None
        else:
            assert e.p50_ms is not None
    elif outcome == "cancel":
        assert state.count == 0  # no verdict, no sample
        # ...except a stream's time to first chunk, when that chunk arrived
        assert state.ttft.count == (1 if entry == "stream_after_first" else 0)

    # -- totals
    assert stats.in_flight == 0
    assert lb._pool.totals.inflight == 0
    assert stats.calls == 1
    assert stats.attempts == 1
    assert stats.retries == 0
    assert stats.hedges_sent == 0
    failed_by = expected_failed_by(entry, outcome)
    assert dict(stats.failed_by) == failed_by
    assert stats.calls_failed == sum(failed_by.values())

    # -- the breaker: only the endpoint's own faults open it
    if entry == "probe":
        # A was forced open by its health check (trip 1), then let through to half-open:
        # a probe that works closes it, one that fails reopens it, no verdict leaves it
        # half-open with its probe slot free again.
        assert picked == A
        ea = stats.endpoint(A)
        b = lb._pool.members[A].breaker
        assert b is not None
        if outcome in COUNTED:
            assert (ea.breaker, ea.trips) == ("open", 2), ea
        elif outcome == "success":
            assert (ea.breaker, ea.trips) == ("closed", 1), ea
        else:
            assert (ea.breaker, ea.trips) == ("half_open", 1), ea
            assert b.probes_in_flight == 0
        eb = stats.endpoint(B)
        assert (eb.breaker, eb.trips) == ("closed", 0)
    elif breaker:
        for e in stats.endpoints:
            if e.url == picked and outcome in COUNTED:
                assert e.breaker == "open", f"{entry}/{outcome}: {e}"
                assert e.trips == 1
                assert not e.pickable
            else:
                assert e.breaker == "closed", f"{entry}/{outcome}: {e}"
                assert e.trips == 0
                assert e.pickable
    else:
        assert all(e.breaker is None for e in stats.endpoints)


def test_matrix_is_complete() -> None:
    """Every entry point meets every outcome (the matrix did not lose a row)."""
    seen = {(p.values[0], p.values[1]) for p in CASES}
    assert seen == {(e, o) for e in ENTRIES for o in OUTCOMES}
