"""Running a Gateway under uvicorn (uvloop + httptools), with metrics on a second port.

Both listeners share one event loop. ``serve`` accepts pre-bound sockets so tests and the
benchmark can use ephemeral ports without races.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from lb.app import Gateway

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn(app: object, log_level: str, lifespan: str) -> uvicorn.Server:
    config = uvicorn.Config(app, loop="none", http="httptools", lifespan=lifespan, interface="asgi3",
                            access_log=False, log_level=log_level, server_header=False,
                            date_header=False, proxy_headers=False,
                            timeout_keep_alive=75,
                            timeout_graceful_shutdown=30)
    return uvicorn.Server(config)


async def serve(gateway: Gateway, sock: socket.socket,
                metrics_sock: socket.socket | None = None,
                started: asyncio.Event | None = None) -> None:
    """Serve until cancelled or signalled; in-flight requests get a graceful shutdown."""
    main = _uvicorn(gateway, gateway.config.server.log_level, "on")
    servers = [main]
    if metrics_sock is not None:
        servers.append(_uvicorn(gateway.metrics_app, "warning", "off"))
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
