"""FleetBudget: a cost ceiling leased from the fleet, without Redis (its arithmetic)."""

from __future__ import annotations

import pytest

from lbclient.shared.budget import FleetBudget


class Link:
    def __init__(self, peers: int = 2, connected: bool = True) -> None:
        self.peers = peers
        self.connected = connected

    def status(self) -> tuple[int, bool]:
        return self.peers, self.connected


def budget(link: Link, ceiling: float = 10.0) -> FleetBudget:
    b = FleetBudget("cost:t", ceiling, 3600.0, link.status)
    b.roll(0)
    return b


def test_before_a_grant_a_process_has_its_local_share_then_owes_it() -> None:
    link = Link(peers=2)
    b = budget(link)
    assert b.allowance() == pytest.approx(5.0)  # ceiling / peers, not the ceiling
    assert b.reserve(4.0) and not b.reserve(2.0)
    b.settle(4.0, 3.0)  # cost 3 replaces the reservation of 4
    assert b.used == pytest.approx(3.0)
    owed, give, ask = b.plan(1.0, 0.2)
    assert owed == pytest.approx(3.0) and give == 0.0 and ask > 0
    b.answered(ask, total=3.0 + ask, prev=0.0, grant=ask)
    assert b.leased and b.allowance() == pytest.approx(3.0 + ask)


def test_grants_without_scripts_never_pass_the_ceiling_and_refusals_go_back() -> None:
    link = Link(peers=1)
    b = budget(link)
    b.largest = 4.0
    owed, _give, ask = b.plan(1.0, 0.2)
    assert owed == 0 and ask == pytest.approx(4.0)
    b.answered(ask, total=8.0 + ask, prev=8.0)  # others had claimed 8 of 10
    assert b.granted == pytest.approx(2.0) and b.returning == pytest.approx(2.0)
    assert b.fleet == pytest.approx(10.0)
    assert b.reserve(2.0) and not b.reserve(0.5)


def test_a_restarted_redis_is_owed_what_it_lost_and_redis_gone_means_local_share() -> None:
    link = Link(peers=2)
    b = budget(link)
    b.largest = 1.0
    _, _, ask = b.plan(1.0, 0.2)
    b.answered(ask, total=ask, prev=0.0, grant=ask)
    held = b.granted
    assert held > 0
    # Redis restarted empty: the key holds less than this process's own grants.
    owed, _, ask = b.plan(1.0, 0.2)
    b.answered(ask, total=owed + ask, prev=0.0, grant=ask)
    assert b.reowe == pytest.approx(held)
    owed, _, _ = b.plan(1.0, 0.2)
    assert owed == pytest.approx(held)  # added to the fleet's key again
    link.connected = False
    assert b.allowance() == pytest.approx(max(b.granted, 5.0))
    b.lost(owed)  # the round failed: owed again next time
    assert b.plan(1.0, 0.2)[0] == pytest.approx(held)


def test_after_an_outage_a_process_pays_its_debts_before_claiming() -> None:
    link = Link(peers=2)
    b = budget(link)
    b.reconnected(2)
    assert b.reserve(5.0)  # on the local share while the others reconnect
    for _ in range(2):
        _, _, ask = b.plan(1.0, 0.2)
        assert ask == 0.0
    _, _, ask = b.plan(1.0, 0.2)
    assert ask > 0


def test_a_new_window_starts_over_with_the_calls_in_flight() -> None:
    b = budget(Link(peers=1))
    b.in_flight = lambda: 1.5
    b.answered(5.0, total=5.0, prev=0.0, grant=5.0)
    assert b.reserve(4.0)
    b.roll(1)
    assert b.granted == 0 and b.used == pytest.approx(1.5) and not b.leased


def test_a_restarted_redis_counting_peers_from_one_does_not_grow_the_local_share() -> None:
    """Back from an outage, the restarted Redis has seen one heartbeat so far: the local
    share stays the ceiling over the most peers seen in the window, not the whole
    ceiling (CI caught 3 processes spending 10.5 of 10 this way)."""
    link = Link(peers=3)
    b = budget(link)
    link.connected = False
    assert b.reserve(2.5) and b.allowance() == pytest.approx(10.0 / 3)
    link.connected, link.peers = True, 1  # reconnected; only this process counted yet
    b.reconnected(5)
    assert b.allowance() == pytest.approx(10.0 / 3)
    assert not b.reserve(1.0)  # 2.5 + 1.0 > 10 / 3
