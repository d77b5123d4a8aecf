"""The hot path: a raw ASGI callable for the inference routes.

request -> read body (bounded) -> parse once -> resolve model/adapter -> lease a replica ->
forward -> relay the response chunk by chunk with ``send`` -> release.

It is raw ASGI rather than a Starlette endpoint because Starlette's Request/StreamingResponse
cost tens of microseconds per request and several per chunk. A client disconnect cancels this
task, which aborts the upstream request at once: kvgate's own server reports the lost
connection through a callback in the scope (``DISCONNECT_HOOK``); under any other
ASGI server a watcher on ``receive`` does it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from lb.admission import Admission, Ticket
from lb.balancer import Balancer, Lease
from lb.cache_aware import PromptBlocks, prompt_blocks
from lb.config import Config
from lb.errors import (UPSTREAM_ERROR_LIMIT, GatewayError, anthropic_error_body, as_anthropic,
                       bad_request, model_not_found, model_unavailable,
                       upstream_error_body)
from lb.http1 import BodyError, ConnectFailed, ResponseTimeout, UpstreamPool, UpstreamResponse
from lb.keys import KEY_HEADERS, Tenant
from lb.metrics import GatewayMetrics
from lb.model import Model, join_model_adapter, split_model_adapter
from lb.parse import (ParsedRequest, check_content_type, estimated_tokens, parse_request,
                      prefix_of, with_fields, with_model)
from lb.registry import Registry
from lb.rewrite import ModelRename
from lb.selectors import SelectorError, matches, parse_selector
from lb.splits import Splitter
from lb.upstream import (REQUEST_DROP, identity_encoding, request_headers, response_headers,
                         sized_headers)

if TYPE_CHECKING:
    from lb.tracing import Trace, Tracing

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
# Statuses that count against a replica's health (``lb.ejection``), as Envoy's gateway failures.
_REPLICA_FAILURES = frozenset((500, 502, 503, 504))
_STREAM_ERROR = (b'data: {"error": {"message": "The model server closed the stream before it '
                 b'finished.", "type": "server_error", "param": null, "code": "upstream_closed"}}'
                 b'\n\n')
# Anthropic's SDK reads only events that have a name: its stream error is `event: error`.
_ANTHROPIC_STREAM_ERROR = (b"event: error\ndata: " + anthropic_error_body(
    502, "The model server closed the stream before it finished.") + b"\n\n")


def parse_header_selector(text: str) -> list[Any]:
    """``parse_selector`` on an ``X-Label-Selector`` header's value: one that does not parse is
    the client's mistake, a 400."""
    try:
        return parse_selector(text)
    except SelectorError as exc:
        raise bad_request(f"X-Label-Selector: {exc}", param="X-Label-Selector") from None


class ClientGone(Exception):
    """The client disconnected; nobody is left to answer."""


class _Exchange:
    """Per-request state shared by the handler and its disconnect watcher."""

    __slots__ = ("started", "finishing", "disconnected", "status", "model", "ticket", "trace")

    def __init__(self) -> None:
        self.started = False  # response headers sent
        self.finishing = False  # final body message being sent: a disconnect no longer matters
        self.disconnected = False
        self.status = 0
        self.model = "-"
        self.ticket: Ticket | None = None  # API keys on: the request's charge and headers
        self.trace: Trace | None = None  # tracing on: the request's spans (lb.tracing)


class Proxy:
    def __init__(self, config: Config, registry: Registry, balancer: Balancer,
                 metrics: GatewayMetrics, pool: Callable[[], UpstreamPool],
                 admission: Admission | None = None) -> None:
        self._config = config
        self._admission = admission  # None: API keys off
        # The request headers never sent upstream; with keys on, the client's key as well.
        self._drop = REQUEST_DROP if admission is None else REQUEST_DROP | KEY_HEADERS
        self._registry = registry
        self._balancer = balancer
        self._metrics = metrics
        self._pool = pool
        self._retry_statuses = frozenset(config.retries.retry_statuses)
        self._ejection = config.ejection
        self._session_header = config.routing.session_header.lower().encode()
        self._splitter = Splitter(registry)
        self.tracing: Tracing | None = None  # set by the gateway's lifespan when tracing is on

    async def handle(self, kind: str, path: bytes, scope: Scope, receive: Receive,
                     send: Send) -> None:
        """Serve one request of ``kind``; ``path`` is the model server's path for it."""
        began = time.perf_counter()
        exchange = _Exchange()
        if self.tracing is not None:
            exchange.trace = self.tracing.begin(kind, scope)
        try:
            content_length, content_type, session = _request_headers(scope["headers"],
                                                                     self._session_header)
            if content_type != b"application/json" or kind == "transcriptions":
                check_content_type(kind, content_type)
            # Keys on: the key is checked before the body is read (a 401 costs no upload).
            tenant = (None if self._admission is None
                      else scope.get(TENANT) or self._admission.authenticate(scope["headers"]))
            body = await self._read_body(content_length, receive)
            await self._serve(kind, path, scope, body, content_type, session, receive, send,
                              exchange, began, tenant)
        except GatewayError as exc:
            exchange.status = exc.status
            if not exchange.started:
                await _send_error(send, exc, kind)
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
            if exchange.trace is not None:
                exchange.trace.finish(exchange.status or 500)

    async def _serve(self, kind: str, path: bytes, scope: Scope, body: bytes,
                     content_type: bytes, session: bytes, receive: Receive, send: Send,
                     exchange: _Exchange, began: float, tenant: Tenant | None) -> None:
        parsed = parse_request(kind, body, content_type)
        model, adapter = self._resolve(parsed.model, scope)
        requested = model  # a key's selector is matched against the labels of the name asked for
        if model.spec.splits or adapter:  # canary routing: maybe another name serves it
            target = self._splitter.route(model, adapter, parsed.model, session, _FEATURES[kind])
            if target is not None:
                self._metrics.split(parsed.model, join_model_adapter(target[0].name, target[1]))
                model, adapter = target
        exchange.model = model.name
        if exchange.trace is not None:
            exchange.trace.parsed(parsed, model, adapter)
        if _FEATURES[kind] not in model.spec.features and not _also_served(kind, model):
            raise _not_served(model, kind, scope["path"])
        if tenant is not None:  # 403 / 429 (the client's key is dropped in _forward)
            assert self._admission is not None
            exchange.ticket = self._admission.admit(tenant, parsed, requested, model.name, scope)
        hook = scope.get(DISCONNECT_HOOK)
        watcher = (_DisconnectHook(hook, exchange) if hook is not None
                   else _DisconnectWatch(receive, exchange))
        active = self._metrics.active_gauge(model.name)
        active.inc()
        try:
            prompt = (prompt_blocks(parsed, model, adapter)
                      if model.spec.load_balancing.strategy == "CacheAware" else None)
            key = _routing_key(parsed, model, session, prompt)
            await self._forward(model, adapter, parsed, key, prompt, path, scope, send,
                                exchange, began, tenant)
        finally:
            active.dec()
            watcher.cancel()

    def _resolve(self, requested: str, scope: Scope) -> tuple[Model, str]:
        name, adapter = split_model_adapter(requested)
        model = self._registry.get_model(name)
        if model is None and (reason := self._registry.unavailable(name)) is not None:
            raise model_unavailable(name, reason)
        if model is None or not self._selected(model, scope):
            raise model_not_found(requested)
        if adapter:
            if adapter not in {a.name for a in model.spec.adapters}:
                raise model_not_found(requested)
        elif len(name) != len(requested):  # `model_`: a separator and no adapter after it
            raise model_not_found(requested)
        return model, adapter

    @staticmethod
    def _selected(model: Model, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"x-label-selector":
                try:
                    selector = parse_header_selector(value.decode())
                except UnicodeDecodeError:
                    raise bad_request("X-Label-Selector must be UTF-8") from None
                if not matches(selector, model.labels):
                    return False
        return True

    async def _forward(self, model: Model, adapter: str, parsed: ParsedRequest, key: str,
                       prompt: PromptBlocks | None, path: bytes, scope: Scope, send: Send,
                       exchange: _Exchange, began: float, tenant: Tenant | None) -> None:
        headers = request_headers(scope["headers"], parsed.content_type, self._drop)
        ticket = exchange.ticket
        if ticket is not None and ticket.upstream_key is not None:
            headers += ticket.upstream_key
        served = adapter or model.name
        if served != parsed.model:  # an adapter, or a split: the answer gets the client's name
            body = with_model(parsed, served)
            rename: ModelRename | None = ModelRename(served, parsed.model)
            headers = identity_encoding(headers)  # a compressed body could not be renamed
        else:
            body = parsed.body
            rename = None
        if model.spec.load_balancing.priority_scheduling and parsed.payload is not None:
            body = with_fields(parsed, model=served,
                               priority=self._balancer.engine_priority(scope, tenant))
        weight = estimated_tokens(parsed) if model.spec.load_balancing.load_unit == "Tokens" else 1
        tried: list[str] = []
        attempts = self._config.retries.max_retries + 1
        trace = exchange.trace
        cls = self._balancer.limited_class(scope, tenant)
        for attempt in range(attempts):
            if trace is not None:
                trace.picking()
            lease = self._balancer.try_acquire(model, adapter, key, tried, weight, prompt,
                                               cls=cls)
            if lease is None:
                if trace is not None:
                    trace.queued()
                lease = await self._balancer.wait(model, adapter, key, tried, weight, prompt,
                                                  scope, tenant)
            tried.append(lease.key)
            last = attempt == attempts - 1
            sent = headers
            if trace is not None:
                trace.picked(model, adapter, key, lease, weight)
                sent = trace.attempt(lease, headers)
            try:
                done = await self._attempt(lease, path, body, sent, send, exchange, last,
                                           began, parsed.kind, rename)
            finally:
                lease.release()
            if trace is not None:
                trace.attempt_done(exchange.status, not done and not last)
            if done:
                return
            if not last:  # a failed last attempt is not retried: the loop ends in a 502
                self._metrics.retried(model.name,
                                      str(exchange.status) if exchange.status else "connect")
        raise GatewayError(502, f"No replica of model `{model.name}` could be reached after "
                           f"{attempts} attempts.", code="upstream_unreachable")

    async def _attempt(self, lease: Lease, path: bytes, body: bytes,
                       headers: list[tuple[bytes, bytes]], send: Send, exchange: _Exchange,
                       last: bool, began: float, kind: str,
                       rename: ModelRename | None) -> bool:
        """One try on one replica. False means: retry elsewhere (nothing was sent)."""
        exchange.status = 0
        try:
            response = await self._pool().request(lease.address, b"POST", path, headers, body)
        except ConnectFailed as exc:
            log.debug("upstream %s unreachable: %s", lease.key, exc)
            lease.failed(self._ejection)
            return False
        except ResponseTimeout:
            lease.failed(self._ejection)
            raise GatewayError(504, "The model server did not answer in time.",
                               code="upstream_timeout") from None
        except BodyError as exc:
            log.warning("upstream %s sent a broken response: %s", lease.key, exc)
            lease.failed(self._ejection)
            raise GatewayError(502, "The model server sent a malformed response.",
                               code="upstream_error") from None
        try:
            if response.status in _REPLICA_FAILURES:
                lease.failed(self._ejection)
            else:
                lease.succeeded()
            if response.status in self._retry_statuses and not last:
                exchange.status = response.status
                return False
            self._metrics.first_byte_after(exchange.model, kind, time.perf_counter() - began)
            if exchange.trace is not None:
                exchange.trace.first_byte()
            if response.status >= 400:  # the only cost an answer pays for this
                await self._relay_error(response, send, exchange, kind)
            elif rename is None:
                await self._relay(response, send, exchange, kind)
            else:
                await self._relay_renamed(response, send, exchange, rename, kind)
            return True
        finally:
            response.release()

    async def _relay(self, response: UpstreamResponse, send: Send, exchange: _Exchange,
                     kind: str) -> None:
        """Pass the response through as it comes; never buffer a stream."""
        exchange.status = response.status
        headers = response_headers(response.headers)
        ticket = exchange.ticket
        if ticket is not None:
            headers += ticket.response_headers()
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        exchange.started = True
        before = b""
        try:
            chunk = await response.read()
            while not response.at_end:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                before = chunk
                chunk = await response.read()
        except BodyError as exc:
            log.warning("upstream closed mid-response: %s", exc)
            exchange.status = 502
            if response.content_type != b"text/event-stream":
                return  # a truncated non-SSE body: the connection is dropped, not faked complete
            chunk = _stream_error(kind)
            ticket = None  # no usage to read: the estimate stands
        exchange.finishing = True
        # The last piece goes with the end of the body: one message for a one-piece response.
        await send({"type": "http.response.body", "body": chunk, "more_body": False})
        if ticket is not None:
            ticket.settle(response.status, chunk, before)

    async def _relay_renamed(self, response: UpstreamResponse, send: Send, exchange: _Exchange,
                             rename: ModelRename, kind: str) -> None:
        """``_relay`` for an adapter's answer: the model's name put back to the client's. A body
        of declared length (a JSON answer) is read whole and its Content-Length set to the new
        size; a stream is renamed chunk by chunk and goes out chunked."""
        length = encoded = False
        for name, value in response.headers:
            if name == b"content-length":
                length = True
            elif name == b"content-encoding" and value.strip().lower() != b"identity":
                encoded = True
        if encoded:  # asked for identity, yet compressed: passed on as it came
            await self._relay(response, send, exchange, kind)
            return
        if length and response.content_type != b"text/event-stream":
            try:
                body = rename.whole(await response.read_all())
            except BodyError as exc:
                log.warning("upstream closed mid-response: %s", exc)
                raise GatewayError(502, "The model server sent a malformed response.",
                                   code="upstream_error") from None
            exchange.status = response.status
            headers = sized_headers(response.headers, len(body))
            ticket = exchange.ticket
            if ticket is not None:
                headers += ticket.response_headers()
            await send({"type": "http.response.start", "status": response.status,
                        "headers": headers})
            exchange.started = True
            exchange.finishing = True
            await send({"type": "http.response.body", "body": body, "more_body": False})
            if ticket is not None:
                ticket.settle(response.status, body)
            return
        exchange.status = response.status
        headers = sized_headers(response.headers, None)
        ticket = exchange.ticket
        if ticket is not None:
            headers += ticket.response_headers()
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        exchange.started = True
        before = b""
        try:
            chunk = rename.feed(await response.read())
            while not response.at_end:
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    before = chunk
                chunk = rename.feed(await response.read())
            chunk += rename.flush()
        except BodyError as exc:
            log.warning("upstream closed mid-response: %s", exc)
            exchange.status = 502
            if response.content_type != b"text/event-stream":
                return  # a truncated non-SSE body: the connection is dropped, not faked complete
            chunk = rename.flush() + _stream_error(kind)
            ticket = None  # no usage to read: the estimate stands
        exchange.finishing = True
        await send({"type": "http.response.body", "body": chunk, "more_body": False})
        if ticket is not None:
            ticket.settle(response.status, chunk, before)

    async def _relay_error(self, response: UpstreamResponse, send: Send,
                           exchange: _Exchange, kind: str) -> None:
        """A model server's error, rewritten in OpenAI's shape with its status and message
        (vLLM, FastAPI and proxies in front of a replica all have shapes of their own); in
        Anthropic's on its Messages route."""
        chunks: list[bytes] = []
        size = 0
        try:
            while size <= UPSTREAM_ERROR_LIMIT:
                chunk = await response.read()
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except BodyError as exc:
            log.warning("upstream closed mid-error-response: %s", exc)  # keep what came
        raw = _decoded(b"".join(chunks), response.headers)
        body = upstream_error_body(response.status, response.content_type, raw)
        if kind == "messages":
            body = as_anthropic(response.status, body)
        headers = [(name, value) for name, value in response_headers(response.headers)
                   if name not in _REWRITTEN]
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]
        exchange.status = response.status
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        exchange.started = True
        exchange.finishing = True
        await send({"type": "http.response.body", "body": body, "more_body": False})
        if exchange.ticket is not None:
            exchange.ticket.settle(response.status, b"")  # refused: the estimate is given back

    async def _read_body(self, declared: bytes, receive: Receive) -> bytes:
        limit = self._config.limits.max_body_bytes
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


class _DisconnectHook:
    """Cancels the handler task when the server reports the client's connection lost."""

    __slots__ = ("_hook", "_exchange", "_handler")

    def __init__(self, hook: Callable[[Callable[[], None] | None], None],
                 exchange: _Exchange) -> None:
        self._hook = hook
        self._exchange = exchange
        self._handler = asyncio.current_task()
        hook(self._lost)

    def _lost(self) -> None:
        if not self._exchange.finishing:
            self._exchange.disconnected = True
            self._handler.cancel()

    def cancel(self) -> None:
        self._hook(None)


class _DisconnectWatch:
    """Cancels the handler task when the client goes away, so upstream work stops with it.

    The watcher (a task parked in ``receive()``) starts only after ``_WATCH_AFTER`` seconds:
    most non-streaming requests are done by then and never pay for a task, while anything that
    lasts (a generation, a stream, the queue) is watched from then on.
    """

    __slots__ = ("_receive", "_exchange", "_handler", "_timer", "_task")

    def __init__(self, receive: Receive, exchange: _Exchange) -> None:
        self._receive = receive
        self._exchange = exchange
        loop = asyncio.get_running_loop()  # once: each call costs a getpid() syscall
        self._handler = asyncio.current_task(loop)
        self._task: asyncio.Task[Any] | None = None
        self._timer = loop.call_later(_WATCH_AFTER, self._start)

    def _start(self) -> None:
        self._task = self._handler.get_loop().create_task(self._receive())
        self._task.add_done_callback(self._on_message)

    def _on_message(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self._exchange.finishing:
            return
        if task.exception() is None and task.result().get("type") == "http.disconnect":
            self._exchange.disconnected = True
            self._handler.cancel()

    def cancel(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


_WATCH_AFTER = 0.02
# The scope key under which kvgate's server (lb.server) offers a lost-connection callback.
DISCONNECT_HOOK = "kvgate.on_disconnect"
# The scope key of a request made inside the gateway on a tenant's behalf (a batch's line): its
# Tenant, already authenticated. Only code in this process can set it; a client sends headers.
TENANT = "kvgate.tenant"


def _request_headers(headers: list[tuple[bytes, bytes]],
                     session_header: bytes) -> tuple[bytes, bytes, bytes]:
    """(content-length, content-type, session id) in one pass over the headers; b"" when
    absent (ASGI servers give header names in lower case)."""
    length = ctype = session = b""
    for key, value in headers:
        if key == b"content-length":
            length = value
        elif key == b"content-type":
            ctype = value
        elif key == session_header:
            session = value
    return length, ctype, session


def _routing_key(parsed: ParsedRequest, model: Model, session: bytes,
                 prompt: PromptBlocks | None) -> str:
    """What the ring hashes (besides the adapter): the client's session id when it sent one,
    else the prompt's prefix (CacheAware: its first block, the home of a prompt no replica
    is known to hold); only PrefixHash and CacheAware read it."""
    balancing = model.spec.load_balancing
    if balancing.strategy != "PrefixHash" and balancing.strategy != "CacheAware":
        return ""
    if session:
        return "\x1esession:" + session.decode("latin-1")  # apart from every prompt's text
    if balancing.strategy == "CacheAware":
        return prompt.head if prompt is not None else ""
    return prefix_of(parsed, balancing.prefix_hash.prefix_char_length,
                     balancing.prefix_hash.prefix_from)


# The feature a Model must declare for each request kind (KubeAI lists models by feature but
# forwards any route to any model, so an engine answers in its own words, or serves a request
# the model was never meant for).
_FEATURES = {"chat": "TextGeneration", "completions": "TextGeneration",
             "embeddings": "TextEmbedding", "transcriptions": "SpeechToText",
             "rerank": "Reranking", "responses": "TextGeneration", "messages": "TextGeneration",
             "score": "Reranking", "tokenize": "TextGeneration", "detokenize": "TextGeneration"}
# Features that serve a kind as well as its main one: every model vLLM serves with a tokenizer
# (generation, embedding, scoring) answers tokenize and detokenize.
_ALSO = {"tokenize": ("TextEmbedding", "Reranking"),
         "detokenize": ("TextEmbedding", "Reranking")}


def _also_served(kind: str, model: Model) -> bool:
    return any(feature in model.spec.features for feature in _ALSO.get(kind, ()))


def _not_served(model: Model, kind: str, path: str) -> GatewayError:
    declared = ", ".join(model.spec.features) or "none"
    needed = (_FEATURES[kind],) + _ALSO.get(kind, ())
    needs = (f"the {needed[0]} feature" if len(needed) == 1 else
             f"one of the {', '.join(needed[:-1])} or {needed[-1]} features")
    return GatewayError(404, f"The model `{model.name}` does not serve {path}: that route needs "
                        f"{needs}, and the model declares: {declared}.",
                        code="model_does_not_serve_route", param="model")


def _stream_error(kind: str) -> bytes:
    """The event that ends a stream its replica broke off, in the client's API's words."""
    return _ANTHROPIC_STREAM_ERROR if kind == "messages" else _STREAM_ERROR


# Headers of an upstream error that no longer describe the rewritten body.
_REWRITTEN = frozenset((b"content-type", b"content-length", b"content-encoding", b"etag",
                        b"content-md5", b"digest"))


def _decoded(raw: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An error body without its gzip/deflate content-encoding (the client's Accept-Encoding
    is forwarded, so a replica may compress); other encodings are left as they are."""
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() in (b"gzip", b"x-gzip",
                                                                     b"deflate"):
            try:
                return zlib.decompressobj(47).decompress(raw, UPSTREAM_ERROR_LIMIT)
            except zlib.error:
                return b""
    return raw


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"The request body is larger than the {limit} bytes allowed.",
                        code="request_too_large")


async def _send_error(send: Send, exc: GatewayError, kind: str = "") -> None:
    """The gateway's own error, in OpenAI's shape (Anthropic's on its Messages route)."""
    headers = _JSON + [(k.encode(), v.encode()) for k, v in exc.headers.items()]
    body = (anthropic_error_body(exc.status, exc.message) if kind == "messages"
            else exc.body())
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
