"""Running a Gateway under uvicorn (uvloop + httptools), with metrics on a second port.

Both listeners share one event loop. ``serve`` accepts pre-bound sockets so tests and the
benchmark can use ephemeral ports without races.

Three tweaks come from profiling the gateway under load (``bench/results/profile-*.txt``):

* uvicorn writes a response's head and its body with two ``send()`` calls, so the
  client-facing transport holds a head back until the first body write (one syscall instead
  of two, ~10% of a JSON request's CPU);
* the protocol tells the proxy when the client's connection is lost through a callback in the
  scope (``DISCONNECT_HOOK``), so no request needs a timer or a task parked in ``receive()``
  to notice a disconnect (under any other ASGI server the proxy falls back to that);
* the cyclic GC, which scanned the start-up heap over and over, gets the start-up objects
  frozen and a larger young generation (``tune_gc``).

With API keys on, the protocol also offers ``scope[HEAD_LINES]``: header lines the gateway made
itself (the ``x-ratelimit-*`` headers) go into the next response head as they are, instead of
through uvicorn's checks of every header it is given (``_HeadCork.add_lines``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from typing import Any, Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lb.admission import HEAD_LINES
from lb.app import Gateway
from lb.errors import error_body
from lb.proxy import DISCONNECT_HOOK

log = logging.getLogger(__name__)


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _HeadCork:
    """A transport that holds a response head back until the next write, so head and first
    body chunk leave together. A head with no write after it in the same loop iteration (a
    stream waiting for its first chunk, ``100 Continue``) is flushed by a ``call_soon``; bytes
    are never reordered, and ``close`` flushes first."""

    __slots__ = ("_transport", "_loop", "_head", "_lines")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None
        self._lines = b""

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif data.startswith(b"HTTP/"):
            if self._lines and not data.startswith(b"HTTP/1.1 1"):  # not on 100 Continue
                data = _with_lines(data, self._lines)
                self._lines = b""
            self._head = data
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(data)

    def add_lines(self, lines: bytes) -> None:
        """Header lines (``name: value\r\n`` each) for the next response head, written as
        they are: only for bytes the gateway made (see ``lb.admission.HEAD_LINES``)."""
        self._lines += lines

    def _flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)  # get_extra_info, abort, set_protocol, ...


# What uvicorn adds at the end of a head it writes, after the headers it was given, in this
# order: ``_with_lines`` puts handed-over lines before them, where they were given.
_FRAMING_ADDED = (b"transfer-encoding: chunked\r\n", b"connection: close\r\n")


def _with_lines(head: bytes, lines: bytes) -> bytes:
    """``head`` (a status line, header lines and the blank line) with ``lines`` after the
    headers the application gave, as if they had been the last of them. The gateway never
    relays Connection or Transfer-Encoding (hop-by-hop), so such a line at the end of a head
    is uvicorn's own."""
    end = len(head) - 2  # the blank line
    for added in _FRAMING_ADDED:
        if head.endswith(added, 0, end):
            end -= len(added)
    return head[:end] + lines + head[end:]


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through a ``_HeadCork``, and offering each request
    ``scope[DISCONNECT_HOOK](callback)``: ``callback()`` runs if the connection is lost before
    it is replaced (``None`` unregisters). One slot per connection: requests on a connection
    run one at a time."""

    _on_lost: Callable[[], None] | None = None
    _gone = False
    # Bytes received since the current request's head began (body bytes included until a
    # read crosses the limit and the slow path sorts them out), and the size of the last read.
    _head = 0
    _read = 0
    max_head = 64 * 1024  # set per server by ``protocol_for``
    head_lines = False  # offer scope[HEAD_LINES] (API keys on): set by ``protocol_for``
    _complete = False  # the current message has been received in full
    _refused = False  # a head was refused: what else comes is dropped
    _linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = _HeadCork(transport, self.loop)

    def data_received(self, data: bytes) -> None:
        # httptools sets no limit on a head: 4 MB of headers would be buffered and forwarded.
        # Each read is added to a count that on_message_begin resets; only a read that takes
        # the count over the limit looks further (``_head_too_large``).
        n = len(data)
        self._read = n
        head = self._head + n
        self._head = head
        if head > self.max_head and self._head_too_large(data, head - n):
            return
        HttpToolsProtocol.data_received(self, data)  # not super(): one object less per read

    def _head_too_large(self, data: bytes, before: int) -> bool:
        """Whether ``data`` takes the head in progress past the limit (``before``: bytes
        counted since the head began); if so, answer 431 and close. Bytes of a body the count
        took in are dropped from it here. Lenient by the 3 bytes of a CRLFCRLF split across
        reads, and by the tail of a pipelined request read with the next head."""
        if self._refused:
            return True  # draining a refused connection
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # this message's head is complete
            if not self._complete:
                self._head = 0  # body bytes: they do not count
                return False
            before = 0  # between messages: this read starts the next head
        ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
        size = before + (min(ends) + 4 if ends else len(data))
        if size <= self.max_head:
            return False
        if not ends and before <= self.max_head and data[:1] in (b"\r", b"\n"):
            return False  # the end of a terminator split across reads
        self._refuse_head()
        return True

    def _refuse_head(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined head while the answer to the request before is still going out:
            # a 431 would land inside that answer, so the connection is just closed.
            self._refused = True
            self.transport.close()
            return
        body = error_body(431, f"The request's headers are larger than the {self.max_head} "
                          "bytes allowed.", code="request_headers_too_large")
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n"
                             b"connection: close\r\n\r\n" + body)
        cork = self.transport
        cork._flush()
        raw = cork._transport
        # Lingering close: stop sending, keep reading (and dropping) what the client still
        # sends, so that closing with unread data does not reset the connection before the
        # client has read the 431. The client closes, or a timer does.
        self._refused = True
        self._linger = self.loop.call_later(_LINGER_SECONDS, raw.close)
        if raw.can_write_eof():
            raw.write_eof()
        self.flow.resume_reading()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP, in OpenAI's shape like every other
        error (uvicorn's own is text/plain)."""
        body = error_body(400, msg, code="invalid_http")
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n"
                             b"connection: close\r\n\r\n" + body)
        self.transport.close()

    def on_message_begin(self) -> None:
        self._head = self._read  # the read this head starts in (all of it: see above)
        self._complete = False
        super().on_message_begin()
        scope = self.scope
        scope[DISCONNECT_HOOK] = self._watch  # type: ignore[literal-required]
        if self.head_lines:
            scope[HEAD_LINES] = self.transport.add_lines  # type: ignore[literal-required]

    def on_message_complete(self) -> None:
        # The mark the head count needs: ``cycle.more_body`` stays True when the response went
        # out before the body was read.
        self._complete = True
        HttpToolsProtocol.on_message_complete(self)

    def _watch(self, callback: Callable[[], None] | None) -> None:
        if callback is not None and self._gone:
            callback()  # lost before the request got to ask
            return
        self._on_lost = callback

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback()


_LINGER_SECONDS = 2.0


class _UnloggedProtocol(HttpToolsProtocol):
    """The metrics listener's protocol: never in the access log. uvicorn decides per connection
    from the process-wide "uvicorn.access" logger, which the API server configures."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.access_log = False


def protocol_for(config: Any) -> type[_Protocol]:
    """The protocol class of a server under ``config`` (its head-size limit, and whether
    its requests may need to hand over header lines: API keys on)."""
    return type("_Protocol", (_Protocol,), {"max_head": config.limits.max_header_bytes,
                                            "head_lines": config.api_keys.enabled})


def tune_gc() -> None:
    """Call once the process is set up: the objects alive now (modules, config, the app) are
    moved out of the collector's sight, and young collections run less often. Per-request
    garbage is freed by reference counting; the GC only hunts cycles, and was re-scanning the
    start-up heap on every older-generation pass."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _uvicorn(app: object, log_level: str, lifespan: str,
             http: Any = "httptools", access_log: bool = False) -> uvicorn.Server:
    config = uvicorn.Config(app, loop="none", http=http, lifespan=lifespan, interface="asgi3",
                            access_log=access_log, log_level=log_level, server_header=False,
                            date_header=False, proxy_headers=False,
                            timeout_keep_alive=75,
                            timeout_graceful_shutdown=30)
    return uvicorn.Server(config)


async def serve(gateway: Gateway, sock: socket.socket,
                metrics_sock: socket.socket | None = None,
                started: asyncio.Event | None = None) -> None:
    """Serve until cancelled or signalled; in-flight requests get a graceful shutdown."""
    # The metrics server's config is built first: each uvicorn.Config sets up the process-wide
    # access logger, and the API server's `server.accessLog` must be the one that stays.
    metrics = (_uvicorn(gateway.metrics_app, "warning", "off", _UnloggedProtocol)
               if metrics_sock is not None else None)
    main = _uvicorn(gateway, gateway.config.server.log_level, "on",
                    protocol_for(gateway.config), access_log=gateway.config.server.access_log)
    servers = [main] if metrics is None else [main, metrics]
    tasks = [asyncio.create_task(main.serve(sockets=[sock]))]
    if metrics_sock is not None:
        tasks.append(asyncio.create_task(servers[1].serve(sockets=[metrics_sock])))
    notifier = asyncio.create_task(_signal_started(main, started)) if started else None
    try:
        # Shielded: cancelling serve() must stop the servers through uvicorn's graceful
        # shutdown (close listeners, finish requests, lifespan shutdown closes the upstream
        # pool), not abandon them still accepting connections.
        await asyncio.shield(tasks[0])
    finally:
        if notifier is not None:
            notifier.cancel()
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


async def _signal_started(server: uvicorn.Server, started: asyncio.Event) -> None:
    while not server.started:
        await asyncio.sleep(0.01)
    started.set()


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; using the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# -- several worker processes -------------------------------------------------------------------

Worker = Callable[[int, socket.socket, "socket.socket | None"], None]


def run_workers(count: int, host: str, port: int, metrics_port: int, worker: Worker) -> int:
    """Serve with ``count`` forked processes, each with its own event loop.

    Each worker gets its own listening socket on the same port (``SO_REUSEPORT``): the kernel
    spreads connections over the workers by hash instead of waking every worker for each one.
    All sockets are bound here, before forking, so the port is served as soon as this returns
    from the first fork, and ``port=0`` picks one port for all. Worker 0 also serves the
    metrics port. Whatever the parent creates before calling this (the shared load table) is
    inherited. SIGTERM/SIGINT are passed on to the workers; if a worker dies on its own the
    others are stopped and the exit status is 1, so a supervisor restarts the whole gateway
    (a lost worker's in-flight counts would otherwise stay in the shared table).
    """
    socks = [bind(host, port, reuse_port=True)]
    socks += [bind(host, socks[0].getsockname()[1], reuse_port=True) for _ in range(count - 1)]
    metrics_sock = bind(host, metrics_port) if metrics_port else None
    pids: list[int] = []
    for index, sock in enumerate(socks):
        pid = os.fork()
        if pid == 0:
            _worker_main(index, sock, [s for s in socks if s is not sock],
                         metrics_sock if index == 0 else None, metrics_sock, worker)
        pids.append(pid)
    for sock in socks:
        sock.close()
    if metrics_sock is not None:
        metrics_sock.close()
    return _supervise(pids)


def _worker_main(index: int, sock: socket.socket, others: list[socket.socket],
                 metrics_sock: socket.socket | None, any_metrics: socket.socket | None,
                 worker: Worker) -> None:
    """The child's side of the fork: keep only its own sockets, run, and never return."""
    code = 1
    try:
        for other in others:
            other.close()  # a dead sibling's socket must not linger open in this process
        if any_metrics is not None and metrics_sock is None:
            any_metrics.close()
        worker(index, sock, metrics_sock)
        code = 0
    except KeyboardInterrupt:
        code = 0
    except BaseException:
        log.exception("gateway worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


def _supervise(pids: list[int]) -> int:
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        _signal_all(pids, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    status = 0
    alive = set(pids)
    while alive:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        alive.discard(pid)
        if not stopping and alive:
            log.error("gateway worker %d exited (status %d); stopping the others", pid, code)
            stopping = True
            status = 1
            _signal_all(list(alive), signal.SIGTERM)
    return status


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
