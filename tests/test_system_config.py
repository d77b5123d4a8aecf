"""System config of the operator: defaults, merging over defaults, and errors that name the key."""

import pytest

from lb.config import ConfigError
from lb_operator.system_config import (
    DEFAULT_RESOURCE_PROFILES,
    load_system_config,
    parse_quantity,
    system_config_from_dict,
)


def test_defaults_cover_every_engine_and_common_accelerators():
    config = system_config_from_dict({})
    assert set(config.model_servers) == {"VLLM", "OLlama", "FasterWhisper", "Infinity", "Sim", "LlamaCpp"}
    for name in ("cpu", "nvidia-gpu-t4", "nvidia-gpu-l4", "nvidia-gpu-l40s", "nvidia-gpu-a100-80gb",
                 "nvidia-gpu-h100", "amd-gpu-mi300x"):
        assert name in config.resource_profiles
    assert config.resource_profiles["nvidia-gpu-l4"].limits == {"nvidia.com/gpu": "1"}
    assert config.secret_names.huggingface == "kvgate-huggingface"
    assert config.model_rollouts.surge == 1
    assert config.image_for("VLLM", "nvidia-gpu") == "vllm/vllm-openai:v0.8.5"
    assert config.image_for("VLLM", "no-such-variant") == config.model_servers["VLLM"].images["default"]


def test_kubeai_style_yaml_merges_over_defaults(tmp_path):
    path = tmp_path / "system.yaml"
    path.write_text("""
modelServers:
  VLLM:
    images:
      default: my/vllm:1
resourceProfiles:
  my-gpu:
    imageName: nvidia-gpu
    requests: {cpu: 4, memory: 16Gi, nvidia.com/gpu: 1}
    limits: {nvidia.com/gpu: "1"}
    nodeSelector: {pool: gpu}
    tolerations: [{key: gpu, operator: Exists, effect: NoSchedule, tolerationSeconds: 30}]
    affinity: {nodeAffinity: {}}
    runtimeClassName: nvidia
    schedulerName: volcano
cacheProfiles:
  fast:
    sharedFilesystem: {storageClassName: filestore}
modelServerPods:
  serviceAccountName: models
  securityContext: {runAsUser: 0}
  podSecurityContext: {fsGroup: 1000}
  imagePullSecrets: [{name: regcred}]
  jsonPatches: [{op: add, path: /metadata/labels/team, value: ml}]
modelLoading: {image: loader:2}
secretNames: {huggingface: hf, aws: aws-creds}
allowPodAddressOverride: true
""")
    config = load_system_config(path)
    vllm = config.model_servers["VLLM"].images
    assert vllm["default"] == "my/vllm:1" and vllm["nvidia-gpu"] == "vllm/vllm-openai:v0.8.5"
    assert config.model_servers["OLlama"].images["default"] == "ollama/ollama:latest"
    profile = config.resource_profiles["my-gpu"]
    assert profile.requests == {"cpu": 4, "memory": "16Gi", "nvidia.com/gpu": 1}
    assert profile.tolerations[0]["tolerationSeconds"] == 30
    assert profile.runtime_class_name == "nvidia" and profile.scheduler_name == "volcano"
    assert "cpu" in config.resource_profiles  # defaults kept
    assert config.cache_profiles["fast"].shared_filesystem.storage_class_name == "filestore"
    assert config.model_server_pods.image_pull_secrets == ({"name": "regcred"},)
    assert config.secret_names.huggingface == "hf" and config.secret_names.gcp == "kvgate-gcp"
    assert config.model_loading.image == "loader:2" and config.allow_pod_address_override


@pytest.mark.parametrize("data, key", [
    ({"resourceProfiles": {"x": {"requests": {"cpu": "lots"}}}}, "resourceProfiles.x.requests.cpu"),
    ({"resourceProfiles": {"x": {"requests": {"memory": "-1Gi"}}}}, "resourceProfiles.x.requests.memory"),
    ({"resourceProfiles": {"x": {"imagename": "cpu"}}}, "resourceProfiles.x.imagename: unknown key"),
    ({"resourceProfiles": {"x": {"nodeSelector": {"a": 1}}}}, "resourceProfiles.x.nodeSelector.a: expected a string"),
    ({"resourceProfiles": {"x": {"tolerations": [{"operator": "In"}]}}}, "resourceProfiles.x.tolerations[0].operator"),
    ({"resourceProfiles": {"a:b": {}}}, "resourceProfiles.a:b"),
    ({"modelServers": {"Triton": {"images": {"default": "t"}}}}, "modelServers.Triton: unknown engine"),
    ({"modelServers": {"VLLM": {"images": {"cpu": ""}}}}, "modelServers.VLLM.images.cpu"),
    ({"modelServers": {"VLLM": {"images": "x"}}}, "modelServers.VLLM.images: expected a mapping"),
    ({"cacheProfiles": {"c": {}}}, "cacheProfiles.c.sharedFilesystem: required"),
    ({"cacheProfiles": {"c": {"sharedFilesystem": {"storageClassName": "a", "persistentVolumeName": "b"}}}},
     "cacheProfiles.c.sharedFilesystem: set exactly one"),
    ({"modelServerPods": {"jsonPatches": [{"op": "frob", "path": "/x"}]}}, "modelServerPods.jsonPatches[0].op"),
    ({"modelServerPods": {"jsonPatches": [{"op": "add", "path": "x", "value": 1}]}},
     "modelServerPods.jsonPatches[0].path"),
    ({"modelServerPods": {"jsonPatches": [{"op": "replace", "path": "/x"}]}}, "modelServerPods.jsonPatches[0].value"),
    ({"modelServerPods": {"imagePullSecrets": [{}]}}, "modelServerPods.imagePullSecrets[0].name"),
    ({"modelServerPods": {"securityContext": "root"}}, "modelServerPods.securityContext: expected a mapping"),
    ({"modelRollouts": {"surge": 0}}, "modelRollouts.surge"),
    ({"modelRollouts": {"surge": True}}, "modelRollouts.surge: expected an integer"),
    ({"secretNames": {"aws": ""}}, "secretNames.aws"),
    ({"modelLoading": {"image": ""}}, "modelLoading.image"),
    ({"bogus": 1}, "bogus: unknown key"),
    ([], "expected a mapping, got []"),
])
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        system_config_from_dict(data)
    assert str(err.value).startswith(key), str(err.value)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modelRollouts: {surge: 0}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:1: modelRollouts\.surge"):
        load_system_config(path)
    path.write_text("a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_system_config(path)


@pytest.mark.parametrize("text, number, suffix", [
    ("24Gi", "24", "Gi"), (1, "1", ""), ("500m", "500", "m"), ("1.5", "1.5", ""), ("1e3", "1", "e3"), (0.5, "0.5", ""),
])
def test_parse_quantity(text, number, suffix):
    value, unit = parse_quantity(text)
    assert str(value) == number and unit == suffix


def test_default_profiles_are_valid_quantities():
    for profile in DEFAULT_RESOURCE_PROFILES.values():
        for q in [*profile.requests.values(), *profile.limits.values()]:
            parse_quantity(q)
