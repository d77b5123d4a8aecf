"""The operator's system config: what a Model's short names (engine, resource and cache profile) expand to.

Same shape as KubeAI's "system" config (camelCase YAML keys), so a KubeAI helm values block for
`modelServers`, `resourceProfiles`, `cacheProfiles`, `modelServerPods`, `modelLoading` and
`secretNames` can be pasted in. Every key is optional: user entries are merged over built-in
defaults, so adding one GPU profile does not silently delete the `cpu` one. A bad value fails at
start-up with the offending key's path, never later while building a Pod.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping

from lb.config import ConfigError
from lb.model import ENGINES
from lb.schema import decode_object, read_yaml, setting

DEFAULT_IMAGE_KEY = "default"
Quantity = str | int | float  # Kubernetes resource quantity as YAML gives it: "24Gi", 1, 0.5

# What the chart's values schema says of shapes Python checks with its own code (parse_quantity,
# parse_duration, _validate_pods, ...): the Kubernetes objects and string formats inside the config.
_TOLERATION_OPERATORS = ("Equal", "Exists")
_PATCH_OPS = ("add", "remove", "replace", "move", "copy", "test")
_DNS_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_IMAGE = r"^[^\s]*$"
_QUANTITY_JSON = {"oneOf": [
    {"type": "string", "pattern": r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?$"},
    {"type": "number", "minimum": 0},
]}
_DURATION_JSON = [{"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"},
                  {"type": "number", "exclusiveMinimum": 0}]
_TOLERATION_JSON = {"type": "object", "additionalProperties": False, "properties": {
    "key": {"type": "string"},
    "operator": {"type": "string", "enum": list(_TOLERATION_OPERATORS)},
    "value": {"type": "string"},
    "effect": {"type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute", ""]},
    "tolerationSeconds": {"type": "integer"},
}}
_JSON_PATCH_JSON = {"type": "object", "additionalProperties": False, "required": ["op", "path"], "properties": {
    "op": {"type": "string", "enum": list(_PATCH_OPS)},
    "path": {"type": "string", "pattern": "^(/.*)?$"},
    "from": {"type": "string"},
    "value": {},
}}
_NAME_REF_JSON = {"type": "object", "additionalProperties": False, "required": ["name"],
                  "properties": {"name": {"type": "string", "minLength": 1}}}


@dataclass(frozen=True, slots=True)
class ModelServer:
    """Images of one engine, keyed by a resource profile's `imageName` ("default" is the fallback)."""

    images: dict[str, str] = setting(
        factory=dict, doc="Images keyed by a resource profile's imageName; 'default' is the fallback.",
        json={"additionalProperties": {"type": "string", "pattern": _IMAGE}})


@dataclass(frozen=True, slots=True)
class ResourceProfile:
    """Per-replica resources for one unit of an accelerator; a Model's "name:count" multiplies them."""

    image_name: str = setting("", doc="Which of an engine's images this profile runs (modelServers.*.images).")
    requests: dict[str, Quantity] = setting(factory=dict, doc="Resource requests per unit.",
                                            json={"additionalProperties": _QUANTITY_JSON})
    limits: dict[str, Quantity] = setting(factory=dict, doc="Resource limits per unit.",
                                          json={"additionalProperties": _QUANTITY_JSON})
    node_selector: dict[str, str] = setting(factory=dict, doc="Node labels the model Pods require.")
    tolerations: tuple[dict[str, Any], ...] = setting((), doc="Tolerations of the model Pods.",
                                                      json={"items": _TOLERATION_JSON})
    affinity: dict[str, Any] | None = setting(None, doc="Affinity of the model Pods (Kubernetes Affinity).")
    runtime_class_name: str = setting("", doc="RuntimeClass of the model Pods.")
    scheduler_name: str = setting("", doc="Scheduler of the model Pods.")


@dataclass(frozen=True, slots=True)
class SharedFilesystem:
    """A ReadWriteMany volume holding downloaded models: from a StorageClass or a pre-made PersistentVolume."""

    storage_class_name: str = setting("", doc="StorageClass of a ReadWriteMany volume created for the cache.")
    persistent_volume_name: str = setting("", doc="A pre-made PersistentVolume to use instead.")


@dataclass(frozen=True, slots=True)
class CacheProfile:
    shared_filesystem: SharedFilesystem = setting(
        doc="Exactly one of storageClassName (ReadWriteMany) or persistentVolumeName.",
        json={"oneOf": [{"required": [a], "not": {"required": [b]}} for a, b in
                        (("storageClassName", "persistentVolumeName"), ("persistentVolumeName", "storageClassName"))]})


@dataclass(frozen=True, slots=True)
class ModelServerPods:
    """Settings every model Pod gets, whatever its engine (clusters differ: OpenShift, private registries)."""

    pod_security_context: dict[str, Any] | None = setting(None, doc="securityContext of the model Pods.")
    security_context: dict[str, Any] | None = setting(None, doc="securityContext of the server container.")
    json_patches: tuple[dict[str, Any], ...] = setting(
        (), doc="RFC 6902 patches applied to the finished Pod.", json={"items": _JSON_PATCH_JSON})
    image_pull_secrets: tuple[dict[str, str], ...] = setting(
        (), doc="Pull secrets of the model Pods.", json={"items": _NAME_REF_JSON})
    service_account_name: str = setting("", doc="ServiceAccount of the model Pods.")


@dataclass(frozen=True, slots=True)
class ModelLoading:
    image: str = setting("ghcr.io/kvgate/kvgate-model-loader:0.1.0",
                         doc="Image of the adapter-loader sidecars and cache-loading Jobs (the Dockerfile's model-loader target).",
                         pattern=_IMAGE)


def _secret_name(default: str) -> Any:
    return setting(default, doc="Secret name (optional in the Pod).", min_length=1, pattern=f"^{_DNS_NAME}$")


@dataclass(frozen=True, slots=True)
class SecretNames:
    """Secrets model Pods read credentials from; all optional in the Pod, so a missing one is not fatal."""

    huggingface: str = _secret_name("kvgate-huggingface")
    aws: str = _secret_name("kvgate-aws")
    gcp: str = _secret_name("kvgate-gcp")
    alibaba: str = _secret_name("kvgate-alibaba")


@dataclass(frozen=True, slots=True)
class ModelRollouts:
    surge: int = setting(1, doc="Extra Pods during a rollout; at least 1, which keeps capacity up while "
                         "replacing.", minimum=1)


Duration = str | int | float  # "10s", "10m", "1m30s", "500ms" (Go style, as KubeAI's config) or seconds
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Duration) -> float:
    """Seconds in a Go-style duration ("1m30s") or a plain number of seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r} (e.g. 10s, 10m, 1m30s)")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


@dataclass(frozen=True, slots=True)
class ModelAutoscaling:
    """The autoscaler's cadence (KubeAI's keys and defaults) and where it keeps its state.

    Each `interval` the active requests are summed over the gateway replicas; the average over
    `timeWindow` drives replicas. Two more signals come from the model servers' own metrics as
    the gateways re-export them (`kvgate_engine_*`; the gateways' `engineMetrics` must be on):
    `includeEngineWaiting` adds the requests queued inside the replicas, for traffic queued
    beyond what the gateways see; `targetKVCacheUsage` (0 = off) asks for enough replicas that
    the KV-cache usage summed over them, averaged over the window, is at most that share of
    each, for long prompts and outputs that fill the cache before the request count says so.
    """

    interval: Duration = setting("10s", doc="How often active requests are read (Go-style duration or seconds).",
                                 json={"anyOf": _DURATION_JSON})
    time_window: Duration = setting("10m", doc="Window of the moving average that drives replicas.",
                                    json={"anyOf": _DURATION_JSON})
    state_config_map_name: str = setting("kvgate-autoscaler-state", doc="ConfigMap keeping the averages across "
                                         "restarts.", max_length=253, pattern=f"^({_DNS_NAME})?$")
    include_engine_waiting: bool = setting(False, doc="Add the requests queued inside the model servers "
                                           "(as the gateways report them) to the signal.")
    target_kv_cache_usage: float = setting(
        0.0, key="targetKVCacheUsage", minimum=0, maximum=1,
        doc="KV-cache usage per replica to scale for, in (0, 1]: replicas >= ceil(KV usage summed over "
        "the replicas / this), averaged over timeWindow; 0 turns it off.")

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval)

    @property
    def time_window_seconds(self) -> float:
        return parse_duration(self.time_window)


@dataclass(frozen=True, slots=True)
class SystemConfig:
    model_servers: dict[str, ModelServer] = setting(
        factory=dict, doc="Images per engine, merged over the built-in ones.",
        json={"propertyNames": {"enum": list(ENGINES)}})
    resource_profiles: dict[str, ResourceProfile] = setting(
        factory=dict, doc="Resources per replica, by name; merged over the built-in profiles.",
        json={"propertyNames": {"pattern": "^[^:]+$", "minLength": 1}})
    cache_profiles: dict[str, CacheProfile] = setting(
        factory=dict, doc="Where cacheProfile Models keep their files, by name.",
        json={"propertyNames": {"pattern": f"^{_DNS_NAME}$", "maxLength": 40}})
    model_server_pods: ModelServerPods = setting(factory=ModelServerPods, doc="Settings every model Pod gets.")
    model_loading: ModelLoading = setting(factory=ModelLoading, doc="The Job that fills a cache profile.")
    secret_names: SecretNames = setting(factory=SecretNames, doc="Secrets model Pods read credentials from.")
    model_rollouts: ModelRollouts = setting(factory=ModelRollouts, doc="How a Model's Pods are replaced.")
    model_autoscaling: ModelAutoscaling = setting(factory=ModelAutoscaling, doc="The autoscaler's cadence.")
    allow_pod_address_override: bool = setting(
        False, doc="KubeAI's test hook: a Model annotation may redirect traffic to another address.")

    def image_for(self, engine: str, image_name: str) -> str:
        """The engine's image for a profile's imageName, falling back to its "default" like KubeAI."""
        images = self.model_servers[engine].images
        return images.get(image_name) or images[DEFAULT_IMAGE_KEY]


# ---------------------------------------------------------------------------------------------
# Defaults

_NVIDIA_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_AMD_TOLERATION = {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_NVIDIA_PRODUCT = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery on any cloud

DEFAULT_MODEL_SERVERS: dict[str, ModelServer] = {
    "VLLM": ModelServer({
        "default": "vllm/vllm-openai:v0.8.5",
        "nvidia-gpu": "vllm/vllm-openai:v0.8.5",
        "cpu": "substratusai/vllm:v0.8.5-cpu",
        "amd-gpu": "rocm/vllm:latest",
    }),
    "OLlama": ModelServer({"default": "ollama/ollama:latest", "amd-gpu": "ollama/ollama:rocm"}),
    "FasterWhisper": ModelServer({
        "default": "fedirz/faster-whisper-server:latest-cpu",
        "nvidia-gpu": "fedirz/faster-whisper-server:latest-cuda",
    }),
    "Infinity": ModelServer({"default": "michaelf34/infinity:latest"}),
    "Sim": ModelServer({"default": "ghcr.io/kvgate/kvgate:0.1.0"}),
    "LlamaCpp": ModelServer({
        "default": "ghcr.io/abetlen/llama-cpp-python:latest",
        "nvidia-gpu": "ghcr.io/abetlen/llama-cpp-python:latest-cuda",
    }),
}


def _nvidia(product: str, cpu: str, memory: str) -> ResourceProfile:
    return ResourceProfile(
        image_name="nvidia-gpu",
        requests={"nvidia.com/gpu": "1", "cpu": cpu, "memory": memory},
        limits={"nvidia.com/gpu": "1"},
        node_selector={_NVIDIA_PRODUCT: product},
        tolerations=(_NVIDIA_TOLERATION,),
    )


DEFAULT_RESOURCE_PROFILES: dict[str, ResourceProfile] = {
    "cpu": ResourceProfile(image_name="cpu", requests={"cpu": "1", "memory": "2Gi"}),
    "nvidia-gpu-t4": _nvidia("Tesla-T4", "3", "12Gi"),
    "nvidia-gpu-l4": _nvidia("NVIDIA-L4", "6", "24Gi"),
    "nvidia-gpu-l40s": _nvidia("NVIDIA-L40S", "6", "48Gi"),
    "nvidia-gpu-a100-40gb": _nvidia("NVIDIA-A100-SXM4-40GB", "10", "80Gi"),
    "nvidia-gpu-a100-80gb": _nvidia("NVIDIA-A100-SXM4-80GB", "10", "120Gi"),
    "nvidia-gpu-h100": _nvidia("NVIDIA-H100-80GB-HBM3", "20", "200Gi"),
    "amd-gpu-mi300x": ResourceProfile(
        image_name="amd-gpu",
        requests={"amd.com/gpu": "1", "cpu": "12", "memory": "200Gi"},
        limits={"amd.com/gpu": "1"},
        node_selector={"amd.com/gpu.product-name": "AMD_Instinct_MI300X"},
        tolerations=(_AMD_TOLERATION,),
    ),
}


# ---------------------------------------------------------------------------------------------
# Loading


def load_system_config(path: str | Path | None) -> SystemConfig:
    """Read a YAML system config; None gives the defaults."""
    return system_config_from_dict({}) if path is None else read_yaml(path, system_config_from_dict)


def system_config_from_dict(data: Any) -> SystemConfig:
    """Build, merge over the defaults and validate; ConfigError names the first bad key."""
    config = decode_object(SystemConfig, data)
    config = dataclasses.replace(
        config,
        model_servers=_merge_servers(config.model_servers),
        resource_profiles={**DEFAULT_RESOURCE_PROFILES, **config.resource_profiles},
    )
    _validate(config)
    return config


def _merge_servers(given: Mapping[str, ModelServer]) -> dict[str, ModelServer]:
    """Merge images per engine: overriding `default` for VLLM keeps its `nvidia-gpu` variant."""
    merged = dict(DEFAULT_MODEL_SERVERS)
    for engine, server in given.items():
        base = merged.get(engine, ModelServer())
        merged[engine] = ModelServer({**base.images, **server.images})
    return merged


# ---------------------------------------------------------------------------------------------
# Validation

_QUANTITY_RE = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")


def parse_quantity(value: Quantity) -> tuple[Decimal, str]:
    """Split a Kubernetes quantity into (number, suffix); ValueError if it is not one."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    match = _QUANTITY_RE.fullmatch(str(value).strip())
    if not match:
        raise ValueError(f"not a quantity: {value!r}")
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:
        raise ValueError(f"not a quantity: {value!r}") from None
    if number < 0:
        raise ValueError(f"negative quantity: {value!r}")
    return number, match.group(2) or ""


def _validate(config: SystemConfig) -> None:
    _validate_servers(config.model_servers)
    for name, profile in config.resource_profiles.items():
        _validate_profile(name, profile)
    for name, cache in config.cache_profiles.items():
        _validate_cache(name, cache)
    _validate_pods(config.model_server_pods)
    _validate_autoscaling(config.model_autoscaling)
    if not config.model_loading.image:
        raise ConfigError("modelLoading.image", "must not be empty")


def _validate_autoscaling(autoscaling: ModelAutoscaling) -> None:
    for key, value in (("interval", autoscaling.interval), ("timeWindow", autoscaling.time_window)):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(("modelAutoscaling", key), str(exc)) from None
        if seconds <= 0:
            raise ConfigError(("modelAutoscaling", key), f"must be > 0, got {value!r}")
    if autoscaling.time_window_seconds < autoscaling.interval_seconds:
        raise ConfigError("modelAutoscaling.timeWindow", "must be >= interval")
    if not autoscaling.state_config_map_name:
        raise ConfigError("modelAutoscaling.stateConfigMapName", "must not be empty")


def _validate_servers(servers: Mapping[str, ModelServer]) -> None:
    for engine, server in servers.items():
        where = ("modelServers", engine)
        if engine not in ENGINES:
            raise ConfigError(where, f"unknown engine (known: {', '.join(ENGINES)})")
        if not server.images.get(DEFAULT_IMAGE_KEY):
            raise ConfigError(where + ("images", DEFAULT_IMAGE_KEY), "required, the fallback image")
        for key, image in server.images.items():
            if not image or any(c.isspace() for c in image):
                raise ConfigError(where + ("images", key), f"not an image reference: {image!r}")


def _validate_profile(name: str, profile: ResourceProfile) -> None:
    where = ("resourceProfiles", name)
    if not name or ":" in name:
        raise ConfigError(where, "profile names cannot be empty or contain ':'")
    for kind in ("requests", "limits"):
        for resource, quantity in getattr(profile, kind).items():
            try:
                parse_quantity(quantity)
            except ValueError as exc:
                raise ConfigError(where + (kind, resource), str(exc)) from None
    for i, toleration in enumerate(profile.tolerations):
        if toleration.get("operator", "Equal") not in _TOLERATION_OPERATORS:
            raise ConfigError(where + ("tolerations", i, "operator"), f"must be {' or '.join(_TOLERATION_OPERATORS)}")


def _validate_cache(name: str, cache: CacheProfile) -> None:
    where = ("cacheProfiles", name, "sharedFilesystem")
    fs = cache.shared_filesystem
    if bool(fs.storage_class_name) == bool(fs.persistent_volume_name):
        raise ConfigError(where, "set exactly one of storageClassName, persistentVolumeName")


def _validate_pods(pods: ModelServerPods) -> None:
    for i, patch in enumerate(pods.json_patches):
        where = ("modelServerPods", "jsonPatches", i)
        if patch.get("op") not in _PATCH_OPS:
            raise ConfigError(where + ("op",), f"must be one of {', '.join(_PATCH_OPS)}")
        if not isinstance(patch.get("path"), str) or not (patch["path"] == "" or patch["path"].startswith("/")):
            raise ConfigError(where + ("path",), "must be a JSON pointer starting with '/'")
        if patch["op"] in ("add", "replace", "test") and "value" not in patch:
            raise ConfigError(where + ("value",), f"required for op {patch['op']}")
        if patch["op"] in ("move", "copy") and not isinstance(patch.get("from"), str):
            raise ConfigError(where + ("from",), f"required for op {patch['op']}")
    for i, secret in enumerate(pods.image_pull_secrets):
        if not secret.get("name"):
            raise ConfigError(("modelServerPods", "imagePullSecrets", i, "name"), "required")
