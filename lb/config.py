"""The gateway's system config: one YAML file, every key optional, every value checked.

Keys are camelCase like the Model resource's. A bad file fails at start-up with the path of
the offending key (``retries.maxRetries: expected int, got 'x'``), never later on a request.
The static-endpoints mode also lives here: ``models`` (Model manifests) and ``endpoints`` let
the gateway front any OpenAI-compatible servers without an operator.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Callable, TypeVar

import yaml

from lb.ejection import EjectionConfig
from lb.engine_metrics import EngineMetricsConfig
from lb.model import Model, ModelValidationError
from lb.registry import Endpoint

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 9090  # 0 turns the metrics listener off
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 32 * 1024 * 1024  # audio uploads are the big ones


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = 3
    retry_statuses: tuple[int, ...] = (500, 502, 503, 504)


@dataclass(frozen=True, slots=True)
class WaitingRoomConfig:
    max_waiting_per_model: int = 10_000
    timeout_seconds: float = 600.0  # a cold model server can take minutes to load weights
    retry_after_seconds: int = 5


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 600.0  # longest silence allowed from a model server
    max_idle_per_host: int = 256  # idle keep-alive connections kept per replica
    # Below the model servers' own idle timeout (vLLM's uvicorn closes after 5 s), so the pool
    # drops a connection before the server does and rarely races it.
    keepalive_seconds: float = 4.0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    # A request carrying this header is routed by its value instead of its prompt (PrefixHash):
    # a conversation or session stays on one replica while that replica is under the bound.
    # "" turns it off.
    session_header: str = "X-Session-ID"


@dataclass(frozen=True, slots=True)
class StaticEndpoint:
    address: str
    key: str = ""
    adapters: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    waiting_room: WaitingRoomConfig = field(default_factory=WaitingRoomConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    ejection: EjectionConfig = field(default_factory=EjectionConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    engine_metrics: EngineMetricsConfig = field(default_factory=EngineMetricsConfig)
    models: tuple[Model, ...] = ()
    endpoints: dict[str, tuple[StaticEndpoint, ...]] = field(default_factory=dict)

    def static_endpoints(self, model: str) -> list[Endpoint]:
        return [Endpoint(e.key or f"{model}/{e.address}", e.address, frozenset(e.adapters))
                for e in self.endpoints.get(model, ())]


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config file; None gives the defaults."""
    return Config() if path is None else read_yaml_config(path, config_from_dict)


def read_yaml_config(path: str | Path, build: Callable[[Any], T]) -> T:
    """Read a YAML file and build a config from it; every error names the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return build(data or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_from_dict(data: Any) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping")
    models = _models(data.get("models", []))
    config = _build(Config, {k: v for k, v in data.items() if k != "models"}, "")
    config = dataclasses.replace(config, models=models)
    _validate(config)
    return config


def _models(items: Any) -> tuple[Model, ...]:
    if not isinstance(items, list):
        raise ConfigError("models: expected a list of Model manifests")
    models = []
    for i, item in enumerate(items):
        try:
            models.append(Model.from_dict(item))
        except ModelValidationError as exc:
            raise ConfigError(f"models[{i}]: {exc}") from None
    return tuple(models)


def _validate(config: Config) -> None:
    checks = [
        (0 < config.server.port < 65536, "server.port: must be in 1..65535"),
        (0 <= config.server.metrics_port < 65536, "server.metricsPort: must be in 0..65535"),
        (config.limits.max_body_bytes > 0, "limits.maxBodyBytes: must be > 0"),
        (0 <= config.retries.max_retries <= 20, "retries.maxRetries: must be in 0..20"),
        (all(500 <= s <= 599 for s in config.retries.retry_statuses),
         "retries.retryStatuses: only 5xx statuses can be retried"),
        (config.waiting_room.max_waiting_per_model >= 0,
         "waitingRoom.maxWaitingPerModel: must be >= 0"),
        (config.waiting_room.timeout_seconds > 0, "waitingRoom.timeoutSeconds: must be > 0"),
        (config.upstream.connect_timeout_seconds > 0,
         "upstream.connectTimeoutSeconds: must be > 0"),
        (config.upstream.read_timeout_seconds > 0, "upstream.readTimeoutSeconds: must be > 0"),
        (config.upstream.max_idle_per_host >= 0, "upstream.maxIdlePerHost: must be >= 0"),
        (config.upstream.keepalive_seconds > 0, "upstream.keepaliveSeconds: must be > 0"),
        (config.ejection.consecutive_failures >= 0,
         "ejection.consecutiveFailures: must be >= 0 (0 turns ejection off)"),
        (0 < config.ejection.base_seconds <= config.ejection.max_seconds,
         "ejection.baseSeconds: must be > 0 and <= ejection.maxSeconds"),
        (0 <= config.ejection.max_ejected_percent <= 100,
         "ejection.maxEjectedPercent: must be in 0..100"),
        (config.engine_metrics.interval_seconds >= 0,
         "engineMetrics.intervalSeconds: must be >= 0 (0 turns scraping off)"),
        (config.engine_metrics.timeout_seconds > 0, "engineMetrics.timeoutSeconds: must be > 0"),
        (config.engine_metrics.stale_after_seconds > 0,
         "engineMetrics.staleAfterSeconds: must be > 0"),
        (config.engine_metrics.path.startswith("/"), "engineMetrics.path: must start with /"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    names = {m.name for m in config.models}
    for model, endpoints in config.endpoints.items():
        if model not in names:
            raise ConfigError(f"endpoints.{model}: no model of that name under `models`")
        for i, endpoint in enumerate(endpoints):
            if not re.fullmatch(r"[^\s:/]+:\d{1,5}", endpoint.address):
                raise ConfigError(f"endpoints.{model}[{i}].address: expected host:port, "
                                  f"got {endpoint.address!r}")


# -- a small typed loader: dataclass fields from camelCase keys ------------------------------

def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {_camel(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    values = {}
    for key, value in data.items():
        f = fields[key]
        values[f.name] = _convert(hints[f.name], value, f"{path}.{key}" if path else key)
    return cls(**values)


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:  # passed through as YAML gave it (e.g. the operator's Kubernetes objects)
        return value
    if origin in (typing.Union, UnionType):
        return _convert_union(args, value, path)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_show(value)}")
        return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        item = args[1] if args else Any
        return {str(k): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: expected {hint.__name__}, got {_show(value)}")
    return value


def _convert_union(args: tuple[Any, ...], value: Any, path: str) -> Any:
    """The first option the value converts to, in declaration order (`str | int | float`)."""
    if value is None and NoneType in args:
        return None
    options = [a for a in args if a is not NoneType]
    for option in options:
        try:
            return _convert(option, value, path)
        except ConfigError:
            if len(options) == 1:
                raise
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{path}: expected {names}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
