"""Cluster mode, Operator II end to end: LoRA adapters on live replicas, the autoscaler (leader
only, summing every gateway replica's metrics) and model cache profiles, all run by
`ClusterOperator` against the fake API server over HTTP, with simulated vLLM replicas as the
model servers and the gateway driven over real HTTP with the openai SDK (tests/cluster_harness.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any, AsyncIterator

import openai
import pytest

from lb.model import GROUP, PLURAL, VERSION
from lb_operator.kube.cache import CACHE_FINALIZER
from lb_operator.kube.engines import CACHE_MOUNT
from lb_operator.system_config import system_config_from_dict
from lb_operator.retry import Backoff
from tests.cluster_harness import (FAST, GatewayReplica, Kubelet, chat, create_model, eventually,
                                   model_body, patch_model, sdk)
from tests.kube_fake import FakeKube, ResourceType

STORAGE_CLASS = ResourceType("storage.k8s.io", "v1", "storageclasses", "StorageClass", namespaced=False)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5, extra_types=[STORAGE_CLASS]) as server:
        yield server


def spec_of(kube: FakeKube, name: str) -> dict[str, Any]:
    return (kube.get("models", name) or {}).get("spec") or {}


def conditions(kube: FakeKube, name: str) -> dict[str, dict[str, Any]]:
    status = (kube.get("models", name) or {}).get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or ()}


# ---------------------------------------------------------------------------------------------
# LoRA adapters


def loaded_on_servers(kubelet: Kubelet) -> list[set[str]]:
    """What each running simulator has loaded (its server's own LoRA table)."""
    return [set(dict(r.server.lora.items())) if r.server else set() for r in list(kubelet.replicas.values())]


def adapter_source(root: Path, name: str) -> str:
    """A directory holding an adapter's files; its file:// URL (fetched by the loader sidecars)."""
    directory = root / name
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"r": 8}')
    return f"file://{directory}"


async def test_adapters_follow_the_spec_on_every_ready_replica(kube: FakeKube, kubelet: Kubelet,
                                                               tmp_path: Path) -> None:
    node = await GatewayReplica(kube).start()
    try:
        async with sdk(node) as client:
            await create_model(node.api, model_body("m", replicas=2))
            await eventually(lambda: len(node.endpoints("m")) == 2, what="two endpoints")

            adapters = [{"name": n, "url": adapter_source(tmp_path, n)} for n in ("a1", "a2")]
            await patch_model(node.api, "m", {"spec": {"adapters": adapters}})

            def on_every_server(wanted: set[str], count: int) -> bool:
                loaded = loaded_on_servers(kubelet)
                return len(loaded) == count and all(s == wanted for s in loaded)

            await eventually(lambda: on_every_server({"a1", "a2"}, 2), what="adapters loaded")
            await eventually(lambda: routed(node, "m", {"a1", "a2"}, 2), what="adapters routed")
            assert await chat(client, "m_a1") and await chat(client, "m_a2")
            listed = {m.id for m in (await client.models.list()).data}
            assert {"m", "m_a1", "m_a2"} <= listed

            # A new replica gets them too.
            await patch_model(node.api, "m", {"spec": {"replicas": 3}})
            await eventually(lambda: on_every_server({"a1", "a2"}, 3), what="the new replica loaded")
            await eventually(lambda: routed(node, "m", {"a1", "a2"}, 3), what="three routed")

            # Removed from the spec: unloaded everywhere, no longer served.
            await patch_model(node.api, "m", {"spec": {"adapters": [adapters[0]]}})
            await eventually(lambda: on_every_server({"a1"}, 3), what="a2 unloaded")
            await eventually(lambda: routed(node, "m", {"a1"}, 3), what="a2 unrouted")
            with pytest.raises(openai.NotFoundError):
                await chat(client, "m_a2")
            assert await chat(client, "m_a1")
    finally:
        await node.stop()


async def test_a_deleted_models_failing_adapter_worker_stops(kube: FakeKube, kubelet: Kubelet,
                                                             tmp_path: Path) -> None:
    """A pass that keeps failing is retried while the Model exists, and no longer once it is gone."""
    node = await GatewayReplica(kube).start()
    try:
        missing = [{"name": "a1", "url": f"file://{tmp_path / 'missing'}"}]  # every fetch fails
        await create_model(node.api, model_body("m", replicas=1, adapters=missing))
        adapters = node.operator.adapters
        assert adapters is not None
        await eventually(lambda: len(node.endpoints("m")) == 1, what="a ready replica")
        passes = adapters.passes
        await eventually(lambda: adapters.passes >= passes + 2, what="a failed pass retried")
        assert ("default", "m") in adapters.workers.active

        await node.api.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "m")
        await eventually(lambda: not adapters.workers.active, timeout=2, what="the worker ended")
        passes = adapters.passes
        await asyncio.sleep(1.5)  # longer than the next retry's delay would have been
        assert adapters.passes == passes and not adapters.workers.active
    finally:
        await node.stop()


def routed(node: GatewayReplica, model: str, adapters: set[str], count: int) -> bool:
    group = node.registry.groups().get(model)
    if group is None or len(group.endpoints) != count:
        return False
    return all(set(e.adapters) == adapters for e in group.endpoints.values())


# ---------------------------------------------------------------------------------------------
# Autoscaler


AUTOSCALING = system_config_from_dict({"modelAutoscaling": {"interval": 0.1, "timeWindow": 0.3}})


async def hold(client: openai.AsyncOpenAI, model: str, count: int) -> list[asyncio.Task[Any]]:
    """Requests that stay active: no replica ever becomes Ready, so they wait in the waiting room."""
    return [asyncio.create_task(chat(client, model, f"held {i}")) for i in range(count)]


async def release(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()  # the client disconnects: the gateway drops the request at once
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_autoscaler_sums_gateways_survives_failover_and_scales_back(kube: FakeKube,
                                                                          kubelet: Kubelet) -> None:
    kubelet.paused = True
    nodes = [await GatewayReplica(kube, AUTOSCALING, identity=f"g{i}", register_pod=True).start()
             for i in range(3)]
    clients = [sdk(node) for node in nodes]
    held: list[list[asyncio.Task[Any]]] = [[] for _ in nodes]
    try:
        await eventually(lambda: nodes[0].leading, what="the first replica leads")
        body = model_body("m", replicas=0, min_replicas=0, max_replicas=8, targetRequests=1,
                          scaleDownDelaySeconds=1, adapters=[{"name": "a1", "url": "hf://org/a1"}])
        await create_model(nodes[0].api, body)
        await eventually(lambda: all(n.registry.get_model("m") for n in nodes), what="model everywhere")
        # 1 + 2 + 3 active requests on three gateways, adapter traffic included -> 6 replicas.
        held[0] = await hold(clients[0], "m", 1)
        held[1] = await hold(clients[1], "m_a1", 2)
        held[2] = await hold(clients[2], "m", 2) + await hold(clients[2], "m_a1", 1)
        await eventually(lambda: spec_of(kube, "m").get("replicas") == 6, what="6 replicas")
        autoscaler = nodes[0].operator.autoscaler
        assert autoscaler is not None
        assert set(await autoscaler.gateways()) == {n.metrics_address for n in nodes}
        await asyncio.sleep(0.5)
        assert spec_of(kube, "m")["replicas"] == 6  # steady under steady load
        assert kube.get("configmaps", AUTOSCALING.model_autoscaling.state_config_map_name)
        assert nodes[1].operator.autoscaler is None and nodes[2].operator.autoscaler is None

        # The leader goes away (its request with it); the next leader restores the state.
        await release(held[0])
        await nodes[0].stop()
        new_leader = await eventually(lambda: next((n for n in nodes[1:] if n.leading), None),
                                      what="a new leader")
        successor = await eventually(lambda: new_leader.operator.autoscaler, what="its autoscaler")
        await eventually(lambda: successor.last_report.totals.get("m") == 5.0, what="5 active")
        assert spec_of(kube, "m")["replicas"] >= 5  # no reset to zero after the failover

        # No load: back to minReplicas, but only after scaleDownDelaySeconds.
        await release(held[1] + held[2])
        await eventually(lambda: successor.last_report.totals.get("m") == 0.0, what="no load")
        await asyncio.sleep(0.5)
        assert spec_of(kube, "m")["replicas"] >= 5
        await eventually(lambda: spec_of(kube, "m").get("replicas") == 0, timeout=5, what="scaled to 0")
    finally:
        for tasks in held:
            await release(tasks)
        for client in clients:
            await client.close()
        for node in nodes:
            await node.stop()


# ---------------------------------------------------------------------------------------------
# Cache profiles


CACHED = system_config_from_dict({"cacheProfiles": {"shared": {"sharedFilesystem": {"storageClassName": "nfs"}}}})
QUICK_CACHE = dataclasses.replace(FAST, cache_backoff=Backoff(initial=0.1, maximum=0.3))


def finish_job(kube: FakeKube, name: str) -> None:
    kube.update_status("jobs", name, {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True", "reason": "Completed"}]})


async def test_cache_loads_before_pods_and_evicts_on_delete(kube: FakeKube, kubelet: Kubelet) -> None:
    node = await GatewayReplica(kube, CACHED, QUICK_CACHE).start()
    try:
        await create_model(node.api, model_body("m", replicas=1, cacheProfile="shared"))
        # No StorageClass: reported on the Model (condition and Event), nothing created, not stuck.
        await eventually(lambda: conditions(kube, "m").get("CacheReady", {}).get("reason")
                         == "StorageClassNotFound", what="the missing class reported")
        assert [e for e in kube.objects("events") if e["reason"] == "StorageClassNotFound"]
        assert kube.objects("persistentvolumeclaims") == [] and kubelet.pods("m") == []

        kube.create("storageclasses", {"metadata": {"name": "nfs"}, "provisioner": "nfs"}, namespace=None)
        job = await eventually(lambda: kube.get("jobs", "load-cache-m"), what="the loader Job")
        pvc = kube.get("persistentvolumeclaims", "shared-model-cache-shared")
        assert pvc["spec"]["storageClassName"] == "nfs" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        loader = job["spec"]["template"]["spec"]["containers"][0]
        assert loader["command"][-3:-1] == ["fetch", "hf://org/model"]
        await eventually(lambda: conditions(kube, "m")["CacheReady"]["reason"] == "Loading", what="Loading")
        assert CACHE_FINALIZER in kube.get("models", "m")["metadata"]["finalizers"]
        await asyncio.sleep(0.5)
        assert kubelet.pods("m") == []  # no Pods while the cache is loading

        finish_job(kube, "load-cache-m")  # the Job informer brings the Model back at once
        await eventually(lambda: node.endpoints("m"), timeout=5, what="a ready replica")
        model = kube.get("models", "m")
        assert model["status"]["cache"] == {"loaded": True}
        assert conditions(kube, "m")["CacheReady"]["status"] == "True"
        assert conditions(kube, "m")["Valid"]["status"] == "True"
        assert kube.get("jobs", "load-cache-m") is None
        pod = kubelet.pods("m")[0]
        mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == CACHE_MOUNT)
        assert mount.get("readOnly") is True
        async with sdk(node) as client:
            assert await chat(client, "m")

        # Delete: Pods stop, the eviction Job runs, then the finalizer goes and the Model with it.
        kube.delete("models", "m")
        await eventually(lambda: kube.get("jobs", "evict-cache-m"), what="the eviction Job")
        assert kube.get("models", "m") is not None
        await eventually(lambda: not kubelet.pods("m"), what="the model's Pods gone")
        finish_job(kube, "evict-cache-m")
        await eventually(lambda: kube.get("models", "m") is None, what="the Model finalized")
        annotations = kube.get("persistentvolumeclaims", "shared-model-cache-shared")["metadata"].get("annotations")
        assert "models.kvgate.dev/m" not in (annotations or {})
        await eventually(lambda: node.registry.get_model("m") is None, what="unregistered")
    finally:
        await node.stop()


async def test_unplannable_model_gets_a_condition(kube: FakeKube) -> None:
    node = await GatewayReplica(kube).start()
    try:
        await create_model(node.api, model_body("m", replicas=1, resourceProfile="no-such-gpu:1"))
        await eventually(lambda: conditions(kube, "m").get("Valid", {}).get("status") == "False",
                         what="the condition")
        condition = conditions(kube, "m")["Valid"]
        assert condition["reason"] == "PodSpecError" and "no-such-gpu" in condition["message"]
        assert condition["observedGeneration"] == kube.get("models", "m")["metadata"]["generation"]
        assert kube.objects("pods") == []
        await patch_model(node.api, "m", {"spec": {"resourceProfile": ""}})
        await eventually(lambda: conditions(kube, "m")["Valid"]["status"] == "True", what="valid again")
        await eventually(lambda: kube.objects("pods"), what="a pod")
    finally:
        await node.stop()
