"""Server-reported load: poll each endpoint's Prometheus ``/metrics``, off the hot path.

An LLM server knows its own queue better than any one client: requests running in its
batch and waiting for one, from *every* client, and how full its KV cache is.  vLLM and
SGLang export exactly that on ``/metrics``::

    vllm:num_requests_running   vllm:num_requests_waiting   vllm:kv_cache_usage_perc
    sglang:num_running_reqs     sglang:num_queue_reqs       sglang:token_usage

:class:`MetricsPoller` reads them every ``interval`` seconds in a background task and
reports ``running + waiting`` to the balancer (:meth:`lbclient.Balancer.report_load`):
every load-aware strategy (``peak_ewma``, ``least_*``, ``power_of_two``, ``prefix``...)
then counts the larger of its own calls in flight and the server's queue, for 2 s after
each report (``lbclient.pool.load.SERVER_LOAD_TTL``).  A KV cache fuller than
``kv_high`` weighs as extra load (up to double at 100%): such a server is about to
preempt or queue, whatever its queue says now.  A pick never waits for a poll; a poll that
fails or times out changes nothing (the report just goes stale).

::

    async with lbclient.MetricsPoller(lb):          # polls until the block ends
        ...
    poller = lbclient.MetricsPoller(lb, lbclient.ServerMetrics(interval=0.5))
    poller.start()                                  # or start/aclose by hand
    await poller.aclose()

Metric names are configurable (a tuple of names per signal, the first present wins;
samples of one name are summed over their labels, e.g. over several models).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ._errors import ConfigError
from ._numbers import is_number

if TYPE_CHECKING:
    import aiohttp

    from ._balancer import Balancer

__all__ = ["MetricsPoller", "ServerLoad", "ServerMetrics", "parse_prometheus"]

VLLM_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
VLLM_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")


def _names(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise ConfigError(f"metric names must be a str or a sequence of str, got {value!r}")
    out = tuple(value)
    if not all(isinstance(v, str) and v for v in out):
        raise ConfigError(f"metric names must be non-empty str, got {value!r}")
    return out


def _positive(name: str) -> Any:
    def check(_inst: object, _attr: object, value: object) -> None:
        if not is_number(value) or value <= 0:
            raise ConfigError(f"ServerMetrics.{name} must be a number > 0, got {value!r}")

    return check


def _fraction(_inst: object, _attr: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ConfigError(f"ServerMetrics.kv_high must be in [0, 1], got {value!r}")


def _path(_inst: object, _attr: object, value: object) -> None:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"ServerMetrics.path must be a str starting with '/', got {value!r}")


@attrs.frozen(kw_only=True)
class ServerMetrics:
    """What to poll and how often.

    * ``path`` -- the metrics path on each endpoint's URL (default ``/metrics``).
    * ``interval`` -- seconds between polls of one endpoint (default 1.0: fresher than
      the 2 s a report is trusted for); ``timeout`` -- per request (default 1.0).
    * ``running``, ``waiting``, ``kv_usage`` -- metric names, first present wins
      (defaults: vLLM's, then SGLang's).
    * ``kv_high`` -- KV usage (0..1) above which the cache's fullness counts as extra
      load, growing linearly to double the load at 1.0 (default 0.9; 1.0 turns it off).
    """

    path: str = attrs.field(default="/metrics", validator=_path)
    interval: float = attrs.field(default=1.0, validator=_positive("interval"))
    timeout: float = attrs.field(default=1.0, validator=_positive("timeout"))
    running: tuple[str, ...] = attrs.field(default=VLLM_RUNNING, converter=_names)
    waiting: tuple[str, ...] = attrs.field(default=VLLM_WAITING, converter=_names)
    kv_usage: tuple[str, ...] = attrs.field(default=KV_USAGE, converter=_names)
    kv_high: float = attrs.field(default=0.9, validator=_fraction)


@attrs.frozen
class ServerLoad:
    """One endpoint's last poll: ``running`` and ``waiting`` requests, ``kv_usage``
    (0..1, or None if not exported), ``load`` as reported to the balancer, ``at`` (the
    balancer's clock)."""

    running: float
    waiting: float
    kv_usage: float | None
    load: float
    at: float


def parse_prometheus(text: str, names: Iterable[str]) -> dict[str, float]:
    """Sum each wanted metric's samples in Prometheus text format (labels ignored).

    Only the names in ``names`` are kept; comments, other metrics, and unparsable lines
    are skipped (a foreign exporter must not break polling)."""
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if space < 0:
            continue
        if 0 <= brace < space:
            name = line[:brace]
            close = line.rfind("}")
            rest = line[close + 1 :] if close > brace else ""
        else:
            name = line[:space]
            rest = line[space:]
        if name not in wanted:
            continue
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if math.isfinite(value):
            out[name] = out.get(name, 0.0) + value
    return out


def _first(values: Mapping[str, float], names: tuple[str, ...]) -> float | None:
    for n in names:
        if n in values:
            return values[n]
    return None


class MetricsPoller:
    """Polls every endpoint of ``lb`` (as membership changes, too) and reports their load.

    ``session``: an ``aiohttp.ClientSession`` to use (default: one of its own, closed by
    :meth:`aclose`).  :attr:`latest` maps URL -> :class:`ServerLoad`; :attr:`errors`
    counts failed polls."""

    def __init__(
        self,
        lb: Balancer,
        config: ServerMetrics | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if config is not None and not isinstance(config, ServerMetrics):
            raise ConfigError(f"config must be a lbclient.ServerMetrics, got {config!r}")
        self.lb = lb
        self.config = config or ServerMetrics()
        self._session = session
        self._own_session = session is None
        self._task: asyncio.Task[None] | None = None
        self.latest: dict[str, ServerLoad] = {}
        self.errors = 0
        self.polls = 0
        self._names = (*self.config.running, *self.config.waiting, *self.config.kv_usage)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout)
            )
        return self._session

    async def poll_once(self) -> dict[str, ServerLoad]:
        """Poll every endpoint once, concurrently; report and return what answered."""
        urls = [ep.url for ep in self.lb.endpoints]
        results = await asyncio.gather(*(self._poll(u) for u in urls), return_exceptions=True)
        got: dict[str, ServerLoad] = {}
        for url, r in zip(urls, results, strict=True):
            if isinstance(r, ServerLoad):
                got[url] = r
            elif isinstance(r, BaseException) and not isinstance(r, Exception):
                raise r  # cancellation
        # Forget endpoints that left the pool.
        live = set(urls)
        for url in list(self.latest):
            if url not in live:
                del self.latest[url]
        return got

    async def _poll(self, url: str) -> ServerLoad | None:
        import aiohttp

        cfg = self.config
        self.polls += 1
        try:
            async with self._http().get(
                url + cfg.path, timeout=aiohttp.ClientTimeout(total=cfg.timeout)
            ) as resp:
                if resp.status != 200:
                    self.errors += 1
                    return None
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, UnicodeDecodeError, ValueError):
            self.errors += 1
            return None
        values = parse_prometheus(text, self._names)
        running = _first(values, cfg.running)
        waiting = _first(values, cfg.waiting)
        if running is None and waiting is None:
            self.errors += 1
            return None
        kv = _first(values, cfg.kv_usage)
        load = (running or 0.0) + (waiting or 0.0)
        if kv is not None and kv > cfg.kv_high and cfg.kv_high < 1.0:
            load *= 1.0 + min(1.0, (kv - cfg.kv_high) / (1.0 - cfg.kv_high))
        lb = self.lb
        if lb.closed:
            return None
        try:
            lb.report_load(url, load)
        except Exception:  # the endpoint left the pool meanwhile
            return None
        result = ServerLoad(
            running=running or 0.0,
            waiting=waiting or 0.0,
            kv_usage=kv,
            load=load,
            at=lb._pool.now(),
        )
        self.latest[url] = result
        return result

    async def _run(self) -> None:
        interval = self.config.interval
        loop = asyncio.get_running_loop()
        while not self.lb.closed:
            started = loop.time()
            await self.poll_once()
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    def start(self) -> MetricsPoller:
        """Start polling in a background task of the running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="lbclient-metrics-poller"
            )
        return self

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def aclose(self) -> None:
        """Stop polling (and close the session it made)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> MetricsPoller:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        cfg = self.config
        return f"<lbclient.MetricsPoller {cfg.path} every {cfg.interval:g}s {state}>"
