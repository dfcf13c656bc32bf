"""`ReplicaFleet`: a fleet of fake OpenAI-compatible replicas on 127.0.0.1, for tests,
benchmarks and chaos experiments.

Every replica is a real HTTP server (``aiohttp.web``) listening on its own ephemeral
port of 127.0.0.1, running in the *current* event loop.  Each one simulates an LLM
inference server with a bounded number of concurrent slots, a FIFO queue in front of
them and a random (lognormal) service time, plus a set of faults you can switch on and
off while the fleet runs: errors, rate limiting, stragglers, hangs, broken streams,
network distance, failing health checks and a closed listener.

::

    from lbclient.testing import ReplicaConfig, ReplicaFleet

    async with ReplicaFleet(
        [
            ReplicaConfig(speed=1.0, capacity=2),
            ReplicaConfig(speed=0.5, region="eu-west-1", network_latency=0.03),
            ReplicaConfig(),
        ],
        seed=7,
    ) as fleet:
        fleet.urls                    # ["http://127.0.0.1:PORT", ...] in order
        fleet[1].set(error_rate=0.5)  # change any ReplicaConfig field while running
        await fleet[2].down()         # connection refused; open connections are dropped
        await fleet[2].up()           # listening again, on the same port
        fleet[0].counters.served      # ReplicaCounters, live

All durations are in **seconds** (floats).  A request to a completion endpoint goes
through these steps; the faults act at the step named:

1. The body is read (and parsed as JSON only if there is one; an unparsable body is
   treated as ``{}``).  Every random decision for the request is drawn now, from the
   replica's own seeded :class:`random.Random`, so a fleet with a fixed ``seed`` that
   receives requests in the same order makes the same decisions.
2. ``network_latency``: the request waits this long first (applies to every endpoint,
   ``/health`` included) -- it simulates distance to the replica.
3. ``hang``: the request is never answered (until the client gives up, the replica goes
   :meth:`~Replica.down` or the fleet closes).  A hanging request takes no slot.
4. ``rate_limit_rate``: with that probability a ``429`` is answered at once, with
   ``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms`` headers.
5. The request waits in a FIFO queue for one of ``capacity`` slots and then holds the
   slot for its service time ``base_latency / speed * lognormvariate(-sigma**2 / 2,
   sigma)`` (mean ``base_latency / speed``), multiplied by ``straggler_factor`` with
   probability ``straggler_rate``.
6. ``error_rate``: with that probability the answer is a ``500`` with a JSON error body
   (sent *after* the service time, like a real failing server).
7. Otherwise a ``200`` OpenAI-style response, or, with ``"stream": true`` in the body,
   a server-sent-event stream (see :class:`ReplicaConfig` for ``ttft``, ``token_delay``,
   ``tokens`` and ``error_after_tokens``).  A stream holds its slot until it ends.

Every answer of a completion endpoint carries ``x-replica`` (the replica's name),
``x-queue-depth`` (the *other* requests waiting for a slot or holding one at the time the
response headers are sent -- the request being answered is not counted, so an idle replica
answers 0; feed it to ``Balancer.report_load``) and
``x-region`` / ``x-zone`` when set.  Answers that held a slot (``200``, ``500``) also
carry ``x-service-time``: the time the request held its slot before the headers were
sent (the sampled service time, or the time to first token of a stream), in seconds --
handy to check what a replica drew without timing it from the client side.

Prefix cache (``kv_cache_blocks`` > 0 or ``prefill_per_block`` > 0): when a request takes
its slot, its prompt (the chat messages as :func:`lbclient.prompt_text` writes them, or a
completion's ``prompt``) is looked up in the replica's :class:`PrefixCache` -- blocks of
``kv_block_chars`` characters, LRU, ``kv_cache_blocks`` of them -- and every block not
cached adds ``prefill_per_block`` to the service time (divided by ``speed``); the prompt's
blocks are cached from then on.  ``counters.prompt_blocks`` / ``cached_blocks`` give the
replica-side hit ratio.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /health``
(``200 {"status": "ok"}``, or ``503`` when ``healthy=False``), ``GET /v1/models`` and
``GET /metrics`` (Prometheus text in vLLM's names -- ``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, prefix-cache queries and
hits -- or SGLang's with ``metrics_format="sglang"``).
Any other path answers ``404`` (another method on a known path ``405``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
from aiohttp import web

from .._errors import ConfigError
from .._numbers import is_int
from .._prompt import prompt_text
from ._kvcache import PrefixCache

__all__ = ["Replica", "ReplicaConfig", "ReplicaCounters", "ReplicaFleet"]

_HOST = "127.0.0.1"
_SHUTDOWN_TIMEOUT = 0.25
"""aiohttp's graceful-shutdown wait per connection; our own shutdown aborts everything
first, so this only bounds the (never expected) leftovers."""
_DRAIN_TIMEOUT = 1.0
"""How long ``down()``/``aclose()`` wait for cancelled handlers to finish."""
_BACKLOG = 1024
_JSON_HEADERS = {"Content-Type": "application/json"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


# --------------------------------------------------------------------------- config


_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _number(
    *, minimum: float = 0.0, open_min: bool = False, maximum: float | None = None
) -> _Validator:
    bound = f"> {minimum:g}" if open_min else f">= {minimum:g}"
    if maximum is not None:
        bound = f"in [{minimum:g}, {maximum:g}]"

    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"ReplicaConfig.{attribute.name} must be a number, got {value!r}")
        v = float(value)
        if (
            not math.isfinite(v)
            or v < minimum
            or (open_min and v == minimum)
            or (maximum is not None and v > maximum)
        ):
            raise ConfigError(
                f"ReplicaConfig.{attribute.name} must be finite and {bound}, got {value!r}"
            )

    return check


def _integer(*, minimum: int) -> _Validator:
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not is_int(value):
            raise ConfigError(f"ReplicaConfig.{attribute.name} must be an int, got {value!r}")
        if value < minimum:
            raise ConfigError(f"ReplicaConfig.{attribute.name} must be >= {minimum}, got {value!r}")

    return check


def _optional(inner: _Validator) -> _Validator:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            inner(instance, attribute, value)

    return check


def _flag(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"ReplicaConfig.{attribute.name} must be a bool, got {value!r}")


def _text(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"ReplicaConfig.{attribute.name} must be a non-empty str, got {value!r}")


_label = _optional(_text)


def _metrics_format(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value not in ("vllm", "sglang"):
        raise ConfigError(
            f"ReplicaConfig.{attribute.name} must be 'vllm' or 'sglang', got {value!r}"
        )


@attrs.frozen(kw_only=True)
class ReplicaConfig:
    """How one fake replica behaves.  Immutable; validated at construction.

    Every field can be changed while the fleet runs with :meth:`Replica.set` (except
    ``down``: use ``await replica.down()`` / ``await replica.up()``).  A bad value
    raises :class:`lbclient.ConfigError` whose message names the field and the value.
    All durations are in seconds.

    Performance
        ``speed`` (float > 0, default 1.0)
            Relative speed: every compute time (service time, explicit ``ttft``,
            ``token_delay``) is divided by it.  ``speed=0.5`` is twice as slow.
            ``network_latency`` is not scaled.
        ``base_latency`` (>= 0, default 0.040)
            Mean service time at ``speed=1.0``.
        ``sigma`` (>= 0, default 0.25)
            Lognormal shape of the service time: ``base_latency / speed *
            lognormvariate(-sigma**2 / 2, sigma)`` (the factor has mean 1);
            ``sigma=0`` makes it constant.
        ``capacity`` (int >= 1, default 4)
            Concurrent slots.  Requests beyond wait in a FIFO queue; the
            ``x-queue-depth`` response header reports the other waiting + in-service
            requests.
        ``network_latency`` (>= 0, default 0)
            Delay added before anything else, on every endpoint: distance to the
            replica.

    Faults (probabilities are in [0, 1] and drawn per request)
        ``straggler_rate`` (default 0) / ``straggler_factor`` (>= 1, default 20)
            With probability ``straggler_rate`` the service time (and the
            time to first token of a stream) is multiplied by ``straggler_factor``.
        ``error_rate`` (default 0)
            Answer ``500`` with a JSON error body, after the service time (the slot
            is held meanwhile).  Counted in ``errors``.
        ``rate_limit_rate`` (default 0) / ``retry_after`` (>= 0, default 1.0)
            Answer ``429`` at once (no slot taken) with ``Retry-After:
            ceil(retry_after)`` and ``retry-after-ms``.  Counted in ``rejected_429``.
        ``hang`` (default False)
            Accept requests and never answer them; a hanging request takes no slot
            and ends only when the client disconnects (counted in ``cancelled``) or
            the replica goes down / the fleet closes (counted in ``dropped``).
            Turning ``hang`` off does not release requests already hanging.
        ``healthy`` (default True)
            ``GET /health`` answers ``503`` when False; nothing else changes.
        ``down`` (default False)
            Initial state only: the replica starts with its listener closed (its
            port stays reserved, connections are refused).

    Streaming (``"stream": true`` in the request body)
        ``ttft`` (>= 0 or None, default None)
            Time to first token once the request holds a slot, at ``speed=1.0``
            (divided by ``speed``, multiplied by ``straggler_factor`` for a
            straggler).  ``None`` uses the sampled service time.  The response
            headers are sent together with the first token.
        ``token_delay`` (>= 0, default 0.005)
            Time between tokens (divided by ``speed``).
        ``tokens`` (int >= 0, default 8)
            Content tokens per answer, ``"tok0 "``, ``"tok1 "``, ... (also the content
            of non-streaming answers, after ``"<name>: "``).
        ``error_after_tokens`` (int >= 0 or None, default None)
            When set, a stream sends ``min(error_after_tokens, tokens)`` tokens, waits
            ``token_delay`` and then aborts the connection (no final chunk, no
            ``[DONE]``): the client sees a payload error.  Counted in ``dropped``.
            Non-streaming requests are not affected.

    Prefix cache (see the module docstring)
        ``kv_cache_blocks`` (int >= 0, default 0)
            Blocks the replica's prefix cache holds (LRU); 0: nothing is cached.
        ``kv_block_chars`` (int >= 1, default 64)
            Characters per block (~16 tokens).
        ``prefill_per_block`` (>= 0, default 0)
            Service time added per prompt block not in the cache, at ``speed=1.0``.
        ``metrics_format`` (``"vllm"`` or ``"sglang"``, default ``"vllm"``)
            The metric names ``GET /metrics`` answers with.

    Labels
        ``name`` (default ``"replica-<index>"``), ``region``, ``zone`` (default None)
            Sent back in ``x-replica`` / ``x-region`` / ``x-zone`` headers.
        ``model`` (default ``"fake-model"``)
            Listed by ``/v1/models``; answers echo the request's ``model`` if any.
    """

    speed: float = attrs.field(default=1.0, validator=_number(open_min=True))
    base_latency: float = attrs.field(default=0.040, validator=_number())
    sigma: float = attrs.field(default=0.25, validator=_number())
    capacity: int = attrs.field(default=4, validator=_integer(minimum=1))
    network_latency: float = attrs.field(default=0.0, validator=_number())
    straggler_rate: float = attrs.field(default=0.0, validator=_number(maximum=1.0))
    straggler_factor: float = attrs.field(default=20.0, validator=_number(minimum=1.0))
    error_rate: float = attrs.field(default=0.0, validator=_number(maximum=1.0))
    rate_limit_rate: float = attrs.field(default=0.0, validator=_number(maximum=1.0))
    retry_after: float = attrs.field(default=1.0, validator=_number())
    hang: bool = attrs.field(default=False, validator=_flag)
    healthy: bool = attrs.field(default=True, validator=_flag)
    down: bool = attrs.field(default=False, validator=_flag)
    ttft: float | None = attrs.field(default=None, validator=_optional(_number()))
    token_delay: float = attrs.field(default=0.005, validator=_number())
    tokens: int = attrs.field(default=8, validator=_integer(minimum=0))
    error_after_tokens: int | None = attrs.field(
        default=None, validator=_optional(_integer(minimum=0))
    )
    name: str | None = attrs.field(default=None, validator=_label)
    region: str | None = attrs.field(default=None, validator=_label)
    zone: str | None = attrs.field(default=None, validator=_label)
    model: str = attrs.field(default="fake-model", validator=_text)
    kv_cache_blocks: int = attrs.field(default=0, validator=_integer(minimum=0))
    kv_block_chars: int = attrs.field(default=64, validator=_integer(minimum=1))
    prefill_per_block: float = attrs.field(default=0.0, validator=_number())
    metrics_format: str = attrs.field(default="vllm", validator=_metrics_format)


_CONFIG_FIELDS = frozenset(a.name for a in attrs.fields(ReplicaConfig))


def _evolve(config: ReplicaConfig, fields: Mapping[str, Any]) -> ReplicaConfig:
    unknown = sorted(set(fields) - _CONFIG_FIELDS)
    if unknown:
        raise ConfigError(f"unknown ReplicaConfig field(s): {', '.join(unknown)}")
    if "down" in fields:
        raise ConfigError(
            "ReplicaConfig.down cannot be set on a running replica; "
            "use 'await replica.down()' / 'await replica.up()'"
        )
    return attrs.evolve(config, **fields)


# ------------------------------------------------------------------------- counters


@attrs.define(kw_only=True)
class ReplicaCounters:
    """What one replica has seen, counting completion requests only
    (``/v1/chat/completions`` and ``/v1/completions``).

    ``received``       requests that reached the handler
    ``served``         ``200`` answers completed (a stream counts once its ``[DONE]``
                       is written)
    ``errors``         injected ``500`` answers (``error_rate``)
    ``rejected_429``   injected ``429`` answers (``rate_limit_rate``)
    ``cancelled``      the client went away before the answer was complete (timeout,
                       disconnect); the request's slot was released
    ``dropped``        the replica itself broke the request: ``down()``, fleet shutdown,
                       or ``error_after_tokens``
    ``in_flight``      gauge: requests being handled now, network delay, hanging and
                       queued ones included
    ``max_in_flight``  highest ``in_flight`` seen since start / last reset
    ``health_checks``  ``GET /health`` requests received (not part of the above)
    ``prompt_blocks``  prompt blocks of the requests that took a slot (prefix cache)
    ``cached_blocks``  of which found in the replica's prefix cache

    Once nothing is in flight, ``received == served + errors + rejected_429 + cancelled
    + dropped``.  The counters a :class:`Replica` exposes are live; use
    :meth:`snapshot` for a copy.
    """

    received: int = 0
    served: int = 0
    errors: int = 0
    rejected_429: int = 0
    cancelled: int = 0
    dropped: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    health_checks: int = 0
    prompt_blocks: int = 0
    cached_blocks: int = 0

    @property
    def hit_ratio(self) -> float:
        """``cached_blocks / prompt_blocks`` (0 before any prompt)."""
        return self.cached_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    def snapshot(self) -> ReplicaCounters:
        """A copy that no longer changes."""
        return attrs.evolve(self)

    def as_dict(self) -> dict[str, int]:
        return attrs.asdict(self)

    @property
    def finished(self) -> int:
        """Requests that ended, however they ended."""
        return self.served + self.errors + self.rejected_429 + self.cancelled + self.dropped


# -------------------------------------------------------------------------- replica


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _bind(port: int) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:port but not listening: it reserves the port and
    connections to it are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((_HOST, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Replica:
    """One fake replica of a :class:`ReplicaFleet` (built by the fleet, not by you).

    ``url``, ``port``, ``index``, ``name`` and ``config`` describe it; ``counters``
    (:class:`ReplicaCounters`, live) tells what it saw; :meth:`set` changes its
    behaviour while it runs; :meth:`down` / :meth:`up` close and reopen its listener.
    """

    def __init__(self, index: int, config: ReplicaConfig, rng: random.Random) -> None:
        self.index = index
        self._config = config
        self._rng = rng
        self._counters = ReplicaCounters()
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._placeholder: socket.socket | None = None
        """Bound, non-listening socket holding the port while down."""
        self._closing = False
        self._generation = 0
        """Bumped by down()/aclose(): requests from an older generation were dropped."""
        self._tasks: set[asyncio.Task[Any]] = set()
        # FIFO slots
        self._busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._headers: dict[str, str] = {}
        self._seq = 0
        self._cache = PrefixCache(config.kv_cache_blocks, config.kv_block_chars)
        self._update_static()

    def __repr__(self) -> str:
        state = "down" if self.is_down else "up"
        where = self._url_or_none() or "not started"
        return f"<Replica {self.name} {where} {state}>"

    # ----------------------------------------------------------- description

    @property
    def config(self) -> ReplicaConfig:
        """The current configuration (``down`` reflects the current state)."""
        return self._config

    @property
    def name(self) -> str:
        """``config.name``, or ``"replica-<index>"``."""
        return self._config.name or f"replica-{self.index}"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the fleet is not started")
        return self._port

    @property
    def url(self) -> str:
        """``"http://127.0.0.1:PORT"`` (no trailing slash)."""
        return f"http://{_HOST}:{self.port}"

    def _url_or_none(self) -> str | None:
        return None if self._port is None else f"http://{_HOST}:{self._port}"

    @property
    def counters(self) -> ReplicaCounters:
        """Live counters (see :class:`ReplicaCounters`)."""
        return self._counters

    @property
    def is_down(self) -> bool:
        return self._site is None

    @property
    def cache(self) -> PrefixCache:
        """The replica's prefix cache (``clear()`` it to simulate a restart)."""
        return self._cache

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot plus requests holding one, now."""
        return self._busy + len(self._waiters)

    # --------------------------------------------------------------- control

    def set(self, **fields: Any) -> ReplicaConfig:
        """Change configuration fields while running; returns the new config.

        Applies to requests that arrive afterwards (a request already past a step keeps
        what it drew; a larger ``capacity`` admits queued requests at once).  Raises
        :class:`~lbclient.ConfigError` on an unknown field, a bad value or ``down``.
        """
        self._apply(_evolve(self._config, fields))
        return self._config

    def _apply(self, config: ReplicaConfig) -> None:
        cache = self._cache
        if config.kv_block_chars != cache.block_chars:
            self._cache = PrefixCache(config.kv_cache_blocks, config.kv_block_chars)
        elif config.kv_cache_blocks != cache.capacity:
            cache.resize(config.kv_cache_blocks)
        self._config = attrs.evolve(config, down=self._config.down)
        self._update_static()
        self._wake()

    def reset_counters(self) -> None:
        """Zero the counters; ``in_flight`` is a gauge and stays, ``max_in_flight``
        restarts from it."""
        c = self._counters  # in place: requests in progress hold a reference to it
        c.received = c.served = c.errors = c.rejected_429 = 0
        c.cancelled = c.dropped = c.health_checks = 0
        c.prompt_blocks = c.cached_blocks = 0
        c.max_in_flight = c.in_flight

    async def down(self) -> None:
        """Take the replica down like a crash.

        The listener is closed (new connections get *connection refused*; the port stays
        reserved for :meth:`up`), every open connection is aborted -- idle keep-alive
        ones too, so a client pool cannot keep using them -- and requests in progress
        end at once (counted in ``dropped``; their clients see a disconnect).  Returns
        when those requests have finished.  No-op if already down.
        """
        if self._runner is None:
            raise RuntimeError("the fleet is not started")
        if self._site is None:
            return
        site, self._site = self._site, None
        self._config = attrs.evolve(self._config, down=True)
        await site.stop()  # closes the listening socket, synchronously
        # Re-reserve the port at once, before any other socket can take it.
        self._placeholder = _bind(self.port)
        await self._drop_everything()

    async def up(self) -> None:
        """Listen again on the same port.  No-op if already up."""
        if self._runner is None or self._closing:
            raise RuntimeError("the fleet is not started")
        if self._site is not None:
            return
        sock = self._placeholder if self._placeholder is not None else _bind(self.port)
        self._placeholder = None
        site = web.SockSite(self._runner, sock, backlog=_BACKLOG)
        try:
            await site.start()
        except BaseException:
            sock.close()
            raise
        self._site = site
        self._config = attrs.evolve(self._config, down=False)

    async def _drop_everything(self) -> None:
        """Abort every connection and end every request in progress."""
        self._generation += 1
        runner = self._runner
        if runner is not None and runner.server is not None:
            for conn in runner.server.connections:
                transport = conn.transport
                if transport is not None:
                    transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_DRAIN_TIMEOUT)
        # Let the aborts reach the peers: a client running in this event loop then sees
        # its pooled keep-alive connections closed before it tries to reuse one (that
        # takes ~3 loop iterations: our connection_lost, the peer's read, its
        # connection_lost).
        for _ in range(6):
            await asyncio.sleep(0)

    # ------------------------------------------------------------- lifecycle

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._text)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
            access_log=None,
        )
        await runner.setup()
        self._runner = runner
        try:
            self._placeholder = _bind(0)
            self._port = self._placeholder.getsockname()[1]
            if not self._config.down:
                await self.up()
        except BaseException:
            await self._aclose()
            raise

    async def _aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        site, self._site = self._site, None
        if site is not None:
            await site.stop()
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        await self._drop_everything()
        if self._runner is not None:
            await self._runner.cleanup()

    # -------------------------------------------------------------- FIFO slots

    async def _acquire(self) -> None:
        if self._busy < self._config.capacity and not self._waiters:
            self._busy += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # the slot was granted just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def _release(self) -> None:
        self._busy -= 1
        self._wake()

    def _wake(self) -> None:
        capacity = self._config.capacity
        waiters = self._waiters
        while waiters and self._busy < capacity:
            fut = waiters.popleft()
            if not fut.done():
                self._busy += 1
                fut.set_result(None)

    # ---------------------------------------------------------------- handlers

    def _update_static(self) -> None:
        cfg = self._config
        headers = {"x-replica": self.name}
        if cfg.region is not None:
            headers["x-region"] = cfg.region
        if cfg.zone is not None:
            headers["x-zone"] = cfg.zone
        self._headers = headers

    def _response_headers(
        self, service: float | None = None, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        headers = dict(self._headers)
        depth = self._busy + len(self._waiters)
        if service is not None:  # this request holds a slot: do not count it
            depth -= 1
        headers["x-queue-depth"] = str(max(0, depth))
        if service is not None:
            headers["x-service-time"] = f"{service:.6f}"
        if extra:
            headers.update(extra)
        return headers

    async def _health(self, request: web.Request) -> web.Response:
        self._counters.health_checks += 1
        cfg = self._config
        if cfg.network_latency > 0:
            await asyncio.sleep(cfg.network_latency)
        headers = {**self._headers, **_JSON_HEADERS}
        if self._config.healthy:
            return web.Response(
                body=_dumps({"status": "ok", "replica": self.name}), headers=headers
            )
        return web.Response(
            status=503, body=_dumps({"status": "unhealthy", "replica": self.name}), headers=headers
        )

    async def _models(self, request: web.Request) -> web.Response:
        cfg = self._config
        if cfg.network_latency > 0:
            await asyncio.sleep(cfg.network_latency)
        data = {
            "object": "list",
            "data": [{"id": cfg.model, "object": "model", "created": 0, "owned_by": self.name}],
        }
        return web.Response(body=_dumps(data), headers={**self._headers, **_JSON_HEADERS})

    async def _metrics(self, request: web.Request) -> web.Response:
        cfg = self._config
        if cfg.network_latency > 0:
            await asyncio.sleep(cfg.network_latency)
        running, waiting = self._busy, len(self._waiters)
        c = self._counters
        usage = self._cache.usage
        label = '{model_name="' + cfg.model + '"}'
        if cfg.metrics_format == "sglang":
            rows = [
                ("sglang:num_running_reqs", "gauge", running),
                ("sglang:num_queue_reqs", "gauge", waiting),
                ("sglang:token_usage", "gauge", usage),
                ("sglang:cache_hit_rate", "gauge", c.hit_ratio),
            ]
        else:
            rows = [
                ("vllm:num_requests_running", "gauge", running),
                ("vllm:num_requests_waiting", "gauge", waiting),
                ("vllm:kv_cache_usage_perc", "gauge", usage),
                ("vllm:prefix_cache_queries_total", "counter", c.prompt_blocks),
                ("vllm:prefix_cache_hits_total", "counter", c.cached_blocks),
            ]
        lines = []
        for name, kind, value in rows:
            base = name[: -len("_total")] if kind == "counter" else name
            lines.append(f"# HELP {base} fake replica {self.name}")
            lines.append(f"# TYPE {base} {kind}")
            lines.append(f"{name}{label} {float(value)!r}")
        return web.Response(
            text="\n".join(lines) + "\n",
            content_type="text/plain",
            charset="utf-8",
            headers=self._headers,
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=True)

    async def _text(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=False)

    async def _completion(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        cfg = self._config
        rng = self._rng
        counters = self._counters
        counters.received += 1
        counters.in_flight += 1
        if counters.in_flight > counters.max_in_flight:
            counters.max_in_flight = counters.in_flight
        self._seq += 1
        request_id = f"fake-{self.name}-{self._seq}"
        generation = self._generation
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        # Every random decision, drawn up front (deterministic for a given arrival order).
        rate_limited = cfg.rate_limit_rate > 0 and rng.random() < cfg.rate_limit_rate
        factor = 1.0
        if cfg.straggler_rate > 0 and rng.random() < cfg.straggler_rate:
            factor = cfg.straggler_factor
        service = cfg.base_latency / cfg.speed * factor
        if cfg.sigma > 0:
            service *= rng.lognormvariate(-cfg.sigma * cfg.sigma / 2, cfg.sigma)
        failed = cfg.error_rate > 0 and rng.random() < cfg.error_rate
        holding = False
        counted = False
        try:
            body: dict[str, Any] = {}
            if request.can_read_body:
                try:
                    parsed = json.loads(await request.read())
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    body = parsed
            if cfg.network_latency > 0:
                await asyncio.sleep(cfg.network_latency)
            if cfg.hang:
                await asyncio.get_running_loop().create_future()  # until cancelled
            if rate_limited:
                counters.rejected_429 += 1
                counted = True
                return self._rate_limited(cfg)
            stream = body.get("stream") is True
            await self._acquire()
            holding = True
            if stream and cfg.ttft is not None:
                service = cfg.ttft / cfg.speed * factor
            if cfg.kv_cache_blocks or cfg.prefill_per_block:
                service += self._prefill(body, chat, cfg)
            await asyncio.sleep(service)
            if failed:
                counters.errors += 1
                counted = True
                return web.Response(
                    status=500,
                    body=_dumps(
                        {
                            "error": {
                                "message": f"injected failure on {self.name}",
                                "type": "server_error",
                                "code": "internal_error",
                            }
                        }
                    ),
                    headers=self._response_headers(service, _JSON_HEADERS),
                )
            model = body.get("model")
            if not isinstance(model, str):
                model = cfg.model
            if stream:
                include_usage = False
                options = body.get("stream_options")
                if isinstance(options, dict):
                    include_usage = options.get("include_usage") is True
                return await self._stream(
                    request,
                    cfg,
                    chat=chat,
                    request_id=request_id,
                    model=model,
                    include_usage=include_usage,
                    counters=counters,
                    service=service,
                )
            counters.served += 1
            counted = True
            return web.Response(
                body=_dumps(self._answer(cfg, chat=chat, request_id=request_id, model=model)),
                headers=self._response_headers(service, _JSON_HEADERS),
            )
        except (asyncio.CancelledError, ConnectionError) as exc:
            if isinstance(exc, _Dropped):
                counters.dropped += 1
            elif not counted:
                if generation != self._generation or self._closing:
                    counters.dropped += 1
                else:
                    counters.cancelled += 1
            if isinstance(exc, asyncio.CancelledError):
                raise
            # The client went away while we wrote: end quietly (re-raising a
            # ConnectionError would make aiohttp log an "Error handling request").
            raise asyncio.CancelledError from None
        finally:
            if holding:
                self._release()
            counters.in_flight -= 1
            if task is not None:
                self._tasks.discard(task)

    def _prefill(self, body: Mapping[str, Any], chat: bool, cfg: ReplicaConfig) -> float:
        """Look the prompt up in the prefix cache (and cache it): its prefill time."""
        if chat:
            messages = body.get("messages")
            text = prompt_text(messages) if isinstance(messages, list) else ""
        else:
            prompt = body.get("prompt")
            text = prompt if isinstance(prompt, str) else ""
        if not text:
            return 0.0
        cached, total = self._cache.serve(text)
        c = self._counters
        c.prompt_blocks += total
        c.cached_blocks += cached
        return cfg.prefill_per_block * (total - cached) / cfg.speed

    def _rate_limited(self, cfg: ReplicaConfig) -> web.Response:
        headers = self._response_headers(None, _JSON_HEADERS)
        headers["Retry-After"] = str(math.ceil(cfg.retry_after))
        headers["retry-after-ms"] = str(round(cfg.retry_after * 1000))
        body = {
            "error": {
                "message": f"rate limited by {self.name}; retry after {cfg.retry_after:g} s",
                "type": "requests",
                "code": "rate_limit_exceeded",
            }
        }
        return web.Response(status=429, body=_dumps(body), headers=headers)

    def _answer(
        self, cfg: ReplicaConfig, *, chat: bool, request_id: str, model: str
    ) -> dict[str, Any]:
        name = self.name
        content = f"{name}: " + "".join(f"tok{i} " for i in range(cfg.tokens))
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        else:
            choice = {"index": 0, "text": content, "finish_reason": "stop"}
        return {
            "id": request_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": 1,
                "completion_tokens": cfg.tokens,
                "total_tokens": cfg.tokens + 1,
            },
        }

    async def _stream(
        self,
        request: web.Request,
        cfg: ReplicaConfig,
        *,
        chat: bool,
        request_id: str,
        model: str,
        include_usage: bool,
        counters: ReplicaCounters,
        service: float,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers=self._response_headers(service, _SSE_HEADERS))
        await resp.prepare(request)
        created = int(time.time())
        name = self.name
        kind = "chat.completion.chunk" if chat else "text_completion"
        delay = cfg.token_delay / cfg.speed
        n = cfg.tokens
        stop_at = n if cfg.error_after_tokens is None else min(cfg.error_after_tokens, n)

        def chunk(i: int | None, finish: str | None) -> bytes:
            choice: dict[str, Any] = {"index": 0}
            if chat:
                delta: dict[str, str] = {}
                if i is not None:
                    delta["content"] = f"tok{i} "
                    if i == 0:
                        delta["role"] = "assistant"
                choice["delta"] = delta
            else:
                choice["text"] = "" if i is None else f"tok{i} "
            choice["finish_reason"] = finish
            data = {
                "id": request_id,
                "object": kind,
                "created": created,
                "model": model,
                "system_fingerprint": name,
                "choices": [choice],
            }
            return b"data: " + _dumps(data) + b"\n\n"

        for i in range(stop_at):
            if i and delay > 0:
                await asyncio.sleep(delay)
            await resp.write(chunk(i, None))
        if cfg.error_after_tokens is not None:
            await asyncio.sleep(delay)
            transport = request.transport
            if transport is not None:
                transport.abort()
            # End the handler the way a disconnect does; _completion counts it dropped.
            raise _Dropped
        final = chunk(None, "stop")
        if include_usage:
            usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
            extra = {
                "id": request_id,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            final += b"data: " + _dumps(extra) + b"\n\n"
        if delay > 0 and n:
            await asyncio.sleep(delay)
        await resp.write(final + b"data: [DONE]\n\n")
        await resp.write_eof()
        counters.served += 1
        return resp


class _Dropped(asyncio.CancelledError):
    """Internal: a stream broken on purpose (already counted in ``dropped``)."""


# ---------------------------------------------------------------------------- fleet


class ReplicaFleet:
    """N fake OpenAI-compatible replicas on 127.0.0.1, in the current event loop.

    ``configs`` gives one :class:`ReplicaConfig` per replica (index = position);
    ``seed`` seeds each replica's own :class:`random.Random` from the seed and the
    index, so a run is reproducible (default 0; ``None`` for fresh entropy).  Each
    replica is its own ``aiohttp.web`` server (one ``AppRunner`` and one site each) on
    an ephemeral port.

    ::

        async with ReplicaFleet([ReplicaConfig(capacity=2), ReplicaConfig(speed=0.5)]) as fleet:
            async with aiohttp.ClientSession() as http:
                async with http.post(fleet.urls[0] + "/v1/chat/completions",
                                     json={"model": "m", "messages": []}) as resp:
                    assert resp.headers["x-replica"] == "replica-0"
            fleet[1].set(error_rate=0.5)      # inject faults while running
            fleet.set_all(network_latency=0.01)
            await fleet[0].down()             # connection refused, connections dropped
            await fleet[0].up()               # the same port again
            print(fleet.totals())             # counters summed over the fleet

        fleet = ReplicaFleet.uniform(3, capacity=2, base_latency=0.01)  # same config x3

    Use it as an async context manager, or call :meth:`start` and :meth:`aclose`.
    :meth:`aclose` returns quickly even with requests hanging (they are dropped).
    The fleet and the clients testing it may share one event loop; nothing blocks.
    """

    def __init__(self, configs: Iterable[ReplicaConfig], *, seed: int | None = 0) -> None:
        configs = list(configs)
        for i, cfg in enumerate(configs):
            if not isinstance(cfg, ReplicaConfig):
                raise ConfigError(f"replica {i}: expected a ReplicaConfig, got {cfg!r}")
        if seed is not None and not is_int(seed):
            raise ConfigError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._replicas = [
            Replica(
                i,
                cfg,
                random.Random() if seed is None else random.Random(f"lbclient-fleet:{seed}:{i}"),
            )
            for i, cfg in enumerate(configs)
        ]
        self._started = False
        self._closed = False

    @classmethod
    def uniform(cls, n: int, *, seed: int | None = 0, **fields: Any) -> ReplicaFleet:
        """``n`` replicas with the same configuration: ``ReplicaFleet.uniform(3,
        capacity=2)``."""
        if not is_int(n) or n < 0:
            raise ConfigError(f"replica count must be an int >= 0, got {n!r}")
        try:
            config = ReplicaConfig(**fields)
        except TypeError as exc:
            unknown = sorted(set(fields) - _CONFIG_FIELDS)
            raise ConfigError(f"unknown ReplicaConfig field(s): {', '.join(unknown)}") from exc
        return cls([config] * n, seed=seed)

    def __repr__(self) -> str:
        return f"<ReplicaFleet {len(self._replicas)} replicas {self._replicas!r}>"

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> ReplicaFleet:
        """Start listening (replicas configured ``down=True`` only reserve their port)."""
        if self._started:
            raise RuntimeError("ReplicaFleet.start() called twice")
        self._started = True
        try:
            for replica in self._replicas:
                await replica._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Stop every replica: listeners closed, connections aborted, requests in
        progress (hanging ones included) dropped.  Idempotent; quick."""
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(r._aclose() for r in self._replicas if r._runner is not None))

    async def __aenter__(self) -> ReplicaFleet:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- access

    @property
    def replicas(self) -> Sequence[Replica]:
        return tuple(self._replicas)

    @property
    def urls(self) -> list[str]:
        """Base URLs (``"http://127.0.0.1:PORT"``), in replica order."""
        return [r.url for r in self._replicas]

    def __getitem__(self, index: int) -> Replica:
        return self._replicas[index]

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self._replicas)

    # --------------------------------------------------------------- control

    def set_all(self, **fields: Any) -> None:
        """:meth:`Replica.set` on every replica; all or nothing (validated first)."""
        configs = [_evolve(r.config, fields) for r in self._replicas]
        for replica, config in zip(self._replicas, configs, strict=True):
            replica._apply(config)

    def reset_counters(self) -> None:
        for replica in self._replicas:
            replica.reset_counters()

    # ---------------------------------------------------------------- totals

    def totals(self) -> ReplicaCounters:
        """Counters summed over the replicas (``max_in_flight`` is the largest one)."""
        total = ReplicaCounters()
        for r in self._replicas:
            c = r.counters
            total.received += c.received
            total.served += c.served
            total.errors += c.errors
            total.rejected_429 += c.rejected_429
            total.cancelled += c.cancelled
            total.dropped += c.dropped
            total.in_flight += c.in_flight
            total.max_in_flight = max(total.max_in_flight, c.max_in_flight)
            total.health_checks += c.health_checks
            total.prompt_blocks += c.prompt_blocks
            total.cached_blocks += c.cached_blocks
        return total

    @property
    def total_received(self) -> int:
        return sum(r.counters.received for r in self._replicas)

    @property
    def total_served(self) -> int:
        return sum(r.counters.served for r in self._replicas)

    @property
    def total_errors(self) -> int:
        return sum(r.counters.errors for r in self._replicas)

    @property
    def total_rejected_429(self) -> int:
        return sum(r.counters.rejected_429 for r in self._replicas)

    @property
    def total_cancelled(self) -> int:
        return sum(r.counters.cancelled for r in self._replicas)

    @property
    def total_dropped(self) -> int:
        return sum(r.counters.dropped for r in self._replicas)

    @property
    def total_in_flight(self) -> int:
        return sum(r.counters.in_flight for r in self._replicas)
