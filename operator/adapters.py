"""LoRA adapters on live replicas: make each ready replica's loaded set match the Model's spec.

Runtime-agnostic: a replica is a key and an address, fetching adapter files is a `Fetcher`, and
the loaded set is handed to a `Recorder`. The cluster runtime records it as Pod labels
`adapter.kvgate.dev/<name>` (what `plan.adapters_of` reads for routing) plus an annotation with
the URLs; the local runtime keeps it in memory (`MemoryRecorder`).

One pass over a replica (`AdapterSync.sync_replica`):
1. ask the server which adapters it really has (`GET /v1/models`, LoRA cards have a `parent`),
   so a restarted server that lost its adapters gets them back although the labels say loaded;
2. unload adapters gone from the spec, and adapters whose URL changed (known from the record);
3. fetch and load the missing ones; vLLM's "already loaded" and "cannot be found" answers are
   success, so a pass can be repeated at any time;
4. record the set that is loaded now, if it changed.
A replica that fails is reported in its `SyncResult` and never stops the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

import aiohttp

from lb.model import ADAPTER_ENGINES, Adapter, Model, parse_model_url

from lb_operator.loader import LOADER_PORT_ANNOTATION, AdapterStore, FetchError
from lb_operator.engines import MODEL_PORT
from lb_operator.plan import is_ready
from lb_operator.podspec import ADAPTER_LABEL_PREFIX, PORT_ANNOTATION

log = logging.getLogger("lb_operator.adapters")

ADAPTERS_ANNOTATION = "kvgate.dev/adapters"  # JSON {name: url} of the adapters loaded on a Pod


@dataclass(frozen=True, slots=True)
class Replica:
    """A ready model server: `loaded` is what was last recorded for it ({name: url});
    `loader` is the host:port of its adapter-loader sidecar, if it has one."""

    key: str
    address: str
    loaded: Mapping[str, str] = field(default_factory=dict)
    loader: str | None = None


@dataclass(slots=True)
class SyncResult:
    replica: Replica
    loaded: dict[str, str]  # adapters loaded on the replica after this pass: {name: url}
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def changed(self) -> bool:
        return self.loaded != dict(self.replica.loaded)


class Fetcher(Protocol):
    async def __call__(self, replica: Replica, adapter: Adapter) -> str:
        """Make the adapter's files readable by the replica's server; return the `lora_path`."""
        ...


Recorder = Callable[[Replica, dict[str, str]], Awaitable[None]]


class AdapterError(RuntimeError):
    """A model server refused an adapter call; the message carries its answer."""


# ---------------------------------------------------------------------------------------------
# Fetchers


def direct_path(url: str) -> str:
    """The `lora_path` of an adapter the server reads itself: a hub id (vLLM downloads it) or a path."""
    parsed = parse_model_url(url)
    if parsed.scheme == "hf":
        return parsed.ref
    if parsed.scheme == "file":
        return "/" + parsed.ref.lstrip("/")
    raise FetchError(f"{url}: {parsed.scheme}:// adapters need an adapter loader")


class StoreFetcher:
    """Local runtime: download into a directory on this machine (servers here read the same disk)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    async def __call__(self, replica: Replica, adapter: Adapter) -> str:
        return await self.store.fetch(adapter.name, adapter.url)


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


# ---------------------------------------------------------------------------------------------
# The sync


class AdapterSync:
    """Brings replicas' loaded adapters in line with a Model; see the module docstring."""

    def __init__(self, session: aiohttp.ClientSession, fetcher: Fetcher, record: Recorder, *,
                 timeout: float = 60.0) -> None:
        self.session = session
        self.fetcher = fetcher
        self.record = record
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    async def sync(self, model: Model, replicas: Sequence[Replica]) -> list[SyncResult]:
        """Sync every replica concurrently; one result per replica, in order."""
        return list(await asyncio.gather(*(self.sync_replica(model, r) for r in replicas)))

    async def sync_replica(self, model: Model, replica: Replica) -> SyncResult:
        if model.spec.engine not in ADAPTER_ENGINES or (not model.spec.adapters and not replica.loaded):
            return SyncResult(replica, dict(replica.loaded))
        lock = self._locks.get(replica.key)
        if lock is None:
            lock = self._locks[replica.key] = asyncio.Lock()
        async with lock:
            result = await self._sync(model, replica)
        if result.changed:
            try:
                await self.record(replica, result.loaded)
            except Exception as exc:  # the next pass records again: the server state is the truth
                result.errors.append(f"recording the loaded adapters failed: {exc}")
        for error in result.errors:
            log.warning("adapters of %s on %s: %s", model.name, replica.key, error)
        return result

    async def _sync(self, model: Model, replica: Replica) -> SyncResult:
        try:
            present = await self.server_adapters(replica.address, model.name)
        except (aiohttp.ClientError, asyncio.TimeoutError, AdapterError) as exc:
            return SyncResult(replica, dict(replica.loaded), [f"listing adapters failed: {exc!r}"])
        wanted = {a.name: a for a in model.spec.adapters}
        # Trusted as loaded: on the server now, and recorded with the URL the spec still has.
        loaded = {name: url for name, url in replica.loaded.items()
                  if name in present and name in wanted and wanted[name].url == url}
        result = SyncResult(replica, loaded)
        for name in sorted(present - loaded.keys()):
            await self._step(result, f"unloading {name}", self.unload(replica.address, name))
        for name, adapter in wanted.items():
            if name not in loaded and await self._step(result, f"loading {name}",
                                                       self._load(replica, adapter)):
                loaded[name] = adapter.url
        return result

    async def _step(self, result: SyncResult, what: str, call: Awaitable[None]) -> bool:
        try:
            await call
        except (aiohttp.ClientError, asyncio.TimeoutError, AdapterError, FetchError) as exc:
            result.errors.append(f"{what} failed: {exc!r}")
            return False
        return True

    async def _load(self, replica: Replica, adapter: Adapter) -> None:
        path = await self.fetcher(replica, adapter)
        await self.load(replica.address, adapter.name, path)

    # -- the model server's LoRA API (vLLM's, also served by the simulator) --------------------

    async def server_adapters(self, address: str, model: str) -> set[str]:
        """Names of the LoRA adapters a server has loaded: /v1/models cards with a parent."""
        async with self.session.get(f"http://{address}/v1/models", timeout=self.timeout) as response:
            if response.status != 200:
                raise AdapterError(f"/v1/models answered {response.status}")
            body = await response.json(content_type=None)
        return {card["id"] for card in body.get("data", ()) if card.get("parent") and card.get("id") != model}

    async def load(self, address: str, name: str, path: str) -> None:
        """Load one adapter; vLLM's 400 "has already been loaded" means it is there: success."""
        status, text = await self._post(address, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status != 200 and not (status == 400 and "already been loaded" in text):
            raise AdapterError(f"load answered {status}: {text[:300]}")

    async def unload(self, address: str, name: str) -> None:
        """Unload one adapter; 404 (not loaded) is what we wanted anyway."""
        status, text = await self._post(address, "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):
            raise AdapterError(f"unload answered {status}: {text[:300]}")

    async def _post(self, address: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
        async with self.session.post(f"http://{address}{path}", json=body, timeout=self.timeout) as response:
            return response.status, await response.text()


# ---------------------------------------------------------------------------------------------
# Recording: in memory (local runtime) and on Pods (cluster runtime)


class MemoryRecorder:
    """The local runtime's record: {replica key: {name: url}}, read back when building endpoints."""

    def __init__(self) -> None:
        self.loaded: dict[str, dict[str, str]] = {}

    async def __call__(self, replica: Replica, loaded: dict[str, str]) -> None:
        self.loaded[replica.key] = dict(loaded)

    def get(self, key: str) -> dict[str, str]:
        return dict(self.loaded.get(key, {}))

    def forget(self, key: str) -> None:
        self.loaded.pop(key, None)


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
    """The Replica of a ready Pod with an IP, or None; key and address as `plan.endpoints_from_pods`."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    ip = (pod.get("status") or {}).get("podIP")
    if not is_ready(pod) or not ip:
        return None
    port = annotations.get(PORT_ANNOTATION) or str(MODEL_PORT)
    loader_port = annotations.get(LOADER_PORT_ANNOTATION)
    return Replica(f"{meta.get('namespace', 'default')}/{meta.get('name', '')}", f"{ip}:{port}",
                   recorded_adapters(pod), f"{ip}:{loader_port}" if loader_port else None)


def replicas_from_pods(pods: Sequence[Mapping[str, Any]]) -> list[Replica]:
    return [r for r in map(replica_from_pod, pods) if r is not None]


class PodRecorder:
    """Cluster runtime: patch the Pod (labels for routing, annotation for URL changes).

    `api` is a kubernetes_asyncio ApiClient; the patch triggers a Pod MODIFIED event, so the watch
    loop rebuilds the model's endpoints with the new adapter set.
    """

    def __init__(self, api: Any) -> None:
        from kubernetes_asyncio.client import CoreV1Api

        self.core = CoreV1Api(api)

    async def __call__(self, replica: Replica, loaded: dict[str, str]) -> None:
        namespace, _, name = replica.key.partition("/")
        pod = await self.core.read_namespaced_pod(name, namespace)
        labels = pod.metadata.labels or {}
        await self.core.patch_namespaced_pod(name, namespace, pod_adapters_patch(labels, loaded),
                                             _content_type="application/merge-patch+json")
