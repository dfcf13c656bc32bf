"""Fallback pools (model groups): ``Balancer(..., fallback=other)``.

A call goes to the fallback when its own pool cannot serve it -- nothing pickable,
attempts exhausted, shed -- and only then; the error of a call every pool failed says
what each tried.  The wrapped functions fail or answer by endpoint URL, so each test
controls which pool can serve.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import lbclient

P1, P2 = "http://10.0.0.1:8000", "http://10.0.0.2:8000"  # the primary pool
V1 = "http://10.9.0.1:8000"  # the vendor pool
S1 = "http://10.8.0.1:8000"  # a third, last-resort pool


class Status(Exception):
    """An HTTP error as SDKs raise them (lbclient reads ``status_code``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status


def failing(*urls: str, error: Exception | None = None) -> Any:
    """An endpoint function that fails on ``urls`` and answers its URL elsewhere."""

    async def fn(endpoint: lbclient.Endpoint, *args: Any) -> str:
        if endpoint.url in urls:
            raise error if error is not None else ConnectionError(f"{endpoint.url} refused")
        return endpoint.url

    return fn


def chain(**primary: Any) -> tuple[lbclient.Balancer, lbclient.Balancer]:
    vendor = lbclient.Balancer([V1], name="vendor")
    return lbclient.Balancer([P1, P2], fallback=vendor, name="self-hosted", **primary), vendor


# =========================================================================================
# When a call falls back
# =========================================================================================


async def test_nothing_pickable_falls_back() -> None:
    lb, vendor = chain()
    lb.drain(P1)
    lb.drain(P2)
    assert await lb.call(failing()) == V1
    assert lb.stats().fallbacks == 1
    assert vendor.stats().calls == 1


async def test_attempts_exhausted_falls_back_with_every_route_variant() -> None:
    for primary in (
        {"retry": lbclient.Retry(attempts=2)},
        {"retry": lbclient.Retry(attempts=2), "breaker": lbclient.Breaker()},
        {"retry": lbclient.Retry(attempts=2), "hedge": lbclient.Hedge(delay=5.0)},
        {"retry": lbclient.Retry(attempts=2, timeout=5.0)},
        {"retry": lbclient.Retry(attempts=2), "admission": lbclient.Admission(limit=4)},
        {},  # no retry: a retryable failure of the one attempt
    ):
        lb, _ = chain(**primary)
        route = lb.route(failing(P1, P2))
        assert await route() == V1, primary
        assert await lb.call(failing(P1, P2)) == V1, primary
        assert lb.stats().fallbacks == 2, primary


async def test_shed_by_admission_falls_back() -> None:
    lb, _ = chain(admission=lbclient.Admission(limit=1, max_queue=0))
    release = asyncio.Event()

    @lb.route
    async def slow(endpoint: lbclient.Endpoint) -> str:
        if endpoint.url != V1:
            await release.wait()
        return endpoint.url

    first = asyncio.create_task(slow())
    await asyncio.sleep(0)
    assert await slow() == V1  # the primary's one slot is taken, its queue is 0
    release.set()
    assert await first in (P1, P2)


async def test_the_calls_own_errors_do_not_fall_back() -> None:
    lb, vendor = chain(retry=lbclient.Retry(attempts=3))
    with pytest.raises(Status):  # a 400 is a 400 in every pool
        await lb.call(failing(P1, P2, error=Status(400)))
    with pytest.raises(KeyError):  # a bug in the wrapped code
        await lb.call(failing(P1, P2, error=KeyError("choices")))
    lb2, _ = chain()  # no retry: a 4xx is still not the pool's failure
    with pytest.raises(Status):
        await lb2.call(failing(P1, P2, error=Status(404)))
    assert vendor.stats().calls == 0
    assert lb.stats().fallbacks == 0


async def test_a_deadline_does_not_fall_back() -> None:
    lb, vendor = chain(retry=lbclient.Retry(attempts=2, timeout=0.05))

    async def hang(endpoint: lbclient.Endpoint) -> str:
        if endpoint.url != V1:
            await asyncio.sleep(10)
        return endpoint.url

    with pytest.raises(lbclient.DeadlineExceeded):
        await lb.call(hang)
    assert vendor.stats().calls == 0


# =========================================================================================
# What a call every pool failed says
# =========================================================================================


async def test_every_pool_failed_says_what_each_tried() -> None:
    last = lbclient.Balancer([S1], name="last-resort")
    vendor = lbclient.Balancer([V1], name="vendor", fallback=last)
    lb = lbclient.Balancer(
        [P1, P2], name="self-hosted", fallback=vendor, retry=lbclient.Retry(attempts=2)
    )
    vendor.drain(V1)
    with pytest.raises(lbclient.PoolsExhausted) as info:
        await lb.call(failing(P1, P2, S1))
    err = info.value
    assert isinstance(err, lbclient.AttemptsExhausted)
    assert [p.pool for p in err.pools] == ["self-hosted", "vendor", "last-resort"]
    kinds = [type(p.error) for p in err.pools]
    assert kinds == [
        lbclient.AttemptsExhausted,
        lbclient.NoEndpointAvailable,
        ConnectionError,  # no retry in the last pool: its one error, as it was
    ]
    assert sorted(a.endpoint.url for a in err.attempts if a.endpoint) == [P1, P2]
    text = str(err)
    assert text.startswith("no pool could serve the call (3 pools): pool 'self-hosted': ")
    assert "pool 'vendor': all 1 endpoint(s) are draining" in text
    assert "pool 'last-resort': http://10.8.0.1:8000 refused" in text
    assert isinstance(err.__cause__, ConnectionError)
    assert lb.stats().fallbacks == 1 and vendor.stats().fallbacks == 1


async def test_retry_after_is_the_soonest_any_pool_said() -> None:
    vendor = lbclient.Balancer(
        [lbclient.Endpoint(V1, limits=lbclient.Limits(requests_per_minute=1))], name="v"
    )
    lb = lbclient.Balancer([P1], fallback=vendor)
    lb.drain(P1)
    async with vendor.pick():
        pass
    with pytest.raises(lbclient.PoolsExhausted) as info:
        await lb.call(failing())
    assert info.value.retry_after is not None and 55 < info.value.retry_after <= 60


async def test_a_fallback_pool_refusing_the_request_itself_raises_that_with_a_note() -> None:
    lb, _ = chain()
    lb.drain(P1)
    lb.drain(P2)
    with pytest.raises(Status) as info:
        await lb.call(failing(V1, error=Status(401)))
    notes = getattr(info.value, "__notes__", [])
    assert notes and "pool 'self-hosted' could not serve the call first" in notes[0]


async def test_pool_names_default_to_their_first_endpoint() -> None:
    vendor = lbclient.Balancer([V1])
    lb = lbclient.Balancer([P1, P2], fallback=vendor)
    lb.drain(P1)
    lb.drain(P2)
    vendor.drain(V1)
    with pytest.raises(lbclient.PoolsExhausted) as info:
        await lb.call(failing())
    assert [p.pool for p in info.value.pools] == [f"{P1} +1", V1]


# =========================================================================================
# Opting out, lb.pick, streams
# =========================================================================================


async def test_per_call_opt_out() -> None:
    lb, vendor = chain()
    lb.drain(P1)
    lb.drain(P2)
    with pytest.raises(lbclient.NoEndpointAvailable):
        await lb.call(failing(), fallback=False)
    with pytest.raises(lbclient.NoEndpointAvailable):
        await lb.route(fallback=False)(failing())()
    with pytest.raises(lbclient.NoEndpointAvailable):
        async with lb.pick(fallback=False):
            pass
    assert vendor.stats().calls == 0


async def test_pick_falls_back_when_nothing_can_be_picked() -> None:
    lb, vendor = chain()
    lb.drain(P1)
    lb.drain(P2)
    async with lb.pick(key="k") as endpoint:
        assert endpoint.url == V1
    assert vendor.stats().endpoint(V1).successes == 1
    with pytest.raises(ValueError):
        async with lb.pick() as endpoint:
            raise ValueError("the block's own error reaches the fallback's lease")
    assert vendor.stats().endpoint(V1).ignored == 1


async def test_a_fallback_pick_takes_its_own_pools_timeout_unless_one_was_given() -> None:
    """``lb.pick()`` without ``timeout=`` is bounded by each pool's ``Retry.timeout`` --
    the pool that picks, as ``lb.call`` does; a timeout given applies everywhere."""
    vendor = lbclient.Balancer([V1], name="vendor", retry=lbclient.Retry(timeout=5.0))
    lb = lbclient.Balancer([P1], fallback=vendor, retry=lbclient.Retry(timeout=0.05))
    lb.drain(P1)
    async with lb.pick() as endpoint:
        assert endpoint.url == V1
        await asyncio.sleep(0.15)  # past the primary's 0.05 s, well inside the vendor's
    assert vendor.stats().endpoint(V1).successes == 1
    with pytest.raises(lbclient.DeadlineExceeded):
        async with lb.pick(timeout=0.05) as endpoint:
            assert endpoint.url == V1
            await asyncio.sleep(1.0)


async def test_streams_fall_back_before_their_first_chunk_never_after() -> None:
    lb, _ = chain(retry=lbclient.Retry(attempts=2))
    broken_after_first = {P1, P2}

    @lb.route
    async def tokens(endpoint: lbclient.Endpoint, fail_first: bool) -> Any:
        if endpoint.url != V1 and fail_first:
            raise ConnectionError("refused")
        yield endpoint.url
        if endpoint.url in broken_after_first:
            raise ConnectionError("cut mid-stream")
        yield "end"

    assert [x async for x in tokens(True)] == [V1, "end"]
    got: list[str] = []
    with pytest.raises(ConnectionError, match="cut mid-stream"):
        async for x in tokens(False):
            got.append(x)
    assert got in ([P1], [P2])  # committed to the primary: no fallback, no duplicate
    assert lb.stats().fallbacks == 1


async def test_decorating_does_not_touch_the_fallback_until_a_call_needs_it() -> None:
    lb, vendor = chain()
    route = lb.route(failing())
    await vendor.aclose()
    assert await route() in (P1, P2)


# =========================================================================================
# Configuration
# =========================================================================================


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("http://x", r"fallback must be an lbclient.Balancer or None, got 'http://x'"),
        (lbclient.Balancer, r"fallback must be an lbclient.Balancer or None"),
        (42, r"got 42"),
    ],
)
def test_fallback_must_be_a_balancer(value: object, pattern: str) -> None:
    with pytest.raises(lbclient.ConfigError, match=pattern):
        lbclient.Balancer([P1], fallback=value)  # type: ignore[arg-type]


async def test_a_closed_fallback_is_refused() -> None:
    vendor = lbclient.Balancer([V1])
    await vendor.aclose()
    with pytest.raises(lbclient.ConfigError, match="closed"):
        lbclient.Balancer([P1], fallback=vendor)


def test_a_cycle_is_refused_at_construction() -> None:
    a = lbclient.Balancer([P1], name="a")
    b = lbclient.Balancer([V1], name="b", fallback=a)
    # Re-initialising ``a`` to fall back to ``b`` would make a -> b -> a.
    with pytest.raises(lbclient.ConfigError, match=r"fallback chain has a cycle: .*name='b'"):
        a.__init__([P1], name="a", fallback=b)  # type: ignore[misc]
    assert a.fallback is None and b.fallback is a


def test_names_and_reprs() -> None:
    lb, vendor = chain()
    assert lb.name == "self-hosted" and lb.fallback is vendor
    assert repr(lb).startswith("<lbclient.Balancer name='self-hosted' ")
    with pytest.raises(lbclient.ConfigError, match="name must be a non-empty str"):
        lbclient.Balancer([P1], name=" ")
    with pytest.raises(lbclient.ConfigError, match="route fallback must be a bool"):
        lb.route(fallback="no")(failing())  # type: ignore[arg-type]
