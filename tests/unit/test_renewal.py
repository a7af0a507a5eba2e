"""When a daemon cut from the database lets its transfers go: before its leases lapse."""

from __future__ import annotations

from asyncsat.leases import Renewal


def test_heartbeats_every_third_of_the_lease_and_never_past_the_deadline() -> None:
    r = Renewal(30.0, now=100.0)
    assert r.every == 10.0
    assert r.deadline == 100.0 + 30.0 - 2.0  # a lease holds 30 s from a renewal's sending
    assert r.wait(100.0) == 10.0
    assert r.wait(125.0) == 3.0  # two heartbeats failed: the next one comes at the deadline
    assert r.wait(128.0) == 0.05


def test_lapsing_once_at_the_deadline_and_again_only_after_a_renewal() -> None:
    r = Renewal(1.0, now=0.0)
    assert r.deadline == 0.75
    assert not r.lapsing(0.7)
    assert r.lapsing(0.75)
    assert not r.lapsing(5.0)  # the transfers were let go already
    assert r.wait(5.0) == r.every  # the heartbeat goes on at its pace meanwhile
    r.renewed(6.0)
    assert not r.lapsing(6.5)
    assert r.lapsing(6.8)
