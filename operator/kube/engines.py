"""The model-server container of each engine: command, args, env, probes and the volumes it needs.

Everything here is a plain dict in Kubernetes JSON shape, built from the Model and the system
config only, so the same inputs always give the same container (the pod-hash depends on it).
Image and resources are not chosen here: they come from the resource profile (see `kube.pods`).

Facts (commands, probe timings, env names) follow KubeAI's engine_*.go and model_source.go.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from lb.model import ADAPTER_ENGINES, Model, ModelURL, parse_model_url

from lb_operator.kv_events import kv_events_args
from lb_operator.scheduling_policy import scheduling_policy_args
from lb_operator.loader import ADAPTERS_DIR, LOADER_CONTAINER, LOADER_PORT
from lb_operator.system_config import SecretNames, SystemConfig

SERVER_CONTAINER = "server"
MODEL_PORT = 8000
PORT_NAME = "http"
MODEL_MOUNT = "/model"  # pvc:// sources are mounted here
CACHE_MOUNT = "/models"  # the shared cache volume of a cache profile
FILES_VOLUME = "model-files"
ADAPTERS_VOLUME = "adapters"  # emptyDir the adapter-loader sidecar fills and the server reads

EnvVar = dict[str, Any]
Volume = dict[str, Any]
Mount = dict[str, Any]


class PodSpecError(ValueError):
    """A Model that cannot be turned into a Pod with this system config; names the field."""


@dataclass(slots=True)
class ServerParts:
    """What one engine contributes to the Pod; merged with the common parts by `server_container`."""

    command: list[str]
    args: list[str]
    env: list[EnvVar]
    startup: dict[str, Any]
    readiness: dict[str, Any]
    liveness: dict[str, Any]
    volumes: list[Volume] = field(default_factory=list)
    mounts: list[Mount] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Probes


def http_probe(path: str, *, period: int, failures: int, timeout: int, delay: int = 0) -> dict[str, Any]:
    probe: dict[str, Any] = {
        "httpGet": {"path": path, "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
        "successThreshold": 1,
    }
    if delay:
        probe["initialDelaySeconds"] = delay
    return probe


def _standard_probes(path: str, startup_failures: int) -> tuple[dict[str, Any], ...]:
    """Startup polls every 2 s for `startup_failures` tries (weights can take an hour to load);
    after that, readiness every 10 s and a lenient liveness every 30 s, as KubeAI does."""
    return (
        http_probe(path, period=2, failures=startup_failures, timeout=2),
        http_probe(path, period=10, failures=3, timeout=2),
        http_probe(path, period=30, failures=3, timeout=3),
    )


# ---------------------------------------------------------------------------------------------
# Where the server finds the model


def cache_dir(model: Model) -> str:
    """Per-model directory on the shared cache; the url hash lets a changed url coexist with the old files.

    KubeAI also puts the Model's uid in it; our Model carries no uid, so name + url identify it.
    """
    url_hash = hashlib.md5(model.spec.url.encode()).hexdigest()[:8]
    return f"{CACHE_MOUNT}/{model.name}-{url_hash}"


def cache_claim_name(cache_profile: str) -> str:
    return f"shared-model-cache-{cache_profile}"


def model_location(model: Model, url: ModelURL) -> str:
    """The model argument a server gets: a hub id, or a path inside the Pod."""
    if model.spec.cache_profile:
        return cache_dir(model)
    if url.scheme == "pvc":
        return MODEL_MOUNT
    if url.scheme == "file":
        return "/" + url.ref.lstrip("/")
    if url.scheme in ("s3", "gs", "oss"):
        return f"{url.scheme}://{url.ref}"  # vLLM streams s3:// itself (--load-format=runai_streamer)
    return url.ref


def _source_volumes(model: Model, url: ModelURL, sub_path: str | None = None) -> tuple[list[Volume], list[Mount]]:
    """The PVC of a pvc:// source or the cache claim; KubeAI's subPath rule: relative, no leading '/'."""
    if model.spec.cache_profile:
        claim = cache_claim_name(model.spec.cache_profile)
        return ([{"name": "models", "persistentVolumeClaim": {"claimName": claim}}],
                [{"name": "models", "mountPath": CACHE_MOUNT, "readOnly": True}])
    if url.scheme != "pvc":
        return [], []
    mount: Mount = {"name": "model", "mountPath": MODEL_MOUNT}
    path = (url.path if sub_path is None else sub_path).strip("/")
    if path:
        mount["subPath"] = path
    return [{"name": "model", "persistentVolumeClaim": {"claimName": url.name}}], [mount]


# ---------------------------------------------------------------------------------------------
# Engines


def _vllm(model: Model, url: ModelURL) -> ServerParts:
    args = [f"--model={model_location(model, url)}", f"--served-model-name={model.name}"]
    env: list[EnvVar] = []
    if model.spec.adapters:
        # Adapters are loaded at runtime through /v1/load_lora_adapter, which vLLM only allows with this.
        args.append("--enable-lora")
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    volumes, mounts = _source_volumes(model, url)
    return ServerParts(["python3", "-m", "vllm.entrypoints.openai.api_server"], args, env,
                       *_standard_probes("/health", 5400), volumes, mounts)


def _sim(model: Model, url: ModelURL) -> ServerParts:
    """The bundled simulator: same flags and endpoints as vLLM, so the gateway cannot tell them apart."""
    args = ["--host", "0.0.0.0", "--port", str(MODEL_PORT), "--model-name", model.name,
            "--model", model_location(model, url)]
    env: list[EnvVar] = []
    if model.spec.adapters:
        args.append("--enable-lora")
        env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    volumes, mounts = _source_volumes(model, url)
    return ServerParts(["python", "-m", "kvgate_sim"], args, env, *_standard_probes("/health", 300), volumes, mounts)


def _infinity(model: Model, url: ModelURL) -> ServerParts:
    env = [
        {"name": "INFINITY_MODEL_ID", "value": model_location(model, url)},
        {"name": "INFINITY_SERVED_MODEL_NAME", "value": model.name},
        {"name": "INFINITY_URL_PREFIX", "value": "/v1"},
        {"name": "INFINITY_ENGINE", "value": "torch"},
        {"name": "INFINITY_PORT", "value": str(MODEL_PORT)},
    ]
    volumes, mounts = _source_volumes(model, url)
    return ServerParts([], ["v2"], env, *_standard_probes("/health", 600), volumes, mounts)


def _faster_whisper(model: Model, url: ModelURL) -> ServerParts:
    env = [{"name": "WHISPER__MODEL", "value": model_location(model, url)}, {"name": "ENABLE_UI", "value": "false"}]
    volumes, mounts = _source_volumes(model, url)
    return ServerParts([], [], env, *_standard_probes("/health", 900), volumes, mounts)


def _llama_cpp(model: Model, url: ModelURL) -> ServerParts:
    """llama-cpp-python's server. It has no /health, so probes ask /v1/models (answered once loaded)."""
    args, sub_path = _llama_cpp_model_args(model, url)
    args += ["--model_alias", model.name, "--host", "0.0.0.0", "--port", str(MODEL_PORT)]
    volumes, mounts = _source_volumes(model, url, sub_path)
    return ServerParts(["python3", "-m", "llama_cpp.server"], args, [], *_standard_probes("/v1/models", 900),
                       volumes, mounts)


def _llama_cpp_model_args(model: Model, url: ModelURL) -> tuple[list[str], str | None]:
    """A GGUF is one file: hf://<org>/<repo>/<file.gguf> downloads it; pvc://<claim>/<dir>/<file.gguf>
    mounts its directory (a subPath file mount would not see updates) and points at the file."""
    if url.scheme == "hf" and url.ref.count("/") >= 2:
        org, repo, filename = url.ref.split("/", 2)
        return ["--hf_model_repo_id", f"{org}/{repo}", "--model", filename], None
    if url.scheme == "pvc" and url.path.endswith(".gguf") and not model.spec.cache_profile:
        directory, filename = posixpath.split(url.path)
        return ["--model", f"{MODEL_MOUNT}/{filename}"], directory
    return ["--model", model_location(model, url)], None


def _ollama(model: Model, url: ModelURL) -> ServerParts:
    env = [
        {"name": "OLLAMA_HOST", "value": f"0.0.0.0:{MODEL_PORT}"},
        # One model per server: never let Ollama unload it (0 would mean "unload at once").
        {"name": "OLLAMA_KEEP_ALIVE", "value": "999999h"},
    ]
    if url.scheme == "pvc":
        env.append({"name": "OLLAMA_MODELS", "value": MODEL_MOUNT})
    startup = {
        # `ollama pull` talks to the running server, so it cannot run before it: a startup probe
        # runs after the server started, and the Pod turns Ready only once the model is in place.
        "exec": {"command": ["bash", "-c", ollama_startup_script(model, url)]},
        "initialDelaySeconds": 1,
        "periodSeconds": 3,
        "failureThreshold": 10,
        "timeoutSeconds": 3 * 60 * 60,  # a large pull may take hours
    }
    readiness = http_probe("/", period=10, failures=3, timeout=2)
    liveness = http_probe("/", period=30, failures=3, timeout=3, delay=900)
    volumes, mounts = _source_volumes(model, url)
    return ServerParts([], [], env, startup, readiness, liveness, volumes, mounts)


def ollama_startup_script(model: Model, url: ModelURL) -> str:
    """Pull the model, then copy it to the Model's name (what clients request); `cp` only links.

    Text models are also run once so the weights are in memory before the Pod is Ready;
    embedding models refuse `ollama run`.
    """
    source = url.model if url.scheme == "pvc" else url.ref
    steps = []
    if url.scheme != "pvc" and url.pull:
        steps.append(f"/bin/ollama pull {'--insecure ' if url.insecure else ''}{source}")
    steps.append(f"/bin/ollama cp {source} {model.name}")
    if "TextGeneration" in model.spec.features:
        steps.append(f"/bin/ollama run {model.name} hi")
    return " && ".join(steps)


ENGINE_BUILDERS: dict[str, Callable[[Model, ModelURL], ServerParts]] = {
    "VLLM": _vllm,
    "Sim": _sim,
    "Infinity": _infinity,
    "FasterWhisper": _faster_whisper,
    "LlamaCpp": _llama_cpp,
    "OLlama": _ollama,
}


# ---------------------------------------------------------------------------------------------
# Credentials by url scheme


def _secret_env(name: str, secret: str, key: str) -> EnvVar:
    # Optional: a public model needs no token, and a missing Secret must not block the Pod.
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}


GCP_CREDENTIALS_DIR = "/secrets/gcp-credentials"


class Credentials(NamedTuple):
    """What a container needs to read from one URL scheme."""

    env: list[EnvVar]
    volumes: list[Volume]
    mounts: list[Mount]


def credentials(scheme: str, secrets: SecretNames) -> Credentials:
    """The env, volumes and mounts that let a server read from a source of this scheme."""
    if scheme == "hf":
        return Credentials([_secret_env("HF_TOKEN", secrets.huggingface, "token")], [], [])
    if scheme == "s3":
        return Credentials([_secret_env("AWS_ACCESS_KEY_ID", secrets.aws, "accessKeyID"),
                            _secret_env("AWS_SECRET_ACCESS_KEY", secrets.aws, "secretAccessKey")], [], [])
    if scheme == "oss":
        return Credentials([_secret_env("OSS_ACCESS_KEY_ID", secrets.alibaba, "accessKeyID"),
                            _secret_env("OSS_ACCESS_KEY_SECRET", secrets.alibaba, "accessKeySecret")], [], [])
    if scheme == "gs":
        volume = {"name": "gcp-credentials", "secret": {
            "secretName": secrets.gcp, "items": [{"key": "jsonKeyfile", "path": "credentials.json"}],
            "optional": True}}
        mount = {"name": "gcp-credentials", "mountPath": GCP_CREDENTIALS_DIR, "readOnly": True}
        env = {"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCP_CREDENTIALS_DIR}/credentials.json"}
        return Credentials([env], [volume], [mount])
    return Credentials([], [], [])


def _credential_schemes(model: Model, url: ModelURL) -> list[str]:
    """Schemes the server itself reads: the model's, unless the cache holds it. Adapters are fetched
    by the adapter-loader sidecar, so their schemes never change (nor roll) the server container."""
    return [] if model.spec.cache_profile else [url.scheme]


# ---------------------------------------------------------------------------------------------
# Files (ConfigMap + subPath mounts)


def files_config_map_name(model: Model) -> str:
    return f"model-{model.name}-files"


def file_key(path: str) -> str:
    """A ConfigMap key for a file path. KubeAI maps '/' to '_', so "/a/b" and "/a_b" collide;
    a short hash of the path keeps keys unique while staying readable."""
    readable = re.sub(r"[^-._a-zA-Z0-9]", "_", path.lstrip("/"))[:200]
    return f"{readable}.{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def files_config_map(model: Model) -> dict[str, Any] | None:
    """The ConfigMap holding `spec.files`, or None when there are none (then it should be deleted)."""
    if not model.spec.files:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": files_config_map_name(model), "namespace": model.namespace,
                     "labels": {"model": model.name}},
        "data": {file_key(f.path): f.content for f in model.spec.files},
    }


def _file_volumes(model: Model) -> tuple[list[Volume], list[Mount]]:
    if not model.spec.files:
        return [], []
    volume = {"name": FILES_VOLUME, "configMap": {"name": files_config_map_name(model)}}
    mounts = [{"name": FILES_VOLUME, "mountPath": f.path, "subPath": file_key(f.path), "readOnly": True}
              for f in model.spec.files]
    return [volume], mounts


# ---------------------------------------------------------------------------------------------
# Assembly


def merge_env(*groups: list[EnvVar]) -> list[EnvVar]:
    """Later groups override earlier ones by name, keeping the first position: a user's env wins
    over the engine's without leaving duplicate names in the Pod."""
    merged: dict[str, EnvVar] = {}
    for group in groups:
        for var in group:
            merged[var["name"]] = var
    return list(merged.values())


def check_cluster_urls(model: Model) -> None:
    """file:// names a path on the machine of the local runtime; a Pod has no such path (the model
    server would start on `/../models/...`, the loader answer 502 for an adapter forever). The
    local runtime reads them; in a cluster the reconciler makes such a Model invalid, with the
    field named (unless `ClusterOptions.allow_file_urls`: test clusters whose Pods share the
    operator's filesystem)."""
    places = [("spec.url", model.spec.url)] + [
        (f"spec.adapters[{i}].url", a.url) for i, a in enumerate(model.spec.adapters)]
    for place, url in places:
        if parse_model_url(url).scheme == "file":
            raise PodSpecError(f"{place}: {url!r}: file:// URLs name a path on the local runtime's "
                               "machine and are not supported in a cluster; use hf://, pvc://, "
                               "s3://, gs://, oss:// or ollama://")


def server_container(model: Model, config: SystemConfig) -> tuple[dict[str, Any], list[Volume]]:
    """The `server` container (without image and resources) and the Pod volumes it mounts."""
    url = parse_model_url(model.spec.url)
    builder = ENGINE_BUILDERS.get(model.spec.engine)
    if builder is None:
        raise PodSpecError(f"spec.engine: no pod builder for {model.spec.engine!r}")
    parts = builder(model, url)
    cred_env, volumes, mounts = [], [{"name": "dshm", "emptyDir": {"medium": "Memory"}}], [
        {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes += parts.volumes
    mounts += parts.mounts
    for scheme in _credential_schemes(model, url):
        env, vols, mnts = credentials(scheme, config.secret_names)
        cred_env, volumes, mounts = cred_env + env, volumes + vols, mounts + mnts
    if uses_adapter_loader(model):
        volumes.append({"name": ADAPTERS_VOLUME, "emptyDir": {}})
        mounts.append({"name": ADAPTERS_VOLUME, "mountPath": ADAPTERS_DIR, "readOnly": True})
    file_vols, file_mounts = _file_volumes(model)
    user_env = [{"name": k, "value": v} for k, v in sorted(model.spec.env.items())]
    container: dict[str, Any] = {"name": SERVER_CONTAINER}
    if parts.command:
        container["command"] = parts.command
    args = parts.args + kv_events_args(model) + scheduling_policy_args(model) + list(model.spec.args)
    if args:
        container["args"] = args
    env = merge_env(parts.env, cred_env, user_env)
    if env:
        container["env"] = env
    if model.spec.env_from:
        container["envFrom"] = [dict(item) for item in model.spec.env_from]
    container["ports"] = [{"name": PORT_NAME, "containerPort": MODEL_PORT, "protocol": "TCP"}]
    container["startupProbe"] = parts.startup
    container["readinessProbe"] = parts.readiness
    container["livenessProbe"] = parts.liveness
    container["volumeMounts"] = mounts + file_mounts
    return container, volumes + file_vols


# ---------------------------------------------------------------------------------------------
# The adapter-loader sidecar


def uses_adapter_loader(model: Model) -> bool:
    return bool(model.spec.adapters) and model.spec.engine in ADAPTER_ENGINES


def adapter_loader_container(model: Model, config: SystemConfig) -> dict[str, Any] | None:
    """The sidecar that fetches adapters (any scheme) into the volume the server loads them from.

    It does not depend on which adapters the Model lists, nor on their schemes (it gets every
    scheme's optional credentials), so adding or changing an adapter never rolls the Pods:
    adapters change on live replicas through the LoRA API.
    """
    if not uses_adapter_loader(model):
        return None
    env: list[EnvVar] = []
    mounts: list[Mount] = [{"name": ADAPTERS_VOLUME, "mountPath": ADAPTERS_DIR}]
    for scheme in ("hf", "s3", "gs", "oss"):
        scheme_env, _, scheme_mounts = credentials(scheme, config.secret_names)
        env, mounts = env + scheme_env, mounts + scheme_mounts
    return {
        "name": LOADER_CONTAINER,
        "image": config.model_loading.image,
        "command": ["python", "-m", "lb_operator.loader", "serve", "--dir", ADAPTERS_DIR,
                    "--port", str(LOADER_PORT)],
        "env": env,
        "ports": [{"name": "loader", "containerPort": LOADER_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": LOADER_PORT}, "periodSeconds": 10},
        "volumeMounts": mounts,
    }


def adapter_loader_volumes(model: Model, config: SystemConfig) -> list[Volume]:
    """Volumes the sidecar needs beyond the server's: the GCS credentials Secret, if not there yet."""
    if not uses_adapter_loader(model):
        return []
    return credentials("gs", config.secret_names)[1]
