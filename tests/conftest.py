"""Shared fixtures: an aiohttp session, a fake replica fleet factory, a fake clock."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path

import aiohttp
import pytest

from lbclient.testing import FakeClock, RedisServer, ReplicaConfig, ReplicaFleet

# ``from strategies import ...`` (tests/strategies.py) from any test directory.
_TESTS = str(Path(__file__).parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

FleetFactory = Callable[..., Awaitable[ReplicaFleet]]


def real_service(program: str, package: str) -> str:
    """The path of a real service's program (``promtool``, ``redis-server``).  Missing:
    the test skips on a developer's machine, and fails under ``.ci/run``
    (``LBCLIENT_REQUIRE_SERVICES=1``), which installs it -- CI never skips one."""
    path = shutil.which(program)
    if path is None:
        why = f"{program} not found (Debian: apt-get install {package})"
        if os.environ.get("LBCLIENT_REQUIRE_SERVICES"):
            pytest.fail(why)
        pytest.skip(why)
    return path


@pytest.fixture
def promtool() -> str:
    return real_service("promtool", "prometheus")


@pytest.fixture
def redis_server_bin() -> str:
    return real_service("redis-server", "redis-server")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A real ``redis-server`` on a free 127.0.0.1 port, no persistence, shared by the
    tests of one module (give each test its own namespace: ``redis_namespace``)."""
    binary = real_service("redis-server", "redis-server")
    with RedisServer(binary=binary) as server:
        yield server


@pytest.fixture
def redis_factory(redis_server_bin: str) -> Iterator[Callable[..., RedisServer]]:
    """``server = redis_factory(*extra_args)``: a real ``redis-server`` of this test's
    own (to kill, pause or configure), stopped after the test."""
    servers: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        server = RedisServer(binary=redis_server_bin, extra=extra).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_namespace() -> str:
    """A namespace no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


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
