"""The autoscaler's seams in cluster mode: which Models, which gateways, where replicas go.

`lb_operator.autoscaler.Autoscaler` is runtime-agnostic; here it gets
- the Models of this replica's Model informers (the watch cache: no API call per tick);
- the gateway replicas to scrape: the Ready Pods matching a label selector (the chart's pod
  labels) in the operator's namespace, at `podIP:<the container port named "metrics">`. Outside a
  cluster, where no gateway Pod matches, this process's own metrics are read in-process;
- `set_replicas` through the scale subresource of the Model's namespace (`ScaleWriter`);
- the engines' addresses (for `includeEngineWaiting`) from the gateway's registry.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, generate_latest

from lb.model import Model, ModelValidationError
from lb.registry import Registry
from lb_operator.autoscaler import ScaleWriter, Target
from lb_operator.kube_client import KubeApi
from lb_operator.plan import is_ready
from lb_operator.watch import Informer

log = logging.getLogger(__name__)

DEFAULT_GATEWAY_SELECTOR = "app.kubernetes.io/name=kvgate"
METRICS_PORT_NAME = "metrics"


def watched_models(informers: Iterable[Informer]) -> Callable[[], list[Model]]:
    """A `models` source: every valid Model the informers hold that is not being deleted."""
    informers = list(informers)

    def models() -> list[Model]:
        found = []
        for informer in informers:
            for obj in list(informer.items.values()):
                if (obj.get("metadata") or {}).get("deletionTimestamp"):
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


class ScaleByName:
    """`set_replicas(name, n)`: the scale subresource of the namespace the Model is watched in
    (Model names are unique across the managed namespaces, as for the gateway's registry)."""

    def __init__(self, api_client: Any, informers: Mapping[str, Informer]) -> None:
        self.informers = dict(informers)  # namespace -> its Model informer
        self.writers = {ns: ScaleWriter(api_client, ns) for ns in self.informers}

    async def __call__(self, name: str, replicas: int) -> None:
        for namespace, informer in self.informers.items():
            if f"{namespace}/{name}" in informer.items:
                await self.writers[namespace](name, replicas)
                return
        raise LookupError(f"model {name} is not watched")


def engine_addresses(registry: Registry) -> Callable[[str], list[str]]:
    """A model's ready server addresses, as the gateway routes to them."""

    def addresses(name: str) -> list[str]:
        group = registry.groups().get(name)
        return [] if group is None else [e.address for e in group.endpoints.values()]

    return addresses
