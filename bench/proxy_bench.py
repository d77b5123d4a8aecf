"""Gateway overhead, side by side in one run: direct to a backend vs through kvgate.

For each path (direct, kvgate, and ``bare``: the plainest uvicorn+aiohttp proxy,
``bench/bare_proxy.py``, the calibration reference) and each response shape it runs the same
load generator (wrk, 64 connections) against the same backend and reports requests/s, latency
p50/p99, and the proxy's CPU time per request (process CPU seconds over requests served, read
from /proc). The CPU targets were set where the bare proxy spent 125 µs per JSON request and
185 µs per stream, so kvgate's figures are also given at that scale (kvgate ÷ bare × 125).
Shapes: one JSON body; a 20-chunk SSE stream written back to back (the calibration's shape:
chunks often share a read); the same stream paced 1 ms per chunk (every chunk its own read,
as with a model server generating tokens). Then it offers a fixed 1,000 req/s to direct and
kvgate and reports the latency the gateway adds at a moderate rate: Poisson arrivals
(``run_paced``), and hey's bursts of 10 beside them.

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
# The calibration behind the CPU targets: the bare uvicorn+aiohttp proxy's CPU per request
# where the targets were set. ``bench/bare_proxy.py`` is measured again in the same run, so
# kvgate's targets are read as ratios to it and do not move with how fast the machine is today.
_BARE_REFERENCE_US = {"json": 125.0, "sse-20": 185.0}


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
    """Two backends (``m``: back-to-back chunks, ``m-paced``: 1 ms per chunk), the gateway
    with a model for each, and a bare proxy in front of each (``bare-m``, ``bare-m-paced``)."""
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
        procs["gateway"] = spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config)],
                                 cpu=1)
        for model, port in list(ports.items()):
            ports["bare-" + model] = free_port()
            procs["bare-" + model] = spawn(
                [sys.executable, "-m", "bench.bare_proxy", "--port", str(ports["bare-" + model]),
                 "--upstream", f"127.0.0.1:{port}"], cpu=1)
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
                                 ("kvgate", gateway_port, procs["gateway"]),
                                 ("bare", ports["bare-" + model], procs["bare-" + model])):
            # In the direct run the backend has CPU 1 to itself; when proxied, it moves to CPU 0
            # with the load generator so the gateway has CPU 1 alone.
            pinned(backend.pid, 1 if path == "direct" else 0)
            run_wrk(port, body, 1, connections)  # warm-up: connections, caches, JIT-free paths
            before = cpu_seconds(proc.pid)
            result = run_wrk(port, body, duration, connections)
            cpu = cpu_seconds(proc.pid) - before
            cpu_us = cpu / result["requests"] * 1e6 if path != "direct" else None
            rows.append(Row(path, shape, result["rps"], result["p50"], result["p99"], cpu_us))
            print(f"  {path:7s} {shape:12s} {result['rps']:9.0f} req/s", flush=True)
    return rows


def _latency_at_rate(backend_port: int, gateway_port: int, rate: int,
                     duration: int) -> dict[str, float | int]:
    """Poisson arrivals (``run_paced``) and hey's bursts at one offered rate; runs alternate so
    drift hits both paths alike; medians of 3."""
    body = CHAT_BODY % ("m", "")
    samples: dict[str, list[tuple[float, float, float, float]]] = {"direct": [], "kvgate": []}
    for _ in range(3):
        for path, port in (("direct", backend_port), ("kvgate", gateway_port)):
            paced = run_paced(port, body, rate, max(2, duration // 2))
            burst = run_hey(port, body, rate, max(2, duration // 2))
            samples[path].append((paced["p50"], paced["p99"], *burst))
    keys = ("p50_ms", "p99_ms", "burst_p50_ms", "burst_p99_ms")
    out: dict[str, float | int] = {"rate": rate}
    for path, runs in samples.items():
        for i, key in enumerate(keys):
            out[f"{path}_{key}"] = statistics.median(r[i] for r in runs)
    for key in keys:
        out["added_" + key] = out["kvgate_" + key] - out["direct_" + key]
    return out

# -- load generators ------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(port: int, body: str, duration: int, connections: int,
         headers: dict[str, str] | None = None, timeout: int = 2,
         think_ms: float = 0.0) -> dict[str, float]:
    """wrk, one thread, POSTing ``body``. With ``think_ms``, each connection waits an
    exponentially distributed time of that mean before each request (wrk's ``delay()``), so
    many connections together offer a Poisson stream of requests instead of a closed loop."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {orjson.dumps(body).decode()}\n")
        for name, value in (headers or {}).items():
            script.write(f"wrk.headers[{orjson.dumps(name).decode()}] = "
                         f"{orjson.dumps(value).decode()}\n")
        if think_ms:
            script.write(f"function delay() return -math.log(1 - math.random()) * {think_ms} end\n")
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


def run_paced(port: int, body: str, rate: int, duration: int,
              headers: dict[str, str] | None = None) -> dict[str, float]:
    """About ``rate`` req/s arriving as independent clients would: ``_PACED_CONNECTIONS``
    connections, each sending after an exponential think time, which together make a Poisson
    stream (minus the time requests take, so the achieved rate, returned as ``rps``, is a few
    percent lower). Latency is timed from each request's own send."""
    return run_wrk(port, body, duration, _PACED_CONNECTIONS, headers, timeout=10,
                   think_ms=_PACED_CONNECTIONS / rate * 1e3)


# Enough connections that the arrivals are close to Poisson at any rate worth measuring.
_PACED_CONNECTIONS = 50


def run_hey(port: int, body: str, rate: int, duration: int,
         headers: dict[str, str] | None = None) -> tuple[float, float]:
    """(p50, p99) ms from hey at ``rate`` req/s. hey's workers each tick at ``rate / 10`` and
    start together, so requests come in bursts of 10 every ``10 / rate`` s: a burst test at a
    moderate mean rate (latency ≈ the time to serve the whole burst), kept beside
    ``run_paced`` because it shows how CPU per request turns into latency."""
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
    for path in ("kvgate", "bare"):
        print(f"| {path} req/s ÷ direct | " + " | ".join(
            f"{by[(path, s)].rps / by[('direct', s)].rps:.2f}" for s in shapes) + " |")
    print("| kvgate CPU ÷ bare CPU | " + " | ".join(
        f"{by[('kvgate', s)].cpu_us / by[('bare', s)].cpu_us:.2f}" for s in shapes) + " |")
    print(f"\nAt {latency['rate']} req/s offered, medians of 3 alternating runs (Poisson: 50 wrk "
          "connections with exponential think times; bursts: hey, 10 requests at a time):")
    print("| path | p50 ms | p99 ms | bursts: p50 ms | bursts: p99 ms |\n|---|---:|---:|---:|---:|")
    for path in ("direct", "kvgate"):
        print(f"| {path} | " + " | ".join(f"{latency[f'{path}_{k}']:.2f}" for k in
                                         ("p50_ms", "p99_ms", "burst_p50_ms", "burst_p99_ms"))
              + " |")
    print("| added by kvgate | " + " | ".join(f"{latency[f'added_{k}']:.2f}" for k in
                                            ("p50_ms", "p99_ms", "burst_p50_ms",
                                             "burst_p99_ms")) + " |")
    checks = cpu_checks({s: by[("kvgate", s)].cpu_us for s in shapes},
                        {s: by[("bare", s)].cpu_us for s in shapes})
    checks += [("added p50 at rate, Poisson (ms)", latency["added_p50_ms"],
                _TARGETS["added_p50_ms"]),
               ("added p99 at rate, Poisson (ms)", latency["added_p99_ms"],
                _TARGETS["added_p99_ms"])]
    print("\n| target | measured | limit | met |\n|---|---:|---:|---|")
    for name, value, limit in checks:
        print(f"| {name} | {value:.2f} | {limit:g} | {'yes' if value <= limit else 'NO'} |")


def cpu_checks(kvgate: dict[str, float | None],
               bare: dict[str, float | None]) -> list[tuple[str, float, float]]:
    """(name, µs, limit) for kvgate's CPU targets by response shape: at the calibration's scale
    when the bare proxy was measured in the same run, and on this machine's own clock."""
    checks = []
    for shape, what, limit in (("json", "JSON request", _TARGETS["cpu_us_request"]),
                               ("sse-20", "20-chunk stream", _TARGETS["cpu_us_stream"])):
        ours, theirs = kvgate.get(shape), bare.get(shape)
        if not ours:
            continue
        if theirs:
            scale = _BARE_REFERENCE_US[shape]
            checks.append((f"kvgate CPU per {what} at the calibration's scale, µs "
                           f"(kvgate ÷ bare uvicorn+aiohttp here × {scale:g})",
                           ours / theirs * scale, limit))
        checks.append((f"kvgate CPU per {what}, µs on this machine today", ours, limit))
    return checks


if __name__ == "__main__":
    sys.exit(main())
