"""`HTTPTransport`: an ``httpx`` transport that balances every request through lbclient.

Any SDK built on httpx -- OpenAI's, Anthropic's, most others -- and any
``httpx.AsyncClient`` is balanced with no other change::

    lb = lbclient.Balancer(
        ["http://10.0.1.10:8000", "http://10.0.1.11:8000"],
        retry=lbclient.Retry(), breaker=lbclient.Breaker(), hedge=lbclient.Hedge(),
    )
    client = openai.AsyncOpenAI(
        base_url="http://lbclient/v1",  # any host: the transport picks the real one
        api_key=os.environ["API_KEY"],
        max_retries=0,                  # lbclient retries, elsewhere (see below)
        http_client=httpx.AsyncClient(transport=lbclient.HTTPTransport(lb)),
    )
    reply = await client.chat.completions.create(model="m", messages=[...])

Every request is one lbclient call: the balancer picks an endpoint, the transport
rewrites the request's scheme, host and port (and base path) to it and sends it over
that endpoint's own connection pool.  So retries, hedging, breakers, admission,
deadlines, limits, fallback pools and metrics all apply, exactly as to ``@lb.route``:

* **Status codes are classified.**  5xx, 408 and 429 are failures of the endpoint:
  retried on another one, counted against it (breakers, load), and a ``Retry-After``
  (or ``retry-after-ms``) cools the endpoint down for that long.  Other 4xx (a bad
  request is bad everywhere) are passed through at once.  When the retries run out,
  the last answer is passed through too -- the SDK raises its own error for it
  (``openai.RateLimitError``, ``InternalServerError``...), with ``x-lbclient-attempts``
  in its headers and the :class:`lbclient.AttemptsExhausted` in
  ``response.extensions["lbclient.error"]``.  Failures without an answer (nothing
  pickable, every connection refused, a deadline, shed by admission) raise lbclient's
  own errors: recent SDKs (on httpx2) let them through as they are, older ones wrap
  them in ``APIConnectionError`` (the lbclient error is its ``__cause__``).
* **Nothing is committed before it arrives.**  A plain answer is read whole inside
  the attempt: hedged and retried until the body is in (one whose ``Content-Length``
  is over ``buffer_limit``, 8 MiB, is committed at its head and relayed).  A streamed answer (the
  request says ``"stream": true``, or accepts ``text/event-stream``) is hedged and
  retried until its *first body chunk*, then committed: the SDK never sees a
  duplicated or interleaved token.
* **Server load and usage are read on the way.**  ``x-queue-depth`` (or
  ``load_header=``) feeds the load-aware strategies; the ``usage`` of a JSON answer or
  of the final event of a stream (OpenAI's ``stream_options={"include_usage": true}``,
  Anthropic's ``message_delta``) settles the call's token estimate (admission quotas
  and fairness, tokens-per-minute limits, metrics).
* **Bodies are replayed.**  A request body given as bytes, JSON or a form (what SDKs
  send) is sent again for a retry or a hedge; a streaming upload (an async iterator of
  bytes) cannot be, so it is sent once, on one endpoint, with no retry or hedge.
* **One connection pool per endpoint**, made on first use and closed when the endpoint
  leaves its pool (removed, or dropped by discovery, once its last response is read),
  and all of them by :meth:`aclose` (which ``async with httpx.AsyncClient(...)``
  calls).

**Set the SDK's own retries to 0** (``max_retries=0``): an SDK retries the same base
URL, with its own backoff (the OpenAI SDK: 2 retries, 0.5-8 s), so on top of lbclient's
retries it multiplies the attempts (3 x 3 = 9 per call) and the wait, while lbclient
already retries on *another* endpoint at once.  The transport logs a warning the first
time it sees an SDK retry (``x-stainless-retry-count``).  Likewise the SDK's
``timeout`` becomes a per-*attempt* timeout here; bound the whole call with
``lbclient.Retry(timeout=...)``.

**httpx or httpx2.**  The transport speaks whichever the client is: ``httpx`` (the
extra, ``pip install 'lbclient[httpx]'``) or ``httpx2``, the fork recent OpenAI and
Anthropic SDKs are built on (Anthropic's accepts only an ``httpx2.AsyncClient``)::

    anthropic.AsyncAnthropic(http_client=httpx2.AsyncClient(transport=HTTPTransport(lb)))

This module imports httpx (or httpx2); ``import lbclient`` does not import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

try:
    import httpx
except ImportError:  # pragma: no cover - only the SDKs' fork is installed
    import httpx2 as httpx  # type: ignore[no-redef]

from ._calls import call_context
from ._context import CallContext, report_usage
from ._endpoint import Endpoint
from ._errors import AttemptsExhausted, BalancerClosed, ConfigError, PoolsExhausted
from ._numbers import is_int
from ._prompt import prompt_text
from ._wire import StreamUsage, body_message, estimate_body_tokens, usage_in_body

if TYPE_CHECKING:
    from ._balancer import Balancer
    from .engine.engine import Engine

__all__ = ["ESTIMATE", "HTTPTransport", "UpstreamStatus", "request_json"]

log = logging.getLogger("lbclient")


class _Estimate:
    def __repr__(self) -> str:
        return "lbclient.transport.ESTIMATE"


ESTIMATE: Final = _Estimate()
"""``HTTPTransport(tokens=ESTIMATE)`` (the default): estimate each JSON request's tokens
from its body (prompt / 4 + ``max_tokens``), as :class:`lbclient.http.ChatClient`
does.  ``tokens=None``: no estimates."""

BUFFER_LIMIT = 8 * 1024 * 1024
"""Bytes: a plain (not streamed) answer whose ``Content-Length`` is larger is committed
at its head and relayed as it comes; others are read whole inside the attempt."""

JSON_LIMIT = 4 * 1024 * 1024  # request_json() leaves larger bodies unparsed
_URL_CACHE = 256  # rewritten URLs kept per endpoint (an SDK uses a handful of paths)
_JSON_KEY = "lbclient.json"
_NO_JSON = object()
_ENDPOINT_HEADER = "x-lbclient-endpoint"
_ATTEMPTS_HEADER = "x-lbclient-attempts"
_SDK_RETRY_HEADER = "x-stainless-retry-count"  # OpenAI's and Anthropic's SDKs send it
_STREAM_KEY = b'"stream"'
_TRUE = re.compile(rb"\s*:\s*true")


def request_json(request: httpx.Request) -> Any:
    """The parsed JSON body of ``request`` (None when it has none, or it is not JSON),
    parsed once per request and cached in its extensions -- for ``key=``, ``tenant=``,
    ``eligible=`` callables::

        HTTPTransport(lb, eligible=lambda endpoint, request:
                      request_json(request).get("model") in endpoint.metadata["models"])
    """
    cached = request.extensions.get(_JSON_KEY, None)
    if cached is not None:
        return None if cached is _NO_JSON else cached
    body: Any = _NO_JSON
    stream = request.stream
    if _is_bytes(stream) and "json" in request.headers.get("content-type", ""):
        content = request.content
        if 0 < len(content) <= JSON_LIMIT:
            try:
                body = json.loads(content)
            except ValueError:
                body = _NO_JSON
    request.extensions[_JSON_KEY] = body
    return None if body is _NO_JSON else body


# -- what a request carries from attempt to attempt ------------------------------------------


class _Request:
    """One request as the attempts send it: the original, the path below the base path,
    and the headers without ``Host`` (each endpoint gets its own)."""

    __slots__ = (
        "bodies",
        "body",
        "eligible",
        "flavour",
        "headers",
        "path",
        "request",
        "retried",
        "stream",
    )

    def __init__(self, request: httpx.Request, path: str) -> None:
        self.request = request
        self.flavour = _flavour(request)
        self.path = path
        self.eligible: Callable[[Endpoint], bool] | None = None
        self.bodies: dict[str, bytes | None] | None = None  # the body, per model name
        # One pass over the headers: all but Host (each endpoint gets its own), and the
        # few the transport reads.
        headers = []
        json_body = accepts_sse = False
        retried = b""
        for k, v in request.headers.raw:
            name = k.lower()
            if name == b"host":
                continue
            headers.append((k, v))
            if name == b"content-type":
                json_body = b"json" in v
            elif name == b"accept":
                accepts_sse = b"text/event-stream" in v
            elif name == b"x-stainless-retry-count":
                retried = v
        self.headers = headers
        self.retried = retried  # the SDK's own retry count, when it says (b"0": none)
        # A JSON body, when there is one (bytes: replayable); streamed answers expected?
        body = request.content if json_body and _is_bytes(request.stream) else None
        self.body = body
        self.stream = accepts_sse or (body is not None and _asks_stream(body))

    def body_for(self, model: str) -> bytes | None:
        """The JSON body with ``"model": model`` (None: the body needs no change)."""
        bodies = self.bodies
        if bodies is None:
            bodies = self.bodies = {}
        elif model in bodies:
            return bodies[model]
        data = request_json(self.request)
        body = None
        if isinstance(data, dict) and "model" in data and data["model"] != model:
            rewritten = {**data, "model": model}
            body = json.dumps(rewritten, ensure_ascii=False, separators=(",", ":")).encode()
        bodies[model] = body
        return body


class _Head:
    """The first "chunk" of a streamed answer: its status line, headers, and the first
    bytes of its body.  Once the balancer has it, the stream is committed."""

    __slots__ = ("conn", "first", "response")

    def __init__(self, response: httpx.Response, first: bytes, conn: _Conn) -> None:
        self.response = response
        self.first = first
        self.conn = conn


class UpstreamStatus(Exception):
    """An endpoint answered with an error status: the attempt failed (retried or not as
    the balancer's classifier says), and the answer -- read whole -- goes back to the
    client if it is the call's last word.  ``status_code`` and ``headers`` are what
    lbclient's classifiers and ``Retry-After`` reader look at (``response`` and
    ``request`` are there too, as on ``httpx.HTTPStatusError``)."""

    def __init__(self, response: httpx.Response, request: httpx.Request, url: str) -> None:
        detail = body_message(response.content[:65536]) if response.content else ""
        reason = response.reason_phrase
        message = f"{response.status_code} {reason} from {url}" + (f": {detail}" if detail else "")
        super().__init__(message)
        self.response = response
        self.request = request
        self.status_code = response.status_code
        self.headers = response.headers


class _Relay:
    """The body of a streamed answer, as the client reads it: the first chunk, then the
    balanced stream's; closing it closes the stream (and frees its connection)."""

    def __init__(self, first: bytes, rest: AsyncIterator[Any]) -> None:
        self._first = first
        self._rest = rest

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._first:
            first, self._first = self._first, b""
            yield first
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        aclose = getattr(self._rest, "aclose", None)
        if aclose is not None:
            await aclose()


class _Tail:
    """The rest of a long plain answer, after the part read inside the attempt."""

    def __init__(self, head: list[bytes], rest: AsyncIterator[bytes], close: Any) -> None:
        self._head = head
        self._rest = rest
        self._close = close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        head, self._head = self._head, []
        for chunk in head:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            await close()


# -- httpx or httpx2 ---------------------------------------------------------------------


class _Flavour:
    """The classes of one httpx (``httpx``, or its fork ``httpx2``): a client only takes
    responses, streams and transports of its own kind."""

    __slots__ = (
        "Relay",
        "Request",
        "Tail",
        "URL",
        "bytestream",
        "transport",
    )

    def __init__(self, module: Any) -> None:
        self.Request: type[httpx.Request] = module.Request
        self.URL: type[httpx.URL] = module.URL
        self.bytestream: type[httpx.ByteStream] = module.ByteStream
        self.transport: type[httpx.AsyncHTTPTransport] = module.AsyncHTTPTransport
        base = module.AsyncByteStream
        self.Relay: type[_Relay] = type("_Relay", (_Relay, base), {})
        self.Tail: type[_Tail] = type("_Tail", (_Tail, base), {})


_FLAVOURS: dict[type, _Flavour] = {}


def _flavour(request: httpx.Request) -> _Flavour:
    cls = type(request)
    found = _FLAVOURS.get(cls)
    if found is None:
        module = sys.modules[cls.__module__.partition(".")[0]]
        found = _FLAVOURS[cls] = _Flavour(module)
    return found


def _asks_stream(body: bytes) -> bool:
    """Does a JSON body say ``"stream": true`` (not inside a string)?  A byte search, not
    a parse: a prompt of 100 KB costs microseconds."""
    i = body.find(_STREAM_KEY)
    while i >= 0:
        if (i == 0 or body[i - 1] != 0x5C) and _TRUE.match(body, i + len(_STREAM_KEY)):
            return True
        i = body.find(_STREAM_KEY, i + 1)
    return False


def _is_bytes(stream: object) -> bool:
    """A body of bytes (JSON, ``content=``), in either httpx."""
    return type(stream).__name__ == "ByteStream"


# -- one endpoint's connection pool ----------------------------------------------------------


class _Conn:
    """One endpoint's connection pool (an httpx transport), what the endpoint's requests
    need (URL prefix, ``Host``, extra headers), and how many responses still use it."""

    __slots__ = (
        "endpoint",
        "extra",
        "flavour",
        "host",
        "model",
        "owner",
        "prefix",
        "retired",
        "transport",
        "urls",
        "users",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        transport: httpx.AsyncBaseTransport,
        owner: Balancer | None,
        extra: list[tuple[bytes, bytes]],
        flavour: _Flavour,
    ) -> None:
        self.endpoint = endpoint
        self.flavour = flavour
        self.transport = transport
        self.owner = owner  # the balancer whose pool it is in (report_load goes there)
        self.prefix = endpoint.url
        self.host = flavour.URL(endpoint.url).netloc
        self.extra = extra
        model = endpoint.metadata.get("model")
        self.model = model if isinstance(model, str) and model else None
        self.urls: dict[str, httpx.URL] = {}
        self.users = 0
        self.retired = False

    def url(self, path: str) -> httpx.URL:
        url = self.urls.get(path)
        if url is None:
            if len(self.urls) >= _URL_CACHE:
                self.urls.clear()
            url = self.urls[path] = self.flavour.URL(self.prefix + path)
        return url

    def request(self, r: _Request) -> httpx.Request:
        """``r`` as sent to this endpoint: its URL, ``Host``, extra headers, model."""
        original = r.request
        stream = original.stream
        headers = [(b"Host", self.host), *r.headers]
        if self.model is not None:
            body = r.body_for(self.model)
            if body is not None:
                stream = self.flavour.bytestream(body)
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
                headers.append((b"Content-Length", str(len(body)).encode()))
        if self.extra:
            names = {k.lower() for k, _ in self.extra}
            headers = [(k, v) for k, v in headers if k.lower() not in names] + self.extra
        return self.flavour.Request(
            original.method,
            self.url(r.path),
            headers=headers,
            stream=stream,
            extensions=original.extensions,
        )

    def tagged(self, inner: httpx.Response) -> httpx.Response:
        """``inner`` (the answer the client gets), saying which endpoint served it."""
        inner.headers[_ENDPOINT_HEADER] = self.endpoint.url
        return inner

    def relay(self, inner: httpx.Response, stream: _Relay | _Tail) -> httpx.Response:
        """``inner`` with its body read through ``stream`` (an AsyncByteStream of the
        client's httpx: see _Flavour), tagged."""
        body: Any = stream
        inner.stream = body
        return self.tagged(inner)


# -- the transport -------------------------------------------------------------------------


def _callable(value: object, name: str) -> Any:
    if value is not None and (isinstance(value, type) or not callable(value)):
        raise ConfigError(f"HTTPTransport {name} must be a callable or None, got {value!r}")
    return value


def _base_path(value: object) -> str:
    if not isinstance(value, str) or (value and not value.startswith("/")) or " " in value:
        raise ConfigError(
            f"HTTPTransport base_path must be '' or a path starting with '/', got {value!r}"
        )
    return value.rstrip("/")


class HTTPTransport(httpx.AsyncBaseTransport):
    """Balance an httpx client's requests over a :class:`lbclient.Balancer` (see the
    module docstring for what it does, and how with the OpenAI SDK).

    * ``lb`` -- the balancer (its fallback pools are served too).  Never closed here.
    * ``base_path`` -- the part of request paths that names no endpoint: stripped before
      the endpoint's own URL (with its path) is put in front.  Default ``""``: with
      ``base_url="http://lbclient/v1"`` and an endpoint ``http://10.0.1.10:8000``, a
      request to ``/v1/chat/completions`` goes to ``http://10.0.1.10:8000/v1/chat/
      completions``; with ``base_path="/v1"``, endpoints are given with their ``/v1``
      (``https://api.openai.com/v1``).
    * ``load_header`` -- response header with the server's own load (default
      ``x-queue-depth``; ``None``: none), reported to the endpoint's balancer.
    * ``key``, ``tenant``, ``priority`` -- callables given the ``httpx.Request``
      (affinity key, who pays, admission priority), as ``@lb.route`` takes them;
      :func:`request_json` reads its body.
    * ``tokens`` -- a callable giving the request's estimated tokens; default
      :data:`ESTIMATE`: from the JSON body; ``None``: no estimates.
    * ``eligible`` -- ``eligible(endpoint, request) -> bool``: which endpoints may serve
      a request (by model, tier, ...; see ``Balancer.route``).
    * ``prefix`` -- a callable giving the request's prompt text for the ``prefix``
      strategy's KV-cache affinity; default: when a balancer of the chain uses such a
      strategy (``uses_prefix``), the JSON body's ``messages`` (and Anthropic's ``system``) through
      :func:`lbclient.prompt_text`.
    * ``fallback`` -- ``False``: never use the balancer's fallback pools; or a callable
      given the request.
    * ``headers`` -- ``headers(endpoint)`` giving extra headers for every request sent
      there (an API key per vendor pool), or None.  Read once per endpoint.
    * ``transport`` -- ``transport(endpoint)`` making each endpoint's connection pool
      (default ``httpx.AsyncHTTPTransport()``; pass your own for HTTP/2, TLS settings,
      pool limits).
    * ``buffer_limit`` -- a plain answer is read whole inside the attempt (and so
      retried and hedged until it is in) unless its ``Content-Length`` is over this many
      bytes (default 8 MiB): then it is committed at its head and relayed.

    An endpoint whose ``metadata["model"]`` is set gets JSON requests with that
    ``"model"`` (a vendor pool serving the same model under another name).
    """

    def __init__(
        self,
        lb: Balancer,
        *,
        base_path: str = "",
        load_header: str | None = "x-queue-depth",
        key: Callable[[httpx.Request], object] | None = None,
        tenant: Callable[[httpx.Request], object] | None = None,
        priority: Callable[[httpx.Request], int] | None = None,
        tokens: Callable[[httpx.Request], float | None] | _Estimate | None = ESTIMATE,
        eligible: Callable[[Endpoint, httpx.Request], bool] | None = None,
        prefix: Callable[[httpx.Request], str | None] | None = None,
        fallback: bool | Callable[[httpx.Request], bool] = True,
        headers: Callable[[Endpoint], Mapping[str, str] | None] | None = None,
        transport: Callable[[Endpoint], httpx.AsyncBaseTransport] | None = None,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        from ._balancer import Balancer
        from ._config import chain_of

        if not isinstance(lb, Balancer):
            raise ConfigError(f"HTTPTransport needs an lbclient.Balancer, got {lb!r}")
        if load_header is not None and (not isinstance(load_header, str) or not load_header):
            raise ConfigError(
                f"HTTPTransport load_header must be a header name or None, got {load_header!r}"
            )
        if not isinstance(fallback, bool):
            _callable(fallback, "fallback")
        if tokens is not ESTIMATE:
            _callable(tokens, "tokens")
        if not is_int(buffer_limit) or buffer_limit < 1:
            raise ConfigError(
                f"HTTPTransport buffer_limit must be an int >= 1 (bytes), got {buffer_limit!r}"
            )
        self._lb = lb
        self._base = _base_path(base_path)
        self._load_header = load_header
        self._key = _callable(key, "key")
        self._tenant = _callable(tenant, "tenant")
        self._priority = _callable(priority, "priority")
        self._prefix: Callable[[httpx.Request], str | None] | None = _callable(prefix, "prefix")
        self._tokens = tokens
        self._eligible = _callable(eligible, "eligible")
        self._fallback = fallback
        self._headers = _callable(headers, "headers")
        self._factory: Callable[[Endpoint], httpx.AsyncBaseTransport] | None = _callable(
            transport, "transport"
        )
        self._buffer_limit = buffer_limit
        self._conns: dict[tuple[str, _Flavour], _Conn] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._retired: list[_Conn] = []  # to close, left when no event loop was running
        self._closed = False
        self._warned = False
        self._chain: list[Balancer] = chain_of(lb)  # type: ignore[assignment]
        if self._prefix is None and any(
            getattr(b._pool.strategy, "uses_prefix", False) for b in self._chain
        ):
            self._prefix = _body_prompt  # what the prefix strategy keys its affinity on
        # Endpoints leaving any pool of the chain close their connection pools.
        ref = weakref.WeakMethod(self._removed)

        def removed(endpoint: Endpoint) -> None:
            method = ref()
            if method is not None:
                method(endpoint)

        self._hook = removed
        for balancer in self._chain:
            balancer._pool.on_remove.append(removed)
        # The stream routes, built once (with and without fallback pools).
        options: dict[str, Any] = {
            "key": (lambda r: self._key(r.request)) if self._key is not None else None,
            "tenant": (lambda r: self._tenant(r.request)) if self._tenant is not None else None,
            "priority": (lambda r: self._priority(r.request))
            if self._priority is not None
            else None,
            "tokens": self._estimate_of if tokens is not None else None,
            "eligible": _eligible_of if eligible is not None else None,
            "prefix": (lambda r: self._prefix(r.request)) if self._prefix is not None else None,
        }
        self._stream_routes = (
            lb.route(fallback=False, **options)(self._stream_attempt),
            lb.route(fallback=True, **options)(self._stream_attempt),
        )

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return f"<lbclient.HTTPTransport lb={self._lb!r} pools={len(self._conns)}{closed}>"

    # -- per request -----------------------------------------------------------------------

    def _estimate_of(self, r: _Request) -> float | None:
        tokens = self._tokens
        if tokens is None:
            return None
        request = r.request
        if tokens is not ESTIMATE:
            value = tokens(request)  # type: ignore[operator]
            return None if value is None else float(value)
        if r.body is None:
            return None
        return estimate_body_tokens(r.body)

    def _prepare(self, request: httpx.Request) -> _Request:
        path = request.url.raw_path.decode("ascii")
        base = self._base
        if base and path.startswith(base) and path[len(base) : len(base) + 1] in ("", "/", "?"):
            path = path[len(base) :]
        r = _Request(request, path)
        if self._eligible is not None:
            eligible = self._eligible

            def may_use(endpoint: Endpoint) -> bool:
                return bool(eligible(endpoint, request))

            r.eligible = may_use
        if r.retried not in (b"", b"0") and not self._warned:
            self._warned = True
            log.warning(
                "lbclient.HTTPTransport: the SDK is retrying a request itself (%s: %s); "
                "lbclient already retries on another endpoint -- create the SDK client "
                "with max_retries=0",
                _SDK_RETRY_HEADER,
                r.retried.decode("latin-1"),
            )
        return r

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise BalancerClosed("this lbclient.HTTPTransport is closed; create a new one")
        if self._retired:
            self._close_retired()
        r = self._prepare(request)
        fallback = self._fallback
        if not isinstance(fallback, bool):
            fallback = bool(fallback(request))
        try:
            if not _replayable(request.stream):
                return await self._send_once(r, fallback)
            if r.stream:
                return await self._stream(r, fallback)
            response: httpx.Response = await self._lb._call(
                self._attempt, (r,), {}, self._context(r), fallback
            )
            return response
        except (UpstreamStatus, AttemptsExhausted) as exc:
            answer = _answer_of(exc)
            if answer is None:
                raise
            return answer

    def _values(self, r: _Request) -> tuple[object, object, float | None, object, str | None]:
        """The request's ``(key, tenant, tokens, priority, prefix)``, from the callables
        the transport was given."""
        request = r.request
        return (
            self._key(request) if self._key is not None else None,
            self._tenant(request) if self._tenant is not None else None,
            self._estimate_of(r),
            self._priority(request) if self._priority is not None else 0,
            self._prefix(request) if self._prefix is not None else None,
        )

    def _context(self, r: _Request) -> Callable[[Engine], CallContext]:
        """How a plain request's call context is made (in each pool it goes to)."""
        key, tenant, tokens, priority, prefix = self._values(r)
        if not is_int(priority):
            raise TypeError(f"HTTPTransport priority= must give an int, got {priority!r}")
        return call_context(key, tenant, tokens, priority, r.eligible, prefix)

    async def _stream(self, r: _Request, fallback: bool) -> httpx.Response:
        agen = self._stream_routes[fallback](r)
        try:
            head: _Head = await anext(agen)
        except BaseException:
            await agen.aclose()
            raise
        conn = head.conn
        return conn.relay(head.response, conn.flavour.Relay(head.first, agen))

    async def _send_once(self, r: _Request, fallback: bool) -> httpx.Response:
        """A body that cannot be sent twice: one attempt, under ``lb.pick()``, committed
        at the answer's head."""
        request = r.request
        key, tenant, tokens, priority, prefix = self._values(r)
        async with self._lb.pick(
            key=key,
            tenant=tenant,
            tokens=tokens,
            priority=priority,  # type: ignore[arg-type]  # lb.pick checks it
            eligible=r.eligible,
            fallback=fallback,
            prefix=prefix,
        ) as endpoint:
            conn = self._conn(endpoint, r.flavour)
            inner = await self._send(conn, r)
            if inner.status_code >= 400 or not r.stream:
                response, _ = await self._read(conn, inner)
                if response.status_code >= 400:
                    raise UpstreamStatus(response, request, endpoint.url)
                return response
        return self._relayed(conn, inner)

    # -- attempts (one endpoint each; the balancer drives them) ----------------------------

    async def _send(self, conn: _Conn, r: _Request) -> httpx.Response:
        """Send ``r`` to ``conn``'s endpoint: the answer's head (its body still to read;
        the connection pool counts it in use until :meth:`_closer` runs)."""
        conn.users += 1
        try:
            inner = await conn.transport.handle_async_request(conn.request(r))
        except BaseException:
            self._release(conn)
            raise
        self._loaded(conn, inner)
        return inner

    def _loaded(self, conn: _Conn, inner: httpx.Response) -> None:
        """An answer's head came: report the server's own load (``load_header``)."""
        name = self._load_header
        if name is not None and conn.owner is not None:
            value = inner.headers.get(name)
            if value is not None:
                conn.owner.report_load(conn.endpoint, value)

    def _closer(self, conn: _Conn, inner: httpx.Response) -> Callable[[], Any]:
        """Close ``inner``'s body as the transport gave it (before a relay replaces it on
        the answer) and give the connection back."""
        raw: Any = inner.stream

        async def close() -> None:
            try:
                await raw.aclose()
            finally:
                self._release(conn)

        return close

    async def _attempt(self, endpoint: Endpoint, r: _Request) -> httpx.Response:
        """A plain request: sent, its answer read whole (up to ``buffer_limit``), an
        error status raised -- all before the balancer commits to it."""
        conn = self._conn(endpoint, r.flavour)
        response, whole = await self._read(conn, await self._send(conn, r))
        if response.status_code >= 400:
            raise UpstreamStatus(response, r.request, endpoint.url)
        if whole:  # else committed at its head: a long body, still coming
            content = response.content
            if content:
                usage = usage_in_body(content)
                if usage is not None:
                    report_usage(*usage)
        return response

    async def _read(self, conn: _Conn, inner: httpx.Response) -> tuple[httpx.Response, bool]:
        """Read ``inner``'s body whole -- decoded and kept on it, so the client does not
        read it again -- and give the connection back; or, when its ``Content-Length``
        is over the buffer limit (and it is not an error), leave it to be relayed as it
        comes: the attempt ends at its head.  Returns (the answer, read whole?)."""
        length = inner.headers.get("content-length")
        if (
            length is not None
            and inner.status_code < 400
            and length.isdigit()
            and int(length) > self._buffer_limit
        ):
            return self._relayed(conn, inner), False
        try:
            await inner.aread()  # closes it at the end
        except BaseException:
            await self._closer(conn, inner)()
            raise
        self._release(conn)
        return conn.tagged(inner), True

    def _relayed(self, conn: _Conn, inner: httpx.Response) -> httpx.Response:
        """``inner``, its body relayed as it comes; closing it gives the connection back."""
        body: Any = inner.stream  # an AsyncByteStream of the client's httpx
        return conn.relay(inner, conn.flavour.Tail([], aiter(body), self._closer(conn, inner)))

    async def _stream_attempt(self, endpoint: Endpoint, r: _Request) -> AsyncIterator[Any]:
        """A streamed request: its first "chunk" is the answer's head (status, headers,
        first body bytes) -- the balancer commits there -- then the body's chunks."""
        conn = self._conn(endpoint, r.flavour)
        inner = await self._send(conn, r)
        if inner.status_code >= 400:
            answer, _ = await self._read(conn, inner)
            raise UpstreamStatus(answer, r.request, endpoint.url)
        raw: Any = inner.stream  # closed here, whatever the client's answer becomes
        try:
            chunks = _chunks(raw)
            first = b""
            with contextlib.suppress(StopAsyncIteration):
                first = await anext(chunks)
            sse = "event-stream" in inner.headers.get("content-type", "") and (
                "content-encoding" not in inner.headers
            )
            usage = StreamUsage() if sse else None
            if usage is not None and usage.feed(first) and usage.value is not None:
                report_usage(*usage.value)
            yield _Head(inner, first, conn)
            async for chunk in chunks:
                if usage is not None and usage.feed(chunk) and usage.value is not None:
                    report_usage(*usage.value)
                yield chunk
            if usage is not None and usage.close() and usage.value is not None:
                report_usage(*usage.value)
        finally:
            await raw.aclose()
            self._release(conn)

    # -- connection pools ----------------------------------------------------------------

    def _conn(self, endpoint: Endpoint, flavour: _Flavour) -> _Conn:
        """``endpoint``'s connection pool (for clients of ``flavour``), made on first use."""
        conn = self._conns.get((endpoint.url, flavour))
        if conn is not None:
            return conn
        if self._closed:
            raise BalancerClosed("this lbclient.HTTPTransport is closed; create a new one")
        owner = next((b for b in self._chain if endpoint.url in b._pool.members), None)
        extra: list[tuple[bytes, bytes]] = []
        if self._headers is not None:
            given = self._headers(endpoint) or {}
            extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in given.items()]
        pool = self._factory(endpoint) if self._factory is not None else flavour.transport()
        conn = _Conn(endpoint, pool, owner, extra, flavour)
        self._conns[endpoint.url, flavour] = conn
        return conn

    def _release(self, conn: _Conn) -> None:
        conn.users -= 1
        if conn.retired and conn.users <= 0:
            self._close(conn)

    def _removed(self, endpoint: Endpoint) -> None:
        """An endpoint left its pool: close its connection pool once nothing uses it."""
        for key in [k for k in self._conns if k[0] == endpoint.url]:
            conn = self._conns.pop(key)
            conn.retired = True
            if conn.users <= 0:
                self._close(conn)

    def _close(self, conn: _Conn) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # removed outside the event loop: closed on the next request
            self._retired.append(conn)
            return
        task = loop.create_task(conn.transport.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for conn in retired:
            self._close(conn)

    async def aclose(self) -> None:
        """Close every endpoint's connection pool (the balancer stays open).  Idempotent;
        new requests then raise :class:`lbclient.BalancerClosed`."""
        if self._closed:
            return
        self._closed = True
        for balancer in self._chain:
            with contextlib.suppress(ValueError):
                balancer._pool.on_remove.remove(self._hook)
        conns = list(self._conns.values()) + self._retired
        self._conns.clear()
        self._retired = []
        for conn in conns:
            await conn.transport.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _body_prompt(request: httpx.Request) -> str | None:
    """The prompt text of a JSON request (chat ``messages``, Anthropic's ``system``, a
    completion's ``prompt``), for the ``prefix`` strategy; None when there is none."""
    body = request_json(request)
    if not isinstance(body, dict):
        return None
    text = ""
    system = body.get("system")
    if isinstance(system, str):
        text = f"system: {system}\n"
    elif isinstance(system, list):
        text = prompt_text([{"role": "system", "content": system}])
    messages = body.get("messages")
    if isinstance(messages, list):
        return text + prompt_text(messages)
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return text + prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return text + prompt_text(prompt)
    return text or None


def _eligible_of(endpoint: Endpoint, r: _Request) -> bool:
    return r.eligible is None or r.eligible(endpoint)


def _replayable(stream: object) -> bool:
    """Can this request body be sent again?  Bytes, JSON and forms can (httpx re-reads a
    multipart form's files from the start); an async iterator cannot."""
    return type(stream).__name__ in ("ByteStream", "MultipartStream")


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    """The raw body of a transport's answer, chunk by chunk (empty chunks skipped)."""
    async for chunk in stream:
        if chunk:
            yield chunk


def _answer_of(exc: BaseException) -> httpx.Response | None:
    """The answer to give the client for a call that ended with ``exc``: an endpoint's
    own error answer (the last one, when attempts ran out), or None (raise ``exc``)."""
    if isinstance(exc, UpstreamStatus):
        return exc.response
    if isinstance(exc, AttemptsExhausted):
        last = exc.last_error
        if isinstance(exc, PoolsExhausted):  # the last pool's last word
            last = exc.pools[-1].error
            if isinstance(last, AttemptsExhausted):
                last = last.last_error
        if isinstance(last, UpstreamStatus):
            response = last.response
            response.headers[_ATTEMPTS_HEADER] = str(len(exc.attempts))
            response.extensions["lbclient.error"] = exc
            return response
    return None


HTTPTransport.__module__ = "lbclient"
