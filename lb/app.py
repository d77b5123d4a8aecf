"""Assembling the gateway: the inference routes go straight to the raw ASGI proxy; everything
else (model list, health, 404/405) is a small Starlette app behind it.

The top-level callable looks the path up in a dict before Starlette sees it, so a proxied
request pays for one dict lookup rather than Starlette's route matching.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lb import tracing
from lb.admission import Admission
from lb.balancer import Balancer
from lb.batch.service import Batches
from lb.config import Config
from lb.console.routes import Console
from lb.engine_metrics import EngineScraper
from lb.errors import GatewayError, error_body
from lb.health_checks import HealthChecker
from lb.keys import KeyStore
from lb.kv_events import KVEventSubscriber
from lb.limits import LimitTable
from lb.messaging.service import Messaging
from lb.metrics import GatewayMetrics
from lb.model import join_model_adapter
from lb.parse import KINDS, ROOT_KINDS
from lb.proxy import Proxy, Receive, Scope, Send, _send_error, parse_header_selector
from lb.registry import Registry
from lb.scaler import Scaler, StaticScaler
from lb.selectors import matches
from lb.http1 import UpstreamPool
from lb.upstream import create_pool

API_PREFIXES = ("/v1", "/openai/v1")
# Where a model server's root is found: vLLM serves /tokenize and /detokenize there, not under
# /v1, so the gateway does too, and under KubeAI's /openai as /v1 is under /openai/v1.
ROOT_PREFIXES = ("", "/openai")


class Gateway:
    """The data plane of one process: registry reader, balancer, proxy and their HTTP apps."""

    def __init__(self, config: Config, registry: Registry | None = None,
                 scaler: Scaler | None = None, limits: LimitTable | None = None,
                 span_exporter: Any = None) -> None:
        """``limits``: the limit table shared with the other worker processes (made before
        they fork); with API keys on and none given, this process gets its own.
        ``span_exporter``: where spans go instead of the OTEL_* environment's exporter (the
        tests' in-memory one); tracing is on with one."""
        tracing.check(config.tracing)  # a bad OTEL_* environment fails here, at start
        self.config = config
        self._span_exporter = span_exporter
        self.registry = registry or Registry()
        self.metrics = GatewayMetrics()
        self.metrics.watch_rings(self.registry.groups)
        # the replicas' KV events, for models that enable them: the precise prefix index
        self.kv_events = KVEventSubscriber(self.registry)
        self.balancer = Balancer(self.registry, scaler or StaticScaler(), config.queue,
                                 self.metrics, config.engine_metrics.stale_after_seconds,
                                 self.kv_events.index)
        self.engine_scraper = EngineScraper(self.registry, config.engine_metrics)
        self.metrics.watch_engines(self.registry.groups, self.engine_scraper)
        self.metrics.watch_kv_events(self.registry.groups, self.kv_events.index)
        self.health_checker = HealthChecker(self.registry, config.health_checks)
        if config.health_checks.enabled:
            self.metrics.watch_health(self.registry.groups)
        self._pool: UpstreamPool | None = None
        self.admission: Admission | None = None
        if config.api_keys.enabled:  # reads the keys file: a bad one fails here, at start
            store = KeyStore(config.api_keys, limits or LimitTable())
            self.admission = Admission(store, self.metrics)
            self.metrics.watch_keys()
        self.proxy = Proxy(config, self.registry, self.balancer, self.metrics, self.pool,
                           self.admission)
        self.ready = False
        # Client path -> (request kind, the model server's path for it).
        self._routes = {prefix + suffix: (kind, b"/v1" + suffix.encode())
                        for prefix in API_PREFIXES for suffix, kind in KINDS.items()}
        self._routes.update({prefix + suffix: (kind, suffix.encode())
                             for prefix in ROOT_PREFIXES for suffix, kind in ROOT_KINDS.items()})
        # Files and Batches: their lines come back through this app, as clients' requests do.
        self.batches = Batches(config.batch, self, self.admission)
        # The web console and its status API (off the request path; routes only when on).
        self.console = Console(config.console, self.registry, self.metrics, self.balancer.waiting,
                               self.admission, config.engine_metrics.stale_after_seconds)
        # KubeAI's messenger: broker messages come back through this app too, in every process.
        self.messaging = Messaging(config.messaging, self, self.admission, self.metrics.registry)
        self._app = self._starlette()

    def pool(self) -> UpstreamPool:
        if self._pool is None:
            raise GatewayError(503, "The gateway is starting up.", code="not_ready")
        return self._pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = self._routes.get(scope["path"])
            if route is not None:
                if scope["method"] == "POST":
                    return await self.proxy.handle(*route, scope, receive, send)
                return await _send_error(send, GatewayError(
                    405, f"Method {scope['method']} is not allowed here; use POST.",
                    code="method_not_allowed", headers={"allow": "POST"}), route[0])
        await self._app(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        self._pool = create_pool(self.config.upstream)
        loop = asyncio.get_running_loop()
        # Off the request path: the replicas' own metrics, their health and their KV events.
        background: list[asyncio.Task[None]] = [loop.create_task(self.kv_events.run())]
        if self.config.engine_metrics.interval_seconds > 0:
            background.append(loop.create_task(self.engine_scraper.run()))
        if self.config.health_checks.enabled:
            background.append(loop.create_task(self.health_checker.run()))
        if self.admission is not None:
            background.append(loop.create_task(self.admission.store.watch()))
        background.extend(self.console.start(loop))
        await self.batches.start()
        # Here, in each worker after the fork: the SDK's export thread lives in this process.
        self.proxy.tracing = tracing.start(self.config.tracing, self._span_exporter)
        await self.messaging.start()
        self.ready = True
        try:
            yield
        finally:
            self.ready = False
            await self.messaging.stop()  # before the pool closes: its requests use it
            traces, self.proxy.tracing = self.proxy.tracing, None
            if traces is not None:  # the last spans flushed off the loop
                await asyncio.to_thread(traces.shutdown)
            await self.batches.stop()  # before the pool closes: its requests use it
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.balancer.close()
            await self._pool.close()
            self._pool = None

    async def metrics_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI app for the metrics port: /metrics only."""
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            await _send_error(send, GatewayError(404, "Only /metrics is served here."))
            return
        response = Response(generate_latest(self.metrics.registry),
                            media_type=CONTENT_TYPE_LATEST)
        await response(scope, receive, send)

    # -- the small routes ----------------------------------------------------------------------

    def _starlette(self) -> Starlette:
        routes = [Route("/healthz", self._healthz), Route("/readyz", self._readyz)]
        routes += [Route(prefix + "/models", self._list_models) for prefix in API_PREFIXES]
        routes += self.batches.api.routes(API_PREFIXES)
        routes += self.console.routes()
        return Starlette(routes=routes, lifespan=self.lifespan,
                         exception_handlers={HTTPException: _http_error,
                                             GatewayError: _gateway_error})

    async def _healthz(self, request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def _readyz(self, request: Request) -> Response:
        if not self.ready:
            return Response(error_body(503, "not ready"), 503, media_type="application/json")
        return Response(b'{"status":"ready"}', media_type="application/json")

    async def _list_models(self, request: Request) -> Response:
        """KubeAI's /v1/models: filtered by ?feature= (TextGeneration by default) and by
        X-Label-Selector; each adapter listed as ``model_adapter``; with API keys on, only
        what the caller's key may use."""
        tenant = (self.admission.authenticate(request.scope["headers"])
                  if self.admission is not None else None)
        features = set(request.query_params.getlist("feature")) or {"TextGeneration"}
        selectors = [parse_header_selector(v)
                     for v in request.headers.getlist("x-label-selector")]
        data = []
        for model in self.registry.models():
            if not features & set(model.spec.features):
                continue
            if not all(matches(s, model.labels) for s in selectors):
                continue
            entries = [_model_entry(model.name, model, splits=model.spec.splits)]
            entries += [_model_entry(join_model_adapter(model.name, a.name), model, model.name,
                                     a.splits) for a in model.spec.adapters]
            data += [e for e in entries if tenant is None or tenant.allows(e["id"], model)]
        return Response(orjson.dumps({"object": "list", "data": data}),
                        media_type="application/json")


def _model_entry(name: str, model: Any, parent: str | None = None,
                 splits: tuple[Any, ...] = ()) -> dict[str, Any]:
    entry = {"id": name, "object": "model", "created": int(time.time()),
             "owned_by": model.spec.owner or "kvgate", "features": list(model.spec.features)}
    if parent:
        entry["parent"] = parent
    if splits:  # canary routing: the share of this name's requests that another name serves
        entry["splits"] = [{"to": s.to, "weight": s.weight} for s in splits]
    return entry


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {404: f"Unknown path {request.url.path}.",
               405: f"Method {request.method} is not allowed here."}.get(exc.status_code,
                                                                         str(exc.detail))
    return Response(error_body(exc.status_code, message), exc.status_code,
                    headers=exc.headers, media_type="application/json")


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return Response(exc.body(), exc.status, headers=exc.headers, media_type="application/json")
