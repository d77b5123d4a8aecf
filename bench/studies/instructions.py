"""What a change costs the gateway per request, counted in instructions rather than timed.

    python -m bench instructions [--baseline DIR] [--signals] [--keys] [--traces]
                                 [--cache-aware] [--requests 2000]

CPU time per request moves by ±15% between two runs on a shared virtual machine, more than the
change being judged. Instructions retired do not: each gateway runs under valgrind's callgrind,
its counters are zeroed once it has served a warm-up, then it serves ``--requests`` requests of
one shape (hey, 8 connections, against ``bench.fast_backend``), and the count is read; the same
for the next shape. Start-up and imports are outside the window, so only the request path is
counted. The paths: this checkout (``kvgate``, defaults: engine scraping every 2 s, ejection
and the session header on), another checkout (``kvgate@base``, e.g. a worktree of the last
release; its ring core built in place), and this checkout with token-weighted loads and the
conversation key on as well (``kvgate+signals``). The target: a change costs at most 5% per
request.

``--keys`` adds ``kvgate+keys``: API keys and per-key limits on (limits far above the load, so
every request is checked and charged); the target: at most 10% over ``kvgate`` per request.
Every path is sent the same Authorization header.

``--traces`` adds ``kvgate+traces``: OpenTelemetry tracing on, exporting OTLP/HTTP to
``bench.otlp_sink``; each count is read only once the sink has every span of the window, so the
export thread's encoding and sending are counted too. It prints the cost of tracing on; the
cost of tracing off is ``kvgate`` against ``--baseline`` (a checkout without tracing).

``--cache-aware`` counts the scheduler's own cost instead: PrefixHash and CacheAware over 64
replicas (endpoints that all lead to the one backend), on a chat whose ~4 KB system prompt and
question make 16 blocks to hash, match and remember, engine scraping off in both (it is work per
second, not per request); the target is CacheAware within 10% of PrefixHash per request.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.procs import MASTER_KEY, OtlpSink, free_port, keys_config, spawn, stop, wait_for_port
from bench.results import check, save, table, targets_table

SHAPES = {"json": "", "sse-20": ', "stream": true'}
BODY = '{"model": "m", "messages": [{"role": "user", "content": "Hello there, how are you?"}]%s}'
MAX_COST = 1.05  # this checkout ÷ the baseline, per request
HEY_CLIENTS = 8  # hey's concurrent clients
# --cache-aware: a long shared system prompt (16 blocks of 256 bytes) before each question
LONG_BODY = ('{"model": "m", "messages": [{"role": "system", "content": "%s"}, '
             '{"role": "user", "content": "Which clause covers late delivery?"}]%%s}'
             % ("You answer questions about the contract filed below, citing clauses. " * 60))
KEYS = "apiKeys"  # marks the variant whose config gets a keys file (made in the run's tmp)
KEYS_MAX_COST = 1.10  # keys + limits on ÷ off, per request
TRACES = "tracing: {enabled: true}\n"  # marks the traced variant (its gateway exports to a sink)
SPANS_PER_REQUEST = 4  # the request, parse, pick, one upstream attempt
CACHE_AWARE_REPLICAS = 64
CACHE_AWARE_MAX_COST = 1.10  # CacheAware ÷ PrefixHash, per request
# --cache-aware: engine scraping off in both. Scraping 64 replicas every 2 s is work per second,
# not per request: under callgrind the window would hold scrapes in proportion to its wall
# time, so the slower variant would be charged more of them (±10% from run to run).
NO_SCRAPES = "engineMetrics: {intervalSeconds: 0}\n"
# Token loads and the conversation key on; engine scraping is on by default (every 2 s). A
# shorter interval would put more scrapes into the counted window under callgrind, which runs
# the gateway ~50× slower than native: the window would hold ~50× the scrapes it really does.
SIGNALS = ("loadBalancing: {strategy: PrefixHash, loadUnit: Tokens, "
           "prefixHash: {prefixFrom: Conversation, prefixCharLength: 2000}}", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench instructions",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="another kvgate checkout to compare with (kvgate@base)")
    parser.add_argument("--signals", action="store_true",
                        help="also count kvgate with token loads and the conversation key on")
    parser.add_argument("--keys", action="store_true",
                        help="also count kvgate with API keys and per-key limits on")
    parser.add_argument("--traces", action="store_true",
                        help="also count kvgate with OpenTelemetry tracing on (OTLP to a sink)")
    parser.add_argument("--cache-aware", action="store_true",
                        help="count PrefixHash and CacheAware at 64 replicas on a long prompt "
                        "instead")
    parser.add_argument("--requests", type=int, default=2000, help="requests counted per shape")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.requests < HEY_CLIENTS or args.requests % HEY_CLIENTS:
        # hey sends whole rounds of its clients: 500 at 8 a time would be 496 requests
        parser.error(f"--requests must be a multiple of {HEY_CLIENTS}")
    for tool in ("valgrind", "callgrind_control", "hey"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed (apt-get install valgrind hey)")
    if args.cache_aware:
        variants, body, replicas = _cache_aware_variants(), LONG_BODY, CACHE_AWARE_REPLICAS
    else:
        variants, body, replicas = (_variants(args.baseline, args.signals, args.keys,
                                              args.traces), BODY, 1)
    counts = _count_all(variants, args.requests, body, replicas)
    targets = (_cache_aware_targets(counts) if args.cache_aware
               else _targets(counts) + _keys_targets(counts))
    result = {"settings": {"requests": args.requests, "baseline": str(args.baseline or ""),
                           "replicas": replicas, "body_bytes": len(body)},
              "instructions": counts, "targets": targets}
    text = _markdown(result)
    print("\n" + text)
    written = save(args.out, "instructions-cache-aware" if args.cache_aware else "instructions",
                   result, text)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _variants(baseline: Path | None, signals: bool, keys: bool = False,
              traces: bool = False) -> dict[str, tuple[Path, str, str]]:
    """name -> (checkout root, loadBalancing line, extra config) of each gateway counted."""
    here = Path(__file__).resolve().parents[2]
    variants = {"kvgate": (here, "loadBalancing: {strategy: PrefixHash}", "")}
    if baseline is not None:
        variants["kvgate@base"] = (baseline.resolve(), "loadBalancing: {strategy: PrefixHash}", "")
    if signals:
        variants["kvgate+signals"] = (here, *SIGNALS)
    if keys:
        variants["kvgate+keys"] = (here, "loadBalancing: {strategy: PrefixHash}", KEYS)
    if traces:
        variants["kvgate+traces"] = (here, "loadBalancing: {strategy: PrefixHash}", TRACES)
    return variants


def _cache_aware_variants() -> dict[str, tuple[Path, str, str]]:
    here = Path(__file__).resolve().parents[2]
    return {"PrefixHash": (here, "loadBalancing: {strategy: PrefixHash}", NO_SCRAPES),
            "CacheAware": (here, "loadBalancing: {strategy: CacheAware}", NO_SCRAPES)}


def _count_all(variants: dict[str, tuple[Path, str, str]], requests: int, body: str = BODY,
               replicas: int = 1) -> dict[str, dict[str, float]]:
    """k instructions per request, by variant and shape."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        backend_port = free_port()
        backend = spawn([sys.executable, "-m", "bench.fast_backend", "--port", str(backend_port),
                         "--chunks", "20", "--chunk-gap-ms", "0"])
        stack.callback(stop, backend)
        wait_for_port(backend_port)
        counts = {}
        for name, (root, balancing, extra) in variants.items():
            if extra is KEYS:
                extra = keys_config(tmp)
            config = _config(tmp, name, backend_port, balancing, extra, replicas)
            sink = stack.enter_context(OtlpSink()) if extra is TRACES else None
            counts[name] = _count(root, config, tmp / f"{_slug(name)}.callgrind", requests, body,
                                  sink)
            print(f"  {name:15s} " + "  ".join(f"{shape} {k:,.1f}k" for shape, k in
                                              counts[name].items()), flush=True)
    return counts


def _count(root: Path, config: tuple[Path, int], out: Path, requests: int,
           body: str = BODY, sink: OtlpSink | None = None) -> dict[str, float]:
    """One gateway under callgrind: per shape, zero the counters, serve, read the count (with
    a ``sink``: once every span of the requests served reached it)."""
    path, port = config
    module = "kvgate" if (root / "kvgate" / "cli.py").exists() else "lb.cli"
    env = {**os.environ, "PYTHONPATH": str(root)}
    if sink is not None:
        env.update(sink.environment())
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             sys.executable, "-m", module, "gateway", "-c", str(path)],
                            cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_for_port(port, timeout=300)
        result = {}
        served = 0
        for shape, extra in SHAPES.items():
            _hey(port, body % extra, 200)  # warm-up: first-request paths, pools, caches
            served += 200
            if sink is not None:
                sink.wait_for(served * SPANS_PER_REQUEST)
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                           capture_output=True)
            _hey(port, body % extra, requests)
            served += requests
            if sink is not None:
                sink.wait_for(served * SPANS_PER_REQUEST)
            result[shape] = _dumped_total(proc.pid, out) / requests / 1e3
        return result
    finally:
        stop(proc)


def _hey(port: int, body: str, requests: int) -> None:
    # -t 120: under callgrind a traced gateway's export thread holds up requests past hey's 20 s
    done = subprocess.run(["hey", "-n", str(requests), "-c", str(HEY_CLIENTS), "-t", "120",
                           "-m", "POST",
                           "-T", "application/json", "-d", body,
                           "-H", f"Authorization: Bearer {MASTER_KEY}",
                           f"http://127.0.0.1:{port}/v1/chat/completions"],
                          capture_output=True, text=True, check=True)
    served = re.search(r"\[200\]\s+(\d+) responses", done.stdout)
    if served is None or int(served.group(1)) != requests:
        raise RuntimeError(f"not every request was answered with 200:\n{done.stdout[-2500:]}")


def _dumped_total(pid: int, out: Path) -> int:
    """Dump the counters (since the last zeroing) and read the dump's total instructions."""
    before = set(out.parent.glob(out.name + "*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in set(out.parent.glob(out.name + "*")) - before:
            match = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
            if match:
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no dump")


def _config(tmp: Path, name: str, backend_port: int, balancing: str,
            extra: str, replicas: int = 1) -> tuple[Path, int]:
    """A static config; with ``replicas`` > 1, that many endpoints (keys r0, r1, ...) all
    leading to the one backend, so the ring and the scorer work at that size."""
    port = free_port()
    address = f"127.0.0.1:{backend_port}"
    endpoints = (f'[{{address: "{address}"}}]' if replicas == 1 else
                 "[" + ", ".join(f'{{address: "{address}", key: r{i}}}'
                                 for i in range(replicas)) + "]")
    path = tmp / f"{_slug(name)}.yaml"
    path.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, metricsPort: 0, logLevel: warning}}\n" + extra
        + "models:\n- apiVersion: kvgate.dev/v1\n  kind: Model\n  metadata: {name: m}\n"
        "  spec:\n    url: hf://bench/m\n    engine: VLLM\n    features: [TextGeneration]\n"
        f"    {balancing}\n"
        f"endpoints:\n  m: {endpoints}\n")
    return path, port


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name)


def _targets(counts: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    base = counts.get("kvgate@base")
    if base is None:
        return []
    return [check(f"{name} ÷ kvgate@base, instructions per {shape} request",
                  counts[name][shape] / base[shape], MAX_COST)
            for name in counts if name not in ("kvgate@base", "kvgate+keys", "kvgate+traces")
            for shape in SHAPES]  # keys and traces have their own figures, against kvgate


def _keys_targets(counts: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    if "kvgate+keys" not in counts:
        return []
    return [check(f"kvgate+keys ÷ kvgate, instructions per {shape} request",
                  counts["kvgate+keys"][shape] / counts["kvgate"][shape], KEYS_MAX_COST)
            for shape in SHAPES]


def _traces_cost(counts: dict[str, dict[str, float]]) -> list[str]:
    """Tracing on ÷ off per request, printed: a cost to know, not a target."""
    if "kvgate+traces" not in counts:
        return []
    return ["", "Tracing on (OTLP export included) ÷ kvgate: " + ", ".join(
        f"{counts['kvgate+traces'][shape] / counts['kvgate'][shape]:.3f} per {shape} request "
        f"(+{counts['kvgate+traces'][shape] - counts['kvgate'][shape]:,.1f}k instructions)"
        for shape in SHAPES) + "."]


def _cache_aware_targets(counts: dict[str, dict[str, float]]) -> list[dict[str, object]]:
    return [check(f"CacheAware ÷ PrefixHash at {CACHE_AWARE_REPLICAS} replicas, instructions "
                  f"per {shape} request", counts["CacheAware"][shape] / counts["PrefixHash"][shape],
                  CACHE_AWARE_MAX_COST) for shape in SHAPES]


def _markdown(result: dict) -> str:  # type: ignore[type-arg]
    counts = result["instructions"]
    base_name = "PrefixHash" if "PrefixHash" in counts else "kvgate@base"
    base = counts.get(base_name)
    settings = result["settings"]
    rows = [(name, shape, f"{k:,.1f}", f"{k / base[shape]:.3f}" if base else "-")
            for name, by_shape in counts.items() for shape, k in by_shape.items()]
    lines = [f"Gateway instructions per request under callgrind ({settings['requests']} "
             "requests per shape after a warm-up; start-up excluded), one fast backend "
             f"behind {settings.get('replicas', 1)} endpoint(s), {settings.get('body_bytes', 0):,}"
             "-byte requests.", "",
             table(("path", "response", "k instructions/request", f"÷ {base_name}"), rows, "ll")]
    if result["targets"]:
        lines += ["", targets_table(result["targets"])]
    lines += _traces_cost(counts)
    return "\n".join(lines) + "\n"
