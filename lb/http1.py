"""A lean HTTP/1.1 client for the gateway's upstream hop.

The generic clients spend most of the gateway's CPU on the one hop that matters least: a
request to a model server we trust, over a keep-alive connection we already hold. This client
does only what that hop needs, on asyncio Protocols and httptools' C parser:

* one ``transport.write`` per request (request line, ``host``, ``content-length``, headers and
  body in one buffer), so a request costs one syscall and no Nagle/delayed-ACK stall;
* one parser per connection, reused across keep-alive requests; parser callbacks only append
  to lists;
* no timer per read: each connection keeps at most one ``TimerHandle`` that, when it fires,
  compares a last-activity timestamp with the deadline and re-arms itself, so a steady stream
  of requests or chunks creates no timers at all;
* flow control: body bytes are buffered in the protocol and reading from the socket is paused
  above ``HIGH_WATER`` unread bytes, so a slow client never makes the gateway hold a whole
  response;
* a per-address LIFO pool of idle connections. A reused connection that dies before the first
  response byte (the server closed it as we wrote: the request never reached the app) is
  retried once on a fresh connection; the same failure on a fresh connection is
  ``ConnectFailed``;
* at most ``max_connecting`` connects in progress per address. When thousands of requests
  start at once (a waiting room releasing as a replica appears), the others wait for either a
  connection coming back from a finished response (handed over directly) or a connect slot,
  instead of opening thousands of connections at once and overflowing the server's accept
  backlog (dropped SYNs are retried after a second).

Cancelling a task that awaits ``request()`` or ``read()`` closes the connection, which is how a
client disconnect stops generation on the model server.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any

import httptools
from httptools import HttpParserError, HttpParserUpgrade

__all__ = ["UpstreamError", "ConnectFailed", "ResponseTimeout", "BodyError", "UpstreamPool",
           "UpstreamResponse", "HIGH_WATER"]

# Unread body bytes above which the socket stops being read (the kernel buffers, then TCP
# pushes back on the server). One read can add up to a socket read's worth on top.
HIGH_WATER = 256 * 1024
# A response head larger than this is a broken (or hostile) server, not a model server.
_MAX_HEAD = 1024 * 1024
# Timers fire with millisecond granularity (libuv); closer than this to the deadline counts as
# at the deadline, so a timer never re-arms itself for a few microseconds.
_TIMER_SLACK = 0.002


class UpstreamError(Exception):
    """Base of everything this client raises about an upstream."""


class ConnectFailed(UpstreamError):
    """No response byte was received: the request can safely go to another replica."""


class ResponseTimeout(UpstreamError):
    """No response head within ``read_timeout``; not retried, the server may be working."""


class BodyError(UpstreamError):
    """The response broke after its first byte (lost, timed out or malformed mid-response)."""


class _Stale(Exception):
    """A connection closed before any response byte; the pool decides whether to retry."""


class _Unsolicited(Exception):
    """Response bytes after the response we asked for: the connection is out of step."""


def _split_address(address: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` -> (host, port)."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or ":" in host and not address.startswith("["):
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


class _Host:
    """Per-address constants and the idle connections, hottest last."""

    __slots__ = ("address", "host", "port", "head", "idle", "connecting", "waiters")

    def __init__(self, address: str) -> None:
        self.address = address
        self.host, self.port = _split_address(address)
        # Everything between the path and the content-length value, built once per address.
        self.head = b" HTTP/1.1\r\nhost: " + address.encode("ascii") + b"\r\ncontent-length: "
        self.idle: deque[_Conn] = deque()
        self.connecting = 0  # connects in progress
        # requests waiting for a connection: each gets a released one, or None (go connect)
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()


def _encode(head: bytes, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
            body: bytes) -> bytes:
    """The whole request as one buffer, so it leaves in one write (and usually one segment)."""
    parts = [method, b" ", path, head, b"%d" % len(body)]
    for name, value in headers:
        parts += (b"\r\n", name, b": ", value)
    parts.append(b"\r\n\r\n")
    parts.append(body)
    return b"".join(parts)


class _Conn(asyncio.Protocol):
    """One upstream connection: its parser, the response in flight and its body buffer."""

    __slots__ = ("_pool", "_host", "_loop", "_transport", "_parser", "_closed", "_busy",
                 "_complete", "_headers_done", "_interim", "_keep_alive", "_got_bytes",
                 "_head_bytes", "_http11", "_status", "_headers", "_body", "_buffered",
                 "_paused", "_exc", "_waiter", "_timer", "_last", "_idle_since")

    def __init__(self, pool: UpstreamPool, host: _Host, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._host = host
        self._loop = loop
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self._parser: Any = httptools.HttpResponseParser(self)
        self._closed = False
        self._busy = False  # a request is in flight and its response not released
        self._complete = False  # the final response has been parsed to its end
        self._headers_done = False
        self._interim = False  # parsing a 1xx response, which is skipped
        self._keep_alive = False
        self._got_bytes = False
        self._head_bytes = 0
        self._http11 = False  # the server has answered HTTP/1.1 on this connection
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0
        self._idle_since = 0.0

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self._pool._uvloop:
            return  # uvloop sets TCP_NODELAY itself; get_extra_info would cost two syscalls
        sock = transport.get_extra_info("socket")
        if sock is not None:  # uvloop sets it already; asyncio's default loop may not
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        if not self._busy or self._complete:
            self._close()  # bytes nobody asked for: whatever they are, the stream is out of step
            return
        self._got_bytes = True
        self._last = self._loop.time()
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD:
                self._broken("response head too large")
                return
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            self._broken(f"unparsable response: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        ours = self._closed  # we closed it: an EOF then says nothing about the body's end
        self._closed = True
        self._keep_alive = False
        self._parser = None  # breaks the protocol <-> parser cycle so it is freed at once
        self._cancel_timer()
        self._pool._lost(self)
        if not self._busy or self._complete or self._exc is not None:
            return
        if ours:
            self._exc = BodyError(f"the connection to {self._host.address} was closed")
        elif self._headers_done and exc is None and self._eof_delimited():
            self._complete = True  # a body without length ends where the connection does
        elif self._got_bytes:
            self._exc = BodyError(f"{self._host.address} closed the connection mid-response"
                                  + (f" ({exc!r})" if exc else ""))
        # else: closed before any response byte; _exchange reports it as stale
        self._wake()

    # -- parser callbacks (called from feed_data) ------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise _Unsolicited()  # stops the parser; data_received keeps the finished response
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        self._status = status
        self._headers_done = True
        keep_alive = parser.should_keep_alive()
        if keep_alive and not self._http11:
            # HTTP/1.0 "keep-alive" is not trusted. The version string costs ~1 µs to build, so
            # it is read on a connection's first response only: a server doesn't change it.
            keep_alive = self._http11 = parser.get_http_version() == "1.1"
        self._keep_alive = keep_alive
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not body:
            return  # an empty read means end of body to the caller; never hand one out early
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._wake()

    # -- internals --------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Wait for the next parser event; a cancelled wait closes the connection."""
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self._close()
            raise
        finally:
            self._waiter = None

    def _begin(self) -> None:
        """Reset the per-response state and make sure a timer watches the exchange."""
        self._busy = True
        self._complete = self._headers_done = self._interim = self._got_bytes = False
        self._head_bytes = 0
        self._exc = None
        loop = self._loop
        self._last = now = loop.time()
        if self._timer is None:  # else the pending timer re-arms itself from self._last
            self._timer = loop.call_at(now + self._pool._read_timeout, self._on_timer)

    async def _exchange(self, data: bytes) -> UpstreamResponse:
        """Send one request and wait for its response head."""
        self._begin()
        self._transport.write(data)
        await self._wait()
        if self._headers_done:
            return UpstreamResponse(self)
        self._busy = False
        self._close()
        if self._exc is not None:
            raise self._exc
        raise _Stale()

    def _on_timer(self) -> None:
        """Fail the exchange when the server has been silent for read_timeout."""
        self._timer = None
        if self._closed or not self._busy or self._complete:
            return
        loop = self._loop
        now = loop.time()
        timeout = self._pool._read_timeout
        if self._paused or self._body:
            deadline = now + timeout  # our reader is behind, not the server
        else:
            deadline = self._last + timeout
        if deadline - now > _TIMER_SLACK:
            self._timer = loop.call_at(deadline, self._on_timer)
            return
        if self._headers_done:
            self._exc = BodyError(f"{self._host.address} sent nothing for {timeout:g}s "
                                  "mid-response")
        else:
            self._exc = ResponseTimeout(f"{self._host.address} sent no response head within "
                                        f"{timeout:g}s")
        self._close()
        self._wake()

    def _broken(self, reason: str) -> None:
        if self._complete:  # trailing garbage after a whole response: keep it, drop the conn
            self._close()
            return
        self._exc = BodyError(f"{self._host.address}: {reason}")
        self._close()
        self._wake()

    def _eof_delimited(self) -> bool:
        """Whether the body has no length and so ends at EOF (rare: scanned only then)."""
        for name, value in self._headers:
            if name == b"content-length":
                return False
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                return False
        return True

    def _resume(self) -> None:
        self._paused = False
        if not self._closed:
            self._transport.resume_reading()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        """Close for good (the server sees EOF); connection_lost does the bookkeeping."""
        self._keep_alive = False
        if not self._closed:
            self._closed = True
            self._cancel_timer()
            self._transport.close()

    def _abort(self) -> None:
        """Drop the connection now, unsent bytes and all (used when the pool closes)."""
        if self._busy and not self._complete and self._exc is None:
            self._exc = BodyError("the upstream pool was closed")
            self._wake()
        self._keep_alive = False
        self._closed = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()

    def _done(self) -> None:
        """The response was released: pool the connection if it can carry another request."""
        self._busy = False
        body = self._body
        if body:
            body.clear()
        self._buffered = 0
        if self._paused:
            self._resume()
        if self._complete and self._keep_alive and not self._closed:
            self._pool._put(self)
            return
        if not self._complete and self._exc is None:
            self._exc = BodyError("the response was released before its end")
        self._close()
        self._wake()  # a read() waiting in another task must not hang


class UpstreamResponse:
    """A response whose head has arrived; the body is read with ``read()``.

    ``headers`` keeps the server's order, names lowercased, hop-by-hop headers included (the
    caller filters). The connection goes back to the pool as soon as the body has been read to
    its end; ``release()`` is still safe (and needed) on every other path.
    """

    __slots__ = ("status", "headers", "_conn", "_ctype", "_error")

    def __init__(self, conn: _Conn) -> None:
        self.status = conn._status
        self.headers = conn._headers
        self._conn: _Conn | None = conn
        self._ctype: bytes | None = None
        self._error: UpstreamError | None = None

    @property
    def content_type(self) -> bytes:
        """Media type without parameters, lowercased; computed on first use only."""
        ctype = self._ctype
        if ctype is None:
            ctype = b""
            for name, value in self.headers:
                if name == b"content-type":
                    ctype = value.split(b";", 1)[0].strip().lower()
                    break
            self._ctype = ctype
        return ctype

    @property
    def at_end(self) -> bool:
        """True once ``read()`` has returned the last of the body: nothing more will come."""
        return self._conn is None and self._error is None

    async def read(self) -> bytes:
        """Everything received since the last call (de-chunked); b"" at the end of the body."""
        conn = self._conn
        if conn is None:
            if self._error is not None:
                raise self._error
            return b""
        body = conn._body
        while not body and not conn._complete and conn._exc is None:
            await conn._wait()
        if body:
            data = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            conn._buffered = 0
            if conn._paused:
                conn._resume()
            if conn._complete:
                self.release()  # nothing more will come: free the connection early
            return data
        if conn._complete:
            self.release()
            return b""
        exc = conn._exc or BodyError("the response ended early")
        self._error = exc  # later reads fail the same way
        self.release()
        raise exc

    async def read_all(self) -> bytes:
        """The whole body; for small, non-streamed responses."""
        conn = self._conn
        if conn is not None and conn._complete:  # the usual case: it came with the head
            body = conn._body
            data = body[0] if len(body) == 1 else b"".join(body)  # b"" when there is none
            self.release()
            return data
        chunks = []
        while True:
            chunk = await self.read()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def release(self) -> None:
        """Return the connection if the body was received in full, else close it. Idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            if not conn._complete and self._error is None:
                self._error = BodyError("the response was released before its end")
            conn._done()


class UpstreamPool:
    """Keep-alive connections per upstream address, and the request entry point."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float = 600.0,
                 keepalive_timeout: float = 75.0, max_idle_per_host: int = 256,
                 max_connecting: int = 32) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._keepalive_timeout = keepalive_timeout
        self._max_idle = max_idle_per_host
        self._max_connecting = max(1, max_connecting)
        self._uvloop = False
        self._hosts: dict[str, _Host] = {}
        self._conns: set[_Conn] = set()  # every open connection, idle or in use, for close()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def request(self, address: str, method: bytes, path: bytes,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        """Send a request; return once the status line and headers are parsed."""
        host = self._hosts.get(address)
        if host is None:
            host = self._new_host(address)
        data = _encode(host.head, method, path, headers, body)
        conn = self._pop_idle(host)
        if conn is None and host.connecting >= self._max_connecting:
            conn = await self._handed_over(host)
        if conn is not None:
            try:
                return await conn._exchange(data)
            except _Stale:
                pass  # the keep-alive race: it never reached the app, so one fresh try
        conn = await self._connect(host)
        try:
            return await conn._exchange(data)
        except _Stale:
            raise ConnectFailed(f"{address} closed the connection before answering") from None

    async def close(self) -> None:
        """Close every connection, idle or in use; later requests fail."""
        self._closed = True
        for host in self._hosts.values():
            host.idle.clear()
            while host.waiters:  # their connect attempt fails at once: the pool is closed
                self._next_connect(host)
        for conn in list(self._conns):
            conn._abort()
        self._conns.clear()
        await asyncio.sleep(0)  # let the transports deliver connection_lost

    # -- internals --------------------------------------------------------------------------

    def _new_host(self, address: str) -> _Host:
        try:
            host = _Host(address)
        except (ValueError, UnicodeError) as exc:
            raise ConnectFailed(str(exc)) from None
        self._hosts[address] = host
        return host

    def _pop_idle(self, host: _Host) -> _Conn | None:
        """The most recently used live idle connection; expired ones are closed on the way."""
        idle = host.idle
        if not idle:
            return None
        loop = self._loop
        assert loop is not None  # set when the first connection was made
        now = loop.time()
        horizon = now - self._keepalive_timeout
        while idle:
            conn = idle.pop()
            if conn._closed or conn._transport.is_closing():
                continue
            if conn._idle_since < horizon:
                conn._close()
                while idle:  # the rest have been idle even longer
                    idle.pop()._close()
                return None
            if idle and idle[0]._idle_since < horizon:
                idle.popleft()._close()  # LIFO leaves the cold end cold: trim it as we go
            return conn
        return None

    async def _handed_over(self, host: _Host) -> _Conn | None:
        """Wait for a connection another request releases, or for a connect slot (None)."""
        assert self._loop is not None  # connects are in progress, so one was made
        waiter: asyncio.Future[_Conn | None] = self._loop.create_future()
        host.waiters.append(waiter)
        try:
            conn = await waiter
        except asyncio.CancelledError:
            if not waiter.cancelled():  # handed something as we were cancelled: pass it on
                handed = waiter.result()
                if handed is not None:
                    self._put(handed)
                else:
                    self._next_connect(host)
            else:
                try:
                    host.waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        if conn is not None and (conn._closed or conn._transport.is_closing()):
            return None  # it died on the way: connect (the slot count is only a soft cap)
        return conn

    def _next_connect(self, host: _Host) -> None:
        """A connect slot is free: give it to the longest waiting request, if any."""
        waiters = host.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _put(self, conn: _Conn) -> None:
        waiters = conn._host.waiters
        while waiters:  # a request is waiting for a connection: hand this one over directly
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        idle = conn._host.idle
        conn._idle_since = conn._loop.time()
        idle.append(conn)
        if len(idle) > self._max_idle:
            idle.popleft()._close()

    def _lost(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if not conn._busy:
            try:
                conn._host.idle.remove(conn)
            except ValueError:
                pass

    async def _connect(self, host: _Host) -> _Conn:
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._uvloop = type(loop).__module__.startswith("uvloop")
        conn = _Conn(self, host, loop)
        host.connecting += 1
        try:
            async with asyncio.timeout(self._connect_timeout):  # no extra task per connect
                await loop.create_connection(lambda: conn, host.host, host.port)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {host.address}: {exc!r}") from None
        finally:
            host.connecting -= 1
            if host.waiters:
                self._next_connect(host)
        if self._closed:
            conn._abort()
            raise UpstreamError("the upstream pool is closed")
        self._conns.add(conn)
        return conn
