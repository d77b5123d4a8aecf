"""`kvgate serve`: the gateway and the Kubernetes operator in one process (one per replica).

This module binds the sockets, loads the API credentials, builds the `Gateway` and the
`ClusterOperator` (`lb_operator.kube.manager`) on one registry, and stops both on a signal so the
Lease is released. Namespace-scoped like KubeAI: by default the Pod's own namespace (or the
kubeconfig context's); ``--namespace a,b`` (or repeated) manages several, with the Lease in the
first; a Model name used in several belongs to the oldest Model (`lb_operator.kube.names`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import socket
import sys

from lb.app import Gateway
from lb.config import Config, ConfigError
from lb.keys import check_keys
from lb.registry import Registry
from lb.server import install_uvloop, serve
from lb_operator.kube.autoscaling import DEFAULT_GATEWAY_SELECTOR
from lb_operator.kube.client import KubeApi, default_namespace, load_api_client
from lb_operator.kube.leader import DEFAULT_LEASE_NAME
from lb_operator.kube.manager import ClusterOperator, ClusterOptions

from kvgate.process import add_listen_args, bind_listeners, log_to_stderr
from kvgate.settings import Settings, load_settings, with_listen_args

log = logging.getLogger("kvgate.serve")


def add_parser(commands: argparse._SubParsersAction, name: str, help_text: str) -> None:
    """The `serve` subcommand of the `kvgate` parser."""
    parser = commands.add_parser(
        name, help=help_text,
        description="Run the gateway and the Kubernetes operator in one process (in-cluster "
                    "service account, or a kubeconfig outside a cluster).")
    parser.add_argument("-c", "--config", help="config YAML (gateway keys and system config keys)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then "
                                             "$KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="namespace to manage; repeat or comma-separate for several; a "
                             "Model name used in several is served from the oldest Model, ties "
                             "going to the namespace given first (default: the Pod's or the "
                             "context's namespace)")
    parser.add_argument("--lease-name", default=DEFAULT_LEASE_NAME, help="leader election Lease")
    parser.add_argument("--identity", help="leader election identity (default: host name + suffix)")
    add_listen_args(parser)
    parser.add_argument("--gateway-selector", default=DEFAULT_GATEWAY_SELECTOR,
                        help="label selector of this deployment's Pods, whose metrics ports the "
                             "autoscaler scrapes (default: %(default)s)")
    parser.set_defaults(run=main)


def main(args: argparse.Namespace) -> int:
    log_to_stderr()
    try:
        loaded = load_settings(args.config)
        settings = dataclasses.replace(loaded, gateway=_gateway_config(loaded.gateway, args))
        server = settings.gateway.server
        options = ClusterOptions(namespaces=_namespaces(args), lease_name=args.lease_name,
                                 identity=args.identity, gateway_selector=args.gateway_selector,
                                 metrics_port=server.metrics_port or None)
        check_keys(settings.gateway.api_keys)
        sock, metrics_sock = bind_listeners(server)
    except (ConfigError, OSError) as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 2
    install_uvloop()
    print(f"kvgate: serving the OpenAI API on http://{server.host}:{server.port}/v1, "
          f"managing Models in {', '.join(options.namespaces)}", flush=True)
    asyncio.run(run_serve(settings, options, args, sock, metrics_sock))
    return 0


def _namespaces(args: argparse.Namespace) -> tuple[str, ...]:
    names = [n.strip() for value in args.namespace for n in value.split(",") if n.strip()]
    if not names:
        names = [default_namespace(args.kubeconfig, args.context)]
    return tuple(dict.fromkeys(names))


def _gateway_config(config: Config, args: argparse.Namespace) -> Config:
    if config.models:
        log.warning("serve: the %d models of the config file are ignored; Models come from the "
                    "cluster", len(config.models))
    return dataclasses.replace(with_listen_args(config, args), models=(), endpoints={})


async def run_serve(settings: Settings, options: ClusterOptions, args: argparse.Namespace,
                    sock: socket.socket, metrics_sock: socket.socket | None) -> None:
    client = await load_api_client(args.kubeconfig, args.context)
    async with client:
        registry = Registry()
        operator = ClusterOperator(KubeApi(client), registry, settings.system, options)
        gateway = Gateway(settings.gateway, registry, operator.scaler)
        operator.metrics = gateway.metrics.registry  # the autoscaler's metrics on /metrics too
        task = asyncio.create_task(operator.run())
        serving = asyncio.create_task(serve(gateway, sock, metrics_sock))
        _stop_on_signals(serving)
        try:
            await asyncio.gather(serving, return_exceptions=True)
        finally:
            task.cancel()  # the elector releases the Lease on its way out
            await asyncio.gather(task, return_exceptions=True)


def _stop_on_signals(serving: asyncio.Task[None]) -> None:
    """SIGTERM/SIGINT stop the server gracefully, then the operator (which releases the Lease).

    uvicorn handles the signal while it serves but raises it again once it has shut down; with a
    loop handler installed that second delivery lands here instead of killing the process before
    the Lease is released.
    """
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, serving.cancel)
