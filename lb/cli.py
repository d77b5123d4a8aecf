"""The ``kvgate`` command.

``kvgate gateway -c config.yaml`` runs the gateway alone in static-endpoints mode: models and
their replicas' addresses come from the config file, in front of any OpenAI-compatible servers.
``kvgate sim ...`` runs simulated vLLM replicas (see ``kvgate sim --help``).
``kvgate serve`` runs the gateway and the Kubernetes operator in one process (in a cluster).
``kvgate up -f models.yaml`` runs the gateway and local model servers; ``kvgate status`` shows them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import socket
import sys
from typing import Sequence

from lb.app import Gateway
from lb.config import Config, ConfigError, load_config
from lb.registry import Registry
from lb.ring import LoadTable
from lb.server import bind, install_uvloop, run_workers, serve, tune_gc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvgate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gateway = commands.add_parser(
        "gateway", help="run the gateway in front of static endpoints (no operator)",
        description="Run the OpenAI-compatible gateway with models and endpoints from a config "
                    "file.")
    gateway.add_argument("-c", "--config", help="system config YAML (models, endpoints, limits)")
    gateway.add_argument("--host", help="listen address (overrides server.host)")
    gateway.add_argument("--port", type=int, help="listen port (overrides server.port)")
    gateway.add_argument("--metrics-port", type=int,
                         help="metrics port (overrides server.metricsPort; 0 disables)")
    gateway.add_argument("--workers", type=_positive, default=1,
                         help="worker processes sharing the port and the ring's load table "
                              "(default 1)")
    commands.add_parser("sim", help="run simulated vLLM replicas", add_help=False)
    commands.add_parser("serve", help="gateway + Kubernetes operator in one process",
                        add_help=False)
    commands.add_parser("up", help="gateway + local model servers from a models file",
                        add_help=False)
    commands.add_parser("status", help="what the running `kvgate up` serves", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from lb_operator.serve import main as serve_main  # the control plane, loaded lazily

        return serve_main(argv[1:])
    if argv[:1] in (["up"], ["status"]):
        from lb_operator.local_cli import main as local_main  # the control plane, loaded lazily

        return local_main(argv)
    if argv[:1] == ["sim"]:
        from kvgate_sim.cli import main as sim_main  # the simulator engine, loaded lazily

        return sim_main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = _with_overrides(load_config(args.config), args)
        return run_gateway(config, args.workers)
    except (ConfigError, OSError) as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 2


def _with_overrides(config: Config, args: argparse.Namespace) -> Config:
    server = config.server
    changes = {"host": args.host, "port": args.port, "metrics_port": args.metrics_port}
    server = dataclasses.replace(server, **{k: v for k, v in changes.items() if v is not None})
    return dataclasses.replace(config, server=server)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def static_registry(config: Config, loads: LoadTable | None = None) -> Registry:
    registry = Registry(loads)
    for model in config.models:
        registry.set_model(model)
        registry.set_endpoints(model.name, config.static_endpoints(model.name))
    return registry


def run_gateway(config: Config, workers: int = 1) -> int:
    if workers > 1:
        return _run_workers(config, workers)
    server = config.server
    sock = bind(server.host, server.port)
    metrics_sock = bind(server.host, server.metrics_port) if server.metrics_port else None
    install_uvloop()
    gateway = Gateway(config, static_registry(config))
    print(f"kvgate: serving the OpenAI API on http://{server.host}:{server.port}/v1 "
          f"({len(config.models)} models)", flush=True)
    tune_gc()
    asyncio.run(serve(gateway, sock, metrics_sock))
    return 0


def _run_workers(config: Config, workers: int) -> int:
    """N processes, one port, one shared in-flight table: bounded loads hold across them."""
    server = config.server
    loads = LoadTable()

    def worker(index: int, sock: socket.socket, metrics_sock: socket.socket | None) -> None:
        install_uvloop()
        gateway = Gateway(config, static_registry(config, loads))
        gateway.metrics.share_active(loads)
        tune_gc()
        asyncio.run(serve(gateway, sock, metrics_sock))

    print(f"kvgate: serving the OpenAI API on http://{server.host}:{server.port}/v1 "
          f"({len(config.models)} models, {workers} workers)", flush=True)
    return run_workers(workers, server.host, server.port, server.metrics_port, worker)


if __name__ == "__main__":
    sys.exit(main())
