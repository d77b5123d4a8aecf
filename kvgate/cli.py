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
import importlib
import importlib.metadata
import os
import socket
import sys
from typing import Sequence

from lb.app import Gateway
from lb.config import Config, ConfigError, load_config, static_registry
from lb.console.window import SharedWindow
from lb.keys import check_keys
from lb.limits import LimitTable
from lb.ring import LoadTable
from lb.server import install_uvloop, run_workers, serve, tune_gc

from kvgate import keys_cli
from kvgate.process import add_listen_args, bind_listeners, log_to_stderr
from kvgate.settings import with_listen_args

# The control plane's commands: (module with `add_parser(commands, name, help)`, help). A module
# is imported only when its command runs: `kvgate gateway` loads neither runtime.
OPERATOR_COMMANDS = {
    "serve": ("kvgate.serve", "gateway + Kubernetes operator in one process"),
    "up": ("kvgate.up", "gateway + local model servers from a models file"),
    "status": ("kvgate.up", "models, replicas, endpoints and load of the running `kvgate up`"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["sim"]:
            return _sim(argv[1:])
        args = build_parser(argv[0] if argv else None).parse_args(argv)
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe could not be caught
        return code
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """stdout's reader left (`kvgate status | head -1`): exit quietly, as a shell tool does.
    stdout is pointed at /dev/null so the interpreter's final flush fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141  # 128 + SIGPIPE, what a tool killed by the signal reports


DESCRIPTION = """\
An OpenAI-compatible LLM inference gateway with prefix-aware routing, and a model
operator that runs Models as model servers in Kubernetes or on this machine."""
EPILOG = """\
examples:
  kvgate up -f models.yaml       gateway + local model servers (`kvgate status` shows them)
  kvgate gateway -c config.yaml  the gateway alone, in front of static endpoints
  kvgate serve -c config.yaml    gateway + Kubernetes operator
  kvgate keys create team-a --model 'llama-*' --rpm 60   an API key (apiKeys.enabled)
  kvgate sim --help              simulated vLLM replicas

`kvgate COMMAND --help` describes a command's options."""


def version() -> str:
    """The installed package's version (its metadata), or "unknown" when run from a bare tree."""
    try:
        return importlib.metadata.version("kvgate")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the full sub-parser of an operator command only when `command` is it."""
    parser = argparse.ArgumentParser(prog="kvgate", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvgate {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_gateway(commands)
    keys_cli.add_parser(commands)
    commands.add_parser("sim", help="run simulated vLLM replicas", add_help=False)
    for name, (module, help_text) in OPERATOR_COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(commands, name, help_text)
        else:
            commands.add_parser(name, help=help_text)
    return parser


def _sim(argv: list[str]) -> int:
    """The simulator parses its own arguments (`kvgate sim --help`)."""
    from kvgate_sim.cli import main as sim_main

    return sim_main(argv)


def _add_gateway(commands: argparse._SubParsersAction) -> None:
    gateway = commands.add_parser(
        "gateway", help="run the gateway in front of static endpoints (no operator)",
        description="Run the OpenAI-compatible gateway with models and endpoints from a config "
                    "file.")
    gateway.add_argument("-c", "--config", help="system config YAML (models, endpoints, limits)")
    add_listen_args(gateway)
    gateway.add_argument("--workers", type=_positive, default=1,
                         help="worker processes sharing the port and the ring's load table "
                              "(default 1)")
    gateway.set_defaults(run=_main_gateway)


def _main_gateway(args: argparse.Namespace) -> int:
    log_to_stderr()
    try:
        config = with_listen_args(load_config(args.config), args)
        check_keys(config.api_keys)
        return run_gateway(config, args.workers)
    except (ConfigError, OSError) as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 2


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run_gateway(config: Config, workers: int = 1) -> int:
    if workers > 1:
        return _run_workers(config, workers)
    server = config.server
    sock, metrics_sock = bind_listeners(server)
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
    # API keys' limits, shared by the workers as the loads are.
    limits = LimitTable() if config.api_keys.enabled else None
    # The console's traffic figures, summed over the workers as the loads are.
    window = (SharedWindow(workers, window_seconds=config.console.window_seconds)
              if config.console.enabled else None)

    def worker(index: int, sock: socket.socket, metrics_sock: socket.socket | None) -> None:
        install_uvloop()
        gateway = Gateway(config, static_registry(config, loads), limits=limits)
        gateway.metrics.share_active(loads)
        if window is not None:
            gateway.console.share(window, index)
        for model in config.models:  # every worker exports every model's shared gauge, even
            gateway.metrics.active_gauge(model.name)  # one it has served no request of yet
        tune_gc()
        asyncio.run(serve(gateway, sock, metrics_sock))

    print(f"kvgate: serving the OpenAI API on http://{server.host}:{server.port}/v1 "
          f"({len(config.models)} models, {workers} workers)", flush=True)
    return run_workers(workers, server.host, server.port, server.metrics_port, worker)
