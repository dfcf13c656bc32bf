"""The ``prefix`` strategy on a fake clock: affinity, spilling a hot prefix (and
replicating it), misses to the least loaded (not the smallest tree), the imbalance
guard keeping affinity among the rest, membership, memory, and the route plumbing."""

from __future__ import annotations

import random

import pytest
from strategies import ctx, states

import lbclient
from lbclient._context import CallContext
from lbclient.pool.lease import Lease
from lbclient.strategies import Prefix
from lbclient.strategies.prefix import PrefixPicker
from lbclient.testing import FakeClock

SYSTEM = "system: " + "You are a helpful assistant. " * 20 + "\n"  # ~590 chars


def convo(i: int, turns: int = 1, system: str = SYSTEM) -> str:
    """Conversation ``i`` after ``turns`` user turns, under a shared system prompt."""
    return system + "".join(
        f"user: conversation {i} turn {t} " + "x" * 200 + "\n" for t in range(turns)
    )


def own(i: int, turns: int = 1) -> str:
    """Conversation ``i`` under a system prompt of its own (shares nothing)."""
    return convo(i, turns, system=f"system: persona {i} " + "p" * 300 + "\n")


def make(n: int = 3, clock: FakeClock | None = None, **kw: object) -> lbclient.Balancer:
    return lbclient.Balancer(
        [f"http://10.0.0.{i}:8000" for i in range(n)],
        strategy=Prefix(**kw),  # type: ignore[arg-type]
        clock=clock or FakeClock(),
        rng=1,
    )


def pick(lb: lbclient.Balancer, text: str | None, tokens: float | None = None) -> Lease:
    return lb._pool.acquire(CallContext(prefix=text, tokens=tokens), None, lb._pool.now())


def picker(lb: lbclient.Balancer) -> PrefixPicker:
    p = lb._pool.snap.base
    assert isinstance(p, PrefixPicker)
    return p


def test_a_conversation_stays_on_its_replica_while_the_pool_is_balanced() -> None:
    lb = make()
    homes = {}
    for i in range(6):
        lease = pick(lb, own(i, 1))
        homes[i] = lease.state
        lease.ok(0.05)
    for turn in range(2, 6):
        for i in range(6):
            lease = pick(lb, own(i, turn))
            assert lease.state is homes[i], (i, turn)
            lease.ok(0.05)
    # The first turns spread: misses go to the least loaded, all were idle -> at random.
    assert len({s.url for s in homes.values()}) >= 2


def test_a_shared_system_prompt_attracts_new_conversations_up_to_the_load_bound() -> None:
    # At no load every new conversation goes where the system prompt is; with calls in
    # flight they spread once the holder is balance_abs calls above the least loaded.
    lb = make(n=4)
    first = pick(lb, convo(0, 1))
    holder = first.state
    leases = [first]
    for i in range(1, 12):
        leases.append(pick(lb, convo(i, 1)))
    on_holder = sum(1 for x in leases if x.state is holder)
    assert 4 <= on_holder <= 6  # balance_abs=4 above the others, then they get some
    assert holder.inflight - min(s.inflight for s in lb._pool.pickable) <= 5


def test_misses_go_to_the_least_loaded_not_the_smallest_tree() -> None:
    # SGLang's death spiral (sglang PR 14305): a miss goes to the smallest tree whatever
    # its load.  Endpoint 0 has the smallest tree (none) but the most calls in flight.
    lb = make()
    held = [pick(lb, None) for _ in range(12)]
    busy = held[0].state
    for lease in held:
        if lease.state is not busy:
            lease.ok(0.05)
    assert busy.inflight >= 2
    for i in range(20):
        lease = pick(lb, f"unique prompt {i} " + "y" * 500)
        assert lease.state is not busy
        lease.ok(0.05)


def test_a_hot_prefix_spills_when_its_home_is_loaded_and_is_then_held_twice() -> None:
    lb = make(hit_gain=4.0)
    first = pick(lb, convo(0, 3))
    home = first.state
    first.ok(0.05)
    leases = []
    spilled = None
    for _ in range(12):  # the same conversation, concurrently: its home fills up
        lease = pick(lb, convo(0, 3))
        leases.append(lease)
        if lease.state is not home:
            spilled = lease.state
            break
    assert spilled is not None, "the hot prefix never left its loaded home"
    assert home.inflight >= 2
    p = picker(lb)
    m = p.tree.match(convo(0, 3))
    held = p.tree.lengths(m, 3)
    tenant_home, tenant_spill = p.tenant(home), p.tenant(spilled)
    assert tenant_home is not None and tenant_spill is not None
    assert held[tenant_home] == held[tenant_spill] == len(convo(0, 3))  # replicated
    for lease in leases:
        lease.ok(0.05)


def test_the_imbalance_guard_keeps_affinity_among_the_rest() -> None:
    # SGLang falls back to shortest queue for every request once the pool is imbalanced
    # (affinity lost: sglang PR 32195).  Here the overloaded endpoint is set aside, and
    # among the others the longest match still wins.
    lb = make(n=3, hit_gain=100.0, balance_abs=2.0, balance_rel=1.5)
    a = pick(lb, convo(1, 4))
    home = a.state
    a.ok(0.05)
    # Another conversation under the same system prompt, elsewhere:
    b = lb._pool.acquire(
        CallContext(prefix=SYSTEM + "user: another conversation " + "z" * 300), {home}, 0.0
    )
    second = b.state
    b.ok(0.05)
    third = next(s for s in lb._pool.pickable if s not in (home, second))
    load = [pick(lb, None) for _ in range(40)]
    for lease in load:
        if lease.state is not home:
            lease.ok(0.05)
    assert home.inflight > 4  # far above the others (0): set aside whatever it holds
    lease = pick(lb, convo(1, 5))
    assert lease.state is second  # shares the system prompt: better than `third`
    assert third is not second
    assert picker(lb).picks[2] >= 1  # counted as set aside


def test_without_a_prefix_it_is_the_least_loaded() -> None:
    lb = make()
    a, b = pick(lb, None), pick(lb, None)
    assert a.state is not b.state
    c = pick(lb, None)
    assert c.state not in (a.state, b.state)


def test_excluded_endpoints_are_not_picked_even_with_the_longest_match() -> None:
    lb = make()
    lease = pick(lb, convo(3, 2))
    home = lease.state
    lease.ok(0.05)
    for _ in range(10):
        s = picker(lb).pick(CallContext(prefix=convo(3, 3)), {home})
        assert s is not None and s is not home
    assert picker(lb).pick(CallContext(prefix="x"), set(lb._pool.pickable)) is None


def test_a_failing_endpoint_loses_its_affinity() -> None:
    clock = FakeClock()
    lb = make(clock=clock)
    lease = pick(lb, own(4, 2))
    home = lease.state
    lease.fail(ConnectionError("refused"))
    for _ in range(5):
        other = pick(lb, own(4, 3))
        assert other.state is not home
        other.ok(0.05)


def test_the_tree_stays_within_max_chars_per_endpoint() -> None:
    lb = make(max_chars=5000)
    rng = random.Random(3)
    for _ in range(400):
        lease = pick(lb, own(rng.randrange(50), rng.randrange(1, 8)))
        lease.ok(0.05)
    p = picker(lb)
    for s in lb._pool.pickable:
        t = p.tenant(s)
        assert t is not None and 0 < t.chars <= 5000
    assert p.tree.nodes() <= 3 * 5000


def test_a_removed_endpoint_loses_its_share_at_once_an_ejected_one_keeps_it() -> None:
    clock = FakeClock()
    lb = make(n=3, clock=clock, forget_after=30.0)
    for i in range(12):
        pick(lb, own(i, 2)).ok(0.05)
    p = picker(lb)
    s0, s1 = lb._pool.pickable[0], lb._pool.pickable[1]
    t0, t1 = p.tenant(s0), p.tenant(s1)
    assert t0 is not None and t0.chars > 0 and t1 is not None and t1.chars > 0
    lb.remove(s0.url)
    pick(lb, None).ok(0.05)  # the next pick rebuilds the snapshot
    assert picker(lb) is p  # the same picker (and tree) carried over
    assert p.tenant(s0) is None and t0.chars == 0
    lb.set_health(s1.url, False)  # ejected: still a member
    pick(lb, None).ok(0.05)
    assert p.tenant(s1) is t1 and t1.chars > 0
    clock.advance(31.0)
    lb.set_health(s1.url, True)
    lb.set_health(s1.url, False)
    pick(lb, None).ok(0.05)
    clock.advance(1.0)
    lb.set_health(lb._pool.pickable[-1].url, True)  # any change: a rebuild
    pick(lb, None).ok(0.05)


def test_forget_after_drops_an_endpoint_out_of_the_set_too_long() -> None:
    clock = FakeClock()
    lb = make(n=2, clock=clock, forget_after=5.0)
    for i in range(4):
        pick(lb, own(i, 2)).ok(0.05)
    p = picker(lb)
    s0, s1 = lb._pool.members.values()
    t0 = p.tenant(s0)
    lb.set_health(s0.url, False)
    pick(lb, None).ok(0.05)
    assert p.tenant(s0) is t0
    clock.advance(6.0)
    lb.drain(s1.url)  # another change, after forget_after: the snapshot is rebuilt
    lb.undrain(s1.url)
    pick(lb, None).ok(0.05)
    assert p.tenant(s0) is None


def test_a_large_call_weighs_its_uncached_part_more() -> None:
    # Home holds the prompt; the other endpoint is idle.  A call of average size spills
    # once the home has enough in flight; a call ten times larger (tokens=) stays home.
    lb = make(n=2, hit_gain=2.0, balance_abs=1000.0)
    first = pick(lb, convo(7, 3), tokens=100)
    home = first.state
    first.ok(0.05)
    other = next(s for s in lb._pool.pickable if s is not home)
    hold = [lb._pool.acquire(CallContext(tokens=100), {other}, lb._pool.now()) for _ in range(3)]
    assert all(x.state is home for x in hold)
    # (The large one first: a pick records the prompt where it sends it.)
    large = picker(lb).pick(CallContext(prefix=convo(7, 3), tokens=1000), None)
    small = picker(lb).pick(CallContext(prefix=convo(7, 3), tokens=100), None)
    assert small is not home
    assert large is home


def test_picker_direct_with_ctx_builders() -> None:
    ss = states([1.0, 1.0])
    p = Prefix().picker(ss, ctx(1))
    s = p.pick(CallContext(prefix=convo(1, 2)), None)
    assert s in ss
    assert p.pick(CallContext(prefix=convo(1, 3)), None) is s


@pytest.mark.parametrize(
    "kw",
    [
        {"hit_gain": -1},
        {"hit_gain": float("nan")},
        {"min_match": 1.5},
        {"balance_rel": 0.5},
        {"balance_abs": "8"},
        {"max_chars": 0},
        {"forget_after": -1.0},
        {"hit_gain": True},
    ],
)
def test_bad_configuration_is_a_config_error_naming_the_field(kw: dict[str, object]) -> None:
    with pytest.raises(lbclient.ConfigError, match=next(iter(kw))):
        Prefix(**kw)  # type: ignore[arg-type]


async def test_route_prefix_reaches_the_picker_and_bad_values_fail_before_sending() -> None:
    seen: list[str | None] = []

    class Recording:
        name = "recording"

        def picker(self, states_, ctx_):  # type: ignore[no-untyped-def]
            class P:
                def pick(self, call, exclude):  # type: ignore[no-untyped-def]
                    seen.append(call.prefix if call is not None else None)
                    return states_[0]

            return P()

    lb = lbclient.Balancer(["http://10.0.0.1:8000"], strategy=Recording())

    @lb.route(prefix=lambda messages: lbclient.prompt_text(messages))
    async def complete(endpoint: lbclient.Endpoint, messages: list[dict[str, str]]) -> str:
        return endpoint.url

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert await complete(msgs) == "http://10.0.0.1:8000"
    assert seen == ["system: Be brief.\nuser: Hi\n"]

    async def plain(endpoint: lbclient.Endpoint) -> str:
        return "ok"

    assert await lb.call(plain, prefix="abc") == "ok"
    assert seen[-1] == "abc"
    async with lb.pick(prefix="xyz"):
        pass
    assert seen[-1] == "xyz"

    @lb.route(prefix=lambda x: x)
    async def bad(endpoint: lbclient.Endpoint, x: object) -> None:
        raise AssertionError("never sent")

    n = len(seen)
    with pytest.raises(TypeError, match="prefix="):
        await bad(42)
    assert len(seen) == n
    await lb.aclose()


def test_a_route_without_prefix_keeps_the_fast_path() -> None:
    lb = lbclient.Balancer(["http://10.0.0.1:8000"], strategy="prefix")

    async def fn(endpoint: lbclient.Endpoint) -> None:
        return None

    fast = lb.route(fn)
    full = lb.route(prefix=lambda: "text")(fn)
    assert fast.__code__.co_qualname.startswith("_fast.")  # type: ignore[attr-defined]
    assert full.__code__.co_qualname.startswith("_full.")  # type: ignore[attr-defined]


def test_prompt_text_makes_history_a_prefix_of_the_next_turn() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}]
    first = lbclient.prompt_text(msgs)
    msgs += [{"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    assert lbclient.prompt_text(msgs).startswith(first)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
    assert lbclient.prompt_text(parts) == "user: a\n"
    assert lbclient.prompt_text("raw prompt") == "raw prompt"
    assert lbclient.prompt_text([{"role": "user"}, "junk"]) == "user: \n"  # type: ignore[list-item]
