"""`kvgate up` for real: a subprocess running simulated replicas as processes, reached through
the gateway with the official `openai` SDK, the models file edited while it runs, replicas killed,
and kvgate itself stopped by signal with every child process accounted for."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Iterator

import openai
import pytest
import yaml

from tests.local_harness import (
    FAST_LOCAL, UpProcess, free_port, kvgate, pid_alive, sim_model, wait_for, write_models,
)

CHAT = sim_model("chat", min_replicas=2, strategy="PrefixHash")
ZERO = sim_model("zero", min_replicas=0, max_replicas=1)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    process = UpProcess(tmp_path_factory.mktemp("up"), [CHAT, ZERO],
                        config={"local": FAST_LOCAL})
    try:
        process.wait_output("kvgate: ready:")
        wait_for(lambda: len(process.ready_pids("chat")) == 2, 10, "the status file")
        yield process
    finally:
        process.close()


def client(up: UpProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=30)


def ask(up: UpProcess, model: str = "chat", content: str = "Hello there") -> str:
    reply = client(up).chat.completions.create(
        model=model, max_tokens=8, messages=[{"role": "user", "content": content}])
    return reply.choices[0].message.content or ""


class Traffic:
    """Requests in a loop on a thread while something happens; every one must succeed."""

    def __init__(self, up: UpProcess, model: str = "chat") -> None:
        self.up, self.model = up, model
        self.ok, self.errors = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                ask(self.up, self.model, f"conversation {i % 7}")
                self.ok += 1
            except Exception as exc:  # collected and asserted on by the test
                self.errors.append(repr(exc))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_banner_lists_url_models_and_replicas(up: UpProcess) -> None:
    assert f"http://127.0.0.1:{up.port}/v1" in up.output
    assert "chat" in up.output and "PrefixHash" in up.output and "replicas 2" in up.output
    assert "zero" in up.output and "replicas 0" in up.output


def test_banner_shows_the_metrics_url(up: UpProcess) -> None:
    url = f"http://127.0.0.1:{up.metrics_port}/metrics"
    banner = up.output.split("kvgate: ready:")[0]
    assert url in banner
    assert up.status()["metricsUrl"] == url


def test_chat_completion_and_stream_through_the_sdk(up: UpProcess) -> None:
    assert ask(up)
    chunks = list(client(up).chat.completions.create(
        model="chat", max_tokens=8, stream=True, messages=[{"role": "user", "content": "Hi"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text
    models = {m.id for m in client(up).models.list()}
    assert {"chat", "zero"} <= models


def test_access_log_is_off_unless_asked_for(up: UpProcess, tmp_path: Path) -> None:
    """`kvgate up --access-log` logs one line per request; without it, none (the `up` fixture)."""
    assert {m.id for m in client(up).models.list()}
    logged = UpProcess(tmp_path, [ZERO], config={"local": FAST_LOCAL}, extra_args=("--access-log",))
    try:
        logged.wait_output("kvgate: ready:")
        sdk = openai.OpenAI(base_url=logged.base_url, api_key="unused", max_retries=0, timeout=30)
        assert "zero" in {m.id for m in sdk.models.list()}
        urllib.request.urlopen(f"http://127.0.0.1:{logged.metrics_port}/metrics", timeout=10).read()
        logged.wait_output('"GET /v1/models HTTP/1.1" 200')
    finally:
        logged.close()
    assert "GET /metrics" not in logged.output  # the metrics listener is never logged
    assert "GET /v1/models" not in up.output


def test_status_command_shows_models_replicas_and_endpoints(up: UpProcess) -> None:
    result = kvgate("status", "--state-dir", str(up.state_dir))
    assert result.returncode == 0, result.stderr
    assert up.base_url in result.stdout
    lines = result.stdout.splitlines()
    chat_line = next(line for line in lines if line.startswith("chat "))
    assert "PrefixHash" in chat_line and "2/2" in chat_line
    status = json.loads(kvgate("status", "--state-dir", str(up.state_dir), "--json").stdout)
    chat = next(m for m in status["models"] if m["name"] == "chat")
    for replica in chat["replicas"]:
        assert replica["state"] == "ready" and replica["address"] in result.stdout
        assert Path(replica["log"]).is_file()


def test_scale_from_zero_on_first_request(up: UpProcess) -> None:
    assert up.ready_pids("zero") == set()
    assert ask(up, "zero")
    model = wait_for(lambda: up.model("zero") if up.ready_pids("zero") else None, 10, "zero ready")
    assert model["desired"] == 1 and model["ready"] == 1


def test_killed_replica_is_restarted_and_traffic_continues(up: UpProcess) -> None:
    before = up.ready_pids("chat")
    assert len(before) == 2
    victim = min(before)
    with Traffic(up) as traffic:
        wait_for(lambda: traffic.ok >= 3, 10, "traffic flowing")
        os.kill(victim, signal.SIGKILL)
        after = wait_for(lambda: _replaced(up.ready_pids("chat"), victim), 15, "a replacement replica")
        served = traffic.ok
        wait_for(lambda: traffic.ok >= served + 3, 10, "traffic after the restart")
    assert traffic.errors == []
    assert not pid_alive(victim) and len(after - before) == 1


def _replaced(pids: set[int], victim: int) -> set[int] | None:
    return pids if len(pids) == 2 and victim not in pids else None


def test_models_file_edits_add_update_and_remove_models_live(up: UpProcess) -> None:
    extra = sim_model("extra", min_replicas=1)
    write_models(up.models_path, [CHAT, ZERO, extra])
    wait_for(lambda: up.ready_pids("extra"), 15, "the added model's replica")
    assert ask(up, "extra")
    extra_pids = up.ready_pids("extra")

    old = up.ready_pids("chat")
    updated = sim_model("chat", min_replicas=2, strategy="PrefixHash", args=("--seed", "7"))
    with Traffic(up) as traffic:
        write_models(up.models_path, [updated, ZERO, extra])
        wait_for(lambda: len(p := up.ready_pids("chat")) == 2 and not p & old, 30, "a rolled-out model")
    assert traffic.errors == [] and traffic.ok > 0
    wait_for(lambda: not any(pid_alive(p) for p in old), 10, "the old replicas stopped")

    write_models(up.models_path, [updated, ZERO])
    wait_for(lambda: up.model("extra") is None, 15, "the removed model gone")
    with pytest.raises(openai.NotFoundError):
        ask(up, "extra")
    wait_for(lambda: not any(pid_alive(p) for p in extra_pids), 10, "its replica stopped")


def test_bad_models_file_on_reload_keeps_the_running_models(up: UpProcess) -> None:
    pids = up.ready_pids("chat")
    up.models_path.write_text(up.models_path.read_text().replace("minReplicas: 2", "minReplicas: two"))
    up.wait_output("keeping the running models")
    assert "spec.minReplicas" in up.output
    assert ask(up) and up.ready_pids("chat") == pids


def test_ctrl_c_and_sigterm_leave_no_process_behind(tmp_path: Path) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        work = tmp_path / sig.name
        work.mkdir()
        process = UpProcess(work, [sim_model("m", min_replicas=2)])
        try:
            process.wait_output("kvgate: ready:")
            pids = wait_for(lambda: p if len(p := process.ready_pids("m")) == 2 else None, 10,
                            "the status file")
            assert process.stop(sig) == 0
            assert "stopping replicas" in process.output
            assert not [p for p in pids if pid_alive(p)]
            assert not (process.state_dir / "status.json").exists()
        finally:
            process.close()


# -- start-up errors: before any process starts -------------------------------------------------


def run_up(tmp_path: Path, models_text: str, *extra: str) -> tuple[int, str]:
    path = tmp_path / "models.yaml"
    path.write_text(models_text)
    result = kvgate("up", "-f", str(path), "--port", str(free_port()), "--metrics-port", "0",
                    "--state-dir", str(tmp_path / "state"), *extra, cwd=tmp_path)
    return result.returncode, result.stderr


BAD = """\
apiVersion: kvgate.dev/v1
kind: Model
metadata: {name: ok}
spec: {url: "hf://a/b", engine: Sim, features: [TextGeneration]}
---
apiVersion: kvgate.dev/v1
kind: Model
metadata:
  name: broken
spec:
  url: hf://a/b
  engine: Sim
  features: [TextGeneration]
  minReplicas: 3
  maxReplicas: 2
"""


def test_bad_file_exits_with_line_and_field(tmp_path: Path) -> None:
    code, err = run_up(tmp_path, BAD)
    assert code == 2
    assert "models.yaml:14:" in err and "spec.minReplicas" in err and "broken" in err
    code, err = run_up(tmp_path, BAD.replace("engine: Sim\n  features", "engine: Simm\n  features"))
    assert code == 2 and "models.yaml:12:" in err and "spec.engine" in err
    code, err = run_up(tmp_path, "a: [b\n")
    assert code == 2 and "models.yaml:2:" in err and "not valid YAML" in err


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        code, err = run_up(tmp_path, BAD.split("---")[0], "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err


def test_missing_engine_is_a_clear_error(tmp_path: Path) -> None:
    vllm = BAD.split("---")[0].replace("engine: Sim", "engine: VLLM")
    code, err = run_up(tmp_path, vllm)
    assert code == 2 and "engine VLLM" in err and "`vllm` is not installed" in err
    ollama = BAD.split("---")[0].replace("engine: Sim", "engine: OLlama").replace("hf://a/b", "ollama://qwen2:0.5b")
    code, err = run_up(tmp_path, ollama, "-c", str(_config(tmp_path, {"local": {"engines": {
        "OLlama": {"command": ["no-such-ollama-binary", "serve"]}}}})))
    assert code == 2 and "`no-such-ollama-binary` is not installed" in err


def _config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_help_and_status_without_a_running_up(tmp_path: Path) -> None:
    for args in (["--help"], ["up", "--help"], ["status", "--help"]):
        result = kvgate(*args)
        assert result.returncode == 0 and "usage: kvgate" in result.stdout
    assert "kvgate up" in kvgate("--help").stdout or "up" in kvgate("--help").stdout
    result = kvgate("status", "--state-dir", str(tmp_path))
    assert result.returncode == 1 and "no `kvgate up` is running" in result.stderr


def test_top_level_help_describes_kvgate_without_markup() -> None:
    result = kvgate("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert "``" not in result.stdout and "The kvgate command" not in result.stdout
    assert "OpenAI-compatible" in result.stdout
    for command in ("gateway", "up", "status", "serve", "sim", "--version"):
        assert command in result.stdout


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    result = kvgate("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"kvgate {version('kvgate')}"


def test_license_is_the_apache_2_0_text_pyproject_declares() -> None:
    import hashlib
    import tomllib

    from tests.local_harness import REPO

    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"] == {
        "text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    for heading in ("1. Definitions.", "2. Grant of Copyright License.", "3. Grant of Patent License.",
                    "4. Redistribution.", "5. Submission of Contributions.", "6. Trademarks.",
                    "7. Disclaimer of Warranty.", "8. Limitation of Liability.",
                    "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS"):
        assert heading in text
    # The text as the ASF publishes it at https://www.apache.org/licenses/LICENSE-2.0.txt.
    assert hashlib.md5(text.encode()).hexdigest() == "3b83ef96387f14655fc854ddc3c6bd57"


def test_status_shows_what_each_replica_reports_of_its_own_load(up: UpProcess) -> None:
    """The gateway scrapes the simulated vLLM replicas' /metrics; `kvgate status` shows it."""
    def readings() -> list:
        status = json.loads(kvgate("status", "--state-dir", str(up.state_dir), "--json").stdout)
        chat = next(m for m in status["models"] if m["name"] == "chat")
        return [r["engine"] for r in chat["replicas"]]

    wait_for(lambda: all(readings()), 15, "engine readings in the status file")
    for reading in readings():
        assert reading["waiting"] >= 0 and 0 <= reading["kvUsage"] <= 1
        assert reading["ageSeconds"] < 10
    text = kvgate("status", "--state-dir", str(up.state_dir)).stdout
    assert text.count(" queue ") >= 2 and " kv " in text
    assert "EJECTED" not in text


def _listening() -> dict[str, int]:
    """Listening TCP sockets on this machine: inode -> port (from /proc/net/tcp and tcp6)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                found[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    return found


def _held_sockets(pid: int) -> set[str]:
    """The socket inodes among a process's open file descriptors."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def test_replicas_hold_no_listening_socket_but_their_own(up: UpProcess) -> None:
    """A replica outliving kvgate must not keep the gateway's ports bound."""
    status = up.model("chat")
    assert status is not None and status["replicas"]
    listening = _listening()
    gateway_ports = {p for inode, p in listening.items() if inode in _held_sockets(up.proc.pid)}
    assert {up.port, up.metrics_port} <= gateway_ports
    for replica in status["replicas"]:
        own = int(replica["address"].rsplit(":", 1)[1])
        ports = {listening[i] for i in _held_sockets(replica["pid"]) if i in listening}
        assert ports == {own}, (replica["name"], ports)


def test_a_second_up_on_the_same_state_directory_exits_before_starting_anything(up: UpProcess) -> None:
    logs = sorted(p.name for p in (up.state_dir / "logs").rglob("*.log"))
    before = up.status()
    port = free_port()
    models = up.workdir / "other.yaml"
    write_models(models, [sim_model("other", min_replicas=1)])
    result = kvgate("up", "-f", str(models), "--port", str(port), "--metrics-port", "0",
                    "--state-dir", str(up.state_dir))
    assert result.returncode != 0
    assert f"pid {up.proc.pid}" in result.stderr and str(up.state_dir) in result.stderr
    with socket.socket() as probe:  # it never bound its port
        probe.bind(("127.0.0.1", port))
    assert sorted(p.name for p in (up.state_dir / "logs").rglob("*.log")) == logs
    after = up.status()
    assert after["pid"] == before["pid"] == up.proc.pid
    assert not (up.state_dir / "logs" / "other").exists()
    assert ask(up)


def test_the_state_directory_lock_is_released_on_exit(tmp_path: Path) -> None:
    import fcntl

    process = UpProcess(tmp_path, [sim_model("m", min_replicas=1)])
    try:
        process.wait_output("kvgate: ready:")
        lock = process.state_dir / "lock"
        with lock.open("a") as held:
            with pytest.raises(BlockingIOError):
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert process.stop() == 0
        with lock.open("a") as free:
            fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        process.close()


def test_status_into_a_closed_pipe_exits_quietly(up: UpProcess) -> None:
    """`kvgate status --json | head -1`: the reader is gone before the output is written."""
    import subprocess
    import sys

    for extra in (["--json"], []):
        proc = subprocess.Popen([sys.executable, "-m", "kvgate", "status", "--state-dir",
                                 str(up.state_dir), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(30) == 141  # as if killed by SIGPIPE, like other shell tools
        assert "Traceback" not in err and "BrokenPipeError" not in err and err == "", err


def test_replicas_are_numbered_per_model(tmp_path: Path) -> None:
    process = UpProcess(tmp_path, [sim_model("a", min_replicas=2), sim_model("b", min_replicas=1)])
    try:
        process.wait_output("kvgate: ready:")
        write_models(process.models_path, [sim_model("a", min_replicas=2),
                                           sim_model("b", min_replicas=1), sim_model("c")])
        wait_for(lambda: process.ready_pids("c"), 15, "the added model's replica")
        names = {m["name"]: sorted(r["name"] for r in m["replicas"]) for m in process.status()["models"]}
        assert names == {"a": ["a-1", "a-2"], "b": ["b-1"], "c": ["c-1"]}
        logs = sorted(p.name for p in (process.state_dir / "logs").rglob("*.log"))
        assert logs == ["a-1.log", "a-2.log", "b-1.log", "c-1.log"]
    finally:
        process.close()


def test_status_marks_an_ejected_replica() -> None:
    from kvgate.up import format_status

    replica = {"name": "chat-1", "state": "ready", "address": "127.0.0.1:9", "pid": 7,
               "inFlight": 0, "adapters": [], "ejectedSeconds": 4.5,
               "engine": {"waiting": 3.0, "running": 1.0, "kvUsage": 0.5, "ageSeconds": 0.2}}
    status = {"pid": 1, "baseUrl": "http://x/v1", "modelsFile": "m.yaml", "models": [
        {"name": "chat", "engine": "Sim", "strategy": "LeastQueue", "ready": 1, "desired": 1,
         "inFlight": 0, "waiting": 0, "adapters": [], "replicas": [replica]}]}
    line = format_status(status).splitlines()[-1]
    assert line.endswith("in-flight 0 queue 3 kv 50% EJECTED (4.5s left)")
