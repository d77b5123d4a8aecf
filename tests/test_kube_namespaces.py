"""Several managed namespaces (``--namespace team-a --namespace team-b``) holding Models of the
same name: the oldest owns the name (lb_operator.kube.names). Cluster mode for real over HTTP:
the fake API server, a gateway replica with its operator, a kubelet per namespace running
simulated vLLM replicas, the openai SDK as the client."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, AsyncIterator

import pytest

from lb.model import GROUP, PLURAL, VERSION
from lb_operator.kube.autoscaling import watched_models
from lb_operator.kube.client import KubeApi
from lb_operator.kube.names import CONFLICT_REASON, owner_of
from tests.cluster_harness import FAST, GatewayReplica, Kubelet, chat, eventually, model_body
from tests.cluster_harness import sdk as client
from tests.kube_fake import FakeKube

A, B = "team-a", "team-b"  # flag order: team-a first
OPTIONS = dataclasses.replace(FAST, namespaces=(A, B), lease_duration=30.0, renew_deadline=20.0,
                              retry_period=0.1)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5, pod_termination_delay=0.3) as server:
        yield server


@pytest.fixture
async def api(kube: FakeKube) -> AsyncIterator[KubeApi]:
    async with kube.api_client() as api_client:
        yield KubeApi(api_client)


@pytest.fixture
async def kubelets(kube: FakeKube) -> AsyncIterator[dict[str, Kubelet]]:
    async with Kubelet(kube, namespace=A) as node_a, Kubelet(kube, namespace=B) as node_b:
        yield {A: node_a, B: node_b}


async def create_in(api: KubeApi, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    return await api.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


async def next_second() -> None:
    """Until the wall clock enters a new second: creationTimestamp has one-second resolution,
    and a Model created after this is strictly younger than one created before."""
    start = int(time.time())
    while int(time.time()) == start:
        await asyncio.sleep(0.05)


def pods_created_in(kube: FakeKube, namespace: str) -> int:
    return sum(1 for c in kube.calls if c[:3] == ("create", "", "pods") and c[3] == namespace)


def scale_writes_in(kube: FakeKube, namespace: str) -> int:
    return sum(1 for c in kube.calls if c[2] == "models/scale" and c[0] in ("update", "patch")
               and c[3] == namespace)


def valid_condition(kube: FakeKube, namespace: str) -> dict[str, Any]:
    conditions = ((kube.get("models", "m", namespace) or {}).get("status") or {}).get("conditions")
    return next((c for c in conditions or () if c.get("type") == "Valid"), {})


def conflict_events(kube: FakeKube, namespace: str) -> list[dict[str, Any]]:
    return [e for e in kube.objects("events", namespace) if e.get("reason") == CONFLICT_REASON]


def served_from(node: GatewayReplica) -> set[str]:
    """The namespaces of the endpoints the gateway routes ``m`` to (keys are namespace/pod)."""
    return {key.split("/")[0] for key in node.endpoints("m")}


async def assert_loser(kube: FakeKube, node: GatewayReplica, loser: str, owner: str) -> None:
    """The loser has the NameConflict condition and one Warning Event, both naming the owner's
    namespace; the gateway and the autoscaler know only the owner."""
    await eventually(lambda: valid_condition(kube, loser).get("reason") == CONFLICT_REASON,
                     what="the loser's NameConflict condition")
    cond = valid_condition(kube, loser)
    assert cond["status"] == "False" and repr(owner) in cond["message"]
    events = await eventually(lambda: conflict_events(kube, loser), what="a NameConflict Event")
    assert len(events) == 1
    event = events[0]
    assert event["type"] == "Warning" and repr(owner) in event["message"]
    assert (event["involvedObject"]["namespace"], event["involvedObject"]["name"]) == (loser, "m")
    assert node.registry.get_model("m").namespace == owner
    assert autoscaled(node) == [(owner, "m")]


def autoscaled(node: GatewayReplica) -> list[tuple[str, str]]:
    """The Models the leader's autoscaler considers (its `models` source)."""
    return [(m.namespace, m.name) for m in watched_models(node.operator.owners)()]


async def test_conflict_at_start_the_older_model_owns_the_name(
        kube: FakeKube, api: KubeApi, kubelets: dict[str, Kubelet]) -> None:
    # team-b's Model is older, so it wins though team-a comes first on the command line.
    await create_in(api, B, model_body("m", replicas=0))
    await next_second()
    await create_in(api, A, model_body("m", replicas=2))  # wants replicas: it must never get any
    node = await GatewayReplica(kube, options=OPTIONS).start()
    try:
        await eventually(lambda: node.leading, what="a leader")
        await assert_loser(kube, node, A, B)
        async with client(node) as sdk:  # scale from zero: the owner's replica, not the loser's
            assert await chat(sdk, "m")
        assert kube.get("models", "m", B)["spec"]["replicas"] == 1
        assert served_from(node) == {B}
        await asyncio.sleep(0.5)  # a few more reconciles and autoscaler ticks
        assert pods_created_in(kube, A) == 0 and kubelets[A].pods() == []
        assert scale_writes_in(kube, A) == 0
        assert kube.get("models", "m", A)["spec"]["replicas"] == 2
        assert len(conflict_events(kube, A)) == 1 and conflict_events(kube, A)[0]["count"] == 1
    finally:
        await node.stop()


async def test_younger_model_created_later_loses_then_takes_over_when_the_owner_goes(
        kube: FakeKube, api: KubeApi, kubelets: dict[str, Kubelet]) -> None:
    node = await GatewayReplica(kube, options=OPTIONS).start()
    try:
        await eventually(lambda: node.leading, what="a leader")
        await create_in(api, B, model_body("m", replicas=1))
        await eventually(lambda: served_from(node) == {B}, what="the owner's endpoint")
        await next_second()
        await create_in(api, A, model_body("m", replicas=1))
        await assert_loser(kube, node, A, B)
        assert valid_condition(kube, B)["status"] == "True"
        async with client(node) as sdk:
            assert await chat(sdk, "m")
        assert served_from(node) == {B}
        assert pods_created_in(kube, A) == 0 and kubelets[A].pods() == []

        # The owner is deleted: the loser takes the name over, without a restart.
        kube.delete("models", "m", B)
        await eventually(lambda: served_from(node) == {A}, what="the takeover's endpoint")
        await eventually(lambda: valid_condition(kube, A).get("status") == "True",
                         what="the new owner valid")
        assert node.registry.get_model("m").namespace == A
        assert autoscaled(node) == [(A, "m")]
        async with client(node) as sdk:
            assert await chat(sdk, "m")
        assert pods_created_in(kube, A) == 1
        assert served_from(node) == {A}
    finally:
        await node.stop()


async def test_watching_a_namespace_with_an_older_model_hands_the_name_over(
        kube: FakeKube, api: KubeApi, kubelets: dict[str, Kubelet]) -> None:
    """An operator that managed team-a alone is reconfigured to manage team-b too, where an older
    Model of the same name lives: the team-a Model's running Pod is stopped and team-b serves."""
    await create_in(api, B, model_body("m", replicas=1))
    await next_second()
    await create_in(api, A, model_body("m", replicas=1))
    alone = await GatewayReplica(kube, options=dataclasses.replace(OPTIONS, namespaces=(A,))).start()
    try:
        await eventually(lambda: served_from(alone) == {A}, what="team-a served alone")
        assert kubelets[B].pods() == []
    finally:
        await alone.stop()
    node = await GatewayReplica(kube, options=OPTIONS).start()
    try:
        await assert_loser(kube, node, A, B)
        await eventually(lambda: served_from(node) == {B}, what="team-b's endpoint")
        await eventually(lambda: kubelets[A].pods() == [], what="team-a's Pod stopped")
        status = kube.get("models", "m", A)["status"]["replicas"]
        assert status == {"all": 0, "ready": 0}
        async with client(node) as sdk:
            assert await chat(sdk, "m")
    finally:
        await node.stop()


def _model(namespace: str, created: str | None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "m", "namespace": namespace}
    if created:
        meta["creationTimestamp"] = created
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:09Z"
    return {"metadata": meta}


def test_owner_rule_orders_by_age_then_flag_order_then_namespace() -> None:
    earlier, later = "2026-01-01T00:00:01Z", "2026-01-01T00:00:02Z"
    flags = ("x", "y")

    def owner(*claimants: dict[str, Any]) -> str | None:
        found = owner_of(claimants, flags)
        return None if found is None else found["metadata"]["namespace"]

    assert owner(_model("x", later), _model("y", earlier)) == "y"  # age beats flag order
    assert owner(_model("y", earlier), _model("x", earlier)) == "x"  # a tie: flag order
    assert owner(_model("q", earlier), _model("p", earlier)) == "p"  # unlisted: namespace name
    assert owner(_model("z", earlier), _model("y", earlier)) == "y"  # listed before unlisted
    assert owner(_model("x", None), _model("y", later)) == "y"  # no timestamp yet: youngest
    assert owner(_model("y", earlier, deleting=True), _model("x", later)) == "x"
    assert owner(_model("x", earlier, deleting=True)) is None
    assert owner() is None
