"""LoRA adapters on local replicas: `AdapterSync` (adapters.py) driven by the local runtime.

Level-triggered like the replica controllers: a replica turning ready, or a change of a Model in
the models file, only marks the model dirty; one worker per model then syncs every ready replica
against the Model as it is *now*, so a pass started for an older spec can never overwrite a newer
one. The loaded set of each replica goes to the registry (`runtime.set_adapters`), which is what
routes `<model>_<adapter>` requests only to replicas that have the adapter. A pass that failed
somewhere (a fetch, a server refusing a load) is retried after a backoff, while the model runs
(`adapters.SyncWorkers`, shared with the cluster runtime).

Where adapters come from, on one machine: `file://` paths are given to the server as they are
(relative ones are relative to the models file, like a model's own file:// url), so nothing is
copied; other schemes (hf://, s3://, gs://, oss://) are downloaded once into
`<stateDir>/adapters` by the same AdapterStore the cluster's loader sidecar uses.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable

from lb.model import Adapter, Model, parse_model_url

from lb_operator.adapters import AdapterSync, MemoryRecorder, Replica, StoreFetcher, SyncResult, SyncWorkers
from lb_operator.loader import AdapterStore, FetchError
from lb_operator.local.engines import local_path
from lb_operator.local.runtime import LocalRuntime, ReplicaView
from lb_operator.retry import Backoff


RETRY = Backoff(initial=5.0, maximum=60.0, jitter=False)  # after a pass with errors


class LocalAdapters:
    """Keeps each ready replica's adapters equal to its Model's `spec.adapters`."""

    def __init__(self, runtime: LocalRuntime, store_dir: Path, base_dir: Callable[[], Path]) -> None:
        self.runtime = runtime
        self.base_dir = base_dir  # the models file's directory, which may be re-read meanwhile
        self.download = StoreFetcher(AdapterStore(store_dir))
        self.recorder = MemoryRecorder()
        self.sync = AdapterSync(runtime.session, self.fetch, self.recorder)
        self.workers: SyncWorkers[str] = SyncWorkers(self._pass, retry=RETRY, name="local-adapters")
        self.workers.start()
        runtime.add_ready_hook(self._replica_ready)
        runtime.add_exit_hook(self._replica_exited)

    # -- triggers ------------------------------------------------------------------------------

    def model_changed(self, name: str) -> None:
        """The Model was added, changed or removed: bring its ready replicas in line (if any)."""
        self.workers.mark(name)

    async def _replica_ready(self, model: Model, view: ReplicaView) -> None:
        self.model_changed(view.model)

    def _replica_exited(self, view: ReplicaView) -> None:
        self.recorder.forget(view.key)

    # -- the work ------------------------------------------------------------------------------

    async def _pass(self, name: str) -> bool:
        """One sync of every ready replica against the current spec; False if anything failed."""
        model = self.runtime.model(name)
        if model is None:
            return True
        views = [v for v in self.runtime.replicas(name) if v.ready]
        results = await asyncio.gather(*(self._sync_one(model, v) for v in views))
        return all(result.ok for result in results)

    async def _sync_one(self, model: Model, view: ReplicaView) -> SyncResult:
        """Publish each replica's set as soon as it is known: a slow or stuck server must not
        keep the others' adapters from being routed to."""
        replica = Replica(view.key, view.address, self.recorder.get(view.key))
        result = await self.sync.sync_replica(model, replica)
        self.runtime.set_adapters(model.name, view.name, result.loaded)
        return result

    async def fetch(self, replica: Replica, adapter: Adapter) -> str:
        """The `lora_path` for a server on this machine (see the module docstring)."""
        url = parse_model_url(adapter.url)
        if url.scheme == "file":
            path = local_path(url.ref, self.base_dir())
            if not await asyncio.to_thread(os.path.exists, path):
                raise FetchError(f"{adapter.url}: {path} does not exist "
                                 "(a relative file:// url is relative to the models file)")
            return path
        return await self.download(replica, adapter)

    async def close(self) -> None:
        await self.workers.stop()
