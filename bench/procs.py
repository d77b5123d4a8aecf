"""Process plumbing shared by the benchmarks: configure, start, pin, wait for, measure and stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned_cmd(cmd: list[str], cpu: int | None) -> list[str]:
    """``cmd`` run on one CPU (``taskset``) when there is more than one and ``cpu`` is given."""
    if cpu is None or (os.cpu_count() or 1) < 2:
        return cmd
    return ["taskset", "-c", str(cpu), *cmd]


def spawn(cmd: list[str], cpu: int | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session from the repo root (so ``-m bench.x`` resolves: bench is
    not installed), optionally on one CPU; stdout is dropped unless ``kwargs`` says otherwise."""
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(pinned_cmd(cmd, cpu), cwd=_REPO, start_new_session=True, **kwargs)


def pinned(pid: int, cpu: int) -> None:
    """Move a running process (all its threads) to one CPU."""
    if (os.cpu_count() or 1) > 1:
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True,
                       capture_output=True)


def consecutive_free_ports(n: int) -> int:
    """A base port whose next `n` ports are free now on every interface (a simulator binds
    base..base+n-1, KV-event publishers bind ``tcp://*:port``)."""
    for _ in range(100):
        base = free_port()
        if base + n >= 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no run of {n} free ports found")


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (children excluded)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests while this VM's CPUs wanted to run (all
    CPUs, from ``/proc/stat``): on a shared VM it swells CPU times and latencies, so the
    benches report it beside them. 0 where the kernel does not count it."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a proxy's workers, a shell's child), from /proc."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its descendants alive now (each read from /proc)."""
    return _tree_sum(pid, cpu_seconds)


def tree_rss_bytes(pid: int) -> int:
    """Summed RSS of a process and its descendants (shared pages count once per process)."""
    return int(_tree_sum(pid, rss_bytes))


def _tree_sum(pid: int, read: Callable[[int], float]) -> float:
    """``read`` summed over a process tree; a process that exits meanwhile counts 0."""
    total = 0.0
    for child in tree(pid):
        try:
            total += read(child)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def gateway_config(endpoints: dict[str, list[str]], port: int, *, metrics_port: int = 0,
                   strategy: str = "PrefixHash", load_factor: int = 125,
                   load_balancing: dict[str, Any] | None = None,
                   settings: dict[str, Any] | None = None, engine: str = "VLLM",
                   kv_port_offsets: bool = False) -> str:
    """A static-endpoints `kvgate gateway` config: one model per entry, with its addresses.

    ``load_balancing`` adds to every Model's ``spec.loadBalancing`` (its ``prefixHash`` merged
    into the one built from ``load_factor``), e.g. ``{"loadUnit": "Tokens"}``; ``settings`` adds
    top-level gateway sections, e.g. ``{"engineMetrics": {"intervalSeconds": 0.5}}``;
    ``engine`` is what the Models declare (``Sim`` lets the gateway hash prompts as the
    simulator does); ``kv_port_offsets`` gives endpoint i the KV-event port offset i."""
    extra = dict(load_balancing or {})
    prefix_hash = {"meanLoadFactor": load_factor, **extra.pop("prefixHash", {})}
    balancing = {"strategy": strategy, "prefixHash": prefix_hash, **extra}
    models = [{"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": name},
               "spec": {"url": f"hf://bench/{name}", "engine": engine,
                        "features": ["TextGeneration"], "loadBalancing": balancing}}
              for name in endpoints]
    return yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "metricsPort": metrics_port,
                   "logLevel": "warning"},
        **(settings or {}),
        "models": models,
        "endpoints": {name: [{"address": a, **({"kvPortOffset": i} if kv_port_offsets else {})}
                             for i, a in enumerate(addresses)]
                      for name, addresses in endpoints.items()},
    }, sort_keys=False)


MASTER_KEY = "sk-kvgate-bench"  # the key every benchmark client sends


def keys_config(tmp: Path) -> str:
    """kvgate+keys: a keys file with the benchmark's key, limits far above any rate wrk
    reaches (every request is checked and charged, none refused)."""
    from lb.keys import hash_secret

    keys = tmp / "keys.yaml"
    keys.write_text(f"keys:\n- name: bench\n  hash: {hash_secret(MASTER_KEY)}\n  models: ['*']\n"
                    "  limits: {requestsPerMinute: 100000000, tokensPerMinute: 10000000000}\n")
    return f"apiKeys: {{enabled: true, file: {keys}}}\n"


class OtlpSink:
    """``bench.otlp_sink`` on a free port, for a traced gateway to export to (a context manager)."""

    def __enter__(self) -> OtlpSink:
        self.port = free_port()
        self.proc = spawn([sys.executable, "-m", "bench.otlp_sink", "--port", str(self.port)])
        wait_for_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.proc)

    def environment(self) -> dict[str, str]:
        """OTLP/HTTP to the sink, batches sent every 200 ms, a queue no burst overflows."""
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "200",
                "OTEL_BSP_MAX_QUEUE_SIZE": "1000000", "OTEL_TRACES_SAMPLER": "always_on"}

    def wait_for(self, spans: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/count", timeout=30) as r:
                received = int(r.read())
            if received >= spans:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sink got {received} spans of {spans}")
            time.sleep(0.2)
