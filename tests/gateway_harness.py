"""End-to-end harness for the gateway tests: a real kvgate gateway and real test backends.

Everything runs over real HTTP on 127.0.0.1. One background thread runs a uvloop event loop
that hosts, per test, a :class:`lb.app.Gateway` served by :func:`lb.server.serve` (main port
and metrics port) and any number of :class:`Backend` servers (aiohttp.web). Tests drive the
gateway from the main thread with the official ``openai`` SDK (sync or async) or raw HTTP, and
touch gateway state (registry, balancer, rings) only on the gateway's own loop, through
:meth:`GatewayHarness.call` / :meth:`GatewayHarness.run` (or the LoopThread's async twins
``acall`` / ``arun`` from async tests).

The backend is a small OpenAI-compatible *peer* (it plays a model server), with knobs to fail,
stall, hang, reset or stream slowly, and with a record of what it received. Per-request
behaviour can also travel in an ``x-test-plan`` header (JSON of :class:`Plan` fields), which the
gateway forwards like any client header; this lets thousands of concurrent requests each carry
their own fate whichever replica serves them.
"""

from __future__ import annotations

import array
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import openai
import uvloop
from aiohttp import web
from kvgate_sim.cluster import Replica
from prometheus_client.parser import text_string_to_metric_families

from lb.app import Gateway
from lb.config import Config, config_from_dict, static_registry
from lb.model import Model
from lb.registry import Endpoint
from lb.server import bind, serve

T = TypeVar("T")

HOST = "127.0.0.1"


# -- errors the gateway logs ----------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Collects ERROR records of the gateway's side (uvicorn, asyncio, lb): an exception in
    the ASGI app, a task exception nobody retrieved... The fixtures fail a test that leaves
    any it did not declare with :meth:`GatewayHarness.allow_errors`."""

    LOGGERS = ("uvicorn.error", "asyncio", "lb")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def install(self) -> None:
        # uvicorn's logging dictConfig (run for every server) drops the handlers of its
        # loggers, so this is re-applied after each gateway starts.
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            if self not in logger.handlers:
                logger.addHandler(self)


ERRORS = ErrorLog()


# -- the loop thread ----------------------------------------------------------------------------


class LoopThread:
    """A uvloop event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="gateway-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T], timeout: float | None = 30) -> T:
        """Run a coroutine on the loop and wait for its result (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def arun(self, coro: Awaitable[T]) -> T:
        """Same, awaited from another event loop (async tests)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = 30) -> T:
        """Call a plain function on the loop thread and return its result."""
        return self._call(fn, args).result(timeout)

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._call(fn, args))

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def invoke() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return future

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


# -- the test backend ---------------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    """How a backend answers one request. Defaults: 200, three SSE chunks when streaming."""

    status: int = 200  # non-2xx: an OpenAI error body with this status
    chunks: int = 3  # SSE chunks before [DONE] (streaming requests)
    chunk_delay: float = 0.0  # seconds between chunks
    header_delay: float = 0.0  # seconds before anything is sent
    die_after: int | None = None  # streaming: drop the connection after this many chunks
    reset: bool = False  # drop the connection without answering
    truncate: bool = False  # non-streaming: send half of the JSON body, then drop the connection
    hang: bool = False  # never answer (until the backend is closed)
    fail_attempts: int = 0  # with an x-test-rid header: the first N attempts (any replica) fail
    fail_status: int = 500
    # A failure's body as the model server words it (else an OpenAI error), and its type.
    error_body: str | None = None
    error_content_type: str = "application/json"
    error_gzip: bool = False  # send error_body gzip-encoded (Content-Encoding: gzip)

    @classmethod
    def merged(cls, base: Plan, overrides: dict[str, Any]) -> Plan:
        return dataclasses.replace(base, **overrides)


@dataclass(slots=True)
class Seen:
    """One request as the backend received it."""

    path: str
    method: str
    headers: dict[str, str]
    body: bytes = b""
    json: Any = None
    form: dict[str, Any] = field(default_factory=dict)  # multipart: name -> str | (filename, bytes)
    at: float = field(default_factory=time.monotonic)  # when its headers arrived


class Backend:
    """An OpenAI-compatible test model server on an ephemeral port (aiohttp.web).

    Serves chat completions, completions, embeddings, rerank and audio transcriptions,
    streaming or not; anything else answers 200 ``{"ok": true}`` so that a request the gateway
    should never forward would be *counted* here rather than fail on its own.
    All state is read and written on the loop thread (or as plain attribute reads).
    """

    def __init__(self, name: str, attempts: collections.Counter[str],
                 plan: Plan | None = None) -> None:
        self.name = name
        self.plan = plan or Plan()
        self.address = ""
        self.port = 0
        self.calls: collections.Counter[str] = collections.Counter()  # path -> requests
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.most_in_flight = 0  # the peak of in_flight
        self.cancelled = 0  # handlers cancelled because the gateway closed the connection
        self.cancel_times: list[float] = []
        self.chunk_times: list[float] = []  # monotonic time each SSE chunk was written
        self.completed = 0  # responses fully written
        self.scrapes = 0  # GET /metrics (the gateway's engine scraper), not counted in calls
        self.engine_waiting = 0
        self.engine_kv = 0.0
        self.engine_metrics_broken = False
        # GET /health (the gateway's active health checks): its status, and a delay before it
        # answers; counted in ``calls`` like any request.
        self.health_status = 200
        self.health_delay = 0.0
        self._attempts = attempts
        self._fail_next: collections.deque[int] = collections.deque()
        self._gate: asyncio.Event | None = None
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._count = 0

    # knobs (call on the loop thread, e.g. via harness.loop.call) ---------------------------

    def fail_next(self, n: int, status: int) -> None:
        self._fail_next.extend([status] * n)

    def hold(self) -> None:
        """Hold every request (after recording it) until :meth:`release`."""
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def last(self) -> Seen:
        return self.seen[-1]

    def endpoint(self, *adapters: str, key: str | None = None) -> Endpoint:
        return Endpoint(key or self.name, self.address, frozenset(adapters))

    # lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a handler is cancelled when its connection closes, which is how
        # this backend observes the gateway abandoning a request.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0, backlog=4096)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.address = f"{HOST}:{self.port}"

    async def close(self) -> None:
        self._closing.set()
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()

    # serving -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and request.path == "/metrics":
            return self._metrics()
        self.calls[request.path] += 1
        if request.method == "GET" and request.path == "/health":
            return await self._health()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._serve(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            self.cancel_times.append(time.monotonic())
            raise
        finally:
            self.in_flight -= 1

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.path, request.method, dict(request.headers))
        if request.content_type == "multipart/form-data":
            form = await request.post()
            for name, value in form.items():
                if isinstance(value, web.FileField):
                    seen.form[name] = (value.filename, value.file.read(), value.content_type)
                else:
                    seen.form[name] = value
        else:
            seen.body = await request.read()
            with contextlib.suppress(ValueError):
                seen.json = json.loads(seen.body)
        self.seen.append(seen)
        plan = self._plan(request)
        if self._gate is not None:
            await self._gate.wait()
        if plan.header_delay:
            await asyncio.sleep(plan.header_delay)
        if plan.hang:
            await self._closing.wait()
            return _error(503, f"{self.name} is shutting down")
        if plan.reset:
            request.transport.abort()
            return web.Response(status=500)
        status = self._failure(request, plan)
        if status != 200:
            if plan.error_body is not None:
                return _raw_error(status, plan)
            return _error(status, f"{self.name} failed on purpose with {status}")
        if request.method != "POST" or request.path not in _KINDS:
            return self._json({"ok": True, "backend": self.name})
        kind = _KINDS[request.path]
        payload = seen.json if isinstance(seen.json, dict) else {}
        if kind == "transcriptions":
            return self._json(self._transcription(seen))
        if payload.get("stream") is True and kind in ("chat", "completions"):
            return await self._stream(request, kind, payload, plan)
        if plan.truncate:
            return await self._truncated(request, self._answer(kind, payload))
        return self._json(self._answer(kind, payload))

    async def _truncated(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        data = json.dumps(body).encode()
        response = web.StreamResponse(headers={"content-type": "application/json",
                                               "x-backend": self.name})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        await asyncio.sleep(0.05)
        request.transport.abort()
        return response

    def _metrics(self) -> web.Response:
        """vLLM's scheduler gauges, as the gateway's engine scraper reads them: running is what
        this server holds; waiting and KV usage are what a test says (``engine_waiting``,
        ``engine_kv``)."""
        self.scrapes += 1
        if self.engine_metrics_broken:
            return web.Response(status=500, text="metrics broke")
        labels = '{engine="0",model_name="test"}'
        text = (f"# TYPE vllm:num_requests_running gauge\n"
                f"vllm:num_requests_running{labels} {self.in_flight}\n"
                f"# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{labels} {self.engine_waiting}\n"
                f"# TYPE vllm:kv_cache_usage_perc gauge\n"
                f"vllm:kv_cache_usage_perc{labels} {self.engine_kv}\n")
        return web.Response(text=text, content_type="text/plain")

    async def _health(self) -> web.Response:
        if self.health_delay:
            await asyncio.sleep(self.health_delay)
        if self.health_status != 200:
            return _error(self.health_status, f"{self.name} is unhealthy")
        return web.Response(body=b"", headers={"x-backend": self.name})

    def _plan(self, request: web.Request) -> Plan:
        header = request.headers.get("x-test-plan")
        return Plan.merged(self.plan, json.loads(header)) if header else self.plan

    def _failure(self, request: web.Request, plan: Plan) -> int:
        if self._fail_next:
            return self._fail_next.popleft()
        rid = request.headers.get("x-test-rid")
        if rid and plan.fail_attempts:
            self._attempts[rid] += 1
            if self._attempts[rid] <= plan.fail_attempts:
                return plan.fail_status
        return plan.status

    def _json(self, body: dict[str, Any]) -> web.Response:
        self.completed += 1
        return web.Response(body=json.dumps(body).encode(), content_type="application/json",
                            headers={"x-backend": self.name})

    def _next_id(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}-{self.name}-{self._count}"

    def _answer(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        model = payload.get("model", "")
        created = int(time.time())
        if kind == "chat":
            return {"id": self._next_id("chatcmpl"), "object": "chat.completion",
                    "created": created, "model": model, "system_fingerprint": self.name,
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant",
                                             "content": f"hello from {self.name}"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
        if kind == "completions":
            return {"id": self._next_id("cmpl"), "object": "text_completion",
                    "created": created, "model": model, "system_fingerprint": self.name,
                    "choices": [{"index": 0, "text": f"hello from {self.name}",
                                 "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
        if kind == "embeddings":
            inputs = payload.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            data = []
            for i, text in enumerate(inputs):
                vector = [float(len(str(text))), float(i), 0.5]
                if payload.get("encoding_format") == "base64":
                    encoded: Any = base64.b64encode(array.array("f", vector).tobytes()).decode()
                else:
                    encoded = vector
                data.append({"object": "embedding", "index": i, "embedding": encoded})
            return {"object": "list", "data": data, "model": model,
                    "usage": {"prompt_tokens": 1, "total_tokens": 1}}
        return {"id": self._next_id("rerank"), "model": model, "results": [],
                "backend": self.name}

    def _transcription(self, seen: Seen) -> dict[str, Any]:
        fields = {}
        for name, value in seen.form.items():
            if isinstance(value, tuple):
                filename, data, ctype = value
                fields[name] = {"filename": filename, "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}
            else:
                fields[name] = value
        # The transcript is the form as received, so a client can check what went through.
        return {"text": json.dumps({"backend": self.name, "fields": fields}, sort_keys=True)}

    async def _stream(self, request: web.Request, kind: str, payload: dict[str, Any],
                      plan: Plan) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream",
                                               "cache-control": "no-cache",
                                               "x-backend": self.name})
        await response.prepare(request)
        rid = self._next_id("chatcmpl" if kind == "chat" else "cmpl")
        model = payload.get("model", "")
        for i in range(plan.chunks):
            if plan.die_after is not None and i >= plan.die_after:
                request.transport.abort()
                return response
            if i and plan.chunk_delay:
                await asyncio.sleep(plan.chunk_delay)
            last = i == plan.chunks - 1
            await response.write(b"data: " + json.dumps(_chunk(kind, rid, model, i, last)).encode()
                                 + b"\n\n")
            self.chunk_times.append(time.monotonic())
        if plan.die_after is not None and plan.die_after >= plan.chunks:
            request.transport.abort()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.completed += 1
        return response


_KINDS = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
          "/v1/embeddings": "embeddings", "/v1/rerank": "rerank",
          "/v1/audio/transcriptions": "transcriptions"}


def _chunk(kind: str, rid: str, model: str, i: int, last: bool) -> dict[str, Any]:
    finish = "stop" if last else None
    if kind == "chat":
        delta = {"role": "assistant", "content": f"tok{i} "} if i == 0 else {"content": f"tok{i} "}
        return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": finish, "logprobs": None}]}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": f"tok{i} ", "finish_reason": finish,
                         "logprobs": None}]}


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "server_error" if status >= 500
                      else "invalid_request_error", "param": None, "code": None}}
    return web.Response(status=status, body=json.dumps(body).encode(),
                        content_type="application/json")


def _raw_error(status: int, plan: Plan) -> web.Response:
    body = plan.error_body.encode() if plan.error_body is not None else b""
    headers = {"content-type": plan.error_content_type}
    if plan.error_gzip:
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    return web.Response(status=status, body=body, headers=headers)


# -- models ---------------------------------------------------------------------------------------


def model_manifest(name: str, *, engine: str = "VLLM",
                   features: Iterable[str] = ("TextGeneration",), strategy: str = "LeastLoad",
                   adapters: Iterable[str] = (), labels: dict[str, str] | None = None,
                   mean_load_factor: int = 125, replication: int = 256,
                   prefix_char_length: int = 100,
                   prefix_from: str = "FirstUserMessage",
                   load_unit: str = "Requests",
                   cache_aware: dict[str, Any] | None = None,
                   replica_capacity: int = 0,
                   priority_scheduling: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "kvgate.dev/v1", "kind": "Model",
        "metadata": {"name": name, "labels": dict(labels or {})},
        "spec": {
            "url": f"hf://test/{name}", "engine": engine, "features": list(features),
            "adapters": [{"name": a, "url": f"hf://test/{a}"} for a in adapters],
            "loadBalancing": {"strategy": strategy, "loadUnit": load_unit,
                              "replicaCapacity": replica_capacity,
                              "priorityScheduling": priority_scheduling, "prefixHash": {
                "meanLoadFactor": mean_load_factor, "replication": replication,
                "prefixCharLength": prefix_char_length, "prefixFrom": prefix_from},
                "cacheAware": dict(cache_aware or {})},
        },
    }


# -- the gateway under test -------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class GatewayHarness:
    """One gateway (main + metrics port) and its backends, all on ``loop``.

    ``config`` is a camelCase dict merged over quiet defaults (see lb.config), or a Config.
    ``static``: the registry holds the config's ``models`` and ``endpoints``, as `kvgate
    gateway` serves them (static-endpoints mode); otherwise tests add models themselves.
    ``span_exporter``: tracing on, the spans exported there (the SDK's in-memory exporter).
    """

    def __init__(self, loop: LoopThread, config: dict[str, Any] | Config | None = None,
                 static: bool = False, span_exporter: Any = None) -> None:
        self.loop = loop
        self.static = static
        self.span_exporter = span_exporter  # tracing on, spans to this exporter (lb.tracing)
        if not isinstance(config, Config):
            config = config_from_dict(_deep_merge({"server": {"logLevel": "warning"}},
                                                  config or {}))
        self.config = config
        self.backends: list[Backend] = []
        self.sims: list[Replica] = []
        self.attempts: collections.Counter[str] = collections.Counter()
        self._refusing: list[socket.socket] = []
        self._clients: list[Any] = []
        self._closed = False
        self.allowed_errors: list[str] = []
        self.loop.run(self._start())

    async def _start(self) -> None:
        self.gateway = Gateway(self.config,
                               static_registry(self.config) if self.static else None,
                               span_exporter=self.span_exporter)
        self.registry = self.gateway.registry
        self.balancer = self.gateway.balancer
        sock, metrics_sock = bind(HOST, 0), bind(HOST, 0)
        self.port = sock.getsockname()[1]
        self.metrics_port = metrics_sock.getsockname()[1]
        started = asyncio.Event()
        self._serve_task = asyncio.get_running_loop().create_task(
            serve(self.gateway, sock, metrics_sock, started))
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait([waiter, self._serve_task], timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        if not started.is_set():
            waiter.cancel()
            raise RuntimeError("the gateway did not start")
        ERRORS.install()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def allow_errors(self, *fragments: str) -> None:
        """Declare gateway ERROR logs this test expects (matched by message fragment)."""
        self.allowed_errors.extend(fragments)

    # backends and models -----------------------------------------------------------------

    def backend(self, name: str, **plan: Any) -> Backend:
        backend = self.loop.run(self._backend(name, Plan(**plan)))
        self.backends.append(backend)
        return backend

    async def _backend(self, name: str, plan: Plan) -> Backend:
        backend = Backend(name, self.attempts, plan)
        await backend.start()
        return backend

    def sim(self, model: str, key: str, *adapters: str, **server: Any) -> Endpoint:
        """A simulated vLLM replica (``kvgate_sim``) serving ``model`` with ``adapters``
        loaded, on the gateway's loop and stopped with it; its endpoint, keyed ``key``. The
        replica itself is ``harness.sims[-1]``."""
        server.setdefault("lora_modules", {a: f"/adapters/{a}" for a in adapters})
        replica = self.loop.run(Replica(server.pop("profile", "fast"), model, **server).start())
        self.sims.append(replica)
        return Endpoint(key, replica.address, frozenset(adapters))

    def refusing_endpoint(self, key: str, *adapters: str) -> Endpoint:
        """An endpoint whose address refuses connections: a bound socket that never listens
        (kept bound for the harness's lifetime, so no other server can take the port)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((HOST, 0))
        self._refusing.append(sock)
        return Endpoint(key, f"{HOST}:{sock.getsockname()[1]}", frozenset(adapters))

    def add_model(self, name: str, **spec: Any) -> Model:
        model = Model.from_dict(model_manifest(name, **spec))
        self.loop.call(self.registry.set_model, model)
        return model

    def set_endpoints(self, model: str, endpoints: Iterable[Backend | Endpoint]) -> None:
        resolved = [e.endpoint() if isinstance(e, Backend) else e for e in endpoints]
        self.loop.call(self.registry.set_endpoints, model, resolved)

    def model_with(self, name: str, backends: Iterable[Backend | Endpoint],
                   **spec: Any) -> Model:
        model = self.add_model(name, **spec)
        self.set_endpoints(name, backends)
        return model

    def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` on the gateway's loop thread (registry, balancer, rings)."""
        return self.loop.call(fn, *args)

    call = on_loop

    def run(self, coro: Awaitable[T], timeout: float | None = 30) -> T:
        """Run a coroutine on the gateway's loop and wait for it."""
        return self.loop.run(coro, timeout)

    def prefix_for(self, model: str, key: str, adapter: str = "") -> str:
        """A first user message (or prompt) that the model's ring sends to endpoint ``key``
        first, asked of the gateway's own ring (a lookup only: nothing is acquired)."""
        ring = self.on_loop(lambda: self.registry.group(model).ring)
        for i in range(5000):
            candidate = f"prompt {i}"
            if self.on_loop(ring.pick, adapter + candidate, adapter) == key:
                return candidate
        raise AssertionError(f"no prefix of model {model} maps to {key}")

    # clients -----------------------------------------------------------------------------

    def client(self, prefix: str = "/v1", **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("timeout", 30)
        kwargs.setdefault("api_key", "test-key")
        client = openai.OpenAI(base_url=self.url + prefix, max_retries=0, **kwargs)
        self._clients.append(client)
        return client

    def async_client(self, prefix: str = "/v1", **kwargs: Any) -> openai.AsyncOpenAI:
        kwargs.setdefault("timeout", 30)
        return openai.AsyncOpenAI(base_url=self.url + prefix, api_key="test-key", max_retries=0,
                                  **kwargs)

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, port: int | None = None,
             timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
        """A plain HTTP/1.1 request (urllib): status, lower-cased headers, body."""
        url = f"http://{HOST}:{port or self.port}{path}"
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return (response.status, {k.lower(): v for k, v in response.headers.items()},
                        response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    def post_json(self, path: str, payload: Any, headers: dict[str, str] | None = None,
                  ) -> tuple[int, dict[str, str], bytes]:
        return self.http("POST", path, json.dumps(payload).encode(),
                         {"content-type": "application/json", **(headers or {})})

    # observing the gateway -----------------------------------------------------------------

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The metrics port, parsed with prometheus_client's parser: sample name ->
        [(labels, value)]."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        samples: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name].append((dict(sample.labels), sample.value))
        return samples

    def metric(self, name: str, scraped: dict[str, Any] | None = None, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        scraped = scraped if scraped is not None else self.scrape()
        return sum(value for sample_labels, value in scraped.get(name, [])
                   if all(sample_labels.get(k) == v for k, v in labels.items()))

    def counters(self) -> dict[str, float]:
        """Every in-flight counter that must drain to zero once traffic stops."""

        def snapshot() -> dict[str, float]:
            out: dict[str, float] = {}
            for model, group in self.registry.groups().items():
                ring = group.ring
                out[f"ring[{model}].total"] = ring.total
                for key in ring.keys():
                    out[f"ring[{model}].load[{key}]"] = ring.load(key)
                out[f"waiting[{model}]"] = self.balancer.waiting(model)
            for backend in self.backends:
                out[f"backend[{backend.name}].in_flight"] = backend.in_flight
            return out

        values = self.loop.call(snapshot)
        scraped = self.scrape()
        for name in ("kubeai_inference_requests_active", "kvgate_waiting_requests",
                     "kvgate_endpoint_in_flight"):
            for labels, value in scraped.get(name, []):
                values[f"{name}{sorted(labels.items())}"] = value
        return values

    def settle(self, timeout: float = 10.0) -> dict[str, float]:
        """Wait until every in-flight counter is exactly zero; fail with the stragglers."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.counters()
            busy = {k: v for k, v in values.items() if v != 0}
            if not busy:
                return values
            if time.monotonic() > deadline:
                raise AssertionError(f"counters did not return to zero: {busy}")
            time.sleep(0.05)

    async def asettle(self, timeout: float = 10.0) -> dict[str, float]:
        return await asyncio.to_thread(self.settle, timeout)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0,
                 what: str = "condition") -> None:
        """Poll ``predicate`` on the loop thread until it holds."""
        deadline = time.monotonic() + timeout
        while not self.loop.call(predicate):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    async def await_for(self, predicate: Callable[[], bool], timeout: float = 10.0,
                        what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not await self.loop.acall(predicate):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.01)

    # teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self.loop.run(self._stop(), timeout=90)
        for sock in self._refusing:
            sock.close()

    async def _stop(self) -> None:
        for backend in self.backends:  # let held and hanging requests finish first
            backend._closing.set()
            backend.release()
        self._serve_task.cancel()  # lb.server.serve shuts uvicorn down gracefully
        done, _ = await asyncio.wait([self._serve_task], timeout=20)
        if not done:
            self._serve_task.cancel()
            await asyncio.wait([self._serve_task], timeout=10)
        for backend in self.backends:
            await backend.close()
        for replica in self.sims:
            await replica.stop()
