"""The fake fleet in a child process (``_fleet_server.py``), from the benchmark's side.

A benchmark that must not share its event loop or GIL with the replicas starts the fleet
as a child process and talks to it over its stdin / stdout, one JSON line per command.
Every such child is listed in :data:`live_pids` while it runs, so that a script's hard
deadline (:func:`hard_deadline`) or its way out (:func:`kill_live`) can kill whatever is
left, whichever run it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Protocol

FLEET_SERVER = Path(__file__).resolve().parent / "_fleet_server.py"
FLEET_START_TIMEOUT = 30.0  # seconds for the child to print its URLs

live_pids: set[int] = set()  # child processes still running, for kill_live()


def kill_live() -> None:
    """SIGKILL every child process still listed in :data:`live_pids`."""
    for pid in list(live_pids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def run_main(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)``, then -- whatever happened -- kill the children left."""
    try:
        return asyncio.run(main)
    finally:
        kill_live()


class _Console(Protocol):
    def print(self, *objects: Any) -> None: ...


def hard_deadline(seconds: float, console: _Console, script: str) -> threading.Timer:
    """Whatever happens, stop after ``seconds``: kill the child processes and exit with
    code 124 (``script`` names the benchmark in the message)."""

    def fire() -> None:
        kill_live()
        console.print(f"[red]{script}: hard deadline of {seconds:.0f} s reached, exiting[/red]")
        sys.stdout.flush()
        os._exit(124)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


class FleetProcess:
    """``_fleet_server.py`` in a child process: ``start()``, ``stats()`` (or any other
    ``command()``), ``close()`` -- or ``async with``, which starts and closes it.  ``replicas`` are ``ReplicaConfig`` fields, one dict a
    replica; the child exits on its own after ``max_seconds`` (its watchdog)."""

    def __init__(self, replicas: list[dict[str, Any]], seed: int, max_seconds: float) -> None:
        self.spec = {"replicas": replicas, "seed": seed, "max_seconds": max_seconds}
        self.proc: asyncio.subprocess.Process | None = None
        self.urls: list[str] = []

    async def __aenter__(self) -> FleetProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> list[str]:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(FLEET_SERVER),
            json.dumps(self.spec),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        live_pids.add(self.proc.pid)
        hello = await self._line(FLEET_START_TIMEOUT)
        self.urls = list(hello["urls"])
        return self.urls

    async def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"fleet process exited (code {self.proc.returncode})")
        return json.loads(line)  # type: ignore[no-any-return]

    async def command(self, cmd: str) -> dict[str, Any]:
        """Send one command line (``stats``, ``clear 0``, ...) and return its answer."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._line(10.0)

    async def stats(self) -> dict[str, Any]:
        """Per-replica ``counters`` and the child's ``cpu_s``."""
        return await self.command("stats")

    async def close(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(Exception):
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.write(b"quit\n")
                await proc.stdin.drain()
                proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        live_pids.discard(proc.pid)
