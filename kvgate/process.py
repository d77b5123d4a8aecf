"""What every kvgate process does alike: its log format, its listen options, its sockets."""

from __future__ import annotations

import argparse
import logging
import socket

from lb.config import ServerConfig
from lb.server import bind


def log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_listen_args(parser: argparse.ArgumentParser) -> None:
    """`--host`, `--port`, `--metrics-port`, `--access-log`: read back by `kvgate.settings.with_listen_args`."""
    parser.add_argument("--host", help="listen address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides server.port)")
    parser.add_argument("--metrics-port", type=int,
                        help="metrics port (overrides server.metricsPort; 0 disables)")
    parser.add_argument("--access-log", action="store_true", default=None,
                        help="log one line per request to stdout (overrides server.accessLog; "
                             "off by default)")


def bind_listeners(server: ServerConfig) -> tuple[socket.socket, socket.socket | None]:
    """The API socket and the metrics one (None when disabled), bound before anything starts so a
    busy port fails fast; neither is left open when the other cannot be bound."""
    sock = bind(server.host, server.port)
    try:
        metrics_sock = bind(server.host, server.metrics_port) if server.metrics_port else None
    except OSError:
        sock.close()
        raise
    return sock, metrics_sock
