"""The local runtime: Models realized as model-server processes on this machine.

One controller per Model keeps `desired` up-to-date, ready processes, level-triggered like the
cluster reconciler: every event (a replica ready, a crash, a new desired count, a new spec) just
wakes the controller, which compares what runs with what should and acts. The replica rules are
the cluster's (`lb_operator.replicas`), applied to processes instead of Pods:
- desired = the replica count set at runtime (autoscaler, scale from zero), else spec.replicas,
  else minReplicas, clamped to [minReplicas, maxReplicas];
- a spec change rolls replicas with a surge of 1: a new replica starts, and an old ready one is
  stopped only once the ready count stays >= desired without it;
- scale-down stops not-ready replicas first, then the youngest;
- a crashed replica is replaced after an exponential backoff (reset once a replica stays up).

Ready replicas are published to the gateway's registry as endpoints `local/<replica>`; a replica
leaves the registry before it is sent SIGTERM, so new requests stop reaching it while the ones in
flight finish during the engine's graceful shutdown.

Hooks for the rest of the control plane: `set_replicas` (autoscaler), `ensure_replica` (the
gateway's Scaler), `add_ready_hook` + `add_exit_hook` + `set_adapters` (LoRA loading),
`replicas`/`models`. Counts set through `set_replicas` are kept in `<stateDir>/replicas.json`
(`ReplicaCounts`), so a restart resumes them as a cluster's scale subresource would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import aiohttp

from lb.model import Model
from lb.registry import Endpoint, Registry

from lb_operator.local.config import LocalConfig
from lb_operator.local.engines import (Launch, ignored_fields, launch_hash, render_launch,
                                       write_files)
from lb_operator.local.processes import ReplicaProcess, free_port
from lb_operator.replicas import ReplicaState, desired_replicas, replica_step
from lb_operator.retry import Backoff
from lb_operator.state_files import JsonFileStateStore

log = logging.getLogger(__name__)

ENDPOINT_PREFIX = "local/"
COUNTS_FILE = "replicas.json"
STABLE_SECONDS = 10.0  # a replica up this long resets its model's crash backoff


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """A read-only picture of one replica, for hooks, status and tests."""

    model: str
    name: str
    key: str  # the registry endpoint key
    address: str
    pid: int | None
    state: str
    ready: bool
    adapters: frozenset[str]
    launch_hash: str
    log: str


ReadyHook = Callable[[Model, ReplicaView], Awaitable[None]]
ExitHook = Callable[[ReplicaView], None]


def plan_replicas(desired: int, expected: str, replicas: Iterable[ReplicaProcess],
                  surge: int = 1) -> tuple[list[ReplicaProcess], int]:
    """(replicas to stop, how many to start): the shared replica step on the live processes."""
    live = [r for r in replicas if not r.stopping and r.state != "exited"]
    step = replica_step(live, lambda r: _replica_state(r, expected), desired, surge)
    return [r for r, _ in step.to_delete], step.create


def _replica_state(replica: ReplicaProcess, expected: str) -> ReplicaState:
    """A process as the shared replica rules see it: always scheduled, never "failed" (an exited
    process has already left the live set and is replaced through the crash backoff)."""
    return ReplicaState(ready=replica.ready, current=replica.launch_hash == expected,
                        created=replica.created)


class ModelController:
    """Runs the replicas of one Model."""

    def __init__(self, runtime: LocalRuntime, model: Model, base_dir: Path) -> None:
        self.runtime = runtime
        self.model = model
        self.base_dir = base_dir
        self.expected = launch_hash(model, runtime.config, base_dir)
        self.override: int | None = None  # set_replicas; cleared when the file's replicas change
        self.replicas: list[ReplicaProcess] = []
        self.failures = 0
        self.not_before = 0.0
        self.restarts = 0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # ends the crash backoff
        self._closed = False

    # -- desired state -------------------------------------------------------------------------

    @property
    def desired(self) -> int:
        return desired_replicas(self.model, self.override)

    def update(self, model: Model, base_dir: Path) -> None:
        if model.spec.replicas != self.model.spec.replicas and self.override is not None:
            self.override = None  # an edit of the file's replicas wins over the autoscaler's value
            self.runtime.save_counts()
        self.model, self.base_dir = model, base_dir
        self.expected = launch_hash(model, self.runtime.config, base_dir)
        self.kick()

    def kick(self) -> None:
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"local-model-{self.model.name}")

    async def _run(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                self._reconcile()
            except Exception:  # a bug must not stop the model's supervision
                log.exception("model %s: reconcile failed", self.model.name)
            await self._wake.wait()

    def _reconcile(self) -> None:
        self.replicas = [r for r in self.replicas if r.state != "exited"]
        to_stop, create = plan_replicas(self.desired, self.expected, self.replicas,
                                        self.runtime.surge)
        for replica in to_stop:
            self._spawn(self._stop(replica))
        now = time.monotonic()
        if create and now < self.not_before:
            self._kick_at(self.not_before)
            return
        for _ in range(create):
            self._spawn(self._run_replica(self._new_replica()))

    def _new_replica(self) -> ReplicaProcess:
        name = f"{self.model.name}-{self.runtime.next_id(self.model.name)}"
        host = self.runtime.config.replica_host
        taken = {r.rank for r in self.replicas}
        rank = next(i for i in range(len(taken) + 1) if i not in taken)
        replica = ReplicaProcess(name=name, model=self.model.name, host=host,
                                 port=free_port(host), launch_hash=self.expected,
                                 log_path=self.runtime.log_dir / self.model.name / f"{name}.log",
                                 rank=rank)
        self.replicas.append(replica)
        return replica

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _kick_at(self, when: float) -> None:
        """Run the loop again once the backoff is over: one timer, however often it runs meanwhile."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, when - time.monotonic()), self.kick)

    # -- one replica's life --------------------------------------------------------------------

    async def _run_replica(self, replica: ReplicaProcess) -> None:
        config = self.runtime.config
        try:
            launch = render_launch(self.model, config, port=replica.port,
                                   state=replica.log_path.parent, base_dir=self.base_dir,
                                   replica=replica.name, rank=replica.rank)
            if launch.files:
                await asyncio.to_thread(write_files, launch)
            await replica.start(launch)
            log.info("replica %s: started pid %s on %s (log %s)", replica.name, replica.pid,
                     replica.address, replica.log_path)
            deadline = time.monotonic() + config.startup_timeout_seconds
            session = self.runtime.session
            if await replica.wait_healthy(session, launch.health_path, deadline) and \
                    await replica.run_setup(launch, max(1.0, deadline - time.monotonic())):
                await self._serve(replica, launch)
            elif not replica.stopping and replica.process and replica.process.returncode is None:
                log.error("replica %s: not healthy after %gs; stopping it", replica.name,
                          config.startup_timeout_seconds)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("replica %s: cannot start: %s", replica.name, exc)
        finally:
            await self._ended(replica)

    async def _serve(self, replica: ReplicaProcess, launch: Launch) -> None:
        """Ready: publish, run hooks, then re-check health until the process exits."""
        assert replica.process is not None
        replica.state, replica.ready_since = "ready", time.monotonic()
        log.info("replica %s: ready on %s", replica.name, replica.address)
        self.runtime.publish(self.model.name)
        self.kick()
        self.runtime.replica_ready(self.model, replica)
        period, failures = self.runtime.config.health_period_seconds, 0
        exited = asyncio.ensure_future(replica.process.wait())
        try:
            while not replica.stopping:
                done, _ = await asyncio.wait({exited}, timeout=period)
                if done:
                    return
                ok = await replica.healthy(self.runtime.session, launch.health_path)
                failures = 0 if ok else failures + 1
                state = "ready" if ok else ("unhealthy" if failures >= 3 else replica.state)
                if state != replica.state and not replica.stopping:
                    replica.state = state
                    log.warning("replica %s: %s", replica.name, state)
                    self.runtime.publish(self.model.name)
                    self.kick()
        finally:
            exited.cancel()

    async def _ended(self, replica: ReplicaProcess) -> None:
        """The process is gone or never came up: unpublish, and back off before replacing it."""
        crashed = not replica.stopping
        if crashed:
            await replica.stop(self.runtime.config.grace_period_seconds)
            self._crashed(replica)
        replica.state = "exited"
        self.runtime.publish(self.model.name)
        self.runtime.replica_exited(replica)
        self.kick()

    def _crashed(self, replica: ReplicaProcess) -> None:
        stable = replica.ready_since is not None and time.monotonic() - replica.ready_since >= STABLE_SECONDS
        self.failures = 1 if stable else self.failures + 1
        self.restarts += 1
        config = self.runtime.config
        backoff = Backoff(initial=config.restart_backoff_seconds,
                          maximum=config.max_restart_backoff_seconds, jitter=False)
        delay = backoff.delay(self.failures)
        self.not_before = time.monotonic() + delay
        log.warning("replica %s: exited with code %s; replacing it in %.1fs (log %s)",
                    replica.name, replica.exit_code, delay, replica.log_path)

    async def _stop(self, replica: ReplicaProcess) -> None:
        replica.stopping = True
        self.runtime.publish(self.model.name)
        log.info("replica %s: stopping", replica.name)
        await replica.stop(self.runtime.config.grace_period_seconds)
        self.kick()

    # -- shutdown ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every replica of this model and the controller itself."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
        for replica in self.replicas:
            replica.stopping = True
        self.runtime.publish(self.model.name)
        grace = self.runtime.config.grace_period_seconds
        await asyncio.gather(*(r.stop(grace) for r in self.replicas), return_exceptions=True)
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def kill_now(self) -> None:
        for replica in self.replicas:
            replica.kill_now()


class ReplicaCounts:
    """Replica counts set at runtime (autoscaler, scale from zero), kept on disk.

    In a cluster these live in each Model's scale subresource and outlive the operator; here the
    runtime is their only holder, so without this file a restart would drop every model back to
    its file's count. A saved count is restored only while the file's own `replicas` is what it
    was when saved: an edit of it made while kvgate was down wins, as it does live.
    """

    def __init__(self, path: Path) -> None:
        self.file = JsonFileStateStore(path)
        self.saved: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()  # saves in call order: a slow old write never lands last

    async def load(self) -> None:
        try:
            data = await self.file.load()
        except (OSError, ValueError) as exc:
            log.warning("replica counts not restored from %s: %s", self.file.path, exc)
            return
        models = data.get("models") if isinstance(data, dict) else None
        self.saved = {k: v for k, v in (models or {}).items() if isinstance(v, dict)}

    def restored(self, model: Model) -> int | None:
        """The saved count of a Model seen for the first time since start-up, if still valid."""
        saved = self.saved.pop(model.name, None)
        if saved is None or saved.get("fileReplicas") != model.spec.replicas:
            return None
        count = saved.get("replicas")
        return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None

    async def save(self, snapshot: Callable[[], dict[str, dict[str, Any]]]) -> None:
        async with self._lock:
            try:
                await self.file.save({"models": snapshot()})
            except OSError as exc:
                log.warning("cannot save replica counts to %s: %s", self.file.path, exc)


class LocalRuntime:
    """All local models: implements the gateway's Scaler and the autoscaler's `set_replicas`."""

    def __init__(self, registry: Registry, config: LocalConfig, *, surge: int = 1) -> None:
        self.registry = registry
        self.config = config
        self.surge = surge
        self.log_dir = Path(config.state_dir) / "logs"
        self.controllers: dict[str, ModelController] = {}
        self._ready_hooks: list[ReadyHook] = []
        self._exit_hooks: list[ExitHook] = []
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self.counts = ReplicaCounts(Path(config.state_dir) / COUNTS_FILE)
        self._ignored: dict[str, tuple[str, ...]] = {}  # per model: fields warned about
        self._ids: dict[str, int] = {}  # per model; kept when a model is removed, so a re-added
        # one does not reuse its old replicas' names (and log files)
        self._session: aiohttp.ClientSession | None = None
        self.changed = asyncio.Event()  # set on every replica change (status writer, tests)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def next_id(self, model: str) -> int:
        """The next replica number of `model`: replicas are named `<model>-1`, `<model>-2`, ..."""
        self._ids[model] = self._ids.get(model, 0) + 1
        return self._ids[model]

    # -- models --------------------------------------------------------------------------------

    def apply(self, model: Model, base_dir: Path) -> None:
        """Add a Model or update it (a changed launch rolls its replicas; replicas rescale)."""
        self._warn_ignored(model)
        controller = self.controllers.get(model.name)
        if controller is None:
            controller = self.controllers[model.name] = ModelController(self, model, base_dir)
            controller.override = self.counts.restored(model)
            if controller.override is not None:
                log.info("model %s: resuming %d replicas", model.name, controller.desired)
            controller.start()
        else:
            controller.update(model, base_dir)
        self.registry.set_model(self._with_replicas(model, controller))

    def _warn_ignored(self, model: Model) -> None:
        """Once per model (and again only if the list changes): the fields run locally ignores."""
        fields = ignored_fields(model)
        if fields and self._ignored.get(model.name) != fields:
            log.warning("model %s: %s ignored in local mode (they configure Kubernetes: cache "
                        "volumes, GPU profiles, images, Secrets, scheduling); the replicas run "
                        "as plain processes without them", model.name,
                        ", ".join(f"spec.{f}" for f in fields))
        self._ignored[model.name] = fields

    async def remove(self, name: str) -> None:
        """Stop a Model's replicas and forget it (its waiting requests get a 404)."""
        controller = self.controllers.pop(name, None)
        self.registry.delete_model(name)
        if controller is not None:
            await controller.close()
        self.registry.set_endpoints(name, [])
        self.save_counts()
        self._changed()

    # -- hooks for the gateway and the autoscaler ------------------------------------------------

    async def ensure_replica(self, model: str) -> None:
        """The gateway's Scaler: a request found no ready replica, so want at least one."""
        controller = self.controllers.get(model)
        if controller is not None and controller.desired == 0:
            log.info("model %s: scaling from zero", model)
            await self.set_replicas(model, 1)

    async def set_replicas(self, model: str, n: int) -> None:
        """Set the desired replica count (clamped to the Model's [min, max]); KeyError if unknown."""
        controller = self.controllers[model]
        controller.override = max(0, int(n))
        self.registry.set_model(self._with_replicas(controller.model, controller))
        controller.kick()
        self._changed()
        await self.counts.save(self._counts)

    def desired(self, model: str) -> int:
        return self.controllers[model].desired

    def add_ready_hook(self, hook: ReadyHook) -> None:
        """`await hook(model, replica)` each time a replica turns ready (e.g. to load adapters)."""
        self._ready_hooks.append(hook)

    def add_exit_hook(self, hook: ExitHook) -> None:
        """`hook(replica)` each time a replica's process is gone (e.g. to forget its adapters)."""
        self._exit_hooks.append(hook)

    def set_adapters(self, model: str, replica: str, adapters: Iterable[str]) -> None:
        """Record the adapters loaded on a replica; routing sends adapter requests only there.
        A model or replica that is gone meanwhile is ignored: its endpoint is gone too."""
        controller = self.controllers.get(model)
        if controller is None:
            return
        for r in controller.replicas:
            if r.name == replica:
                r.adapters = frozenset(adapters)
        self.publish(model)

    def replicas(self, model: str) -> list[ReplicaView]:
        controller = self.controllers.get(model)
        return [] if controller is None else [self._view(r) for r in controller.replicas]

    def models(self) -> list[Model]:
        return [c.model for c in self.controllers.values()]

    def model(self, name: str) -> Model | None:
        """The Model as last applied (the file's version), or None if it is not running."""
        controller = self.controllers.get(name)
        return None if controller is None else controller.model

    def save_counts(self) -> None:
        """Persist the runtime-set replica counts in the background (see ReplicaCounts)."""
        task = asyncio.create_task(self.counts.save(self._counts))
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)

    def _counts(self) -> dict[str, dict[str, Any]]:
        return {name: {"replicas": c.override, "fileReplicas": c.model.spec.replicas}
                for name, c in sorted(self.controllers.items()) if c.override is not None}

    # -- internals used by controllers ---------------------------------------------------------

    def publish(self, model: str) -> None:
        """Write the model's ready replicas to the registry (a diff: the ring keeps its loads)."""
        controller = self.controllers.get(model)
        replicas = controller.replicas if controller else []
        self.registry.set_endpoints(model, [
            Endpoint(ENDPOINT_PREFIX + r.name, r.address, r.adapters, r.rank)
            for r in replicas if r.ready])
        self._changed()

    def replica_ready(self, model: Model, replica: ReplicaProcess) -> None:
        view = self._view(replica)
        for hook in self._ready_hooks:
            task = asyncio.create_task(self._run_hook(hook, model, view))
            self._hook_tasks.add(task)
            task.add_done_callback(self._hook_tasks.discard)

    def replica_exited(self, replica: ReplicaProcess) -> None:
        view = self._view(replica)
        for hook in self._exit_hooks:
            try:
                hook(view)
            except Exception:
                log.exception("replica %s: exit hook failed", view.name)

    async def _run_hook(self, hook: ReadyHook, model: Model, view: ReplicaView) -> None:
        try:
            await hook(model, view)
        except Exception:
            log.exception("replica %s: ready hook failed", view.name)

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def _view(self, r: ReplicaProcess) -> ReplicaView:
        state = "stopping" if r.stopping and r.state != "exited" else r.state
        return ReplicaView(r.model, r.name, ENDPOINT_PREFIX + r.name, r.address, r.pid, state,
                           r.ready, r.adapters, r.launch_hash, str(r.log_path))

    @staticmethod
    def _with_replicas(model: Model, controller: ModelController | None) -> Model:
        """The Model as the registry should see it: spec.replicas = the runtime's desired count,
        as a cluster's scale subresource would show it."""
        if controller is None or controller.override is None:
            return model
        return dataclasses.replace(model, spec=dataclasses.replace(model.spec,
                                                                  replicas=controller.override))

    # -- shutdown ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every replica (SIGTERM, SIGKILL after the grace period), then the HTTP client."""
        await asyncio.gather(*(c.close() for c in self.controllers.values()), return_exceptions=True)
        for name in self.controllers:
            self.registry.set_endpoints(name, [])
        for task in list(self._hook_tasks):
            task.cancel()
        await asyncio.gather(*self._hook_tasks, return_exceptions=True)
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
            self._session = None

    def kill_now(self) -> None:
        """SIGKILL every replica's process group at once (a second Ctrl-C)."""
        for controller in self.controllers.values():
            controller.kill_now()
