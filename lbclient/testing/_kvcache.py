"""`PrefixCache`: a fake replica's KV prefix cache -- blocks of prompt text, LRU.

Models what vLLM's automatic prefix caching and SGLang's radix cache do, at the level a
router sees: the prompt is cut into blocks of ``block_chars`` characters, each block
named by a chained hash of everything up to its end (so a block is reusable only after
the same prefix), and a request reuses the leading blocks already cached; every block
it computed is cached afterwards.  Beyond ``capacity`` blocks, the least recently used
are evicted; a request's blocks are touched last block first, so the shared leading
blocks (a system prompt) are the most recent and outlive the tails.  A trailing partial
block is never cached (as in vLLM).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["PrefixCache"]


class PrefixCache:
    """One replica's cache: ``capacity`` blocks of ``block_chars`` characters."""

    __slots__ = ("_lru", "block_chars", "cached_blocks", "capacity", "prompt_blocks")

    def __init__(self, capacity: int, block_chars: int = 64) -> None:
        if capacity < 0 or block_chars < 1:
            raise ValueError(f"bad PrefixCache({capacity!r}, {block_chars!r})")
        self.capacity = capacity
        self.block_chars = block_chars
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.prompt_blocks = 0  # blocks of every prompt served (partial last ones too)
        self.cached_blocks = 0  # of which found in the cache

    def serve(self, text: str) -> tuple[int, int]:
        """A request for ``text`` runs: returns ``(cached, total)`` blocks and caches
        its full blocks."""
        b = self.block_chars
        n = len(text)
        total = -(-n // b)
        full = n // b
        lru = self._lru
        hashes = []
        h = 0
        cached = 0
        contiguous = True
        for i in range(full):
            h = hash((h, text[i * b : (i + 1) * b]))
            hashes.append(h)
            if contiguous:
                if h in lru:
                    cached += 1
                else:
                    contiguous = False
        if self.capacity:
            move = lru.move_to_end
            for h in reversed(hashes):
                if h in lru:
                    move(h)
                else:
                    lru[h] = None
            while len(lru) > self.capacity:
                lru.popitem(last=False)
        else:
            cached = 0
        self.prompt_blocks += total
        self.cached_blocks += cached
        return cached, total

    @property
    def usage(self) -> float:
        """Share of the capacity in use (0..1)."""
        return len(self._lru) / self.capacity if self.capacity else 0.0

    @property
    def hit_ratio(self) -> float:
        """Cached blocks / prompt blocks served so far (0 before any)."""
        return self.cached_blocks / self.prompt_blocks if self.prompt_blocks else 0.0

    def resize(self, capacity: int) -> None:
        """A new capacity in blocks (evicting the least recently used past it)."""
        if capacity < 0:
            raise ValueError(f"bad PrefixCache capacity {capacity!r}")
        self.capacity = capacity
        lru = self._lru
        while len(lru) > capacity:
            lru.popitem(last=False)

    def reset_stats(self) -> None:
        self.prompt_blocks = self.cached_blocks = 0

    def clear(self) -> None:
        """Forget every block (a restarted replica)."""
        self._lru.clear()
