"""`ChatClient`: a built-in OpenAI-compatible chat client on aiohttp, balanced by lbclient.

For users who do not bring their own HTTP client or SDK.  Every call goes through the
:class:`lbclient.Balancer` you hand it, so it is picked, retried, hedged and broken like any
``@lb.route`` call::

    from lbclient.http import ChatClient

    async with ChatClient(lb, api_key=os.environ["API_KEY"]) as chat:
        reply = await chat.text(messages=[{"role": "user", "content": "Hi"}], model="m")
        async for token in chat.stream(messages=[{"role": "user", "content": "Hi"}]):
            print(token, end="")

Works with any server that speaks ``POST /v1/chat/completions`` (vLLM, TGI, SGLang,
llama.cpp, OpenAI and most vendor APIs).  This module imports aiohttp; ``import lbclient``
does not import this module, so it costs nothing until you use it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import aiohttp

from ._balancer import Balancer
from ._config import chain_of
from ._context import report_usage
from ._endpoint import Endpoint
from ._errors import BalancerClosed, ConfigError
from ._numbers import is_number
from ._prompt import prompt_text
from ._wire import SSEDecoder, body_message, estimate_tokens, message_of
from ._wire import usage_of as _usage_of

__all__ = ["ChatClient"]

_ERROR_BODY_LIMIT = 64 * 1024  # bytes of an error body read for its message
_SSEDecoder = SSEDecoder  # the shared decoder (lbclient._wire), under its old name


# -- validation ---------------------------------------------------------------------------


def _check_timeout(value: object) -> float | None:
    if value is None:
        return None
    if not is_number(value) or value <= 0:
        raise ConfigError(
            f"ChatClient timeout must be a finite number of seconds > 0 or None, got {value!r}"
        )
    return float(value)


def _check_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() for c in value):
        raise ConfigError(
            f"ChatClient path must be a str starting with '/' and without spaces, got {value!r}"
        )
    return value


def _check_api_key(value: object) -> str | None:
    # The messages name the problem, never the key itself: it must not end up in logs.
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"ChatClient api_key must be a str or None, got {type(value).__name__}")
    if not value.strip():
        raise ConfigError("ChatClient api_key must not be empty or blank (pass None for no key)")
    if any(c in value for c in "\r\n\0"):
        raise ConfigError("ChatClient api_key must not contain line breaks or NUL characters")
    return value.strip()


def _check_headers(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"ChatClient headers must be a mapping of str to str, got {value!r}")
    out: dict[str, str] = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name.strip() or not isinstance(v, str):
            raise ConfigError(
                f"ChatClient headers must map non-empty str names to str values, "
                f"got {name!r}: {v!r}"
            )
        out[name] = v
    return out


def _check_load_header(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"ChatClient load_header must be a non-empty header name or None, got {value!r}"
        )
    return value.strip()


def _encode_body(messages: object, model: object, params: dict[str, Any], *, stream: bool) -> bytes:
    """The request body, serialised once per call (not once per attempt)."""
    if "stream" in params:
        raise TypeError(
            "ChatClient sets 'stream' itself: call create() / text() for a whole answer "
            "and stream() for tokens"
        )
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if model is not None and not isinstance(model, str):
        raise TypeError(f"model must be a str or None, got {model!r}")
    payload: dict[str, Any] = {} if model is None else {"model": model}
    payload["messages"] = list(messages)
    payload.update(params)
    if stream:
        payload["stream"] = True
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _affinity(
    body: bytes, key: object, tenant: object, tokens: float, prefix: str | None = None
) -> object:
    """The stream route's ``key=``: the affinity key passed along with the body."""
    return key


def _tenant_of(
    body: bytes, key: object, tenant: object, tokens: float, prefix: str | None = None
) -> object:
    return tenant


def _tokens_of(
    body: bytes, key: object, tenant: object, tokens: float, prefix: str | None = None
) -> float:
    return tokens


def _prefix_of(
    body: bytes, key: object, tenant: object, tokens: float, prefix: str | None = None
) -> str | None:
    return prefix


def _report_usage(usage: object) -> None:
    """Settle the call's token estimate with a ``usage`` object (OpenAI's or Anthropic's
    shape, see :func:`lbclient._wire.usage_of`)."""
    prompt, completion = _usage_of(usage)
    if prompt is not None and completion is not None:
        report_usage(prompt, completion)


# -- errors -------------------------------------------------------------------------------


_message_of = message_of  # the shared reader (lbclient._wire), under its old name


def _status_error(
    resp: aiohttp.ClientResponse, status: int, detail: str
) -> aiohttp.ClientResponseError:
    reason = resp.reason or ""
    message = f"{reason}: {detail}" if reason and detail else reason or detail
    # The response headers go with the error: Retry-After on a 429/503 reaches the retry
    # policy through them (lbclient reads ``exc.headers``).
    return aiohttp.ClientResponseError(
        resp.request_info, resp.history, status=status, message=message, headers=resp.headers
    )


async def _http_error(resp: aiohttp.ClientResponse) -> aiohttp.ClientResponseError:
    """What ``resp.raise_for_status()`` raises, plus the server's own error message."""
    detail = ""
    # On a read error the status alone is enough to classify the failure.
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        detail = body_message(await resp.content.read(_ERROR_BODY_LIMIT))
    return _status_error(resp, resp.status, detail)


def _in_band_error(resp: aiohttp.ClientResponse, error: object) -> aiohttp.ClientResponseError:
    """An ``{"error": ...}`` object sent with a 200 (vLLM and others report failures
    inside a stream that way): raised as the status it carries (500 when it has none), so
    it is retried and blamed exactly like the same error sent as a status line."""
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    status = code if isinstance(code, int) and 400 <= code <= 599 else 500
    return _status_error(resp, status, _message_of(error))


def _bad_payload(
    url: str, what: str, exc: BaseException | None = None
) -> aiohttp.ClientPayloadError:
    # A body we cannot read is the replica's fault and worth another replica, like a body
    # cut short (aiohttp's own ClientPayloadError, which lbclient retries).
    detail = f": {exc}" if exc is not None else ""
    return aiohttp.ClientPayloadError(f"{url} answered {what}{detail}")


# -- the client ---------------------------------------------------------------------------


class ChatClient:
    """OpenAI-compatible chat completions over aiohttp, through an lbclient balancer.

    ::

        chat = ChatClient(lb, api_key="sk-...")             # lb: an lbclient.Balancer
        reply = await chat.create(messages=[{"role": "user", "content": "Hi"}], model="m")
        print(reply["choices"][0]["message"]["content"])

    * ``lb`` -- the :class:`lbclient.Balancer` that picks the replica of every call (its
      retry, breaker and hedge policies apply; the client never closes it).
    * ``session`` -- an ``aiohttp.ClientSession`` to send with (yours: never closed here).
      Default: one is created on first use inside the running event loop and closed by
      :meth:`aclose` -- use ``async with ChatClient(...)`` or call ``aclose()``.  Pass your
      own to tune the connection pool (aiohttp's default caps it at 100 connections).
    * ``api_key`` -- sent as ``Authorization: Bearer <key>`` (default: no header).
    * ``path`` -- appended to each endpoint's URL (default ``/v1/chat/completions``; use
      ``/chat/completions`` when your endpoint URLs already end in ``/v1``).
    * ``timeout`` -- seconds per *attempt*, not per call (the balancer's ``Retry.timeout``
      bounds the whole call).  For :meth:`create` it bounds the whole answer: the default
      60 s fits ~1,000 tokens at 20-30 tokens/s; raise it for longer non-streamed answers,
      or stream them.  For :meth:`stream` it bounds connecting, the wait for the first
      bytes and every silence between chunks -- never the length of a healthy stream.
      ``None``: no limit from here (the session's own ``ClientTimeout`` applies; an owned
      session has none).
    * ``headers`` -- extra request headers (e.g. ``{"OpenAI-Organization": ...}``).
    * ``load_header`` -- response header with the replica's own load, fed to
      :meth:`Balancer.report_load` (default ``x-queue-depth``, as
      :mod:`lbclient.testing`'s replicas send; name your server's, or ``None`` to turn
      it off).  It lets load-aware strategies see the other clients' traffic too.

    HTTP errors are raised as ``aiohttp.ClientResponseError`` (as ``raise_for_status()``
    does, with the server's error message added): lbclient classifies them by
    ``status``, and the response ``headers`` they keep carry ``Retry-After`` to the retry
    policy.  So, with a :class:`lbclient.Retry` on the balancer, a 500 or a connection
    error is retried on another replica, a 429 waits what the server asked, and a 400
    (your request) is raised at once and never trips a breaker.
    """

    __slots__ = (
        "_closed",
        "_create_headers",
        "_lb",
        "_load_header",
        "_owns_session",
        "_path",
        "_prefix",
        "_session",
        "_stream_headers",
        "_stream_route",
        "_stream_timeout",
        "_timeout",
    )

    def __init__(
        self,
        lb: Balancer,
        *,
        session: aiohttp.ClientSession | None = None,
        api_key: str | None = None,
        path: str = "/v1/chat/completions",
        timeout: float | None = 60.0,
        headers: Mapping[str, str] | None = None,
        load_header: str | None = "x-queue-depth",
    ) -> None:
        if not isinstance(lb, Balancer):
            raise ConfigError(f"ChatClient needs an lbclient.Balancer, got {lb!r}")
        if session is not None and not isinstance(session, aiohttp.ClientSession):
            raise ConfigError(
                f"ChatClient session must be an aiohttp.ClientSession or None, got {session!r}"
            )
        key = _check_api_key(api_key)
        extra = _check_headers(headers)
        if key is not None and any(name.lower() == "authorization" for name in extra):
            raise ConfigError(
                "ChatClient got both api_key and an Authorization header: pass the key once"
            )
        self._lb = lb
        self._path = _check_path(path)
        seconds = _check_timeout(timeout)
        self._load_header = _check_load_header(load_header)
        self._session = session
        self._owns_session = session is None
        self._closed = False
        base = {**extra, "Content-Type": "application/json"}
        if key is not None:
            base["Authorization"] = f"Bearer {key}"
        self._create_headers = {**base, "Accept": "application/json"}
        self._stream_headers = {**base, "Accept": "text/event-stream"}
        self._timeout = None if seconds is None else aiohttp.ClientTimeout(total=seconds)
        # A stream may rightly last minutes: bound the silences, not the total.
        self._stream_timeout = (
            None
            if seconds is None
            else aiohttp.ClientTimeout(total=None, connect=seconds, sock_read=seconds)
        )
        # Built once: an async-generator route gets first-token hedging, retries before
        # the first chunk and TTFT statistics from the balancer.
        self._stream_route: Callable[
            [bytes, object, object, float, str | None], AsyncIterator[str]
        ] = lb.route(key=_affinity, tenant=_tenant_of, tokens=_tokens_of, prefix=_prefix_of)(
            self._stream_attempt
        )
        # The prompt text is derived only for a strategy that reads it (``prefix``), in
        # this balancer or any fallback a call may end up on.
        self._prefix = any(
            getattr(b._pool.strategy, "uses_prefix", False)  # type: ignore[attr-defined]
            for b in chain_of(lb)
        )

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<lbclient.http.ChatClient path={self._path!r} lb={self._lb!r}{state}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called."""
        return self._closed

    # -- public calls ----------------------------------------------------------------------

    async def create(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        key: object = None,
        tenant: object = None,
        tokens: float | None = None,
        prefix: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """One chat completion; returns the parsed JSON answer.

        ::

            reply = await chat.create(messages=[{"role": "user", "content": "Hi"}],
                                      model="llama-3-8b", max_tokens=64, temperature=0.2)
            print(reply["choices"][0]["message"]["content"], reply["usage"])

        ``params`` go into the request body as they are (``max_tokens``, ``tools``...);
        ``model`` is left out when None (single-model servers accept that).  ``key`` is
        the affinity key for ``consistent_hash`` (e.g. a conversation id, so its KV cache
        is reused), not sent.  ``tenant`` is who the call is for (admission fairness and
        quotas); ``tokens`` its estimated token cost (default: the prompt's length / 4 plus
        ``max_tokens``), settled by the answer's ``usage``.  ``prefix`` is the prompt text
        for the ``prefix`` strategy (default, under that strategy: the messages'
        :func:`lbclient.prompt_text`; ignored by other strategies).  The body is serialised once,
        before any endpoint is picked: a value JSON cannot encode raises ``TypeError``
        here and never counts against a replica.  Raises ``aiohttp.ClientResponseError``
        on an HTTP error (or what the balancer raises: :class:`lbclient.AttemptsExhausted`,
        :class:`lbclient.Overloaded`...).
        """
        self._check_open()
        body = _encode_body(messages, model, params, stream=False)
        estimate, prefix = self._estimate(messages, params, tokens, prefix)
        return await self._lb.call(
            self._create_attempt, body, key=key, tenant=tenant, tokens=estimate, prefix=prefix
        )

    def _estimate(
        self,
        messages: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        tokens: float | None,
        prefix: str | None,
    ) -> tuple[float, str | None]:
        """The call's token estimate and prompt text (when the strategy wants it),
        unless given."""
        estimate = estimate_tokens(messages, params) if tokens is None else tokens
        if prefix is None and self._prefix:
            prefix = prompt_text(messages)
        return estimate, prefix

    def stream(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        key: object = None,
        tenant: object = None,
        tokens: float | None = None,
        prefix: str | None = None,
        **params: Any,
    ) -> AsyncGenerator[str, None]:
        """Stream a chat completion: yields the text of each token chunk as it arrives.

        ::

            async for token in chat.stream(messages=[{"role": "user", "content": "Hi"}]):
                print(token, end="", flush=True)

        Sends ``"stream": true`` and reads the server-sent events (``data: {...}`` lines,
        up to ``data: [DONE]``), yielding ``choices[0].delta.content`` when it is a
        non-empty string (role-only, usage and finish chunks are skipped).  Until the
        first token it is an ordinary balanced attempt: hedged on time-to-first-token and
        retried on another replica; from the first token on it is committed -- no retry,
        no duplicated text -- and an error reaches you as it is.  TTFT is recorded per
        endpoint (``lb.stats()``).  Arguments are checked (and the body serialised) at
        the call, before iterating; ``key`` as in :meth:`create`.  Leaving the loop early
        frees the connection when the generator is closed: wrap it in
        ``contextlib.aclosing(...)`` to do that at once rather than at garbage collection.
        """
        self._check_open()
        body = _encode_body(messages, model, params, stream=True)
        estimate, prefix = self._estimate(messages, params, tokens, prefix)
        return self._relay(body, key, tenant, estimate, prefix)

    async def text(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        model: str | None = None,
        key: object = None,
        tenant: object = None,
        tokens: float | None = None,
        prefix: str | None = None,
        **params: Any,
    ) -> str:
        """:meth:`create`, returning only ``choices[0].message.content``.

        ::

            answer = await chat.text(messages=[{"role": "user", "content": "2+2?"}])

        An answer without text (only tool calls) gives ``""``; an answer with no
        ``choices[0].message`` at all raises ``ValueError``.
        """
        reply = await self.create(
            messages=messages,
            model=model,
            key=key,
            tenant=tenant,
            tokens=tokens,
            prefix=prefix,
            **params,
        )
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"the answer has no choices[0].message.content: {json.dumps(reply)[:200]}"
            ) from None
        return content if isinstance(content, str) else ""

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the session this client created (a session you passed stays open; the
        balancer is never closed here).  Idempotent; new calls then raise
        :class:`lbclient.BalancerClosed`."""
        self._closed = True
        session, self._session = self._session, None
        if self._owns_session and session is not None and not session.closed:
            await session.close()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- attempts (one endpoint each; the balancer drives them) -----------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BalancerClosed("this lbclient.http.ChatClient is closed; create a new one")

    def _http(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            # Created here, inside the running loop (aiohttp binds a session to its loop),
            # and synchronously, so concurrent first calls cannot create two.
            self._check_open()
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
            self._session = session
        return session

    def _report_load(self, endpoint: Endpoint, resp: aiohttp.ClientResponse) -> None:
        if self._load_header is not None:
            value = resp.headers.get(self._load_header)
            if value is not None:
                self._lb.report_load(endpoint, value)

    async def _create_attempt(self, endpoint: Endpoint, body: bytes) -> dict[str, Any]:
        url = endpoint.url + self._path
        http = self._http()
        if self._timeout is None:
            request = http.post(url, data=body, headers=self._create_headers)
        else:
            request = http.post(url, data=body, headers=self._create_headers, timeout=self._timeout)
        async with request as resp:
            self._report_load(endpoint, resp)
            if resp.status >= 400:
                raise await _http_error(resp)
            raw = await resp.read()
            try:
                reply = json.loads(raw)
            except ValueError as exc:
                raise _bad_payload(url, f"{resp.status} with a body that is not JSON", exc) from exc
            if not isinstance(reply, dict):
                raise _bad_payload(url, f"{resp.status} with JSON that is not an object")
            if "error" in reply and "choices" not in reply:
                raise _in_band_error(resp, reply["error"])
            _report_usage(reply.get("usage"))
            return reply

    async def _stream_attempt(
        self,
        endpoint: Endpoint,
        body: bytes,
        key: object,
        tenant: object,
        tokens: float,
        prefix: str | None = None,
    ) -> AsyncIterator[str]:
        url = endpoint.url + self._path
        http = self._http()
        if self._stream_timeout is None:
            request = http.post(url, data=body, headers=self._stream_headers)
        else:
            request = http.post(
                url, data=body, headers=self._stream_headers, timeout=self._stream_timeout
            )
        async with request as resp:
            self._report_load(endpoint, resp)
            if resp.status >= 400:
                raise await _http_error(resp)
            if resp.content_type == "application/json":
                # A server that ignored "stream": the whole answer in one piece.
                try:
                    reply = json.loads(await resp.read())
                except ValueError as exc:
                    raise _bad_payload(url, "a body that is not JSON", exc) from exc
                if isinstance(reply, dict) and "error" in reply and "choices" not in reply:
                    raise _in_band_error(resp, reply["error"])
                content = _message_content(reply)
                if content:
                    yield content
                return
            decoder = _SSEDecoder()
            async for chunk in resp.content.iter_any():
                try:
                    events = decoder.feed(chunk)
                except ValueError as exc:
                    raise _bad_payload(url, "a broken event stream", exc) from exc
                for data in events:
                    if data == "[DONE]":
                        return
                    token = _delta_content(resp, url, data)
                    if token:
                        yield token
            for data in decoder.close():
                if data == "[DONE]":
                    return
                token = _delta_content(resp, url, data)
                if token:
                    yield token

    async def _relay(
        self, body: bytes, key: object, tenant: object, tokens: float, prefix: str | None
    ) -> AsyncGenerator[str, None]:
        inner = self._stream_route(body, key, tenant, tokens, prefix)
        try:
            async for token in inner:
                yield token
        finally:
            # Closing this generator closes the balanced stream (and its connection) now.
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()


def _message_content(reply: object) -> str | None:
    try:
        content = reply["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _delta_content(resp: aiohttp.ClientResponse, url: str, data: str) -> str | None:
    """The text of one ``chat.completion.chunk`` event, or None."""
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise _bad_payload(url, "an event that is not JSON", exc) from exc
    if not isinstance(event, dict):
        return None
    error = event.get("error")
    if error is not None:
        raise _in_band_error(resp, error)
    if "usage" in event:
        _report_usage(event["usage"])  # the final chunk, with stream_options.include_usage
    choices = event.get("choices")
    if not choices or not isinstance(choices, list):
        return None  # e.g. the usage chunk of stream_options={"include_usage": true}
    choice = choices[0]
    delta = choice.get("delta") if isinstance(choice, dict) else None
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) and content else None
