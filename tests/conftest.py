"""Shared fixtures: an aiohttp session, a fake replica fleet factory, a fake clock."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import aiohttp
import pytest

from lbclient.testing import FakeClock, ReplicaConfig, ReplicaFleet

# ``from strategies import ...`` (tests/strategies.py) from any test directory.
_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

FleetFactory = Callable[..., Awaitable[ReplicaFleet]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A real aiohttp client session, closed after the test."""
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
async def fleet_factory() -> AsyncIterator[FleetFactory]:
    """``fleet = await fleet_factory([ReplicaConfig(...), ...], seed=0)``: a started
    :class:`ReplicaFleet` on 127.0.0.1, closed after the test."""
    fleets: list[ReplicaFleet] = []

    async def make(configs: Iterable[ReplicaConfig], *, seed: int | None = 0) -> ReplicaFleet:
        fleet = ReplicaFleet(configs, seed=seed)
        await fleet.start()
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        await fleet.aclose()
