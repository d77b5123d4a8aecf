"""kvgate against its peers, side by side in one run: direct, kvgate, nginx, LiteLLM.

One fast OpenAI-shaped backend (``bench/fast_backend.py``: a fixed chat completion, or 20 SSE
chunks written back to back) sits behind each proxy in turn. The same load generator (wrk, one
thread, 64 connections) measures, per path and response shape: requests/s, latency p50/p99,
the p50/p99 added over going direct, the proxy's CPU time per request (user+system seconds of
the proxy's processes, workers included, from /proc, over the requests served) and its RSS
(summed over its processes, at the end of the run). Then a fixed 1,000 req/s gives the
latency each proxy adds at a moderate rate (Poisson arrivals from wrk; hey's bursts beside it),
and kvgate with 1 and 2 worker processes is run again unpinned to compare their throughput.

``--proxy-only`` is the gateway-overhead comparison alone: direct, kvgate and bare, no nginx,
LiteLLM or workers run, plus a third shape, the same 20-chunk stream paced 1 ms per chunk by a
second backend (every chunk its own read, as with a model server generating tokens, where the
back-to-back stream lets chunks share a read). It writes ``proxy.*`` instead of ``peers.*``.

Paths:

* ``direct``: the client talks to the backend;
* ``kvgate``: ``kvgate gateway`` (one worker, static endpoints, PrefixHash);
* ``bare``: the plainest uvicorn + aiohttp proxy (``bench/bare_proxy.py``). The issue's CPU
  targets (100 µs per JSON request, 150 µs per 20-chunk stream) were set where this proxy spent
  125 and 185 µs; its figures from the same run scale kvgate's to that machine;
* ``nginx``: Debian's nginx, one worker, ``proxy_pass`` to an upstream with ``keepalive``,
  HTTP/1.1 upstream, ``proxy_buffering off`` (so SSE chunks are passed on as they arrive),
  no access log;
* ``litellm``: LiteLLM's proxy from PyPI (``litellm --config ...``, one worker, its defaults),
  with ``LITELLM_MASTER_KEY`` and ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (this machine is
  offline). Found with ``--litellm PATH``, ``$KVGATE_LITELLM`` or ``litellm`` on ``$PATH``;
  without it, the run says so and carries on with the others.

The server under test (backend when direct, the proxy otherwise) is pinned to CPU 1 and
everything else to CPU 0, so each proxy gets one core. Every path's figures come from the same
run; compare ratios, not absolute numbers across runs.

    python -m bench peers [--duration 10] [--quick] [--litellm PATH] [--out bench/results]
    python -m bench peers --proxy-only [--duration 10] [--quick]
    python -m bench peers --proxy-only --keys    # + kvgate+keys: API keys and limits on vs off
    python -m bench peers --proxy-only --traces  # + kvgate+traces: tracing on (OTLP export) vs off
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from bench.load_tools import CHAT_BODY, run_hey, run_paced, run_wrk
from bench.procs import (MASTER_KEY, OtlpSink, free_port, keys_config, pinned, pinned_cmd, spawn,
                         steal_seconds, stop, tree, tree_cpu_seconds, tree_rss_bytes,
                         wait_for_port)
from bench.results import check, save, table, targets_table

AUTH = {"Authorization": f"Bearer {MASTER_KEY}"}  # LiteLLM wants it; the others ignore it
SHAPES = {"json": "", "sse-20": ',"stream":true'}
# --proxy-only's extra shape, served by a backend that paces its chunks 1 ms apart.
PACED_SHAPES = {"sse-20-paced": ',"stream":true'}
TARGETS = {"x_litellm": 50.0, "added_p50_ms": 0.5, "added_p99_ms": 3.0, "workers_ratio": 1.6,
           "cpu_us_request": 100.0, "cpu_us_stream": 150.0,
           "x_base_cpu": 1.05,  # a change may cost at most 5% CPU per request (--baseline)
           "x_keys_cpu": 1.10}  # API keys + limits on may cost at most 10% CPU per request (--keys)
# The calibration behind the CPU targets: the bare uvicorn+aiohttp proxy's CPU per request
# where the targets were set. ``bench/bare_proxy.py`` is measured again in the same run, so
# kvgate's targets are read as ratios to it and do not move with how fast the machine is today.
BARE_REFERENCE_US = {"json": 125.0, "sse-20": 185.0}


@dataclass
class Route:
    """A way to the backend: its name, port and the process (tree) to account to it."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]


@dataclass
class Row:
    path: str
    shape: str
    rps: float
    p50_ms: float
    p99_ms: float
    added_p50_ms: float = 0.0
    added_p99_ms: float = 0.0
    cpu_us: float | None = None
    rss_mib: float | None = None
    requests: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench peers",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=int, default=1000, help="req/s for the latency runs")
    parser.add_argument("--quick", action="store_true", help="3 s runs")
    parser.add_argument("--litellm", help="the litellm executable (default: $KVGATE_LITELLM, "
                                          "then litellm on $PATH)")
    parser.add_argument("--skip", default="", help="comma-separated paths to leave out "
                                                   "(kvgate, bare, nginx, litellm, workers)")
    parser.add_argument("--proxy-only", action="store_true",
                        help="direct, kvgate and bare only, with the paced stream as a third "
                             "shape; writes proxy.* instead of peers.*")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="another kvgate checkout (its ring core built in place), run as "
                             "the path kvgate@base beside this one: what a change costs")
    parser.add_argument("--rounds", type=int, default=1,
                        help="saturation runs per path and shape, taken in turns; medians "
                             "reported (3 on a machine whose speed drifts)")
    parser.add_argument("--signals", action="store_true",
                        help="add kvgate+signals: token-weighted loads, the conversation key "
                             "and engine scraping every 0.5 s, all on")
    parser.add_argument("--keys", action="store_true",
                        help="add kvgate+keys: API keys on, the client's key checked, per-key "
                             "request and token limits charged (never reached) and usage read "
                             "back")
    parser.add_argument("--traces", action="store_true",
                        help="add kvgate+traces: OpenTelemetry tracing on, every span exported "
                             "over OTLP/HTTP to a local sink (the cost of tracing on; kvgate is "
                             "the same gateway with it off)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    duration = 3 if args.quick else args.duration
    skip = set(filter(None, args.skip.split(",")))
    if args.proxy_only:
        skip |= {"nginx", "litellm", "workers"}
    from lb.ring import IMPLEMENTATION
    print(f"ring implementation: {IMPLEMENTATION}; cores: {os.cpu_count()}", flush=True)
    litellm = _find_litellm(args.litellm) if "litellm" not in skip else None
    load_before = os.getloadavg()[0]
    sink = OtlpSink().__enter__() if args.traces else None
    if sink is not None:
        atexit.register(sink.__exit__)
    extra = _extra_kvgates(args.baseline, args.signals, args.keys, sink)
    rows, at_rate = _proxies(litellm, skip, duration, args.connections, args.rate,
                             paced=args.proxy_only, extra=extra, rounds=args.rounds)
    workers = _workers_scaling(duration, args.connections) if "workers" not in skip else {}
    result = {"settings": {"duration_s": duration, "connections": args.connections,
                           "rounds": args.rounds, "baseline": str(args.baseline or ""),
                           "rate": args.rate, "cores": os.cpu_count(),
                           "proxy_only": args.proxy_only,
                           "ring": IMPLEMENTATION, "python": platform.python_version(),
                           "versions": _versions(litellm),
                           "load_average_1m": [load_before, os.getloadavg()[0]]},
              "saturation": [asdict(r) for r in rows], "latency_at_rate": at_rate,
              "workers": workers}
    result["targets"] = _targets(rows, at_rate, workers)
    text = _markdown(result)
    print("\n" + text)
    name = "proxy" if args.proxy_only else "peers"
    written = save(args.out, name, result, text)
    chart(result, args.out / f"{name}.png")
    print("wrote " + ", ".join(map(str, written)) + f", {args.out / name}.png")
    return 0


Starter = Callable[[Path, int, int], "subprocess.Popen[bytes] | None"]


def _proxies(litellm: str | None, skip: set[str], duration: int, connections: int, rate: int,
             paced: bool, extra: dict[str, Starter],
             rounds: int = 1) -> tuple[list[Row], list[dict[str, float]]]:
    """Every path saturated with each shape, then offered ``rate``; with ``paced``, the paths
    again in front of a backend that paces its stream's chunks (``PACED_SHAPES``)."""
    with ExitStack() as stack:
        paths = _start_paths(stack, litellm, skip, extra=extra)
        rows = _saturation(paths, SHAPES, duration, connections, rounds)
        at_rate = _latency_at_rate(paths, rate, duration)
    if paced:
        with ExitStack() as stack:
            paths = _start_paths(stack, None, skip, chunk_gap_ms=1, extra=extra)
            rows += _saturation(paths, PACED_SHAPES, duration, connections, rounds)
    return rows, at_rate


# -- the paths ------------------------------------------------------------------------------------


def _find_litellm(explicit: str | None) -> str | None:
    candidate = explicit or os.environ.get("KVGATE_LITELLM") or shutil.which("litellm")
    candidate = os.path.expanduser(candidate) if candidate else None
    if candidate and Path(candidate).is_file():
        return candidate
    print("LiteLLM not found: pass --litellm PATH or set KVGATE_LITELLM (e.g. after "
          "`python -m venv ~/litellm-venv && ~/litellm-venv/bin/pip install "
          "'litellm[proxy]'`, use ~/litellm-venv/bin/litellm); its rows are left out.",
          flush=True)
    return None


def _start_paths(stack: ExitStack, litellm: str | None, skip: set[str],
                 chunk_gap_ms: int = 0, extra: dict[str, Starter] | None = None) -> list[Route]:
    """The backend (its streams' chunks ``chunk_gap_ms`` apart) and every proxy not skipped in
    front of it, each answering requests of every shape."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    backend_port = free_port()
    backend = _keep(stack, spawn([sys.executable, "-m", "bench.fast_backend", "--port",
                                  str(backend_port), "--chunks", "20", "--chunk-gap-ms",
                                  str(chunk_gap_ms)], cpu=0))
    paths = [Route("direct", backend_port, backend)]
    starters: dict[str, Callable[[Path, int, int], subprocess.Popen[bytes] | None]] = {
        "kvgate": _start_kvgate, "bare": _start_bare, "nginx": _start_nginx,
        "litellm": lambda tmp, backend, port: _start_litellm(tmp, backend, port, litellm),
        **(extra or {})}
    for name, start in starters.items():
        if name in skip or (name == "litellm" and litellm is None):
            continue
        port = free_port()
        paths.append(Route(name, port, _keep(stack, start(tmp, backend_port, port))))
    for path in paths:
        wait_for_port(path.port, timeout=180)
        _check(path)
    return paths


def _keep(stack: ExitStack, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    stack.callback(stop, proc)
    return proc


def _check(path: Route) -> None:
    """Requests of each shape until they are answered (a proxy may listen before it serves),
    so a misconfigured one fails here and not as a wrk error."""
    for shape, extra in SHAPES.items():
        deadline = time.monotonic() + 120
        while run_wrk(path.port, CHAT_BODY % ("m", extra), 2, 1, AUTH, timeout=30)["requests"] == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path.name} answered no {shape} request")
            time.sleep(1)


# kvgate+signals: every routing signal of the data plane on at once.
SIGNALS_BALANCING = ("{strategy: PrefixHash, loadUnit: Tokens, "
                     "prefixHash: {prefixFrom: Conversation, prefixCharLength: 2000}}")
SIGNALS_CONFIG = "engineMetrics: {intervalSeconds: 0.5}\n"


def _kvgate_config(tmp: Path, backend_port: int, port: int,
                   balancing: str = "{strategy: PrefixHash}", extra: str = "") -> Path:
    config = tmp / f"kvgate-{port}.yaml"
    config.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, metricsPort: 0, logLevel: warning}}\n"
        + extra +
        "models:\n- apiVersion: kvgate.dev/v1\n  kind: Model\n  metadata: {name: m}\n"
        "  spec:\n    url: hf://bench/m\n    engine: VLLM\n    features: [TextGeneration]\n"
        f"    loadBalancing: {balancing}\n"
        f'endpoints:\n  m: [{{address: "127.0.0.1:{backend_port}"}}]\n')
    return config


def _start_kvgate(tmp: Path, backend_port: int, port: int, workers: int = 1,
                  cpu: int | None = 1) -> subprocess.Popen[bytes]:
    config = _kvgate_config(tmp, backend_port, port)
    return spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config),
                  "--workers", str(workers)], cpu=cpu)


def _extra_kvgates(baseline: Path | None, signals: bool, keys: bool = False,
                   traces: OtlpSink | None = None) -> dict[str, Starter]:
    """The optional kvgate paths: another checkout's gateway, this one with every signal, this
    one with API keys and limits on, and this one tracing every request to ``traces``."""
    extra: dict[str, Starter] = {}
    if baseline is not None:
        extra["kvgate@base"] = lambda tmp, backend, port: _start_checkout(
            baseline.resolve(), _kvgate_config(tmp, backend, port))
    if signals:
        extra["kvgate+signals"] = lambda tmp, backend, port: spawn(
            [sys.executable, "-m", "kvgate", "gateway", "-c",
             str(_kvgate_config(tmp, backend, port, SIGNALS_BALANCING, SIGNALS_CONFIG))], cpu=1)
    if keys:
        extra["kvgate+keys"] = lambda tmp, backend, port: spawn(
            [sys.executable, "-m", "kvgate", "gateway", "-c",
             str(_kvgate_config(tmp, backend, port, extra=keys_config(tmp)))], cpu=1)
    if traces is not None:
        extra["kvgate+traces"] = lambda tmp, backend, port: spawn(
            [sys.executable, "-m", "kvgate", "gateway", "-c",
             str(_kvgate_config(tmp, backend, port, extra="tracing: {enabled: true}\n"))], cpu=1,
            env={**os.environ, **traces.environment()})
    return extra


def _start_checkout(root: Path, config: Path) -> subprocess.Popen[bytes]:
    """A gateway from another checkout, with this interpreter: its own modules come first on
    the path (older checkouts kept the command in lb.cli)."""
    module = "kvgate" if (root / "kvgate" / "cli.py").exists() else "lb.cli"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.Popen(pinned_cmd([sys.executable, "-m", module, "gateway", "-c",
                                        str(config)], 1), cwd=root, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _start_bare(tmp: Path, backend_port: int, port: int) -> subprocess.Popen[bytes]:
    return spawn([sys.executable, "-m", "bench.bare_proxy", "--port", str(port), "--upstream",
                  f"127.0.0.1:{backend_port}"], cpu=1)


_NGINX = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def _start_nginx(tmp: Path, backend_port: int, port: int) -> subprocess.Popen[bytes]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = tmp / "nginx.conf"
    conf.write_text(_NGINX.format(tmp=tmp, backend=backend_port, port=port))
    return spawn([nginx, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "nginx-error.log")],
                 cpu=1)


def _start_litellm(tmp: Path, backend_port: int, port: int,
                   litellm: str | None) -> subprocess.Popen[bytes]:
    assert litellm is not None
    conf = tmp / "litellm.yaml"
    conf.write_text("model_list:\n  - model_name: m\n    litellm_params:\n"
                    f"      model: openai/m\n      api_base: http://127.0.0.1:{backend_port}/v1\n"
                    "      api_key: sk-none\nlitellm_settings:\n  telemetry: false\n")
    env = {**os.environ, "LITELLM_MASTER_KEY": MASTER_KEY,
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return spawn([litellm, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port),
                  "--num_workers", "1"], cpu=1, env=env)


def _versions(litellm: str | None) -> dict[str, str]:
    versions = {}
    try:
        out = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr
        versions["nginx"] = out.strip().rpartition("/")[2]
    except OSError:
        pass
    if litellm:
        python = Path(litellm).with_name("python")
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                              "print(m.version('litellm'))"], capture_output=True, text=True)
        versions["litellm"] = out.stdout.strip()
    return versions


# -- measurements ---------------------------------------------------------------------------------


def _saturation(paths: list[Route], shapes: dict[str, str], duration: int,
                connections: int, rounds: int = 1) -> list[Row]:
    """Each path saturated by wrk with each response shape (name -> body extra). With
    ``rounds`` > 1 the paths take turns, round after round, and each figure is the median of
    its rounds: a machine whose speed drifts during the run then drifts for every path alike."""
    rows: list[Row] = []
    direct = paths[0]
    for shape, extra in shapes.items():
        body = CHAT_BODY % ("m", extra)
        runs: dict[str, list[Row]] = {path.name: [] for path in paths}
        for _ in range(rounds):
            for path in paths:
                runs[path.name].append(_measure(paths, path, shape, body, duration, connections))
        for path in paths:
            row = _median_row(runs[path.name])
            rows.append(row)
            print(f"  {path.name:8s} {shape:12s} {row.rps:9.0f} req/s  p50 {row.p50_ms:7.2f} ms  "
                  f"CPU {row.cpu_us:6.0f} µs/req", flush=True)
    base = {r.shape: r for r in rows if r.path == "direct"}
    for row in rows:
        row.added_p50_ms = row.p50_ms - base[row.shape].p50_ms
        row.added_p99_ms = row.p99_ms - base[row.shape].p99_ms
    for pid in tree(direct.proc.pid):
        pinned(pid, 0)
    return rows


def _measure(paths: list[Route], path: Route, shape: str, body: str, duration: int,
             connections: int) -> Row:
    """One wrk run through ``path``, the others paused; the backend on the other core when
    proxied (direct: the backend has CPU 1 to itself; proxied, it moves to CPU 0 with wrk)."""
    for pid in tree(paths[0].proc.pid):
        pinned(pid, 1 if path is paths[0] else 0)
    # A slow proxy's streams outlast wrk's default 2 s timeout; give every path 60 s.
    with _alone(paths, path):
        run_wrk(path.port, body, 1, connections, AUTH, timeout=60)  # warm-up
        before = tree_cpu_seconds(path.proc.pid)
        counter = _Instructions(tree(path.proc.pid), duration)
        result = run_wrk(path.port, body, duration, connections, AUTH, timeout=60)
        cpu = tree_cpu_seconds(path.proc.pid) - before
        instructions = counter.result()
    row = Row(path.name, shape, result["rps"], result["p50"], result["p99"],
              cpu_us=cpu / max(1, result["requests"]) * 1e6,
              rss_mib=tree_rss_bytes(path.proc.pid) / 2**20, requests=int(result["requests"]),
              extra={"processes": len(tree(path.proc.pid)), "cores_used": cpu / duration})
    if instructions is not None:
        row.extra["k_instructions"] = instructions / max(1, result["requests"]) / 1e3
    return row


def _median_row(runs: list[Row]) -> Row:
    """The median of each figure over rounds (the rounds themselves kept in ``extra``)."""
    if len(runs) == 1:
        return runs[0]
    med = statistics.median
    extra = {key: med(r.extra[key] for r in runs) for key in runs[0].extra
             if all(key in r.extra for r in runs)}
    extra["rounds_cpu_us"] = [round(r.cpu_us or 0.0, 1) for r in runs]  # type: ignore[assignment]
    return Row(runs[0].path, runs[0].shape, med(r.rps for r in runs), med(r.p50_ms for r in runs),
               med(r.p99_ms for r in runs), cpu_us=med(r.cpu_us or 0.0 for r in runs),
               rss_mib=max(r.rss_mib or 0.0 for r in runs),
               requests=sum(r.requests for r in runs), extra=extra)


@contextmanager
def _alone(paths: list[Route], measured: Route) -> Iterator[None]:
    """Pause every other proxy (SIGSTOP) while ``measured`` is measured. They share CPU 1 with
    it, and one still working off a backlog (LiteLLM finishes the requests wrk abandoned, for
    seconds) would slow the next path down. The backend (``direct``) always runs."""
    others = [pid for path in paths[1:] if path is not measured for pid in tree(path.proc.pid)]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


class _Instructions:
    """Instructions the processes retire over the run (``perf stat``), when perf is usable.

    CPU time per request swells when other work shares the core (caches, the sibling
    hyperthread); the instruction count does not, so it is the steadier figure on a busy
    machine. None when perf is missing or not permitted."""

    def __init__(self, pids: list[int], seconds: int) -> None:
        self._proc: subprocess.Popen[str] | None = None
        perf = shutil.which("perf")
        if perf:
            self._proc = subprocess.Popen(
                [perf, "stat", "-x,", "-e", "instructions", "-p", ",".join(map(str, pids)),
                 "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True)

    def result(self) -> float | None:
        if self._proc is None:
            return None
        _, err = self._proc.communicate()
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] == "instructions" and fields[0].isdigit():
                return float(fields[0])
        return None


def _latency_at_rate(paths: list[Route], rate: int, duration: int) -> list[dict[str, float]]:
    """Latency at a fixed offered rate, JSON responses, measured two ways: Poisson arrivals
    (``run_paced``: independent clients, the figure the targets are read from) and hey's
    synchronised bursts (``run_hey``). Three rounds with the paths alternating so drift hits
    all alike; medians. LiteLLM cannot sustain the rate, so it is offered 20 req/s for 12 s."""
    body = CHAT_BODY % ("m", "")
    paced: dict[str, list[dict[str, float]]] = {p.name: [] for p in paths}
    burst: dict[str, list[tuple[float, float]]] = {p.name: [] for p in paths}
    rates = {p.name: 20 if p.name == "litellm" else rate for p in paths}
    for _ in range(3):
        for path in paths:
            seconds = max(12, duration) if path.name == "litellm" else max(2, duration // 2)
            with _alone(paths, path):
                stolen = steal_seconds()
                paced[path.name].append(run_paced(path.port, body, rates[path.name], seconds,
                                                  AUTH))
                paced[path.name][-1]["steal"] = (steal_seconds() - stolen) / seconds
                burst[path.name].append(run_hey(path.port, body, rates[path.name], seconds,
                                                AUTH))
    med = {name: {"rps": statistics.median(r["rps"] for r in runs),
                  "p50_ms": statistics.median(r["p50"] for r in runs),
                  "p99_ms": statistics.median(r["p99"] for r in runs),
                  "burst_p50_ms": statistics.median(b[0] for b in burst[name]),
                  "burst_p99_ms": statistics.median(b[1] for b in burst[name]),
                  "steal_cores": statistics.median(r["steal"] for r in runs)}
           for name, runs in paced.items()}
    direct = med["direct"]
    out = []
    for path in paths:
        row = {"path": path.name, "rate": rates[path.name], **med[path.name]}
        for key in ("p50_ms", "p99_ms", "burst_p50_ms", "burst_p99_ms"):
            row["added_" + key] = row[key] - direct[key]
        out.append(row)
    return out


def _workers_scaling(duration: int, connections: int) -> dict[str, object]:
    """kvgate with 1 and 2 workers, nothing pinned (two workers need both cores, which they
    share with wrk and the backend), alternating, three rounds each; medians.

    On a machine with as many cores as workers, the load generator and the backend take their
    share of the same cores, so it also works out the most two workers could serve here: the
    cores divided by all the CPU one request costs (gateway + backend + wrk, measured in the
    2-worker runs), and reports the ratio that ceiling allows beside the one measured."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        backend_port = free_port()
        backend = _keep(stack, spawn([sys.executable, "-m", "bench.fast_backend", "--port",
                                      str(backend_port), "--chunks", "20",
                                      "--chunk-gap-ms", "0"]))
        gateways = {}
        for workers in (1, 2):
            port = free_port()
            proc = _keep(stack, _start_kvgate(tmp, backend_port, port, workers, cpu=None))
            gateways[workers] = (port, proc)
        wait_for_port(backend_port)
        for port, _ in gateways.values():
            wait_for_port(port)
        body = CHAT_BODY % ("m", "")
        rps: dict[int, list[float]] = {1: [], 2: []}
        cpu: dict[int, list[float]] = {1: [], 2: []}
        others_us: list[float] = []  # backend + wrk CPU per request, 2-worker runs
        gateway_us: list[float] = []
        for _ in range(3):
            for workers, (port, proc) in gateways.items():
                run_wrk(port, body, 1, connections)
                before = tree_cpu_seconds(proc.pid), tree_cpu_seconds(backend.pid), _wrk_cpu()
                result = run_wrk(port, body, duration, connections)
                gateway = tree_cpu_seconds(proc.pid) - before[0]
                others = tree_cpu_seconds(backend.pid) - before[1] + _wrk_cpu() - before[2]
                cpu[workers].append(gateway / duration)
                rps[workers].append(result["rps"])
                if workers == 2:
                    gateway_us.append(gateway / result["requests"] * 1e6)
                    others_us.append(others / result["requests"] * 1e6)
                print(f"  kvgate {workers} worker(s): {result['rps']:9.0f} req/s", flush=True)
    one, two = statistics.median(rps[1]), statistics.median(rps[2])
    g, x = statistics.median(gateway_us), statistics.median(others_us)
    ceiling = min((os.cpu_count() or 1) / (g + x), 2 / g) * 1e6
    return {"rps_1": one, "rps_2": two, "ratio": two / one,
            "cores_used_1": statistics.median(cpu[1]), "cores_used_2": statistics.median(cpu[2]),
            "gateway_us_2": g, "others_us_2": x, "ceiling_rps_2": ceiling,
            "ceiling_ratio": ceiling / one, "runs": {"1": rps[1], "2": rps[2]}}


def _wrk_cpu() -> float:
    """CPU seconds of this process's finished children (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- report ---------------------------------------------------------------------------------------


def cpu_checks(kvgate: dict[str, float | None],
               bare: dict[str, float | None]) -> list[dict[str, object]]:
    """kvgate's CPU targets by response shape: at the calibration's scale when the bare proxy
    was measured in the same run, and on this machine's own clock."""
    checks = []
    for shape, what, limit in (("json", "JSON request", TARGETS["cpu_us_request"]),
                               ("sse-20", "20-chunk stream", TARGETS["cpu_us_stream"])):
        ours, theirs = kvgate.get(shape), bare.get(shape)
        if not ours:
            continue
        if theirs:
            scale = BARE_REFERENCE_US[shape]
            checks.append(check(f"kvgate CPU per {what} at the calibration's scale, µs "
                                f"(kvgate ÷ bare uvicorn+aiohttp here × {scale:g})",
                                ours / theirs * scale, limit))
        checks.append(check(f"kvgate CPU per {what}, µs on this machine today", ours, limit))
    return checks


def _targets(rows: list[Row], at_rate: list[dict[str, float]],
             workers: dict[str, object]) -> list[dict[str, object]]:
    by = {(r.path, r.shape): r for r in rows}
    rate = {r["path"]: r for r in at_rate}
    checks = cpu_checks({r.shape: r.cpu_us for r in rows if r.path == "kvgate"},
                        {r.shape: r.cpu_us for r in rows if r.path == "bare"})
    for variant in ("kvgate", "kvgate+signals"):
        if (variant, "json") in by and ("kvgate@base", "json") in by:
            checks.append(check(f"{variant} CPU ÷ kvgate@base CPU per JSON request",
                                by[(variant, "json")].cpu_us / by[("kvgate@base", "json")].cpu_us,
                                TARGETS["x_base_cpu"]))
    for shape, what in (("json", "JSON request"), ("sse-20", "20-chunk stream")):
        if ("kvgate+keys", shape) in by and ("kvgate", shape) in by:
            checks.append(check(f"kvgate+keys CPU ÷ kvgate CPU per {what}",
                                by[("kvgate+keys", shape)].cpu_us / by[("kvgate", shape)].cpu_us,
                                TARGETS["x_keys_cpu"]))
    if ("litellm", "json") in by and ("kvgate", "json") in by:
        checks.append(check("kvgate req/s ÷ LiteLLM req/s (JSON)",
                            by[("kvgate", "json")].rps / by[("litellm", "json")].rps,
                            TARGETS["x_litellm"], higher_is_better=True))
    if "kvgate" in rate:
        for key in ("added_p50_ms", "added_p99_ms"):
            checks.append(check(f"added {key[6:9]} at {rate['kvgate']['rate']:.0f} req/s, "
                                "Poisson arrivals (ms)", rate["kvgate"][key], TARGETS[key]))
    if workers:
        checks.append(check("2 workers ÷ 1 worker req/s", float(workers["ratio"]),  # type: ignore[arg-type]
                            TARGETS["workers_ratio"], higher_is_better=True))
    return checks


def _markdown(result: dict) -> str:  # type: ignore[type-arg]
    s = result["settings"]
    title = "Gateway overhead (--proxy-only)" if s.get("proxy_only") else "Peers"
    lines = [f"{title}, one run: wrk -t1 -c{s['connections']}, {s['duration_s']} s per cell, "
             f"{s['cores']} cores; proxy pinned to one core; load average "
             f"{s['load_average_1m'][0]:.1f} before, {s['load_average_1m'][1]:.1f} after "
             "(other work on the machine shows as lower 'cores used'). Versions: "
             + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + ". `bare` is the "
             "plainest uvicorn+aiohttp proxy (`bench/bare_proxy.py`), the issue's calibration "
             "reference.", "", _saturation_table(result["saturation"]), "",
             "CPU µs/request, instructions (perf stat, user + kernel), cores used, processes "
             "and RSS of `direct` are the backend's own; for the proxies, of all the proxy's "
             "processes (summed).", "", _ratio_table(result["saturation"]), "",
             "At a fixed offered rate, JSON, medians of 3 alternating runs. Poisson: "
             "50 wrk connections with exponential think times (independent clients; the "
             "achieved rate is shown). Bursts: hey, whose 10 workers tick together, so "
             "requests come 10 at a time. Stolen: CPU the hypervisor gave other guests during "
             "the Poisson runs (cores; on a quiet host ~0):", "",
             _rate_table(result["latency_at_rate"])]
    if result["workers"]:
        lines += ["", _workers_text(result["workers"], s["cores"])]
    lines += ["", targets_table(result["targets"])]
    return "\n".join(lines) + "\n"


def _saturation_table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    def cells(r: dict) -> tuple[object, ...]:  # type: ignore[type-arg]
        kinstr = r["extra"].get("k_instructions")
        return (r["path"], r["shape"], f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}", f"{r['added_p50_ms']:.2f}", f"{r['added_p99_ms']:.2f}",
                f"{r['cpu_us']:,.0f}", f"{kinstr:,.0f}" if kinstr else "-",
                f"{r['extra']['cores_used']:.2f}", r["extra"]["processes"],
                f"{r['rss_mib']:.0f}")

    return table(("path", "response", "req/s", "p50 ms", "p99 ms", "added p50 ms",
                  "added p99 ms", "CPU µs/request", "k instructions/request", "cores used",
                  "processes", "RSS MiB"), map(cells, rows), "ll")


def _ratio_table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    """Each proxy's throughput against going direct and, when the bare proxy ran, kvgate's CPU
    against the bare proxy's, per response shape: the figures comparable across machines."""
    by = {(r["path"], r["shape"]): r for r in rows}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    proxies = [p for p in dict.fromkeys(r["path"] for r in rows) if p != "direct"]
    lines = [(f"{p} req/s ÷ direct", *(f"{by[(p, s)]['rps'] / by[('direct', s)]['rps']:.2f}"
                                       for s in shapes)) for p in proxies]
    if {"kvgate", "bare"} <= set(proxies):
        lines.append(("kvgate CPU ÷ bare CPU",
                      *(f"{by[('kvgate', s)]['cpu_us'] / by[('bare', s)]['cpu_us']:.2f}"
                        for s in shapes)))
    for variant in ("kvgate+keys", "kvgate+traces"):  # what turning it on costs
        if {variant, "kvgate"} <= set(proxies):
            lines.append((f"{variant} CPU ÷ kvgate CPU",
                          *(f"{by[(variant, s)]['cpu_us'] / by[('kvgate', s)]['cpu_us']:.2f}"
                            for s in shapes)))
    return table(("ratio", *shapes), lines)


def _rate_table(rows: list[dict]) -> str:  # type: ignore[type-arg]
    return table(("path", "offered req/s", "achieved req/s", "p50 ms", "p99 ms", "added p50 ms",
                  "added p99 ms", "bursts: added p50 ms", "bursts: added p99 ms", "stolen"),
                 ((r["path"], f"{r['rate']:.0f}", f"{r['rps']:,.0f}", f"{r['p50_ms']:.2f}",
                   f"{r['p99_ms']:.2f}", f"{r['added_p50_ms']:.2f}", f"{r['added_p99_ms']:.2f}",
                   f"{r['added_burst_p50_ms']:.2f}", f"{r['added_burst_p99_ms']:.2f}",
                   f"{r['steal_cores']:.2f}") for r in rows))


def _workers_text(w: dict, cores: int) -> str:  # type: ignore[type-arg]
    per_core = [w[f"rps_{n}"] / w[f"cores_used_{n}"] for n in (1, 2)]
    rows = [(1, f"{w['rps_1']:,.0f}", f"{w['cores_used_1']:.2f}", f"{per_core[0]:,.0f}"),
            (2, f"{w['rps_2']:,.0f}", f"{w['cores_used_2']:.2f}", f"{per_core[1]:,.0f}"),
            ("2 ÷ 1", f"{w['ratio']:.2f}", f"{w['cores_used_2'] / w['cores_used_1']:.2f}",
             f"{per_core[1] / per_core[0]:.2f}")]
    return "\n".join([
        "kvgate workers, unpinned (JSON, medians of 3 alternating runs):", "",
        table(("workers", "req/s", "cores used by kvgate", "req/s per kvgate core"), rows, "r"),
        "", f"With 2 workers a request cost {w['gateway_us_2']:.0f} µs of gateway CPU "
        f"and {w['others_us_2']:.0f} µs of backend + wrk CPU on the same {cores} cores, so at "
        f"most {w['ceiling_rps_2']:,.0f} req/s fit: a 2 ÷ 1 ratio of at most "
        f"{w['ceiling_ratio']:.2f} on this machine ({w['rps_2'] / w['ceiling_rps_2']:.0%} of "
        "that ceiling reached)."])


def chart(result: dict, path: Path) -> None:  # type: ignore[type-arg]
    """The PNG: req/s, CPU per request, added latency (``chart(json.load(...), path)`` redraws
    it from a saved run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["saturation"]
    names = list(dict.fromkeys(r["path"] for r in rows))
    proxies = [n for n in names if n != "direct"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    by = {(r["path"], r["shape"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / len(shapes)
    for k, shape in enumerate(shapes):
        axes[0].bar([i + k * width for i in range(len(names))],
                    [by[(n, shape)]["rps"] for n in names], width, label=shape)
        axes[1].bar([i + k * width for i in range(len(proxies))],
                    [by[(n, shape)]["cpu_us"] for n in proxies], width, label=shape)
    for ax, labels, title in ((axes[0], names, "requests/s (log)"),
                              (axes[1], proxies, "proxy CPU µs per request (log)")):
        ax.set_xticks([i + width * (len(shapes) - 1) / 2 for i in range(len(labels))], labels)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    rate = [r for r in result["latency_at_rate"] if r["path"] != "direct"]
    xs = range(len(rate))
    axes[2].bar([x - 0.2 for x in xs], [max(r["added_p50_ms"], 0.01) for r in rate], 0.4,
                label="added p50")
    axes[2].bar([x + 0.2 for x in xs], [max(r["added_p99_ms"], 0.01) for r in rate], 0.4,
                label="added p99")
    axes[2].set_xticks(list(xs), [f"{r['path']}\n@{r['rate']:.0f} req/s" for r in rate])
    axes[2].set_yscale("log")
    axes[2].set_title("latency added over direct, Poisson arrivals, ms (log)")
    axes[2].legend()
    fig.suptitle("kvgate vs peers: one fast backend, same load generator, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
