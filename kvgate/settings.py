"""One config file for a whole kvgate process: the gateway's keys and the operator's, side by side.

``kvgate serve`` (cluster) and ``kvgate up`` (local) run both planes in one process, and users
(and the helm chart) write one flat YAML file, as with KubeAI's system config. Each plane keeps
its own loader and validation; this module only splits the top-level keys between them, so a key
that belongs to neither is reported instead of silently ignored. `local:` holds the local
runtime's settings (state directory, engine command lines); a cluster ignores it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from lb.config import Config, ConfigError, config_from_dict
from lb.schema import keys_of, read_yaml, unknown_key
from lb_operator.local.config import LocalConfig, local_config_from_dict
from lb_operator.system_config import SystemConfig, system_config_from_dict

GATEWAY_KEYS = keys_of(Config)
SYSTEM_KEYS = keys_of(SystemConfig)
LOCAL_KEY = "local"


@dataclass(frozen=True, slots=True)
class Settings:
    gateway: Config = field(default_factory=Config)
    system: SystemConfig = field(default_factory=lambda: system_config_from_dict({}))
    local: LocalConfig = field(default_factory=LocalConfig)


def load_settings(path: str | Path | None) -> Settings:
    """Read one YAML file into both planes' configs; None gives the defaults."""
    return settings_from_dict({}) if path is None else read_yaml(path, settings_from_dict)


def with_listen_args(config: Config, args: argparse.Namespace) -> Config:
    """The gateway config with `--host`, `--port`, `--metrics-port` and `--access-log` (when
    given) over the file's."""
    changes = {"host": args.host, "port": args.port, "metrics_port": args.metrics_port,
               "access_log": getattr(args, "access_log", None)}
    server = dataclasses.replace(config.server, **{k: v for k, v in changes.items() if v is not None})
    return dataclasses.replace(config, server=server)


def settings_from_dict(data: Any) -> Settings:
    if not isinstance(data, dict):
        raise ConfigError((), "the config must be a mapping")
    unknown = sorted(set(data) - GATEWAY_KEYS - SYSTEM_KEYS - {LOCAL_KEY})
    if unknown:
        raise unknown_key((unknown[0],), GATEWAY_KEYS | SYSTEM_KEYS | {LOCAL_KEY})
    return Settings(
        gateway=config_from_dict({k: v for k, v in data.items() if k in GATEWAY_KEYS}),
        system=system_config_from_dict({k: v for k, v in data.items() if k in SYSTEM_KEYS}),
        local=local_config_from_dict(data.get(LOCAL_KEY)),
    )
