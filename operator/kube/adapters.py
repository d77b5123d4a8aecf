"""LoRA adapters in cluster mode: `adapters.AdapterSync` on each Model's ready Pods, off the queue.

Fetching an adapter through a Pod's loader sidecar can take minutes, so the reconcile hook never
waits for it: it only keeps the latest (Model, Pods) a reconcile saw for a model and marks that
model for its worker (`adapters.SyncWorkers`), which syncs with the newest snapshot. The loaded
set goes to the Pods' labels (`PodRecorder`); the Pod informers then rebuild the endpoints on
every gateway replica, which routes `<model>_<adapter>` only to replicas that have it. A pass
with errors (a fetch, a server refusing a load) is retried after a growing delay while the Model
exists: its deletion (seen by the Model informers) ends the worker.

Leader only: `run` is a leader task; it owns the HTTP session, and cancelling it (leadership
lost) cancels every worker. Models marked meanwhile are synced once it runs again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any, Iterable, Mapping, Sequence

import aiohttp

from lb.model import Adapter, Model, parse_model_url
from lb_operator.adapters import AdapterSync, Replica, SyncResult, SyncWorkers
from lb_operator.kube.client import MERGE_PATCH, KubeApi
from lb_operator.kube.endpoints import pod_endpoint
from lb_operator.kube.events import EventRecorder
from lb_operator.kube.pods import ADAPTER_LABEL_PREFIX
from lb_operator.kube.reconciler import ReconcileContext
from lb_operator.kube.watch import Informer, Obj
from lb_operator.loader import LOADER_PORT_ANNOTATION, FetchError
from lb_operator.retry import Backoff

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, Model name)
ADAPTERS_ANNOTATION = "kvgate.dev/adapters"  # JSON {name: url} of the adapters loaded on a Pod


class ClusterAdapters:
    """`hook` goes to the reconciler, `run` to the leader tasks (see the module docstring).

    `model_informers` tell whether a Model still exists; their DELETED events stop its worker."""

    def __init__(self, api: KubeApi, model_informers: Iterable[Informer], *,
                 retry: Backoff = Backoff(initial=1.0, maximum=30.0), timeout: float = 60.0,
                 events: EventRecorder | None = None) -> None:
        self.api = api
        self.events = events or EventRecorder(api)
        self.model_informers = list(model_informers)
        self.timeout = timeout
        self.passes = 0  # completed sync passes (tests and debugging)
        self.workers: SyncWorkers[Key] = SyncWorkers(self._sync_model, retry=retry,
                                                     name="cluster-adapters")
        self._sync: AdapterSync | None = None
        self._latest: dict[Key, tuple[Model, list[Replica]]] = {}
        for informer in self.model_informers:
            informer.add_handler(self._on_model)

    async def hook(self, ctx: ReconcileContext) -> None:
        """After a reconcile: remember what its replicas should have; never blocks the queue."""
        replicas = replicas_from_pods(ctx.pods)
        if not ctx.model.spec.adapters and not any(r.loaded for r in replicas):
            return  # nothing wanted, nothing recorded as loaded: nothing to do
        key = (ctx.model.namespace, ctx.model.name)
        self._latest[key] = (ctx.model, replicas)
        self.workers.mark(key)

    async def run(self) -> None:
        """While leading: serve workers with one HTTP session; cancel them all on the way out."""
        async with aiohttp.ClientSession() as session:
            self._sync = AdapterSync(session, SidecarFetcher(session), PodRecorder(self.api),
                                     timeout=self.timeout)
            self.workers.start()
            try:
                await asyncio.Event().wait()
            finally:
                await self.workers.stop()
                self._sync = None

    def _on_model(self, etype: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        if etype == "DELETED" or meta.get("deletionTimestamp"):
            key = (meta.get("namespace", "default"), meta.get("name", ""))
            if self._latest.pop(key, None) is not None:
                self.workers.mark(key)  # a worker waiting to retry ends at once

    def _exists(self, key: Key) -> bool:
        """Known to the watch and not being deleted (a reconcile may have raced the deletion)."""
        for informer in self.model_informers:
            obj = informer.items.get(f"{key[0]}/{key[1]}")
            if obj is not None:
                return not (obj.get("metadata") or {}).get("deletionTimestamp")
        return False

    async def _sync_model(self, key: Key) -> bool:
        """One pass over the latest snapshot; True when done (all synced, or the Model is gone)."""
        snapshot, sync = self._latest.get(key), self._sync
        if snapshot is None or sync is None:
            return True
        if not self._exists(key):
            log.info("model %s/%s: gone; its adapters are no longer synced", *key)
            self._latest.pop(key, None)
            return True
        results = await sync.sync(*snapshot)
        self.passes += 1
        await self._report(key, results)
        return all(result.ok for result in results)

    async def _report(self, key: Key, results: Sequence[SyncResult]) -> None:
        """Events on the Model: each adapter newly loaded on a replica, each failure (the rate
        limit and aggregation of `EventRecorder` keep a retried failure from flooding)."""
        obj = self._object(key)
        if obj is None:
            return
        for result in results:
            for name in sorted(result.loaded.keys() - result.replica.loaded.keys()):
                await self.events.record(obj, "Normal", "AdapterLoaded",
                                         f"adapter {name} loaded on {result.replica.key}")
            for error in result.errors:
                await self.events.record(obj, "Warning", "AdapterFailed",
                                         f"{result.replica.key}: {error}")

    def _object(self, key: Key) -> Obj | None:
        for informer in self.model_informers:
            obj = informer.items.get(f"{key[0]}/{key[1]}")
            if obj is not None:
                return obj
        return None


# ---------------------------------------------------------------------------------------------
# Adapters on Pods: fetched by the loader sidecar, recorded as labels


def direct_path(url: str) -> str:
    """The `lora_path` of an adapter the server reads itself: a hub id (vLLM downloads it) or a path."""
    parsed = parse_model_url(url)
    if parsed.scheme == "hf":
        return parsed.ref
    if parsed.scheme == "file":
        return "/" + parsed.ref.lstrip("/")
    raise FetchError(f"{url}: {parsed.scheme}:// adapters need an adapter loader")


class SidecarFetcher:
    """Cluster: ask the Pod's adapter-loader sidecar to fetch into the volume it shares with the
    server. A replica without a sidecar gets the direct path (hf:// ids, file:// paths)."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float = 1800.0) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def __call__(self, replica: Replica, adapter: Adapter) -> str:
        if replica.loader is None:
            return direct_path(adapter.url)
        url = f"http://{replica.loader}/fetch"
        async with self.session.post(url, json={"name": adapter.name, "url": adapter.url},
                                     timeout=self.timeout) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise FetchError(f"{adapter.name}: loader answered {response.status}: {body.get('error')}")
            return str(body["path"])


def url_label_value(url: str) -> str:
    """Label values are short and restricted; a hash of the URL still tells URLs apart (as KubeAI does)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def pod_adapters_patch(labels: Mapping[str, str], loaded: Mapping[str, str]) -> dict[str, Any]:
    """A merge patch setting one label per loaded adapter, removing stale ones, and the URL annotation."""
    new = {f"{ADAPTER_LABEL_PREFIX}{name}": url_label_value(url) for name, url in loaded.items()}
    stale = {key: None for key in labels if key.startswith(ADAPTER_LABEL_PREFIX) and key not in new}
    annotation = json.dumps(dict(sorted(loaded.items())), separators=(",", ":"))
    return {"metadata": {"labels": {**stale, **new}, "annotations": {ADAPTERS_ANNOTATION: annotation}}}


def recorded_adapters(pod: Mapping[str, Any]) -> dict[str, str]:
    """{name: url} from a Pod's annotation, keeping only names that also have their label."""
    meta = pod.get("metadata") or {}
    try:
        recorded = json.loads((meta.get("annotations") or {}).get(ADAPTERS_ANNOTATION) or "{}")
    except ValueError:
        return {}
    labels = meta.get("labels") or {}
    return {name: url for name, url in recorded.items()
            if isinstance(url, str) and labels.get(f"{ADAPTER_LABEL_PREFIX}{name}") == url_label_value(url)}


def replica_from_pod(pod: Mapping[str, Any]) -> Replica | None:
    """The Replica of a ready Pod with an IP, or None; key and address as its endpoint's."""
    endpoint = pod_endpoint(pod)
    if endpoint is None:
        return None
    key, address = endpoint
    ip = pod["status"]["podIP"]
    loader_port = ((pod.get("metadata") or {}).get("annotations") or {}).get(LOADER_PORT_ANNOTATION)
    return Replica(key, address, recorded_adapters(pod), f"{ip}:{loader_port}" if loader_port else None)


def replicas_from_pods(pods: Sequence[Mapping[str, Any]]) -> list[Replica]:
    return [r for r in map(replica_from_pod, pods) if r is not None]


class PodRecorder:
    """Cluster runtime: patch the Pod (labels for routing, annotation for URL changes).

    The patch triggers a Pod MODIFIED event, so the watch
    loop rebuilds the model's endpoints with the new adapter set.
    """

    def __init__(self, api: KubeApi) -> None:
        self.core = api.core

    async def __call__(self, replica: Replica, loaded: dict[str, str]) -> None:
        namespace, _, name = replica.key.partition("/")
        pod = await self.core.read_namespaced_pod(name, namespace)
        labels = pod.metadata.labels or {}
        await self.core.patch_namespaced_pod(name, namespace, pod_adapters_patch(labels, loaded),
                                             _content_type=MERGE_PATCH)
