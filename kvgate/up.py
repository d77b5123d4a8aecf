"""`kvgate up` and `kvgate status`: the whole system on one machine, no cluster.

`kvgate up -f models.yaml` runs the gateway and the local runtime in one process: this module
binds the sockets, builds the `Gateway` and the operator's `Supervisor` (models file, status
file, autoscaler, adapters), and owns signals and banners. Ctrl-C stops every replica before
exiting. `kvgate status` finds the running `kvgate up` through the status file it keeps and reads its
status API, the one the web console (`/ui`) polls.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fcntl
import json
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from lb.app import Gateway
from lb.config import ConfigError
from lb.keys import check_keys
from lb.registry import Registry
from lb.server import install_uvloop, serve
from lb_operator.local.engines import EngineUnavailable, check_engine
from lb_operator.local.manifests import ManifestError, ModelsFile, read_models_file
from lb_operator.local.runtime import LocalRuntime
from lb_operator.local.supervisor import (
    STATUS_FILE, GatewayView, Supervisor, base_url, metrics_url,
)

from kvgate.process import add_listen_args, bind_listeners, log_to_stderr
from kvgate.settings import Settings, load_settings, with_listen_args


def add_parser(commands: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """The `up` or `status` subcommand of the `kvgate` parser."""
    if name == "status":
        _add_status(commands, help_text)
        return
    up = commands.add_parser(
        name, help=help_text,
        description="Start the OpenAI-compatible gateway and run each Model in the models file "
                    "as local model-server processes. The file is re-read when it changes; "
                    "Ctrl-C stops every replica.")
    up.add_argument("-f", "--file", required=True, metavar="MODELS_YAML",
                    help="Model manifests (kvgate.dev/v1 or kubeai.org/v1; several per file)")
    up.add_argument("-c", "--config", metavar="CONFIG_YAML",
                    help="settings: gateway keys (server, retries, ...), system keys, and `local:`")
    add_listen_args(up)
    up.add_argument("--state-dir", help="status file and replica logs (overrides local.stateDir; default .kvgate)")
    up.set_defaults(run=main_up)


def _add_status(commands: argparse._SubParsersAction, help_text: str) -> None:
    status = commands.add_parser(
        "status", help=help_text,
        description="Show what the `kvgate up` using this state directory is running.")
    status.add_argument("--state-dir", default=os.environ.get("KVGATE_STATE_DIR", ".kvgate"),
                        help="the state directory of `kvgate up` (default .kvgate)")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.add_argument("--api-key", default=os.environ.get("KVGATE_API_KEY", ""),
                        help="with API keys on, a key named in console.adminKeys (default: "
                             "$KVGATE_API_KEY)")
    status.set_defaults(run=lambda args: show_status(Path(args.state_dir), as_json=args.json,
                                                     api_key=args.api_key))


LOCK_FILE = "lock"
STATUS_API = "/ui/api/status"


class StateDirBusy(Exception):
    """Another `kvgate up` holds the state directory."""


def main_up(args: argparse.Namespace) -> int:
    log_to_stderr()
    try:
        up = prepare(args)
    except (ConfigError, ManifestError, EngineUnavailable, StateDirBusy, OSError) as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 2
    install_uvloop()
    return asyncio.run(up.run())


def prepare(args: argparse.Namespace) -> Up:
    """Everything that can fail fast, before any process starts: config, models, engines, ports."""
    settings = load_settings(args.config)
    if settings.gateway.models or settings.gateway.endpoints:
        raise ConfigError((), "`models`/`endpoints` are for `kvgate gateway`; "
                          "with `kvgate up`, Models come from the -f file", file=str(args.config))
    settings = _with_overrides(settings, args)
    check_keys(settings.gateway.api_keys)
    models = read_models_file(args.file)
    for model in models.models:
        check_engine(model, settings.local, models.base_dir)
    lock = lock_state_dir(Path(settings.local.state_dir))
    try:
        sock, metrics_sock = bind_listeners(settings.gateway.server)
    except OSError:
        lock.close()
        raise
    for listener in (sock, metrics_sock):  # no child process needs them (see processes.py)
        if listener is not None:
            listener.set_inheritable(False)
    return Up(settings, models, sock, metrics_sock, lock)


def lock_state_dir(state_dir: Path) -> IO[str]:
    """An exclusive lock on `<state_dir>/lock`, held as long as the returned file stays open
    (the process's life): two `kvgate up` on one state directory would overwrite each other's
    status file, share replica logs and saved counts. The lock file says which pid holds it;
    the kernel releases the lock however the holder exits, so a stale file never blocks."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    lock = open(path, "a+")  # not inherited by replicas (close-on-exec)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise StateDirBusy(f"state directory {state_dir} is in use by another `kvgate up` "
                           f"(pid {holder}); stop it, or pass --state-dir for a separate one") from None
    except OSError:
        lock.close()
        raise
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    gateway = with_listen_args(settings.gateway, args)
    local = settings.local
    if args.state_dir:
        local = dataclasses.replace(local, state_dir=args.state_dir)
    if gateway.console.enabled is None:  # the console is on by default here
        gateway = dataclasses.replace(gateway, console=dataclasses.replace(gateway.console,
                                                                           enabled=True))
    if not gateway.batch.state_dir:  # the Batch API keeps its files beside the replicas' logs
        batch = dataclasses.replace(gateway.batch, state_dir=str(Path(local.state_dir) / "batch"))
        gateway = dataclasses.replace(gateway, batch=batch)
    return dataclasses.replace(settings, gateway=gateway, local=local)


class Up:
    """One `kvgate up` process: the gateway and the supervisor, on sockets already bound."""

    def __init__(self, settings: Settings, models: ModelsFile, sock: socket.socket,
                 metrics_sock: socket.socket | None, lock: IO[str] | None = None) -> None:
        self.settings = settings
        self.lock = lock  # the state directory's, held until the process exits
        self.models = models
        self.sock, self.metrics_sock = sock, metrics_sock
        self.signals = 0
        self.runtime: LocalRuntime | None = None

    async def run(self) -> int:
        settings = self.settings
        registry = Registry()
        self.runtime = runtime = LocalRuntime(registry, settings.local,
                                              surge=settings.system.model_rollouts.surge)
        gateway = Gateway(settings.gateway, registry, runtime)
        view = GatewayView(settings.gateway.server, gateway.metrics.registry,
                           gateway.balancer.waiting)
        supervisor = Supervisor(runtime, self.models, settings.local,
                                settings.system.model_autoscaling, view)
        gateway.console.set_control(supervisor.status)  # replicas not ready yet, pids, logs
        self._catch_signals()
        await supervisor.start()
        _banner(supervisor)
        serving = asyncio.Event()
        tasks = [asyncio.create_task(supervisor.run(serving)),
                 asyncio.create_task(_announce_ready(supervisor))]
        try:
            await serve(gateway, self.sock, self.metrics_sock, started=serving)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            print("kvgate: stopping replicas ...", file=sys.stderr, flush=True)
            await supervisor.close()
        return 0

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


def _banner(supervisor: Supervisor) -> None:
    runtime = supervisor.runtime
    server = supervisor.gateway.server
    metrics = metrics_url(server)
    lines = [f"kvgate: serving the OpenAI API on {base_url(server)}",
             f"kvgate: Prometheus metrics on {metrics}" if metrics else
             "kvgate: metrics port disabled (server.metricsPort 0)",
             f"kvgate: models from {supervisor.models_file.path} (re-read on change); "
             f"logs in {supervisor.state_dir / 'logs'}; `kvgate status` for details"]
    for model in runtime.models():
        desired = runtime.desired(model.name)
        lines.append(f"  {model.name:<24} {model.spec.engine:<13} "
                     f"{model.spec.load_balancing.strategy:<10} replicas {desired} "
                     f"(min {model.spec.min_replicas}, max {model.spec.max_replicas or '-'})")
    print("\n".join(lines), flush=True)


async def _announce_ready(supervisor: Supervisor) -> None:
    """Print once when every model has its initial replicas ready."""
    counts = await supervisor.wait_ready()
    summary = ", ".join(f"{name} {ready}/{desired}" for name, (ready, desired) in counts.items())
    print(f"kvgate: ready: {summary}", flush=True)


def show_status(state_dir: Path, *, as_json: bool = False, api_key: str = "") -> int:
    """The status file says where the running `kvgate up` serves; its status API (the
    console's) says what it runs, the same document the console shows. With the console
    turned off the file's own copy is shown."""
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
    try:
        status = read_status_api(status["baseUrl"], api_key) or status
    except StatusApiError as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


class StatusApiError(Exception):
    """The status API refused the request (a key is missing or not an admin's)."""


def read_status_api(base_url: str, api_key: str = "", timeout: float = 5.0) -> dict[str, Any] | None:
    """GET the console's status API of the gateway at ``base_url`` (its ``/v1`` URL); None
    when the console is off (404) or the gateway does not answer, so the caller falls back."""
    url = base_url.removesuffix("/v1") + STATUS_API
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"}
                                     if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {exc.code}"
            raise StatusApiError(f"{url}: {message} (pass an admin key with --api-key or "
                                 "KVGATE_API_KEY)") from None
        return None
    except (OSError, ValueError):
        return None


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


def _replica_notes(replica: dict[str, Any]) -> str:
    notes = ""
    if replica["adapters"]:
        notes += f" adapters={','.join(replica['adapters'])}"
    engine = replica.get("engine")
    if engine:
        notes += f" queue {engine['waiting']:g} kv {engine['kvUsage']:.0%}"
    if replica.get("ejectedSeconds") is not None:
        notes += f" EJECTED ({replica['ejectedSeconds']:g}s left)"
    return notes


def format_status(status: dict[str, Any]) -> str:
    lines = [f"kvgate up (pid {status['pid']}): {status['baseUrl']}",
             f"models file: {status['modelsFile']}"]
    if status.get("metricsUrl"):
        lines.append(f"metrics: {status['metricsUrl']}")
    header = (f"{'MODEL':<24} {'ENGINE':<13} {'STRATEGY':<10} {'READY':>7} {'IN-FLIGHT':>9} "
              f"{'WAITING':>7} {'REQ/S':>7} {'TTFB-P90':>8}  ADAPTERS")
    lines += ["", header]
    for m in status["models"]:
        adapters = ", ".join(f"{m['name']}_{a}" for a in m["adapters"]) or "-"
        traffic = m.get("traffic") or {}
        p90 = (traffic.get("ttftSeconds") or {}).get("p90")
        lines.append(f"{m['name']:<24} {m['engine']:<13} {m['strategy']:<10} "
                     f"{str(m['ready']) + '/' + str(m['desired']):>7} {m['inFlight']:>9} "
                     f"{m['waiting']:>7} {traffic.get('requestsPerSecond', 0):>7.2f} "
                     f"{'-' if p90 is None else f'{p90 * 1000:.0f}ms':>8}  {adapters}")
        for r in m["replicas"]:
            lines.append(f"  {r['name']:<22} {r['state']:<9} {r['address']:<21} pid {r['pid']} "
                         f"in-flight {r['inFlight']}{_replica_notes(r)}")
    return "\n".join(lines)
