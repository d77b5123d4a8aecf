"""`kvgate up` and `kvgate status`: the whole system on one machine, no cluster.

`kvgate up -f models.yaml` runs the gateway and the local runtime in one process: Model
manifests from the file become model-server processes, the file is re-read when it changes, and
Ctrl-C stops every replica before exiting. While it runs, it keeps `<state-dir>/status.json`
up to date; `kvgate status` reads that file (the admin view never appears under the OpenAI
port's /v1 namespace).

The rest of the control plane runs here too, wired as in a cluster: the autoscaler (state in
`<state-dir>/autoscaler.json`) reads this gateway's active-request metrics, from its own /metrics
port or, with that port disabled, straight from the in-process registry (one gateway process:
the numbers are the same); LoRA adapters are synced onto ready replicas (local_adapters).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from prometheus_client import generate_latest

from lb.app import Gateway
from lb.config import Config, ConfigError
from lb.model import Model, ModelValidationError, validate_update
from lb.registry import Registry
from lb.server import bind, install_uvloop, serve

from lb_operator.autoscaler import Autoscaler, Target
from lb_operator.local_adapters import LocalAdapters
from lb_operator.local_engines import EngineUnavailable, check_engine
from lb_operator.local_manifests import ManifestError, ModelsFile, diff_models, read_models_file
from lb_operator.local_runtime import LocalRuntime
from lb_operator.retry import wait_until_set
from lb_operator.settings import Settings, load_settings, with_listen_args
from lb_operator.state_files import JsonFileStateStore, write_atomic

log = logging.getLogger("kvgate.up")
STATUS_FILE = "status.json"
AUTOSCALER_FILE = "autoscaler.json"
ADAPTERS_DIR = "adapters"
STATUS_PERIOD = 1.0  # seconds between status refreshes (in-flight counts move constantly)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvgate", description="Run kvgate on this machine.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser(
        "up", help="gateway + local model servers from a models file",
        description="Start the OpenAI-compatible gateway and run each Model in the models file "
                    "as local model-server processes. The file is re-read when it changes; "
                    "Ctrl-C stops every replica.")
    up.add_argument("-f", "--file", required=True, metavar="MODELS_YAML",
                    help="Model manifests (kvgate.dev/v1 or kubeai.org/v1; several per file)")
    up.add_argument("-c", "--config", metavar="CONFIG_YAML",
                    help="settings: gateway keys (server, retries, ...), system keys, and `local:`")
    up.add_argument("--host", help="gateway listen address (overrides server.host)")
    up.add_argument("--port", type=int, help="gateway port (overrides server.port)")
    up.add_argument("--metrics-port", type=int, help="metrics port (overrides server.metricsPort; 0 disables)")
    up.add_argument("--state-dir", help="status file and replica logs (overrides local.stateDir; default .kvgate)")
    status = commands.add_parser(
        "status", help="models, replicas, endpoints and load of the running `kvgate up`",
        description="Show what the `kvgate up` using this state directory is running.")
    status.add_argument("--state-dir", default=os.environ.get("KVGATE_STATE_DIR", ".kvgate"),
                        help="the state directory of `kvgate up` (default .kvgate)")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return show_status(Path(args.state_dir), as_json=args.json)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        plan = prepare(args)
    except (ConfigError, ManifestError, EngineUnavailable, OSError) as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 2
    install_uvloop()
    return asyncio.run(plan.run())


def prepare(args: argparse.Namespace) -> Up:
    """Everything that can fail fast, before any process starts: config, models, engines, ports."""
    settings = load_settings(args.config)
    if settings.gateway.models or settings.gateway.endpoints:
        raise ConfigError((), "`models`/`endpoints` are for `kvgate gateway`; "
                          "with `kvgate up`, Models come from the -f file", file=str(args.config))
    settings = _with_overrides(settings, args)
    models = read_models_file(args.file)
    for model in models.models:
        check_engine(model, settings.local, models.base_dir)
    server = settings.gateway.server
    sock = bind(server.host, server.port)
    try:
        metrics_sock = bind(server.host, server.metrics_port) if server.metrics_port else None
    except OSError:
        sock.close()
        raise
    return Up(settings, models, sock, metrics_sock)


def _with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    gateway = with_listen_args(settings.gateway, args)
    local = settings.local
    if args.state_dir:
        local = dataclasses.replace(local, state_dir=args.state_dir)
    return dataclasses.replace(settings, gateway=gateway, local=local)


# ---------------------------------------------------------------------------------------------
# Running


class Up:
    """One `kvgate up`: the gateway, the runtime, the models-file watcher and the status file."""

    def __init__(self, settings: Settings, models: ModelsFile, sock: Any, metrics_sock: Any) -> None:
        self.settings = settings
        self.models_file = models
        self.sock, self.metrics_sock = sock, metrics_sock
        self.state_dir = Path(settings.local.state_dir)
        self.stamp = _stamp(models.path)
        self.signals = 0
        self.runtime: LocalRuntime | None = None
        self.gateway: Gateway | None = None
        self.autoscaler: Autoscaler | None = None
        self.adapters: LocalAdapters | None = None
        self.started = time.time()

    @property
    def config(self) -> Config:
        return self.settings.gateway

    @property
    def base_url(self) -> str:
        server = self.config.server
        host = f"[{server.host}]" if ":" in server.host else server.host
        return f"http://{host}:{server.port}/v1"

    async def run(self) -> int:
        registry = Registry()
        self.runtime = runtime = LocalRuntime(registry, self.settings.local,
                                              surge=self.settings.system.model_rollouts.surge)
        self.gateway = Gateway(self.config, registry, runtime)
        self.autoscaler = self._autoscaler(runtime)
        self.adapters = LocalAdapters(runtime, self.state_dir / ADAPTERS_DIR,
                                      lambda: self.models_file.base_dir)
        self._catch_signals()
        await runtime.counts.load()
        for model in self.models_file.models:
            runtime.apply(model, self.models_file.base_dir)
        self._banner()
        serving = asyncio.Event()
        tasks = [asyncio.create_task(coro) for coro in (
            self._watch_models(), self._write_status(), self._announce_ready(),
            self._autoscale(serving))]
        try:
            await serve(self.gateway, self.sock, self.metrics_sock, started=serving)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.adapters.close()
            print("kvgate: stopping replicas ...", file=sys.stderr, flush=True)
            await runtime.close()
            with contextlib.suppress(OSError):
                (self.state_dir / STATUS_FILE).unlink()
        return 0

    def _autoscaler(self, runtime: LocalRuntime) -> Autoscaler:
        """The same autoscaler as in a cluster. `models` come from the registry, whose Models
        carry the runtime's current replica count (the file's versions do not)."""
        assert self.gateway is not None
        return Autoscaler(
            self.settings.system.model_autoscaling, models=self.gateway.registry.models,
            gateways=self._metrics_targets, set_replicas=runtime.set_replicas,
            store=JsonFileStateStore(self.state_dir / AUTOSCALER_FILE),
            engine_replicas=lambda name: [r.address for r in runtime.replicas(name) if r.ready],
            session=runtime.session)

    async def _autoscale(self, serving: asyncio.Event) -> None:
        """Start once the gateway listens, so the first scrape of its /metrics is not refused."""
        assert self.autoscaler is not None
        await serving.wait()
        await self.autoscaler.run()

    def _metrics_targets(self) -> list[Target]:
        """This gateway's /metrics, over HTTP like any other scrape; with the metrics port
        disabled, the exposition the port would serve, rendered in-process."""
        assert self.gateway is not None
        server = self.config.server
        if server.metrics_port:
            return [f"{_loopback(server.host)}:{server.metrics_port}"]
        registry = self.gateway.metrics.registry
        return [lambda: generate_latest(registry)]

    def _catch_signals(self) -> None:
        """uvicorn handles the first SIGINT/SIGTERM (graceful HTTP shutdown) and re-raises it
        once done; these handlers then let the replicas be stopped in order. A further signal
        while they stop kills them at once."""
        def handler(signum: int, frame: Any) -> None:
            self.signals += 1
            if self.signals > 1 and self.runtime is not None:
                self.runtime.kill_now()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def _banner(self) -> None:
        assert self.runtime is not None
        lines = [f"kvgate: serving the OpenAI API on {self.base_url}",
                 f"kvgate: models from {self.models_file.path} (re-read on change); "
                 f"logs in {self.state_dir / 'logs'}; `kvgate status` for details"]
        for model in self.runtime.models():
            desired = self.runtime.desired(model.name)
            lines.append(f"  {model.name:<24} {model.spec.engine:<13} "
                         f"{model.spec.load_balancing.strategy:<10} replicas {desired} "
                         f"(min {model.spec.min_replicas}, max {model.spec.max_replicas or '-'})")
        print("\n".join(lines), flush=True)

    async def _announce_ready(self) -> None:
        """Print once when every model has its initial replicas ready."""
        assert self.runtime is not None
        runtime = self.runtime
        while True:
            changed = runtime.changed
            counts = {m.name: (sum(r.ready for r in runtime.replicas(m.name)), runtime.desired(m.name))
                      for m in runtime.models()}
            if all(ready >= desired for ready, desired in counts.values()):
                summary = ", ".join(f"{name} {ready}/{desired}" for name, (ready, desired) in counts.items())
                print(f"kvgate: ready: {summary}", flush=True)
                return
            await changed.wait()

    # -- the models file -----------------------------------------------------------------------

    async def _watch_models(self) -> None:
        period = self.settings.local.reload_interval_seconds
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
        assert self.runtime is not None
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
                if self.adapters is not None:
                    self.adapters.model_changed(model.name)
        for name in removed:
            log.info("model %s: removed from %s; stopping its replicas", name, path)
            await self.runtime.remove(name)
            if self.adapters is not None:
                self.adapters.model_changed(name)  # a worker retrying a failed pass ends

    def _acceptable(self, model: Model, old: Model | None, base_dir: Path) -> bool:
        try:
            if old is not None:
                validate_update(old, model)
            check_engine(model, self.settings.local, base_dir)
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
            assert self.runtime is not None
            changed = self.runtime.changed
            text = json.dumps(self.status(), indent=1)
            if text != last:
                await asyncio.to_thread(write_atomic, path, text)
                last = text
            # At once on a replica change; at least every period for the in-flight counts.
            await wait_until_set(changed, STATUS_PERIOD)

    def status(self) -> dict[str, Any]:
        assert self.runtime is not None and self.gateway is not None
        server = self.config.server
        return {
            "pid": os.getpid(), "baseUrl": self.base_url, "started": self.started,
            "metricsUrl": f"http://{server.host}:{server.metrics_port}/metrics" if server.metrics_port else None,
            "modelsFile": str(self.models_file.path), "stateDir": str(self.state_dir),
            "models": [self._model_status(m) for m in self.runtime.models()],
        }

    def _model_status(self, model: Model) -> dict[str, Any]:
        assert self.runtime is not None and self.gateway is not None
        ring = self.gateway.registry.group(model.name).ring
        replicas = []
        for r in self.runtime.replicas(model.name):
            inflight = ring.load(r.key) if r.key in ring else 0
            replicas.append({"name": r.name, "pid": r.pid, "address": r.address, "state": r.state,
                             "ready": r.ready, "adapters": sorted(r.adapters), "inFlight": inflight,
                             "log": r.log})
        return {
            "name": model.name, "engine": model.spec.engine, "features": list(model.spec.features),
            "strategy": model.spec.load_balancing.strategy,
            "desired": self.runtime.desired(model.name), "minReplicas": model.spec.min_replicas,
            "maxReplicas": model.spec.max_replicas,
            "ready": sum(r["ready"] for r in replicas),
            "adapters": [a.name for a in model.spec.adapters],
            "inFlight": sum(r["inFlight"] for r in replicas),
            "waiting": self.gateway.balancer.waiting(model.name),
            "replicas": replicas,
        }


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


# ---------------------------------------------------------------------------------------------
# kvgate status


def show_status(state_dir: Path, *, as_json: bool = False) -> int:
    path = state_dir / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"kvgate: no `kvgate up` is running with state directory {state_dir} "
              f"(no readable {path}); pass --state-dir if it uses another", file=sys.stderr)
        return 1
    if not _alive(int(status.get("pid", 0))):
        print(f"kvgate: the `kvgate up` that wrote {path} (pid {status.get('pid')}) is not running",
              file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_status(status: dict[str, Any]) -> str:
    lines = [f"kvgate up (pid {status['pid']}): {status['baseUrl']}",
             f"models file: {status['modelsFile']}"]
    if status.get("metricsUrl"):
        lines.append(f"metrics: {status['metricsUrl']}")
    header = f"{'MODEL':<24} {'ENGINE':<13} {'STRATEGY':<10} {'READY':>7} {'IN-FLIGHT':>9} {'WAITING':>7}  ADAPTERS"
    lines += ["", header]
    for m in status["models"]:
        adapters = ", ".join(f"{m['name']}_{a}" for a in m["adapters"]) or "-"
        lines.append(f"{m['name']:<24} {m['engine']:<13} {m['strategy']:<10} "
                     f"{str(m['ready']) + '/' + str(m['desired']):>7} {m['inFlight']:>9} "
                     f"{m['waiting']:>7}  {adapters}")
        for r in m["replicas"]:
            loaded = f" adapters={','.join(r['adapters'])}" if r["adapters"] else ""
            lines.append(f"  {r['name']:<22} {r['state']:<9} {r['address']:<21} pid {r['pid']} "
                         f"in-flight {r['inFlight']}{loaded}")
    return "\n".join(lines)
