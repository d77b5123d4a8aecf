"""Requests through the gateway's own ASGI app, in this process: how offline work (the batch
runner's lines, the messenger's messages) is sent as if a client had sent it, without a socket
or a loopback connection, so routing, retries and scale-from-zero apply to it, in the lowest
priority class so that it fills the capacity interactive requests leave.

The scope carries the lost-connection hook that kvgate's server offers (``DISCONNECT_HOOK``),
so a runner can end a request the way a client ends one by hanging up (``Abort``): the proxy
releases its replica and counts a disconnect, not an error.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from lb.flow_queue import LOWEST, PRIORITY
from lb.proxy import DISCONNECT_HOOK, TENANT

App = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[None]]


@dataclass(slots=True)
class Reply:
    """What the app answered: its status (0: aborted before it answered), headers and body."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    complete: bool = False  # the last body message came (a replica may break off mid-body)

    def header(self, name: bytes) -> str:
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return ""


class Abort:
    """Lets the runner end requests in flight the way a client does by hanging up: the proxy
    registers its lost-connection callback (``DISCONNECT_HOOK``) here, so an aborted request
    releases its replica and is counted as a client disconnect, not as an error."""

    __slots__ = ("_callbacks",)

    def __init__(self) -> None:
        self._callbacks: dict[int, Callable[[], None]] = {}

    def hook(self, key: int) -> Callable[[Callable[[], None] | None], None]:
        def register(callback: Callable[[], None] | None) -> None:
            if callback is None:
                self._callbacks.pop(key, None)
            else:
                self._callbacks[key] = callback
        return register

    def fire(self) -> None:
        for callback in list(self._callbacks.values()):
            callback()
        self._callbacks.clear()


async def call_app(app: App, path: str, body: bytes, headers: list[tuple[bytes, bytes]],
                   abort: Abort | None = None, tenant: Any = None) -> Reply:
    """One POST through an ASGI app in this process, in the lowest priority class; the whole answer (status 0 if it was
    aborted before one came)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "client": None, "server": None,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), *headers]}
    if abort is not None:
        scope[DISCONNECT_HOOK] = abort.hook(id(scope))
    if tenant is not None:  # API keys on: the line runs under the key that made its batch
        scope[TENANT] = tenant
    scope[PRIORITY] = LOWEST  # offline work fills the room interactive requests leave
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Future()  # the "client" never goes away: park until cancelled
        raise AssertionError("unreachable")

    reply = Reply()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            reply.chunks.append(message.get("body", b""))
            reply.complete = not message.get("more_body", False)

    await app(scope, receive, send)
    return reply
