"""LoRA adapters on live replicas: make each ready replica's loaded set match the Model's spec.

Runtime-agnostic: a replica is a key and an address, fetching adapter files is a `Fetcher`, and
the loaded set is handed to a `Recorder`. The cluster runtime records it on Pods
(`kube.adapters.PodRecorder`); the local runtime keeps it in memory (`MemoryRecorder`). Both
drive the sync with `SyncWorkers`, one worker per model.

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
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Hashable, Mapping, Protocol, Sequence, TypeVar

import aiohttp

from lb.model import ADAPTER_ENGINES, Adapter, Model

from lb_operator.loader import AdapterStore, FetchError
from lb_operator.retry import Backoff, wait_until_set

log = logging.getLogger("lb_operator.adapters")

K = TypeVar("K", bound=Hashable)


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
# Fetchers (the cluster's SidecarFetcher is in kube.adapters)


class StoreFetcher:
    """Download into a directory on this machine, for servers that read the same disk (the local
    runtime's fetcher for every scheme but file://, whose paths it hands over as they are)."""

    def __init__(self, store: AdapterStore) -> None:
        self.store = store

    async def __call__(self, replica: Replica, adapter: Adapter) -> str:
        return await self.store.fetch(adapter.name, adapter.url)


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
        # Trusted as loaded: on the server now, wanted, and not recorded with another URL. A
        # missing record is trusted too: the Pod this pass sees may predate the last pass's label
        # patch, and unloading then would fail requests the gateway already routes there.
        loaded = {name: wanted[name].url for name in present & wanted.keys()
                  if replica.loaded.get(name, wanted[name].url) == wanted[name].url}
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
# Recording in memory (the local runtime; the cluster's PodRecorder is in kube.adapters)


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


# ---------------------------------------------------------------------------------------------
# Driving the sync: one worker per model, in both runtimes


class SyncWorkers(Generic[K]):
    """One task per key running `work(key)` (a sync pass: True when nothing failed), level-triggered.

    `mark(key)` says "look at this key again": a pass started for an older spec is always
    followed by one that sees the newer one, and a worker waiting out a failure's backoff starts
    at once. A failed pass is retried after a growing delay; a pass that finds nothing to do (the
    model is gone) returns True, which ends the worker. Workers run only between `start()` and
    `stop()`; keys marked meanwhile, or cut off mid-pass by `stop()`, are picked up by the next
    `start()` (the cluster's leadership terms).
    """

    def __init__(self, work: Callable[[K], Awaitable[bool]], *, retry: Backoff, name: str) -> None:
        self.work = work
        self.retry = retry
        self.name = name
        self._dirty: set[K] = set()
        self._wake: dict[K, asyncio.Event] = {}
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._running = False

    @property
    def active(self) -> set[K]:
        """Keys whose worker is running (syncing or waiting to retry)."""
        return set(self._tasks)

    def mark(self, key: K) -> None:
        self._dirty.add(key)
        if key in self._wake:
            self._wake[key].set()
        self._start(key)

    def start(self) -> None:
        self._running = True
        for key in list(self._dirty):
            self._start(key)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()  # a task cancelled before it ran never reached its `finally`
        self._wake.clear()

    def _start(self, key: K) -> None:
        if self._running and key not in self._tasks:
            self._tasks[key] = asyncio.create_task(self._run(key), name=f"{self.name}-{key}")

    async def _run(self, key: K) -> None:
        wake, failures = self._wake.setdefault(key, asyncio.Event()), 0
        try:
            while key in self._dirty:
                self._dirty.discard(key)
                wake.clear()
                if await self._attempt(key):
                    failures = 0
                    continue
                failures += 1
                self._dirty.add(key)  # again after the delay (or after the next start())
                await wait_until_set(wake, self.retry.delay(failures))
        finally:
            # No await between the last check of `_dirty` and this: a mark arriving after it
            # starts a new worker instead of being lost.
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]
                del self._wake[key]

    async def _attempt(self, key: K) -> bool:
        try:
            return await self.work(key)
        except asyncio.CancelledError:
            self._dirty.add(key)  # stopped mid-pass: the next start() syncs it again
            raise
        except Exception:  # a bug must not end syncing for this key
            log.exception("%s %s: sync pass failed", self.name, key)
            return False
