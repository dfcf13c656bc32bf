"""``consistent_hash``: the same key goes to the same endpoint -- unless it is overloaded.

For prompt-prefix / KV-cache affinity: send every request of a conversation (or tenant,
or system prompt) to the replica that already has its prefix cached.  Keys are hashed
with mmh3 onto a ring of virtual nodes; an endpoint joining or leaving moves only about
1/n of the keys.

**Bounded load** ("Consistent Hashing with Bounded Loads", Mirrokni, Thorup & Zadimoghaddam
2018; Envoy's ``hash_balance_factor``): no endpoint takes more than
``ceil(balance_factor x (in-flight + 1) x weight / total weight)`` concurrent requests;
a pick that would exceed it walks the ring to the next endpoint with room.  A hot key
therefore spills over instead of melting one replica, at the price of some affinity.
``balance_factor=1.25`` (the paper's and Envoy's usual choice) keeps every replica
within 25% of the mean while keeping most keys home.

A pick without a key (``key=None``) falls back to ``peak_ewma``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

import attrs

from .._errors import ConfigError
from .._numbers import is_int, is_number
from ..pool.load import peak_ewma_load, peak_ewma_ttft_load
from ..pool.state import EndpointState
from ._base import PickContext, Totals
from ._ring import Ring, hash_key
from .p2c import P2CPicker

if TYPE_CHECKING:
    from .._context import CallContext

NAME = "consistent_hash"

_ceil = math.ceil


class _RingPicker:
    __slots__ = ("_c", "_fallback", "_ring", "_total_w", "_totals")

    def __init__(
        self,
        states: Sequence[EndpointState],
        ctx: PickContext,
        ring: Ring,
        balance_factor: float | None,
    ) -> None:
        self._ring = ring
        self._fallback = P2CPicker(states, ctx, peak_ewma_load, peak_ewma_ttft_load)
        self._c = balance_factor
        self._totals: Totals = ctx.totals
        self._total_w = sum(s.weight for s in states)

    def pick(
        self, call: CallContext | None, exclude: Collection[EndpointState] | None
    ) -> EndpointState | None:
        key = call.key if call is not None else None
        if key is None:
            return self._fallback.pick(call, exclude)
        ring = self._ring
        owners = ring.owners
        size = len(owners)
        i = ring.start(hash_key(key))
        if self._c is None:  # plain consistent hashing: first non-excluded owner
            for _ in range(size):
                s = owners[i]
                if not exclude or s not in exclude:
                    return s
                i = i + 1 if i + 1 < size else 0
            return None
        per_weight = self._c * (self._totals.inflight + 1) / self._total_w
        for _ in range(size):
            s = owners[i]
            if (not exclude or s not in exclude) and s.inflight < _ceil(per_weight * s.weight):
                return s
            i = i + 1 if i + 1 < size else 0
        # Every owner is full or excluded (only possible when excluded ones hold the room).
        return self._fallback.pick(call, exclude)

    def updated(self, states: Sequence[EndpointState], ctx: PickContext) -> _RingPicker:
        """The pickable set changed: update the ring in place (only the endpoints that
        came or went move), and the load bound's totals."""
        self._ring.update(states)
        self._fallback = P2CPicker(states, ctx, peak_ewma_load, peak_ewma_ttft_load)
        self._total_w = sum(s.weight for s in states)
        return self


def _balance(value: object) -> float | None:
    if value is None:
        return None
    if not is_number(value) or value < 1.0:
        raise ConfigError(f"balance_factor must be a number >= 1.0 or None, got {value!r}")
    return float(value)


def _positive_int(name: str) -> Callable[[object, object, object], None]:
    def check(_inst: object, _attr: object, value: object) -> None:
        if not is_int(value) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class ConsistentHash:
    """mmh3 ring with virtual nodes and bounded load.

    * ``vnodes`` -- points per endpoint of average weight (default 100: keys spread within
      about 10% across endpoints before the load bound even kicks in).
    * ``balance_factor`` -- the load bound ``c`` (>= 1.0, default 1.25); ``None`` disables
      it (pure affinity: a hot key can overload its endpoint).
    * ``max_ring_size`` -- caps the points for huge pools (default 65,536), so building the
      ring stays fast; fewer points per endpoint means coarser spread, which the load
      bound corrects.  Membership changes update the ring incrementally.
    """

    vnodes: int = attrs.field(default=100, validator=_positive_int("vnodes"))
    balance_factor: float | None = attrs.field(default=1.25, converter=_balance)
    max_ring_size: int = attrs.field(default=65536, validator=_positive_int("max_ring_size"))
    name: str = attrs.field(default=NAME, init=False)

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _RingPicker:
        ring = Ring(states, self.vnodes, self.max_ring_size)
        return _RingPicker(states, ctx, ring, self.balance_factor)
