"""The gateway's system config: one YAML file, every key optional, every value checked.

Keys are camelCase like the Model resource's. A bad file fails at start-up with the path of
the offending key and its line
(``kvgate.yaml:3: retries.maxRetries: expected an integer, got 'x'``), never later on a request.
The static-endpoints mode also lives here: ``models`` (Model manifests) and ``endpoints`` let
the gateway front any OpenAI-compatible servers without an operator.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lb.batch.config import BatchConfig
from lb.console.config import ConsoleConfig
from lb.ejection import EjectionConfig
from lb.engine_metrics import EngineMetricsConfig
from lb.flow_queue import QueueConfig
from lb.health_checks import HealthCheckConfig
from lb.keys import ApiKeysConfig
from lb.messaging.config import MessagingConfig
from lb.model import Model
from lb.registry import Endpoint, Registry
from lb.ring import LoadTable
from lb.schema import SchemaError, decode_object, read_yaml, setting
from lb.tracing import TracingConfig

ConfigError = SchemaError  # the name callers of the config loaders know


LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = setting("127.0.0.1", doc="Address the gateway listens on.")
    port: int = setting(8000, doc="Port of the OpenAI API.", minimum=1, maximum=65535)
    metrics_port: int = setting(9090, doc="Port of /metrics; 0 turns the listener off.", minimum=0, maximum=65535)
    log_level: LogLevel = setting("info", doc="Log level of the gateway and its HTTP server.")
    access_log: bool = setting(False, doc="One line per request on stdout (client, method, path, status), "
                               "uvicorn's access log. Off by default: it costs CPU on every request.")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = setting(32 * 1024 * 1024, doc="Largest request body accepted (audio uploads are the "
                                  "big ones).", minimum=1)
    max_header_bytes: int = setting(64 * 1024, doc="Largest request head (request line and headers) "
                                    "accepted; a larger one gets 431 and the connection is closed.",
                                    minimum=1024)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_retries: int = setting(3, doc="Further attempts on other replicas after a failed one.", minimum=0, maximum=20)
    retry_statuses: tuple[int, ...] = setting(
        (500, 502, 503, 504), doc="Upstream statuses retried before the first byte reaches the client (5xx only).",
        json={"items": {"type": "integer", "minimum": 500, "maximum": 599}, "uniqueItems": True})


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_seconds: float = setting(10.0, doc="Connect timeout to a replica.", exclusive_minimum=0)
    read_timeout_seconds: float = setting(600.0, doc="Longest silence allowed from a model server.",
                                          exclusive_minimum=0)
    max_idle_per_host: int = setting(256, doc="Idle keep-alive connections kept per replica.", minimum=0)
    # Below the model servers' own idle timeout (vLLM's uvicorn closes after 5 s), so the pool
    # drops a connection before the server does and rarely races it.
    keepalive_seconds: float = setting(4.0, doc="How long an idle upstream connection is kept.", exclusive_minimum=0)


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    session_header: str = setting(
        "X-Session-ID", doc="A request carrying this header is routed by its value instead of its prompt "
        "(PrefixHash): a conversation stays on one replica while that replica is under the bound. Empty "
        "turns it off.")


@dataclass(frozen=True, slots=True)
class StaticEndpoint:
    address: str
    key: str = ""
    adapters: tuple[str, ...] = ()
    # added to the Model's KV-event ports (cacheAware.kvEvents) for this replica: replicas that
    # share a host publish on ports + their rank
    kv_port_offset: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    ejection: EjectionConfig = field(default_factory=EjectionConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    engine_metrics: EngineMetricsConfig = field(default_factory=EngineMetricsConfig)
    health_checks: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    api_keys: ApiKeysConfig = field(default_factory=ApiKeysConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    messaging: MessagingConfig = field(default_factory=MessagingConfig)
    models: tuple[Model, ...] = ()
    endpoints: dict[str, tuple[StaticEndpoint, ...]] = field(default_factory=dict)

    def static_endpoints(self, model: str) -> list[Endpoint]:
        return [Endpoint(e.key or f"{model}/{e.address}", e.address, frozenset(e.adapters),
                         e.kv_port_offset) for e in self.endpoints.get(model, ())]


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config file; None gives the defaults."""
    return Config() if path is None else read_yaml(path, config_from_dict)


def config_from_dict(data: Any) -> Config:
    """Decode and validate; `models` are Model manifests, decoded by the Model's own envelope rules."""
    if not isinstance(data, dict):
        raise ConfigError((), "the config must be a mapping")
    models = _models([] if data.get("models") is None else data["models"])
    config = decode_object(Config, {k: v for k, v in data.items() if k != "models"})
    config = dataclasses.replace(config, models=models)
    _validate(config)
    return config


def _models(items: Any) -> tuple[Model, ...]:
    if not isinstance(items, list):
        raise ConfigError("models", "expected a list of Model manifests")
    models = []
    for i, item in enumerate(items):
        try:
            models.append(Model.from_dict(item))
        except SchemaError as err:
            raise err.under(("models", i)) from None
    return tuple(models)


def _validate(config: Config) -> None:
    if any(not 500 <= s <= 599 for s in config.retries.retry_statuses):
        raise ConfigError("retries.retryStatuses", "only 5xx statuses can be retried")
    if config.ejection.base_seconds > config.ejection.max_seconds:
        raise ConfigError("ejection.baseSeconds", "must be at most ejection.maxSeconds")
    checks = config.health_checks
    if checks.enabled and checks.timeout_seconds > checks.interval_seconds:
        raise ConfigError("healthChecks.timeoutSeconds", f"must be at most healthChecks."
                          f"intervalSeconds ({checks.interval_seconds:g}): a check must end before "
                          "the next is due")
    if config.api_keys.enabled and not config.api_keys.file:
        raise ConfigError("apiKeys.file", "required when apiKeys.enabled is true (create one "
                          "with `kvgate keys create`)")
    for i, stream in enumerate(config.messaging.streams):
        if config.api_keys.enabled and not stream.api_key:
            raise ConfigError(("messaging", "streams", i, "apiKey"), "required when apiKeys."
                              "enabled is true: the name of the key the stream's requests run under")
    names = {m.name for m in config.models}
    for model, endpoints in config.endpoints.items():
        if model not in names:
            raise ConfigError(("endpoints", model), "no model of that name under `models`")
        for i, endpoint in enumerate(endpoints):
            if not re.fullmatch(r"[^\s:/]+:\d{1,5}", endpoint.address):
                raise ConfigError(("endpoints", model, i, "address"), "expected host:port, "
                                  f"got {endpoint.address!r}")


def static_registry(config: Config, loads: LoadTable | None = None) -> Registry:
    """A registry holding a static config's models and endpoints (`kvgate gateway`: no operator)."""
    registry = Registry(loads)
    for model in config.models:
        registry.set_model(model)
        registry.set_endpoints(model.name, config.static_endpoints(model.name))
    return registry
