"""List + watch: a local, always-converging copy of one kind of object, with change callbacks.

``Informer`` keeps ``items`` (namespace/name -> object, the API's JSON) in step with the API
server the way client-go's reflector does:

- it lists once, then watches from the list's resourceVersion with ``kubernetes_asyncio``'s
  ``Watch`` (server-side ``timeoutSeconds`` so a quiet stream is renewed now and then, and
  bookmarks so the resume point stays fresh);
- a stream that ends or drops (a cut connection, a half-written event) resumes from the last
  resourceVersion it saw, so nothing is missed and nothing is listed again;
- ``410 Gone`` (the resume point was compacted away) means events were lost: it lists again and
  reports the difference, deletions included, as events;
- any other error (5xx, connection refused, timeouts) backs off exponentially with jitter,
  then resumes. The backoff counts consecutive failures only: a watch that ends cleanly, that
  delivered events or bookmarks, or that lived ``healthy_after`` seconds was a healthy one, and
  the next outage starts again from the shortest delay (otherwise one outage would slow the
  recovery from every later one, leaving Model changes unseen for the longest delay).

Handlers are plain functions ``handler(event_type, obj)`` with event types ADDED, MODIFIED and
DELETED; they run on the event loop for every change and must be quick (enqueue, update a dict).
A relist reports objects that changed or vanished while the informer was not watching.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

import aiohttp
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

from lb_operator.kube.client import api_error_text
from lb_operator.retry import Backoff

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Handler = Callable[[str, Obj], None]
Lister = Callable[..., Awaitable[Any]]

# What a watch can fail with besides an ApiException: the connection (refused, reset, cut mid
# chunk), a client-side timeout, or a line that is not JSON.
TRANSIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError)


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Informer:
    """A watched collection. ``list_call(**params)`` is the namespaced list method to call
    (typed or custom-object; it gets ``watch=True`` for the stream), ``lister`` the list call
    returning a JSON dict (defaults to ``list_call``)."""

    def __init__(self, name: str, list_call: Lister, *, label_selector: str | None = None,
                 lister: Lister | None = None, watch_timeout: int = 300,
                 backoff: Backoff = Backoff(), healthy_after: float = 30.0) -> None:
        self.name = name
        self._list_call = list_call
        self._lister = lister or list_call
        self._selector = label_selector
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self._healthy_after = healthy_after
        self.failures = 0  # consecutive failed attempts, what the next delay grows with
        self.received = 0  # watch events (bookmarks included) taken from the server
        self.items: dict[str, Obj] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()
        self.relists = 0
        self.resumes = 0
        self._handlers: list[Handler] = []

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def remove_handler(self, handler: Handler) -> None:
        if handler in self._handlers:
            self._handlers.remove(handler)

    async def run(self) -> None:
        """List and watch until cancelled."""
        while True:
            started, received = time.monotonic(), self.received
            try:
                if self.resource_version is None:
                    await self._relist()
                await self._watch()
                self.failures = 0
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s: resume point expired (410), listing again", self.name)
                    self.resource_version = None
                    continue
                await self._failed(started, received, api_error_text(exc))
            except TRANSIENT_ERRORS as exc:
                await self._failed(started, received, f"{type(exc).__name__}: {exc}")

    async def _failed(self, started: float, received: int, why: str) -> None:
        """Back off after a failed attempt; one that had been watching healthily first starts
        a new count, so a second outage is met with the shortest delay again."""
        if self.received > received or time.monotonic() - started >= self._healthy_after:
            self.failures = 0
        self.failures += 1
        await self._pause(self.failures, why)

    async def _pause(self, failures: int, why: str) -> None:
        delay = self._backoff.delay(failures)
        log.warning("%s: %s; retrying in %.2fs", self.name, why, delay)
        await asyncio.sleep(delay)

    async def _relist(self) -> None:
        params = {"label_selector": self._selector} if self._selector else {}
        listed = await self._lister(**params)
        self.relists += 1
        fresh = {object_key(obj): obj for obj in listed.get("items") or ()}
        old, self.items = self.items, fresh
        self.resource_version = (listed.get("metadata") or {}).get("resourceVersion")
        for key, obj in old.items():
            if key not in fresh:
                self._notify("DELETED", obj)
        for key, obj in fresh.items():
            before = old.get(key)
            if before is None:
                self._notify("ADDED", obj)
            elif _rv(before) != _rv(obj):
                self._notify("MODIFIED", obj)
        self.synced.set()

    async def _watch(self) -> None:
        """One watch request, from the last resourceVersion until the server ends it."""
        params: dict[str, Any] = {"resource_version": self.resource_version,
                                  "timeout_seconds": self._watch_timeout,
                                  "allow_watch_bookmarks": True}
        if self._selector:
            params["label_selector"] = self._selector
        self.resumes += 1
        stream = watch.Watch(return_type="object")
        try:
            async for event in stream.stream(self._list_call, **params):
                if not isinstance(event, dict):  # the Watch hands back lines it cannot parse
                    raise ValueError(f"malformed watch event: {str(event)[:80]!r}")
                self.received += 1
                self._apply(event["type"], event["raw_object"])
        finally:
            await stream.close()

    def _apply(self, etype: str, obj: Obj) -> None:
        version = _rv(obj)
        if etype == "BOOKMARK":
            self.resource_version = version or self.resource_version
            return
        key = object_key(obj)
        if etype == "DELETED":
            self.items.pop(key, None)
        else:
            self.items[key] = obj
        self.resource_version = version or self.resource_version
        self._notify(etype, obj)

    def _notify(self, etype: str, obj: Obj) -> None:
        for handler in list(self._handlers):
            try:
                handler(etype, obj)
            except Exception:  # one broken handler must not stop the stream for the others
                log.exception("%s: handler failed on %s %s", self.name, etype, object_key(obj))


def _rv(obj: Obj) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")
