"""`prompt_text`: the text of a chat prompt, for prefix-cache affinity.

The ``prefix`` strategy needs, for every call, text whose prefixes are what a replica
caches.  For an OpenAI-style chat that is the messages in order: each turn of a
conversation sends the previous messages unchanged plus new ones, so the previous
request's text is a prefix of the next one's -- exactly what the replica that served it
holds in its KV cache.  The built-in :class:`~lbclient.http.ChatClient` and the fake
replicas of :mod:`lbclient.testing` both use this function, so the model and the fake
cache agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["prompt_text"]


def _content(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes | bytearray):
        # Content parts ({"type": "text", "text": ...}, images...): the text parts.
        out = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
            elif isinstance(part, str):
                out.append(part)
        return "".join(out)
    return "" if content is None else str(content)


def prompt_text(messages: Sequence[Mapping[str, Any]] | str) -> str:
    """``"role: content\\n"`` for each message, in order (a plain ``str`` prompt is its
    own text).  Multi-turn history is a prefix of the next turn's text::

        >>> prompt_text([{"role": "system", "content": "Be brief."},
        ...              {"role": "user", "content": "Hi"}])
        'system: Be brief.\\nuser: Hi\\n'

    Anything malformed contributes what it can (never raises for odd messages): it only
    steers routing."""
    if isinstance(messages, str):
        return messages
    parts = []
    for m in messages:
        if isinstance(m, Mapping):
            parts.append(f"{m.get('role', '')}: {_content(m.get('content'))}\n")
    return "".join(parts)
