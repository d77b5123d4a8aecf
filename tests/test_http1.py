"""lb.http1 against real servers on 127.0.0.1 (ephemeral ports).

Most servers are raw asyncio stream servers, so a test can send exactly the bytes (and the
misbehaviour) it needs; the JSON, SSE and concurrency tests use aiohttp's server. Every
scenario also checks that nothing reached the loop's exception handler (an exception escaping
a protocol callback, a future whose exception nobody retrieved). The scenarios that exercise
transports most run again under uvloop, which the gateway uses in production.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hashlib
import json
import random
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import uvloop
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.http1 import (HIGH_WATER, BodyError, ConnectFailed, ResponseTimeout, UpstreamError,
                      UpstreamPool, UpstreamResponse, _Conn, _Host, _split_address)

# The most one socket read delivers: 256 KiB on asyncio's selector loop, 256,000 on uvloop.
READ_SIZE = 256 * 1024
JSON = [(b"content-type", b"application/json")]

Scenario = Callable[[], Awaitable[None]]


# -- harness -------------------------------------------------------------------------------

def checked(scenario: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Fail the scenario if anything reached the loop's exception handler."""

    @functools.wraps(scenario)
    async def run(*args: Any, **kwargs: Any) -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        try:
            await scenario(*args, **kwargs)
            await asyncio.sleep(0.01)
            gc.collect()  # "exception was never retrieved" is reported when a future dies
            await asyncio.sleep(0)
        finally:
            loop.set_exception_handler(None)
        assert not errors, errors

    return run


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body, or None when the client has gone."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    try:
        body = await reader.readexactly(length) if length else b""
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return head, body


Handler = Callable[["RawServer", int, asyncio.StreamReader, asyncio.StreamWriter],
                   Awaitable[None]]


class RawServer:
    """A stream server whose per-connection handler writes whatever bytes a test needs."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.connections = 0
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection, head, body)
        self.gone: dict[int, asyncio.Event] = {}  # set when the server saw the client leave
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Closing the sockets ends the handlers; cancelling their tasks instead makes asyncio's
        # stream server log a spurious error (Python 3.11).
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        for task in self._tasks:
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.gone[index] = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            await self.handler(self, index, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.gone[index].set()
        finally:
            self._tasks.discard(task)
            writer.close()

    async def recv(self, index: int, reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
        request = await read_request(reader)
        if request is None:
            self.gone[index].set()
        else:
            self.requests.append((index, *request))
        return request

    async def until_gone(self, index: int, reader: asyncio.StreamReader) -> None:
        """Read (and drop) until the client closes: how a server notices a disconnect."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.gone[index].set()

    async def wait_gone(self, index: int, timeout: float = 2.0) -> None:
        await asyncio.wait_for(self.gone[index].wait(), timeout)


def answering(respond: Callable[[int, int, bytes], bytes]) -> Handler:
    """A keep-alive server: respond(connection, request number on it, body) -> response bytes."""

    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        number = 0
        while (request := await server.recv(index, reader)) is not None:
            writer.write(respond(index, number, request[1]))
            await writer.drain()
            number += 1

    return handler


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@asynccontextmanager
async def aiohttp_server(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def pool_of(**kwargs: float) -> AsyncIterator[UpstreamPool]:
    pool = UpstreamPool(**kwargs)  # type: ignore[arg-type]
    try:
        yield pool
    finally:
        await pool.close()


async def get(pool: UpstreamPool, address: str, body: bytes = b"") -> bytes:
    response = await pool.request(address, b"POST", b"/", JSON, body)
    try:
        return await response.read_all()
    finally:
        response.release()


async def read_to_end(response: UpstreamResponse) -> bytes:
    chunks = []
    while chunk := await asyncio.wait_for(response.read(), 5):
        chunks.append(chunk)
    return b"".join(chunks)


def idle(pool: UpstreamPool, address: str) -> list[_Conn]:
    return list(pool._hosts[address].idle)


# -- responses -----------------------------------------------------------------------------

@checked
async def scenario_json() -> None:
    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"id": body["id"], "host": request.host,
                                  "test": request.headers.get("X-Test")},
                                 headers={"X-Mixed-Case": "v"})

    app = web.Application()
    app.router.add_post("/v1/echo", handle)
    async with aiohttp_server(app) as address, pool_of() as pool:
        response = await pool.request(address, b"POST", b"/v1/echo",
                                      [*JSON, (b"x-test", b"yes")], b'{"id": 7}')
        assert response.status == 200
        assert response.content_type == b"application/json"  # "; charset=utf-8" dropped
        assert (b"x-mixed-case", b"v") in response.headers
        assert all(name == name.lower() for name, _ in response.headers)
        assert json.loads(await response.read_all()) == {"id": 7, "host": address,
                                                         "test": "yes"}
        response.release()
        response.release()  # idempotent
        assert await response.read() == b""


async def test_json_response() -> None:
    await scenario_json()


@checked
async def scenario_sse() -> None:
    go = asyncio.Event()
    finished = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await go.wait()
        for i in range(2, 5):
            await response.write(b"data: %d\n\n" % i)
        await response.write_eof()
        finished.set()
        return response

    app = web.Application()
    app.router.add_post("/v1/stream", handle)
    async with aiohttp_server(app) as address, pool_of() as pool:
        response = await pool.request(address, b"POST", b"/v1/stream", JSON, b"{}")
        assert response.content_type == b"text/event-stream"
        assert (b"transfer-encoding", b"chunked") in response.headers  # hop-by-hop kept
        assert await asyncio.wait_for(response.read(), 2) == b"data: 1\n\n"
        assert not finished.is_set()  # the first event came while the server was still at it
        go.set()
        assert await read_to_end(response) == b"data: 2\n\ndata: 3\n\ndata: 4\n\n"
        assert finished.is_set()


async def test_sse_chunks_arrive_as_sent() -> None:
    await scenario_sse()


@checked
async def scenario_chunked() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        while await server.recv(index, reader) is not None:
            pieces = [b"HTTP/1.1 200 OK\r\ntransfer-", b"encoding: chunked\r\n\r\n",
                      b"5;ext=1\r\nhello\r\n", b"6\r\n wor", b"ld\r\n",
                      b"0\r\nx-trailer: t\r\n\r\n"]
            for piece in pieces:  # each in its own segment: parsing must span reads
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.005)

    async with RawServer(handler) as server, pool_of() as pool:
        for _ in range(2):
            assert await get(pool, server.address) == b"hello world"
        assert server.connections == 1  # reusable after a chunked body with a trailer


async def test_chunked_body_is_dechunked() -> None:
    await scenario_chunked()


async def test_close_delimited_body() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\npart1")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"part2")
        await writer.drain()
        writer.close()

    async with RawServer(handler) as server, pool_of() as pool:
        for _ in range(2):
            assert await get(pool, server.address) == b"part1part2"
        assert server.connections == 2


@pytest.mark.parametrize("head", [
    b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
])
async def test_closing_responses_are_not_reused(head: bytes) -> None:
    async with RawServer(answering(lambda *_: head)) as server, pool_of() as pool:
        for _ in range(2):
            assert await get(pool, server.address) == b"ok"
        assert server.connections == 2
        await server.wait_gone(0)  # the client closed the one it would not reuse


@checked
async def scenario_reuse() -> None:
    responses = [ok(b'{"a":1}'), b"HTTP/1.1 204 No Content\r\n\r\n",
                 b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n", ok(b""),
                 b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"]
    bodies = [b'{"a":1}', b"", b"", b"", b""]
    statuses = [200, 204, 304, 200, 200]

    async with RawServer(answering(lambda _, n, __: responses[n % 5])) as server, \
            pool_of() as pool:
        for n in range(10):
            response = await pool.request(server.address, b"GET", b"/", [], b"")
            assert response.status == statuses[n % 5]
            assert await response.read() == bodies[n % 5]
            assert await response.read() == b""
            response.release()
        assert server.connections == 1
        assert len(server.requests) == 10


async def test_keepalive_reuse_and_empty_bodies() -> None:
    await scenario_reuse()


async def test_request_is_one_write_with_host_and_length() -> None:
    async with RawServer(answering(lambda *_: ok(b"x"))) as server, pool_of() as pool:
        await get(pool, server.address)
        conn = idle(pool, server.address)[-1]
        counting = _CountingTransport(conn._transport)
        conn._transport = counting
        response = await pool.request(server.address, b"POST", b"/v1/x?y=1",
                                      [(b"content-type", b"text/plain"), (b"x-a", b"1")],
                                      b"hello")
        await response.read_all()
        expected = (b"POST /v1/x?y=1 HTTP/1.1\r\nhost: %s\r\ncontent-length: 5\r\n"
                    b"content-type: text/plain\r\nx-a: 1\r\n\r\nhello" % server.address.encode())
        assert counting.writes == [expected]
        assert server.requests[-1][1] + server.requests[-1][2] == expected


class _CountingTransport:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_interim_responses_are_skipped() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(ok(b"first"))
        await server.recv(index, reader)  # both interim responses and the answer in one write
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                     + ok(b"second", b"x-final: 1\r\n"))
        await server.until_gone(index, reader)

    async with RawServer(handler) as server, pool_of() as pool:
        assert await get(pool, server.address) == b"first"
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        assert response.status == 200
        assert response.headers == [(b"content-length", b"6"), (b"x-final", b"1")]
        assert await response.read_all() == b"second"
        assert server.connections == 1


async def test_extra_bytes_after_a_response_drop_the_connection() -> None:
    def respond(index: int, number: int, body: bytes) -> bytes:
        if index == 0:  # a second, unasked-for response right behind the first
            return ok(b"r1") + ok(b"bogus")
        return ok(b"fresh")

    async with RawServer(answering(respond)) as server, pool_of() as pool:
        assert await get(pool, server.address) == b"r1"
        assert await get(pool, server.address) == b"fresh"
        assert server.connections == 2


async def test_bytes_arriving_on_an_idle_connection_drop_it() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        writer.write(ok(b"one"))
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(ok(b"late"))
        await server.until_gone(index, reader)

    async with RawServer(handler) as server, pool_of() as pool:
        await get(pool, server.address)
        await server.wait_gone(0)
        assert idle(pool, server.address) == []


# -- pool behaviour ------------------------------------------------------------------------

async def test_server_closing_an_idle_connection() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        writer.write(ok(b"c%d" % index))  # says keep-alive, then closes anyway
        await writer.drain()

    async with RawServer(handler) as server, pool_of() as pool:
        assert await get(pool, server.address) == b"c0"
        for _ in range(50):
            if not idle(pool, server.address):
                break
            await asyncio.sleep(0.01)
        assert idle(pool, server.address) == []  # connection_lost took it out of the pool
        assert await get(pool, server.address) == b"c1"


@checked
async def scenario_keepalive_race() -> None:
    def respond(index: int, number: int, body: bytes) -> bytes:
        return ok(b"c%d" % index)

    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if index == 0:  # answer once, then close as the next request lands
            await server.recv(index, reader)
            writer.write(respond(index, 0, b""))
            await writer.drain()
            await server.recv(index, reader)
            return
        await answering(respond)(server, index, reader, writer)

    async with RawServer(handler) as server, pool_of() as pool:
        assert await get(pool, server.address) == b"c0"
        assert await get(pool, server.address) == b"c1"  # retried on a fresh connection
        assert server.connections == 2


async def test_keepalive_race_is_retried_on_a_fresh_connection() -> None:
    await scenario_keepalive_race()


@pytest.mark.parametrize("read_first", [True, False])
async def test_fresh_connection_closed_before_answering(read_first: bool) -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if read_first:
            await server.recv(index, reader)

    async with RawServer(handler) as server, pool_of() as pool:
        with pytest.raises(ConnectFailed):
            await pool.request(server.address, b"POST", b"/", JSON, b"{}")


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with pool_of() as pool:
        with pytest.raises(ConnectFailed):
            await pool.request(f"127.0.0.1:{port}", b"GET", b"/", [], b"")
        with pytest.raises(ConnectFailed):
            await pool.request("no-port-here", b"GET", b"/", [], b"")


async def test_idle_connections_expire() -> None:
    async with RawServer(answering(lambda *_: ok(b"x"))) as server, \
            pool_of(keepalive_timeout=0.1) as pool:
        await get(pool, server.address)
        await asyncio.sleep(0.25)
        await get(pool, server.address)
        assert server.connections == 2
        await server.wait_gone(0)  # the expired one was closed, not leaked


async def test_idle_connections_are_capped_per_host() -> None:
    async def respond_slowly(server: RawServer, index: int, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        while await server.recv(index, reader) is not None:
            await asyncio.sleep(0.05)
            writer.write(ok(b"x"))

    async with RawServer(respond_slowly) as server, pool_of(max_idle_per_host=2) as pool:
        await asyncio.gather(*(get(pool, server.address) for _ in range(5)))
        assert server.connections == 5
        assert len(idle(pool, server.address)) == 2
        for _ in range(100):  # the three released first were closed
            if sum(event.is_set() for event in server.gone.values()) == 3:
                break
            await asyncio.sleep(0.01)
        assert sum(event.is_set() for event in server.gone.values()) == 3


async def test_ipv6_address() -> None:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with RawServer(answering(lambda *_: ok(b"v6")), host="::1") as server, \
            pool_of() as pool:
        assert server.address.startswith("[::1]:")
        assert await get(pool, server.address) == b"v6"
        assert b"\r\nhost: " + server.address.encode() + b"\r\n" in server.requests[0][1]


def test_address_forms() -> None:
    assert _split_address("10.0.0.1:8000") == ("10.0.0.1", 8000)
    assert _split_address("[fd00::1]:80") == ("fd00::1", 80)
    assert _split_address("vllm-0.vllm.default.svc:8000") == ("vllm-0.vllm.default.svc", 8000)
    for bad in ("fd00::1:80", "host", "host:", ":80", "[::1]80"):
        with pytest.raises(ValueError):
            _split_address(bad)


# -- failures ------------------------------------------------------------------------------

@checked
async def scenario_response_timeout() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        await server.until_gone(index, reader)

    async with RawServer(handler) as server, pool_of(read_timeout=0.3) as pool:
        began = time.monotonic()
        with pytest.raises(ResponseTimeout):
            await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        assert 0.25 < time.monotonic() - began < 2
        await server.wait_gone(0)  # the model server is told to stop


async def test_no_headers_within_read_timeout() -> None:
    await scenario_response_timeout()


async def test_silence_mid_body_is_a_body_error() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await server.until_gone(index, reader)

    async with RawServer(handler) as server, pool_of(read_timeout=0.3) as pool:
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        assert await response.read() == b"abc"
        with pytest.raises(BodyError):
            await response.read()
        await server.wait_gone(0)


async def test_timer_is_not_recreated_per_chunk() -> None:
    """One TimerHandle covers a whole exchange, however many reads it takes."""
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(20):
            writer.write(b"3\r\nabc\r\n")
            await writer.drain()
            await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")
        await server.until_gone(index, reader)

    loop = asyncio.get_running_loop()
    scheduled = 0
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any,
                         **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal scheduled
        if getattr(callback, "__func__", None) is _Conn._on_timer:  # not the server's sleeps
            scheduled += 1
        return call_at(when, callback, *args, **kwargs)

    async with RawServer(handler) as server, pool_of() as pool:
        loop.call_at = counting_call_at  # type: ignore[method-assign]
        try:
            response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
            reads = 0
            while await response.read():
                reads += 1
        finally:
            del loop.call_at  # type: ignore[method-assign]
        assert reads >= 10
        assert scheduled == 1


@pytest.mark.parametrize("partial", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 100,
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n",
])
async def test_server_dying_mid_body(partial: bytes) -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        writer.write(partial)
        await writer.drain()

    async with RawServer(handler) as server, pool_of() as pool:
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        received = b""
        with pytest.raises(BodyError):
            while True:
                received += await response.read()
        assert received == b"x" * 100
        with pytest.raises(BodyError):  # stays failed
            await response.read()
        response.release()
        assert idle(pool, server.address) == []


@pytest.mark.parametrize("garbage", [b"HTTP/1.1 2x0 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\n" +
                                     b"content-length: 2\r\ncontent-length: 3\r\n\r\nok"])
async def test_malformed_response(garbage: bytes) -> None:
    async with RawServer(answering(lambda *_: garbage)) as server, pool_of() as pool:
        with pytest.raises(BodyError):
            await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        await server.wait_gone(0)


# -- cancellation and release --------------------------------------------------------------

async def streaming_forever(server: RawServer, index: int, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
    """Head and one event, then nothing until the client leaves."""
    await server.recv(index, reader)
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                 b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
    await writer.drain()
    await server.until_gone(index, reader)


@checked
async def scenario_cancel_reader() -> None:
    async with RawServer(streaming_forever) as server, pool_of() as pool:
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        assert await response.read() == b"data: 1\n\n"
        reader = asyncio.create_task(response.read())
        await asyncio.sleep(0.02)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        await server.wait_gone(0)  # the model server sees the client leave
        response.release()
        assert idle(pool, server.address) == []


async def test_cancelled_reader_closes_the_upstream_connection() -> None:
    await scenario_cancel_reader()


@checked
async def scenario_cancel_request() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        await server.until_gone(index, reader)

    async with RawServer(handler) as server, pool_of() as pool:
        task = asyncio.create_task(pool.request(server.address, b"POST", b"/", JSON, b"{}"))
        while not server.requests:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.wait_gone(0)
        await asyncio.sleep(0.01)
        assert not pool._conns and idle(pool, server.address) == []


async def test_cancelled_request_closes_the_upstream_connection() -> None:
    await scenario_cancel_request()


async def test_release_before_the_end_closes_the_connection() -> None:
    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if index == 0:
            await streaming_forever(server, index, reader, writer)
        else:
            await answering(lambda *_: ok(b"fresh"))(server, index, reader, writer)

    async with RawServer(handler) as server, pool_of() as pool:
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        assert await response.read() == b"data: 1\n\n"
        response.release()
        with pytest.raises(BodyError):
            await response.read()
        await server.wait_gone(0)
        assert await get(pool, server.address) == b"fresh"
        assert server.connections == 2


async def test_release_of_a_received_but_unread_body_keeps_the_connection() -> None:
    async with RawServer(answering(lambda _, n, __: ok(b"answer %d" % n))) as server, \
            pool_of() as pool:
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        await asyncio.sleep(0.02)
        response.release()  # the whole body came with the head: nothing can mix
        assert await get(pool, server.address) == b"answer 1"
        assert server.connections == 1


async def test_release_from_another_task_wakes_a_waiting_reader() -> None:
    async with RawServer(streaming_forever) as server, pool_of() as pool:
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        await response.read()
        reader = asyncio.create_task(response.read())
        await asyncio.sleep(0.01)
        response.release()
        with pytest.raises(BodyError):
            await asyncio.wait_for(reader, 1)


async def test_close_fails_requests_in_flight() -> None:
    async with RawServer(streaming_forever) as server:
        pool = UpstreamPool()
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        await response.read()
        await pool.close()
        with pytest.raises(BodyError):
            await response.read()
        with pytest.raises(UpstreamError):
            await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        await server.wait_gone(0)


# -- flow control and concurrency ----------------------------------------------------------

@checked
async def scenario_flow_control() -> None:
    size = 8 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def handler(server: RawServer, index: int, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await server.recv(index, reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        for start in range(0, size, 65536):
            writer.write(payload[start:start + 65536])
            await writer.drain()  # blocks while the client is not reading: TCP pushes back

    async with RawServer(handler) as server, pool_of() as pool:
        response = await pool.request(server.address, b"POST", b"/", JSON, b"{}")
        conn = response._conn
        assert conn is not None
        digest = hashlib.sha256()
        peak = 0
        paused = False
        while True:
            await asyncio.sleep(0.004)  # a slow client
            peak = max(peak, conn._buffered)
            paused = paused or conn._paused
            chunk = await response.read()
            if not chunk:
                break
            digest.update(chunk)
        assert digest.digest() == hashlib.sha256(payload).digest()
        assert paused
        assert peak <= HIGH_WATER + READ_SIZE


async def test_slow_reader_pauses_the_socket_and_bounds_memory() -> None:
    await scenario_flow_control()


@checked
async def scenario_concurrency(count: int = 200) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        ident = (await request.json())["id"]
        await asyncio.sleep(random.random() * 0.01)  # answer out of order
        if ident % 2:
            response = web.StreamResponse(headers={"X-Id": str(ident)})
            await response.prepare(request)
            for part in range(3):
                await response.write(b"%d:%d;" % (ident, part))
                await asyncio.sleep(0)
            await response.write_eof()
            return response
        return web.json_response({"id": ident}, headers={"X-Id": str(ident)})

    async def one(pool: UpstreamPool, address: str, ident: int) -> None:
        response = await pool.request(address, b"POST", b"/v1/echo",
                                      [*JSON, (b"x-request-id", b"%d" % ident)],
                                      json.dumps({"id": ident}).encode())
        try:
            assert (b"x-id", b"%d" % ident) in response.headers
            body = await response.read_all()
        finally:
            response.release()
        if ident % 2:
            assert body == b"%d:0;%d:1;%d:2;" % (ident, ident, ident)
        else:
            assert json.loads(body) == {"id": ident}

    app = web.Application()
    app.router.add_post("/v1/echo", handle)
    async with aiohttp_server(app) as address, pool_of() as pool:
        for _ in range(2):  # the second round runs on pooled connections
            await asyncio.gather(*(one(pool, address, ident) for ident in range(count)))
        assert 0 < len(idle(pool, address)) <= count


async def test_concurrent_requests_get_their_own_responses() -> None:
    await scenario_concurrency()


# -- connect storms -------------------------------------------------------------------------

@checked
async def scenario_burst_reuses_connections() -> None:
    """300 requests started at once with at most 4 connects in flight: every request gets its
    own answer, over far fewer connections than requests (released ones are handed over)."""
    async with RawServer(answering(lambda conn, n, body: ok(body))) as server, \
            pool_of(max_connecting=4) as pool:
        bodies = [b"request %d" % i for i in range(300)]
        answers = await asyncio.gather(*(get(pool, server.address, body) for body in bodies))
        assert answers == bodies
        assert server.connections < 300
        host = pool._hosts[server.address]
        assert host.connecting == 0 and not host.waiters


async def test_a_burst_reuses_connections() -> None:
    await scenario_burst_reuses_connections()


@checked
async def test_slow_responses_still_get_parallel_connections() -> None:
    """The cap is on connects in progress, not on connections: requests held by a slow server
    (a generation) do not make later requests wait for them."""
    release = asyncio.Event()

    async def slow(server: RawServer, index: int, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        if await server.recv(index, reader) is not None:
            await release.wait()
            writer.write(ok(b"done"))
            await writer.drain()
            await server.until_gone(index, reader)

    async with RawServer(slow) as server, pool_of(max_connecting=2) as pool:
        tasks = [asyncio.ensure_future(get(pool, server.address)) for _ in range(20)]
        deadline = time.monotonic() + 5
        while len(server.requests) < 20:  # all 20 reached the server while none was answered
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.gather(*tasks) == [b"done"] * 20


@checked
async def test_a_cancelled_waiter_passes_its_turn_on() -> None:
    async with RawServer(answering(lambda conn, n, body: ok(body))) as server, \
            pool_of(max_connecting=1) as pool:
        await get(pool, server.address)  # the host is known; its idle connection is taken next
        tasks = [asyncio.ensure_future(get(pool, server.address, b"r%d" % i)) for i in range(6)]
        await asyncio.sleep(0)  # each ran to its first await: one reuses, one connects, 4 wait
        host = pool._hosts[server.address]
        assert host.connecting == 1 and len(host.waiters) == 4
        tasks[2].cancel()
        tasks[5].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r if isinstance(r, bytes) else "cancelled" for r in results] == [
            b"r0", b"r1", "cancelled", b"r3", b"r4", "cancelled"]
        assert host.connecting == 0 and not host.waiters
        assert await get(pool, server.address, b"after") == b"after"


@checked
async def test_a_connection_handed_to_a_cancelled_waiter_goes_back_to_the_pool() -> None:
    async with RawServer(answering(lambda conn, n, body: ok(body))) as server, \
            pool_of(max_connecting=1) as pool:
        await get(pool, server.address)
        host = pool._hosts[server.address]
        conn = host.idle.pop()
        host.connecting = 1  # as if a connect were in progress: the next request must wait
        waiting = asyncio.ensure_future(get(pool, server.address, b"late"))
        await asyncio.sleep(0)
        assert len(host.waiters) == 1
        pool._put(conn)  # a response ends: its connection is handed to the waiter...
        waiting.cancel()  # ...which is cancelled before it could use it
        with pytest.raises(asyncio.CancelledError):
            await waiting
        host.connecting = 0
        assert list(host.idle) == [conn]  # passed on, not leaked
        assert await get(pool, server.address, b"next") == b"next"
        assert server.connections == 1


@checked
async def test_closing_the_pool_releases_waiters() -> None:
    async def silent(server: RawServer, index: int, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await server.until_gone(index, reader)

    async with RawServer(silent) as server:
        pool = UpstreamPool(max_connecting=1)
        first = asyncio.ensure_future(get(pool, server.address))
        await asyncio.sleep(0.05)
        others = [asyncio.ensure_future(get(pool, server.address)) for _ in range(3)]
        await asyncio.sleep(0.01)
        await pool.close()
        for task in (first, *others):
            with pytest.raises(UpstreamError):
                await asyncio.wait_for(task, 2)


# -- the same scenarios on uvloop ----------------------------------------------------------

@pytest.mark.parametrize("scenario", [
    scenario_json, scenario_sse, scenario_chunked, scenario_reuse, scenario_keepalive_race,
    scenario_response_timeout, scenario_cancel_reader, scenario_cancel_request,
    scenario_flow_control, scenario_concurrency, scenario_burst_reuses_connections,
], ids=lambda scenario: scenario.__name__.removeprefix("scenario_"))
def test_under_uvloop(scenario: Scenario) -> None:
    uvloop.run(scenario())


# -- parsing, whatever the segmentation ----------------------------------------------------

class _FakeTransport:
    def __init__(self) -> None:
        self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, int, bytes]:
    """A response's bytes (maybe behind a 100 Continue), its status and decoded body."""
    status = draw(st.sampled_from([200, 201, 400, 404, 500, 503]))
    body = draw(st.binary(max_size=300))
    head = b"HTTP/1.1 100 Continue\r\n\r\n" if draw(st.booleans()) else b""
    head += b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n" % status
    if draw(st.booleans()):
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=5)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
        wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        return head + b"transfer-encoding: chunked\r\n\r\n" + wire, status, body
    return head + b"content-length: %d\r\n\r\n" % len(body) + body, status, body


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=responses(), second=responses(),
       cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_any_segmentation_parses_the_same(first: tuple[bytes, int, bytes],
                                          second: tuple[bytes, int, bytes],
                                          cuts: list[int]) -> None:
    """Two responses on one connection, each split at arbitrary points into reads."""
    loop = asyncio.new_event_loop()
    try:
        pool = UpstreamPool()
        pool._loop = loop
        conn = _Conn(pool, _Host("127.0.0.1:1"), loop)
        conn.connection_made(_FakeTransport())  # type: ignore[arg-type]
        for wire, status, body in (first, second):
            conn._begin()
            for piece in _split(wire, cuts):
                conn.data_received(piece)
            assert conn._exc is None
            assert conn._headers_done and conn._complete and conn._keep_alive
            response = UpstreamResponse(conn)
            assert response.status == status
            assert response.headers[0] == (b"content-type", b"application/json")
            assert b"".join(conn._body) == body
            response.release()
            assert not conn._closed  # pooled for the next one
    finally:
        loop.close()
