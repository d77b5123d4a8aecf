"""Where the gateway's CPU goes under load: py-spy samples of a saturated kvgate, summarised.

It starts the fast backend and ``kvgate gateway`` (pinned as in the peers study), drives
them with wrk (64 connections) for the JSON or the 20-chunk SSE shape, and records the gateway
with ``py-spy record --native`` (Python and C frames). The summary groups the samples by
where they end (system calls, the GC, uvicorn, the proxy, the upstream pool, the event loop)
and lists the top frames, so a missed target can be traced to what costs.

    python -m bench profile [--shape json|sse-20] [--duration 10] [--out bench/results]

py-spy must be on $PATH or next to the Python running this (it is a pip package).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.load_tools import CHAT_BODY, run_wrk
from bench.procs import cpu_seconds, free_port, gateway_config, pinned, spawn, stop, wait_for_port
from bench.results import table

# (group, pattern on the leaf frame or on any frame, where) in priority order
_GROUPS = [
    ("syscall: write/send", r"^(write|send|sendmsg|writev) \(libc", "leaf"),
    ("syscall: read/recv", r"^(read|recv|recvfrom|readv) \(libc", "leaf"),
    ("syscall: epoll", r"^epoll_", "leaf"),
    ("syscall: other", r"\(libc\.so", "leaf"),
    ("cyclic GC", r"gc_collect|collect_with_callback", "any"),
    ("ring pick (Cython)", r"_chwbl", "any"),
    ("request parsing (orjson, lb.parse)", r"lb/parse\.py|orjson", "any"),
    ("upstream pool (lb.http1)", r"lb/http1\.py", "any"),
    ("uvicorn protocol and ASGI send/receive", r"uvicorn/", "any"),
    ("gateway logic (lb.proxy, balancer, metrics, app)", r"lb/(proxy|balancer|metrics|app|"
                                                         r"upstream|registry|server)\.py", "any"),
    ("event loop and tasks (uvloop, asyncio)", r"loop\.c|_asynciomodule|asyncio/", "any"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench profile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("json", "sse-20"), default="json")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "samples.txt"
        cpu_us, rps = _record(pyspy, args.shape, args.duration, args.rate, raw, Path(tmp))
        text = summarise(raw.read_text(), args.shape, cpu_us, rps)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"profile-{args.shape}.txt"
    out.write_text(text)
    print(f"wrote {out}")
    return 0


def _record(pyspy: str, shape: str, duration: int, rate: int, raw: Path,
            tmp: Path) -> tuple[float, float]:
    backend_port, port = free_port(), free_port()
    config = tmp / "gateway.yaml"
    config.write_text(gateway_config({"m": [f"127.0.0.1:{backend_port}"]}, port))
    backend = spawn([sys.executable, "-m", "bench.fast_backend", "--port", str(backend_port),
                     "--chunks", "20", "--chunk-gap-ms", "0"], cpu=0)
    gateway = spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config)], cpu=1)
    try:
        wait_for_port(backend_port)
        wait_for_port(port)
        body = CHAT_BODY % ("m", ',"stream":true' if shape == "sse-20" else "")
        run_wrk(port, body, 2, 64)
        recorder = subprocess.Popen([pyspy, "record", "--native", "-r", str(rate), "-d",
                                     str(duration), "-f", "raw", "-o", str(raw), "--pid",
                                     str(gateway.pid)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        pinned(recorder.pid, 0)
        before = cpu_seconds(gateway.pid)
        result = run_wrk(port, body, duration, 64)
        cpu = cpu_seconds(gateway.pid) - before
        recorder.wait(duration + 60)
    finally:
        stop(gateway)
        stop(backend)
    return cpu / result["requests"] * 1e6, result["rps"]


def summarise(samples: str, shape: str, cpu_us: float, rps: float) -> str:
    """Groups, top leaf frames and the heaviest Python functions (inclusive)."""
    groups: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in samples.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_clean(f) for f in stack.split(";")]
        leaves[frames[-1]] += n
        groups[_group(frames)] += n
        for name in {f.split(" (")[0] + " (" + _file(f) + ")" for f in frames
                     if re.search(r"lb/|uvicorn/", f)}:
            functions[name] += n
    if not total:
        return "no samples (is py-spy allowed to attach? try as root)\n"
    lines = [f"kvgate under wrk -c64, {shape}: {rps:,.0f} req/s, {cpu_us:.0f} µs CPU per request "
             f"while profiled; {total} py-spy samples (--native)",
             "(py-spy stops the process for every sample, so the profiled run is slower than an "
             "unprofiled one: read the shares, not the absolute figures)", "",
             "Where the samples end (each sample counted once, first matching group):", "",
             _shares("group", groups.most_common(), total), "",
             "Top 25 leaf frames (self time):", "",
             _shares("frame", leaves.most_common(25), total), "",
             "Heaviest Python functions of lb/ and uvicorn (inclusive):", "",
             _shares("function", functions.most_common(30), total)]
    return "\n".join(lines) + "\n"


def _shares(what: str, counts: list[tuple[str, int]], total: int) -> str:
    """A table of sample shares, largest first (names cut to stay readable)."""
    return table(("share", what), ((f"{100 * n / total:.1f}%", name[:110]) for name, n in counts),
                 "rl")


def _clean(frame: str) -> str:
    """Drop machine paths: keep the package-relative part of file names."""
    return re.sub(r"\(([^()]*/)?((lb|uvicorn|asyncio|starlette|httptools)/[^()]*)\)", r"(\2)",
                  frame)


def _file(frame: str) -> str:
    found = re.search(r"\(([^():]*)", frame)
    return found.group(1) if found else "?"


def _group(frames: list[str]) -> str:
    """System calls and the GC by the leaf; otherwise the innermost frame that belongs to a
    known component (the proxy calls the pool, uvicorn calls the proxy: the callee wins)."""
    for name, pattern, where in _GROUPS:
        if where == "leaf" and re.search(pattern, frames[-1]):
            return name
    if any(re.search(r"gc_collect|collect_with_callback", f) for f in frames):
        return "cyclic GC"
    for frame in reversed(frames):
        for name, pattern, where in _GROUPS:
            if where == "any" and re.search(pattern, frame):
                return name
    return "other (interpreter, allocator)"


if __name__ == "__main__":
    sys.exit(main())
