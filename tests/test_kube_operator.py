"""Cluster mode end to end (KubeAI's integration scenarios): the operator against the fake API
server over HTTP with kubernetes_asyncio, the gateway over real HTTP with the openai SDK, Pods
served by simulated vLLM replicas (tests/cluster_harness.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
from typing import Any, AsyncIterator

import openai
import pytest
import yaml

from kvgate_sim.cluster import Replica
from lb_operator.kube.engines import files_config_map_name
from lb_operator.kube.client import KubeApi
from lb_operator.kube.endpoints import POD_IP_ANNOTATION, POD_PORT_ANNOTATION
from lb_operator.kube.pods import MODEL_LABEL
from lb_operator.system_config import system_config_from_dict
from tests.cluster_harness import (FAST, NS, GatewayReplica, Kubelet, chat, create_model, eventually,
                                   model_body, patch_model, pod_hashes, ready_pods)
from tests.cluster_harness import sdk as client
from tests.kube_fake import FakeKube


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5, pod_termination_delay=0.3) as server:
        yield server


def status_of(kube: FakeKube, name: str) -> dict[str, Any]:
    return ((kube.get("models", name) or {}).get("status") or {}).get("replicas") or {}


async def test_request_scales_zero_to_one_and_is_served(kube: FakeKube, api: KubeApi,
                                                        kubelet: Kubelet,
                                                        replica: GatewayReplica) -> None:
    await create_model(api, model_body("m", replicas=0))
    await eventually(lambda: replica.registry.get_model("m"), what="the model in the registry")
    await asyncio.sleep(0.2)
    assert kubelet.pods("m") == []  # zero replicas wanted: nothing runs

    async with client(replica) as sdk:
        assert await chat(sdk, "m")  # waits in the waiting room while the Pod starts
    assert kube.get("models", "m")["spec"]["replicas"] == 1
    assert replica.operator.scaler.scale_ups == 1
    assert len(kubelet.pods("m")) == 1
    await eventually(lambda: status_of(kube, "m") == {"all": 1, "ready": 1}, what="status")
    assert ("kvgate.dev", "models/scale", "update") in kube.rbac_usage()


async def test_pod_recovery_after_deletion(kube: FakeKube, api: KubeApi, kubelet: Kubelet,
                                           replica: GatewayReplica) -> None:
    await create_model(api, model_body("m", replicas=2))
    await eventually(lambda: len(replica.endpoints("m")) == 2, what="two endpoints")
    victim = kubelet.pods("m")[0]["metadata"]["name"]
    kube.delete("pods", victim)
    await eventually(lambda: f"{NS}/{victim}" not in replica.endpoints("m"), what="victim gone")
    await eventually(lambda: len(replica.endpoints("m")) == 2, what="a replacement endpoint")
    await eventually(lambda: victim not in {p["metadata"]["name"] for p in kubelet.pods("m")},
                     what="the victim terminated")
    assert len(kubelet.pods("m")) == 2
    async with client(replica) as sdk:
        assert await chat(sdk, "m")
    await eventually(lambda: status_of(kube, "m") == {"all": 2, "ready": 2}, what="status")


async def test_rollout_on_spec_change_without_failed_requests(kube: FakeKube, api: KubeApi,
                                                              kubelet: Kubelet,
                                                              replica: GatewayReplica) -> None:
    kubelet.ready_delay = 0.3  # a new server takes a while to load
    await create_model(api, model_body("m", replicas=2))
    await eventually(lambda: len(replica.endpoints("m")) == 2, what="two endpoints")
    old_hashes = pod_hashes(kubelet.pods("m"))
    served, failures = 0, []
    stop = asyncio.Event()

    async def keep_sending(sdk: openai.AsyncOpenAI, i: int) -> None:
        nonlocal served
        while not stop.is_set():
            try:
                await chat(sdk, "m", f"client {i} request {served}")
                served += 1
            except openai.APIError as exc:  # any failure seen by a client fails the test
                failures.append(exc)

    async with client(replica) as sdk:
        senders = [asyncio.create_task(keep_sending(sdk, i)) for i in range(3)]
        await asyncio.sleep(0.2)
        before = served
        await patch_model(api, "m", {"spec": {"args": ["--max-model-len=2048"]}})

        def rolled_out() -> bool:
            pods = kubelet.pods("m")
            return (len(ready_pods(pods)) == 2 and len(pods) == 2
                    and not pod_hashes(pods) & old_hashes)

        await eventually(rolled_out, timeout=15, what="the rollout")
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*senders)
    assert failures == []
    assert served - before > 20
    assert len(replica.endpoints("m")) == 2
    # Surge 1: never more than desired + 1 Pods at once, and exactly 2 new ones were created.
    created = [c for c in kube.calls if c[:3] == ("create", "", "pods")]
    assert len(created) == 4


async def test_profiles_files_and_labels_applied(kube: FakeKube, api: KubeApi,
                                                 kubelet: Kubelet) -> None:
    system = system_config_from_dict({"resourceProfiles": {"gpu-x": {
        "requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": 1},
        "limits": {"nvidia.com/gpu": 1},
        "nodeSelector": {"pool": "gpu-x"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "runtimeClassName": "nvidia"}}})
    kube.create("priorityclasses", {"metadata": {"name": "high"}, "value": 1000}, namespace=None)
    node = await GatewayReplica(kube, system).start()
    try:
        files = [{"path": "/config/chat.jinja", "content": "{{ messages }}"}]
        await create_model(api, model_body("m", replicas=1, resourceProfile="gpu-x:2",
                                           files=files, priorityClassName="high"))
        pod = (await eventually(lambda: kubelet.pods("m"), what="a pod"))[0]
        spec = pod["spec"]
        server = spec["containers"][0]
        assert server["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"}
        assert server["resources"]["limits"] == {"nvidia.com/gpu": "2"}
        assert spec["nodeSelector"] == {"pool": "gpu-x"} and spec["runtimeClassName"] == "nvidia"
        assert spec["tolerations"][0]["key"] == "gpu" and spec["priorityClassName"] == "high"
        model_uid = kube.get("models", "m")["metadata"]["uid"]
        assert pod["metadata"]["ownerReferences"][0]["uid"] == model_uid
        cm = kube.get("configmaps", files_config_map_name_for("m"))
        assert cm is not None and list(cm["data"].values()) == ["{{ messages }}"]
        assert cm["metadata"]["ownerReferences"][0]["uid"] == model_uid
        # Removing the files removes the ConfigMap and rolls the Pod (its mounts changed).
        await patch_model(api, "m", {"spec": {"files": None}})
        await eventually(lambda: kube.get("configmaps", files_config_map_name_for("m")) is None,
                         what="the ConfigMap deleted")
        # Deleting the Model garbage-collects its Pods.
        await api.custom.delete_namespaced_custom_object("kvgate.dev", "v1", NS, "models", "m")
        await eventually(lambda: not [p for p in kubelet.pods("m")
                                      if not p["metadata"].get("deletionTimestamp")],
                         what="pods collected")
        await eventually(lambda: node.registry.get_model("m") is None, what="model unregistered")
    finally:
        await node.stop()


def files_config_map_name_for(name: str) -> str:
    from lb.model import Model

    return files_config_map_name(Model.from_dict(model_body(name)))


async def test_scaling_bounds(kube: FakeKube, api: KubeApi, kubelet: Kubelet,
                              replica: GatewayReplica) -> None:
    await create_model(api, model_body("m", replicas=5, min_replicas=1, max_replicas=3))
    await eventually(lambda: len(replica.endpoints("m")) == 3, what="three endpoints (max)")
    await asyncio.sleep(0.3)
    assert len(kubelet.pods("m")) == 3
    await patch_model(api, "m", {"spec": {"replicas": 0}})  # below minReplicas
    await eventually(lambda: len(replica.endpoints("m")) == 1, what="one endpoint (min)")
    await eventually(lambda: status_of(kube, "m") == {"all": 1, "ready": 1}, what="status")
    await asyncio.sleep(0.3)
    assert len([p for p in kubelet.pods("m") if not p["metadata"].get("deletionTimestamp")]) == 1


async def test_label_selectors(kube: FakeKube, api: KubeApi, kubelet: Kubelet,
                               replica: GatewayReplica) -> None:
    # A Pod that only looks like a model Pod (no engine label) is neither counted nor deleted.
    foreign = kube.create("pods", {"metadata": {"name": "foreign", "labels": {MODEL_LABEL: "m"}},
                                   "spec": {"containers": [{"name": "c", "image": "x"}]}})
    kube.set_pod_ready("foreign", ip="127.0.0.1")
    chat_model = model_body("m", replicas=1)
    chat_model["metadata"]["labels"] = {"tier": "gold"}
    await create_model(api, chat_model)
    await create_model(api, model_body("other", replicas=0))
    await eventually(lambda: len(replica.endpoints("m")) == 1, what="one endpoint")
    await asyncio.sleep(0.3)
    assert kube.get("pods", "foreign")["metadata"]["uid"] == foreign["metadata"]["uid"]
    assert f"{NS}/foreign" not in replica.endpoints("m")
    assert status_of(kube, "m") == {"all": 1, "ready": 1}
    async with client(replica) as sdk:
        everything = [m.id for m in (await sdk.models.list()).data]
        gold = [m.id for m in (await sdk.models.list(
            extra_headers={"X-Label-Selector": "tier=gold"})).data]
    assert everything == ["m", "other"] and gold == ["m"]


async def test_address_override_points_pods_at_a_replica(kube: FakeKube, api: KubeApi) -> None:
    """KubeAI's model-pod-ip test hook: with allowPodAddressOverride, a Model annotation
    redirects its traffic (here to a simulator no Pod knows of)."""
    sim = await Replica("fast", "m").start()
    node = await GatewayReplica(kube, system_config_from_dict({"allowPodAddressOverride": True})).start()
    try:
        body = model_body("m", replicas=1)
        body["metadata"]["annotations"] = {POD_IP_ANNOTATION: "127.0.0.1",
                                           POD_PORT_ANNOTATION: str(sim.port)}
        await create_model(node.api, body)
        pod = (await eventually(lambda: kube.objects("pods"), what="a pod"))[0]
        kube.set_pod_ready(pod["metadata"]["name"], ip="10.1.2.3")
        await eventually(lambda: node.endpoints("m"), what="an endpoint")
        assert list(node.endpoints("m").values()) == [f"127.0.0.1:{sim.port}"]
        async with client(node) as sdk:
            assert await chat(sdk, "m")
    finally:
        await node.stop()
        await sim.stop()


class ExpiryClock:
    """Monotonic time that the test can move on, to let a Lease expire on cue."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


# A lease no stall of a loaded machine outlives: leadership changes only when the test makes it
# (a release, or a crash followed by a staged expiry), never because the event loop was slow.
STEADY = dataclasses.replace(FAST, lease_duration=30.0, renew_deadline=20.0, retry_period=0.1)


async def test_two_replicas_share_endpoints_and_one_reconciles(kube: FakeKube, api: KubeApi,
                                                               kubelet: Kubelet) -> None:
    first = await GatewayReplica(kube, identity="first", options=STEADY).start()
    await eventually(lambda: first.leading, what="a leader")
    second = await GatewayReplica(kube, identity="second", options=STEADY).start()
    nodes = [first, second]
    try:
        await create_model(api, model_body("m", replicas=2))
        await eventually(lambda: len(first.endpoints("m")) == 2 and len(second.endpoints("m")) == 2,
                         what="endpoints on both")
        assert first.endpoints("m") == second.endpoints("m")
        assert first.leading and not second.leading
        assert first.operator.reconciler.reconciles > 0
        assert second.operator.reconciler.reconciles == 0
        # The follower serves too, and scales from zero through the API like the leader would.
        await create_model(api, model_body("cold", replicas=0))
        async with client(second) as sdk:
            assert await chat(sdk, "m") and await chat(sdk, "cold")
        assert second.operator.scaler.scale_ups == 1
        assert second.operator.reconciler.reconciles == 0
        assert first.operator.elector.terms == 1 and second.operator.elector.terms == 0

        # Clean shutdown of the leader releases the Lease: the other takes over long before the
        # 30 s lease could have expired.
        await first.stop()
        await eventually(lambda: second.leading, timeout=10.0, what="the takeover")
        await patch_model(api, "m", {"spec": {"replicas": 3}})
        await eventually(lambda: len(second.endpoints("m")) == 3, what="three endpoints")
        assert second.operator.reconciler.reconciles > 0

        # A crash leaves the Lease held: a new replica waits for it to expire (by its own clock,
        # moved on by the test), then leads.
        clock = ExpiryClock()
        third = await GatewayReplica(kube, identity="third",
                                     options=dataclasses.replace(STEADY, clock=clock)).start()
        nodes.append(third)
        await second.stop(release=False)
        await eventually(lambda: third.operator.elector._observed is not None, what="third looking")
        await asyncio.sleep(0.5)  # several of its retries: the Lease is still valid
        assert not third.leading
        clock.offset = STEADY.lease_duration + 1.0
        await eventually(lambda: third.leading, timeout=10.0, what="the takeover after expiry")
        lease = kube.get("leases", "kvgate-leader")
        assert lease["spec"]["holderIdentity"] == "third" and lease["spec"]["leaseTransitions"] >= 2
        await patch_model(api, "m", {"spec": {"replicas": 1}})
        await eventually(lambda: len(third.endpoints("m")) == 1, what="scaled down by the new leader")
        await third.stop()
        assert kube.get("leases", "kvgate-leader")["spec"]["holderIdentity"] == ""
    finally:
        for node in nodes:
            await node.stop()


async def test_kvgate_serve_command(kube: FakeKube, api: KubeApi, kubelet: Kubelet,
                                    tmp_path: Any) -> None:
    """`kvgate serve` as a process, with a kubeconfig pointing at the fake API server."""
    kubeconfig = kube.write_kubeconfig(str(tmp_path / "kubeconfig"))
    config = tmp_path / "kvgate.yaml"
    config.write_text(yaml.safe_dump({"server": {"logLevel": "warning"},
                                      "queue": {"timeoutSeconds": 15},
                                      "modelRollouts": {"surge": 1}}))
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, KUBERNETES_SERVICE_HOST="")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvgate", "serve", "-c", str(config), "--kubeconfig", kubeconfig,
        "--namespace", NS, "--port", str(port), "--metrics-port", "0", "--identity", "proc",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await create_model(api, model_body("m", replicas=0))
        lease = await eventually(lambda: kube.get("leases", "kvgate-leader"), what="the lease")
        assert lease["spec"]["holderIdentity"] == "proc"
        sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                 max_retries=0, timeout=20)
        async with sdk:
            assert await chat(sdk, "m")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, output.decode()
    assert kube.get("leases", "kvgate-leader")["spec"]["holderIdentity"] == ""
