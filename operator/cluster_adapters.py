"""LoRA adapters in cluster mode: `adapters.AdapterSync` on each Model's ready Pods, off the queue.

Fetching an adapter through a Pod's loader sidecar can take minutes, so the reconcile hook never
waits for it: it only keeps the latest (Model, Pods) a reconcile saw for a model and wakes that
model's worker. The worker syncs with the newest snapshot, again while newer ones arrive, so a pass
started for an older spec is always followed by one for the current spec. The loaded set goes to
the Pods' labels (`adapters.PodRecorder`); the Pod informers then rebuild the endpoints on every
gateway replica, which routes `<model>_<adapter>` only to replicas that have it. A pass with
errors (a fetch, a server refusing a load) is retried after a growing delay.

Leader only: `run` is a leader task; it owns the HTTP session, and cancelling it (leadership
lost) cancels every worker. Snapshots recorded meanwhile are kept and synced once it runs again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import aiohttp

from lb.model import Model
from lb_operator.adapters import AdapterSync, PodRecorder, Replica, SidecarFetcher, replicas_from_pods
from lb_operator.reconciler import ReconcileContext
from lb_operator.watch import Backoff

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, Model name)


class ClusterAdapters:
    """`hook` goes to the reconciler, `run` to the leader tasks (see the module docstring)."""

    def __init__(self, api_client: Any, *, retry: Backoff = Backoff(initial=1.0, maximum=30.0),
                 timeout: float = 60.0) -> None:
        self.api_client = api_client
        self.retry = retry
        self.timeout = timeout
        self.passes = 0  # completed sync passes (tests and debugging)
        self._sync: AdapterSync | None = None
        self._latest: dict[Key, tuple[Model, list[Replica]]] = {}
        self._wake: dict[Key, asyncio.Event] = {}
        self._workers: dict[Key, asyncio.Task[None]] = {}

    async def hook(self, ctx: ReconcileContext) -> None:
        """After a reconcile: remember what its replicas should have; never blocks the queue."""
        replicas = replicas_from_pods(ctx.pods)
        if not ctx.model.spec.adapters and not any(r.loaded for r in replicas):
            return  # nothing wanted, nothing recorded as loaded: nothing to do
        key = (ctx.model.namespace, ctx.model.name)
        self._latest[key] = (ctx.model, replicas)
        self._wake.setdefault(key, asyncio.Event()).set()
        self._start(key)

    async def run(self) -> None:
        """While leading: serve workers with one HTTP session; cancel them all on the way out."""
        async with aiohttp.ClientSession() as session:
            self._sync = AdapterSync(session, SidecarFetcher(session), PodRecorder(self.api_client),
                                     timeout=self.timeout)
            for key in list(self._latest):
                self._start(key)
            try:
                await asyncio.Event().wait()
            finally:
                self._sync = None
                workers = list(self._workers.values())
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                self._workers.clear()

    def _start(self, key: Key) -> None:
        if self._sync is not None and key not in self._workers:
            self._workers[key] = asyncio.create_task(self._worker(key, self._sync))

    async def _worker(self, key: Key, sync: AdapterSync) -> None:
        wake, failures = self._wake[key], 0
        try:
            while True:
                wake.clear()
                model, replicas = self._latest[key]
                failures = 0 if await self._pass(sync, model, replicas) else failures + 1
                if failures == 0 and not wake.is_set():
                    self._latest.pop(key, None)  # done: the next reconcile brings a new snapshot
                    return
                if failures:
                    await _wait(wake, self.retry.delay(failures))
        finally:
            if self._workers.get(key) is asyncio.current_task():
                del self._workers[key]

    async def _pass(self, sync: AdapterSync, model: Model, replicas: Sequence[Replica]) -> bool:
        results = await sync.sync(model, replicas)
        self.passes += 1
        return all(result.ok for result in results)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until the event is set or the time is up (asyncio.timeout: a cancel is never swallowed)."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pass
