"""Picking a replica for a request, and waiting for one when there is none.

A pick is a lease: the endpoint's in-flight count goes up at the pick and down exactly once
when the attempt ends, whatever way it ends. With no endpoint for the model (or none with the
adapter), the request enters the waiting room: it asks the Scaler for a replica, then sleeps on
the model's change event and re-evaluates on every endpoint change, until a replica appears,
its deadline passes, the model is deleted, or the client leaves (its task is cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from lb import cache_aware
from lb.cache_aware import PromptBlocks
from lb.config import WaitingRoomConfig
from lb.ejection import EjectionConfig, Outliers
from lb.errors import GatewayError, model_not_found
from lb.kv_events import KVIndex
from lb.metrics import GatewayMetrics
from lb.model import Model
from lb.registry import EndpointGroup, Registry
from lb.scaler import Scaler

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    """One attempt's hold on an endpoint. ``release`` is idempotent so every exit path may
    call it; ``succeeded``/``failed`` tell the endpoint's health record how the attempt went."""

    group: EndpointGroup  # the group the ticket was counted in (a rebuilt model has a new one)
    key: str
    address: str
    ticket: int
    weight: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.group.ring.release(self.ticket, self.weight)

    def succeeded(self) -> None:
        outliers = self.group.outliers
        if outliers is not None:
            outliers.succeeded(self.key)

    def failed(self, config: EjectionConfig) -> None:
        """A connect error, timeout or 5xx: may eject the endpoint (see ``lb.ejection``)."""
        group = self.group
        if group.outliers is None:
            group.outliers = Outliers(config)
        if group.outliers.failed(self.key, len(group.endpoints)):
            log.warning("replica %s ejected after %d failed attempts in a row", self.key,
                        config.consecutive_failures)


class Balancer:
    def __init__(self, registry: Registry, scaler: Scaler, config: WaitingRoomConfig,
                 metrics: GatewayMetrics, engine_stale_after: float = 10.0,
                 kv_index: KVIndex | None = None) -> None:
        self._registry = registry
        self._kv_index = kv_index  # the replicas' KV-event mirrors, for CacheAware
        self._scaler = scaler
        self._config = config
        self._metrics = metrics
        self._stale_after = engine_stale_after
        self._turn = 0  # LeastQueue's tie-break rotation
        self._waiting: dict[str, int] = {}
        self._scaling: dict[str, asyncio.Task[None]] = {}

    def waiting(self, model: str) -> int:
        return self._waiting.get(model, 0)

    def try_acquire(self, model: Model, adapter: str, key: str, exclude: list[str],
                    weight: int = 1, prompt: PromptBlocks | None = None) -> Lease | None:
        """A lease on the best endpoint for this request (routing ``key``: its prompt prefix or
        session; ``weight``: 1, or its estimated tokens; ``prompt``: its blocks, for
        CacheAware), or None if there is none now.

        Synchronous so the common case costs no coroutine; ``wait`` is the slow path.
        """
        group = self._registry.group(model.name)
        ejected = group.outliers.current() if group.outliers is not None else None
        unhealthy = group.unhealthy  # failed active health checks; empty unless checks are on
        if ejected or unhealthy:
            skip = [*exclude, *(ejected or ()), *unhealthy]
            picked = self._pick(group, model, adapter, key, skip, weight, prompt)
            if picked is None and exclude:
                # A replica not tried yet, even ejected or unhealthy, before one tried already.
                picked = self._pick(group, model, adapter, key, exclude, weight, prompt)
        else:
            skip = exclude
            picked = self._pick(group, model, adapter, key, skip, weight, prompt)
        if picked is None and skip:
            # Every replica that could serve was tried already, ejected or unhealthy: go back
            # to one rather than wait for a replica that may never come.
            picked = self._pick(group, model, adapter, key, (), weight, prompt)
        if picked is None:
            return None
        ticket = group.ring.acquire(picked, weight)
        if prompt is not None:
            cache_aware.remember(group, model, picked, prompt)
        return Lease(group, picked, group.endpoints[picked].address, ticket, weight)

    async def wait(self, model: Model, adapter: str, key: str, exclude: list[str],
                   weight: int = 1, prompt: PromptBlocks | None = None) -> Lease:
        """Wait in the model's waiting room for an endpoint, then lease it."""
        name = model.name
        if self.waiting(name) >= self._config.max_waiting_per_model:
            self._metrics.waiting_room_rejected(name)
            retry_after = str(self._config.retry_after_seconds)
            raise GatewayError(429, f"Too many requests are waiting for model `{name}` to have "
                               "a ready replica; retry later.", code="waiting_room_full",
                               headers={"retry-after": retry_after})
        self._enter(name)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        deadline = started + self._config.timeout_seconds
        try:
            self._ask_scaler(name)
            while True:
                changed = self._registry.group(name).changed()
                current = self._registry.get_model(name)
                if current is None:
                    raise model_not_found(name)
                lease = self.try_acquire(current, adapter, key, exclude, weight, prompt)
                if lease is not None:
                    return lease
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _no_replica(name, adapter, self._config.timeout_seconds)
                # A bare future and one timer per waiter, not asyncio.timeout around
                # Event.wait (a Timeout object, a coroutine and two running-loop lookups
                # more): thousands of waiters wake together when a replica appears. The timer
                # resolves the future with False; a cancelled task (client gone) raises here.
                waiter = changed.wait(loop)
                timer = loop.call_later(remaining, _expire, waiter)
                try:
                    fired = await waiter
                finally:
                    timer.cancel()
                    changed.discard(waiter)
                if not fired:
                    raise _no_replica(name, adapter, self._config.timeout_seconds)
        finally:
            self._leave(name, time.monotonic() - started)

    def _enter(self, name: str) -> None:
        self._waiting[name] = self._waiting.get(name, 0) + 1
        self._metrics.waiting_changed(name, self._waiting[name])

    def _leave(self, name: str, waited: float) -> None:
        self._waiting[name] -= 1
        self._metrics.waiting_changed(name, self._waiting[name])
        self._metrics.waited(name, waited)

    def _ask_scaler(self, name: str) -> None:
        """One scale-up call in flight per model, however many requests wait."""
        if name in self._scaling:
            return
        task = asyncio.get_running_loop().create_task(self._scaler.ensure_replica(name))
        self._scaling[name] = task
        task.add_done_callback(lambda t: self._scaled(name, t))

    def _scaled(self, name: str, task: asyncio.Task[None]) -> None:
        self._scaling.pop(name, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("scaling model %s from zero failed: %s", name, task.exception())

    def _pick(self, group: EndpointGroup, model: Model, adapter: str, key: str,
              exclude: list[str] | tuple[()], weight: int,
              prompt: PromptBlocks | None) -> str | None:
        strategy = model.spec.load_balancing.strategy
        if strategy == "PrefixHash":
            return group.ring.pick(adapter + key, adapter, exclude, weight)
        if strategy == "CacheAware":
            return cache_aware.pick(group, model, adapter, key, exclude, weight, prompt,
                                    self._kv_index, time.monotonic() - self._stale_after)
        if strategy == "Random":
            return group.ring.pick_random(adapter, exclude)
        if strategy == "LeastQueue" and group.engine:
            self._turn += 1
            return _least_queue(group, adapter, exclude, time.monotonic() - self._stale_after,
                                self._turn)
        return group.ring.pick_least_load(adapter, exclude)


def _least_queue(group: EndpointGroup, adapter: str, exclude: list[str] | tuple[()],
                 fresh_after: float, turn: int) -> str | None:
    """LeastQueue: the fewest of (this gateway's in-flight requests + the engine's waiting
    queue + its KV usage as queued requests). The in-flight part is live, so requests between
    two scrapes do not all herd to the replica that looked emptiest; the engine's part sees
    load this gateway did not send. A replica without a fresh reading counts in-flight only.
    Ties go round-robin: the scan starts one replica further on each pick."""
    ring, readings = group.ring, group.engine
    keys = list(group.endpoints)
    start = turn % len(keys) if keys else 0
    best, best_score = None, 0.0
    for key in keys[start:] + keys[:start]:
        if key in exclude or (adapter and adapter not in group.endpoints[key].adapters):
            continue
        score = float(ring.load(key))
        reading = readings.get(key)
        if reading is not None and reading.read_at >= fresh_after:
            score += reading.queued
        if best is None or score < best_score:
            best, best_score = key, score
    return best


def _expire(waiter: asyncio.Future[bool]) -> None:
    """A waiter's deadline passed: wake it with False (unless the change came first)."""
    if not waiter.done():
        waiter.set_result(False)


def _no_replica(name: str, adapter: str, timeout: float) -> GatewayError:
    what = f"model `{name}` with adapter `{adapter}`" if adapter else f"model `{name}`"
    return GatewayError(503, f"No ready replica of {what} became available within "
                        f"{timeout:g}s.", code="no_replica_ready")
