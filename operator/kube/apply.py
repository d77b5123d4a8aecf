"""Carrying out a `PodPlan` against the API server, and writing a Model's status.

Each function is safe to repeat: the plan was made from a fresh read, deletions name the exact
Pod (uid precondition) so a stale plan never removes a replacement, a Pod that is already gone
counts as deleted, and the status is written only when it differs. A write that fails leaves
the rest for the next reconcile, which plans again from what exists.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from datetime import datetime, timezone
from typing import Any, Sequence

from kubernetes_asyncio.client.exceptions import ApiException

from lb.model import Model
from lb_operator.kube.client import KubeApi
from lb_operator.kube.engines import files_config_map_name
from lb_operator.kube.pods import Pod, PodPlan, pod_name

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 5


async def apply_plan(api: KubeApi, model: Model, plan: PodPlan) -> list[dict[str, Any]]:
    """Delete, then create (KubeAI's order); returns the Pods as created by the server."""
    for line in plan.details:
        log.info("model %s/%s: %s", model.namespace, model.name, line)
    _raise_first(await asyncio.gather(
        *(api.delete_pod(model.namespace, pod_name(p), _uid(p)) for p in plan.to_delete),
        return_exceptions=True))
    created = await asyncio.gather(*(api.create_pod(model.namespace, p) for p in plan.to_create),
                                   return_exceptions=True)
    _raise_first(created)
    return [c for c in created if isinstance(c, dict)]


def _raise_first(results: Sequence[Any]) -> None:
    """Let every call of a batch finish (no orphaned requests), then report the first error."""
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def ensure_files(api: KubeApi, model: Model, config_map: dict[str, Any] | None,
                       owner: dict[str, Any] | None) -> None:
    """The files ConfigMap exists with the wanted data, or is removed when no files remain."""
    name = files_config_map_name(model)
    current = await api.get_config_map(model.namespace, name)
    if config_map is None:
        if current is not None:
            await api.delete_config_map(model.namespace, name)
        return
    wanted = copy.deepcopy(config_map)
    if owner:
        wanted["metadata"]["ownerReferences"] = [owner]
    if current is None:
        await api.create_config_map(model.namespace, wanted)
    elif current.get("data") != wanted.get("data"):
        wanted["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        await api.replace_config_map(model.namespace, name, wanted)


def pods_after(pods: Sequence[Pod], plan: PodPlan, created: Sequence[Pod]) -> list[Pod]:
    """What exists once the plan is applied: the status reports this, not the pre-plan state."""
    deleted = {pod_name(p) for p in plan.to_delete}
    return [p for p in pods if pod_name(p) not in deleted] + list(created)


def condition(kind: str, ok: bool, reason: str, message: str = "",
              generation: int | None = None) -> dict[str, Any]:
    """A metav1.Condition; its lastTransitionTime is settled by `merge_conditions`."""
    out: dict[str, Any] = {"type": kind, "status": "True" if ok else "False", "reason": reason,
                           "message": message, "lastTransitionTime": now_timestamp()}
    if generation is not None:
        out["observedGeneration"] = generation
    return out


def merge_conditions(current: Sequence[dict[str, Any]],
                     updates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace conditions by type. An unchanged status keeps its lastTransitionTime, so repeating a
    reconcile writes nothing (and the status does not churn on every pass)."""
    merged = {c.get("type"): dict(c) for c in current}
    for update in updates:
        old = merged.get(update["type"])
        new = dict(update)
        if old is not None and old.get("status") == new["status"]:
            new["lastTransitionTime"] = old.get("lastTransitionTime", new["lastTransitionTime"])
        merged[update["type"]] = new
    return list(merged.values())


def now_timestamp() -> str:
    """The current time as Kubernetes writes it in conditions and Events (RFC 3339, seconds)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def write_status(api: KubeApi, obj: dict[str, Any], replicas: dict[str, int] | None = None,
                       conditions: Sequence[dict[str, Any]] = (), *,
                       selector: str | None = None) -> None:
    """Set status.replicas, conditions and the Pods' label selector (what the scale subresource
    reports as status.selector) through the status subresource.

    The write carries the resourceVersion it was based on; on 409 (someone else changed the
    Model meanwhile: a spec edit, the autoscaler, the cache's status patch) it reads the Model
    again and retries, so the rest of the status (cache.loaded) is never overwritten by a stale copy.
    """
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for _ in range(CONFLICT_RETRIES):
        current = obj.get("status") or {}
        status = copy.deepcopy(current)
        if replicas is not None:
            status["replicas"] = dict(replicas)
        if conditions:
            status["conditions"] = merge_conditions(current.get("conditions") or (), conditions)
        if selector is not None:
            status["selector"] = selector
        if status == current:
            return
        body = dict(obj, status=status)
        try:
            await api.replace_model_status(namespace, name, body)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise
        fresh = await api.get_model(namespace, name)
        if fresh is None:
            return
        obj = fresh
    raise RuntimeError(f"model {namespace}/{name}: status kept conflicting "
                       f"after {CONFLICT_RETRIES} attempts")


def _uid(pod: Pod) -> str | None:
    return (pod.get("metadata") or {}).get("uid")
