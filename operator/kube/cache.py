"""Model cache profiles on a shared filesystem: download a model once, mount it read-only everywhere.

KubeAI's flow, with its stuck-reconcile bug (#286) fixed: every call returns at once with a
`CacheState`, and problems (no such StorageClass, a failed Job) surface as Events and a
`CacheReady` condition instead of a reconcile that waits forever.

- one ReadWriteMany PVC per cache profile (`shared-model-cache-<profile>`), shared by Models;
- a loader Job per Model (`load-cache-<model>`) runs the loader image's `fetch <url> <dir>` into
  the Model's own directory (`engines.cache_dir`);
- when it succeeds, a PVC annotation `models.kvgate.dev/<model>: <dir>` records what is loaded,
  `status.cache.loaded` turns true and the Job is deleted; only then may Pods be created, and
  they mount the PVC read-only (`kube.engines` already builds that mount);
- a finalizer on the Model runs an eviction Job (`evict <dir>`) on delete, then drops the
  annotation and the finalizer.

The planning half (manifests) is pure; `ensure_cache(api, obj, config)` applies it through a
kubernetes_asyncio ApiClient. The reconciler calls it before planning Pods and plans none while
`ready` is false.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from kubernetes_asyncio.client.exceptions import ApiException

from lb.model import GROUP, PLURAL, VERSION, Model, parse_model_url

from lb_operator.kube.apply import condition
from lb_operator.kube.client import MERGE_PATCH, KubeApi, or_none
from lb_operator.kube.engines import CACHE_MOUNT, Credentials, cache_claim_name, cache_dir, credentials
from lb_operator.kube.events import record_event
from lb_operator.kube.pods import MODEL_LABEL, owner_reference
from lb_operator.system_config import CacheProfile, SystemConfig

log = logging.getLogger("lb_operator.kube.cache")

CACHE_FINALIZER = "kvgate.dev/cache-eviction"
LOADED_ANNOTATION_PREFIX = "models.kvgate.dev/"  # on the PVC: <prefix><model name> = cache dir
CACHE_PROFILE_LABEL = "kvgate.dev/cache-profile"
JOB_KIND_LABEL = "kvgate.dev/cache-job"  # "load" or "evict"; the operator watches Jobs with it
CACHE_SIZE = "10Gi"  # a shared filesystem's request is nominal (as in KubeAI)


@dataclass(frozen=True, slots=True)
class CacheState:
    """Where a Model's cache stands. `ready`: Pods may be created. `finalized`: a deleted Model's
    cache is evicted and its finalizer removed. `reason` is a CamelCase word, as in conditions."""

    ready: bool
    reason: str
    message: str = ""
    finalized: bool = False

    def condition(self, generation: int | None = None) -> dict[str, Any]:
        """The Model's `CacheReady` status condition."""
        return condition("CacheReady", self.ready, self.reason, self.message, generation)


# ---------------------------------------------------------------------------------------------
# Planning: the manifests


def loaded_annotation(model: Model) -> str:
    return f"{LOADED_ANNOTATION_PREFIX}{model.name}"


def cache_pvc(profile_name: str, profile: CacheProfile, namespace: str) -> dict[str, Any]:
    """The profile's shared claim; a named PersistentVolume binds statically (no class, no provisioner)."""
    fs = profile.shared_filesystem
    assert fs is not None  # system_config validation guarantees it
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": CACHE_SIZE}}}
    if fs.persistent_volume_name:
        spec.update(volumeName=fs.persistent_volume_name, storageClassName="")
    else:
        spec["storageClassName"] = fs.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": cache_claim_name(profile_name), "namespace": namespace,
                         "labels": {CACHE_PROFILE_LABEL: profile_name}},
            "spec": spec}


def loader_job_name(model: Model) -> str:
    return f"load-cache-{model.name}"


def eviction_job_name(model: Model) -> str:
    return f"evict-cache-{model.name}"


def _job(model: Model, config: SystemConfig, name: str, kind: str, args: list[str],
         creds: Credentials, owner_uid: str) -> dict[str, Any]:
    claim = {"name": "models", "persistentVolumeClaim": {"claimName": cache_claim_name(model.spec.cache_profile)}}
    container = {"name": "loader", "image": config.model_loading.image,
                 "command": ["python", "-m", "lb_operator.loader", *args],
                 "volumeMounts": [{"name": "models", "mountPath": CACHE_MOUNT}, *creds.mounts]}
    if creds.env:
        container["env"] = creds.env
    metadata: dict[str, Any] = {"name": name, "namespace": model.namespace,
                                "labels": {MODEL_LABEL: model.name, JOB_KIND_LABEL: kind}}
    if owner_uid:
        metadata["ownerReferences"] = [owner_reference(model.name, owner_uid)]
    pods = config.model_server_pods
    pod_spec: dict[str, Any] = {"restartPolicy": "Never", "automountServiceAccountToken": False,  # no API calls
                                "containers": [container], "volumes": [claim, *creds.volumes]}
    if pods.service_account_name:
        pod_spec["serviceAccountName"] = pods.service_account_name
    if pods.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [dict(s) for s in pods.image_pull_secrets]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata,
            "spec": {"backoffLimit": 3, "template": {"metadata": {"labels": dict(metadata["labels"])},
                                                     "spec": pod_spec}}}


def loader_job(model: Model, config: SystemConfig, owner_uid: str = "") -> dict[str, Any]:
    """Downloads the model into its cache directory, with the credentials its URL scheme needs."""
    creds = credentials(parse_model_url(model.spec.url).scheme, config.secret_names)
    return _job(model, config, loader_job_name(model), "load", ["fetch", model.spec.url, cache_dir(model)],
                creds, owner_uid)


def eviction_job(model: Model, config: SystemConfig, owner_uid: str = "") -> dict[str, Any]:
    return _job(model, config, eviction_job_name(model), "evict", ["evict", cache_dir(model)],
                Credentials([], [], []), owner_uid)


def job_outcome(job: Mapping[str, Any]) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", message) from a Job's status, as the Job controller sets it."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or ():
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return cond["type"], cond.get("message") or cond.get("reason") or ""
    if status.get("succeeded"):
        return "Complete", ""
    return "Running", ""


# ---------------------------------------------------------------------------------------------
# Applying


class _Kube:
    """The few API calls the cache needs, answering plain dicts (None for 404)."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api
        self.core, self.batch, self.storage, self.custom = api.core, api.batch, api.storage, api.custom

    async def get(self, call: Any, *args: Any) -> dict[str, Any] | None:
        found = await or_none(call(*args))
        return None if found is None else self.api.plain(found)

    async def create(self, call: Any, namespace: str, body: dict[str, Any]) -> None:
        try:
            await call(namespace, body)
        except ApiException as exc:
            if exc.status != 409:  # created by an earlier pass whose answer was lost
                raise

    async def delete_job(self, name: str, namespace: str) -> None:
        await or_none(self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background"))

    async def patch_model(self, model: Model, patch: dict[str, Any], status: bool = False) -> None:
        call = (self.custom.patch_namespaced_custom_object_status if status
                else self.custom.patch_namespaced_custom_object)
        await call(GROUP, VERSION, model.namespace, PLURAL, model.name, patch, _content_type=MERGE_PATCH)

    async def patch_pvc(self, name: str, namespace: str, patch: dict[str, Any]) -> None:
        await self.core.patch_namespaced_persistent_volume_claim(name, namespace, patch, _content_type=MERGE_PATCH)

    async def event(self, model: Model, uid: str, kind: str, reason: str, message: str) -> None:
        await record_event(self.api, namespace=model.namespace, model=model.name, uid=uid, kind=kind,
                           reason=reason, message=message,
                           event_name=f"{model.name}.cache-{reason.lower()}")


async def ensure_cache(api: KubeApi, obj: Mapping[str, Any], config: SystemConfig) -> CacheState:
    """One level-triggered step of a Model's cache; call it on every reconcile before planning Pods.

    `obj` is the Model as the API returns it (metadata with uid, finalizers, deletionTimestamp).
    A deleted Model's cache is evicted here too: `finalized` says when its finalizer is gone.
    Raises only kubernetes_asyncio ApiExceptions of the API itself (conflicts, outages): retry.
    """
    model = Model.from_dict(obj)
    meta = obj.get("metadata") or {}
    if not model.spec.cache_profile:
        return CacheState(True, "NotCached", finalized=True)
    kube = _Kube(api)
    if meta.get("deletionTimestamp"):
        return await _evict(kube, model, meta, config)
    profile = config.cache_profiles.get(model.spec.cache_profile)
    if profile is None:
        return await _problem(kube, model, meta, "CacheProfileNotFound",
                              f"cache profile {model.spec.cache_profile!r} is not in the system config")
    if CACHE_FINALIZER not in (meta.get("finalizers") or ()):
        finalizers = [*(meta.get("finalizers") or ()), CACHE_FINALIZER]
        await kube.patch_model(model, {"metadata": {"finalizers": finalizers,
                                                    "resourceVersion": meta.get("resourceVersion")}})
    pvc, problem = await _ensure_pvc(kube, model, profile)
    if problem is not None:
        return await _problem(kube, model, meta, *problem)
    return await _ensure_loaded(kube, model, meta, config, pvc)


async def _ensure_pvc(kube: _Kube, model: Model, profile: CacheProfile
                      ) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The profile's PVC, created if missing; never created for a StorageClass that does not exist,
    since its Pods and Jobs would wait unscheduled forever."""
    name = cache_claim_name(model.spec.cache_profile)
    pvc = await kube.get(kube.core.read_namespaced_persistent_volume_claim, name, model.namespace)
    if pvc is not None:
        return pvc, None
    manifest = cache_pvc(model.spec.cache_profile, profile, model.namespace)
    storage_class = manifest["spec"]["storageClassName"]
    if storage_class and not await _storage_class_exists(kube, storage_class):
        return manifest, ("StorageClassNotFound",
                          f"StorageClass {storage_class!r} of cache profile {model.spec.cache_profile!r} does not exist")
    await kube.create(kube.core.create_namespaced_persistent_volume_claim, model.namespace, manifest)
    return manifest, None


async def _storage_class_exists(kube: _Kube, name: str) -> bool:
    """Whether the class exists; assumed to when StorageClasses may not be read (403: the chart's
    optional ClusterRole is off), so the check is skipped rather than blocking every cache."""
    try:
        return await kube.get(kube.storage.read_storage_class, name) is not None
    except ApiException as exc:
        if exc.status != 403:
            raise
        log.info("StorageClass %s not checked: no permission to read StorageClasses", name)
        return True


async def _ensure_loaded(kube: _Kube, model: Model, meta: Mapping[str, Any], config: SystemConfig,
                         pvc: Mapping[str, Any]) -> CacheState:
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    job_name = loader_job_name(model)
    if annotations.get(loaded_annotation(model)) == cache_dir(model):
        await _set_loaded(kube, model, True)
        await kube.delete_job(job_name, model.namespace)
        return CacheState(True, "Loaded", f"cached in {cache_dir(model)}")
    await _set_loaded(kube, model, False)
    job = await kube.get(kube.batch.read_namespaced_job, job_name, model.namespace)
    if job is None:
        await kube.create(kube.batch.create_namespaced_job, model.namespace,
                          loader_job(model, config, meta.get("uid", "")))
        return CacheState(False, "Loading", f"Job {job_name} is downloading the model")
    outcome, message = job_outcome(job)
    if outcome == "Failed":
        return await _problem(kube, model, meta, "CacheLoadFailed",
                              f"Job {job_name} failed ({message or 'see its Pods'}); delete it to retry")
    if outcome == "Running":
        return CacheState(False, "Loading", f"Job {job_name} is downloading the model")
    await kube.patch_pvc(pvc["metadata"]["name"], model.namespace,
                         {"metadata": {"annotations": {loaded_annotation(model): cache_dir(model)}}})
    await _set_loaded(kube, model, True)
    await kube.delete_job(job_name, model.namespace)
    await kube.event(model, meta.get("uid", ""), "Normal", "CacheLoaded", f"model cached in {cache_dir(model)}")
    return CacheState(True, "Loaded", f"cached in {cache_dir(model)}")


async def _set_loaded(kube: _Kube, model: Model, loaded: bool) -> None:
    current = model.status.cache.loaded if model.status and model.status.cache else None
    if current != loaded:
        await kube.patch_model(model, {"status": {"cache": {"loaded": loaded}}}, status=True)


async def _problem(kube: _Kube, model: Model, meta: Mapping[str, Any], reason: str, message: str) -> CacheState:
    log.warning("cache of %s/%s: %s: %s", model.namespace, model.name, reason, message)
    await kube.event(model, meta.get("uid", ""), "Warning", reason, message)
    return CacheState(False, reason, message)


async def _evict(kube: _Kube, model: Model, meta: Mapping[str, Any], config: SystemConfig) -> CacheState:
    """Deleted Model: stop loading, remove its files, forget them, drop the finalizer."""
    finalizers = list(meta.get("finalizers") or ())
    if CACHE_FINALIZER not in finalizers:
        return CacheState(False, "Evicted", finalized=True)
    await kube.delete_job(loader_job_name(model), model.namespace)
    claim = cache_claim_name(model.spec.cache_profile)
    pvc = await kube.get(kube.core.read_namespaced_persistent_volume_claim, claim, model.namespace)
    annotations = ((pvc or {}).get("metadata") or {}).get("annotations") or {}
    bound = ((pvc or {}).get("status") or {}).get("phase") == "Bound"
    # Nothing can be on an unbound claim, and an eviction Pod there would never schedule.
    if pvc is not None and (bound or loaded_annotation(model) in annotations):
        state = await _run_eviction(kube, model, meta, config)
        if state is not None:
            return state
        await kube.patch_pvc(claim, model.namespace, {"metadata": {"annotations": {loaded_annotation(model): None}}})
    await kube.delete_job(eviction_job_name(model), model.namespace)
    finalizers.remove(CACHE_FINALIZER)
    await kube.patch_model(model, {"metadata": {"finalizers": finalizers or None,
                                                "resourceVersion": meta.get("resourceVersion")}})
    return CacheState(False, "Evicted", finalized=True)


async def _run_eviction(kube: _Kube, model: Model, meta: Mapping[str, Any],
                        config: SystemConfig) -> CacheState | None:
    """None once the eviction Job completed; otherwise the state to report while it is not done."""
    name = eviction_job_name(model)
    job = await kube.get(kube.batch.read_namespaced_job, name, model.namespace)
    if job is None:
        # No owner reference: the Job must outlive the Model's garbage collection until it ran.
        await kube.create(kube.batch.create_namespaced_job, model.namespace, eviction_job(model, config))
        return CacheState(False, "Evicting", f"Job {name} is removing {cache_dir(model)}")
    outcome, message = job_outcome(job)
    if outcome == "Complete":
        return None
    if outcome == "Failed":
        return await _problem(kube, model, meta, "CacheEvictionFailed",
                              f"Job {name} failed ({message or 'see its Pods'}); delete it to retry")
    return CacheState(False, "Evicting", f"Job {name} is removing {cache_dir(model)}")
