"""The gateway's request queue: where a request waits when no replica of its model can take it,
whether none is ready yet (scale from zero) or every one is at its capacity (saturation).

One mechanism for both. The order is the Gateway API Inference Extension's flow control:

- **priority classes** (``queue.classes``): a higher class is always served first; each class
  has its own deadline. A request's class comes from its API key, from the priority header
  (which may only lower a key's class), or is the default; a batch's lines run in the lowest.
- **fair within a class**: one flow per tenant (the API key's name; one flow when keys are off),
  served round-robin, first come first served within a flow — a tenant sending ten times more
  waits behind itself, not in front of the others.
- **shedding**: when the queue is full, the newest request of the largest flow in the lowest
  class gives its place (429 with Retry-After) to a request of a higher class, or of a smaller
  flow of the same class; otherwise the newcomer is refused.

Requests leave the queue as soon as a replica can take them: this worker pumps the queue when
one of its requests releases a replica, when the model's endpoints change, and on a short tick
while replicas exist (releases in the other worker processes are seen that way). Each worker
queues its own requests, and counts in the shared load table keep the order across workers:

- per (model, class), how many wait: a worker leaves a freed replica to a higher class queued
  in another worker rather than serve a lower one;
- per (model, class, flow bucket), how many wait and how many of the requests the queue served
  are still in flight. Flows hash into ``FLOW_BUCKETS`` buckets (stochastic fair queuing: two
  tenants rarely share one). Of its own flows a worker serves the one with the fewest in flight
  first, and it leaves a freed replica to a flow queued in another worker that has fewer in
  flight than any of its own — so a tenant whose connections landed on one worker still gets
  its share of the replicas the other worker frees. A worker defers at most
  ``DEFER_SECONDS`` in a row (the other's waiter may need a replica this one cannot give).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from lb.errors import GatewayError, bad_request
from lb.loads import LocalCount
from lb.ring import LoadTable, SharedCount, hash64
from lb.schema import SchemaError, setting

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# The scope key of a request made inside the gateway with a class of its own: a class name, or
# LOWEST (a batch's lines). Only code in this process can set it; a client sends the header.
PRIORITY = "kvgate.priority"
LOWEST = ""
TICK_SECONDS = 0.01  # how often a queue with replicas looks for room freed by other workers
FLOW_BUCKETS = 16  # shared fairness buckets per (model, class) that flows hash into
DEFER_SECONDS = 0.05  # the longest a worker leaves freed replicas to another's flows in a row


@dataclass(frozen=True, slots=True)
class PriorityClass:
    name: str = setting(doc="The class's name, as API keys and the priority header give it.", pattern=_NAME)
    priority: int = setting(doc="Higher classes are served first.", minimum=0, maximum=1_000_000)
    timeout_seconds: float = setting(
        0.0, doc="How long a request of this class may queue; 0: the queue's timeoutSeconds.", minimum=0)
    capacity_share: float = setting(
        1.0, doc="The share of each replica's replicaCapacity that this class may fill (an idle replica "
        "still takes one request). Below 1 for offline work, so that interactive requests find a free "
        "slot instead of waiting for a line to finish, and the engine is not run at its full batch.",
        exclusive_minimum=0, maximum=1)
    paced: bool = setting(
        False, doc="With a capacityShare below 1: send each replica this class's requests spread over "
        "its cycle (lb.pacing), for offline work whose requests start and end together (a batch's "
        "lines), so that one engine step does not prefill many of them while interactive requests wait.")


_CLASSES = (PriorityClass("critical", 200), PriorityClass("default", 100),
            PriorityClass("batch", 0, timeout_seconds=86_400.0, capacity_share=0.5, paced=True))


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_queued_per_model: int = setting(
        10_000, doc="Requests queued per model and gateway worker; beyond it the lowest class is shed.", minimum=0)
    timeout_seconds: float = setting(600.0, doc="How long a request may queue for a replica unless its class says "
                                     "otherwise (a cold model server can take minutes to load weights).",
                                     exclusive_minimum=0)
    retry_after_seconds: int = setting(5, doc="Retry-After of a 429 for a full queue, and of a queue timeout.",
                                       minimum=0)
    classes: tuple[PriorityClass, ...] = setting(_CLASSES, doc="The priority classes.", max_items=16)
    default_class: str = setting("default", doc="The class of a request whose key and headers name none.",
                                 pattern=_NAME)
    priority_header: str = setting(
        "X-Kvgate-Priority", doc="Request header naming a priority class; with API keys on it may only lower "
        "the key's class. Read only when the request queues. Empty: ignored.")

    def __post_init__(self) -> None:
        names = [c.name for c in self.classes]
        if not names:
            raise SchemaError(("classes",), "at least one priority class is needed")
        if len(set(names)) != len(names):
            raise SchemaError(("classes",), "class names must be unique")
        if self.default_class not in names:
            raise SchemaError(("defaultClass",), f"no class named {self.default_class!r} "
                              f"(classes: {', '.join(names)})")

    def timeout_of(self, cls: PriorityClass) -> float:
        return cls.timeout_seconds or self.timeout_seconds

    @property
    def limited(self) -> bool:
        """Whether some class may fill only a share of a replica's capacity."""
        return any(c.capacity_share < 1 for c in self.classes)

    def class_named(self, cls: str) -> PriorityClass:
        return next(c for c in self.classes if c.name == cls)

    def class_priority(self, cls: str) -> int:
        return next(c.priority for c in self.classes if c.name == cls)

    @property
    def lowest(self) -> str:
        """The lowest class: what offline work (a batch's lines) runs in."""
        return min(self.classes, key=lambda c: c.priority).name


class Waiter:
    """One queued request: what a pick needs, and the future its lease is delivered on."""

    __slots__ = ("future", "flow", "band", "adapter", "key", "exclude", "weight", "prompt",
                 "timer", "queued")

    def __init__(self, future: asyncio.Future[Any], flow: str, adapter: str, key: str,
                 exclude: list[str], weight: int, prompt: Any) -> None:
        self.future = future
        self.flow = flow
        self.band: _Band | None = None
        self.adapter = adapter
        self.key = key
        self.exclude = exclude
        self.weight = weight
        self.prompt = prompt
        self.timer: asyncio.TimerHandle | None = None
        self.queued = False

    def blocker(self) -> tuple[str, tuple[str, ...]]:
        """What decides whether a pick can succeed now: waiters alike fail alike."""
        return self.adapter, tuple(self.exclude)


Count = SharedCount | LocalCount


class _Band:
    """One priority class's waiters: a FIFO per flow, the flows in round-robin order, and the
    per-bucket counts that keep the class fair across workers."""

    __slots__ = ("cls", "flows", "sizes", "count", "shared", "_table", "_namespace", "_buckets",
                 "_waiting", "_serving", "_local", "_defer_until")

    def __init__(self, cls: PriorityClass, table: LoadTable | None, namespace: str) -> None:
        self.cls = cls
        self.flows: dict[str, deque[Waiter]] = {}  # insertion order is the round-robin order
        self.sizes: dict[str, int] = {}  # live waiters per flow
        self.count = 0
        # this class's count over every worker, if workers share a table
        self.shared = SharedCount(table, namespace, cls.name) if table is not None else None
        self._table, self._namespace = table, f"{namespace}\x00{cls.name}"
        self._buckets: dict[str, int] = {}  # flow -> its bucket
        self._waiting: list[Count] = []  # per bucket, over every worker (made on first use)
        self._serving: list[Count] = []  # per bucket: served by the queue, still in flight
        self._local = [0] * FLOW_BUCKETS  # per bucket, in this worker
        self._defer_until = 0.0  # the end of a deferral to another worker's flow, if one runs

    def add(self, waiter: Waiter) -> None:
        self.flows.setdefault(waiter.flow, deque()).append(waiter)
        self.sizes[waiter.flow] = self.sizes.get(waiter.flow, 0) + 1
        self.count += 1
        if self.shared is not None:
            self.shared.inc()
        bucket = self._bucket(waiter.flow)
        self._local[bucket] += 1
        self._waiting[bucket].inc()

    def drop(self, waiter: Waiter) -> None:
        """Count a waiter out (it stays in its deque until reached: removal is lazy)."""
        left = self.sizes[waiter.flow] - 1
        if left:
            self.sizes[waiter.flow] = left
        else:
            del self.sizes[waiter.flow]
        self.count -= 1
        if self.shared is not None:
            self.shared.dec()
        bucket = self._buckets[waiter.flow]
        self._local[bucket] -= 1
        self._waiting[bucket].dec()

    def _bucket(self, flow: str) -> int:
        bucket = self._buckets.get(flow)
        if bucket is None:
            if not self._waiting:
                self._waiting = [self._counter("waiting", b) for b in range(FLOW_BUCKETS)]
                self._serving = [self._counter("serving", b) for b in range(FLOW_BUCKETS)]
            bucket = self._buckets[flow] = hash64(flow) % FLOW_BUCKETS
        return bucket

    def _counter(self, what: str, bucket: int) -> Count:
        if self._table is None:
            return LocalCount()
        return SharedCount(self._table, self._namespace, f"{what}:{bucket}")

    def charge(self, flow: str) -> Count:
        """A request of ``flow`` leaves the queue for a replica: counted in flight until its
        lease ends (the lease decrements the returned counter)."""
        serving = self._serving[self._buckets[flow]]
        serving.inc()
        return serving

    def heads(self) -> list[tuple[str, Waiter]]:
        """Each flow's first live waiter, the flows with the fewest in flight first and in
        round-robin order among equals; flows found empty go."""
        found = []
        for flow in list(self.flows):
            waiters = self.flows[flow]
            while waiters and not waiters[0].queued:
                waiters.popleft()
            if waiters:
                found.append((flow, waiters[0]))
            else:
                del self.flows[flow]
        if len(found) > 1:
            serving = self._serving
            found.sort(key=lambda head: serving[self._buckets[head[0]]].value)
        return found

    def defers(self, flow: str, freed: bool) -> bool:
        """Whether a replica is owed to a flow queued in another worker: one with fewer in
        flight than ``flow`` (this worker's neediest). A replica this worker's own request
        ``freed`` starts a deferral of at most ``DEFER_SECONDS``, which the other pumps keep to
        until the owed flow has caught up; then a new one may start. Replicas free for other
        reasons (new ones, a lower class's) go to whoever asks first."""
        if self.shared is None or self.shared.value <= self.count:
            return False  # nothing of this class waits elsewhere
        own = self._serving[self._buckets[flow]].value
        local, waiting, serving = self._local, self._waiting, self._serving
        if not any(waiting[b].value > local[b] and serving[b].value < own
                   for b in range(FLOW_BUCKETS)):
            self._defer_until = 0.0
            return False
        now = time.monotonic()
        if not self._defer_until:
            if not freed:
                return False
            self._defer_until = now + DEFER_SECONDS
        return now < self._defer_until

    def served(self, flow: str) -> None:
        """The flow's head was served: it goes to the back of the round."""
        waiters = self.flows.pop(flow)
        waiters.popleft()
        if waiters:
            self.flows[flow] = waiters

    def newest_of_largest(self) -> Waiter | None:
        if not self.sizes:
            return None
        flow = max(self.sizes, key=self.sizes.__getitem__)
        waiters = self.flows[flow]
        for waiter in reversed(waiters):
            if waiter.queued:
                return waiter
        return None

    def elsewhere(self) -> int:
        """Waiters of this class in the other workers."""
        return 0 if self.shared is None else self.shared.value - self.count


# A lease for the waiter now, or None; the queue sets its ``flow`` (a counter to decrement when
# the lease ends).
Acquire = Callable[[Waiter], Any]


class ModelQueue:
    """One model's queue in this worker."""

    def __init__(self, model: str, config: QueueConfig, table: LoadTable | None,
                 acquire: Acquire) -> None:
        self.model = model
        self._acquire = acquire
        self.config = config
        namespace = f"queue\x00{model}"
        self._total = SharedCount(table, namespace, "") if table is not None else None
        self._bands = [_Band(c, table, namespace)
                       for c in sorted(config.classes, key=lambda c: -c.priority)]
        self._by_name = {band.cls.name: band for band in self._bands}
        self.count = 0
        self.pumping = False

    def __len__(self) -> int:
        return self.count

    def anywhere(self) -> bool:
        """Requests of this model queue in any worker (newcomers must not pass them)."""
        return bool(self.count or (self._total is not None and self._total.value))

    def counts(self) -> dict[str, int]:
        """Requests queued per class, over every worker sharing the load table."""
        return {band.cls.name: band.shared.value if band.shared is not None else band.count
                for band in self._bands}

    def band_of(self, name: str) -> _Band:
        return self._by_name[name]

    def enter(self, waiter: Waiter, cls: str) -> Waiter | None:
        """Queue ``waiter`` in class ``cls``; returns the waiter it displaced, if the queue was
        full. Raises the 429 when the newcomer itself cannot have a place."""
        band = self._by_name[cls]
        if self.count >= self.config.max_queued_per_model:
            victim = self._victim_for(band, waiter.flow)
            if victim is None:
                raise self.full()
            self.leave(victim)
        else:
            victim = None
        waiter.band = band
        waiter.queued = True
        band.add(waiter)
        self.count += 1
        if self._total is not None:
            self._total.inc()
        return victim

    def leave(self, waiter: Waiter) -> None:
        """Count a waiter out of the queue, once, whatever the reason."""
        if not waiter.queued:
            return
        waiter.queued = False
        assert waiter.band is not None
        waiter.band.drop(waiter)
        self.count -= 1
        if self._total is not None:
            self._total.dec()
        if waiter.timer is not None:
            waiter.timer.cancel()

    def _victim_for(self, band: _Band, flow: str) -> Waiter | None:
        """Who gives a newcomer of ``band``/``flow`` its place: the newest of the largest flow
        in the lowest occupied class, if that class is lower, or the same class with a flow
        larger than the newcomer's would become."""
        for lowest in reversed(self._bands):
            if lowest.count:
                break
        else:
            return None
        if lowest.cls.priority < band.cls.priority:
            return lowest.newest_of_largest()
        if lowest is band:
            victim = band.newest_of_largest()
            if victim is not None and band.sizes[victim.flow] > band.sizes.get(flow, 0) + 1:
                return victim
        return None

    def pump(self, freed: bool = False) -> None:
        """Serve waiters, best class first, fair within it, while replicas take them (``freed``:
        a request of this worker released one).

        A class is served only while no higher class waits in another worker; a waiter whose
        pick failed marks its kind (adapter, replicas to avoid) blocked for the rest of the
        pass, so a pass costs one failed pick per kind, not one per waiter.
        """
        if not self.count or self.pumping:
            return
        self.pumping = True  # a dispatch can release a lease (a waiter gone meanwhile)
        try:
            blocked: set[tuple[str, tuple[str, ...]]] = set()
            higher_elsewhere = False
            for band in self._bands:
                if higher_elsewhere:
                    return
                if band.count:
                    self._pump_band(band, blocked, freed)
                higher_elsewhere = band.elsewhere() > 0
        finally:
            self.pumping = False

    def _pump_band(self, band: _Band, blocked: set[tuple[str, tuple[str, ...]]],
                   freed: bool) -> None:
        progress = True
        while progress and band.count:
            progress = False
            for flow, waiter in band.heads():
                if waiter.future.done():  # cancelled: its client left, its task not yet out
                    band.served(flow)
                    self.leave(waiter)
                    progress = True
                    continue
                kind = waiter.blocker()
                if kind in blocked:
                    continue
                if band.defers(flow, freed):
                    return  # every other flow here has at least as many in flight
                lease = self._acquire(waiter)
                if lease is None:
                    blocked.add(kind)
                    continue
                band.served(flow)
                self.leave(waiter)
                lease.flow = band.charge(flow)
                waiter.future.set_result(lease)
                progress = True
                break  # in-flight counts changed: order the heads again

    def fail_all(self, error: GatewayError) -> None:
        for band in self._bands:
            for waiters in band.flows.values():
                for waiter in waiters:
                    if waiter.queued:
                        self.leave(waiter)
                        if not waiter.future.done():
                            waiter.future.set_exception(error)
            band.flows.clear()

    def full(self) -> GatewayError:
        return GatewayError(429, f"Too many requests are queued for model `{self.model}`; retry "
                            "later.", code="queue_full",
                            headers={"retry-after": str(self.config.retry_after_seconds)})


def priority_class(config: QueueConfig, scope: dict[str, Any], key_class: str | None) -> str:
    """The class a queued request waits in: set inside the gateway (a batch's lines), else the
    priority header (which may only lower a key's class), else its key's, else the default.
    A class name the config does not know answers 400 (from the header) or counts as the
    default (from a key: keys files are written apart from the gateway's config)."""
    known = {c.name: c.priority for c in config.classes}
    own = key_class if key_class in known else config.default_class
    inside = scope.get(PRIORITY)
    if inside is not None:
        return inside if inside in known else config.lowest
    asked = _header(scope, config.priority_header)
    if asked is None:
        return own
    if asked not in known:
        raise bad_request(f"Unknown priority class `{asked}` in {config.priority_header} "
                          f"(classes: {', '.join(known)}).", param=config.priority_header)
    if key_class is not None and known[asked] > known[own]:
        return own  # a key's class is a ceiling: the header may only lower it
    return asked


def _header(scope: dict[str, Any], name: str) -> str | None:
    if not name:
        return None
    wanted = name.lower().encode()
    for key, value in scope["headers"]:
        if key.lower() == wanted:
            return value.decode("latin-1").strip()
    return None

