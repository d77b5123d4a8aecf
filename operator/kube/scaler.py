"""The gateway's Scaler in cluster mode: scale a Model from zero through its scale subresource.

Any gateway replica may call it (not only the leader): it writes ``spec.replicas`` through
``/scale`` and the leader's reconciler creates the Pod. The write is a compare-and-set: it
reads the Scale, writes 1 only if the Model wants no replica, and on 409 (the autoscaler or
another gateway wrote first) reads again, so a concurrent scale-up to N is never cut back to 1.

It is called by every request that enters the waiting room, so the common case costs no API
call: the registry's copy of the Model (kept current by the watch) already wants a replica.
"""

from __future__ import annotations

import logging

from kubernetes_asyncio.client.exceptions import ApiException

from lb.registry import Registry
from lb_operator.kube.apply import CONFLICT_RETRIES
from lb_operator.kube.client import KubeApi

log = logging.getLogger(__name__)


class ClusterScaler:
    def __init__(self, api: KubeApi, registry: Registry, default_namespace: str = "default") -> None:
        self.api = api
        self.registry = registry
        self.default_namespace = default_namespace
        self.scale_ups = 0  # writes that took a Model from 0 to 1

    async def ensure_replica(self, model: str) -> None:
        current = self.registry.get_model(model)
        if current is not None and _wants_replicas(current.spec.replicas, current.spec.min_replicas):
            return
        namespace = current.namespace if current is not None else self.default_namespace
        for _ in range(CONFLICT_RETRIES):
            scale = await self.api.get_model_scale(namespace, model)
            if ((scale.get("spec") or {}).get("replicas") or 0) >= 1:
                return
            scale.setdefault("spec", {})["replicas"] = 1
            try:
                await self.api.replace_model_scale(namespace, model, scale)
            except ApiException as exc:
                if exc.status == 409:
                    continue
                raise
            self.scale_ups += 1
            log.info("model %s/%s: scaled from zero to one replica", namespace, model)
            return
        raise RuntimeError(f"model {namespace}/{model}: scale kept conflicting")


def _wants_replicas(replicas: int | None, min_replicas: int) -> bool:
    return (min_replicas if replicas is None else replicas) >= 1
