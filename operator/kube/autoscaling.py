"""The autoscaler's seams in cluster mode: which Models, which gateways, where replicas go.

`lb_operator.autoscaler.Autoscaler` is runtime-agnostic; here it gets
- the Models of this replica's Model informers (the watch cache: no API call per tick);
- the gateway replicas to scrape: the Ready Pods matching a label selector (the chart's pod
  labels) in the operator's namespace, at `podIP:<the container port named "metrics">`. Outside a
  cluster, where no gateway Pod matches, this process's own metrics are read in-process;
- `set_replicas` through the scale subresource of the Model that owns the name (`ScaleWriter`);
- its state in a ConfigMap (`ConfigMapStateStore`), so the next leader continues from it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping

from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, generate_latest

from lb.model import GROUP, PLURAL, VERSION, Model, ModelValidationError
from lb_operator.autoscaler import Target
from lb_operator.kube.client import MERGE_PATCH, KubeApi, or_none
from lb_operator.kube.names import NameOwners
from lb_operator.kube.pods import is_ready

log = logging.getLogger(__name__)

DEFAULT_GATEWAY_SELECTOR = "app.kubernetes.io/name=kvgate"
METRICS_PORT_NAME = "metrics"
STATE_KEY = "state.json"  # the state's key in its ConfigMap


def watched_models(owners: NameOwners) -> Callable[[], list[Model]]:
    """A `models` source: every valid Model the informers hold that owns its name (see
    `lb_operator.kube.names`; a Model being deleted owns nothing)."""

    def models() -> list[Model]:
        found = []
        for namespace, informer in owners.informers.items():
            for obj in list(informer.items.values()):
                if not owners.owns(namespace, (obj.get("metadata") or {}).get("name", "")):
                    continue
                try:
                    found.append(Model.from_dict(obj))
                except ModelValidationError:
                    continue  # the reconciler reports it in the Model's status
        return found

    return models


def metrics_address(pod: Mapping[str, Any], fallback_port: int | None = None) -> str | None:
    """`podIP:port` of a Ready gateway Pod's metrics port (the named container port), or None."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip or not is_ready(pod) or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    for container in (pod.get("spec") or {}).get("containers") or ():
        for port in container.get("ports") or ():
            if port.get("name") == METRICS_PORT_NAME and port.get("containerPort"):
                return f"{ip}:{port['containerPort']}"
    return f"{ip}:{fallback_port}" if fallback_port else None


class GatewayTargets:
    """A `gateways` source: the metrics addresses of the gateway replicas, listed on every tick
    (a replica that joined or left counts from the next tick)."""

    def __init__(self, api: KubeApi, namespace: str, selector: str, *,
                 fallback_port: int | None = None, local: CollectorRegistry | None = None) -> None:
        self.api = api
        self.namespace = namespace
        self.selector = selector
        self.fallback_port = fallback_port
        self.local = local
        self._warned = False

    async def __call__(self) -> list[Target]:
        listed = await self.api.list_pods(self.namespace, label_selector=self.selector)
        found = [a for a in (metrics_address(p, self.fallback_port) for p in listed.get("items") or ())
                 if a is not None]
        if found or self.local is None:
            return list(found)
        if not self._warned:
            log.warning("autoscaler: no Ready gateway Pod matches %r in %s; reading this process's "
                        "metrics only", self.selector, self.namespace)
            self._warned = True
        registry = self.local
        return [lambda: generate_latest(registry)]


class ScaleWriter:
    """`set_replicas` for one namespace: a merge patch of the Model's scale subresource, so it
    needs only `models/scale` rights and never races the rest of the spec."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self.custom = api.custom
        self.namespace = namespace

    async def __call__(self, name: str, replicas: int) -> None:
        await self.custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH)


class ScaleByName:
    """`set_replicas(name, n)`: the scale subresource of the Model that owns the name (Model
    names are unique per namespace; across namespaces `owners` says whose it is)."""

    def __init__(self, api: KubeApi, owners: NameOwners) -> None:
        self.owners = owners
        self.writers = {ns: ScaleWriter(api, ns) for ns in owners.namespaces}

    async def __call__(self, name: str, replicas: int) -> None:
        namespace = self.owners.owner(name)
        if namespace is None:
            raise LookupError(f"model {name} is not watched")
        await self.writers[namespace](name, replicas)


class ConfigMapStateStore:
    """The state in a ConfigMap (KubeAI keeps it the same way), created on first save."""

    def __init__(self, api: KubeApi, namespace: str, name: str) -> None:
        self.core = api.core
        self.namespace, self.name = namespace, name

    async def load(self) -> dict[str, Any] | None:
        config_map = await or_none(self.core.read_namespaced_config_map(self.name, self.namespace))
        if config_map is None:
            return None
        text = (config_map.data or {}).get(STATE_KEY)
        return json.loads(text) if text else None

    async def save(self, state: Mapping[str, Any]) -> None:
        data = {"data": {STATE_KEY: json.dumps(state, sort_keys=True)}}
        try:
            await self.core.patch_namespaced_config_map(self.name, self.namespace, data,
                                                        _content_type=MERGE_PATCH)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": self.name, "namespace": self.namespace}, **data}
            await self.core.create_namespaced_config_map(self.namespace, body)
