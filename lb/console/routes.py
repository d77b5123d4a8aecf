"""The console's routes: the page at ``/ui/`` and its JSON API under ``/ui/api/``.

The page (HTML, JS, CSS shipped in the package: no build step, nothing fetched from elsewhere)
holds no data, so it is served to anyone; with API keys on, its API needs a key named in
``console.adminKeys`` (401 without a valid key, 403 with another), which the page asks for and
sends as a bearer token, as the playground does to ``/v1/chat/completions``. The files are read
once, at start: serving them does no disk I/O on the event loop.
"""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any, Callable, Iterable

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from lb.admission import Admission
from lb.console.config import ConsoleConfig
from lb.console.sampler import Sampler
from lb.console.status import StatusSource, ring_document
from lb.console.window import SharedWindow
from lb.errors import GatewayError
from lb.metrics import GatewayMetrics
from lb.registry import Registry

PREFIX = "/ui"
STATIC = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript",
          "console.css": "text/css"}
_NO_STORE = {"cache-control": "no-store"}


class Console:
    """The console of one gateway process. Routes exist only when ``config.enabled``."""

    def __init__(self, config: ConsoleConfig, registry: Registry, metrics: GatewayMetrics,
                 waiting: Callable[[str], int], admission: Admission | None,
                 engine_stale_after: float) -> None:
        self.config = config
        self._registry = registry
        self._metrics = metrics
        self._waiting = waiting
        self._admission = admission
        self._window: SharedWindow | None = None
        self._worker = 0
        self.source = StatusSource(registry, lambda: self._window, config.window_seconds,
                                   engine_stale_after, lambda: self._window.workers
                                   if self._window is not None else 1)
        self._files: dict[str, bytes] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.config.enabled)

    def share(self, window: SharedWindow, worker: int) -> None:
        """Count into ``window`` (shared with the other workers) as worker ``worker``; call
        before serving. Without it a process keeps a window of its own."""
        self._window, self._worker = window, worker

    def set_control(self, status: Callable[[], dict[str, Any]]) -> None:
        """What the control plane running the replicas knows (see ``StatusSource``)."""
        self.source.control = status

    def routes(self) -> list[Route]:
        if not self.enabled:
            return []
        root = resources.files("lb.console") / "static"
        self._files = {name: (root / name).read_bytes() for name in STATIC}
        return [Route(PREFIX, self._home), Route(PREFIX + "/", self._page),
                Route(PREFIX + "/api/status", self._status),
                Route(PREFIX + "/api/ring", self._ring),
                Route(PREFIX + "/{name}", self._static)]

    def start(self, loop: asyncio.AbstractEventLoop) -> Iterable[asyncio.Task[None]]:
        """The sampler, when the console is on (off: nothing runs)."""
        if not self.enabled:
            return ()
        if self._window is None:
            self._window = SharedWindow(1, window_seconds=self.config.window_seconds)
        sampler = Sampler(self._window, self._worker, self._metrics, self._waiting,
                          lambda: [m.name for m in self._registry.models()])
        return (loop.create_task(sampler.run()),)

    # -- handlers ------------------------------------------------------------------------------

    async def _home(self, request: Request) -> Response:
        return RedirectResponse(PREFIX + "/", 308)

    async def _page(self, request: Request) -> Response:
        return self._file("index.html")

    async def _static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise GatewayError(404, f"Unknown path {request.url.path}.", code="not_found")
        return self._file(name)

    def _file(self, name: str) -> Response:
        return Response(self._files[name], media_type=STATIC[name], headers=_NO_STORE)

    async def _status(self, request: Request) -> Response:
        self._authorize(request)
        return _json(self.source.status())

    async def _ring(self, request: Request) -> Response:
        self._authorize(request)
        name = request.query_params.get("model")
        if not name:
            raise GatewayError(400, "Say which model's ring: `?model=<name>`.",
                               code="missing_model", param="model")
        model = self._registry.get_model(name)
        if model is None:
            raise GatewayError(404, f"The model `{name}` does not exist.",
                               code="model_not_found", param="model")
        return _json(ring_document(self._registry, model))

    def _authorize(self, request: Request) -> None:
        """With API keys on: a valid key (401), named in ``console.adminKeys`` (403)."""
        if self._admission is None:
            return
        tenant = self._admission.authenticate(request.scope["headers"])
        if tenant.name not in self.config.admin_keys:
            raise GatewayError(403, f"The API key `{tenant.name}` may not read the console; "
                               "list it under console.adminKeys.", code="not_console_admin")


def _json(doc: object) -> Response:
    return Response(orjson.dumps(doc), media_type="application/json", headers=_NO_STORE)
