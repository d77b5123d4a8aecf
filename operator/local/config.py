"""Settings of the local runtime (`kvgate up`): the `local:` key of the config file.

Kept apart from the cluster's SystemConfig because nothing here means anything in a cluster:
where state and logs go, how long a process gets to stop, and which command line runs each
engine on this machine. Engine entries are merged field by field over the built-in templates
(see local_engines), so overriding only `command` keeps the engine's health path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lb.config import ConfigError, _build
from lb.model import ENGINES


@dataclass(frozen=True, slots=True)
class LocalEngine:
    """How to run one engine as a local process. Empty fields mean "use the built-in value".

    `command` and `setup` are argument lists with placeholders: {python} (this interpreter),
    {host}, {port}, {name} (the served model name), {model} (the model's location: a hub id,
    a local path) and {state} (the replica's state directory).
    """

    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    health_path: str = ""  # polled until it answers 200; then the replica is ready
    setup: tuple[tuple[str, ...], ...] = ()  # run in order once the server is healthy (ollama pull)
    requires: tuple[str, ...] = ()  # Python modules the command needs, checked before starting


@dataclass(frozen=True, slots=True)
class LocalConfig:
    state_dir: str = ".kvgate"  # status file and per-replica logs; relative to the working dir
    replica_host: str = "127.0.0.1"  # where replicas listen; the gateway reaches them there
    grace_period_seconds: float = 10.0  # SIGTERM, then SIGKILL after this long
    startup_timeout_seconds: float = 1800.0  # loading large weights can take many minutes
    health_period_seconds: float = 5.0  # readiness re-check once a replica is up
    restart_backoff_seconds: float = 0.5  # first delay after a crash, doubled per crash
    max_restart_backoff_seconds: float = 60.0
    reload_interval_seconds: float = 1.0  # how often the models file's mtime is checked
    engines: dict[str, LocalEngine] = field(default_factory=dict)


def local_config_from_dict(data: Any) -> LocalConfig:
    """Build and validate the `local:` section; ConfigError names the bad key."""
    config: LocalConfig = _build(LocalConfig, data if data is not None else {}, "local")
    for engine in config.engines:
        if engine not in ENGINES:
            raise ConfigError(f"local.engines.{engine}: unknown engine (known: {', '.join(ENGINES)})")
    checks = [
        (config.grace_period_seconds >= 0, "gracePeriodSeconds: must be >= 0"),
        (config.startup_timeout_seconds > 0, "startupTimeoutSeconds: must be > 0"),
        (config.health_period_seconds > 0, "healthPeriodSeconds: must be > 0"),
        (config.restart_backoff_seconds > 0, "restartBackoffSeconds: must be > 0"),
        (config.max_restart_backoff_seconds >= config.restart_backoff_seconds,
         "maxRestartBackoffSeconds: must be >= restartBackoffSeconds"),
        (config.reload_interval_seconds > 0, "reloadIntervalSeconds: must be > 0"),
        (bool(config.state_dir), "stateDir: must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"local.{message}")
    return config
