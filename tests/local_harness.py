"""Runs `kvgate up` as a real subprocess for the local-runtime tests, and cleans up after it.

Every replica pid the status file ever showed is remembered, so teardown can prove (and if need
be, enforce) that no model-server process outlives the test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parent.parent
# Short reload, restart and stop timings, so live edits and crashes play out within a test.
FAST_LOCAL: dict[str, Any] = {"gracePeriodSeconds": 5, "reloadIntervalSeconds": 0.2,
                              "restartBackoffSeconds": 0.2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sim_model(name: str, *, min_replicas: int = 1, max_replicas: int | None = None,
              strategy: str = "LeastLoad", args: tuple[str, ...] = (),
              **extra: Any) -> dict[str, Any]:
    """A Sim Model manifest; `extra` are further spec keys as written in YAML (targetRequests=1)."""
    spec: dict[str, Any] = {
        "url": f"hf://kvgate/{name}", "engine": "Sim", "features": ["TextGeneration"],
        "minReplicas": min_replicas, "args": ["--profile", "fast", *args],
        "loadBalancing": {"strategy": strategy}, **extra,
    }
    if max_replicas is not None:
        spec["maxReplicas"] = max_replicas
    return {"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": name}, "spec": spec}


def write_models(path: Path, models: list[dict[str, Any]]) -> None:
    """Write atomically with a new mtime, as an editor saving the file would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(models, sort_keys=False))
    os.replace(tmp, path)


def kvgate(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvgate", *args], cwd=cwd or REPO, text=True,
                          capture_output=True, timeout=timeout)


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class UpProcess:
    """`kvgate up -f <models>` on free ports with its own state directory."""

    def __init__(self, workdir: Path, models: list[dict[str, Any]], *,
                 config: dict[str, Any] | None = None, metrics_port: bool = True,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.models_path = workdir / "models.yaml"
        self.state_dir = workdir / "state"
        self.port, self.metrics_port = free_port(), (free_port() if metrics_port else 0)
        write_models(self.models_path, models)
        args = ["up", "-f", str(self.models_path), "--port", str(self.port),
                "--metrics-port", str(self.metrics_port), "--state-dir", str(self.state_dir)]
        if config is not None:
            config_path = workdir / "config.yaml"
            config_path.write_text(yaml.safe_dump(config))
            args += ["-c", str(config_path)]
        args += extra_args
        self.lines: list[str] = []
        self.seen_pids: set[int] = set()
        self.proc = subprocess.Popen([sys.executable, "-m", "kvgate", *args], cwd=workdir,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_output(self, fragment: str, timeout: float = 20) -> None:
        wait_for(lambda: fragment in self.output or self.proc.poll() is not None, timeout,
                 f"{fragment!r} in the output")
        assert fragment in self.output, self.output

    def status(self) -> dict[str, Any]:
        try:
            status = json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {"models": []}
        for model in status["models"]:
            self.seen_pids.update(r["pid"] for r in model["replicas"] if r["pid"])
        return status

    def model(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.status()["models"] if m["name"] == name), None)

    def ready_pids(self, name: str) -> set[int]:
        model = self.model(name)
        return {r["pid"] for r in model["replicas"] if r["ready"]} if model else set()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode

    def close(self) -> None:
        """Stop kvgate and make sure no replica survives it, whatever the test did."""
        self.status()
        self.stop()
        for pid in self.seen_pids:
            if pid_alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
