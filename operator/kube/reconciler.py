"""Reconciling Models into Pods: a coalescing work queue and the reconcile of one Model.

Level-triggered: an event only says *which* Model to look at. Each reconcile reads the Model
and its Pods fresh from the API server (a quorum read, not the watch cache), plans with
`lb_operator.kube.pods.plan_pods`, applies the plan, and writes ``status.replicas``. Reading fresh
is what makes a reconcile safe to repeat: a Pod created a moment ago is always counted, so a
burst of events, a replayed watch or a relist can never create a Pod twice.

The queue holds each key at most once, never hands one key to two workers at once, and a key
that changes while it is being reconciled runs once more afterwards. A failing key is retried
with exponential backoff and jitter; a Model that cannot be planned (invalid spec, unknown
profile) gets a ``Valid=False`` condition and is left until it changes.

Names shared across managed namespaces (`lb_operator.kube.names`): before anything else, the
same name is read fresh in the other namespaces; a Model that does not own its name gets no
Pods (any it had are deleted), a ``Valid=False`` condition with reason ``NameConflict`` naming
the owner's namespace, and a Warning Event when it starts losing. Every event on a Model
queues every Model of that name, so the next in line is reconciled (and takes the name over)
as soon as the owner is deleted.

Cache profiles (`lb_operator.kube.cache`): before planning, ``ensure_cache`` takes one step (PVC,
loader Job, finalizer); until the cache is loaded no Pod is planned, the ``CacheReady`` condition
says why, and the key comes back after a growing delay or when a cache Job changes (the Job
informers). A deleted Model holding the cache finalizer has its Pods deleted and its eviction
Job run until the finalizer is dropped.

API errors are logged with what the server said (its Status message, reason and causes). A 4xx
other than 409/429 (the Pod is invalid, forbidden by admission, ...) cannot be fixed by repeating
the same request: the Model gets ``Reconciled=False`` with the server's message and a Warning
Event, and is left alone until its spec changes (a new generation) or ``rejected_retry_seconds``
pass, instead of being retried at full rate forever.

Events (`lb_operator.kube.events.EventRecorder`, rate-limited per Model): scaled, rolling out,
rolled out, invalid, replicas clamped to the Model's bounds, rejected by the API server. A
requested count outside [minReplicas, maxReplicas] is clamped, and said so: the
``ReplicasClamped`` condition and an Event. ``status.selector`` holds the label selector of the
Model's Pods (the scale subresource's ``labelSelectorPath``, for HPA and KEDA).

In a cluster, file:// URLs (the Model's or an adapter's) make the Model invalid: no Pod has the
operator's files (`lb_operator.kube.engines.check_cluster_urls`).

Only the elected leader runs a ``Reconciler`` (see `lb_operator.kube.leader`).

Hooks for other operator features (LoRA adapters, cache): ``Reconciler(hooks=[...])`` takes
``async def hook(ctx: ReconcileContext) -> None`` callables; each runs after every successful
reconcile of a Model with the Model, its API object and the Pods that exist after the plan was
applied (fresh, so Ready flags and labels are current as of this reconcile). A hook that raises
makes the key retry with backoff. ``Reconciler.enqueue(namespace, name)`` asks for a reconcile
from outside (e.g. after loading an adapter).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Sequence

from kubernetes_asyncio.client.exceptions import ApiException

from lb.model import Model, ModelValidationError
from lb_operator.kube.apply import apply_plan, condition, ensure_files, pods_after, write_status
from lb_operator.kube.cache import CACHE_FINALIZER, JOB_KIND_LABEL, CacheState, ensure_cache
from lb_operator.kube.client import KubeApi, api_error_text, is_permanent
from lb_operator.kube.engines import PodSpecError, check_cluster_urls
from lb_operator.kube.events import EventRecorder, record_event
from lb_operator.kube.names import CONFLICT_REASON, NameOwners, conflict_message, fresh_owner
from lb_operator.kube.pods import (ENGINE_LABEL, MODEL_LABEL, Pod, PodPlan, is_ready, is_terminating,
                                   owner_reference, plan_pods, pod_hash_of, replica_status)
from lb_operator.kube.watch import TRANSIENT_ERRORS, Informer, Obj
from lb_operator.retry import Backoff
from lb_operator.system_config import SystemConfig

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, Model name)
POD_SELECTOR = f"{MODEL_LABEL},{ENGINE_LABEL}"  # Pods this operator made (both labels set)
JOB_SELECTOR = JOB_KIND_LABEL  # the cache's loader and eviction Jobs
VALID = "Valid"  # condition: the spec and the profiles it names can be planned into Pods
RECONCILED = "Reconciled"  # condition: False while the API server rejects what the operator asks
CLAMPED = "ReplicasClamped"  # condition: spec.replicas is outside [minReplicas, maxReplicas]


def model_pod_selector(name: str) -> str:
    return f"{MODEL_LABEL}={name},{ENGINE_LABEL}"


@dataclass(frozen=True, slots=True)
class ReconcileContext:
    api: KubeApi
    model: Model
    obj: dict[str, Any]  # the Model as read from the API server at the start of the reconcile
    pods: Sequence[Pod]  # the model's Pods once the plan was applied


ReconcileHook = Callable[[ReconcileContext], Awaitable[None]]


class WorkQueue:
    """Keys to process: deduplicated, one worker per key, changes during processing re-queued."""

    def __init__(self) -> None:
        self._order: deque[Key] = deque()
        self._queued: set[Key] = set()
        self._active: set[Key] = set()
        self._dirty: set[Key] = set()
        self._wakeup = asyncio.Event()
        self._timers: set[asyncio.TimerHandle] = set()

    def add(self, key: Key) -> None:
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._order.append(key)
            self._wakeup.set()

    def add_after(self, key: Key, delay: float) -> None:
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.add(key)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    async def get(self) -> Key:
        while not self._order:
            self._wakeup.clear()
            await self._wakeup.wait()
        key = self._order.popleft()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: Key) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return len(self._order)

    def close(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()


class Reconciler:
    """Reconciles every Model the informers know of, and again whenever it or its Pods change."""

    def __init__(self, api: KubeApi, config: SystemConfig, *, owners: NameOwners,
                 pod_informers: Iterable[Informer], workers: int = 2, resync_seconds: float = 60.0,
                 backoff: Backoff = Backoff(initial=0.1, maximum=10.0),
                 hooks: Sequence[ReconcileHook] = (), job_informers: Iterable[Informer] = (),
                 cache_backoff: Backoff = Backoff(initial=2.0, maximum=60.0),
                 events: EventRecorder | None = None, allow_file_urls: bool = False,
                 rejected_retry_seconds: float = 600.0) -> None:
        self.api = api
        self.config = config
        self.owners = owners  # the Model informers, by namespace in flag order
        self.model_informers = list(owners.informers.values())
        self.pod_informers = list(pod_informers)
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.backoff = backoff
        self.hooks = list(hooks)
        self.job_informers = list(job_informers)
        self.cache_backoff = cache_backoff
        self.events = events or EventRecorder(api)
        self.allow_file_urls = allow_file_urls
        self.rejected_retry_seconds = rejected_retry_seconds
        self.queue = WorkQueue()
        self.reconciles = 0  # completed reconciles (tests and debugging)
        self._rejected: dict[Key, tuple[int | None, float]] = {}  # -> (generation, retry after)
        self._generations: dict[Key, int | None] = {}  # generation each key was last read at
        self._desired: dict[Key, int] = {}  # replicas last planned, to report scaling once
        self._rolling: set[Key] = set()  # Models whose Pods are being replaced
        self._failures: dict[Key, int] = {}
        self._cache_waits: dict[Key, int] = {}  # consecutive passes that found the cache not ready

    def enqueue(self, namespace: str, name: str) -> None:
        self.queue.add((namespace, name))

    async def run(self) -> None:
        """Reconcile until cancelled (i.e. until leadership is lost)."""
        self.queue = WorkQueue()  # a new term starts clean: no key left "active" by the last one
        handlers = [(i, self._on_model) for i in self.model_informers] + [
            (i, self._on_dependent) for i in self.pod_informers + self.job_informers]
        for informer, handler in handlers:
            informer.add_handler(handler)
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self.workers):
                    group.create_task(self._worker())
                group.create_task(self._resync())
        finally:
            for informer, handler in handlers:
                informer.remove_handler(handler)
            self.queue.close()

    def _on_model(self, etype: str, obj: Obj) -> None:
        """Every Model of that name: a change to one may settle who owns the name. A deleted
        Model itself needs nothing (Pods go with their owner: garbage collection)."""
        name = (obj.get("metadata") or {}).get("name", "")
        for present in self.owners.present(name):
            self.enqueue(present["metadata"].get("namespace", "default"), name)

    def _on_dependent(self, etype: str, obj: Obj) -> None:
        """A model Pod changed, or a cache Job (completed, failed, deleted): both carry their
        Model's name in the `model` label, and the Model is reconciled again."""
        meta = obj.get("metadata") or {}
        model = (meta.get("labels") or {}).get(MODEL_LABEL)
        if model:
            self.enqueue(meta.get("namespace", "default"), model)

    async def _resync(self) -> None:
        """Every Model now (taking over from another leader), then periodically: the safety net
        for anything an event did not cover."""
        await asyncio.gather(*(i.synced.wait() for i in self.model_informers))
        while True:
            for informer in self.model_informers:
                for obj in list(informer.items.values()):
                    self._on_model("SYNC", obj)
            await asyncio.sleep(self.resync_seconds)

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self.reconcile(*key)
            except ApiException as exc:
                if is_permanent(exc):
                    await self._reject(key, exc)
                else:
                    self._retry_later(key, exc)
            except (RuntimeError, *TRANSIENT_ERRORS) as exc:
                self._retry_later(key, exc)
            except Exception as exc:  # a bug must not kill the worker; keep retrying the key
                log.exception("model %s/%s: reconcile failed", *key)
                self._retry_later(key, exc)
            else:
                self._failures.pop(key, None)
                self.reconciles += 1
            finally:
                self.queue.done(key)

    def _retry_later(self, key: Key, exc: BaseException) -> None:
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        delay = self.backoff.delay(failures)
        log.warning("model %s/%s: reconcile failed (%s); retrying in %.2fs", *key,
                    _describe(exc), delay)
        self.queue.add_after(key, delay)

    async def _reject(self, key: Key, exc: ApiException) -> None:
        """A permanent API error: say so on the Model (condition, Event), then leave it alone
        for this generation until `rejected_retry_seconds` pass."""
        why = api_error_text(exc)
        generation = self._generations.get(key)
        self._rejected[key] = (generation, time.monotonic() + self.rejected_retry_seconds)
        log.warning("model %s/%s: rejected by the API server (%s); not retried for generation %s "
                    "before %.0fs unless the spec changes", *key, why, generation,
                    self.rejected_retry_seconds)
        self.queue.add_after(key, self.rejected_retry_seconds)
        try:
            obj = await self.api.get_model(*key)
            if obj is None:
                return
            await self.events.record(obj, "Warning", "APIRejected", why)
            await write_status(self.api, obj, conditions=[
                condition(RECONCILED, False, "APIRejected", why, _generation(obj))])
        except (ApiException, RuntimeError, *TRANSIENT_ERRORS) as report_error:
            log.warning("model %s/%s: could not report the rejection: %s", *key, _describe(report_error))

    def _still_rejected(self, key: Key, obj: dict[str, Any]) -> bool:
        """Whether the last rejection holds: same generation, long back-off not over."""
        rejected = self._rejected.get(key)
        if rejected is None:
            return False
        generation, retry_after = rejected
        if generation == _generation(obj) and time.monotonic() < retry_after:
            return True
        del self._rejected[key]
        return False

    async def reconcile(self, namespace: str, name: str) -> None:
        """Bring one Model's cache, Pods, files and status one step closer to its spec."""
        obj = await self.api.get_model(namespace, name)
        if obj is None:
            return
        if (obj.get("metadata") or {}).get("deletionTimestamp"):
            await self._finalize(obj)
            return
        key = (namespace, name)
        if self._still_rejected(key, obj):
            return
        self._generations[key] = _generation(obj)
        owner = await fresh_owner(self.api, self.owners.namespaces, obj)
        if owner is not None and owner != namespace:
            await self._name_taken(obj, owner)
            return
        try:
            model = Model.from_dict(obj)
        except ModelValidationError as exc:
            await self._invalid(obj, "InvalidSpec", str(exc))
            return
        obj, cache = await self._cache(model, obj)
        if cache is not None and not cache.ready:
            return
        listed = await self.api.list_pods(namespace, label_selector=model_pod_selector(name))
        pods = listed.get("items") or []
        try:
            if not self.allow_file_urls:
                check_cluster_urls(model)
            plan = plan_pods(model, self.config, pods, owner_uid=obj["metadata"].get("uid", ""))
        except PodSpecError as exc:
            await self._invalid(obj, "PodSpecError", str(exc))
            return
        await ensure_files(self.api, model, plan.config_map, _owner(obj))
        created = await apply_plan(self.api, model, plan)
        after = pods_after(pods, plan, created)
        conditions = [condition(VALID, True, "Valid", generation=_generation(obj))]
        if cache is not None:
            conditions.append(cache.condition(_generation(obj)))
        if _condition(obj, RECONCILED).get("status") == "False":
            conditions.append(condition(RECONCILED, True, "Reconciled", generation=_generation(obj)))
        conditions += await self._clamped(model, obj)
        await write_status(self.api, obj, replica_status(after), conditions,
                           selector=model_pod_selector(name))
        await self._report_progress(key, obj, plan, after)
        context = ReconcileContext(self.api, model, obj, after)
        for hook in self.hooks:
            await hook(context)

    async def _clamped(self, model: Model, obj: dict[str, Any]) -> list[dict[str, Any]]:
        """The ReplicasClamped condition (set while spec.replicas is out of bounds, cleared
        after), and a Warning Event when clamping starts or the clamped request changes."""
        spec = model.spec
        requested = spec.replicas
        if requested is not None and spec.clamp_replicas(requested) != requested:
            bound = "maxReplicas" if spec.max_replicas is not None and requested > spec.max_replicas else "minReplicas"
            message = (f"spec.replicas {requested} is outside [{spec.min_replicas}, "
                       f"{spec.max_replicas if spec.max_replicas is not None else 'unbounded'}]: "
                       f"running {spec.clamp_replicas(requested)} ({bound})")
            if not _has_condition(obj, CLAMPED, "Clamped", message):
                await self.events.record(obj, "Warning", CLAMPED, message)
            return [condition(CLAMPED, True, "Clamped", message, _generation(obj))]
        if _condition(obj, CLAMPED).get("status") == "True":
            return [condition(CLAMPED, False, "WithinBounds", generation=_generation(obj))]
        return []

    async def _report_progress(self, key: Key, obj: dict[str, Any], plan: PodPlan,
                               after: Sequence[Pod]) -> None:
        """Events for what this pass changed: a new replica count, a rollout starting, ending."""
        live = [p for p in after if not is_terminating(p)]
        before = self._desired.get(key)
        self._desired[key] = plan.desired
        if before is not None and before != plan.desired:
            await self.events.record(obj, "Normal", "Scaled",
                                     f"replicas {before} -> {plan.desired}")
        elif before is None and plan.to_create and not plan.to_delete:
            await self.events.record(obj, "Normal", "Scaled",
                                     f"creating {len(plan.to_create)} Pod(s) for {plan.desired} replica(s)")
        outdated = [p for p in live if pod_hash_of(p) != plan.expected_hash]
        if outdated and key not in self._rolling:
            self._rolling.add(key)
            await self.events.record(obj, "Normal", "RollingOut",
                                     f"replacing {len(outdated)} Pod(s) with pod-hash {plan.expected_hash}")
        elif (not outdated and key in self._rolling and len(live) == plan.desired
              and all(is_ready(p) for p in live)):
            self._rolling.discard(key)
            await self.events.record(obj, "Normal", "RolledOut",
                                     f"{plan.desired} replica(s) ready with pod-hash {plan.expected_hash}")

    async def _invalid(self, obj: dict[str, Any], reason: str, message: str) -> None:
        """A Model that cannot be planned is left until it changes; the reason goes to its status
        and, once per distinct reason, to a Warning Event."""
        meta = obj["metadata"]
        log.warning("model %s/%s: not reconciled: %s", meta["namespace"], meta["name"], message)
        if not _has_condition(obj, VALID, reason, message):
            await self.events.record(obj, "Warning", reason, message)
        await write_status(self.api, obj, conditions=[
            condition(VALID, False, reason, message, _generation(obj))])

    async def _name_taken(self, obj: dict[str, Any], owner: str) -> None:
        """A Model whose name another namespace owns: no Pods, and its status and an Event say
        which namespace has the name. The Event is recorded once per loss, not on every pass."""
        meta = obj["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        message = conflict_message(name, owner)
        listed = await self.api.list_pods(namespace, label_selector=model_pod_selector(name))
        pods = [p for p in listed.get("items") or () if not p["metadata"].get("deletionTimestamp")]
        await asyncio.gather(*(self.api.delete_pod(namespace, p["metadata"]["name"], p["metadata"].get("uid"))
                               for p in pods))
        if not _has_condition(obj, VALID, CONFLICT_REASON, message):
            log.warning("model %s/%s: %s", namespace, name, message)
            await record_event(self.api, namespace=namespace, model=name, uid=meta.get("uid", ""),
                               kind="Warning", reason=CONFLICT_REASON, message=message,
                               event_name=f"{name}.{CONFLICT_REASON.lower()}")
        await write_status(self.api, obj, replica_status([]), [
            condition(VALID, False, CONFLICT_REASON, message, _generation(obj))])

    async def _cache(self, model: Model, obj: dict[str, Any]
                     ) -> tuple[dict[str, Any], CacheState | None]:
        """One step of the Model's cache (no-op without a cacheProfile). While it is not ready no
        Pod is planned: the status says why, and the key comes back after a growing delay (a
        loader Job's completion brings it back sooner, through the Job informer)."""
        if not model.spec.cache_profile:
            return obj, None
        key = (model.namespace, model.name)
        state = await ensure_cache(self.api, obj, self.config)
        obj = await self.api.get_model(*key) or obj  # ensure_cache patches finalizers and status
        if state.ready:
            self._cache_waits.pop(key, None)
            return obj, state
        await write_status(self.api, obj, conditions=[
            condition(VALID, True, "Valid", generation=_generation(obj)), state.condition(_generation(obj))])
        self._wait_for_cache(key)
        return obj, state

    def _wait_for_cache(self, key: Key) -> None:
        waits = self._cache_waits[key] = self._cache_waits.get(key, 0) + 1
        self.queue.add_after(key, self.cache_backoff.delay(waits))

    async def _finalize(self, obj: dict[str, Any]) -> None:
        """A deleted Model holding the cache finalizer: stop its Pods (they mount the files about
        to be evicted), then run the eviction until `ensure_cache` drops the finalizer."""
        meta = obj["metadata"]
        if CACHE_FINALIZER not in (meta.get("finalizers") or ()):
            return  # Pods go with their owner (garbage collection)
        namespace, name = meta["namespace"], meta["name"]
        listed = await self.api.list_pods(namespace, label_selector=model_pod_selector(name))
        await asyncio.gather(*(self.api.delete_pod(namespace, p["metadata"]["name"], p["metadata"].get("uid"))
                               for p in listed.get("items") or () if not p["metadata"].get("deletionTimestamp")))
        try:
            state = await ensure_cache(self.api, obj, self.config)
        except ModelValidationError as exc:
            log.warning("model %s/%s: cannot evict its cache: %s", namespace, name, exc)
            return
        if not state.finalized:
            self._wait_for_cache((namespace, name))


def _generation(obj: dict[str, Any]) -> int | None:
    return (obj.get("metadata") or {}).get("generation")


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """The status condition of that type ({} if absent)."""
    for found in (obj.get("status") or {}).get("conditions") or ():
        if found.get("type") == kind:
            return found
    return {}


def _has_condition(obj: dict[str, Any], kind: str, reason: str, message: str) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == kind and c.get("reason") == reason and c.get("message") == message
               for c in conditions)


def _owner(obj: dict[str, Any]) -> dict[str, Any] | None:
    meta = obj.get("metadata") or {}
    return owner_reference(meta["name"], meta["uid"]) if meta.get("uid") else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return api_error_text(exc)
    return f"{type(exc).__name__}: {exc}"
