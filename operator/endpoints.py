"""From watched Models and Pods to the gateway's registry, on every gateway replica.

Leader or not, each replica runs the Model and Pod informers and this sync: Models become
``registry.set_model`` / ``delete_model``; a model's Ready Pods with an IP become its endpoints
(`lb_operator.plan.endpoints_from_pods`: key ``namespace/pod``, address ``podIP:port`` from the
Pod's port annotation, adapters from its ``adapter.kvgate.dev/<name>`` labels). With
``allowPodAddressOverride`` in the system config, a Model's ``kvgate.dev/model-pod-ip`` (and
``-port``) annotation replaces every Pod's address (KubeAI's test hook).

Two replicas fed by the same API server therefore hold the same endpoints, and so pick the same
replica for the same prefix. The registry is keyed by model name: when several namespaces are
managed, a Model name must be unique across them (the later one wins otherwise).
"""

from __future__ import annotations

import logging
from typing import Iterable

from lb.model import Model, ModelValidationError
from lb.registry import Endpoint, Registry
from lb_operator.plan import Pod, address_override, endpoints_from_pods
from lb_operator.podspec import MODEL_LABEL
from lb_operator.system_config import SystemConfig
from lb_operator.watch import Informer, Obj

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, model name)


class EndpointSync:
    def __init__(self, registry: Registry, config: SystemConfig) -> None:
        self.registry = registry
        self.config = config
        self._models: dict[Key, Model] = {}
        self._pods: dict[Key, dict[str, Pod]] = {}  # model -> pod name -> pod
        self._published: dict[Key, list[Endpoint]] = {}

    def attach(self, model_informers: Iterable[Informer], pod_informers: Iterable[Informer]) -> None:
        for informer in model_informers:
            informer.add_handler(self.on_model)
        for informer in pod_informers:
            informer.add_handler(self.on_pod)

    def on_model(self, etype: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", "default"), meta.get("name", ""))
        if etype == "DELETED":
            self._forget(key)
            return
        try:
            model = Model.from_dict(obj)
        except ModelValidationError as exc:
            log.warning("model %s/%s: invalid, not served: %s", *key, exc)
            self._forget(key)
            return
        self._models[key] = model
        self.registry.set_model(model)
        self._publish(key)

    def on_pod(self, etype: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        model = (meta.get("labels") or {}).get(MODEL_LABEL)
        if not model:
            return
        key = (meta.get("namespace", "default"), model)
        pods = self._pods.setdefault(key, {})
        if etype == "DELETED":
            pods.pop(meta.get("name", ""), None)
        else:
            pods[meta.get("name", "")] = obj
        if key in self._models:
            self._publish(key)

    def _forget(self, key: Key) -> None:
        if self._models.pop(key, None) is None:
            return
        self._published.pop(key, None)
        self.registry.set_endpoints(key[1], [])
        self.registry.delete_model(key[1])

    def _publish(self, key: Key) -> None:
        model = self._models[key]
        pods = list(self._pods.get(key, {}).values())
        endpoints = endpoints_from_pods(pods, address_override=address_override(model, self.config))
        if self._published.get(key) == endpoints:
            return
        self._published[key] = endpoints
        self.registry.set_endpoints(model.name, endpoints)
