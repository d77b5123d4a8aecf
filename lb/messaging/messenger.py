"""One stream of KubeAI's messenger: request messages in, responses out, through the gateway.

A request message is ``{"metadata": ..., "path": "/v1/chat/completions", "body": {...}}``; its
response is ``{"metadata": <the same>, "status_code": N, "body": {...}}``. Every message gets a
response, the failed ones too (not JSON, an unknown path, a streaming request, a 4xx or 5xx from
the gateway or a replica), with an OpenAI-shaped error as its body.

Delivery is at least once: a request is acknowledged only after its response is published (and
stored by the broker), so a broker restart or a gateway crash loses nothing acknowledged; a
message in flight at that moment is delivered again and may be answered twice.

Each request runs through the gateway's ASGI app in this process (``lb.loopback``), as a client's
would, in the lowest priority class: routing, retries, the queue (scale from zero) and
metrics apply. At most ``maxHandlers`` run at once; a full queue (429) is waited out, not
answered. When the broker fails, the session is closed and reopened after min(n seconds,
errorMaxBackoff), n being the number of consecutive failures (KubeAI's rule).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable

import orjson

from lb.errors import error_body
from lb.loopback import Abort, App, Reply, call_app
from lb.messaging import broker
from lb.messaging.config import MessageStream
from lb.messaging.metrics import MessagingMetrics
from lb.messaging.urls import parse_broker_url
from lb.parse import KINDS

log = logging.getLogger(__name__)

# The JSON routes a message may name (audio transcriptions are multipart, not JSON).
PATHS = frozenset(prefix + suffix for prefix in ("/v1", "/openai/v1")
                  for suffix in KINDS if suffix != "/audio/transcriptions")
_BUSY = 429  # the queue is full (or shed it): wait and send again, it is not the message's fault
_BROKEN = "The model server closed the connection before its answer was complete."
Tenants = Callable[[str], Any]  # API keys on: the live key of a name (None once revoked)


class Messenger:
    """Consumes one stream until cancelled."""

    def __init__(self, stream: MessageStream, app: App, max_backoff: float,
                 tenants: Tenants | None = None, metrics: MessagingMetrics | None = None) -> None:
        self.stream = stream
        self.app = app
        self.max_backoff = max_backoff
        self.tenants = tenants
        self.requests = parse_broker_url(stream.requests_url)
        self.responses = parse_broker_url(stream.responses_url)
        self.failures = 0  # consecutive broker failures: the back-off grows with them
        metrics = metrics or MessagingMetrics(None)
        name = self.requests.redacted
        self.answered = lambda status: metrics.responses.labels(name, str(status)).inc()
        self.in_flight = metrics.in_flight.labels(name)
        self.broker_errors = metrics.broker_errors.labels(name)

    async def run(self) -> None:
        while True:
            try:
                await _Session(self).run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                self.broker_errors.inc()
                delay = min(float(self.failures), self.max_backoff)
                log.warning("messaging %s -> %s: broker error (%s: %s); retrying in %.0f s",
                            self.requests.redacted, self.responses.redacted,
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)

    # -- one message -------------------------------------------------------------------------

    async def answer(self, data: bytes, abort: Abort) -> tuple[int, bytes]:
        """The status and the response message for a request message; never raises (but when
        cancelled)."""
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            return _error(None, 400, f"The message is not valid JSON: {exc}.", "invalid_json")
        if not isinstance(message, dict):
            return _error(None, 400, "The message must be a JSON object with `path` and `body`.",
                          "invalid_message")
        metadata = message.get("metadata")
        path, body = message.get("path"), message.get("body")
        if not isinstance(path, str) or path not in PATHS:
            return _error(metadata, 404, f"Unknown path {path!r}: messages may name "
                          f"{', '.join(sorted(p for p in PATHS if p.startswith('/v1')))} "
                          "(or the same under /openai/v1).", "unknown_path", "path")
        if not isinstance(body, dict):
            return _error(metadata, 400, "`body` must be a JSON object: the request.",
                          "invalid_message", "body")
        if body.get("stream") is True:
            return _error(metadata, 400, "Streaming is not available over messaging: a message "
                          "carries one whole response.", "unsupported_parameter", "stream")
        try:
            reply = await self._send(path, orjson.dumps(body), abort)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in the gateway must not pass for a broker error
            log.exception("messaging: request to %s failed", path)
            return _error(metadata, 500, "The gateway failed to handle this request.",
                          "internal_error")
        return _response(metadata, reply)

    async def _send(self, path: str, body: bytes, abort: Abort) -> Reply:
        while True:
            tenant = None
            if self.tenants is not None:
                tenant = self.tenants(self.stream.api_key)
                if tenant is None:
                    return _revoked(self.stream.api_key)
            reply = await call_app(self.app, path, body, [], abort, tenant)
            if reply.status != _BUSY:
                return reply
            retry = reply.header(b"retry-after")
            await asyncio.sleep(float(retry) if retry.isdigit() else 1.0)


class _Session:
    """One connection to each broker of the stream; ends (raising) when either fails."""

    def __init__(self, messenger: Messenger) -> None:
        self.messenger = messenger
        self.limit = messenger.stream.max_handlers
        self.slots = asyncio.Semaphore(self.limit)
        self.handlers: set[asyncio.Task[None]] = set()
        self.broken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.abort = Abort()

    async def run(self) -> None:
        m = self.messenger
        subscription = await broker.subscribe(m.requests, self.limit)
        try:
            self.publisher = await broker.publisher(m.responses)
        except BaseException:
            await subscription.close()
            raise
        try:
            await self._consume(subscription)
        finally:
            self.abort.fire()  # requests in flight end as a client's that hung up would
            for task in self.handlers:
                task.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)
            await subscription.close()
            await self.publisher.close()
            if self.broken.done():
                self.broken.exception()  # raised already, or superseded by the error raised

    async def _consume(self, subscription: broker.Subscription) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.slots.acquire()
            free = 1
            while free < self.limit and not self.slots.locked():
                await self.slots.acquire()
                free += 1
            try:
                deliveries = await _first(subscription.receive(free), self.broken)
            except BaseException:
                for _ in range(free):
                    self.slots.release()
                raise
            self.messenger.failures = 0
            for _ in range(free - len(deliveries)):
                self.slots.release()
            for delivery in deliveries:
                task = loop.create_task(self._handle(delivery, subscription.progress_seconds))
                self.handlers.add(task)
                task.add_done_callback(self.handlers.discard)

    async def _handle(self, delivery: broker.Delivery, progress_seconds: float | None) -> None:
        self.messenger.in_flight.inc()
        keeper = None
        if progress_seconds is not None:
            keeper = asyncio.get_running_loop().create_task(_keep(delivery, progress_seconds))
        try:
            status, response = await self.messenger.answer(delivery.data, self.abort)
            if keeper is not None:
                keeper.cancel()
            try:
                await self.publisher.publish(response)
            except broker.TooLarge as exc:  # the answer's fault, not the broker's: say so
                status, response = _too_large(response, exc)
                await self.publisher.publish(response)
            await delivery.ack()
            self.messenger.answered(status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker failed: the message stays for redelivery
            if not self.broken.done():
                self.broken.set_exception(exc)
            with contextlib.suppress(Exception):
                await delivery.nack()
        finally:
            if keeper is not None:
                keeper.cancel()
            self.slots.release()
            self.messenger.in_flight.dec()


async def _first(receiving: Any, broken: asyncio.Future[None]) -> list[broker.Delivery]:
    """What ``receiving`` gives, unless a handler found the broker broken first."""
    task = asyncio.ensure_future(receiving)
    try:
        await asyncio.wait([task, broken], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled (the gateway stops): the receive may still end in error
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise
    if broken.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        broken.result()  # raises the handler's error
    return task.result()


async def _keep(delivery: broker.Delivery, every: float) -> None:
    """Report progress on a message in flight, so its ack deadline does not pass."""
    while True:
        await asyncio.sleep(every)
        with contextlib.suppress(Exception):
            await delivery.progress()


def _response(metadata: Any, reply: Reply) -> tuple[int, bytes]:
    status, raw = reply.status, b"".join(reply.chunks)
    if not reply.complete:  # the replica broke off mid-body: what came is not an answer
        status, raw = 502, error_body(502, _BROKEN, code="upstream_error")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = raw.decode("utf-8", "replace")
    return status, orjson.dumps({"metadata": metadata, "status_code": status, "body": body})


def _too_large(response: bytes, exc: Exception) -> tuple[int, bytes]:
    metadata = orjson.loads(response).get("metadata")
    return _error(metadata, 502, f"The response ({len(response)} bytes) is too large for the "
                  f"response topic: {exc}.", "response_too_large")


def _error(metadata: Any, status: int, message: str, code: str,
           param: str | None = None) -> tuple[int, bytes]:
    body = orjson.loads(error_body(status, message, code=code, param=param))
    return status, orjson.dumps({"metadata": metadata, "status_code": status, "body": body})


def _revoked(name: str) -> Reply:
    body = error_body(401, f"The API key `{name}` of this stream has been revoked or has "
                      "expired.", code="invalid_api_key")
    return Reply(401, [(b"content-type", b"application/json")], [body], True)
