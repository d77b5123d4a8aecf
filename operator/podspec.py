"""The Pod manifest of one replica of a Model: engine container + resource profile + cluster settings.

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
from decimal import Decimal
from typing import Any, Mapping

from lb.model import API_VERSION, KIND, Model

from lb_operator.loader import LOADER_PORT, LOADER_PORT_ANNOTATION
from lb_operator.engines import (MODEL_PORT, PodSpecError, adapter_loader_container, adapter_loader_volumes,
                                 server_container)
from lb_operator.json_patch import JsonPatchError, apply_patch
from lb_operator.system_config import Quantity, ResourceProfile, SystemConfig, parse_quantity

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
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
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
