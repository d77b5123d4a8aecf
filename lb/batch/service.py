"""One gateway process's Files and Batches API: its routes, its store, its runner and its
sweeper of expired files."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lb.batch.api import BatchApi
from lb.batch.config import BatchConfig
from lb.batch.expiry import Sweeper
from lb.loopback import App
from lb.batch.runner import BatchRunner
from lb.batch.store import SqliteStore
from lb.admission import Admission


class Batches:
    """The API's routes now; the store and the runner from ``start`` (the gateway's lifespan)
    until ``stop``. Off when no state directory is configured. With API keys (``admission``),
    the routes need a key and a batch's lines run under the key that created it."""

    def __init__(self, config: BatchConfig, app: App, admission: Admission | None = None) -> None:
        self.config = config
        self._admission = admission
        self.api = BatchApi(None, config, None if admission is None else self._authenticate)
        self._app = app
        self._store: SqliteStore | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return bool(self.config.state_dir)

    async def start(self) -> None:
        if not self.enabled:
            return
        self._store = await SqliteStore(Path(self.config.state_dir),
                                        self.config.journal_mode).open()
        self.api.store = self._store
        runner = BatchRunner(self._store, self._app, self.config,
                             None if self._admission is None else self._admission.store.tenant_named)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(runner.run()),
                       loop.create_task(Sweeper(self._store, self.config).run())]

    def _authenticate(self, headers: list[tuple[bytes, bytes]]) -> str:
        assert self._admission is not None
        return self._admission.authenticate(headers).name

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.api.store = None
        if self._store is not None:
            await self._store.close()
            self._store = None
