"""Leader election with the production defaults (lease 15 s, renew deadline 10 s, retry 2 s)
under CPU starvation, against the fake API server over HTTP.

Starvation is staged, not hoped for: ``StagedClock.stall(s)`` really blocks the event loop (so
timers and I/O pile up as on a starved replica) and moves the electors' clock on by ``s`` seconds
(the time the loop was gone). A stall is placed right after a chosen renewal, so what each elector
sees when it wakes up is known, and a monitor checks the safety property on every loop turn: while
an elector says ``is_leader``, no follower that saw its last record may take the Lease over yet.

The follower polls faster than the leader (retry 0.5 s): after a stall it always looks at the
Lease before the leader's next renewal, the order that would expose a leader still acting on an
expired term.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import pytest

from lb_operator.kube.client import KubeApi
from lb_operator.kube.leader import LeaderElector
from tests.cluster_harness import NS, eventually
from tests.kube_fake import FakeKube

LEASE, RENEW, RETRY = 15.0, 10.0, 2.0  # the production defaults (ClusterOptions, LeaderElector)


class StagedClock:
    """Monotonic time plus the stalls staged by the test."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def stall(self, seconds: float) -> None:
        """Block the event loop (a CPU-bound callback) for `seconds` of the electors' time."""
        time.sleep(0.05)
        self.offset += seconds


class SlowAnswers(KubeApi):
    """The leader's API client whose next Lease write is answered late: the write is committed
    at once (the follower can read it) but the answer reaches the leader ``delay`` seconds later."""

    def __init__(self, client: Any, clock: StagedClock) -> None:
        super().__init__(client)
        self.clock = clock
        self.delay = 0.0
        self.follower: LeaderElector | None = None

    async def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        written = await super().replace_lease(namespace, name, body)
        if self.delay and self.follower is not None:
            follower, renew_time = self.follower, written["spec"]["renewTime"]
            await eventually(lambda: (follower._observed or (None, None))[1] == renew_time,
                             what="the follower reading the committed write")
            self.clock.stall(self.delay)
            self.delay = 0.0
        return written


class Pair:
    """Leader `a` (retry 2 s) and follower `b` (retry 0.5 s), production lease and deadline."""

    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube
        self.clock = StagedClock()
        self.clients = [kube.api_client(), kube.api_client()]
        self.slow = SlowAnswers(self.clients[0], self.clock)
        self.starts = {"a": 0, "b": 0}
        self.a = self._elector(self.slow, "a", RETRY)
        self.b = self._elector(KubeApi(self.clients[1]), "b", 0.5)
        self.slow.follower = self.b
        self.violations: list[str] = []
        self.tasks: list[asyncio.Task[Any]] = []

    def _elector(self, api: KubeApi, name: str, retry: float) -> LeaderElector:
        async def task() -> None:
            self.starts[name] += 1
            await asyncio.Event().wait()
        return LeaderElector(api, NS, identity=name, lease_duration=LEASE, renew_deadline=RENEW,
                             retry_period=retry, leader_tasks=[task], clock=self.clock)

    async def start(self) -> None:
        self.tasks.append(asyncio.create_task(self.a.run()))
        await eventually(lambda: self.a.is_leader, what="a leading")
        self.tasks.append(asyncio.create_task(self.b.run()))
        self.tasks.append(asyncio.create_task(self._monitor()))
        await eventually(lambda: (self.b._observed or ("",))[0] == "a", what="b following")

    async def _monitor(self) -> None:
        """On every loop turn: a leader's term must end before a follower may take over."""
        while True:
            for leader, follower in ((self.a, self.b), (self.b, self.a)):
                seen = follower._observed or ("",)
                if (leader.is_leader and seen[0] == leader.identity
                        and self.clock() >= follower._observed_at + LEASE):
                    self.violations.append(f"{leader.identity} leads past {follower.identity}'s expiry")
            if self.a.is_leader and self.b.is_leader:
                self.violations.append("two leaders")
            await asyncio.sleep(0)

    async def just_renewed(self, elector: LeaderElector) -> None:
        """Until `elector` completes its next renewal (a stall placed now lands right after it)."""
        before = elector._valid_until
        await eventually(lambda: elector._valid_until != before, timeout=10, interval=0.001,
                         what="a renewal")

    async def follower_read(self) -> None:
        """Until the follower has read the leader's latest record."""
        current = self.kube.get("leases", "kvgate-leader")["spec"]["renewTime"]
        await eventually(lambda: (self.b._observed or (None, None))[1] == current, interval=0.001,
                         what="the follower reading the lease")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in self.clients:
            await client.close()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    async with FakeKube() as kube:
        both = Pair(kube)
        try:
            await both.start()
            yield both
        finally:
            await both.close()


def lease(pair: Pair) -> dict[str, Any]:
    return pair.kube.get("leases", "kvgate-leader")["spec"]


async def test_stalls_shorter_than_deadline_minus_retry_keep_the_term(pair: Pair) -> None:
    """A 6 s stall right after a renewal: the next renewal comes 8 s after the last, inside the
    10 s deadline. The leader never doubts, the follower never moves."""
    dips: list[float] = []

    async def watch_a() -> None:
        while True:
            if not pair.a.is_leader:
                dips.append(pair.clock())
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch_a())
    try:
        for _ in range(2):
            await pair.just_renewed(pair.a)
            pair.clock.stall(6.0)
            await pair.just_renewed(pair.a)
    finally:
        watcher.cancel()
    assert dips == [] and pair.violations == []
    assert (pair.a.terms, pair.b.terms, pair.starts) == (1, 0, {"a": 1, "b": 0})
    assert lease(pair)["holderIdentity"] == "a" and lease(pair)["leaseTransitions"] == 0


async def test_a_late_renewal_is_still_tried_and_keeps_the_term(pair: Pair) -> None:
    """An 11 s stall: the leader wakes 13 s after its last renewal, past its deadline but before
    the Lease expires. Nobody took the Lease (the resourceVersion proves it), so the renewal
    succeeds and the term goes on: no step-down, no restart of the leader's tasks. Meanwhile
    `is_leader` said False, and the follower never led. The API answers in 50 ms, as a real one
    may: the late renewal needs real time to go through, not a token attempt."""
    pair.kube.latency = 0.05
    await pair.just_renewed(pair.a)
    pair.clock.stall(11.0)
    assert not pair.a.is_leader  # past the deadline: not leading until renewed
    await pair.just_renewed(pair.a)
    assert pair.a.is_leader and pair.violations == []
    assert (pair.a.terms, pair.b.terms, pair.starts) == (1, 0, {"a": 1, "b": 0})
    assert lease(pair)["holderIdentity"] == "a" and lease(pair)["leaseTransitions"] == 0


async def test_a_stall_past_the_lease_hands_over_without_two_leaders(pair: Pair) -> None:
    """A 20 s stall: the follower looks first, finds the record unchanged for longer than the
    lease and takes over. The stalled leader is not leading from its deadline on, and steps
    down as soon as it sees the new holder."""
    await pair.just_renewed(pair.a)
    await pair.follower_read()
    pair.clock.stall(20.0)
    await eventually(lambda: pair.b.is_leader, timeout=10, what="the takeover")
    await eventually(lambda: not pair.a.leading.is_set(), timeout=10, what="a stepping down")
    assert pair.violations == []
    assert lease(pair)["holderIdentity"] == "b" and lease(pair)["leaseTransitions"] == 1


async def test_the_deadline_counts_from_sending_the_renewal(pair: Pair) -> None:
    """A renewal whose answer arrives 8 s after the write was committed (and read by the
    follower), then a stall. The follower's 15 s count started at the commit; a leader that
    counted its 10 s from the answer would still lead after the follower took over."""
    await pair.just_renewed(pair.a)
    pair.slow.delay = 8.0
    await pair.just_renewed(pair.a)  # the slow one
    pair.clock.stall(8.5)
    await eventually(lambda: pair.b.is_leader, timeout=10, what="the takeover")
    await eventually(lambda: not pair.a.leading.is_set(), timeout=10, what="a stepping down")
    assert pair.violations == []
    assert lease(pair)["holderIdentity"] == "b"
