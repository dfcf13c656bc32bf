"""``prefix``: send a prompt where its prefix is already in a replica's KV cache -- unless
that replica is too loaded for the cache to pay.

An LLM replica answers a prompt whose prefix it has cached (system prompt, the
conversation so far, few-shot examples) several times faster: it skips the prefill of
that part.  This strategy keeps an approximate radix tree of the prompt text recently
sent to each endpoint (:mod:`lbclient.strategies._radix`) and prices every endpoint in
one unit, *calls of average size waiting*::

    cost(e) = queue(e) + 1 + hit_gain x size x (1 - matched(e))

* ``queue(e)``: calls in flight there, in calls of average size (tokens in flight over
  the mean call's tokens when calls give ``tokens=``; the server's own queue when it
  reports a larger one -- ``x-queue-depth`` or :class:`lbclient.MetricsPoller`), per
  unit of weight.  A slow replica shows as a longer queue;
* ``matched(e)``: the share of the prompt endpoint ``e`` is modelled to hold (0 below
  ``min_match`` characters); ``size``: this call's tokens over the mean (1 without
  ``tokens=``).  The uncached part of the prompt costs ``hit_gain`` calls per call of
  average size;
* an endpoint with a recent failure (a live penalty) is priced as holding nothing,
  times penalty / its latency, as ``peak_ewma`` prices it.

The cheapest endpoint wins (ties at random), and the prompt is recorded in its tree at
pick time -- it will be cached there once the call has run.  Endpoints loaded more than
``balance_abs`` calls above the least loaded *and* ``balance_rel`` times it are set
aside first (never all: the least loaded stays).  A call without a prefix goes to the
least ``ewma x (queue + 1)`` (``least_response_time``).

What we took from SGLang's ``cache_aware`` router (``sgl-router/src/policies/
cache_aware.rs`` and ``tree.rs``): one character-level radix tree shared by all workers
with per-node owners and per-owner LRU eviction of leaves, recording the prompt at
routing time, and a load guard with an absolute *and* a relative threshold (its
defaults: cache threshold 0.3, balance thresholds 64 requests / 1.5, a tree of 2**26
characters swept every 120 s).  What we do differently, and why:

* **One price, no switch between two policies.**  SGLang routes by cache while the pool
  is balanced and by shortest queue as soon as it is not -- and then every request loses
  its affinity at once (sglang PR 32195), the caches it built go cold, the extra
  prefill makes the imbalance worse.  Here load and cache are one price; the guard only
  sets the overloaded endpoints aside, and among the others the longest match still
  counts.
* **A miss goes to the least loaded, not the smallest tree.**  SGLang sends a prompt
  matching no worker above its threshold to the worker with the smallest tree, whatever
  its load, and a prompt matching above it to the first owner it finds: with one hot
  shared prefix, one replica takes everything (the "death spiral" of sglang PR 14305).
  Here a miss is priced like any call: it goes to the least loaded.
* **Hot prefixes replicate instead of piling up.**  The home of a hot conversation or
  system prompt fills up; once its queue outweighs the prefill saved, the next request
  goes to the next cheapest endpoint -- preferring one that shares the longest part --
  which records it and from then on competes with the home: a hot prefix ends up on as
  many replicas as its load needs.  (llm-d's scheduler mixes a prefix-cache scorer with a
  queue scorer by weights, 3 and 2 in its default profile; we price both in one unit.)
* **Queue counts, not latency.**  Multiplying by a peak-EWMA latency, as ``peak_ewma``
  does, looked natural and failed: with a cache every miss is 4-6x a hit, so each miss
  made its replica's estimate jump, its conversations spilled elsewhere as misses, which
  made those jump too -- on the simulated chat (``benchmarks/prefix_sim.py``, 4 replicas
  x 4 slots, 280 req/s) the mean was 463 ms with the EWMA and 146 ms with queue counts
  (SGLang-like affinity: 93 ms).  A slow replica still gets less: its queue is longer.
* **Memory is bounded at every moment**: ``max_chars`` per endpoint, evicted in the
  insert that overflowed (LRU, O(1) per node), not by a periodic sweep; an endpoint
  that leaves the pool takes its share of the tree with it at once (one out of the
  pickable set keeps it for ``forget_after`` seconds).
* **Cost.**  The tree is walked a node at a time with C string comparisons: a whole pick
  of a 4,000-character multi-turn prompt on 8 endpoints costs ~10 us of CPU in CPython,
  its tree update ~2 us (``python benchmarks/prefix.py --micro``).  O(prompt length)
  at most; O(endpoints) for the prices.

``hit_gain`` is what a fully cached prompt is worth, in calls of average size waiting:
about (full-miss latency / full-hit latency - 1) x the calls a replica serves at once,
plus a margin for the prefill a miss adds to everyone's queue.  The default, 16, and
``balance_abs=4`` come from sweeping ``benchmarks/prefix_sim.py`` over two fleet shapes
(8 x 2 and 4 x 4 slots), loads from 0.6x to 1.2x, a slow replica, hot and single system
prompts and no shared prefix at all (``--gains 4,8,32``): 8, 16 and 32 are within 5% of
each other on the mean everywhere; 4 spills too eagerly (p99 113 ms against 61 ms on 4 x 4;
1.5x the mean at 280 req/s in an earlier, cache-starved fleet).  ``balance_abs=4``
rather than 8 halved the mean when every conversation shares one system prompt.

The tree is a *model*: it does not know what the replica really evicted.  Give
``max_chars`` about the replica's KV capacity in characters (~4 per token) times the
share prompts may use; too large a value only makes the strategy optimistic about old
prefixes (whose price is still bounded by load).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from .._errors import ConfigError
from ..pool.load import token_outstanding
from ..pool.state import PENALTY_DECAY, EndpointState
from ._base import PickContext, Totals
from ._radix import RadixTree, Tenant

if TYPE_CHECKING:
    from .._context import CallContext

__all__ = ["NAME", "Prefix", "PrefixPicker"]

NAME = "prefix"
_exp = math.exp


class PrefixPicker:
    """The picker: the shared tree, one :class:`~._radix.Tenant` per endpoint, and the
    pricing.  Kept across snapshot rebuilds (``updated``), so the tree survives
    membership and health changes; an endpoint out of the pickable set keeps its share
    for ``forget_after`` seconds (a breaker ejection or a drain that ends finds its cache
    still modelled), one removed from the pool loses it at once.  With ``locality=``,
    the local tier and the whole pool get a picker each, so each models the prompts
    sent through it (a spill-over to another region starts that region's tree)."""

    __slots__ = (
        "_abs",
        "_ctx",
        "_gain",
        "_gone",
        "_min",
        "_now",
        "_random",
        "_rel",
        "_states",
        "_tenants",
        "_totals",
        "cfg",
        "picks",
        "tree",
    )

    def __init__(self, states: Sequence[EndpointState], ctx: PickContext, cfg: Prefix) -> None:
        self.cfg = cfg
        self.tree = RadixTree()
        self._tenants: dict[EndpointState, Tenant] = {}
        self._gone: dict[EndpointState, float] = {}
        self._gain = cfg.hit_gain
        self._min = cfg.min_match
        self._abs = cfg.balance_abs
        self._rel = cfg.balance_rel
        self.picks = [0, 0, 0]  # with a prefix, sent where the longest match was, set aside
        self._install(states, ctx)

    def _install(self, states: Sequence[EndpointState], ctx: PickContext) -> None:
        self._states = tuple(states)
        self._ctx = ctx
        self._now = ctx.clock.now
        self._random = ctx.rng.random
        self._totals: Totals = ctx.totals
        for s in self._states:
            if s not in self._tenants:
                self._tenants[s] = Tenant(s.url, self.cfg.max_chars)

    def updated(self, states: Sequence[EndpointState], ctx: PickContext) -> PrefixPicker:
        """The pickable set changed: keep the tree, drop the shares of endpoints that
        left the pool (the pool marks every member's ``available`` before asking, so a
        state gone from ``states`` but still marked available is no member any more)."""
        now = ctx.clock.now()
        live = set(states)
        for s in list(self._tenants):
            if s in live:
                self._gone.pop(s, None)
                continue
            since = self._gone.setdefault(s, now)
            if s.available or now - since >= self.cfg.forget_after:
                self.forget(s)
        self._install(states, ctx)
        return self

    def forget(self, s: EndpointState) -> None:
        """Drop everything modelled for ``s``."""
        tenant = self._tenants.pop(s, None)
        self._gone.pop(s, None)
        if tenant is not None:
            self.tree.remove(tenant)

    def tenant(self, s: EndpointState) -> Tenant | None:
        """``s``'s share of the tree (tests, stats)."""
        return self._tenants.get(s)

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        text = call.prefix if call is not None else None
        if not text:
            return self._least(exclude)
        states = self._states
        n = len(states)
        tree = self.tree
        m = tree.match(text)
        held = tree.lengths(m, n) if m.path else {}
        now = self._now()
        totals = self._totals
        mean = totals.mean_tokens
        size = 1.0
        if call is not None and call.tokens and mean > 0:
            size = call.tokens / mean
        # Loads first: the imbalance guard needs the least.
        loads: list[float] = []
        qmin = math.inf
        for s in states:
            q = token_outstanding(s, now, mean) / s.weight
            loads.append(q)
            if q < qmin and not (exclude and s in exclude):
                qmin = q
        if qmin == math.inf:
            return None
        limit = qmin + self._abs
        if qmin * self._rel > limit:
            limit = qmin * self._rel
        gain = self._gain * size
        floor = self._min
        length = len(text)
        tenants = self._tenants
        start = int(self._random() * n)
        best: EndpointState | None = None
        best_cost = math.inf
        best_match = 0
        longest = 0
        set_aside = False
        for k in range(start, start + n):
            i = k - n if k >= n else k
            s = states[i]
            if exclude and s in exclude:
                continue
            matched = held.get(tenants[s], 0) if held else 0
            if matched < floor:
                matched = 0
            elif matched > longest:
                longest = matched
            q = loads[i]
            if q > limit:
                set_aside = True
                continue
            if s.penalty:  # a recent failure: its cache is worth nothing, and it is
                # priced like peak_ewma prices it (penalty / its latency)
                p = s.penalty * _exp(-(now - s.penalty_at) / PENALTY_DECAY)
                if p > s.cost:
                    cost = (q + 1.0 + gain) * p / s.cost
                    if cost < best_cost:
                        best, best_cost, best_match = s, cost, 0
                    continue
            cost = q + 1.0 + gain * (1.0 - matched / length)
            if cost < best_cost:
                best, best_cost, best_match = s, cost, matched
        if best is None:  # only reachable with NaN loads: be safe
            return self._least(exclude)
        picks = self.picks
        picks[0] += 1
        if longest and best_match == longest:
            picks[1] += 1
        if set_aside:
            picks[2] += 1
        tree.insert(tenants[best], m)
        return best

    def _least(self, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        """No prefix: the least ``ewma x (queue + 1)`` (random start breaks ties)."""
        states = self._states
        n = len(states)
        now = self._now()
        mean = self._totals.mean_tokens
        start = int(self._random() * n)
        best: EndpointState | None = None
        best_cost = math.inf
        for k in range(start, start + n):
            s = states[k - n if k >= n else k]
            if exclude and s in exclude:
                continue
            cost = s.ewma(now) * (token_outstanding(s, now, mean) / s.weight + 1.0)
            if cost < best_cost:
                best, best_cost = s, cost
        return best

    def __repr__(self) -> str:
        return f"<PrefixPicker endpoints={len(self._states)} nodes={self.tree.nodes()}>"


def _number(
    name: str, minimum: float, *, integer: bool = False, open_min: bool = False
) -> Callable[[object, object, object], None]:
    def check(_inst: object, _attr: object, value: object) -> None:
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"Prefix.{name} must be a number, got {value!r}")
        v = float(value)
        if not math.isfinite(v) or v < minimum or (open_min and v == minimum):
            bound = f"> {minimum:g}" if open_min else f">= {minimum:g}"
            raise ConfigError(f"Prefix.{name} must be a finite number {bound}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class Prefix:
    """Prompt-prefix (KV-cache) affinity bounded by load.  See the module docstring.

    * ``hit_gain`` (default 16.0) -- what a fully cached prompt is worth, in calls of
      average size waiting (see the module docstring for how to choose it).
    * ``min_match`` (default 256 characters, ~64 tokens) -- shorter matches count as
      none (a KV cache works in blocks; a few shared characters save nothing).
    * ``balance_abs`` (default 4.0) and ``balance_rel`` (default 1.5) -- an endpoint
      loaded more than ``balance_abs`` calls above the least loaded *and* more than
      ``balance_rel`` times it is not chosen, whatever it has cached.
    * ``max_chars`` (default 1,000,000) -- characters of prompt text modelled per
      endpoint (LRU beyond); the tree's memory is at most the sum over endpoints.
    * ``forget_after`` (default 300 s) -- an endpoint out of the pickable set (ejected,
      draining, cooling down) keeps its share of the tree this long.

    Give each call its prompt text with ``route(prefix=lambda payload: text)`` (the
    built-in :class:`~lbclient.http.ChatClient` derives it from the messages: see
    :func:`lbclient.prompt_text`).
    """

    hit_gain: float = attrs.field(default=16.0, validator=_number("hit_gain", 0.0))
    min_match: int = attrs.field(default=256, validator=_number("min_match", 0, integer=True))
    balance_abs: float = attrs.field(default=4.0, validator=_number("balance_abs", 0.0))
    balance_rel: float = attrs.field(default=1.5, validator=_number("balance_rel", 1.0))
    max_chars: int = attrs.field(default=1_000_000, validator=_number("max_chars", 1, integer=True))
    forget_after: float = attrs.field(default=300.0, validator=_number("forget_after", 0.0))
    name: str = attrs.field(default=NAME, init=False)
    uses_prefix = True  # the built-in clients derive the prompt text only for such strategies

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> PrefixPicker:
        return PrefixPicker(states, ctx, self)
