"""Fairness of the queue across gateway workers, on the queue itself.

Two ``ModelQueue``s on one ``LoadTable`` are two worker processes' queues of one model (the
table is what the workers share). Replicas are a pool of slots both queues acquire from; a
finished request frees its slot and pumps the queue of the worker that held it (as a lease's
release does), then both queues pump (the tick). What is under test is which waiter each freed
slot goes to: a tenant whose requests all landed on one worker must still get its fair share of
the slots the other worker frees.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from typing import Any

import pytest

from lb.flow_queue import DEFER_SECONDS, ModelQueue, QueueConfig, Waiter
from lb.ring import LoadTable


class Slot:
    """A replica slot held by one served waiter; ``release`` frees it as a lease does."""

    def __init__(self, pool: "Pool", waiter: Waiter) -> None:
        self.pool, self.waiter = pool, waiter
        self.flow: Any = None  # set by the queue that served it
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.pool.free += 1
        if self.flow is not None:
            self.flow.dec()


class Pool:
    """``free`` slots shared by both workers; a waiter asking for adapter "x" gets none."""

    def __init__(self, free: int) -> None:
        self.free = free

    def acquire(self, waiter: Waiter) -> Slot | None:
        if not self.free or waiter.adapter == "x":
            return None
        self.free -= 1
        return Slot(self, waiter)


class Worker:
    def __init__(self, table: LoadTable, pool: Pool) -> None:
        self.queue = ModelQueue("m", QueueConfig(), table, pool.acquire)
        self.waiters: list[Waiter] = []

    def enqueue(self, flow: str, count: int, adapter: str = "") -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            waiter = Waiter(loop.create_future(), flow, adapter, "k", [], 1, None)
            self.queue.enter(waiter, "default")
            self.waiters.append(waiter)

    def served(self) -> list[Slot]:
        return [w.future.result() for w in self.waiters if w.future.done()]


@pytest.fixture
def table() -> LoadTable:
    return LoadTable(1024)  # unmapped when collected (the queues' counters hold views of it)


def run(workers: list[Worker], slots: int, finishes: int) -> Tally[str]:
    """Fill the slots, then finish the oldest request ``finishes`` times; the flows served after
    the first fill."""
    for w in workers:
        w.queue.pump()
    in_flight = [s for w in workers for s in w.served()]
    assert len(in_flight) == slots
    seen = {id(s) for s in in_flight}
    tally: Tally[str] = Tally()
    for _ in range(finishes):
        done = in_flight.pop(0)
        done.release()
        owner = next(w for w in workers if done.waiter in w.waiters)
        owner.queue.pump(freed=True)  # the release's own pump
        for w in workers:
            w.queue.pump()  # the tick
        for w in workers:
            for slot in w.served():
                if id(slot) not in seen:
                    seen.add(id(slot))
                    in_flight.append(slot)
                    tally[slot.waiter.flow] += 1
    return tally


async def test_a_tenant_on_one_worker_gets_its_share_of_both_workers_slots(table) -> None:
    pool = Pool(8)
    a, b = Worker(table, pool), Worker(table, pool)
    a.enqueue("heavy", 40)  # every request of this worker is the heavy tenant's
    b.enqueue("heavy", 20)
    b.enqueue("light", 20)  # the light tenant's all landed on the other worker
    tally = run([a, b], slots=8, finishes=24)
    assert sum(tally.values()) == 24
    # Round-robin per worker alone would give light a quarter (half of b's half); fair
    # queuing across workers gives it half.
    assert tally["light"] >= 11, tally


async def test_with_one_tenant_per_worker_each_keeps_half(table) -> None:
    pool = Pool(6)
    a, b = Worker(table, pool), Worker(table, pool)
    a.enqueue("t1", 30)
    b.enqueue("t2", 30)
    tally = run([a, b], slots=6, finishes=30)
    assert abs(tally["t1"] - tally["t2"]) <= 2, tally


async def test_a_worker_defers_only_for_a_while_to_a_flow_that_cannot_be_served(table) -> None:
    pool = Pool(2)
    a, b = Worker(table, pool), Worker(table, pool)
    a.enqueue("heavy", 4)
    a.queue.pump()
    first, _ = a.served()
    b.enqueue("light", 1, adapter="x")  # no replica has its adapter
    first.release()
    a.queue.pump(freed=True)
    b.queue.pump()
    assert len(a.served()) == 2 and pool.free == 1  # the slot is left to light, for now
    a.queue.pump()
    assert len(a.served()) == 2 and pool.free == 1  # the tick keeps to it
    time.sleep(DEFER_SECONDS * 2)
    a.queue.pump()
    assert len(a.served()) == 3 and pool.free == 0  # light could not take it: heavy does


async def test_in_flight_counts_return_to_zero(table) -> None:
    pool = Pool(3)
    a, b = Worker(table, pool), Worker(table, pool)
    a.enqueue("t1", 5)
    b.enqueue("t2", 5)
    run([a, b], slots=3, finishes=7)
    for w in (a, b):
        for slot in w.served():
            slot.release()
    for w in (a, b):
        for band in w.queue._bands:
            assert all(c.value == 0 for c in band._serving)
            assert all(c.value == 0 for c in band._waiting)
