"""Model cache profiles against the fake API server (which, like a cluster without a Job
controller, never runs Jobs: the tests set their status), plus the loader image's commands run
for real as the Jobs would run them."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from lb.model import Model
from lb_operator.kube.cache import (CACHE_FINALIZER, LOADED_ANNOTATION_PREFIX, ensure_cache, eviction_job_name,
                               loader_job, loader_job_name)
from lb_operator.kube.client import KubeApi
from lb_operator.kube.engines import cache_dir
from lb_operator.loader import FetchError, fetch_to
from lb_operator.kube.pods import pod_for_model
from lb_operator.system_config import system_config_from_dict
from tests.kube_fake import FakeKube, ResourceType

STORAGE_CLASS = ResourceType("storage.k8s.io", "v1", "storageclasses", "StorageClass", namespaced=False)
CONFIG = system_config_from_dict({"cacheProfiles": {
    "fast": {"sharedFilesystem": {"storageClassName": "nfs"}},
    "static": {"sharedFilesystem": {"persistentVolumeName": "models-pv"}}}})
CLAIM = "shared-model-cache-fast"
NFS = {"metadata": {"name": "nfs"}, "provisioner": "nfs.csi.k8s.io"}


def model_body(name: str = "llama", profile: str = "fast") -> dict[str, Any]:
    return {"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": name},
            "spec": {"url": "hf://org/llama", "engine": "VLLM", "features": ["TextGeneration"],
                     "cacheProfile": profile}}


class Env:
    def __init__(self, kube: FakeKube, api: Any) -> None:
        self.kube, self.api = kube, api

    async def ensure(self, name: str = "llama") -> Any:
        obj = self.kube.get("models", name)
        assert obj is not None
        return await ensure_cache(KubeApi(self.api), obj, CONFIG)

    def finish_job(self, name: str, ok: bool = True) -> None:
        condition = {"type": "Complete" if ok else "Failed", "status": "True",
                     "reason": "Completed" if ok else "BackoffLimitExceeded"}
        status = {"succeeded": 1} if ok else {"failed": 4}
        self.kube.update_status("jobs", name, {**status, "conditions": [condition]})

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [e for e in self.kube.objects("events") if e["reason"] == reason]

    def loaded(self, name: str = "llama") -> Any:
        return ((self.kube.get("models", name).get("status") or {}).get("cache") or {}).get("loaded")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with FakeKube(extra_types=[STORAGE_CLASS]) as kube, kube.api_client() as api:
        yield Env(kube, api)


async def test_load_then_serve_then_evict_on_delete(env: Env) -> None:
    env.kube.create("storageclasses", NFS, namespace=None)
    env.kube.create("models", model_body())
    model = Model.from_dict(env.kube.get("models", "llama"))

    state = await env.ensure()
    assert not state.ready and state.reason == "Loading"
    pvc = env.kube.get("persistentvolumeclaims", CLAIM)
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "10Gi"}},
                           "storageClassName": "nfs"}
    job = env.kube.get("jobs", loader_job_name(model))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-3:] == ["fetch", "hf://org/llama", cache_dir(model)]
    assert container["image"] == CONFIG.model_loading.image
    assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
    assert any(e["name"] == "HF_TOKEN" for e in container["env"])
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == CLAIM
    assert CACHE_FINALIZER in env.kube.get("models", "llama")["metadata"]["finalizers"]
    assert env.loaded() is False

    assert (await env.ensure()).reason == "Loading"  # level-triggered: no second Job, no error
    assert len(env.kube.objects("jobs")) == 1

    env.finish_job(loader_job_name(model))
    state = await env.ensure()
    assert state.ready and state.reason == "Loaded"
    annotations = env.kube.get("persistentvolumeclaims", CLAIM)["metadata"]["annotations"]
    assert annotations == {f"{LOADED_ANNOTATION_PREFIX}llama": cache_dir(model)}
    assert env.loaded() is True and env.kube.objects("jobs") == []
    assert len(env.events("CacheLoaded")) == 1
    assert (await env.ensure()).ready and env.kube.objects("jobs") == []  # stays loaded, no new Job

    # The Pods mount the cache read-only and read the model from it.
    pod = pod_for_model(Model.from_dict(env.kube.get("models", "llama")), CONFIG)
    server = pod["spec"]["containers"][0]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in server["volumeMounts"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": CLAIM}} in pod["spec"]["volumes"]
    assert f"--model={cache_dir(model)}" in server["args"]

    # Delete: the finalizer holds the Model until the eviction Job removed the files.
    env.kube.update_status("persistentvolumeclaims", CLAIM, {"phase": "Bound"})
    env.kube.delete("models", "llama")
    assert env.kube.get("models", "llama")["metadata"]["deletionTimestamp"]
    state = await env.ensure()
    assert state.reason == "Evicting" and not state.finalized
    evict = env.kube.get("jobs", eviction_job_name(model))
    assert evict["spec"]["template"]["spec"]["containers"][0]["command"][-2:] == ["evict", cache_dir(model)]
    assert (await env.ensure()).reason == "Evicting"
    env.finish_job(eviction_job_name(model))
    state = await env.ensure()
    assert state.finalized
    assert env.kube.get("models", "llama") is None  # finalizer gone: the API server removed it
    assert env.kube.get("persistentvolumeclaims", CLAIM)["metadata"].get("annotations") in (None, {})
    assert env.kube.objects("jobs") == []


async def test_missing_storage_class_is_reported_not_stuck(env: Env) -> None:
    env.kube.create("models", model_body())
    state = await env.ensure()
    assert not state.ready and state.reason == "StorageClassNotFound" and "'nfs'" in state.message
    assert state.condition()["status"] == "False" and state.condition()["reason"] == "StorageClassNotFound"
    assert env.kube.objects("persistentvolumeclaims") == [] and env.kube.objects("jobs") == []
    await env.ensure()
    (event,) = env.events("StorageClassNotFound")
    assert event["type"] == "Warning" and event["count"] == 2
    assert event["involvedObject"]["name"] == "llama" and event["involvedObject"]["kind"] == "Model"

    # Fixed by the admin: the next pass goes on.
    env.kube.create("storageclasses", NFS, namespace=None)
    assert (await env.ensure()).reason == "Loading"

    # Deleting a Model whose claim never bound does not wait for an eviction Pod that cannot run.
    env.kube.delete("models", "llama")
    assert (await env.ensure()).finalized and env.kube.get("models", "llama") is None


async def test_failed_loader_job_is_reported_and_retried_when_deleted(env: Env) -> None:
    env.kube.create("storageclasses", NFS, namespace=None)
    env.kube.create("models", model_body())
    await env.ensure()
    env.finish_job("load-cache-llama", ok=False)
    state = await env.ensure()
    assert not state.ready and state.reason == "CacheLoadFailed" and "BackoffLimitExceeded" in state.message
    assert env.events("CacheLoadFailed")[0]["type"] == "Warning" and env.loaded() is False
    env.kube.delete("jobs", "load-cache-llama")
    assert (await env.ensure()).reason == "Loading" and env.kube.get("jobs", "load-cache-llama")


async def test_static_volume_and_unknown_profile_and_uncached_models(env: Env) -> None:
    env.kube.create("models", model_body("a", profile="static"))
    await env.ensure("a")
    spec = env.kube.get("persistentvolumeclaims", "shared-model-cache-static")["spec"]
    assert spec["volumeName"] == "models-pv" and spec["storageClassName"] == ""
    env.kube.create("models", model_body("b", profile="nope"))
    assert (await env.ensure("b")).reason == "CacheProfileNotFound"
    plain = model_body("c")
    del plain["spec"]["cacheProfile"]
    env.kube.create("models", plain)
    calls = len(env.kube.calls)
    state = await env.ensure("c")
    assert state.ready and len(env.kube.calls) == calls  # nothing to do, no API calls


async def test_the_jobs_commands_run_for_real(tmp_path: Path) -> None:
    """What the loader and eviction Jobs run, run here on file:// sources."""
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "sub" / "weights.bin").write_bytes(b"\0" * 1024)
    target = tmp_path / "cache" / "llama-1234"
    command = loader_job(Model.from_dict(model_body()), CONFIG)["spec"]["template"]["spec"]["containers"][0]["command"]
    module = command[1:3]  # ["-m", "lb_operator.loader"]

    async def run(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, *module, *args)
        return await proc.wait()

    assert await run("fetch", f"file://{source}", str(target)) == 0
    assert (target / "sub" / "weights.bin").stat().st_size == 1024
    assert [p.name for p in target.parent.iterdir()] == ["llama-1234"]  # no staging leftovers
    with pytest.raises(FetchError, match="cannot copy"):
        await fetch_to("file:///does/not/exist", tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert await run("evict", str(target)) == 0 and not target.exists()
