"""Gateway overhead, side by side in one run: direct to a backend vs through kvgate.

For each path (direct, kvgate) and each response shape it runs the same load generator (wrk,
64 connections) against the same backend and reports requests/s, latency p50/p99, and the
proxy's CPU time per request (process CPU seconds over requests served, read from /proc).
Shapes: one JSON body; a 20-chunk SSE stream written back to back (the calibration's shape:
chunks often share a read); the same stream paced 1 ms per chunk (every chunk its own read,
as with a model server generating tokens). Then it offers a fixed 1,000 req/s (hey) to both and reports
the latency the gateway adds at a moderate rate.

The proxied server (backend when direct, gateway otherwise) is pinned to CPU 1 and everything
else to CPU 0, so both paths get one core for the server under test.

    python bench/proxy_bench.py [--duration 10] [--quick] [--json bench/results/proxy.json]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import orjson

from bench.procs import cpu_seconds, free_port, gateway_config, pinned, spawn, stop, wait_for_port

CHAT_BODY = ('{"model":"%s","messages":[{"role":"system","content":"You are a helpful assistant."},'
         '{"role":"user","content":"Tell me about consistent hashing with bounded loads."}]%s}')
_TARGETS = {"cpu_us_request": 100.0, "cpu_us_stream": 150.0, "added_p50_ms": 0.5,
            "added_p99_ms": 3.0}


@dataclass
class Row:
    path: str
    shape: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rate", type=int, default=1000, help="req/s for the latency run")
    parser.add_argument("--quick", action="store_true", help="3 s runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    duration = 3 if args.quick else args.duration
    from lb.ring import IMPLEMENTATION
    print(f"ring implementation: {IMPLEMENTATION}; cores: {os.cpu_count()}", flush=True)
    with _stack() as (ports, gateway_port, procs):
        rows = _saturation(ports, gateway_port, procs, duration, args.connections)
        latency = _latency_at_rate(ports["m"], gateway_port, args.rate, duration)
    _print(rows, latency)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps({"saturation": [asdict(r) for r in rows],
                                            "latency_at_rate": latency},
                                           option=orjson.OPT_INDENT_2))
    return 0


@contextmanager
def _stack() -> Iterator[tuple[dict[str, int], int, dict[str, subprocess.Popen[bytes]]]]:
    """Two backends (``m``: back-to-back chunks, ``m-paced``: 1 ms per chunk) and the gateway
    with a model for each."""
    ports = {"m": free_port(), "m-paced": free_port()}
    gateway_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.yaml"
        config.write_text(gateway_config({m: [f"127.0.0.1:{p}"] for m, p in ports.items()},
                                         gateway_port))
        procs = {model: spawn([sys.executable, "-m", "bench.fast_backend", "--port", str(port),
                               "--chunks", "20", "--chunk-gap-ms", "1" if "paced" in model
                               else "0"], cpu=1)
                 for model, port in ports.items()}
        procs["gateway"] = spawn([sys.executable, "-m", "lb.cli", "gateway", "-c", str(config)],
                                 cpu=1)
        try:
            for port in (*ports.values(), gateway_port):
                wait_for_port(port)
            yield ports, gateway_port, procs
        finally:
            for proc in procs.values():
                stop(proc)


_SHAPES = (("json", "m", ""), ("sse-20", "m", ',"stream":true'),
           ("sse-20-paced", "m-paced", ',"stream":true'))


def _saturation(ports: dict[str, int], gateway_port: int,
                procs: dict[str, subprocess.Popen[bytes]], duration: int,
                connections: int) -> list[Row]:
    rows = []
    for shape, model, extra in _SHAPES:
        body = CHAT_BODY % (model, extra)
        backend = procs[model]
        for path, port, proc in (("direct", ports[model], backend),
                                 ("kvgate", gateway_port, procs["gateway"])):
            # In the direct run the backend has CPU 1 to itself; when proxied, it moves to CPU 0
            # with the load generator so the gateway has CPU 1 alone.
            pinned(backend.pid, 1 if path == "direct" else 0)
            run_wrk(port, body, 1, connections)  # warm-up: connections, caches, JIT-free paths
            before = cpu_seconds(proc.pid)
            result = run_wrk(port, body, duration, connections)
            cpu = cpu_seconds(proc.pid) - before
            cpu_us = cpu / result["requests"] * 1e6 if path == "kvgate" else None
            rows.append(Row(path, shape, result["rps"], result["p50"], result["p99"], cpu_us))
            print(f"  {path:7s} {shape:12s} {result['rps']:9.0f} req/s", flush=True)
    return rows


def _latency_at_rate(backend_port: int, gateway_port: int, rate: int,
                     duration: int) -> dict[str, float | int]:
    """hey at a fixed offered rate; runs alternate so drift hits both paths alike."""
    samples: dict[str, list[tuple[float, float]]] = {"direct": [], "kvgate": []}
    for _ in range(3):
        for path, port in (("direct", backend_port), ("kvgate", gateway_port)):
            samples[path].append(run_hey(port, CHAT_BODY % ("m", ""), rate, max(2, duration // 2)))
    med = {path: (statistics.median(s[0] for s in runs), statistics.median(s[1] for s in runs))
           for path, runs in samples.items()}
    return {"rate": rate,
            "direct_p50_ms": med["direct"][0], "direct_p99_ms": med["direct"][1],
            "kvgate_p50_ms": med["kvgate"][0], "kvgate_p99_ms": med["kvgate"][1],
            "added_p50_ms": med["kvgate"][0] - med["direct"][0],
            "added_p99_ms": med["kvgate"][1] - med["direct"][1]}


# -- load generators ------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(port: int, body: str, duration: int, connections: int,
         headers: dict[str, str] | None = None, timeout: int = 2) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {orjson.dumps(body).decode()}\n")
        for name, value in (headers or {}).items():
            script.write(f"wrk.headers[{orjson.dumps(name).decode()}] = "
                         f"{orjson.dumps(value).decode()}\n")
    try:
        out = subprocess.run(
            pinned_cmd(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
                        f"--timeout={timeout}s", "-s", script.name,
                        f"http://127.0.0.1:{port}/v1/chat/completions"], 0),
            capture_output=True, text=True, check=True, timeout=duration + timeout + 30).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw error responses:\n{out}")
    latency = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", out, re.M))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": _ms(latency["50"]), "p99": _ms(latency["99"])}


def run_hey(port: int, body: str, rate: int, duration: int,
         headers: dict[str, str] | None = None) -> tuple[float, float]:
    workers = 10
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(
        pinned_cmd(["hey", "-z", f"{duration}s", "-c", str(workers), "-q",
                    str(max(1, rate // workers)), *extra,
                    "-m", "POST", "-T", "application/json", "-d", body,
                    f"http://127.0.0.1:{port}/v1/chat/completions"], 0),
        capture_output=True, text=True, check=True, timeout=duration + 30).stdout
    found = dict(re.findall(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"), out))
    if "99" not in found:  # hey omits p99 below 100 responses: take the slowest then
        slowest = re.search(r"Slowest:\s+([\d.]+) secs", out)
        if slowest:
            found["99"] = slowest.group(1)
    if "50" not in found or "99" not in found:
        return float("nan"), float("nan")  # no response came back in time
    return float(found["50"]) * 1e3, float(found["99"]) * 1e3


def pinned_cmd(cmd: list[str], cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if os.cpu_count() and os.cpu_count() > 1 else cmd


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(number) * _UNITS[unit]


# -- report -----------------------------------------------------------------------------------------

def _print(rows: list[Row], latency: dict[str, float]) -> None:
    print("\n| path | response | req/s | p50 ms | p99 ms | proxy CPU µs/request |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "-"
        print(f"| {r.path} | {r.shape} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {cpu} |")
    by = {(r.path, r.shape): r for r in rows}
    shapes = [shape for shape, _, _ in _SHAPES]
    print("\n| ratio | " + " | ".join(shapes) + " |\n|---|" + "---:|" * len(shapes))
    print("| kvgate req/s ÷ direct | " + " | ".join(
        f"{by[('kvgate', s)].rps / by[('direct', s)].rps:.2f}" for s in shapes) + " |")
    print(f"\nAt {latency['rate']} req/s offered (hey, medians of 3 alternating runs):")
    print("| path | p50 ms | p99 ms |\n|---|---:|---:|")
    for path in ("direct", "kvgate"):
        print(f"| {path} | {latency[path + '_p50_ms']:.2f} | {latency[path + '_p99_ms']:.2f} |")
    print(f"| added by kvgate | {latency['added_p50_ms']:.2f} | {latency['added_p99_ms']:.2f} |")
    checks = [("CPU per JSON request (µs)", by[("kvgate", "json")].cpu_us,
               _TARGETS["cpu_us_request"]),
              ("CPU per 20-chunk stream (µs)", by[("kvgate", "sse-20")].cpu_us,
               _TARGETS["cpu_us_stream"]),
              ("added p50 at rate (ms)", latency["added_p50_ms"], _TARGETS["added_p50_ms"]),
              ("added p99 at rate (ms)", latency["added_p99_ms"], _TARGETS["added_p99_ms"])]
    print("\n| target | measured | limit | met |\n|---|---:|---:|---|")
    for name, value, limit in checks:
        print(f"| {name} | {value:.2f} | {limit:g} | {'yes' if value <= limit else 'NO'} |")


if __name__ == "__main__":
    sys.exit(main())
