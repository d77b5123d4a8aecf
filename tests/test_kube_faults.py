"""Cluster mode under API faults: dropped watches, 410 on resume, 500s for a while, conflicting
writes. The operator must converge without losing or duplicating Pods."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import pytest

from lb_operator.kube.client import KubeApi
from lb_operator.kube.leader import LeaderElector
from tests.cluster_harness import (NS, GatewayReplica, Kubelet, create_model, eventually,
                                   model_body, ready_pods)
from tests.kube_fake import FakeKube


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5) as server:
        yield server


def pods_created(kube: FakeKube) -> int:
    return sum(1 for call in kube.calls if call[:3] == ("create", "", "pods"))


def live(kubelet: Kubelet, model: str) -> list[dict[str, Any]]:
    return [p for p in kubelet.pods(model) if not p["metadata"].get("deletionTimestamp")]


async def converged(kube: FakeKube, kubelet: Kubelet, node: GatewayReplica, model: str,
                    n: int) -> None:
    """n Ready Pods, n endpoints, status all=ready=n, and it stays that way."""
    def check() -> bool:
        status = ((kube.get("models", model) or {}).get("status") or {}).get("replicas")
        return (len(live(kubelet, model)) == n and len(ready_pods(live(kubelet, model))) == n
                and len(node.endpoints(model)) == n and status == {"all": n, "ready": n})

    await eventually(check, timeout=10, what=f"{n} replicas of {model}")
    await asyncio.sleep(0.4)
    assert check(), "did not stay converged"


def pod_informer(node: GatewayReplica) -> Any:
    return node.operator.pod_informers[0]


async def test_watch_dropped_mid_event_resumes_from_last_version(
        kube: FakeKube, api: KubeApi, kubelet: Kubelet, replica: GatewayReplica) -> None:
    await create_model(api, model_body("m", replicas=1))
    await converged(kube, kubelet, replica, "m", 1)
    informer = pod_informer(replica)
    relists, resumes = informer.relists, informer.resumes
    assert kube.drop_watches(mid_event=True) >= 2  # models and pods
    kube.patch("models", "m", {"spec": {"replicas": 2}})  # happens while nobody watches
    await converged(kube, kubelet, replica, "m", 2)
    assert informer.relists == relists and informer.resumes > resumes  # resumed, no relist
    assert pods_created(kube) == 2


async def test_410_on_resume_relists_and_sees_deletions(
        kube: FakeKube, api: KubeApi, kubelet: Kubelet, replica: GatewayReplica) -> None:
    await create_model(api, model_body("m", replicas=2))
    await converged(kube, kubelet, replica, "m", 2)
    informer = pod_informer(replica)
    relists = informer.relists
    kubelet.paused = True  # hold the replacement Pod back while the watch is down
    kube.fail_for(0.4, 500, watch=True)
    kube.drop_watches(mid_event=False)
    victim = live(kubelet, "m")[0]["metadata"]["name"]
    kube.delete("pods", victim)
    kube.compact()  # the resume point is gone: the next watch gets 410 Gone
    await eventually(lambda: informer.relists > relists, what="a relist after 410")
    assert f"{NS}/{victim}" not in replica.endpoints("m")  # the relist reported the deletion
    kubelet.paused = False
    await converged(kube, kubelet, replica, "m", 2)
    assert pods_created(kube) == 3


async def test_api_500s_for_a_while(kube: FakeKube, api: KubeApi, kubelet: Kubelet,
                                    replica: GatewayReplica) -> None:
    await create_model(api, model_body("m", replicas=1))
    await converged(kube, kubelet, replica, "m", 1)
    fault = kube.fail_for(1.5, 500)
    kube.drop_watches(mid_event=True)
    kube.patch("models", "m", {"spec": {"replicas": 3}})
    await asyncio.sleep(0.5)
    assert len(live(kubelet, "m")) == 1  # nothing can be done while the API fails
    await converged(kube, kubelet, replica, "m", 3)
    assert fault.hits > 3
    assert pods_created(kube) == 3
    names = [p["metadata"]["name"] for p in kubelet.pods("m")]
    assert len(names) == len(set(names)) == 3


async def test_conflicting_writes_are_retried_with_a_fresh_read(
        kube: FakeKube, api: KubeApi, kubelet: Kubelet, replica: GatewayReplica) -> None:
    await create_model(api, model_body("m", replicas=1))
    await converged(kube, kubelet, replica, "m", 1)
    stop = asyncio.Event()

    async def meddle() -> None:  # another client keeps changing the Model's metadata
        i = 0
        while not stop.is_set():
            i += 1
            kube.patch("models", "m", {"metadata": {"labels": {"touched": str(i)}}})
            await asyncio.sleep(0.003)

    meddler = asyncio.create_task(meddle())
    conflicts = kube.fail_next(3, 409, method="PUT", path="/status")
    try:
        kube.patch("models", "m", {"spec": {"replicas": 3}})
        await eventually(lambda: len(ready_pods(live(kubelet, "m"))) == 3, what="three pods")
    finally:
        stop.set()
        await meddler
    await converged(kube, kubelet, replica, "m", 3)
    assert conflicts.hits == 3
    assert pods_created(kube) == 3


async def test_lease_contention_has_one_leader_at_a_time(kube: FakeKube) -> None:
    """Three electors, one Lease. Timings are several times what a loaded machine needs for a
    renewal, and the fault lasts until the step-down is seen: no deadline races the scheduler."""
    clients = [kube.api_client() for _ in range(3)]
    running: list[str] = []
    overlaps: list[list[str]] = []

    def task_for(name: str) -> Any:
        async def leader_task() -> None:
            running.append(name)
            if len(running) > 1:
                overlaps.append(list(running))
            try:
                await asyncio.Event().wait()
            finally:
                running.remove(name)
        return leader_task

    electors = [LeaderElector(KubeApi(c), NS, identity=f"e{i}", lease_duration=6.0,
                              renew_deadline=4.0, retry_period=0.1,
                              leader_tasks=[task_for(f"e{i}")]) for i, c in enumerate(clients)]
    tasks = [asyncio.create_task(e.run()) for e in electors]
    try:
        await eventually(lambda: sum(e.is_leader for e in electors) == 1, what="a leader")
        leader = next(e for e in electors if e.is_leader)
        await eventually(lambda: running == [leader.identity], what="the leader's task")
        await asyncio.sleep(0.5)
        assert running == [leader.identity] and leader.is_leader
        # The API fails for longer than the renew deadline: the leader steps down and stops its
        # tasks, and nobody leads while the Lease cannot be written.
        kube.fail_for(60, 500, path="/leases")
        await eventually(lambda: not running, timeout=15, what="the leader stepping down")
        assert not any(e.is_leader for e in electors)
        await asyncio.sleep(0.5)
        assert not running and not any(e.is_leader for e in electors)
        # After the fault someone (maybe the same one) leads again.
        kube.clear_faults()
        await eventually(lambda: sum(e.is_leader for e in electors) == 1, timeout=20,
                         what="a new term")
        assert sum(e.terms for e in electors) == 2
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
    assert overlaps == [] and running == []
    assert kube.get("leases", "kvgate-leader")["spec"]["holderIdentity"] == ""
