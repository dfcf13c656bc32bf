"""`RedisServer`: a real ``redis-server`` on 127.0.0.1 for tests and benchmarks of the
fleet-shared state -- never a mock.

::

    from lbclient.testing import RedisServer

    with RedisServer() as redis:           # a free port, no persistence, in the foreground
        lb = lbclient.Balancer(urls, shared=lbclient.RedisState(redis.url))
        redis.kill()                        # SIGKILL: an outage, as in production
        redis.start()                       # back on the same port, empty
        redis.pause(); redis.resume()       # SIGSTOP / SIGCONT: a hung, then slow server

It runs Debian's ``redis-server`` (``apt-get install redis-server``) or whatever
``binary`` names, with ``--save '' --appendonly no`` (nothing survives a restart, as
with a cache Redis), bound to 127.0.0.1 only.  ``extra`` adds arguments, e.g.
``("--rename-command", "EVALSHA", "")`` for a server that refuses scripts.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType

__all__ = ["RedisServer", "free_port"]


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` process on ``127.0.0.1:port`` (see the module docstring)."""

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        extra: Sequence[str] = (),
        start_timeout: float = 5.0,
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server not found (Debian: apt-get install redis-server)")
        self.binary = found
        self.port = port if port is not None else free_port()
        self.extra = tuple(extra)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RedisServer:
        """Start it (again, on the same port) and wait until it answers ``PING``."""
        if self.running:
            return self
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *self.extra,
        ]
        deadline = time.monotonic() + self.start_timeout
        while True:
            proc = self.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
            )
            # Never outlive the interpreter (a test or script that raised before stop()).
            atexit.register(_reap, proc)
            while proc.poll() is None and time.monotonic() < deadline:
                if self.ping():
                    return self
                time.sleep(0.01)
            err = b""
            if proc.poll() is not None and proc.stderr is not None:
                err = proc.stderr.read()[-500:]
            self.stop()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}: {err!r}")
            time.sleep(0.05)  # exited at once (the port not free yet?): try again

    def ping(self, timeout: float = 0.2) -> bool:
        """Does it answer ``PING`` now?"""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to its clients, everything in it lost."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        self._close(proc)

    def pause(self) -> None:
        """SIGSTOP: it keeps its connections but answers nothing (a hung server)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`: it answers again, as if nothing happened."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after 5 s)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot exit
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._close(proc)

    @staticmethod
    def _close(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.stderr is not None:
            with contextlib.suppress(OSError):
                proc.stderr.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<lbclient.testing.RedisServer 127.0.0.1:{self.port} {state}>"
