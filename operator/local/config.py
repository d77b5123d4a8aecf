"""Settings of the local runtime (`kvgate up`): the `local:` key of the config file.

Kept apart from the cluster's SystemConfig because nothing here means anything in a cluster:
where state and logs go, how long a process gets to stop, and which command line runs each
engine on this machine. Engine entries are merged field by field over the built-in templates
(see local_engines), so overriding only `command` keeps the engine's health path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lb.config import ConfigError
from lb.model import ENGINES
from lb.schema import decode_object, setting


@dataclass(frozen=True, slots=True)
class LocalEngine:
    """How to run one engine as a local process. Empty fields mean "use the built-in value".

    `command` and `setup` are argument lists with placeholders: {python} (`python` if set, else
    this interpreter), {host}, {port}, {name} (the served model name), {model} (the model's
    location: a hub id, a local path) and {state} (the replica's state directory).

    `python` exists because real engines pin their own torch, transformers and numpy, which
    cannot share kvgate's environment (nor each other's): each gets a virtualenv of its own
    (`make engines` puts them under `.kvgate/engines/<engine>`) and names its interpreter here.
    """

    command: tuple[str, ...] = ()
    python: str = ""  # the interpreter {python} stands for; relative to the working directory
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = ""  # polled until it answers 200; then the replica is ready
    setup: tuple[tuple[str, ...], ...] = ()  # run in order once the server is healthy (ollama pull)
    requires: tuple[str, ...] = ()  # Python modules the command needs, checked before starting


@dataclass(frozen=True, slots=True)
class LocalConfig:
    state_dir: str = setting(".kvgate", doc="Status file and per-replica logs; relative to the working directory.",
                             min_length=1)
    replica_host: str = setting("127.0.0.1", doc="Where replicas listen; the gateway reaches them there.")
    grace_period_seconds: float = setting(10.0, doc="SIGTERM, then SIGKILL after this long.", minimum=0)
    startup_timeout_seconds: float = setting(1800.0, doc="How long a replica may take to become healthy "
                                             "(loading large weights can take many minutes).", exclusive_minimum=0)
    health_period_seconds: float = setting(5.0, doc="Readiness re-check once a replica is up.", exclusive_minimum=0)
    restart_backoff_seconds: float = setting(0.5, doc="First delay after a crash, doubled per crash.",
                                             exclusive_minimum=0)
    max_restart_backoff_seconds: float = setting(60.0, doc="Longest delay between restarts.", exclusive_minimum=0)
    reload_interval_seconds: float = setting(1.0, doc="How often the models file's mtime is checked.",
                                             exclusive_minimum=0)
    engines: dict[str, LocalEngine] = setting(factory=dict, doc="Per-engine overrides of the built-in command lines.")


def local_config_from_dict(data: Any) -> LocalConfig:
    """Decode and validate the `local:` section; ConfigError names the bad key."""
    config = decode_object(LocalConfig, data if data is not None else {}, "local")
    for engine in config.engines:
        if engine not in ENGINES:
            raise ConfigError(("local", "engines", engine), f"unknown engine (known: {', '.join(ENGINES)})")
    if config.max_restart_backoff_seconds < config.restart_backoff_seconds:
        raise ConfigError("local.maxRestartBackoffSeconds", "must be >= restartBackoffSeconds")
    return config
