"""Scale figures of the gateway: open streams, the waiting room, and ring size.

1. **Memory per open stream.** N clients each open a streamed chat completion through kvgate
   and hold it after the first chunk (the backend sends one chunk, then waits); with all N
   open, the gateway's RSS (all its processes) is read from /proc and compared with its RSS
   before. Levels 1,000 and 10,000 streams. Each stream holds two sockets in the gateway
   (client and upstream); this machine's hard limit of open files (``ulimit -Hn``; raised to
   it here with ``resource.setrlimit``) caps one process near 10,000 sockets, so the gateway
   runs with ``--workers 2`` (5,000 streams and 10,000 sockets each), which also shows the
   shared load table holding up.
2. **The waiting room.** 10,000 requests for a model with no replica wait in the gateway, each
   on its own client connection; then a replica appears (the gateway is told by a signal; it
   records the time on the shared monotonic clock) and the time until the last client has its
   full response is reported, with the CPU time every process spent meanwhile and the number
   of upstream connections the gateway opened. The clients are keep-alive clients: a
   connection stays open after its answer and is closed once all are in, so the drain measures
   serving the requests, not tearing down 10,000 connections (which ``connection: close``
   would add: ~35 µs of gateway CPU and ~40 µs of client CPU per connection on this machine).
   It runs ``--rounds`` times (3) and reports the run with the median drain.
3. **Ring lookups as endpoints grow** to 1,024 (the ring study's rings, ``bench.rings``: 256
   vnodes each, every endpoint with requests in flight), with the per-process loads and with
   the shared table that ``--workers`` uses: pick, and acquire+release.

    python -m bench scale [--streams 1000,10000] [--waiting 10000] [--rounds 3] [--quick]
    python -m bench scale --only waiting    # one part (or a comma list); prints only
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench import rings
from bench.procs import (free_port, spawn, steal_seconds, stop, tree, tree_cpu_seconds,
                         tree_rss_bytes, wait_for_port)
from bench.results import check, save, table, targets_table

_BODY = (b'{"model":"m","messages":[{"role":"user","content":"Tell me a long story."}]%s}')
_TARGETS = {"rss_10k_gib": 1.0, "drain_10k_s": 1.0}
_PARTS = ("streams", "waiting", "ring")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scale",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1000,10000", help="open-stream levels")
    parser.add_argument("--waiting", type=int, default=10_000, help="requests in the room")
    parser.add_argument("--rounds", type=int, default=3,
                        help="waiting-room runs; the one with the median drain is reported")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    parser.add_argument("--quick", action="store_true", help="1,000 streams/waiters, fewer "
                                                             "ring rounds")
    parser.add_argument("--only", default=",".join(_PARTS),
                        help=f"comma list of parts to run ({', '.join(_PARTS)}); a partial "
                             "run prints its figures and writes no results")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--waiting-gateway", nargs="+", type=int,
                        help=argparse.SUPPRESS)  # internal: PORT BACKEND METRICS-PORT...
    args = parser.parse_args(argv)
    if args.waiting_gateway:
        port, backend, *metrics = args.waiting_gateway
        return _waiting_gateway(port, backend, metrics)
    parts = set(args.only.split(","))
    if not parts <= set(_PARTS):
        parser.error(f"--only: unknown part(s) {', '.join(sorted(parts - set(_PARTS)))}")
    limit = _raise_nofile()
    levels = [1000] if args.quick else [int(n) for n in args.streams.split(",")]
    waiting = 1000 if args.quick else args.waiting
    print(f"open files allowed per process: {limit}; gateway workers: {args.workers}",
          flush=True)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    result: dict[str, Any] = {"settings": {"workers": args.workers, "nofile": limit,
                                           "cores": os.cpu_count(),
                                           "load_average_1m": os.getloadavg()[0]}}
    if "streams" in parts:
        result["streams"] = [asyncio.run(_streams(n, args.workers)) for n in levels]
    if "waiting" in parts:
        result["waiting_room"] = _median_round(
            [asyncio.run(_waiting_room(waiting, args.workers)) for _ in range(args.rounds)])
    if "ring" in parts:
        result["ring"] = _ring_sizes(args.quick)
    if parts != set(_PARTS):
        return 0  # a partial run: the figures were printed as they came
    result["targets"] = _targets(result)
    text = _markdown(result)
    print("\n" + text)
    written = save(args.out, "scale", result, text)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _raise_nofile() -> int:
    """Soft limit up to the hard one; children (gateway, backend) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _backend(port: int, gap_ms: float) -> subprocess.Popen[bytes]:
    return spawn([sys.executable, "-m", "bench.fast_backend", "--port", str(port), "--chunks",
                   "2", "--chunk-gap-ms", str(gap_ms)], stderr=None)


# -- HTTP clients (raw sockets: 10,000 of them must fit in one process) ---------------------------


def _request(stream: bool) -> bytes:
    body = _BODY % (b',"stream":true' if stream else b"")
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body))


async def _open_stream(port: int, gate: asyncio.Semaphore) -> asyncio.StreamWriter:
    """A streamed completion, read up to its first chunk and then left open."""
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request(stream=True))
        seen = b""
        while b"data:" not in seen:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError("the gateway closed a stream before its first chunk")
            seen += data
        if not seen.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"stream refused: {seen[:80]!r}")
    return writer


class _Answers:
    """The waiting room's clients as one: how many answers are still due, when the last one
    was complete, and the first failure. One future for all of them, not one per request."""

    __slots__ = ("due", "last", "error", "done")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.due = count
        self.last = 0.0
        self.error: Exception | None = None
        self.done: asyncio.Future[None] = loop.create_future()

    def answered(self) -> None:
        self.last = time.monotonic()
        self.due -= 1
        if self.due == 0 and not self.done.done():
            self.done.set_result(None)

    def failed(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if not self.done.done():
            self.done.set_exception(error)

    def check(self) -> None:
        """Raise the first failure, if any (while the requests are still arriving)."""
        if self.error is not None:
            raise self.error


class _OneRequest(asyncio.Protocol):
    """One non-streamed request on its own keep-alive connection, read the way a load
    generator would.

    The clients' CPU shares the machine with the gateway while the room drains, so they do no
    more than they must: the request is one prebuilt buffer written on connect, and the answer
    is accumulated until its head says ``200`` and ``content-length`` bytes of body have come.
    No stream objects, no task and no future per request. An answer without a
    ``content-length`` (the backend always sends one, and the gateway passes it on), with
    bytes beyond it, or cut short by the connection's end is a failure.
    """

    __slots__ = ("_request", "_answers", "_data", "_need", "_finished")

    def __init__(self, request: bytes, answers: _Answers) -> None:
        self._request = request
        self._answers = answers
        self._data = b""
        self._need = -1  # the answer's size in bytes, head included, once the head is in
        self._finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self._finished:
            self._fail(f"bytes after the answer: {data[:80]!r}")
            return
        if self._data:
            data = self._data + data
        self._data = data
        need = self._need
        if need == -1:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return
            head = data[:end].lower()
            if not head.startswith(b"http/1.1 200 "):
                self._fail(f"request failed: {data[:80]!r}")
                return
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self._fail(f"answer without a content-length: {data[:80]!r}")
                return
            start = at + len(b"\r\ncontent-length:")
            stop = head.find(b"\r\n", start)
            need = self._need = end + 4 + int(head[start:stop if stop >= 0 else None])
        if len(data) >= need:
            if len(data) > need:
                self._fail(f"answer longer than its content-length: {data[:80]!r}")
                return
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._finished:
            self._fail(f"connection lost before the whole answer ({exc!r}): "
                       f"{self._data[:80]!r}")

    def _finish(self) -> None:
        self._finished = True
        self._data = b""
        self._answers.answered()

    def _fail(self, reason: str) -> None:
        self._finished = True
        self._answers.failed(RuntimeError(reason))


async def _send_requests(port: int, count: int, answers: _Answers) -> list[asyncio.BaseTransport]:
    """Open ``count`` connections, each sending one request as it opens (256 connects at a
    time, so the gateway's accept backlog never overflows)."""
    loop = asyncio.get_running_loop()
    request = _request(stream=False)
    gate = asyncio.Semaphore(256)

    async def one() -> asyncio.BaseTransport:
        async with gate:
            transport, _ = await loop.create_connection(lambda: _OneRequest(request, answers),
                                                        "127.0.0.1", port)
        return transport

    return await asyncio.gather(*(one() for _ in range(count)))


# -- 1. memory per open stream --------------------------------------------------------------------


async def _streams(count: int, workers: int) -> dict[str, float]:
    backend_port, port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gateway.yaml"
        config.write_text(_config(port, 0, backend_port, static=True))
        backend = _backend(backend_port, gap_ms=600_000)  # one chunk, then a long silence
        gateway = spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config),
                         "--workers", str(workers)], stderr=None)
        try:
            wait_for_port(backend_port)
            wait_for_port(port)
            gate = asyncio.Semaphore(256)
            warm = [await _open_stream(port, gate) for _ in range(20)]  # pools, code paths
            await _close_all(warm)
            await asyncio.sleep(0.5)
            before = tree_rss_bytes(gateway.pid)
            started = time.monotonic()
            writers = await asyncio.gather(*(_open_stream(port, gate) for _ in range(count)))
            opened_in = time.monotonic() - started
            await asyncio.sleep(1.0)
            after = tree_rss_bytes(gateway.pid)
            await _close_all(writers)
        finally:
            stop(gateway)
            stop(backend)
    row = {"streams": count, "workers": workers, "rss_before_mib": before / 2**20,
           "rss_open_mib": after / 2**20, "kib_per_stream": (after - before) / count / 1024,
           "open_seconds": opened_in}
    print(f"  {count:6d} open streams: RSS {row['rss_before_mib']:.0f} -> "
          f"{row['rss_open_mib']:.0f} MiB ({row['kib_per_stream']:.1f} KiB per stream)",
          flush=True)
    return row


async def _close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    await asyncio.sleep(0)


def _config(port: int, metrics_port: int, backend_port: int, static: bool) -> str:
    endpoints = f'endpoints:\n  m: [{{address: "127.0.0.1:{backend_port}"}}]\n' if static else ""
    return (f"server: {{host: 127.0.0.1, port: {port}, metricsPort: {metrics_port}, "
            "logLevel: warning}\n"
            "queue: {maxQueuedPerModel: 50000, timeoutSeconds: 300}\n"
            "models:\n- apiVersion: kvgate.dev/v1\n  kind: Model\n  metadata: {name: m}\n"
            "  spec:\n    url: hf://bench/m\n    engine: VLLM\n    features: [TextGeneration]\n"
            "    loadBalancing: {strategy: PrefixHash}\n" + endpoints)


# -- 2. the waiting room --------------------------------------------------------------------------


async def _waiting_room(count: int, workers: int) -> dict[str, float]:
    backend_port, port = free_port(), free_port()
    metrics_ports = [free_port() for _ in range(workers)]
    backend = _backend(backend_port, gap_ms=0)
    gateway = spawn([sys.executable, "-m", "bench", "scale", "--waiting-gateway", str(port),
                     str(backend_port), *map(str, metrics_ports)], stdout=subprocess.PIPE,
                    stderr=None)
    try:
        wait_for_port(backend_port)
        wait_for_port(port)
        answers = _Answers(count, asyncio.get_running_loop())
        sending = asyncio.ensure_future(_send_requests(port, count, answers))

        def check() -> None:
            answers.check()
            if sending.done():
                sending.result()  # raises if a connect failed

        await _until_waiting(metrics_ports, count, check)
        transports = await sending
        pids = [p for p in tree(gateway.pid) if p != gateway.pid]
        cpu_before = _cpu(gateway, backend)
        steal_before = steal_seconds()
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)  # "a replica appeared": each worker sets endpoints
        try:
            await asyncio.wait_for(answers.done, 120)
        except TimeoutError:
            raise TimeoutError(f"{answers.due} of {count} requests unanswered after 120 s") \
                from None
        cpu = {k: v - cpu_before[k] for k, v in _cpu(gateway, backend).items()}
        steal = steal_seconds() - steal_before
        upstream = _connections_to(backend_port)
        assert gateway.stdout is not None  # each worker's line is in the pipe by now
        appeared = [float(gateway.stdout.readline()) for _ in pids]
        for transport in transports:
            transport.close()
    finally:
        stop(gateway)
        stop(backend)
    drain = answers.last - min(appeared)
    row = {"requests": count, "workers": workers, "drain_seconds": drain,
           "served_per_second": count / drain, "upstream_connections": upstream,
           **{f"cpu_seconds_{name}": value for name, value in cpu.items()},
           "steal_seconds": steal}
    print(f"  {count} waiting requests served {drain:.3f} s after the replica appeared "
          f"(CPU s: {', '.join(f'{k} {v:.2f}' for k, v in cpu.items())}, stolen {steal:.2f}; "
          f"{upstream} upstream connections)", flush=True)
    return row


def _median_round(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median drain, with every run's drain beside it: on a shared VM one
    run can be a third slower or faster than the next (other guests take CPU time, caches)."""
    ranked = sorted(rows, key=lambda row: row["drain_seconds"])
    median = dict(ranked[(len(ranked) - 1) // 2])
    median["drain_seconds_all"] = [row["drain_seconds"] for row in rows]
    if len(rows) > 1:
        print(f"  median of {len(rows)} runs: {median['drain_seconds']:.3f} s", flush=True)
    return median


def _cpu(gateway: subprocess.Popen[bytes], backend: subprocess.Popen[bytes]) -> dict[str, float]:
    """CPU seconds so far of the gateway (all workers), the backend and these clients."""
    clients = os.times()
    return {"gateway": tree_cpu_seconds(gateway.pid), "backend": tree_cpu_seconds(backend.pid),
            "clients": clients.user + clients.system}


def _connections_to(port: int) -> int:
    """TCP connections made to ``port`` on 127.0.0.1 in the last minute or so: open ones and
    closed ones still in TIME_WAIT (on either side), from ``/proc/net/tcp`` (IPv4), counted by
    the connecting side's port. Only the gateway connects to the backend, and only once a
    replica has appeared, so this is how many upstream connections the drain opened: each
    costs the gateway a connect and the backend an accept, on top of the requests."""
    target = f"0100007F:{port:04X}"
    peers = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, remote, state = line.split()[1:4]
            if state == "0A":  # the listener
                continue
            if local == target:
                peers.add(remote)
            elif remote == target:
                peers.add(local)
    return len(peers)


async def _until_waiting(metrics_ports: list[int], count: int,
                         check: Callable[[], None]) -> None:
    """Poll every worker's ``kvgate_waiting_requests`` until all requests are in the room;
    ``check`` raises if a request has failed meanwhile."""
    deadline = time.monotonic() + 120
    while True:
        waiting = 0
        for port in metrics_ports:
            waiting += await _scrape_waiting(port)
        if waiting >= count:
            return
        check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {waiting} of {count} requests reached the waiting room")
        await asyncio.sleep(0.2)


async def _scrape_waiting(port: int) -> int:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0
    writer.write(b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    for line in text.splitlines():
        if line.startswith('kvgate_waiting_requests{model="m"}'):
            return int(float(line.split()[-1]))
    return 0


def _waiting_gateway(port: int, backend_port: int, metrics_ports: list[int]) -> int:
    """The gateway for the waiting-room run: static config without endpoints; SIGUSR1 adds
    the replica in each worker and prints the time (CLOCK_MONOTONIC, shared by processes).
    Worker ``i`` serves its metrics on ``metrics_ports[i]`` so the bench sees every room."""
    from lb.app import Gateway
    from lb.config import static_registry
    from lb.config import load_config
    from lb.registry import Endpoint
    from lb.ring import LoadTable
    from lb.server import bind, install_uvloop, run_workers, serve, tune_gc

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        handle.write(_config(port, 0, backend_port, static=False))
    config = load_config(handle.name)
    os.unlink(handle.name)
    loads = LoadTable()

    def worker(index: int, sock: Any, _: Any) -> None:
        install_uvloop()
        gateway = Gateway(config, static_registry(config, loads))
        gateway.metrics.share_active(loads)
        metrics_sock = bind("127.0.0.1", metrics_ports[index])
        tune_gc()

        async def run() -> None:
            def appear() -> None:
                gateway.registry.set_endpoints("m", [Endpoint("m/0", f"127.0.0.1:{backend_port}")])
                os.write(1, b"%r\n" % time.monotonic())  # one write: workers share the pipe

            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, appear)
            await serve(gateway, sock, metrics_sock)

        asyncio.run(run())

    return run_workers(len(metrics_ports), "127.0.0.1", port, 0, worker)


# -- 3. ring lookups as endpoints grow ------------------------------------------------------------


def _ring_sizes(quick: bool) -> list[dict[str, float]]:
    from functools import partial

    from lb.ring import IMPLEMENTATION, LoadTable, Ring

    keys = rings.prefixes(500 if quick else 1000)
    rounds = 8 if quick else 30
    rows = []
    for n in rings.SIZES:
        loads = LoadTable()
        built = {"local": rings.build(Ring, n),
                 "shared": rings.build(partial(Ring, loads=loads, namespace="m"), n)}
        cases = {name: (ring.pick, keys, 5) for name, (ring, _) in built.items()}
        picks = rings.per_call_ns(cases, rounds)
        keys_n = rings.endpoint_keys(n)
        endpoints = [keys_n[i % n] for i in range(64)]  # same batch size at every ring size
        churn = {name: (_acquire_release, [(ring, endpoints)], 200)
                 for name, (ring, _) in built.items()}
        leases = rings.per_call_ns(churn, rounds)
        rows.append({"endpoints": n, "implementation": IMPLEMENTATION,
                     "pick_ns": picks["local"], "pick_shared_ns": picks["shared"],
                     "acquire_release_ns": leases["local"] / len(endpoints),
                     "acquire_release_shared_ns": leases["shared"] / len(endpoints)})
        print(f"  ring of {n:4d} endpoints: pick {picks['local']:.0f} ns", flush=True)
    return rows


def _acquire_release(case: tuple[Any, list[str]]) -> None:
    ring, endpoints = case
    for key in endpoints:
        ring.release(ring.acquire(key))


# -- report ---------------------------------------------------------------------------------------


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    big = [r for r in result["streams"] if r["streams"] >= 10_000]
    if big:
        out.append(check("RSS with 10k open streams (GiB)", big[0]["rss_open_mib"] / 1024,
                         _TARGETS["rss_10k_gib"]))
    room = result["waiting_room"]
    if room["requests"] >= 10_000:
        out.append(check("10k waiting requests served after a replica appears (s)",
                         room["drain_seconds"], _TARGETS["drain_10k_s"]))
    return out


def _markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    w = result["waiting_room"]
    which = " (the median run)" if len(w.get("drain_seconds_all", [])) > 1 else ""
    lines = [f"Scale: {s['cores']} cores (load average {s['load_average_1m']:.1f} at "
             f"the start), gateway with {s['workers']} workers, {s['nofile']} open files per "
             "process.", "",
             table(("open streams", "gateway RSS before MiB", "RSS with streams open MiB",
                    "KiB per stream", "time to open all s"),
                   ((f"{r['streams']:,}", f"{r['rss_before_mib']:.0f}", f"{r['rss_open_mib']:.0f}",
                     f"{r['kib_per_stream']:.1f}", f"{r['open_seconds']:.2f}")
                    for r in result["streams"]), "r"), "",
             table(("requests in the waiting room", "served after the replica appeared, s",
                    "requests/s while draining", "upstream connections opened"),
                   [(f"{w['requests']:,}", _drains(w), f"{w['served_per_second']:,.0f}",
                     f"{w['upstream_connections']:,}")], "r"),
             "", f"CPU seconds while draining{which}: gateway {w['cpu_seconds_gateway']:.2f}, "
             f"backend {w['cpu_seconds_backend']:.2f}, clients {w['cpu_seconds_clients']:.2f} "
             f"({s['cores']} cores: at most {s['cores'] * w['drain_seconds']:.2f} in all, of "
             f"which the hypervisor gave {w['steal_seconds']:.2f} to other guests). Each "
             "request on its own keep-alive client connection.",
             "", "Ring lookups (256 vnodes per endpoint, every endpoint busy), median ns per "
             "call:", "",
             table(("endpoints", "pick", "pick, shared table", "acquire+release",
                    "acquire+release, shared table"),
                   ((r["endpoints"], f"{r['pick_ns']:.0f}", f"{r['pick_shared_ns']:.0f}",
                     f"{r['acquire_release_ns']:.0f}", f"{r['acquire_release_shared_ns']:.0f}")
                    for r in result["ring"]), "r")]
    if result["targets"]:
        lines += ["", targets_table(result["targets"], digits=3)]
    return "\n".join(lines) + "\n"


def _drains(room: dict[str, Any]) -> str:
    """The reported drain, and every run's when there were several."""
    runs = room.get("drain_seconds_all", [])
    if len(runs) < 2:
        return f"{room['drain_seconds']:.3f}"
    return (f"{room['drain_seconds']:.3f} (median of {len(runs)}: "
            f"{', '.join(f'{d:.2f}' for d in runs)})")


if __name__ == "__main__":
    sys.exit(main())
