"""A :class:`lbclient.testing.ReplicaFleet` in its own process, driven over stdin/stdout.

So the replicas' CPU (HTTP parsing, timers) does not share an event loop -- or a GIL --
with the client being measured.  Used by ``hedging.py``::

    python benchmarks/_fleet_server.py '{"replicas": [{"base_latency": 0.04, ...}, ...],
                                         "seed": 1, "max_seconds": 600}'

Protocol (one JSON object per line on stdout):

* at start: ``{"urls": [...], "pid": N}`` once every replica listens;
* ``stats`` on stdin -> ``{"counters": [{received, served, ...} per replica],
  "cpu_s": process CPU seconds so far}``;
* ``clear N`` on stdin -> replica N's prefix cache is emptied (a restart) -> ``{"ok": true}``;
* ``set {"index": i, "fields": {...}}`` on stdin -> ``fleet[i].set(**fields)`` (a fault
  switched on or off mid-run) -> ``{"ok": true}``;
* ``quit`` or end of stdin (the parent went away) -> the fleet closes and the process
  exits.

Whatever happens, the process exits after ``max_seconds`` (a watchdog thread), so an
orphaned fleet never lingers.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

from lbclient.testing import ReplicaConfig, ReplicaFleet


def _watchdog(seconds: float) -> None:
    def fire() -> None:
        sys.stderr.write(f"fleet server: watchdog after {seconds:.0f} s, exiting\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def serve(spec: dict[str, Any]) -> None:
    configs = [ReplicaConfig(**fields) for fields in spec["replicas"]]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with ReplicaFleet(configs, seed=int(spec.get("seed", 0))) as fleet:
        _emit({"urls": fleet.urls, "pid": os.getpid()})
        while True:
            line = await reader.readline()
            cmd = line.decode().strip()
            if not line or cmd == "quit":
                return
            if cmd == "stats":
                _emit(
                    {
                        "counters": [r.counters.as_dict() for r in fleet],
                        "cpu_s": time.process_time(),
                    }
                )
            elif cmd.startswith("clear "):
                fleet[int(cmd.split()[1])].cache.clear()
            elif cmd.startswith("set "):
                args = json.loads(cmd[4:])
                fleet[int(args["index"])].set(**args["fields"])
                _emit({"ok": True})
            else:
                _emit({"error": f"unknown command {cmd!r}"})


def main() -> int:
    spec = json.loads(sys.argv[1])
    _watchdog(float(spec.get("max_seconds", 900.0)))
    try:
        asyncio.run(serve(spec))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
