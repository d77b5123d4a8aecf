"""The reconcile plan: which Pods to delete and create, as a pure function of what is observed.

Level-triggered: the plan depends only on the Model, the system config and the Pods that exist
now, so re-running it after a crash, a missed event or a conflict is always safe. Applying it
(API calls) and watching are the caller's business.

Rules (KubeAI's, with its rollout made strict about capacity):
- desired replicas = spec.replicas (None means minReplicas) clamped to [minReplicas, maxReplicas];
- Pods being deleted are ignored; failed/finished Pods are deleted and replaced;
- a rollout (a Pod whose `pod-hash` differs) adds up to `surge` new Pods, deletes outdated Pods
  that are not Ready at once (they serve nothing), and deletes a Ready outdated Pod only while the
  Ready count stays >= desired, i.e. once a new Pod is Ready to take its place;
- scale-down deletes in KubeAI's order: not Ready, then unscheduled, then outdated, then youngest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence, TypeVar

from lb.model import Model
from lb.registry import Endpoint

from lb_operator.engines import MODEL_PORT, files_config_map
from lb_operator.podspec import ADAPTER_LABEL_PREFIX, POD_HASH_LABEL, PORT_ANNOTATION, pod_for_model
from lb_operator.system_config import SystemConfig

Pod = Mapping[str, Any]
POD_IP_ANNOTATION = "kvgate.dev/model-pod-ip"  # on a Model: send its traffic elsewhere (tests)
POD_PORT_ANNOTATION = "kvgate.dev/model-pod-port"
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)
_FUTURE = datetime.max.replace(tzinfo=timezone.utc)
T = TypeVar("T")


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


# ---------------------------------------------------------------------------------------------
# Pod state


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


def _hash(pod: Pod) -> str:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(POD_HASH_LABEL, "")


def _created(pod: Pod) -> datetime:
    """A Pod without a timestamp was only just created, so it counts as the youngest."""
    stamp = (pod.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return _FUTURE
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return _EPOCH


def deletion_order(pods: Sequence[Pod], expected_hash: str) -> list[Pod]:
    """Pods sorted so the cheapest to lose come first: not Ready, unscheduled, outdated, youngest."""
    return sorted(pods, key=lambda p: (is_ready(p), is_scheduled(p), _hash(p) == expected_hash, _youngest_first(p)))


def _youngest_first(pod: Pod) -> float:
    created = _created(pod)
    return float("-inf") if created is _FUTURE else -created.timestamp()


# ---------------------------------------------------------------------------------------------
# Planning


def desired_replicas(model: Model) -> int:
    """spec.replicas clamped to [min, max]; an unset replicas (autoscaling not yet run) means minReplicas."""
    spec = model.spec
    return spec.clamp_replicas(spec.min_replicas if spec.replicas is None else spec.replicas)


def plan_pods(model: Model, config: SystemConfig, pods: Sequence[Pod], *, owner_uid: str = "") -> PodPlan:
    """The next step towards `desired` up-to-date Ready Pods without ever lowering Ready capacity."""
    template = pod_for_model(model, config, owner_uid=owner_uid)
    expected = template["metadata"]["labels"][POD_HASH_LABEL]
    plan = PodPlan(expected, desired_replicas(model), config_map=files_config_map(model))
    live = [p for p in pods if not is_terminating(p)]
    failed = [p for p in live if is_failed(p)]
    _delete(plan, failed, "failed")
    live = [p for p in live if not is_failed(p)]
    current = [p for p in live if _hash(p) == expected]
    outdated = deletion_order([p for p in live if _hash(p) != expected], expected)
    not_ready_outdated = [p for p in outdated if not is_ready(p)]
    _delete(plan, not_ready_outdated, "outdated and not Ready")
    outdated = [p for p in outdated if is_ready(p)]
    excess, replaced, create = rollout_step(deletion_order(current, expected), outdated, plan.desired,
                                            config.model_rollouts.surge, is_ready)
    _delete(plan, excess, "scale down")
    _delete(plan, replaced, "outdated, replaced by a Ready Pod")
    plan.to_create += [copy.deepcopy(template) for _ in range(create)]
    if create:
        plan.details.append(f"create {create} Pod(s) with hash {expected}")
    return plan


def rollout_step(current: Sequence[T], outdated_ready: Sequence[T], desired: int, surge: int,
                 ready: Callable[[T], bool]) -> tuple[list[T], list[T], int]:
    """The scale and rollout rule, for Pods and local processes alike.

    `current`: up-to-date replicas, cheapest to lose first; `outdated_ready`: the outdated Ready
    ones (outdated not-Ready ones are deleted anyway). Returns (up-to-date replicas beyond
    `desired`, outdated ones the Ready count can spare, how many to create within the surge).
    """
    excess = max(0, len(current) - desired)
    kept = current[excess:]
    ready_count = sum(1 for r in kept if ready(r)) + len(outdated_ready)
    removable = min(len(outdated_ready), max(0, ready_count - desired))
    remaining_old = len(outdated_ready) - removable
    create = min(desired - len(kept), desired + surge - len(kept) - remaining_old)
    return list(current[:excess]), list(outdated_ready[:removable]), max(0, create)


def _delete(plan: PodPlan, pods: Sequence[Pod], reason: str) -> None:
    for pod in pods:
        plan.to_delete.append(pod)
        plan.details.append(f"delete {pod_name(pod) or '?'}: {reason}")


# ---------------------------------------------------------------------------------------------
# Status and endpoints


def replica_status(pods: Sequence[Pod]) -> dict[str, int]:
    """Model.status.replicas: Pods that exist (not being deleted, not failed) and those Ready."""
    live = [p for p in pods if not is_terminating(p) and not is_failed(p)]
    return {"all": len(live), "ready": sum(is_ready(p) for p in live)}


def adapters_of(pod: Pod) -> frozenset[str]:
    """Adapters loaded on a Pod, recorded as `adapter.kvgate.dev/<name>` labels by the LoRA step."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return frozenset(key[len(ADAPTER_LABEL_PREFIX):] for key in labels if key.startswith(ADAPTER_LABEL_PREFIX))


def address_override(model: Model, config: SystemConfig) -> str | None:
    """KubeAI's test hook: with allowPodAddressOverride, a Model's annotations redirect its traffic."""
    if not config.allow_pod_address_override:
        return None
    ip = model.annotations.get(POD_IP_ANNOTATION)
    if not ip:
        return None
    return f"{ip}:{model.annotations.get(POD_PORT_ANNOTATION) or MODEL_PORT}"


def pod_endpoint(pod: Pod) -> tuple[str, str] | None:
    """(key `namespace/pod`, address `podIP:port`) of a Ready Pod with an IP; None otherwise."""
    meta = pod.get("metadata") or {}
    ip = (pod.get("status") or {}).get("podIP")
    if not is_ready(pod) or not ip:
        return None
    port = (meta.get("annotations") or {}).get(PORT_ANNOTATION) or str(MODEL_PORT)
    return f"{meta.get('namespace', 'default')}/{meta.get('name', '')}", f"{ip}:{port}"


def endpoints_from_pods(pods: Sequence[Pod], *, address_override: str | None = None) -> list[Endpoint]:
    """Registry endpoints for the Ready Pods with an IP, sorted by key."""
    endpoints = []
    for pod in pods:
        found = pod_endpoint(pod)
        if found is not None:
            key, address = found
            endpoints.append(Endpoint(key, address_override or address, adapters_of(pod)))
    return sorted(endpoints, key=lambda e: e.key)
