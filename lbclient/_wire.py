"""What LLM servers send and expect, read without any HTTP library: server-sent events,
token ``usage`` (OpenAI's and Anthropic's shapes, in a JSON body or a stream), error
messages in error bodies, and the token estimate of a request.

Shared by the built-in client (:mod:`lbclient.http`, aiohttp) and the httpx transport
(:mod:`lbclient.transport`), so both settle token estimates, read event streams and
report errors the same way.  Pure functions and small parsers: no I/O, no imports
beyond the standard library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "SSEDecoder",
    "StreamUsage",
    "estimate_body_tokens",
    "estimate_tokens",
    "message_of",
    "usage_in_body",
    "usage_of",
]

_EOL = re.compile(rb"\r\n|\r|\n")  # SSE allows all three line endings (WHATWG HTML §9.2.5)
MAX_LINE = 16 * 1024 * 1024  # bytes: an SSE line longer than this is a broken stream
DETAIL_CHARS = 500  # an error message taken from a body is cut to this many characters
DEFAULT_MAX_TOKENS = 256  # the output assumed when a request names no max_tokens

# A "usage" key followed by an object -- not `"usage": null` (OpenAI sends that in every
# chunk of a stream with include_usage) and not an escaped \"usage\" inside a string.
_USAGE_OBJECT = re.compile(r'(?<!\\)"usage"\s*:\s*\{')
_USAGE_KEY = b'"usage"'


# -- server-sent events -------------------------------------------------------------------


class SSEDecoder:
    """Bytes in, the ``data`` of each complete server-sent event out.  Pure; no I/O.

    Lines are split on bytes, before decoding, so a UTF-8 character or an event cut by a
    TCP segment boundary is reassembled; ``\\r\\n``, ``\\r`` and ``\\n`` all end a line.
    Comments (``:``) and the ``event``/``id``/``retry`` fields are ignored; several
    ``data`` lines of one event are joined with ``\\n``, as the SSE specification says.
    """

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        buf = self._buf
        buf += chunk
        events: list[str] = []
        start = 0
        end = len(buf)
        while True:
            m = _EOL.search(buf, start)
            if m is None or (m.end() == end and buf[m.start()] == 0x0D):
                break  # no line end yet, or a lone CR that may be the first half of CRLF
            self._line(bytes(buf[start : m.start()]), events)
            start = m.end()
        del buf[:start]
        if len(buf) > MAX_LINE:
            raise ValueError(f"server-sent event line longer than {MAX_LINE} bytes")
        return events

    def close(self) -> list[str]:
        """End of stream: flush an unterminated last line and event (leniently: a server
        that closes right after ``data: [DONE]`` still gets its last event read)."""
        events: list[str] = []
        if self._buf:
            self._line(bytes(self._buf), events)
            self._buf.clear()
        self._line(b"", events)
        return events

    def _line(self, raw: bytes, events: list[str]) -> None:
        if not raw:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        line = raw.decode("utf-8", "replace")
        name, _, value = line.partition(":")  # "data" alone is the field with value ""
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        # Anything else is a ": comment" (keep-alive pings) or a field we do not use.


# -- token usage --------------------------------------------------------------------------


def _count(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def usage_of(usage: object) -> tuple[float | None, float | None]:
    """``(input, output)`` tokens of a ``usage`` object, each None when absent.

    OpenAI chat/completions (``prompt_tokens`` / ``completion_tokens``), OpenAI
    responses and Anthropic (``input_tokens`` / ``output_tokens``; Anthropic's cached
    input, ``cache_read_input_tokens`` and ``cache_creation_input_tokens``, counts as
    input)."""
    if not isinstance(usage, Mapping):
        return None, None
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        prompt = _count(usage.get("input_tokens"))
        if prompt is not None:
            for cached in ("cache_read_input_tokens", "cache_creation_input_tokens"):
                extra = _count(usage.get(cached))
                if extra is not None:
                    prompt += extra
    completion = _count(usage.get("completion_tokens"))
    if completion is None:
        completion = _count(usage.get("output_tokens"))
    return prompt, completion


_DECODER = json.JSONDecoder()


def usage_in_body(body: bytes) -> tuple[float, float] | None:
    """The token usage of a whole JSON answer, without parsing all of it: the object
    after the last ``"usage"`` key (where OpenAI and Anthropic put it, at the top level,
    after the content) is decoded alone.  ``None`` when there is none, or it is not
    readable (a malformed answer must never fail a call)."""
    i = body.rfind(_USAGE_KEY)
    while i > 0 and body[i - 1] == 0x5C:  # an escaped \"usage\" inside a string: earlier
        i = body.rfind(_USAGE_KEY, 0, i)
    if i < 0:
        return None
    try:
        tail = body[i:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    m = _USAGE_OBJECT.match(tail)
    if m is None:
        return None
    try:
        usage, _ = _DECODER.raw_decode(tail, m.end() - 1)
    except ValueError:
        return None
    prompt, completion = usage_of(usage)
    if prompt is None or completion is None:
        return None
    return prompt, completion


class StreamUsage:
    """Reads the token usage out of a server-sent event stream as it passes by.

    OpenAI sends it in a final chunk (with ``stream_options={"include_usage": True}``);
    Anthropic's ``message_start`` carries the input tokens and ``message_delta`` the
    output so far.  Only events that hold a ``usage`` object are parsed as JSON, so a
    long stream of token chunks costs a line split each.  :attr:`value` is the latest
    ``(input, output)``, once both are known.
    """

    __slots__ = ("_decoder", "_input", "_output")

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._input: float | None = None
        self._output: float | None = None

    def feed(self, chunk: bytes) -> bool:
        """Read ``chunk``; True when it brought new usage figures."""
        try:
            events = self._decoder.feed(chunk)
        except ValueError:
            return False
        changed = False
        for data in events:
            if '"usage"' in data and _USAGE_OBJECT.search(data) is not None:
                changed |= self._event(data)
        return changed

    def close(self) -> bool:
        """The stream ended: read a last event left without its blank line."""
        changed = False
        for data in self._decoder.close():
            if '"usage"' in data and _USAGE_OBJECT.search(data) is not None:
                changed |= self._event(data)
        return changed

    def _event(self, data: str) -> bool:
        try:
            event = json.loads(data)
        except ValueError:
            return False
        if not isinstance(event, dict):
            return False
        usage = event.get("usage")
        if usage is None and isinstance(event.get("message"), dict):
            usage = event["message"].get("usage")  # Anthropic's message_start
        prompt, completion = usage_of(usage)
        if prompt is None and completion is None:
            return False
        if prompt is not None:
            self._input = prompt
        if completion is not None:
            self._output = completion
        return True

    @property
    def value(self) -> tuple[float, float] | None:
        if self._output is None:
            return None
        return (self._input or 0.0), self._output


# -- errors -------------------------------------------------------------------------------


def message_of(error: object) -> str:
    """The human part of an OpenAI-style error: ``{"error": {"message": ...}}`` and kin."""
    if isinstance(error, dict):
        for name in ("message", "detail", "error"):
            inner = error.get(name)
            if inner is not None:
                return message_of(inner)
        return json.dumps(error)[:DETAIL_CHARS]
    return str(error)[:DETAIL_CHARS]


def body_message(raw: bytes) -> str:
    """The server's own error message in an error body (JSON or text), shortened."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        return message_of(json.loads(text))
    except ValueError:
        return text[:DETAIL_CHARS]


# -- token estimates ----------------------------------------------------------------------


def estimate_tokens(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> float:
    """A call's token estimate: its prompt (about 4 characters a token, the common rule of
    thumb for English text with GPT-style tokenizers) plus the output it may produce
    (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``, else 256).  The
    real ``usage`` in the answer settles it."""
    chars = 0
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):  # content parts: count the text ones
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    out: object = DEFAULT_MAX_TOKENS
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if name in params:
            out = params[name]
            break
    if isinstance(out, bool) or not isinstance(out, int | float) or out < 0:
        out = DEFAULT_MAX_TOKENS
    return float(chars // 4 + 4 * len(messages) + out)


_OUTPUT = re.compile(rb'"max(?:_completion|_output)?_tokens"\s*:\s*(\d+)')
_MESSAGES = b'"messages"'


def estimate_body_tokens(body: bytes) -> float:
    """The token estimate of a JSON request body, read without parsing it (a 100 KB
    prompt costs a scan, not a parse): about a token per 4 bytes -- the prompt and its
    JSON framing -- plus the output the request allows (``max_tokens``,
    ``max_completion_tokens`` or ``max_output_tokens``; else 256 for a chat request,
    nothing for others, e.g. embeddings)."""
    m = _OUTPUT.search(body)
    if m is not None:
        out = float(m.group(1))
    else:
        out = float(DEFAULT_MAX_TOKENS) if _MESSAGES in body else 0.0
    return len(body) // 4 + out
