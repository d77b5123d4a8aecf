"""CPU per request of the upstream hop: kvgate's lean HTTP/1.1 client vs aiohttp's ClientSession.

The backend (``bench.fast_backend``) runs in a subprocess pinned to another CPU, so the process
CPU time measured here (``time.process_time()``: user + system, this process only) is the
client's. Each case runs on a fresh uvloop loop after a warm-up. A third column, "floor", is a
bare asyncio Protocol that writes a prebuilt request and waits for the whole response without
parsing it: what the event loop and the kernel cost anyway, so the clients' own share is the
difference.

    python -m bench upstream [--requests 20000] [--streams 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import aiohttp
import uvloop

from bench.procs import free_port, spawn, stop, wait_for_port
from bench.results import table
from lb.http1 import UpstreamPool

_PATH = "/v1/chat/completions"
_JSON_BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
_STREAM_BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
_HEADERS = [(b"content-type", b"application/json"), (b"accept", b"*/*")]
_CONCURRENCY = 64


class _Client:
    """A client under test: set up on the running loop, fetch, tear down."""

    name = ""

    async def start(self, address: str) -> None:
        raise NotImplementedError

    async def fetch(self, stream: bool) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _Lean(_Client):
    name = "kvgate http1"

    async def start(self, address: str) -> None:
        self.address = address
        self.pool = UpstreamPool()

    async def fetch(self, stream: bool) -> int:
        response = await self.pool.request(self.address, b"POST", _PATH.encode(), _HEADERS,
                                           _STREAM_BODY if stream else _JSON_BODY)
        try:
            if not stream:
                return len(await response.read_all())
            size = 0
            while chunk := await response.read():
                size += len(chunk)
            return size
        finally:
            response.release()

    async def close(self) -> None:
        await self.pool.close()


class _Aiohttp(_Client):
    """Configured as lb/upstream.py configures the gateway's session."""

    name = "aiohttp"

    async def start(self, address: str) -> None:
        self.url = f"http://{address}{_PATH}"
        self.headers = {name.decode(): value.decode() for name, value in _HEADERS}
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=75),
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=600),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))

    async def fetch(self, stream: bool) -> int:
        response = await self.session.post(self.url, data=_STREAM_BODY if stream else _JSON_BODY,
                                           headers=self.headers)
        try:
            if not stream:
                return len(await response.read())
            size = 0
            while chunk := await response.content.readany():
                size += len(chunk)
            return size
        finally:
            response.release()

    async def close(self) -> None:
        await self.session.close()


class _FloorProtocol(asyncio.Protocol):
    """Wakes its reader on every read, as a streaming relay must, but parses no HTTP at all."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.ending = b""
        self.tail = b""
        self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.tail = (self.tail + data)[-64:]
        self.done = self.tail.endswith(self.ending)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _Floor(_Client):
    """The response's known ending (JSON's or the last chunk's) marks its end."""

    name = "floor (no HTTP)"

    async def start(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.idle: list[_FloorProtocol] = []
        self.requests = {
            stream: b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n"
                    b"content-type: application/json\r\naccept: */*\r\n\r\n%s"
                    % (_PATH.encode(), address.encode(), len(body), body)
            for stream, body in ((False, _JSON_BODY), (True, _STREAM_BODY))}

    async def fetch(self, stream: bool) -> int:
        loop = asyncio.get_running_loop()
        if self.idle:
            protocol = self.idle.pop()
        else:
            _, protocol = await loop.create_connection(_FloorProtocol, self.host, self.port)
        protocol.ending = b"0\r\n\r\n" if stream else b"}}"
        protocol.tail = b""
        protocol.done = False
        assert protocol.transport is not None
        protocol.transport.write(self.requests[stream])
        while not protocol.done:
            protocol.waiter = loop.create_future()
            await protocol.waiter
        self.idle.append(protocol)
        return 0

    async def close(self) -> None:
        for protocol in self.idle:
            if protocol.transport is not None:
                protocol.transport.close()


async def _measure(client: _Client, address: str, stream: bool, total: int,
                   concurrency: int) -> float:
    """µs of this process's CPU per request, after a warm-up."""
    await client.start(address)
    try:
        await _run(client, stream, min(total // 10, 500) or 1, concurrency)
        began = time.process_time()
        await _run(client, stream, total, concurrency)
        return (time.process_time() - began) / total * 1e6
    finally:
        await client.close()


async def _run(client: _Client, stream: bool, total: int, concurrency: int) -> None:
    per_worker, extra = divmod(total, concurrency)

    async def worker(count: int) -> None:
        for _ in range(count):
            await client.fetch(stream)

    await asyncio.gather(*(worker(per_worker + (i < extra)) for i in range(concurrency)))


def _case(address: str, stream: bool, total: int, concurrency: int,
          repeat: int) -> list[float]:
    """Median µs/request per client; the clients take turns so load from elsewhere on the
    machine falls on all of them alike."""
    factories = (_Aiohttp, _Lean, _Floor)
    runs: list[list[float]] = [[] for _ in factories]
    for _ in range(repeat):
        for factory, results in zip(factories, runs):
            results.append(uvloop.run(_measure(factory(), address, stream, total, concurrency)))
    return [statistics.median(results) for results in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench upstream",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="JSON requests per run")
    parser.add_argument("--streams", type=int, default=2000, help="20-chunk streams per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per cell (median shown)")
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    port = free_port()
    backend_cpu = cpus[-1] if len(cpus) > 1 else None
    backend = spawn([sys.executable, "-m", "bench.fast_backend", "--port", str(port),
                     "--chunks", "20", "--chunk-gap-ms", "1"], cpu=backend_cpu)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[0]})
    try:
        wait_for_port(port)
        address = f"127.0.0.1:{port}"
        cases = [("JSON, sequential", False, args.requests, 1),
                 (f"JSON, {_CONCURRENCY} concurrent", False, args.requests, _CONCURRENCY),
                 (f"20-chunk SSE stream, {_CONCURRENCY} concurrent", True, args.streams,
                  _CONCURRENCY)]
        print(f"client on CPU {cpus[0]}, backend on CPU {backend_cpu}; uvloop; "
              f"median of {args.repeat} runs; µs of client CPU per request\n")
        rows = []
        for label, stream, total, concurrency in cases:
            cells = _case(address, stream, total, concurrency, args.repeat)
            rows.append((label, *(f"{c:.1f}" for c in cells), f"{cells[0] / cells[1]:.1f}x"))
            print(f"  measured: {label}", file=sys.stderr, flush=True)
        print(table(("case", "aiohttp", "kvgate http1", "floor (no HTTP)", "aiohttp / http1"),
                    rows))
    finally:
        stop(backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
