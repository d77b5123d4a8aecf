"""Kubernetes Events on Models: what ``kubectl describe model`` shows under Events.

One Event object per (Model, what happened): a repeat bumps its ``count`` and ``lastTimestamp``
instead of adding another object, as kubectl's own aggregation presents it. Used by the cache
(`lb_operator.kube.cache`: loaded, failed) and the reconciler (name conflicts).
"""

from __future__ import annotations

from kubernetes_asyncio.client.exceptions import ApiException

from lb.model import API_VERSION, KIND
from lb_operator.kube.apply import now_timestamp
from lb_operator.kube.client import MERGE_PATCH, KubeApi, or_none

SOURCE = "kvgate-operator"


async def record_event(api: KubeApi, *, namespace: str, model: str, uid: str, kind: str,
                       reason: str, message: str, event_name: str) -> None:
    """Record an Event (``kind`` Normal or Warning) on the Model ``namespace/model``."""
    now = now_timestamp()
    body = {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": event_name, "namespace": namespace},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": model,
                               "namespace": namespace, "uid": uid},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": now, "lastTimestamp": now, "source": {"component": SOURCE}}
    try:
        await api.core.create_namespaced_event(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        old = await or_none(api.core.read_namespaced_event(event_name, namespace))
        count = int(getattr(old, "count", None) or 1) + 1
        await api.core.patch_namespaced_event(
            event_name, namespace, {"count": count, "lastTimestamp": now, "message": message},
            _content_type=MERGE_PATCH)
