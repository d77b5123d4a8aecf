"""Pods: the manifest of one replica of a Model, a Pod's observed state, and the reconcile plan.

The manifest is engine container + resource profile + cluster settings.

The result is a plain dict in Kubernetes JSON shape, deterministic in its inputs. Its `pod-hash`
label is a hash of the finished `spec`, so any change that would change the running Pod (image,
args, profile, a system-config patch) shows up as a hash mismatch and triggers a rollout, while
label-only changes (adapters being loaded) do not.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Mapping, Sequence

from lb.model import API_VERSION, KIND, Model

from lb_operator.json_patch import JsonPatchError, apply_patch
from lb_operator.kube.engines import (MODEL_PORT, PodSpecError, adapter_loader_container,
                                      adapter_loader_volumes, files_config_map, server_container)
from lb_operator.loader import LOADER_PORT, LOADER_PORT_ANNOTATION
from lb_operator.replicas import JUST_CREATED, ReplicaState, desired_replicas, replica_step
from lb_operator.system_config import Quantity, ResourceProfile, SystemConfig, parse_quantity

Pod = Mapping[str, Any]
MODEL_LABEL = "model"
POD_HASH_LABEL = "pod-hash"
ENGINE_LABEL = "kvgate.dev/engine"
FEATURE_LABEL_PREFIX = "features.kvgate.dev/"
ADAPTER_LABEL_PREFIX = "adapter.kvgate.dev/"
PORT_ANNOTATION = "kvgate.dev/model-pod-port"


def pod_for_model(model: Model, config: SystemConfig, *, owner_uid: str = "") -> dict[str, Any]:
    """A Pod to create for `model`, with its `pod-hash` label set.

    `owner_uid` is the Model object's metadata.uid (server-set, so not part of `Model`); with it
    the Pod gets an ownerReference and is garbage-collected with its Model.
    """
    container, volumes = server_container(model, config)
    profile, count = _profile(model, config)
    container["image"] = select_image(model, config, profile)
    resources = profile_resources(profile, count)
    if resources:
        container["resources"] = resources
    pods = config.model_server_pods
    if pods.security_context:
        container["securityContext"] = copy.deepcopy(pods.security_context)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _metadata(model, owner_uid),
        "spec": _pod_spec(model, config, profile, container, volumes),
    }
    _add_adapter_loader(pod, model, config)
    if pods.json_patches:
        try:
            pod = apply_patch(pod, pods.json_patches)
        except JsonPatchError as exc:
            raise PodSpecError(f"modelServerPods.{exc}") from None
    pod["metadata"].setdefault("labels", {})[POD_HASH_LABEL] = pod_hash(pod["spec"])
    return pod


def _add_adapter_loader(pod: dict[str, Any], model: Model, config: SystemConfig) -> None:
    """Models with adapters get the adapter-loader sidecar (see engines.adapter_loader_container)."""
    loader = adapter_loader_container(model, config)
    if loader is None:
        return
    pod["spec"]["containers"].append(loader)
    names = {v["name"] for v in pod["spec"]["volumes"]}
    pod["spec"]["volumes"] += [v for v in adapter_loader_volumes(model, config) if v["name"] not in names]
    pod["metadata"]["annotations"][LOADER_PORT_ANNOTATION] = str(LOADER_PORT)


def _profile(model: Model, config: SystemConfig) -> tuple[ResourceProfile, int]:
    parsed = model.spec.parsed_resource_profile()
    if parsed is None:
        return ResourceProfile(), 1
    name, count = parsed
    profile = config.resource_profiles.get(name)
    if profile is None:
        known = ", ".join(sorted(config.resource_profiles))
        raise PodSpecError(f"spec.resourceProfile: unknown profile {name!r} (known: {known})")
    return profile, count


def select_image(model: Model, config: SystemConfig, profile: ResourceProfile) -> str:
    """spec.image, else the engine's image for the profile's imageName, else the engine's default."""
    if model.spec.image:
        return model.spec.image
    if model.spec.engine not in config.model_servers:
        raise PodSpecError(f"spec.engine: no image configured for {model.spec.engine!r} under modelServers")
    return config.image_for(model.spec.engine, profile.image_name)


def multiply_quantity(quantity: Quantity, count: int) -> str:
    """`count` units of a profile: "24Gi" x 2 = "48Gi", "500m" x 3 = "1500m" (suffix kept, so exact)."""
    number, suffix = parse_quantity(quantity)
    total = number * count
    text = format(total.normalize(), "f") if total != total.to_integral_value() else str(int(total))
    return text + suffix


def profile_resources(profile: ResourceProfile, count: int) -> dict[str, dict[str, str]]:
    resources = {}
    for kind in ("requests", "limits"):
        values: Mapping[str, Quantity] = getattr(profile, kind)
        if values:
            resources[kind] = {name: multiply_quantity(q, count) for name, q in sorted(values.items())}
    return resources


def owner_reference(model_name: str, uid: str) -> dict[str, Any]:
    """An ownerReference to a Model object: its dependents are garbage-collected with it."""
    return {"apiVersion": API_VERSION, "kind": KIND, "name": model_name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _metadata(model: Model, owner_uid: str) -> dict[str, Any]:
    labels = {MODEL_LABEL: model.name, ENGINE_LABEL: model.spec.engine}
    labels.update({f"{FEATURE_LABEL_PREFIX}{feature}": "true" for feature in model.spec.features})
    metadata: dict[str, Any] = {
        "generateName": f"model-{model.name}-",
        "namespace": model.namespace,
        "labels": labels,
        "annotations": {PORT_ANNOTATION: str(MODEL_PORT)},
    }
    if owner_uid:
        metadata["ownerReferences"] = [owner_reference(model.name, owner_uid)]
    return metadata


def _pod_spec(model: Model, config: SystemConfig, profile: ResourceProfile,
              container: dict[str, Any], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    pods = config.model_server_pods
    optional = {
        "nodeSelector": dict(profile.node_selector),
        "tolerations": [dict(t) for t in profile.tolerations],
        "affinity": copy.deepcopy(profile.affinity),
        "runtimeClassName": profile.runtime_class_name,
        "schedulerName": profile.scheduler_name,
        "priorityClassName": model.spec.priority_class_name,
        "serviceAccountName": pods.service_account_name,
        "securityContext": copy.deepcopy(pods.pod_security_context),
        "imagePullSecrets": [dict(s) for s in pods.image_pull_secrets],
    }
    # Least privilege: neither the server nor the adapter-loader sidecar calls the Kubernetes API.
    spec: dict[str, Any] = {"automountServiceAccountToken": False, "containers": [container],
                            "volumes": volumes}
    spec.update({key: value for key, value in optional.items() if value})
    return spec


def pod_hash(spec: Mapping[str, Any]) -> str:
    """A short, label-safe, process-independent hash of a Pod spec (canonical JSON, sorted keys)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=_json_default)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.b32encode(digest).decode().lower().rstrip("=")[:10]


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, frozenset, set)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot hash {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# A Pod's observed state


def _conditions(pod: Pod) -> dict[str, str]:
    return {c.get("type"): c.get("status") for c in (pod.get("status") or {}).get("conditions") or ()}


def is_terminating(pod: Pod) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def is_failed(pod: Pod) -> bool:
    """Failed or Succeeded: a server Pod that stopped will not serve again (restartPolicy aside)."""
    return (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")


def is_ready(pod: Pod) -> bool:
    return not is_terminating(pod) and not is_failed(pod) and _conditions(pod).get("Ready") == "True"


def is_scheduled(pod: Pod) -> bool:
    return _conditions(pod).get("PodScheduled") == "True" or bool((pod.get("spec") or {}).get("nodeName"))


def pod_name(pod: Pod) -> str:
    return (pod.get("metadata") or {}).get("name", "")


def pod_hash_of(pod: Pod) -> str:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(POD_HASH_LABEL, "")


def _created(pod: Pod) -> float:
    """Seconds since the epoch; a Pod without a timestamp was only just created (the youngest)."""
    stamp = (pod.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return JUST_CREATED
    if isinstance(stamp, datetime):
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)).timestamp()
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")  # unreadable: the oldest, the last a scale-down picks


def replica_state(pod: Pod, expected_hash: str) -> ReplicaState:
    """A Pod as the shared replica rules see it."""
    return ReplicaState(ready=is_ready(pod), current=pod_hash_of(pod) == expected_hash,
                        created=_created(pod), scheduled=is_scheduled(pod), failed=is_failed(pod))


def replica_status(pods: Sequence[Pod]) -> dict[str, int]:
    """Model.status.replicas: Pods that exist (not being deleted, not failed) and those Ready."""
    live = [p for p in pods if not is_terminating(p) and not is_failed(p)]
    return {"all": len(live), "ready": sum(is_ready(p) for p in live)}


# ---------------------------------------------------------------------------------------------
# The reconcile plan


@dataclass(slots=True)
class PodPlan:
    """Delete first, then create (KubeAI's order: freed nodes are reused instead of scaled up)."""

    expected_hash: str
    desired: int
    to_delete: list[Pod] = field(default_factory=list)
    to_create: list[dict[str, Any]] = field(default_factory=list)
    config_map: dict[str, Any] | None = None  # the files ConfigMap to ensure; None means none needed
    details: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.to_delete and not self.to_create


def plan_pods(model: Model, config: SystemConfig, pods: Sequence[Pod], *, owner_uid: str = "") -> PodPlan:
    """The shared replica step (`lb_operator.replicas`) on the Pods that are not being deleted.

    A pure function of what is observed: applying it (API calls) is `apply.py`'s business.
    """
    template = pod_for_model(model, config, owner_uid=owner_uid)
    expected = template["metadata"]["labels"][POD_HASH_LABEL]
    plan = PodPlan(expected, desired_replicas(model), config_map=files_config_map(model))
    live = [p for p in pods if not is_terminating(p)]
    step = replica_step(live, lambda p: replica_state(p, expected), plan.desired,
                        config.model_rollouts.surge)
    for pod, reason in step.to_delete:
        plan.to_delete.append(pod)
        plan.details.append(f"delete {pod_name(pod) or '?'}: {reason}")
    plan.to_create += [copy.deepcopy(template) for _ in range(step.create)]
    if step.create:
        plan.details.append(f"create {step.create} Pod(s) with hash {expected}")
    return plan
