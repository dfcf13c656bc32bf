"""Hypothesis strategies and small builders shared by lbclient's tests.

Import as ``from strategies import ...`` (``tests/conftest.py`` puts this directory on
``sys.path``).  Builders make runtime objects without an event loop: ``states()`` for
pickers tested directly, ``ctx()`` for their :class:`PickContext`, ``call_of()`` for the
:class:`CallContext` a picker gets; ``acquire()`` takes a slot on a balancer's pool the
way a call does and returns its :class:`Lease`.  ``InOrder`` is a strategy that always
picks the first endpoint it may (so a test knows where each attempt goes).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from hypothesis import strategies as st

import lbclient
from lbclient import strategies as lbstrategies
from lbclient._context import CallContext
from lbclient.pool.lease import Lease
from lbclient.pool.state import EndpointState
from lbclient.strategies import PickContext, Totals
from lbclient.testing import FakeClock

__all__ = [
    "DECAY",
    "PRIOR",
    "InOrder",
    "acquire",
    "bad_weights",
    "call_of",
    "ctx",
    "endpoint_lists",
    "operations",
    "state_of",
    "states",
    "strategy_names",
    "url",
    "urls",
    "weight_lists",
    "weights",
]

DECAY = 10.0
"""Seconds: the EWMA decay the builders use (the Balancer default)."""
PRIOR = 0.05
"""Seconds: the latency prior of a fresh state (the Balancer's default cost)."""


# -- builders ---------------------------------------------------------------------------


def url(i: int) -> str:
    return f"http://10.0.0.{i}:8000"


def state_of(endpoint: lbclient.Endpoint | str, *, now: float = 0.0) -> EndpointState:
    ep = endpoint if isinstance(endpoint, lbclient.Endpoint) else lbclient.Endpoint(endpoint)
    return EndpointState(ep, now=now, decay=DECAY, cost=PRIOR)


def states(weights: Sequence[float]) -> list[EndpointState]:
    """One fresh state per weight, urls ``http://10.0.0.<i>:8000``."""
    return [state_of(lbclient.Endpoint(url(i), weight=w)) for i, w in enumerate(weights)]


def put(s: EndpointState, **fields: object) -> EndpointState:
    """Write ``fields`` on ``s`` as the pool would: the pick key follows
    (:meth:`EndpointState.rekey`)."""
    for name, value in fields.items():
        setattr(s, name, value)
    s.rekey()
    return s


def ctx(
    seed: int = 0, *, clock: FakeClock | None = None, totals: Totals | None = None
) -> PickContext:
    return PickContext(
        clock=clock if clock is not None else FakeClock(),
        rng=random.Random(seed),
        totals=totals if totals is not None else Totals(),
    )


def call_of(key: object = None, *, stream: bool = False) -> CallContext | None:
    """What a picker gets for a call with affinity ``key`` (``stream``: a streaming call);
    ``None`` -- a call carrying nothing -- when there is neither."""
    if key is None and not stream:
        return None
    return CallContext(key=key, stream=stream)


def acquire(
    lb: lbclient.Balancer,
    key: object = None,
    exclude: Collection[EndpointState] | None = None,
    now: float = 0.0,
    *,
    stream: bool = False,
) -> Lease:
    """Pick an endpoint of ``lb`` and take an in-flight slot on it at clock time ``now``,
    as a call with affinity ``key`` avoiding ``exclude`` would; end it with the lease's
    ``ok()`` / ``fail(exc)`` / ``cancel()``."""
    return lb._pool.acquire(call_of(key, stream=stream), exclude, now)


# -- strategies -------------------------------------------------------------------------

weights = st.integers(min_value=1, max_value=8).map(float)
"""Endpoint weights: small whole numbers (exact shares are easy to state)."""

bad_weights = st.one_of(
    st.sampled_from(
        [0, -1, 0.0, -0.5, float("nan"), float("inf"), float("-inf"), "2", None, 1e-7, 1e7]
    ),
    st.booleans(),
    st.floats(max_value=0.0),
    st.floats(min_value=0.0, max_value=1e-6, exclude_max=True),
    st.floats(min_value=1e6, exclude_min=True),
)
"""Values ``Endpoint(weight=...)`` must reject with a ConfigError (weights live in
[1e-6, 1e6])."""

strategy_names = st.sampled_from(lbstrategies.names())
"""Every registered strategy name."""


def weight_lists(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[list[float]]:
    return st.lists(weights, min_size=min_size, max_size=max_size)


def urls(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[list[str]]:
    """Distinct endpoint URLs."""
    return st.lists(
        st.integers(min_value=1, max_value=250), min_size=min_size, max_size=max_size, unique=True
    ).map(lambda ns: [url(n) for n in ns])


def endpoint_lists(
    min_size: int = 1, max_size: int = 8
) -> st.SearchStrategy[list[lbclient.Endpoint]]:
    """Endpoints with distinct URLs and random weights."""
    return urls(min_size, max_size).flatmap(
        lambda us: st.lists(weights, min_size=len(us), max_size=len(us)).map(
            lambda ws: [lbclient.Endpoint(u, weight=w) for u, w in zip(us, ws, strict=True)]
        )
    )


operations = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "succeed", "fail", "cancel", "drain", "undrain"]),
        st.integers(min_value=0, max_value=63),
    ),
    max_size=60,
)
"""A random sequence of balancer operations; the int picks the target (mod pool size)."""


class _InOrderPicker:
    def __init__(self, states: Sequence[EndpointState]) -> None:
        self._states = tuple(states)

    def pick(self, call: object, exclude: Collection[EndpointState] | None) -> EndpointState | None:
        for s in self._states:
            if not exclude or s not in exclude:
                return s
        return None


class InOrder:
    """The first endpoint not excluded, in pool order: a call's first attempt goes to
    the first endpoint, a retry to the second, and a filter that skips one is seen."""

    name = "in_order"

    def picker(self, states: Sequence[EndpointState], ctx: PickContext) -> _InOrderPicker:
        return _InOrderPicker(states)
