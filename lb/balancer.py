"""Picking a replica for a request, and queueing it when no replica can take it.

A pick is a lease: the endpoint's in-flight count goes up at the pick and down exactly once
when the attempt ends, whatever way it ends. With no endpoint for the model (or none with the
adapter), or every one at the Model's ``replicaCapacity``, the request queues
(``lb.flow_queue``: by priority class, fair across tenants, with deadlines): it asks the Scaler
for a replica and is served when a replica is released, the endpoints change, or its deadline
passes, the model is deleted, or the client leaves (its task is cancelled).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from lb import cache_aware
from lb.cache_aware import PromptBlocks
from lb.ejection import EjectionConfig, Outliers
from lb.errors import GatewayError, model_not_found
from lb.flow_queue import (Count, ModelQueue, PriorityClass, QueueConfig, TICK_SECONDS, Waiter,
                           priority_class)
from lb.keys import Tenant
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
    queue: ModelQueue | None = None  # the model's queue, pumped when this replica frees up
    flow: Count | None = None  # the queue's in-flight count of the request's flow, if it queued
    paced_at: float = 0.0  # when a request of a paced class was sent (lb.pacing)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.group.ring.release(self.ticket, self.weight)
            if self.flow is not None:
                self.flow.dec()
            if self.paced_at:
                self.group.pacer.finished(self.key, time.monotonic() - self.paced_at)
            if self.queue is not None and self.queue.count:
                self.queue.pump(freed=True)

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
    def __init__(self, registry: Registry, scaler: Scaler, config: QueueConfig,
                 metrics: GatewayMetrics, engine_stale_after: float = 10.0,
                 kv_index: KVIndex | None = None) -> None:
        self._registry = registry
        self._kv_index = kv_index  # the replicas' KV-event mirrors, for CacheAware
        self._scaler = scaler
        self._config = config
        self._limited = config.limited  # some class may fill only a share of a replica
        self._metrics = metrics
        self._stale_after = engine_stale_after
        self._turn = 0  # LeastQueue's tie-break rotation
        self._queues: dict[str, ModelQueue] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._scaling: dict[str, asyncio.Task[None]] = {}

    def waiting(self, model: str) -> int:
        """Requests of ``model`` queued in this worker."""
        queue = self._queues.get(model)
        return queue.count if queue is not None else 0

    def limited_class(self, scope: dict[str, Any], tenant: Tenant | None) -> PriorityClass | None:
        """This request's priority class when the queue config holds some class to a share of
        each replica (then an unknown class header is a 400 here), else None: nothing to limit."""
        if not self._limited:
            return None
        return self._config.class_named(priority_class(
            self._config, scope, tenant.priority if tenant is not None else None))

    def engine_priority(self, scope: dict[str, Any], tenant: Tenant | None) -> int:
        """vLLM's ``priority`` for this request's class (lower is admitted first): minus the
        class's priority, for Models whose replicas schedule by priority."""
        cls = priority_class(self._config, scope, tenant.priority if tenant is not None else None)
        return -self._config.class_priority(cls)

    def try_acquire(self, model: Model, adapter: str, key: str, exclude: list[str],
                    weight: int = 1, prompt: PromptBlocks | None = None,
                    queued: bool = False, cls: PriorityClass | None = None) -> Lease | None:
        """A lease on the best endpoint for this request (routing ``key``: its prompt prefix or
        session; ``weight``: 1, or its estimated tokens; ``prompt``: its blocks, for
        CacheAware; ``cls``: its class, when one may fill only a share of a replica), or None if
        there is none now —
        or, for a newcomer (not ``queued``), while requests of a model with a
        ``replicaCapacity`` queue: it must not pass them.

        Synchronous so the common case costs no coroutine; ``wait`` is the slow path.
        """
        group = self._registry.group(model.name)
        capacity = model.spec.load_balancing.replica_capacity
        queue = None
        held: list[str] = []
        paced_at = 0.0  # a paced class's requests are spread over each replica's cycle
        if capacity:
            queue = self.queue(model.name)
            if not queued and queue.anywhere():
                return None
            if cls is not None and cls.capacity_share < 1:
                capacity = max(1, int(capacity * cls.capacity_share))
                if cls.paced:
                    paced_at = time.monotonic()
                    held = group.pacer.held(paced_at)
        ejected = group.outliers.current() if group.outliers is not None else None
        unhealthy = group.unhealthy  # failed active health checks; empty unless checks are on
        if capacity:
            def pick(*args: Any) -> str | None:
                return self._pick_capped(capacity, held, *args)
        else:
            pick = self._pick
        if ejected or unhealthy:
            skip = [*exclude, *(ejected or ()), *unhealthy]
            picked = pick(group, model, adapter, key, skip, weight, prompt)
            if picked is None and exclude:
                # A replica not tried yet, even ejected or unhealthy, before one tried already.
                picked = pick(group, model, adapter, key, exclude, weight, prompt)
        else:
            skip = exclude
            picked = pick(group, model, adapter, key, skip, weight, prompt)
        if picked is None and skip:
            # Every replica that could serve was tried already, ejected or unhealthy: go back
            # to one rather than wait for a replica that may never come.
            picked = pick(group, model, adapter, key, (), weight, prompt)
        if picked is None:
            return None
        ticket = group.ring.acquire(picked, weight)
        if prompt is not None:
            cache_aware.remember(group, model, picked, prompt)
        lease = Lease(group, picked, group.endpoints[picked].address, ticket, weight,
                      queue if queue is not None else self._queues.get(model.name))
        if paced_at:
            group.pacer.dispatched(picked, weight, capacity, paced_at)
            lease.paced_at = paced_at
        return lease

    def queue(self, name: str) -> ModelQueue:
        """The model's queue in this worker (made on first use, kept: its class counts are
        shared with the other workers)."""
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = ModelQueue(
                name, self._config, self._registry.loads,
                lambda waiter: self._serve_waiter(name, waiter))
            self._metrics.watch_queue(name, queue.counts)
        return queue

    async def wait(self, model: Model, adapter: str, key: str, exclude: list[str],
                   weight: int = 1, prompt: PromptBlocks | None = None,
                   scope: dict[str, Any] | None = None, tenant: Tenant | None = None) -> Lease:
        """Queue the request until a replica can take it, then lease that replica."""
        name = model.name
        cls = priority_class(self._config, scope or _NO_SCOPE,
                             tenant.priority if tenant is not None else None)
        queue = self.queue(name)
        loop = asyncio.get_running_loop()
        waiter = Waiter(loop.create_future(), tenant.name if tenant is not None else "",
                        adapter, key, exclude, weight, prompt)
        try:
            displaced = queue.enter(waiter, cls)
        except GatewayError:
            self._metrics.queue_rejected(name, cls, "full")
            raise
        if displaced is not None:
            assert displaced.band is not None
            self._metrics.queue_rejected(name, displaced.band.cls.name, "shed")
            if not displaced.future.done():
                displaced.future.set_exception(queue.full())
        timeout = self._config.timeout_of(queue.band_of(cls).cls)
        waiter.timer = loop.call_later(timeout, self._expire, queue, waiter, adapter, timeout)
        started = time.monotonic()
        try:
            self._ask_scaler(name)
            self._start_pump(name)
            queue.pump()  # room may be free already (a newcomer queued behind others)
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() \
                    and waiter.future.exception() is None:
                waiter.future.result().release()  # served as the client left
            raise
        finally:
            queue.leave(waiter)
            self._metrics.waited(name, time.monotonic() - started)

    def _serve_waiter(self, name: str, waiter: Waiter) -> Lease | None:
        model = self._registry.get_model(name)
        if model is None:
            return None  # the pump task ends the queue with 404s
        assert waiter.band is not None
        return self.try_acquire(model, waiter.adapter, waiter.key, waiter.exclude, waiter.weight,
                                waiter.prompt, queued=True, cls=waiter.band.cls)

    def _expire(self, queue: ModelQueue, waiter: Waiter, adapter: str, timeout: float) -> None:
        """A waiter's deadline passed: 503, saying whether no replica could serve it or every
        one that could stayed at its capacity (then with Retry-After)."""
        if not waiter.queued or waiter.future.done():
            return
        queue.leave(waiter)
        assert waiter.band is not None
        self._metrics.queue_rejected(queue.model, waiter.band.cls.name, "timeout")
        endpoints = self._registry.group(queue.model).endpoints.values()
        if any(not adapter or adapter in e.adapters for e in endpoints):
            error = GatewayError(503, f"Every replica of model `{queue.model}` stayed at its capacity "
                                 f"for {timeout:g}s.", code="queue_timeout",
                                 headers={"retry-after": str(self._config.retry_after_seconds)})
        else:
            error = _no_replica(queue.model, adapter, timeout)
        waiter.future.set_exception(error)

    async def close(self) -> None:
        """Stop the queues' pump tasks (the gateway is stopping; its requests end with it)."""
        tasks = list(self._pumps.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start_pump(self, name: str) -> None:
        if name not in self._pumps:
            task = asyncio.get_running_loop().create_task(self._pump_loop(name))
            self._pumps[name] = task
            task.add_done_callback(lambda _: self._pumps.pop(name, None))

    async def _pump_loop(self, name: str) -> None:
        """While requests of ``name`` queue: serve them on every endpoint change, and every
        tick while replicas exist (room freed by other workers' requests); end them with 404
        if the model goes."""
        queue = self._queues[name]
        loop = asyncio.get_running_loop()
        while queue.count:
            group = self._registry.group(name)
            changed = group.changed()
            if self._registry.get_model(name) is None:
                queue.fail_all(model_not_found(name))
                return
            queue.pump()
            if not queue.count:
                return
            waiter = changed.wait(loop)
            timer = loop.call_later(TICK_SECONDS, _wake, waiter) if group.endpoints else None
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                changed.discard(waiter)

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

    def _pick_capped(self, capacity: int, held: list[str], group: EndpointGroup, model: Model,
                     adapter: str, key: str, exclude: list[str] | tuple[()], weight: int,
                     prompt: PromptBlocks | None) -> str | None:
        """``_pick`` among the replicas below ``capacity`` (the Model's ``replicaCapacity``, or
        the request class's share of it; a replica with nothing in flight takes even a request
        heavier than the capacity) and not ``held`` by the pacer (``lb.pacing``)."""
        ring = group.ring
        full = list(held)
        while True:
            picked = self._pick(group, model, adapter, key, [*exclude, *full] if full else exclude,
                                weight, prompt)
            if picked is None:
                return None
            load = ring.load(picked)
            if not load or load + weight <= capacity:
                return picked
            full.append(picked)

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


def _wake(waiter: asyncio.Future[bool]) -> None:
    """The pump's tick: wake it (unless an endpoint change came first)."""
    if not waiter.done():
        waiter.set_result(False)


_NO_SCOPE: dict[str, Any] = {"headers": []}


def _no_replica(name: str, adapter: str, timeout: float) -> GatewayError:
    what = f"model `{name}` with adapter `{adapter}`" if adapter else f"model `{name}`"
    return GatewayError(503, f"No ready replica of {what} became available within "
                        f"{timeout:g}s.", code="no_replica_ready")
