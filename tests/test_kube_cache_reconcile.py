"""Model cache profiles through the cluster runtime: the reconciler's cache step (PVC, loader Job,
finalizer, eviction Job) and Models it cannot plan, run by `ClusterOperator` against the fake API
server over HTTP (tests/cluster_harness.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator

import pytest

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


def conditions(kube: FakeKube, name: str) -> dict[str, dict[str, Any]]:
    status = (kube.get("models", name) or {}).get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or ()}


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
