"""One client process of ``admission.py``'s *10,000 at once* scenario.

::

    python benchmarks/_admission_burst.py '{"mode": "admission", "calls": 10000,
        "urls": [...], "virtual": false, "seed": 1, "request_timeout": 120,
        "max_wait": 0.3, "connector_limit": 100, "watchdog": 300}'

Submits ``calls`` calls at once (a task each, created in one go) and prints one JSON
line: outcomes by kind, latencies and times-to-error from the submission, wall time to
the last outcome, client CPU, peak RSS (``VmHWM``: this process only) -- and, for the
lbclient modes, what ``lb.stats()`` says afterwards (nothing may stay in flight or
queued).  Modes:

* ``aiohttp``   -- plain aiohttp, ``itertools.cycle`` over the URLs; lbclient is never
  imported (loopback), so its peak RSS is plain aiohttp's own;
* ``none``      -- the same request inside ``@lb.route(tenant=...)``,
  ``lbclient.Balancer(urls)``, no admission;
* ``admission`` -- ``lbclient.Balancer(urls, admission=Admission(max_wait=...))``.

With ``"virtual": true`` the replicas are ``vtime``'s simulated ones on a virtual clock
(same process: the RSS then includes them and lbclient's import in every mode).

A watchdog thread ends the process (exit code 3) after ``watchdog`` seconds whatever
happens; a call still pending when the burst's own deadline passes is counted *hung*.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHAT_PATH = "/v1/chat/completions"
PAYLOAD = {"model": "fake-model", "messages": [{"role": "user", "content": "Say hi."}]}
TENANT = "default"


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _watchdog(seconds: float) -> None:
    def fire() -> None:
        sys.stderr.write(f"admission burst child: watchdog after {seconds:.0f} s, exiting\n")
        sys.stderr.flush()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(-(-q * len(values) // 1)) - 1))
    return values[k]


async def _burst(spec: dict[str, Any]) -> dict[str, Any]:
    mode = spec["mode"]
    n = int(spec["calls"])
    virtual = bool(spec.get("virtual"))
    loop = asyncio.get_running_loop()
    outcome: list[str | None] = [None] * n
    end: list[float | None] = [None] * n
    session: Any = None
    lb: Any = None
    fleet: Any = None

    if virtual:
        sys.path.insert(0, str(HERE))
        import vtime

        fleet = vtime.fleet(
            int(spec["replicas"]),
            slots=int(spec["slots"]),
            base=float(spec["base"]),
            seed=int(spec["seed"]),
        )
        urls = list(fleet)
        sem = asyncio.Semaphore(int(spec["connector_limit"]))
        timeout = float(spec["request_timeout"])

        async def send(url: str) -> Any:
            async with asyncio.timeout(timeout):
                async with sem:
                    return await fleet[url].serve()

    else:
        import aiohttp

        urls = list(spec["urls"])
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=int(spec["connector_limit"])),
            timeout=aiohttp.ClientTimeout(total=float(spec["request_timeout"])),
        )

        async def send(url: str) -> Any:
            async with session.post(url + CHAT_PATH, json=PAYLOAD) as resp:
                resp.raise_for_status()
                return await resp.read()

    overloaded: type[BaseException] | None = None
    if mode == "aiohttp":
        cycle = itertools.cycle(urls)

        async def call(tenant: str) -> Any:
            return await send(next(cycle))

    else:
        import logging

        import lbclient

        log = logging.getLogger("lbclient")
        log.addHandler(logging.NullHandler())
        log.propagate = False  # events are still built (a real client's cost), not printed
        overloaded = lbclient.Overloaded
        admission = None
        if mode == "admission":
            admission = lbclient.Admission(max_wait=float(spec["max_wait"]))
        clock = None
        if virtual:
            import vtime

            clock = vtime.LoopClock()
        lb = lbclient.Balancer(urls, admission=admission, clock=clock, rng=int(spec["seed"]))

        @lb.route(tenant=lambda tenant: tenant)
        async def call(endpoint: Any, tenant: str) -> Any:
            return await send(endpoint.url)

    gc.collect()
    rss_before = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    t0 = loop.time()
    wall0 = time.perf_counter()
    cpu0 = time.process_time()

    async def one(i: int) -> None:
        try:
            await call(TENANT)
            outcome[i] = "ok"
        except asyncio.CancelledError:
            outcome[i] = "hung"
            raise
        except Exception as exc:
            if overloaded is not None and isinstance(exc, overloaded):
                outcome[i] = "shed:" + str(getattr(exc, "reason", "?"))
            else:
                status = getattr(exc, "status", None)
                outcome[i] = f"error:{type(exc).__name__}" + (f" {status}" if status else "")
        finally:
            end[i] = loop.time() - t0

    tasks = [loop.create_task(one(i)) for i in range(n)]
    created = loop.time() - t0
    _done, pending = await asyncio.wait(tasks, timeout=float(spec["burst_timeout"]))
    hung = len(pending)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    wall_loop = max(
        (e for e, o in zip(end, outcome, strict=True) if o != "hung" and e is not None), default=0.0
    )
    wall_real = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    hwm = _status_kb("VmHWM")
    counts: dict[str, int] = {}
    for o in outcome:
        key = o or "lost"
        counts[key] = counts.get(key, 0) + 1
    ok_lat = [e for e, o in zip(end, outcome, strict=True) if o == "ok" and e is not None]
    shed_lat = [
        e
        for e, o in zip(end, outcome, strict=True)
        if o and o.startswith("shed:") and e is not None
    ]
    shed_immediate = sum(1 for e in shed_lat if e <= 0.010)
    lb_out: dict[str, Any] | None = None
    if lb is not None:
        st = lb.stats()
        lb_out = {
            "calls": st.calls,
            "calls_failed": st.calls_failed,
            "failed_by": dict(st.failed_by),
            "in_flight_after": st.in_flight,
        }
        if st.admission is not None:
            lb_out["admission_in_flight_after"] = st.admission.in_flight
            lb_out["admission_queued_after"] = st.admission.queued
            lb_out["admission_limit_after"] = st.admission.limit
            lb_out["shed"] = dict(st.admission.shed)
        await lb.aclose()
    if session is not None:
        await session.close()
    served = sum(r.served for r in fleet.values()) if fleet is not None else None
    return {
        "mode": mode,
        "calls": n,
        "virtual": virtual,
        "outcomes": counts,
        "ok": counts.get("ok", 0),
        "shed": sum(v for k, v in counts.items() if k.startswith("shed:")),
        "errors": sum(v for k, v in counts.items() if k.startswith("error:")),
        "hung": hung,
        "lost": counts.get("lost", 0),
        "tasks_created_in_s": created,
        "wall_s": wall_loop,  # to the last outcome, on the loop's clock (virtual: virtual s)
        "wall_real_s": wall_real,
        "client_cpu_s": cpu,
        "rss_before_kb": rss_before,
        "peak_rss_before_kb": hwm_before,
        "peak_rss_kb": hwm,
        "ok_latency_s": {
            "p50": _quantile(ok_lat, 0.5),
            "p99": _quantile(ok_lat, 0.99),
            "max": max(ok_lat, default=None),
        },
        "shed_time_s": {
            "p50": _quantile(shed_lat, 0.5),
            "p99": _quantile(shed_lat, 0.99),
            "max": max(shed_lat, default=None),
        },
        "shed_within_10ms": shed_immediate,
        "lb": lb_out,
        "served_sim": served,
    }


def main() -> int:
    spec = json.loads(sys.argv[1])
    _watchdog(float(spec.get("watchdog", 600.0)))
    if spec.get("virtual"):
        sys.path.insert(0, str(HERE))
        import vtime

        result = vtime.run_virtual(lambda: _burst(spec))
    else:
        result = asyncio.run(_burst(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
