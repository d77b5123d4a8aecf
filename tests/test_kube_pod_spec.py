"""Pod manifests per engine and profile: exact commands, env, probes, volumes, images, patches, hash."""

import json
import subprocess
import sys

import pytest

from lb.model import Model, ModelValidationError
from lb_operator.kube.engines import PodSpecError, cache_dir, file_key, files_config_map
from lb_operator.json_patch import JsonPatchError, apply_patch
from lb_operator.kube.pods import multiply_quantity, pod_for_model, pod_hash
from lb_operator.system_config import system_config_from_dict

CONFIG = system_config_from_dict({})


def model(name="m1", annotations=None, **spec):
    spec.setdefault("url", "hf://org/repo")
    spec.setdefault("engine", "VLLM")
    spec.setdefault("features", ["TextGeneration"])
    meta = {"name": name, "namespace": "ns"}
    if annotations:
        meta["annotations"] = annotations
    return Model.from_dict({"apiVersion": "kubeai.org/v1", "kind": "Model", "metadata": meta, "spec": spec})


def server(pod):
    container = pod["spec"]["containers"][0]
    assert container["name"] == "server"
    return container


def env_of(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def mounts_of(container):
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def volumes_of(pod):
    return {v["name"]: v for v in pod["spec"]["volumes"]}


def assert_common(pod):
    c = server(pod)
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert mounts_of(c)["/dev/shm"]["name"] == "dshm"
    assert volumes_of(pod)["dshm"] == {"name": "dshm", "emptyDir": {"medium": "Memory"}}


# -- engines -----------------------------------------------------------------------------------

def test_vllm_pod():
    pod = pod_for_model(model(args=["--max-model-len=4096"], env={"B": "2", "A": "1"}), CONFIG)
    c = server(pod)
    assert_common(pod)
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert c["args"] == ["--model=org/repo", "--served-model-name=m1", "--max-model-len=4096"]
    assert [e["name"] for e in c["env"]] == ["HF_TOKEN", "A", "B"]
    assert env_of(c)["HF_TOKEN"] == {"secretKeyRef": {"name": "kvgate-huggingface", "key": "token", "optional": True}}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] == 3 * 3600
    assert (c["readinessProbe"]["periodSeconds"], c["livenessProbe"]["periodSeconds"]) == (10, 30)
    assert c["image"] == "vllm/vllm-openai:v0.8.5"
    assert "resources" not in c
    meta = pod["metadata"]
    assert meta["generateName"] == "m1".join(["model-", "-"]) and meta["namespace"] == "ns"
    assert meta["labels"]["model"] == "m1" and meta["labels"]["kvgate.dev/engine"] == "VLLM"
    assert meta["labels"]["features.kvgate.dev/TextGeneration"] == "true"
    assert len(meta["labels"]["pod-hash"]) == 10


def test_vllm_with_adapters_enables_runtime_lora():
    pod = pod_for_model(model(adapters=[{"name": "sql", "url": "s3://bucket/sql"}]), CONFIG)
    c = server(pod)
    assert c["args"][-1] == "--enable-lora"
    env = env_of(c)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "HF_TOKEN" in env  # model from hf; the adapter from s3 is fetched by the loader sidecar
    assert "AWS_ACCESS_KEY_ID" in env_of(pod["spec"]["containers"][1])


def test_vllm_from_pvc_mounts_claim():
    pod = pod_for_model(model(url="pvc://models-pvc/llama/8b"), CONFIG)
    c = server(pod)
    assert c["args"][0] == "--model=/model"
    assert mounts_of(c)["/model"] == {"name": "model", "mountPath": "/model", "subPath": "llama/8b"}
    assert volumes_of(pod)["model"] == {"name": "model", "persistentVolumeClaim": {"claimName": "models-pvc"}}
    assert "env" not in c  # no credentials for a PVC


def test_vllm_from_cache_reads_cache_dir():
    m = model(url="gs://bucket/llama", cacheProfile="fast")
    pod = pod_for_model(m, CONFIG)
    c = server(pod)
    assert c["args"][0] == f"--model={cache_dir(m)}" and cache_dir(m).startswith("/models/m1-")
    assert mounts_of(c)["/models"]["readOnly"] is True
    assert volumes_of(pod)["models"]["persistentVolumeClaim"]["claimName"] == "shared-model-cache-fast"
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env_of(c)  # the loader fetched it, not the server


def test_ollama_pod():
    pod = pod_for_model(model(url="ollama://qwen2:0.5b", engine="OLlama"), CONFIG)
    c = server(pod)
    assert_common(pod)
    assert "command" not in c and "args" not in c
    assert env_of(c) == {"OLLAMA_HOST": "0.0.0.0:8000", "OLLAMA_KEEP_ALIVE": "999999h"}
    assert c["startupProbe"]["exec"]["command"] == [
        "bash", "-c", "/bin/ollama pull qwen2:0.5b && /bin/ollama cp qwen2:0.5b m1 && /bin/ollama run m1 hi"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/"
    assert c["image"] == "ollama/ollama:latest"


def test_ollama_embedding_insecure_and_pvc_variants():
    c = server(pod_for_model(model(url="ollama://reg/nomic?insecure=true", engine="OLlama",
                                   features=["TextEmbedding"]), CONFIG))
    assert c["startupProbe"]["exec"]["command"][2] == "/bin/ollama pull --insecure reg/nomic && /bin/ollama cp reg/nomic m1"
    c = server(pod_for_model(model(url="ollama://qwen2?pull=false", engine="OLlama"), CONFIG))
    assert c["startupProbe"]["exec"]["command"][2] == "/bin/ollama cp qwen2 m1 && /bin/ollama run m1 hi"
    pod = pod_for_model(model(url="pvc://store?model=qwen2:0.5b", engine="OLlama"), CONFIG)
    c = server(pod)
    assert env_of(c)["OLLAMA_MODELS"] == "/model"
    assert c["startupProbe"]["exec"]["command"][2] == "/bin/ollama cp qwen2:0.5b m1 && /bin/ollama run m1 hi"
    assert volumes_of(pod)["model"]["persistentVolumeClaim"]["claimName"] == "store"


def test_infinity_pod():
    c = server(pod_for_model(model(url="hf://BAAI/bge", engine="Infinity", features=["TextEmbedding"],
                                   args=["--batch-size=8"]), CONFIG))
    assert c["args"] == ["v2", "--batch-size=8"] and "command" not in c
    assert [(e["name"], e.get("value")) for e in c["env"][:5]] == [
        ("INFINITY_MODEL_ID", "BAAI/bge"), ("INFINITY_SERVED_MODEL_NAME", "m1"), ("INFINITY_URL_PREFIX", "/v1"),
        ("INFINITY_ENGINE", "torch"), ("INFINITY_PORT", "8000")]
    assert c["startupProbe"]["failureThreshold"] == 600 and c["image"] == "michaelf34/infinity:latest"


def test_faster_whisper_pod_with_gpu_image():
    c = server(pod_for_model(model(url="hf://Systran/faster-whisper-tiny", engine="FasterWhisper",
                                   features=["SpeechToText"], resourceProfile="nvidia-gpu-t4:1"), CONFIG))
    assert env_of(c)["WHISPER__MODEL"] == "Systran/faster-whisper-tiny" and env_of(c)["ENABLE_UI"] == "false"
    assert c["image"] == "fedirz/faster-whisper-server:latest-cuda"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"


def test_sim_pod():
    c = server(pod_for_model(model(url="hf://org/repo", engine="Sim", args=["--profile", "fast"],
                                   adapters=[{"name": "a1", "url": "hf://org/a1"}]), CONFIG))
    assert c["command"] == ["python", "-m", "kvgate_sim"]
    assert c["args"] == ["--host", "0.0.0.0", "--port", "8000", "--model-name", "m1", "--model", "org/repo",
                         "--enable-lora", "--profile", "fast"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["image"] == "ghcr.io/kvgate/kvgate:0.1.0"


def test_sim_args_parse_with_the_real_cli():
    c = server(pod_for_model(model(engine="Sim"), CONFIG))
    out = subprocess.run([sys.executable, "-m", "kvgate_sim", *c["args"], "--list-profiles"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


KV_EVENTS = {"strategy": "CacheAware",
             "cacheAware": {"kvEvents": {"port": 5557, "replayPort": 5558, "topic": "kv"}}}


@pytest.mark.parametrize("engine", ["VLLM", "Sim"])
def test_kv_events_flag_on_every_pod_with_the_models_ports(engine):
    """Every Pod publishes on the Model's ports (its own address), in vLLM's JSON; a flag the
    Model's args give wins; an engine that does not publish gets none."""
    c = server(pod_for_model(model(engine=engine, loadBalancing=KV_EVENTS), CONFIG))
    at = c["args"].index("--kv-events-config")
    assert json.loads(c["args"][at + 1]) == {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558", "topic": "kv"}
    own = ["--kv-events-config", '{"enable_kv_cache_events": true}']
    c = server(pod_for_model(model(engine=engine, loadBalancing=KV_EVENTS, args=own), CONFIG))
    assert c["args"].count("--kv-events-config") == 1 and c["args"][-2:] == own
    c = server(pod_for_model(model(engine="Infinity", features=["TextEmbedding"],
                                   loadBalancing=KV_EVENTS), CONFIG))
    assert "--kv-events-config" not in c.get("args", [])


def test_sim_pod_kv_events_flag_parses_with_the_real_cli():
    c = server(pod_for_model(model(engine="Sim", loadBalancing=KV_EVENTS), CONFIG))
    out = subprocess.run([sys.executable, "-m", "kvgate_sim", *c["args"], "--list-profiles"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_llama_cpp_pod_variants():
    pod = pod_for_model(model(url="pvc://ggufs/smol/model.gguf", engine="LlamaCpp"), CONFIG)
    c = server(pod)
    assert c["command"] == ["python3", "-m", "llama_cpp.server"]
    assert c["args"] == ["--model", "/model/model.gguf", "--model_alias", "m1", "--host", "0.0.0.0", "--port", "8000"]
    assert mounts_of(c)["/model"]["subPath"] == "smol"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/models"  # llama_cpp.server has no /health
    c = server(pod_for_model(model(url="hf://org/repo/q4.gguf", engine="LlamaCpp"), CONFIG))
    assert c["args"][:4] == ["--hf_model_repo_id", "org/repo", "--model", "q4.gguf"]
    c = server(pod_for_model(model(url="file:///srv/m.gguf", engine="LlamaCpp"), CONFIG))
    assert c["args"][:2] == ["--model", "/srv/m.gguf"]


# -- credentials, files, env ---------------------------------------------------------------------

@pytest.mark.parametrize("url, expected", [
    ("hf://o/r", {"HF_TOKEN": ("kvgate-huggingface", "token")}),
    ("s3://b/p", {"AWS_ACCESS_KEY_ID": ("kvgate-aws", "accessKeyID"),
                  "AWS_SECRET_ACCESS_KEY": ("kvgate-aws", "secretAccessKey")}),
    ("pvc://claim", {}),
])
def test_credentials_by_scheme(url, expected):
    c = server(pod_for_model(model(url=url), CONFIG))
    refs = {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in c.get("env", []) if "valueFrom" in e}
    assert refs == expected


def test_gcs_and_oss_credentials_for_adapters_and_custom_secret_names():
    config = system_config_from_dict({"secretNames": {"gcp": "g", "alibaba": "ali"}})
    pod = pod_for_model(model(adapters=[{"name": "x", "url": "gs://b/x"}, {"name": "y", "url": "oss://b/y"}]), config)
    c = pod["spec"]["containers"][1]  # the adapter-loader sidecar fetches adapters
    env = env_of(c)
    assert env["GOOGLE_APPLICATION_CREDENTIALS"] == "/secrets/gcp-credentials/credentials.json"
    assert volumes_of(pod)["gcp-credentials"]["secret"]["secretName"] == "g"
    assert mounts_of(c)["/secrets/gcp-credentials"]["name"] == "gcp-credentials"
    assert env["OSS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "ali"
    assert env["OSS_ACCESS_KEY_SECRET"]["secretKeyRef"]["key"] == "accessKeySecret"


def test_user_env_overrides_engine_env_and_env_from_is_kept():
    m = model(engine="OLlama", url="ollama://q", env={"OLLAMA_KEEP_ALIVE": "5m"},
              envFrom=[{"secretRef": {"name": "extra"}}])
    c = server(pod_for_model(m, CONFIG))
    names = [e["name"] for e in c["env"]]
    assert names.count("OLLAMA_KEEP_ALIVE") == 1 and env_of(c)["OLLAMA_KEEP_ALIVE"] == "5m"
    assert c["envFrom"] == [{"secretRef": {"name": "extra"}}]


def test_files_become_config_map_with_subpath_mounts():
    files = [{"path": "/etc/app/a_b", "content": "one"}, {"path": "/etc/app/a/b", "content": "two"}]
    m = model(files=files)
    pod = pod_for_model(m, CONFIG)
    c = server(pod)
    cm = files_config_map(m)
    assert cm["metadata"]["name"] == "model-m1-files" and cm["metadata"]["namespace"] == "ns"
    assert len(cm["data"]) == 2  # KubeAI's '/'->'_' keys would collide here
    for f in files:
        mount = mounts_of(c)[f["path"]]
        assert mount["name"] == "model-files" and mount["readOnly"] is True
        assert cm["data"][mount["subPath"]] == f["content"]
    assert volumes_of(pod)["model-files"] == {"name": "model-files", "configMap": {"name": "model-m1-files"}}
    assert files_config_map(model()) is None
    assert file_key("/x/y.json").startswith("x_y.json.")


# -- profiles and images -----------------------------------------------------------------------

def test_resource_profile_multiplied_and_scheduling_fields():
    config = system_config_from_dict({"resourceProfiles": {"gpu": {
        "imageName": "nvidia-gpu", "requests": {"cpu": "500m", "memory": "1.5Gi", "nvidia.com/gpu": 1},
        "limits": {"nvidia.com/gpu": "1"}, "nodeSelector": {"pool": "a"},
        "tolerations": [{"key": "k", "operator": "Exists"}],
        "affinity": {"nodeAffinity": {"x": 1}}, "runtimeClassName": "nvidia", "schedulerName": "kueue"}}})
    pod = pod_for_model(model(resourceProfile="gpu:3", priorityClassName="high"), config)
    c, spec = server(pod), pod["spec"]
    assert c["resources"] == {"requests": {"cpu": "1500m", "memory": "4.5Gi", "nvidia.com/gpu": "3"},
                              "limits": {"nvidia.com/gpu": "3"}}
    assert spec["nodeSelector"] == {"pool": "a"} and spec["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert spec["affinity"] == {"nodeAffinity": {"x": 1}}
    assert (spec["runtimeClassName"], spec["schedulerName"], spec["priorityClassName"]) == ("nvidia", "kueue", "high")


def test_default_cpu_profile():
    pod = pod_for_model(model(resourceProfile="cpu:2"), CONFIG)
    assert server(pod)["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"}}
    assert server(pod)["image"] == "substratusai/vllm:v0.8.5-cpu"
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]


@pytest.mark.parametrize("q, n, out", [("24Gi", 2, "48Gi"), ("500m", 3, "1500m"), (1, 4, "4"),
                                       ("0.5", 3, "1.5"), ("1e3", 2, "2e3"), ("0.25Gi", 4, "1Gi")])
def test_multiply_quantity(q, n, out):
    assert multiply_quantity(q, n) == out


def test_image_precedence():
    config = system_config_from_dict({"resourceProfiles": {"odd": {"imageName": "no-such-variant"}}})
    assert server(pod_for_model(model(image="mine:1", resourceProfile="nvidia-gpu-l4:1"), config))["image"] == "mine:1"
    assert server(pod_for_model(model(resourceProfile="amd-gpu-mi300x:1"), config))["image"] == "rocm/vllm:latest"
    assert server(pod_for_model(model(resourceProfile="odd:1"), config))["image"] == "vllm/vllm-openai:v0.8.5"
    assert server(pod_for_model(model(), config))["image"] == "vllm/vllm-openai:v0.8.5"


def test_unknown_profile_names_the_field():
    with pytest.raises(PodSpecError, match=r"^spec\.resourceProfile: unknown profile 'tpu'"):
        pod_for_model(model(resourceProfile="tpu:1"), CONFIG)


# -- cluster settings, patches, owner ------------------------------------------------------------

def test_model_server_pod_settings_and_owner_reference():
    config = system_config_from_dict({"modelServerPods": {
        "serviceAccountName": "sa", "podSecurityContext": {"fsGroup": 1}, "securityContext": {"runAsUser": 0},
        "imagePullSecrets": [{"name": "reg"}]}})
    pod = pod_for_model(model(), config, owner_uid="uid-1")
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "sa" and spec["securityContext"] == {"fsGroup": 1}
    assert spec["imagePullSecrets"] == [{"name": "reg"}]
    assert server(pod)["securityContext"] == {"runAsUser": 0}
    assert pod["metadata"]["ownerReferences"] == [{"apiVersion": "kvgate.dev/v1", "kind": "Model", "name": "m1",
                                                   "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}]
    assert "ownerReferences" not in pod_for_model(model(), config)["metadata"]


def test_json_patches_apply_and_change_the_hash():
    patches = [
        {"op": "add", "path": "/spec/containers/0/env/-", "value": {"name": "X", "value": "1"}},
        {"op": "replace", "path": "/spec/containers/0/readinessProbe/periodSeconds", "value": 5},
        {"op": "add", "path": "/metadata/labels/team", "value": "ml"},
        {"op": "add", "path": "/spec/hostIPC", "value": True},
    ]
    config = system_config_from_dict({"modelServerPods": {"jsonPatches": patches}})
    pod = pod_for_model(model(), config)
    c = server(pod)
    assert c["env"][-1] == {"name": "X", "value": "1"} and c["readinessProbe"]["periodSeconds"] == 5
    assert pod["metadata"]["labels"]["team"] == "ml" and pod["spec"]["hostIPC"] is True
    assert pod["metadata"]["labels"]["pod-hash"] != pod_for_model(model(), CONFIG)["metadata"]["labels"]["pod-hash"]
    bad = system_config_from_dict({"modelServerPods": {"jsonPatches": [{"op": "remove", "path": "/spec/nope"}]}})
    with pytest.raises(PodSpecError, match=r"modelServerPods\.jsonPatches\[0\] remove '/spec/nope'"):
        pod_for_model(model(), bad)


def test_json_patch_rfc6902_operations():
    doc = {"a": {"b": [1, 2]}, "c~d": 1, "e/f": 2}
    out = apply_patch(doc, [
        {"op": "add", "path": "/a/b/1", "value": 9},
        {"op": "move", "from": "/c~0d", "path": "/moved"},
        {"op": "copy", "from": "/e~1f", "path": "/copied"},
        {"op": "remove", "path": "/a/b/0"},
        {"op": "test", "path": "/a/b", "value": [9, 2]},
    ])
    assert out == {"a": {"b": [9, 2]}, "e/f": 2, "moved": 1, "copied": 2}
    assert doc == {"a": {"b": [1, 2]}, "c~d": 1, "e/f": 2}  # input untouched
    for bad in ({"op": "test", "path": "/c~0d", "value": 2}, {"op": "replace", "path": "/zz", "value": 1},
                {"op": "add", "path": "/a/b/5", "value": 1}, {"op": "add", "path": "/a/b/01", "value": 1},
                {"op": "move", "from": "/a", "path": "/a/x"}):
        with pytest.raises(JsonPatchError):
            apply_patch(doc, [bad])


# -- hash -----------------------------------------------------------------------------------------

def test_pod_hash_is_stable_across_processes_and_sensitive_to_spec():
    code = ("from lb.model import Model; from lb_operator.kube.pods import pod_for_model;"
            "from lb_operator.system_config import system_config_from_dict as s;"
            "m = Model.from_dict({'apiVersion': 'kubeai.org/v1', 'kind': 'Model', 'metadata': {'name': 'm1',"
            "'namespace': 'ns'}, 'spec': {'url': 'hf://org/repo', 'engine': 'VLLM', 'features': ['TextGeneration'],"
            "'env': {'Z': '1', 'A': '2'}}});"
            "print(pod_for_model(m, s({}))['metadata']['labels']['pod-hash'])")
    hashes = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    local = pod_for_model(model(env={"A": "2", "Z": "1"}), CONFIG)["metadata"]["labels"]["pod-hash"]
    assert hashes == {local}
    base = pod_for_model(model(), CONFIG)["metadata"]["labels"]["pod-hash"]
    for change in ({"args": ["--x"]}, {"image": "other:1"}, {"resourceProfile": "cpu:1"}, {"env": {"A": "1"}}):
        assert pod_for_model(model(**change), CONFIG)["metadata"]["labels"]["pod-hash"] != base, change
    # Labels and replica counts are not part of the Pod's spec: no rollout for them.
    assert pod_for_model(model(replicas=3, maxReplicas=5), CONFIG)["metadata"]["labels"]["pod-hash"] == base
    assert pod_hash({"a": 1, "b": [1, 2]}) == pod_hash({"b": [1, 2], "a": 1})


@pytest.mark.parametrize("engine", ["VLLM", "Sim"])
def test_priority_scheduling_flag_on_pods_and_the_models_own_wins(engine):
    """priorityScheduling starts the engine with vLLM's priority policy (the gateway then sends
    each request's class as `priority`); a policy in the Model's args wins; other engines are
    refused at validation, not started with a flag they do not know."""
    c = server(pod_for_model(model(engine=engine, loadBalancing={"priorityScheduling": True}),
                             CONFIG))
    at = c["args"].index("--scheduling-policy")
    assert c["args"][at + 1] == "priority"
    assert "--scheduling-policy" not in server(pod_for_model(model(engine=engine), CONFIG)).get(
        "args", [])
    own = ["--scheduling-policy", "fcfs"]
    c = server(pod_for_model(model(engine=engine, loadBalancing={"priorityScheduling": True},
                                   args=own), CONFIG))
    assert c["args"].count("--scheduling-policy") == 1 and c["args"][-2:] == own
    with pytest.raises(ModelValidationError, match="priorityScheduling is only supported"):
        model(engine="OLlama", url="ollama://qwen", loadBalancing={"priorityScheduling": True})


def test_sim_pod_priority_flag_parses_with_the_real_cli():
    c = server(pod_for_model(model(engine="Sim", loadBalancing={"priorityScheduling": True}),
                             CONFIG))
    out = subprocess.run([sys.executable, "-m", "kvgate_sim", *c["args"], "--list-profiles"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
