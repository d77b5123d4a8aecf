"""The engine flag that makes a replica publish its KV-cache events where the gateway follows
them (``spec.loadBalancing.cacheAware.kvEvents``): vLLM's ``--kv-events-config``, which the
simulator takes too. Both runtimes add it, so a Model declares its ports once.

In Kubernetes every Pod has its own address and publishes on the Model's ports (rank 0); in
local mode replicas share one host, so replica rank i publishes on the ports + i, and its
endpoint tells the gateway so (``Endpoint.kv_port_offset``), as vLLM's data-parallel ranks
offset theirs.
"""

from __future__ import annotations

import json

from lb.model import Model

__all__ = ["kv_events_args", "FLAG"]

FLAG = "--kv-events-config"
_ENGINES = frozenset({"VLLM", "Sim"})  # the engines that publish vLLM's KV events


def kv_events_args(model: Model, rank: int = 0) -> list[str]:
    """``[FLAG, json]`` for a replica of ``model``, or nothing: no kvEvents, an engine that
    does not publish, or a flag the Model's own args already give (theirs wins)."""
    events = model.spec.load_balancing.cache_aware.kv_events
    if events is None or model.spec.engine not in _ENGINES:
        return []
    if any(arg == FLAG or arg.startswith(FLAG + "=") for arg in model.spec.args):
        return []
    config = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": f"tcp://*:{events.port + rank}", "topic": events.topic}
    if events.replay_port:
        config["replay_endpoint"] = f"tcp://*:{events.replay_port + rank}"
    return [FLAG, json.dumps(config, separators=(",", ":"))]
