"""An approximate radix tree of the prompt text each endpoint has recently served.

One tree for the whole pool, shared by every endpoint (a *tenant* here): a node is a
run of characters (``label``) and knows which tenants hold it, i.e. which replicas
should have the KV cache for the text from the root down to the end of that node.
SGLang's router keeps the same shape (``sgl-router/src/policies/tree.rs``: one radix tree,
per-node tenant access times, eviction of least recently used leaves per tenant).

Cost.  Matching a prompt walks its path one *node* at a time: a dict look-up on the next
character and one ``str.startswith`` comparing a whole label in C.  A multi-turn
conversation is a path of a few nodes per turn, so a 4,000-character prompt is matched
and inserted in a few microseconds; a label that diverges part-way is measured by a
binary search of ``startswith`` on slices (O(length x log length), in C).  Nothing is ever
compared one character at a time in Python.

Holdings are *prefix-closed* per tenant: a tenant that holds a node holds all its
ancestors (a replica cannot have the KV of a suffix without its prefix).  Inserting
touches the whole path; evicting a node for a tenant evicts its descendants for that
tenant too.  So the match length of a tenant is the depth of the deepest node on the
prompt's path that it holds -- one walk answers for every tenant at once.

Memory.  Each tenant has a budget in characters (the sum of the labels it holds) and an
LRU order of its nodes (an ``OrderedDict``, O(1) per touch).  A path is touched leaf
first, so a node is always more recent than its descendants and the least recently used
node of a tenant is a leaf of its holdings; past the budget the least recently used
nodes are dropped at once, in the insert that overflowed (no background sweep, so the
bound holds at every moment).  A node no tenant holds is unlinked.  Total memory is at
most the sum of the tenants' budgets (shared text counted once).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

__all__ = ["RadixTree", "Tenant"]


class _Node:
    __slots__ = ("children", "depth", "holders", "label", "parent")

    def __init__(self, label: str, parent: _Node | None, depth: int) -> None:
        self.label = label
        self.parent = parent
        self.depth = depth  # characters from the root to the end of this node
        self.children: dict[str, _Node] = {}
        self.holders: set[Tenant] = set()

    def __repr__(self) -> str:
        return f"<_Node {self.label[:20]!r} depth={self.depth} holders={len(self.holders)}>"


class Tenant:
    """One endpoint's share of the tree: its nodes in LRU order and its size in chars."""

    __slots__ = ("capacity", "chars", "lru", "name")

    def __init__(self, name: object, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.chars = 0
        self.lru: OrderedDict[_Node, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"<Tenant {self.name!r} chars={self.chars} nodes={len(self.lru)}>"


def _common(label: str, text: str, pos: int) -> int:
    """Length of the common prefix of ``label`` and ``text[pos:]``: galloping, then a
    binary search, with ``startswith`` on slices (C comparisons, no per-character Python
    loop; O(log of the answer) steps, so an early divergence is found in a few)."""
    top = min(len(label), len(text) - pos)
    lo, step = 0, 8
    while lo + step <= top and text.startswith(label[lo : lo + step], pos + lo):
        lo += step
        step <<= 1
    hi = min(top, lo + step - 1)  # lo matches; lo + step does not (or is past the end)
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if text.startswith(label[lo:mid], pos + lo):
            lo = mid
        else:
            hi = mid - 1
    return lo


class Match:
    """Where a prompt's walk ended: the nodes on its path (the last one maybe only
    partly matched) and ``end``, the characters of the prompt matched in the tree."""

    __slots__ = ("end", "path", "text")

    def __init__(self, text: str, path: list[_Node], end: int) -> None:
        self.text = text
        self.path = path
        self.end = end


class RadixTree:
    """The shared tree.  Not thread-safe: used from the event loop thread only."""

    __slots__ = ("root",)

    def __init__(self) -> None:
        self.root = _Node("", None, 0)

    # -- reading ---------------------------------------------------------------------------

    def match(self, text: str) -> Match:
        """Walk ``text`` down the tree as far as it matches."""
        node = self.root
        path: list[_Node] = []
        pos = 0
        n = len(text)
        while pos < n:
            child = node.children.get(text[pos])
            if child is None:
                break
            label = child.label
            path.append(child)
            if text.startswith(label, pos):
                pos += len(label)
                node = child
                continue
            pos += _common(label, text, pos)
            break
        return Match(text, path, pos)

    @staticmethod
    def lengths(m: Match, limit: int) -> dict[Tenant, int]:
        """Characters of the prompt each tenant holds (tenants holding none are absent).

        The deepest node on the path gives its holders the whole matched length (a
        partly matched node still has the matched part cached); each shallower node gives
        its remaining holders its own depth.  Stops once ``limit`` tenants are known."""
        out: dict[Tenant, int] = {}
        path = m.path
        if not path:
            return out
        last = path[-1]
        end = m.end
        for t in last.holders:
            out[t] = end
        for i in range(len(path) - 2, -1, -1):
            if len(out) >= limit:
                break
            node = path[i]
            depth = node.depth
            for t in node.holders:
                if t not in out:
                    out[t] = depth
        return out

    # -- writing ---------------------------------------------------------------------------

    def insert(self, tenant: Tenant, m: Match) -> None:
        """Record that ``tenant`` now holds the whole of ``m.text`` (the walk ``m`` was
        made on the tree as it is now), then evict its least recently used nodes past its
        budget.  Text longer than the budget is recorded up to the budget."""
        text = m.text
        if len(text) > tenant.capacity:
            text = text[: tenant.capacity]
            if m.end > len(text):
                m = self.match(text)  # rare: a prompt longer than the whole budget
        path = m.path
        end = m.end
        if path:
            last = path[-1]
            if end < last.depth:  # diverged (or stopped) inside `last`: split it
                path[-1] = self._split(last, end)
        if end < len(text):
            parent = path[-1] if path else self.root
            leaf = _Node(text[end:], parent, len(text))
            parent.children[text[end]] = leaf
            path.append(leaf)
        if not path:
            return
        lru = tenant.lru
        move = lru.move_to_end
        added = 0
        # Leaf first: every node ends up more recent than its descendants.
        for i in range(len(path) - 1, -1, -1):
            node = path[i]
            if node in lru:
                move(node)
            else:
                lru[node] = None
                node.holders.add(tenant)
                added += len(node.label)
        tenant.chars += added
        if tenant.chars > tenant.capacity:
            self._evict(tenant)

    def _split(self, node: _Node, end: int) -> _Node:
        """Cut ``node`` so that a node ends at depth ``end``; returns the upper part (a
        new node, held by every holder of ``node``, which keeps the lower part)."""
        parent = node.parent
        assert parent is not None
        cut = end - (node.depth - len(node.label))
        upper = _Node(node.label[:cut], parent, end)
        parent.children[upper.label[0]] = upper
        node.label = node.label[cut:]
        node.parent = upper
        upper.children[node.label[0]] = node
        upper.holders = set(node.holders)
        for t in upper.holders:
            # The upper part is as recent as the lower (it is its ancestor): put it last.
            # Its chars were already counted in the lower node; the split moves them.
            t.lru[upper] = None
        return upper

    def _evict(self, tenant: Tenant) -> None:
        lru = tenant.lru
        pop = lru.popitem
        capacity = tenant.capacity
        while tenant.chars > capacity and lru:
            node, _ = pop(last=False)
            children = node.children
            if children and any(tenant in c.holders for c in children.values()):
                lru[node] = None  # rare (see _split): take its subtree along
                self._drop(tenant, node)
                continue
            # The usual case, inlined: a leaf of the tenant's holdings.
            holders = node.holders
            holders.discard(tenant)
            label = node.label
            tenant.chars -= len(label)
            if not holders:
                parent = node.parent
                if parent is not None and parent.children.get(label[0]) is node:
                    del parent.children[label[0]]
                node.parent = None

    def _drop(self, tenant: Tenant, node: _Node) -> None:
        """Drop ``node`` and its descendants from ``tenant``; unlink nodes nobody holds."""
        stack = [node]
        lru = tenant.lru
        while stack:
            x = stack.pop()
            x.holders.discard(tenant)
            lru.pop(x, None)
            tenant.chars -= len(x.label)
            for c in x.children.values():
                if tenant in c.holders:
                    stack.append(c)
            if not x.holders:
                # Nobody else holds it, so nobody holds anything below it either.
                self._unlink(x)

    def _unlink(self, node: _Node) -> None:
        parent = node.parent
        if parent is not None and parent.children.get(node.label[0]) is node:
            del parent.children[node.label[0]]
        node.parent = None

    def remove(self, tenant: Tenant) -> None:
        """Forget everything ``tenant`` holds (its endpoint left the pool)."""
        while tenant.lru:
            node = next(iter(tenant.lru))
            # Drop from the topmost held ancestor, so one walk takes the subtree.
            while node.parent is not None and tenant in node.parent.holders:
                node = node.parent
            self._drop(tenant, node)
        tenant.chars = 0

    # -- inspection (tests, stats) ---------------------------------------------------------

    def held(self, tenant: Tenant) -> Iterator[str]:
        """The full texts of the nodes ``tenant`` holds that have no held child (the
        strings it is modelled to have cached)."""
        for node in list(tenant.lru):
            if any(tenant in c.holders for c in node.children.values()):
                continue
            parts = []
            x: _Node | None = node
            while x is not None:
                parts.append(x.label)
                x = x.parent
            yield "".join(reversed(parts))

    def nodes(self) -> int:
        """Nodes in the tree (the root excluded)."""
        count = 0
        stack = list(self.root.children.values())
        while stack:
            x = stack.pop()
            count += 1
            stack.extend(x.children.values())
        return count
