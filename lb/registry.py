"""The registry: where the two planes meet.

The control plane (Kubernetes operator, local runtime, or a static config) writes Models and
each model's ready endpoints here; the gateway only reads. Each model owns an EndpointGroup:
its ring (which also carries the in-flight accounting for every strategy) and an event that
fires on every endpoint change, so the queue re-evaluates instead of waiting for a
specific replica (KubeAI's adapter wait never re-checks). The group also keeps what the gateway
learns of its replicas off the control plane's record: their health, from its own attempts
(``lb.ejection``) and from active checks (``lb.health_checks``), and their own load as last
scraped (``EngineReading``); all are pruned when a replica leaves.

With several worker processes, every process has its own registry, fed the same models and
endpoints; their rings count in-flight requests in one shared ``LoadTable`` (namespaced by
model), so each worker bounds loads by the requests of all of them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Iterable

from lb.ejection import Outliers
from lb.model import Model
from lb.pacing import Pacer
from lb.ring import LoadTable, PrefixIndex, Ring



@dataclass(frozen=True, slots=True)
class Endpoint:
    """One ready replica: ``key`` identifies it (``namespace/pod`` or ``model/replica``),
    ``address`` is ``host:port``; ``adapters`` are the LoRA adapters loaded on it.
    ``kv_port_offset`` is added to the Model's KV-event ports for this replica: 0 for Pods
    (each has its own address), the replica's index where replicas share one host (local
    mode, as vLLM's data-parallel ranks offset theirs)."""

    key: str
    address: str
    adapters: frozenset[str] = field(default_factory=frozenset)
    kv_port_offset: int = 0


@dataclass(frozen=True, slots=True)
class EngineReading:
    """One scrape of one replica's own metrics (``lb.engine_metrics``), kept on its group.
    ``prefix_hit_rate`` covers the interval since the reading before (None until the replica
    has answered prefix-cache queries in one)."""

    waiting: float
    running: float
    kv_usage: float  # 0..1
    prefix_hits: float
    prefix_queries: float
    prefix_hit_rate: float | None
    read_at: float

    @property
    def queued(self) -> float:
        """The engine's queue as routing weighs it: waiting requests, and a full KV cache as
        ``KV_FULL_AS_QUEUED`` more (a full cache means the engine is about to preempt)."""
        return self.waiting + KV_FULL_AS_QUEUED * self.kv_usage


# A full KV cache counts like this many queued requests.
KV_FULL_AS_QUEUED = 4.0


class Change:
    """The next change of a group's endpoints, as a one-shot signal for the queue.

    Like an ``asyncio.Event`` that is set once, but a waiter is a bare future: ``Event.wait``
    adds a coroutine per waiter and a running-loop lookup (a ``getpid()`` in CPython 3.11),
    and when a replica appears thousands of waiters wake together. Waiting on a change that
    has already fired gives a resolved future, so a waiter that took the change before
    checking never misses it.
    """

    __slots__ = ("fired", "_waiters")

    def __init__(self) -> None:
        self.fired = False
        # a dict, not a deque: a waiter that leaves early (timeout, client gone) is removed in
        # O(1) wherever it is
        self._waiters: dict[asyncio.Future[bool], None] = {}

    def wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[bool]:
        """A future that becomes True when this change fires (at once if it has)."""
        waiter: asyncio.Future[bool] = loop.create_future()
        if self.fired:
            waiter.set_result(True)
        else:
            self._waiters[waiter] = None
        return waiter

    def discard(self, waiter: asyncio.Future[bool]) -> None:
        """Forget a waiter that stopped waiting (no-op once the change has fired)."""
        self._waiters.pop(waiter, None)

    def fire(self) -> None:
        self.fired = True
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)


class EndpointGroup:
    """A model's endpoints, the ring that balances them, and (once an attempt on one has
    failed) their health record, which the gateway keeps and this group prunes."""

    def __init__(self, replication: int, mean_load_factor: int,
                 loads: LoadTable | None = None, namespace: str = "") -> None:
        self.ring = Ring(replication, mean_load_factor, loads=loads, namespace=namespace)
        self.endpoints: dict[str, Endpoint] = {}
        self.outliers: Outliers | None = None
        # Keys that failed their active health checks; read on every pick, so a bare set that
        # stays empty unless checks are on and a replica fails them.
        self.unhealthy: set[str] = set()
        # The replicas' own metrics, when scraped; written through ``set_reading`` and
        # ``prune_readings`` so ``engine_version`` tells readers (CacheAware's queue cache)
        # when to look again.
        self.engine: dict[str, EngineReading] = {}
        self.engine_version = 0
        # CacheAware's engine queues: (engine_version, oldest reading's time, replica -> queue)
        self.queue_cache: tuple[int, float, dict[str, float]] | None = None
        # CacheAware's record of which prompt blocks this worker sent to which replica
        self.prefix_index: PrefixIndex | None = None
        # When each replica may next take a request of a class held to a share of it
        self.pacer = Pacer()
        self._changed = Change()

    def changed(self) -> Change:
        """The next endpoint change; take it before checking, then wait on it."""
        return self._changed

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """Apply the new endpoint set as a diff, so requests in flight keep their accounting
        and untouched endpoints keep their place on the ring."""
        new = {e.key: e for e in endpoints}
        gone = [k for k, old in self.endpoints.items() if new.get(k, None) is None
                or new[k].address != old.address]
        for key in gone:
            self.ring.remove(key)
            del self.endpoints[key]
        if gone:  # a replica that comes back starts with a clean record
            if self.outliers is not None:
                self.outliers.forget(gone)
            self.unhealthy.difference_update(gone)
            for key in gone:
                self.pacer.forget(key)
            if self.prefix_index is not None:  # a new replica starts with an empty cache
                for key in gone:
                    self.prefix_index.forget(key)
        for key, endpoint in new.items():
            old = self.endpoints.get(key)
            if old is None:
                self.ring.add(key, endpoint.adapters)
            elif old.adapters != endpoint.adapters:
                self.ring.set_adapters(key, endpoint.adapters)
            self.endpoints[key] = endpoint
        self.notify()

    def set_reading(self, key: str, reading: EngineReading) -> None:
        self.engine[key] = reading
        self.engine_version += 1

    def prune_readings(self) -> None:
        """Drop the readings of replicas that left."""
        for key in [k for k in self.engine if k not in self.endpoints]:
            del self.engine[key]
            self.engine_version += 1

    def set_load_factor(self, factor: int) -> None:
        self.ring.mean_load_factor = factor

    def notify(self) -> None:
        changed, self._changed = self._changed, Change()
        changed.fire()


class Registry:
    """Models by name and an EndpointGroup per model; and the names of Models the control plane
    knows but cannot run (invalid spec or profile), with why: not listed, not served, and a
    request for one is told the reason instead of "does not exist"."""

    def __init__(self, loads: LoadTable | None = None) -> None:
        self.loads = loads  # shared with the other worker processes, if any
        self._models: dict[str, Model] = {}
        self._groups: dict[str, EndpointGroup] = {}
        self._unavailable: dict[str, str] = {}

    def set_unavailable(self, name: str, reason: str | None) -> None:
        """Record why the Model ``name`` cannot run (None: it can, or it is gone)."""
        if reason is None:
            self._unavailable.pop(name, None)
        else:
            self._unavailable[name] = reason

    def unavailable(self, name: str) -> str | None:
        """Why the Model ``name`` cannot run, if the control plane said so."""
        return self._unavailable.get(name)

    def set_model(self, model: Model) -> None:
        self._models[model.name] = model
        group = self._groups.get(model.name)
        if group is None:
            return
        if group.ring.replication != model.spec.load_balancing.prefix_hash.replication:
            self._rebuild(model.name, group)
        else:
            group.set_load_factor(_load_factor(model))
        group.notify()

    def delete_model(self, name: str) -> None:
        self._models.pop(name, None)
        group = self._groups.get(name)
        if group is not None:
            group.notify()

    def get_model(self, name: str) -> Model | None:
        return self._models.get(name)

    def models(self) -> list[Model]:
        return sorted(self._models.values(), key=lambda m: m.name)

    def set_endpoints(self, model: str, endpoints: Iterable[Endpoint]) -> None:
        self.group(model).update(endpoints)

    def group(self, model: str) -> EndpointGroup:
        group = self._groups.get(model)
        if group is None:
            group = self._groups[model] = self._new_group(model)
        return group

    def groups(self) -> dict[str, EndpointGroup]:
        return dict(self._groups)

    def _new_group(self, model: str) -> EndpointGroup:
        spec = self._models.get(model)
        if spec is None:
            return EndpointGroup(256, 125, self.loads, model)
        return EndpointGroup(spec.spec.load_balancing.prefix_hash.replication, _load_factor(spec),
                             self.loads, model)

    def _rebuild(self, model: str, old: EndpointGroup) -> None:
        """A new replication means new vnodes: build a fresh ring. Requests in flight release
        into the old ring they were counted in, so neither ring's totals drift."""
        group = self._groups[model] = self._new_group(model)
        group._changed = old._changed
        group.outliers = old.outliers
        group.unhealthy = old.unhealthy
        group.engine = old.engine
        group.engine_version = old.engine_version + 1
        group.prefix_index = old.prefix_index
        group.update(old.endpoints.values())



def _load_factor(model: Model) -> int:
    """The bound's factor for the model's strategy (CacheAware has its own setting)."""
    balancing = model.spec.load_balancing
    if balancing.strategy == "CacheAware":
        return balancing.cache_aware.mean_load_factor
    return balancing.prefix_hash.mean_load_factor
