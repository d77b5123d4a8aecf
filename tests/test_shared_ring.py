"""The ring's shared load table: several processes (the gateway's workers) count in-flight
requests in one ``LoadTable`` and bound loads as one ring.

Both twins are tested the same way: the pure ring updates the table under its lock, the
Cython ring with atomic adds. Processes are forked, as the gateway forks its workers.
"""

from __future__ import annotations

import math
import multiprocessing
import random
from fractions import Fraction
from typing import Any

import pytest

from lb import chwbl
from lb.loads import LoadTable

try:
    from lb import _chwbl as native
except ImportError:  # pragma: no cover - the extension is normally built
    native = None

needs_native = pytest.mark.skipif(native is None, reason="the Cython ring is not built")
IMPLS = [pytest.param(chwbl, id="python"), pytest.param(native, id="cython", marks=needs_native)]
KEYS = [f"ns/replica-{i}" for i in range(4)]
FORK = multiprocessing.get_context("fork")


def shared_ring(impl: Any, table: LoadTable, **kwargs: Any) -> Any:
    ring = impl.Ring(kwargs.pop("replication", 32), loads=table, namespace="m", **kwargs)
    for key in KEYS:
        ring.add(key)
    return ring


# -- the table ------------------------------------------------------------------------------------


def test_entries_are_stable_and_namespaced() -> None:
    table = LoadTable(64)
    a, b = table.entry("m", "x"), table.entry("m", "y")
    assert a != b
    assert table.entry("m", "x") == a
    assert table.entry("other", "x") not in (a, b)
    assert table.add(a, 3) == 3 and table.value(a) == 3 and table.value(b) == 0


def test_a_full_table_says_so() -> None:
    table = LoadTable(4)
    for i in range(4):
        table.entry("m", f"k{i}")
    with pytest.raises(RuntimeError, match="full"):
        table.entry("m", "one-too-many")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_ring_refuses_what_is_not_a_table(impl: Any) -> None:
    with pytest.raises(TypeError):
        impl.Ring(8, loads=object())
    with pytest.raises(TypeError):
        impl.Ring(8, loads=LoadTable(8), namespace=3)


# -- two rings, one table (one process) -------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_loads_are_seen_by_every_ring_and_removal_keeps_the_others_share(impl: Any) -> None:
    table = LoadTable(64)
    a, b = shared_ring(impl, table), shared_ring(impl, table)
    mine = [a.acquire(KEYS[0]) for _ in range(3)]
    theirs = [b.acquire(KEYS[0]) for _ in range(2)]
    assert (a.load(KEYS[0]), b.load(KEYS[0]), a.total, b.total) == (5, 5, 5, 5)
    a.remove(KEYS[0])  # only this worker's 3 leave the shared counts
    assert (b.load(KEYS[0]), b.total, a.total) == (2, 2, 2)
    assert [a.release(t) for t in mine] == [False] * 3  # stale: already taken out at removal
    assert [b.release(t) for t in theirs] == [True] * 2
    assert (b.load(KEYS[0]), b.total, a.total) == (0, 0, 0)
    a.add(KEYS[0])  # back again: its entry is found, with nothing in flight
    assert a.load(KEYS[0]) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_a_second_ring_honours_the_first_rings_loads(impl: Any) -> None:
    """Worker B's pick for a key sees worker A's in-flight requests on the key's home replica
    and moves on exactly as one ring holding all of them would."""
    table = LoadTable(64)
    a, b = shared_ring(impl, table), shared_ring(impl, table)
    alone = impl.Ring(32)
    for key in KEYS:
        alone.add(key)
    for ring in (a, alone):
        for _ in range(6):
            ring.acquire(ring.pick("hot prefix"))
    picks_b = []
    for _ in range(6):
        picks_b.append(b.pick("hot prefix"))
        b.acquire(picks_b[-1])
    picks_alone = []
    for _ in range(6):
        picks_alone.append(alone.pick("hot prefix"))
        alone.acquire(picks_alone[-1])
    assert picks_b == picks_alone
    assert len(set(picks_b)) > 1  # the bound pushed traffic off the home replica
    assert [b.load(k) for k in KEYS] == [alone.load(k) for k in KEYS]


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_counter_for_active_requests(impl: Any) -> None:
    table = LoadTable(16)
    one, two = impl.SharedCount(table, "\x00active", "m"), impl.SharedCount(table, "\x00active", "m")
    one.inc(), two.inc(), two.inc()
    assert one.value == two.value == 3
    one.dec(), one.dec(), one.dec()
    assert two.value == 0


@needs_native
def test_twins_agree_on_shared_tables() -> None:
    """The same random history (two rings on one table per twin) gives the same picks and
    loads in both implementations."""
    rng = random.Random(7)
    tables = [LoadTable(256), LoadTable(256)]
    rings = [[shared_ring(impl, table, replication=16) for _ in range(2)]
             for impl, table in zip((chwbl, native), tables)]
    held: list[list[list[int]]] = [[[], []], [[], []]]
    for step in range(3000):
        worker = rng.randrange(2)
        prefix = f"prefix-{rng.randrange(12)}"
        tickets = held[0][worker]
        index = rng.randrange(len(tickets)) if tickets and rng.random() < 0.4 else None
        for twin in (0, 1):
            ring = rings[twin][worker]
            if index is None:
                held[twin][worker].append(ring.acquire(ring.pick(prefix)))
            else:
                assert ring.release(held[twin][worker].pop(index))
        py_ring, cy_ring = rings[0][worker], rings[1][worker]
        assert py_ring.total == cy_ring.total, step
        assert [py_ring.load(k) for k in KEYS] == [cy_ring.load(k) for k in KEYS], step
        assert py_ring.pick(prefix) == cy_ring.pick(prefix), step


# -- two processes ----------------------------------------------------------------------------------


def _hammer(impl_name: str, table: LoadTable, rounds: int, hold: int,
            ready: Any, go: Any, counted: Any, finish: Any) -> None:
    """In a forked child: acquire/release ``rounds`` times as fast as possible, alongside the
    other process, then hold ``hold`` leases until told to let go."""
    impl = native if impl_name == "cython" else chwbl
    ring = shared_ring(impl, table)
    rng = random.Random(impl_name)
    ready.set()
    go.wait()
    for _ in range(rounds):
        key = KEYS[rng.randrange(len(KEYS))]
        ring.release(ring.acquire(key))
    tickets = [ring.acquire(KEYS[i % len(KEYS)]) for i in range(hold)]
    counted.set()
    finish.wait()
    for ticket in tickets:
        ring.release(ticket)


@pytest.mark.parametrize("impl", IMPLS)
def test_two_processes_lose_no_update(impl: Any) -> None:
    name = "cython" if impl is native else "python"
    rounds = 200_000 if impl is native else 20_000
    table = LoadTable(64)
    go, finish = FORK.Event(), FORK.Event()
    children = []
    for hold in (7, 11):
        ready, counted = FORK.Event(), FORK.Event()
        proc = FORK.Process(target=_hammer,
                            args=(name, table, rounds, hold, ready, go, counted, finish))
        proc.start()
        children.append((proc, ready, counted))
    observer = shared_ring(impl, table)
    try:
        for _, ready, _ in children:
            assert ready.wait(30)
        go.set()
        for _, _, counted in children:
            assert counted.wait(120)
        # Both hammered the same counters at once; every increment and decrement landed.
        assert observer.total == 18
        assert [observer.load(k) for k in KEYS] == [5, 5, 5, 3]  # 7 + 11 spread over 4 keys
        finish.set()
        for proc, _, _ in children:
            proc.join(30)
            assert proc.exitcode == 0
        assert observer.total == 0
        assert [observer.load(k) for k in KEYS] == [0, 0, 0, 0]
    finally:
        finish.set()
        for proc, _, _ in children:
            if proc.is_alive():
                proc.kill()


def _pick_and_hold(impl_name: str, table: LoadTable, count: int, done: Any,
                   picks: Any, finish: Any) -> None:
    impl = native if impl_name == "cython" else chwbl
    ring = shared_ring(impl, table)
    tickets = []
    for _ in range(count):
        key = ring.pick("the same system prompt")
        picks.put(key)
        tickets.append(ring.acquire(key))
    done.set()
    finish.wait()
    for ticket in tickets:
        ring.release(ticket)


@pytest.mark.parametrize("impl", IMPLS)
def test_the_bound_holds_across_processes(impl: Any) -> None:
    """A worker process takes 12 requests for one prefix; then this process takes 12 more for
    the same prefix. Together they land exactly where one ring taking all 24 would put them,
    and no replica was at the paper's capacity, ceil(f * (total + 1) / n), when it was picked."""
    name = "cython" if impl is native else "python"
    table = LoadTable(64)
    done, finish, picks = FORK.Event(), FORK.Event(), FORK.Queue()
    child = FORK.Process(target=_pick_and_hold, args=(name, table, 12, done, picks, finish))
    child.start()
    try:
        assert done.wait(30)
        theirs = [picks.get(timeout=10) for _ in range(12)]
        here = shared_ring(impl, table)
        mine = []
        for _ in range(12):
            key = here.pick("the same system prompt")
            total, load = here.total, here.load(key)
            assert load < math.ceil(Fraction(here.mean_load_factor, 100) * (total + 1) / len(KEYS))
            here.acquire(key)
            mine.append(key)
        alone = impl.Ring(32)
        for key in KEYS:
            alone.add(key)
        expected = []
        for _ in range(24):
            expected.append(alone.pick("the same system prompt"))
            alone.acquire(expected[-1])
        assert theirs + mine == expected
        assert [here.load(k) for k in KEYS] == [alone.load(k) for k in KEYS]
        finish.set()
        child.join(30)
        assert child.exitcode == 0
        assert here.total == 12
    finally:
        finish.set()
        if child.is_alive():
            child.kill()
