"""From watched Models and Pods to the gateway's registry, on every gateway replica.

Leader or not, each replica runs the Model and Pod informers and this sync: Models become
``registry.set_model`` / ``delete_model``; a model's Ready Pods with an IP become its endpoints
(`endpoints_from_pods`: key ``namespace/pod``, address ``podIP:port`` from the
Pod's port annotation, adapters from its ``adapter.kvgate.dev/<name>`` labels). With
``allowPodAddressOverride`` in the system config, a Model's ``kvgate.dev/model-pod-ip`` (and
``-port``) annotation replaces every Pod's address (KubeAI's test hook).

A Model that cannot run is not served: one whose spec does not parse, or whose ``Valid``
condition the leader's reconciler set to False for its current generation (an unknown resource
profile, a file:// URL in a cluster, ...). Its name goes to the registry as unavailable, with the
condition's message: not listed in /v1/models, and a request for it is told why. A spec edit
(a new generation) serves it again at once, before the reconciler has looked at it.

Two replicas fed by the same API server therefore hold the same endpoints, and so pick the same
replica for the same prefix. The registry is keyed by model name: when several namespaces are
managed and two Models share a name, only the one `lb_operator.kube.names` makes the owner is
in the registry; when the owner goes, the next in line enters it with its endpoints.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

from lb.model import Model, ModelValidationError
from lb.registry import Endpoint, Registry
from lb_operator.kube.engines import MODEL_PORT
from lb_operator.kube.names import CONFLICT_REASON, NameOwners
from lb_operator.kube.pods import ADAPTER_LABEL_PREFIX, MODEL_LABEL, PORT_ANNOTATION, Pod, is_ready
from lb_operator.kube.watch import Informer, Obj
from lb_operator.system_config import SystemConfig

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, model name)
POD_IP_ANNOTATION = "kvgate.dev/model-pod-ip"  # on a Model: send its traffic elsewhere (tests)
POD_PORT_ANNOTATION = "kvgate.dev/model-pod-port"


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


def invalid_reason(obj: Obj) -> str | None:
    """The message of a ``Valid=False`` condition computed for the Model's current generation
    (a name conflict aside: the owner of the name is served, whatever its rivals' status)."""
    meta = obj.get("metadata") or {}
    for found in (obj.get("status") or {}).get("conditions") or ():
        if found.get("type") != "Valid" or found.get("status") != "False":
            continue
        if found.get("reason") == CONFLICT_REASON:
            return None
        observed = found.get("observedGeneration")
        if observed is None or observed == meta.get("generation"):
            return found.get("message") or found.get("reason") or "invalid"
    return None


class EndpointSync:
    """Keeps the registry in step with the informers; ``owners`` settles which Model a name
    claimed in several namespaces stands for."""

    def __init__(self, registry: Registry, config: SystemConfig, owners: NameOwners) -> None:
        self.registry = registry
        self.config = config
        self.owners = owners
        self._models: dict[Key, Model] = {}  # valid Models, owners or not
        self._invalid: dict[Key, str] = {}  # Models that cannot run -> why
        self._pods: dict[Key, dict[str, Pod]] = {}  # model -> pod name -> pod
        self._served: dict[str, Key] = {}  # model name -> the Model in the registry
        self._published: dict[Key, list[Endpoint]] = {}

    def attach(self, model_informers: Iterable[Informer], pod_informers: Iterable[Informer]) -> None:
        for informer in model_informers:
            informer.add_handler(self.on_model)
        for informer in pod_informers:
            informer.add_handler(self.on_pod)

    def on_model(self, etype: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", "default"), meta.get("name", ""))
        self._models.pop(key, None)
        self._invalid.pop(key, None)
        if etype != "DELETED":
            try:
                model = Model.from_dict(obj)
            except ModelValidationError as exc:
                log.warning("model %s/%s: invalid, not served: %s", *key, exc)
                self._invalid[key] = str(exc)
            else:
                reason = invalid_reason(obj)
                if reason is None:
                    self._models[key] = model
                else:
                    self._invalid[key] = reason
        self._settle(key[1])

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
        if self._served.get(model) == key:
            self._publish(key)

    def _serving(self, name: str) -> Key | None:
        """The Model to serve under that name: its owner, if the owner's spec is valid. While
        every Model of the name is being deleted, the one served so far stays until it is gone
        (its Pods are stopping; nobody else wants the name)."""
        namespace = self.owners.owner(name)
        key = (namespace, name) if namespace is not None else self._served.get(name)
        return key if key in self._models else None

    def _settle(self, name: str) -> None:
        """Put the name's owner (and only it) in the registry, with its endpoints."""
        key, served = self._serving(name), self._served.get(name)
        if served is not None and served != key:
            del self._served[name]
            self._published.pop(served, None)
            if key is None:
                self.registry.set_endpoints(name, [])
                self.registry.delete_model(name)
        if key is not None:
            self._served[name] = key
            self.registry.set_model(self._models[key])
            self._publish(key)
        owner = self.owners.owner(name)
        self.registry.set_unavailable(name, None if owner is None or key is not None
                                      else self._invalid.get((owner, name)))

    def _publish(self, key: Key) -> None:
        model = self._models[key]
        pods = list(self._pods.get(key, {}).values())
        endpoints = endpoints_from_pods(pods, address_override=address_override(model, self.config))
        if self._published.get(key) == endpoints:
            return
        self._published[key] = endpoints
        self.registry.set_endpoints(model.name, endpoints)
