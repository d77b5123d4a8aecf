"""Leader election with a coordination.k8s.io/v1 Lease (client-go's algorithm).

Every gateway replica runs a ``LeaderElector``; exactly one at a time holds the Lease and runs
the leader-only work (reconciling, autoscaling). The rules:

- acquire: create the Lease, or take it over when it is free (no holder, released) or when its
  record has not changed for ``leaseDurationSeconds`` as measured on *this* replica's clock
  (the holder's timestamps are never compared with ours, so clock skew cannot split the brain);
- every write carries the Lease's resourceVersion: of two candidates racing for it, one gets
  409 Conflict and stays a follower;
- renew every ``retry_period``; a leader that cannot renew within ``renew_deadline`` (set it
  below the lease duration) steps down and cancels its tasks before anyone else may take over;
- the deadline counts from the moment a successful renewal was *sent*, and a follower counts
  the lease duration from the moment it *received* the changed record: the leader's view
  always ends first, whatever the request latency;
- a leader whose event loop was starved past its deadline does not give up blindly: its next
  renewal is still tried (the resourceVersion proves nobody took the Lease meanwhile, or the
  write fails); until it succeeds ``is_leader`` is False, and seeing another holder ends the
  term at once. ``is_leader`` reads the clock, so it turns False at the deadline even while the
  renew loop is still asleep.
- on a clean stop the leader releases the Lease (empty holder), so a successor starts at once.

Leader tasks: ``LeaderElector(leader_tasks=[factory, ...])`` or ``add_leader_task(factory)``,
where a factory is ``async def task() -> None`` (a zero-argument callable returning an
awaitable). Each factory is called when leadership is gained, runs until leadership is lost
(then it is cancelled) and is restarted with backoff if it raises. ``is_leader`` and
``leading`` (an Event set while leading) tell other components where they stand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable

from kubernetes_asyncio.client.exceptions import ApiException

from lb_operator.kube.client import KubeApi
from lb_operator.kube.watch import TRANSIENT_ERRORS
from lb_operator.retry import Backoff

log = logging.getLogger(__name__)

LeaderTask = Callable[[], Awaitable[None]]
DEFAULT_LEASE_NAME = "kvgate-leader"


def default_identity() -> str:
    """Unique per process: the Pod name when there is one, plus a random suffix for restarts."""
    host = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{host}-{uuid.uuid4().hex[:6]}"


def _micro_time(moment: datetime | None = None) -> str:
    return (moment or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api: KubeApi, namespace: str, *, name: str = DEFAULT_LEASE_NAME,
                 identity: str | None = None, lease_duration: float = 15.0,
                 renew_deadline: float = 10.0, retry_period: float = 2.0,
                 leader_tasks: Iterable[LeaderTask] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("leader election needs retry_period < renew_deadline < lease_duration")
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.leader_tasks = list(leader_tasks)
        self.clock = clock  # monotonic seconds; the tests drive a fake one to stage expiries
        self.leading = asyncio.Event()
        self.terms = 0  # times this replica became leader
        self._holding = False  # the Lease is ours (set before tasks start, cleared on losing it)
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._valid_until = 0.0  # by our clock: the end of the term unless renewed before

    @property
    def is_leader(self) -> bool:
        """Leading and within the renew deadline of the last renewal (the clock, not the renew
        loop, decides: a loop that was starved may not have noticed yet)."""
        return self.leading.is_set() and self.clock() < self._valid_until

    def add_leader_task(self, factory: LeaderTask) -> None:
        """Run ``factory()`` whenever this replica leads (from the next term on if leading now)."""
        self.leader_tasks.append(factory)

    async def run(self) -> None:
        """Campaign, lead, step down, campaign again... until cancelled (then release)."""
        try:
            while True:
                await self._campaign()
                await self._lead()
        finally:
            self.leading.clear()
            if self._holding:
                self._holding = False
                await asyncio.shield(self._release())

    async def _campaign(self) -> None:
        while not await self._try_acquire_or_renew():
            await asyncio.sleep(self.retry_period)
        self.terms += 1
        self._holding = True
        self.leading.set()
        log.info("%s: became the leader (lease %s/%s)", self.identity, self.namespace, self.name)

    async def _lead(self) -> None:
        tasks = [asyncio.create_task(self._supervise(f)) for f in self.leader_tasks]
        try:
            await self._keep_renewing()
            self._holding = False  # not renewed in time: someone else may hold it by now
        finally:
            self.leading.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        log.warning("%s: lost the leadership", self.identity)

    async def _keep_renewing(self) -> None:
        """Returns when the Lease could not be renewed within renew_deadline, or another holder
        was seen."""
        while True:
            await asyncio.sleep(self.retry_period)
            # A late renewal (the loop was starved past the deadline) still gets a real attempt:
            # the write carries the resourceVersion, so it succeeds only if nobody took over.
            budget = max(self._valid_until - self.clock(), self.retry_period)
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that arrives as the renewal completes, and a leader that
                # ignores being stopped keeps renewing forever.
                async with asyncio.timeout(budget):
                    renewed = await self._try_acquire_or_renew()
            except TimeoutError:
                renewed = False
            if renewed:
                continue
            if self._other_holder() or self.clock() >= self._valid_until:
                return

    def _other_holder(self) -> bool:
        holder = (self._observed or (None,))[0]
        return bool(holder) and holder != self.identity

    async def _supervise(self, factory: LeaderTask) -> None:
        """Run a leader task; restart it with backoff if it fails, stop if it simply returns."""
        backoff, failures = Backoff(initial=0.5, maximum=30.0), 0
        while True:
            try:
                await factory()
                return
            except Exception:
                failures += 1
                log.exception("%s: leader task %s failed; restarting", self.identity,
                              getattr(factory, "__name__", factory))
                await asyncio.sleep(backoff.delay(failures))

    async def _try_acquire_or_renew(self) -> bool:
        try:
            return await self._acquire_step()
        except ApiException as exc:
            if exc.status != 409:
                log.warning("%s: lease %s/%s: API error %s %s", self.identity, self.namespace,
                            self.name, exc.status, exc.reason)
            return False
        except TRANSIENT_ERRORS as exc:
            log.warning("%s: lease %s/%s: %s", self.identity, self.namespace, self.name, exc)
            return False

    async def _acquire_step(self) -> bool:
        started = self.clock()  # a renewal's deadline counts from before the request was sent
        lease = await self.api.get_lease(self.namespace, self.name)
        if lease is None:
            await self.api.create_lease(self.namespace, self._lease_body(None, None))
            self._observe(None, self.clock())
            self._valid_until = started + self.renew_deadline
            return True
        spec = lease.get("spec") or {}
        now = self.clock()  # a change is dated when we received it, never earlier
        self._observe(spec, now)
        holder = spec.get("holderIdentity") or ""
        duration = spec.get("leaseDurationSeconds") or self.lease_duration
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False
        body = self._lease_body(spec, lease["metadata"]["resourceVersion"])
        written = await self.api.replace_lease(self.namespace, self.name, body)
        self._observe(written.get("spec") or {}, self.clock())
        self._valid_until = started + self.renew_deadline
        return True

    def _observe(self, spec: dict[str, Any] | None, now: float) -> None:
        """Remember when the Lease record last changed, by our own clock."""
        spec = spec or {}
        record = (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("leaseTransitions"),
                  spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, now

    def _lease_body(self, current: dict[str, Any] | None, resource_version: str | None) -> dict[str, Any]:
        """The Lease held by us: renewed if it was ours, taken over (one more transition) if not."""
        current = current or {}
        now = _micro_time()
        mine = current.get("holderIdentity") == self.identity
        transitions = int(current.get("leaseTransitions") or 0) + (0 if mine or not current else 1)
        return self._lease({"holderIdentity": self.identity,
                            "leaseDurationSeconds": max(1, round(self.lease_duration)),
                            "acquireTime": current.get("acquireTime") if mine else now,
                            "renewTime": now, "leaseTransitions": transitions}, resource_version)

    def _lease(self, spec: dict[str, Any], resource_version: str | None) -> dict[str, Any]:
        """A Lease object; with a resourceVersion, a write of it fails (409) if it changed meanwhile."""
        metadata = {"name": self.name, "namespace": self.namespace}
        if resource_version is not None:
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": spec}

    async def _release(self) -> None:
        """Give the Lease up so a successor need not wait for it to expire."""
        with contextlib.suppress(ApiException, *TRANSIENT_ERRORS):
            lease = await self.api.get_lease(self.namespace, self.name)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = dict(lease["spec"], holderIdentity="", leaseDurationSeconds=1,
                        renewTime=_micro_time())
            body = self._lease(spec, lease["metadata"]["resourceVersion"])
            await self.api.replace_lease(self.namespace, self.name, body)
            log.info("%s: released the lease", self.identity)
