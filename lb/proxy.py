"""The hot path: a raw ASGI callable for the inference routes.

request -> read body (bounded) -> parse once -> resolve model/adapter -> lease a replica ->
forward -> relay the response chunk by chunk with ``send`` -> release.

It is raw ASGI rather than a Starlette endpoint because Starlette's Request/StreamingResponse
cost tens of microseconds per request and several per chunk. A watcher on ``receive`` turns a
client disconnect into cancellation of this task, which aborts the upstream request at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp

from lb.balancer import Balancer, Lease
from lb.config import Config
from lb.errors import GatewayError, bad_request, model_not_found
from lb.metrics import GatewayMetrics
from lb.model import Model, split_model_adapter
from lb.parse import ParsedRequest, parse_request, prefix_of, with_model
from lb.registry import Registry
from lb.selectors import matches, parse_selector
from lb.upstream import request_headers, response_headers

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_STREAM_ERROR = (b'data: {"error": {"message": "The model server closed the stream before it '
                 b'finished.", "type": "server_error", "param": null, "code": "upstream_closed"}}'
                 b'\n\n')


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


class _Exchange:
    """Per-request state shared by the handler and its disconnect watcher."""

    __slots__ = ("started", "finishing", "disconnected", "status", "model", "streamed")

    def __init__(self) -> None:
        self.started = False  # response headers sent
        self.finishing = False  # final body message being sent: a disconnect no longer matters
        self.disconnected = False
        self.status = 0
        self.model = "-"
        self.streamed = False


class Proxy:
    def __init__(self, config: Config, registry: Registry, balancer: Balancer,
                 metrics: GatewayMetrics, session: Callable[[], aiohttp.ClientSession]) -> None:
        self._config = config
        self._registry = registry
        self._balancer = balancer
        self._metrics = metrics
        self._session = session
        self._retry_statuses = frozenset(config.retries.retry_statuses)

    async def handle(self, kind: str, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.perf_counter()
        exchange = _Exchange()
        try:
            body = await self._read_body(scope, receive)
            await self._serve(kind, scope, body, receive, send, exchange, began)
        except GatewayError as exc:
            exchange.status = exc.status
            if not exchange.started:
                await _send_error(send, exc)
        except ClientGone:
            exchange.status = 499
        except asyncio.CancelledError:
            if not exchange.disconnected:
                raise
            asyncio.current_task().uncancel()  # our own cancellation: the client left
            exchange.status = 499
        finally:
            self._metrics.finished(exchange.model, kind, exchange.status or 500,
                                   time.perf_counter() - began)

    async def _serve(self, kind: str, scope: Scope, body: bytes, receive: Receive, send: Send,
                     exchange: _Exchange, began: float) -> None:
        content_type = _header(scope, b"content-type")
        parsed = parse_request(kind, body, content_type)
        model, adapter = self._resolve(parsed.model, scope)
        exchange.model = model.name
        watcher = _watch_disconnect(receive, exchange)
        active = self._metrics.active_gauge(model.name)
        active.inc()
        try:
            await self._forward(model, adapter, parsed, scope, send, exchange, began)
        finally:
            active.dec()
            watcher.cancel()

    def _resolve(self, requested: str, scope: Scope) -> tuple[Model, str]:
        name, adapter = split_model_adapter(requested)
        model = self._registry.get_model(name)
        if model is None or not self._selected(model, scope):
            raise model_not_found(requested)
        if adapter and adapter not in {a.name for a in model.spec.adapters}:
            raise model_not_found(requested)
        return model, adapter

    @staticmethod
    def _selected(model: Model, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"x-label-selector":
                try:
                    selector = parse_selector(value.decode())
                except UnicodeDecodeError:
                    raise bad_request("X-Label-Selector must be UTF-8") from None
                if not matches(selector, model.labels):
                    return False
        return True

    async def _forward(self, model: Model, adapter: str, parsed: ParsedRequest, scope: Scope,
                       send: Send, exchange: _Exchange, began: float) -> None:
        prefix = prefix_of(parsed, model.spec.load_balancing.prefix_hash.prefix_char_length)
        body = with_model(parsed, adapter or model.name) if adapter else parsed.body
        headers = request_headers(scope["headers"], parsed.content_type)
        path = "/v1" + scope["path"].removeprefix("/openai").removeprefix("/v1")
        tried: list[str] = []
        attempts = self._config.retries.max_retries + 1
        for attempt in range(attempts):
            lease = await self._balancer.acquire(model, adapter, prefix, tried)
            tried.append(lease.key)
            last = attempt == attempts - 1
            try:
                done = await self._attempt(lease, path, body, headers, send, exchange, last,
                                           began, parsed.kind)
            finally:
                lease.release()
            if done:
                return
            self._metrics.retried(model.name, str(exchange.status) if exchange.status else "connect")
        raise GatewayError(502, f"No replica of model `{model.name}` could be reached after "
                           f"{attempts} attempts.", code="upstream_unreachable")

    async def _attempt(self, lease: Lease, path: str, body: bytes,
                       headers: list[tuple[str, str]], send: Send, exchange: _Exchange,
                       last: bool, began: float, kind: str) -> bool:
        """One try on one replica. False means: retry elsewhere (nothing was sent)."""
        url = f"http://{lease.address}{path}"
        exchange.status = 0
        try:
            response = await self._session().post(url, data=body, headers=headers)
        except aiohttp.SocketTimeoutError:
            raise GatewayError(504, "The model server did not answer in time.",
                               code="upstream_timeout") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            log.debug("upstream %s failed: %s", lease.key, exc)
            return False
        try:
            if response.status in self._retry_statuses and not last:
                exchange.status = response.status
                return False
            self._metrics.first_byte_after(exchange.model, kind, time.perf_counter() - began)
            await self._relay(response, send, exchange)
            return True
        finally:
            response.release()

    async def _relay(self, response: aiohttp.ClientResponse, send: Send,
                     exchange: _Exchange) -> None:
        """Pass the response through as it comes; never buffer a stream."""
        exchange.status = response.status
        sse = response.content_type == "text/event-stream"
        await send({"type": "http.response.start", "status": response.status,
                    "headers": response_headers(response.raw_headers)})
        exchange.started = True
        content = response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("upstream closed mid-response: %s", exc)
            exchange.status = 502
            if not sse:
                return  # a truncated non-SSE body: the connection is dropped, not faked complete
            await send({"type": "http.response.body", "body": _STREAM_ERROR, "more_body": True})
        exchange.finishing = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self._config.limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _watch_disconnect(receive: Receive, exchange: _Exchange) -> asyncio.Task[Any]:
    """Cancel the handler task when the client goes away, so upstream work stops with it."""
    handler = asyncio.current_task()
    watcher = asyncio.get_running_loop().create_task(receive())

    def on_message(task: asyncio.Task[Any]) -> None:
        if task.cancelled() or exchange.finishing:
            return
        if task.exception() is None and task.result().get("type") == "http.disconnect":
            exchange.disconnected = True
            handler.cancel()

    watcher.add_done_callback(on_message)
    return watcher


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return b""


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than the {limit} bytes allowed.",
                        code="request_too_large")


async def _send_error(send: Send, exc: GatewayError) -> None:
    headers = _JSON + [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": exc.body(), "more_body": False})
