"""The prefix strategy's radix tree: match lengths against brute force, the memory bound
under eviction, prefix-closed holdings, removal."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lbclient.strategies._radix import RadixTree, Tenant, _common

# A small alphabet makes shared prefixes, splits and partial matches common.
texts = st.text(alphabet="abc", min_size=0, max_size=24)


def lcp(a: str, b: str) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def brute(stored: list[str], query: str) -> int:
    return max((lcp(s, query) for s in stored), default=0)


def check_invariants(tree: RadixTree, tenants: list[Tenant]) -> None:
    """Every tenant's count is the sum of the labels it holds; holdings are prefix-closed;
    every node reachable from the root is held by someone; no node is held that is not
    reachable."""
    reachable = set()
    stack = list(tree.root.children.values())
    while stack:
        x = stack.pop()
        reachable.add(x)
        assert x.holders, f"{x} is reachable but nobody holds it"
        for key, c in x.children.items():
            assert c.label[0] == key and c.parent is x
        stack.extend(x.children.values())
    for t in tenants:
        assert t.chars == sum(len(node.label) for node in t.lru)
        for node in t.lru:
            assert node in reachable
            assert t in node.holders
            if node.parent is not tree.root:
                assert node.parent is not None and t in node.parent.holders


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), texts), max_size=30), st.lists(texts, max_size=10))
def test_match_length_is_the_longest_common_prefix_over_stored_strings(
    inserts: list[tuple[int, str]], queries: list[str]
) -> None:
    tree = RadixTree()
    tenants = [Tenant(i, 10**9) for i in range(3)]  # no eviction
    stored: list[list[str]] = [[], [], []]
    for who, text in inserts:
        tree.insert(tenants[who], tree.match(text))
        stored[who].append(text)
        check_invariants(tree, tenants)
    for q in queries + [text for _, text in inserts]:
        m = tree.match(q)
        held = tree.lengths(m, 3)
        assert m.end == brute([s for ss in stored for s in ss], q)
        for who in range(3):
            assert held.get(tenants[who], 0) == brute(stored[who], q), (who, q, stored[who])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2), texts), max_size=40),
    st.lists(st.integers(1, 40), min_size=3, max_size=3),
    st.lists(texts, max_size=8),
)
def test_memory_bound_holds_under_eviction_and_matches_agree_with_what_is_held(
    inserts: list[tuple[int, str]], caps: list[int], queries: list[str]
) -> None:
    tree = RadixTree()
    tenants = [Tenant(i, caps[i]) for i in range(3)]
    for who, text in inserts:
        tree.insert(tenants[who], tree.match(text))
        for t in tenants:
            assert t.chars <= t.capacity
        check_invariants(tree, tenants)
        # The text just inserted is held in full (up to the budget).
        t = tenants[who]
        m = tree.match(text)
        assert tree.lengths(m, 3).get(t, 0) == min(len(text), t.capacity)
    for q in queries:
        m = tree.match(q)
        held = tree.lengths(m, 3)
        for t in tenants:
            assert held.get(t, 0) == brute(list(tree.held(t)), q)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), texts), max_size=30), st.integers(0, 2))
def test_remove_forgets_a_tenant_and_keeps_the_others(
    inserts: list[tuple[int, str]], gone: int
) -> None:
    tree = RadixTree()
    tenants = [Tenant(i, 50) for i in range(3)]
    for who, text in inserts:
        tree.insert(tenants[who], tree.match(text))
    before = {i: sorted(tree.held(t)) for i, t in enumerate(tenants)}
    tree.remove(tenants[gone])
    assert tenants[gone].chars == 0 and not tenants[gone].lru
    check_invariants(tree, tenants)
    for i, t in enumerate(tenants):
        if i != gone:
            assert sorted(tree.held(t)) == before[i]


@given(st.text(alphabet="ab", max_size=60), st.text(alphabet="ab", max_size=60), st.data())
def test_common_prefix_helper(a: str, b: str, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(b)))
    assert _common(a, b, pos) == lcp(a, b[pos:])


def test_a_split_keeps_both_holders_and_partial_matches_count() -> None:
    tree = RadixTree()
    a, b = Tenant("a", 1000), Tenant("b", 1000)
    tree.insert(a, tree.match("system: be brief\nuser: hi"))
    tree.insert(b, tree.match("system: be brief\nuser: bye"))
    m = tree.match("system: be brief\nuser: hello")
    held = tree.lengths(m, 2)
    assert held[a] == len("system: be brief\nuser: h")  # partly into a's own node
    assert held[b] == len("system: be brief\nuser: ")
    assert tree.nodes() == 3  # the shared part, and one node per tail


def test_eviction_drops_the_least_recently_used_conversation_first() -> None:
    tree = RadixTree()
    t = Tenant("t", 30)
    tree.insert(t, tree.match("S" * 10 + "old conversation"))  # 26 chars
    tree.insert(t, tree.match("S" * 10 + "new!"))  # shares S*10: 30 chars in all
    assert t.chars == 30
    tree.insert(t, tree.match("S" * 10 + "newer"))  # 35 > 30: the oldest tail goes
    assert t.chars <= 30
    held = sorted(tree.held(t))
    assert "S" * 10 + "old conversation" not in held
    assert "S" * 10 + "newer" in held


def test_evicting_a_node_evicts_what_its_tenant_holds_below_it() -> None:
    # A split puts the new upper node last in its holders' LRU order, so it can be more
    # recent than its own ancestor: evicting the ancestor must take it along.
    tree = RadixTree()
    a, b = Tenant("a", 1000), Tenant("b", 6)
    tree.insert(b, tree.match("aa"))
    tree.insert(b, tree.match("aabbbb"))  # b: "aa" -> "bbbb" (6 chars, full)
    tree.insert(a, tree.match("aabb"))  # splits "bbbb" into "bb" -> "bb"
    check_invariants(tree, [a, b])
    tree.insert(b, tree.match("ccc"))  # 9 > 6: b evicts "bb", then "aa" and all below
    check_invariants(tree, [a, b])
    assert b.chars <= 6
    for text in tree.held(b):
        m = tree.match(text)
        assert tree.lengths(m, 2)[b] == len(text)
