"""The control loops of `kvgate up`: the models file, the status file, the autoscaler, adapters.

Model manifests from the file become model-server processes (`LocalRuntime`); the file is
re-read when it changes. While it runs, `<state-dir>/status.json` is kept up to date for
`kvgate status` (the admin view never appears under the OpenAI port's /v1 namespace).

The rest of the control plane runs here too, wired as in a cluster: the autoscaler (state in
`<state-dir>/autoscaler.json`) reads this gateway's metrics (active requests, and the replicas'
own queues and KV-cache usage as the gateway re-exports them), from its own /metrics port or,
with that port disabled, straight from the in-process registry (one gateway process: the
numbers are the same); LoRA adapters are synced onto ready replicas (`local.adapters`).

The gateway itself is the caller's: it hands over only what these loops read of it
(`GatewayView`), so the control plane never imports the data plane's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, generate_latest

from lb.config import ServerConfig
from lb.model import Model, ModelValidationError, validate_update

from lb_operator.autoscaler import Autoscaler, Target
from lb_operator.local.adapters import LocalAdapters
from lb_operator.local.config import LocalConfig
from lb_operator.local.engines import EngineUnavailable, check_engine
from lb_operator.local.manifests import ManifestError, ModelsFile, diff_models, read_models_file
from lb_operator.local.runtime import LocalRuntime
from lb_operator.retry import wait_until_set
from lb_operator.state_files import JsonFileStateStore, write_atomic
from lb_operator.system_config import ModelAutoscaling

log = logging.getLogger("kvgate.up")
STATUS_FILE = "status.json"
AUTOSCALER_FILE = "autoscaler.json"
ADAPTERS_DIR = "adapters"
STATUS_PERIOD = 1.0  # seconds between status refreshes (in-flight counts move constantly)


@dataclass(frozen=True, slots=True)
class GatewayView:
    """What the loops read of the gateway serving beside them."""

    server: ServerConfig  # where it listens: the status file's URLs, the autoscaler's scrape
    metrics: CollectorRegistry  # its metrics, rendered in-process when the metrics port is off
    waiting: Callable[[str], int]  # requests of a model waiting for a replica


def base_url(server: ServerConfig) -> str:
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"http://{host}:{server.port}/v1"


def metrics_url(server: ServerConfig) -> str | None:
    """The gateway's Prometheus endpoint; None with the metrics port disabled."""
    if not server.metrics_port:
        return None
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"http://{host}:{server.metrics_port}/metrics"


class Supervisor:
    """One `kvgate up`'s control plane around a `LocalRuntime`: ``start``, ``run``, ``close``."""

    def __init__(self, runtime: LocalRuntime, models: ModelsFile, local: LocalConfig,
                 autoscaling: ModelAutoscaling, gateway: GatewayView) -> None:
        self.runtime = runtime
        self.models_file = models
        self.local = local
        self.gateway = gateway
        self.state_dir = Path(local.state_dir)
        self.stamp = _stamp(models.path)
        self.started = time.time()
        self.autoscaler = self._autoscaler(autoscaling)
        self.adapters = LocalAdapters(runtime, self.state_dir / ADAPTERS_DIR,
                                      lambda: self.models_file.base_dir)

    async def start(self) -> None:
        """Resume saved replica counts, then start every Model of the file."""
        await self.runtime.counts.load()
        for model in self.models_file.models:
            self.runtime.apply(model, self.models_file.base_dir)

    async def run(self, serving: asyncio.Event) -> None:
        """The loops, until cancelled; one failing leaves the others running."""
        await asyncio.gather(self._watch_models(), self._write_status(), self._autoscale(serving),
                             return_exceptions=True)

    async def close(self) -> None:
        """Stop adapter workers and every replica; the status file goes with them."""
        await self.adapters.close()
        await self.runtime.close()
        with contextlib.suppress(OSError):
            (self.state_dir / STATUS_FILE).unlink()

    async def wait_ready(self) -> dict[str, tuple[int, int]]:
        """(ready, desired) per model, once every model has its initial replicas ready."""
        runtime = self.runtime
        while True:
            changed = runtime.changed
            counts = {m.name: (sum(r.ready for r in runtime.replicas(m.name)), runtime.desired(m.name))
                      for m in runtime.models()}
            if all(ready >= desired for ready, desired in counts.values()):
                return counts
            await changed.wait()

    # -- the autoscaler ------------------------------------------------------------------------

    def _autoscaler(self, config: ModelAutoscaling) -> Autoscaler:
        """The same autoscaler as in a cluster. `models` come from the registry, whose Models
        carry the runtime's current replica count (the file's versions do not)."""
        runtime = self.runtime
        return Autoscaler(
            config, models=runtime.registry.models, gateways=self._metrics_targets,
            set_replicas=runtime.set_replicas,
            store=JsonFileStateStore(self.state_dir / AUTOSCALER_FILE),
            session=runtime.session)

    async def _autoscale(self, serving: asyncio.Event) -> None:
        """Start once the gateway listens, so the first scrape of its /metrics is not refused."""
        await serving.wait()
        await self.autoscaler.run()

    def _metrics_targets(self) -> list[Target]:
        """This gateway's /metrics, over HTTP like any other scrape; with the metrics port
        disabled, the exposition the port would serve, rendered in-process."""
        server = self.gateway.server
        if server.metrics_port:
            return [f"{_loopback(server.host)}:{server.metrics_port}"]
        registry = self.gateway.metrics
        return [lambda: generate_latest(registry)]

    # -- the models file -----------------------------------------------------------------------

    async def _watch_models(self) -> None:
        period = self.local.reload_interval_seconds
        while True:
            await asyncio.sleep(period)
            stamp = await asyncio.to_thread(_stamp, self.models_file.path)
            if stamp == self.stamp:
                continue
            self.stamp = stamp
            try:
                await self._reload()
            except Exception:
                log.exception("reloading %s failed; the running models are unchanged",
                              self.models_file.path)

    async def _reload(self) -> None:
        path = self.models_file.path
        try:
            new = await asyncio.to_thread(read_models_file, path)
        except ManifestError as exc:
            log.error("%s; keeping the running models", exc)
            return
        running = {m.name: m for m in self.runtime.models()}
        added, changed, removed = diff_models(running, new.models)
        self.models_file = new  # before the adapter sync reads its directory
        for model in added + changed:
            if self._acceptable(model, running.get(model.name), new.base_dir):
                self.runtime.apply(model, new.base_dir)
                log.info("model %s: %s", model.name, "updated" if model.name in running else "added")
                self.adapters.model_changed(model.name)
        for name in removed:
            log.info("model %s: removed from %s; stopping its replicas", name, path)
            await self.runtime.remove(name)
            self.adapters.model_changed(name)  # a worker retrying a failed pass ends

    def _acceptable(self, model: Model, old: Model | None, base_dir: Path) -> bool:
        try:
            if old is not None:
                validate_update(old, model)
            check_engine(model, self.local, base_dir)
        except (ModelValidationError, EngineUnavailable) as exc:
            what = "update" if old is not None else "new model"
            log.error("model %s: %s; %s not applied", model.name, exc, what)
            return False
        return True

    # -- status --------------------------------------------------------------------------------

    async def _write_status(self) -> None:
        path = self.state_dir / STATUS_FILE
        last = ""
        while True:
            changed = self.runtime.changed
            text = json.dumps(self.status(), indent=1)
            if text != last:
                await asyncio.to_thread(write_atomic, path, text)
                last = text
            # At once on a replica change; at least every period for the in-flight counts.
            await wait_until_set(changed, STATUS_PERIOD)

    def status(self) -> dict[str, Any]:
        server = self.gateway.server
        return {
            "pid": os.getpid(), "baseUrl": base_url(server), "started": self.started,
            "metricsUrl": metrics_url(server),
            "modelsFile": str(self.models_file.path), "stateDir": str(self.state_dir),
            "models": [self._model_status(m) for m in self.runtime.models()],
        }

    def _model_status(self, model: Model) -> dict[str, Any]:
        group = self.runtime.registry.group(model.name)
        ring, now = group.ring, time.monotonic()
        ejected = group.outliers.current() if group.outliers is not None else {}
        replicas = []
        for r in self.runtime.replicas(model.name):
            inflight = ring.load(r.key) if r.key in ring else 0
            replicas.append({"name": r.name, "pid": r.pid, "address": r.address, "state": r.state,
                             "ready": r.ready, "adapters": sorted(r.adapters), "inFlight": inflight,
                             "ejectedSeconds": round(ejected[r.key] - now, 1) if r.key in ejected else None,
                             "engine": _engine_status(group.engine.get(r.key), now), "log": r.log})
        return {
            "name": model.name, "engine": model.spec.engine, "features": list(model.spec.features),
            "strategy": model.spec.load_balancing.strategy,
            "desired": self.runtime.desired(model.name), "minReplicas": model.spec.min_replicas,
            "maxReplicas": model.spec.max_replicas,
            "ready": sum(r["ready"] for r in replicas),
            "adapters": [a.name for a in model.spec.adapters],
            "inFlight": sum(r["inFlight"] for r in replicas),
            "waiting": self.gateway.waiting(model.name),
            "replicas": replicas,
        }


def _engine_status(reading: Any, now: float) -> dict[str, float] | None:
    """The replica's own load as the gateway last scraped it, with the reading's age."""
    if reading is None:
        return None
    return {"waiting": reading.waiting, "running": reading.running,
            "kvUsage": round(reading.kv_usage, 3), "ageSeconds": round(now - reading.read_at, 1)}


def _loopback(host: str) -> str:
    """Where this process reaches its own listener bound to `host` (a wildcard is not an address)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
