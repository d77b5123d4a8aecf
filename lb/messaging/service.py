"""One gateway process's messengers: one per configured stream, from the gateway's start (its
lifespan) until it stops. With API keys on, a stream's requests run under the key it names."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from lb.admission import Admission
from lb.loopback import App
from lb.messaging.config import MessagingConfig
from lb.messaging.messenger import Messenger
from lb.messaging.metrics import MessagingMetrics


class Messaging:
    def __init__(self, config: MessagingConfig, app: App, admission: Admission | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self._admission = admission
        metrics = MessagingMetrics(registry) if config.streams else None
        self.messengers = [Messenger(stream, app, config.error_max_backoff_seconds,
                                     None if admission is None else admission.store.tenant_named, metrics)
                           for stream in config.streams]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(m.run()) for m in self.messengers]


    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
