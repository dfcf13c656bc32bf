"""A multi-turn chat workload for the prefix-cache benchmarks (``prefix.py``, ``prefix_sim.py``).

``conversations`` conversations over ``system_prompts`` shared system prompts; each
request picks a conversation Zipf-like (rank r with probability ~ 1 / r**zipf: a few hot
ones), appends a user turn, and sends the whole conversation so far (OpenAI-style
messages); a synthetic assistant answer is appended right after (so the next turn's
prompt extends this one, as a real chat's would -- independent of which replica
answered).  A conversation that reached ``max_turns`` ends and a fresh one (same slot,
same system prompt, new id) starts in its place.  ``system_zipf`` > 0 draws each conversation's system prompt Zipf-like too (a few hot
system prompts: a shared prefix too hot for one replica).  ``unique=True`` gives every request a
prompt sharing nothing with any other (the no-shared-prefix control).

Everything is drawn from ``random.Random(seed)`` up front: every strategy sees the same
schedule and the same prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["FLEET", "RATE", "WORKLOAD", "Request", "Workload", "make"]

# The benchmark configuration shared by prefix.py (loopback) and prefix_sim.py.
RATE = 130.0  # requests per second
WORKLOAD = {
    "conversations": 300,
    "system_prompts": 20,
    "system_chars": 400,
    "user_chars": 150,
    "answer_chars": 250,
    "max_turns": 16,
    "zipf": 0.8,
}
FLEET = {
    "replicas": 8,
    "slots": 2,  # concurrent requests per replica
    "base": 0.020,  # decode time, seconds (lognormal, sigma 0.25)
    "cache_blocks": 2500,  # prefix cache per replica
    "block": 64,  # characters per block
    "prefill": 0.0025,  # seconds per uncached block
}

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "model",
    "token",
    "cache",
    "prefix",
    "replica",
    "latency",
    "request",
    "answer",
    "system",
    "user",
]


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    n = 0
    while n < chars:
        w = rng.choice(_WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


@dataclass(frozen=True)
class Request:
    at: float  # seconds from the start (Poisson arrivals)
    conversation: str  # its id (the consistent_hash key)
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class Workload:
    requests: tuple[Request, ...]
    rate: float

    @property
    def mean_chars(self) -> float:
        from lbclient import prompt_text

        return sum(len(prompt_text(r.messages)) for r in self.requests) / len(self.requests)


def make(
    *,
    requests: int,
    rate: float,
    conversations: int = 300,
    system_prompts: int = 20,
    system_chars: int = 1600,
    user_chars: int = 240,
    answer_chars: int = 320,
    max_turns: int = 10,
    zipf: float = 1.0,
    system_zipf: float = 0.0,
    unique: bool = False,
    seed: int = 1,
) -> Workload:
    """The schedule: ``requests`` Poisson arrivals at ``rate`` per second."""
    rng = random.Random(seed)
    systems = [
        f"[system prompt {i}] " + _text(rng, int(system_chars * rng.uniform(0.75, 1.25)))
        for i in range(system_prompts)
    ]
    weights = [1.0 / (r + 1) ** zipf for r in range(conversations)]
    order = list(range(conversations))
    rng.shuffle(order)  # which slot is hot is random, not slot 0
    hist: list[list[dict[str, str]]] = []
    ids: list[str] = []
    serial = [0] * conversations
    sys_weights = [1.0 / (r + 1) ** system_zipf for r in range(system_prompts)]
    for c in range(conversations):
        which = (
            rng.choices(range(system_prompts), sys_weights)[0]
            if system_zipf
            else c % system_prompts
        )
        hist.append([{"role": "system", "content": systems[which]}])
        ids.append(f"c{c}.0")
    out: list[Request] = []
    t = 0.0
    for k in range(requests):
        t += rng.expovariate(rate)
        slot = order[rng.choices(range(conversations), weights)[0]]
        if unique:
            msgs = (
                {"role": "system", "content": f"[unique {k}] " + _text(rng, system_chars)},
                {"role": "user", "content": _text(rng, user_chars)},
            )
            out.append(Request(t, f"u{k}", msgs))
            continue
        h = hist[slot]
        if (len(h) - 1) // 2 >= max_turns:
            serial[slot] += 1
            ids[slot] = f"c{slot}.{serial[slot]}"
            h = hist[slot] = [h[0]]
        h.append(
            {
                "role": "user",
                "content": f"[{ids[slot]} turn {len(h) // 2}] " + _text(rng, user_chars),
            }
        )
        out.append(Request(t, ids[slot], tuple(h)))
        h.append({"role": "assistant", "content": _text(rng, answer_chars)})
    return Workload(tuple(out), rate)
