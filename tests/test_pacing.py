"""The pacer of a class held to a share of each replica (``lb.pacing``): how far apart it
sends a replica its requests, from how long they last there."""

from __future__ import annotations

import pytest

from lb.pacing import SPREAD, Pacer
from lb.registry import Endpoint, EndpointGroup


def test_nothing_is_held_before_a_request_has_finished() -> None:
    pacer = Pacer()
    pacer.dispatched("a", 1, 8, now=10.0)
    assert pacer.held(10.0) == []


def test_the_next_dispatch_waits_for_the_requests_part_of_the_replicas_cycle() -> None:
    pacer = Pacer()
    pacer.finished("a", 0.8)
    pacer.dispatched("a", 1, 8, now=10.0)  # one of 8 slots: an eighth of 0.8 s, times SPREAD
    gap = 0.8 * SPREAD / 8
    assert pacer.held(10.0 + gap - 1e-6) == ["a"]
    assert pacer.held(10.0 + gap) == []


def test_a_heavier_request_holds_the_replica_longer() -> None:
    pacer = Pacer()
    pacer.finished("a", 1.0)
    pacer.dispatched("a", 4, 8, now=0.0)  # tokens as the load unit: half the capacity
    assert pacer.held(1.0 * SPREAD / 2 - 1e-6) == ["a"]
    assert pacer.held(1.0 * SPREAD / 2) == []


def test_durations_are_a_running_mean_and_replicas_are_paced_apart() -> None:
    pacer = Pacer()
    pacer.finished("a", 1.0)
    pacer.finished("a", 2.0)  # the mean moves a fifth of the way: 1.2
    pacer.dispatched("a", 1, 1, now=0.0)
    pacer.dispatched("b", 1, 1, now=0.0)  # nothing known of b
    assert pacer.held(1.2 * SPREAD - 1e-6) == ["a"]
    assert pacer.held(1.2 * SPREAD) == []


def test_a_replica_that_goes_starts_again_unpaced() -> None:
    group = EndpointGroup(10, 125)
    group.update([Endpoint("a", "127.0.0.1:1"), Endpoint("b", "127.0.0.1:2")])
    group.pacer.finished("a", 5.0)
    group.pacer.dispatched("a", 1, 1, now=0.0)
    group.pacer.finished("b", 5.0)
    group.pacer.dispatched("b", 1, 1, now=0.0)
    group.update([Endpoint("a", "127.0.0.1:9"), Endpoint("b", "127.0.0.1:2")])  # a moved
    assert group.pacer.held(1.0) == ["b"]
    group.pacer.dispatched("a", 1, 1, now=1.0)
    assert group.pacer.held(1.0) == ["b"]  # its new self has no duration yet


@pytest.mark.parametrize("weight, capacity", [(1, 1), (1, 16), (300, 4096)])
def test_the_gap_is_linear_in_the_requests_share(weight: int, capacity: int) -> None:
    pacer = Pacer()
    pacer.finished("a", 2.0)
    pacer.dispatched("a", weight, capacity, now=0.0)
    gap = 2.0 * SPREAD * weight / capacity
    assert pacer.held(gap * 0.999) == ["a"] and pacer.held(gap * 1.001) == []
