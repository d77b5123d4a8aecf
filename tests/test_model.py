"""The Model resource: parsing KubeAI manifests, validation, round trips, and the generated CRD.

The CRD is also checked against the Python validation by a small API-server stand-in below that
applies the schema's defaults, structural constraints and CEL rules (evaluated with cel-python):
every rule case must be rejected by both, every valid case accepted by both.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal

import pytest
import yaml

try:
    import celpy
except ImportError:  # the CRD-versus-Python checks need cel-python; the rest does not
    celpy = None
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.model import (
    ADAPTER_ENGINES,
    API_VERSION,
    ENGINES,
    FEATURES,
    KUBEAI_API_VERSION,
    STRATEGIES,
    Adapter,
    LoadBalancing,
    Model,
    ModelSpec,
    ModelStatus,
    ModelValidationError,
    PrefixHash,
    crd_manifest,
    join_model_adapter,
    main,
    parse_model_url,
    split_model_adapter,
    validate_update,
)

ROOT = Path(__file__).resolve().parent.parent

# Shapes of KubeAI's own catalog manifests, apiVersion untouched.
LLAMA_VLLM = """
apiVersion: kubeai.org/v1
kind: Model
metadata:
  name: llama-3.1-8b-instruct-fp8-l4
  namespace: models
  labels: {tenancy: public}
  annotations: {team: ml}
spec:
  features: [TextGeneration]
  owner: neuralmagic
  url: hf://neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8
  engine: VLLM
  args:
    - --max-model-len=16384
    - --max-num-batched-token=16384
    - --gpu-memory-utilization=0.9
  env: {VLLM_ATTENTION_BACKEND: FLASHINFER}
  envFrom:
    - secretRef: {name: hf-token}
  adapters:
    - name: colorist
      url: hf://jashing/tinyllama-colorist-lora
    - name: sql
      url: s3://my-bucket/adapters/sql
  files:
    - path: /config/chat-template.jinja
      content: "{% for m in messages %}{{ m.content }}{% endfor %}"
  resourceProfile: nvidia-gpu-l4:1
  cacheProfile: standard-filestore
  priorityClassName: high-priority
  minReplicas: 1
  maxReplicas: 8
  targetRequests: 32
  scaleDownDelaySeconds: 60
  loadBalancing:
    strategy: PrefixHash
    prefixHash:
      meanLoadFactor: 150
      prefixCharLength: 200
"""
GEMMA_OLLAMA = """
apiVersion: kubeai.org/v1
kind: Model
metadata:
  name: gemma2-2b-cpu
spec:
  features: [TextGeneration]
  owner: google
  url: ollama://gemma2:2b
  engine: OLlama
  resourceProfile: cpu:2
"""
WHISPER = """
apiVersion: kubeai.org/v1
kind: Model
metadata:
  name: faster-whisper-medium-en-cpu
spec:
  features: [SpeechToText]
  owner: Systran
  url: hf://Systran/faster-whisper-medium.en
  engine: FasterWhisper
  resourceProfile: cpu:1
"""
BGE_INFINITY = """
apiVersion: kubeai.org/v1
kind: Model
metadata:
  name: bge-embed-text-cpu
spec:
  features: [TextEmbedding]
  owner: baai
  url: hf://BAAI/bge-small-en-v1.5
  engine: Infinity
  resourceProfile: cpu:1
"""
EXAMPLES = [LLAMA_VLLM, GEMMA_OLLAMA, WHISPER, BGE_INFINITY]

BASE = {
    "apiVersion": API_VERSION,
    "kind": "Model",
    "metadata": {"name": "m"},
    "spec": {"url": "hf://org/model", "engine": "VLLM", "features": ["TextGeneration"]},
}


def manifest(**changes: Any) -> dict[str, Any]:
    """BASE with dotted paths set, e.g. manifest(**{"spec.loadBalancing.strategy": "Random"})."""
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return doc


def rejection(doc: dict[str, Any]) -> ModelValidationError:
    with pytest.raises(ModelValidationError) as info:
        Model.from_dict(doc)
    return info.value


def adapter(name: str, url: str = "hf://org/lora") -> dict[str, str]:
    return {"name": name, "url": url}


def file_(path: str, content: str = "x") -> dict[str, str]:
    return {"path": path, "content": content}


# ---------------------------------------------------------------------------------------------
# Parsing


def test_parses_full_kubeai_vllm_manifest() -> None:
    model = Model.from_dict(yaml.safe_load(LLAMA_VLLM))
    spec = model.spec
    assert (model.name, model.namespace) == ("llama-3.1-8b-instruct-fp8-l4", "models")
    assert model.labels == {"tenancy": "public"} and model.annotations == {"team": "ml"}
    assert spec.engine == "VLLM" and spec.features == ("TextGeneration",)
    assert spec.args == ("--max-model-len=16384", "--max-num-batched-token=16384", "--gpu-memory-utilization=0.9")
    assert spec.env == {"VLLM_ATTENTION_BACKEND": "FLASHINFER"}
    assert spec.env_from == ({"secretRef": {"name": "hf-token"}},)
    assert spec.adapters == (
        Adapter(name="colorist", url="hf://jashing/tinyllama-colorist-lora"),
        Adapter(name="sql", url="s3://my-bucket/adapters/sql"),
    )
    assert spec.files[0].path == "/config/chat-template.jinja" and "messages" in spec.files[0].content
    assert spec.parsed_resource_profile() == ("nvidia-gpu-l4", 1)
    assert (spec.cache_profile, spec.priority_class_name, spec.owner) == (
        "standard-filestore", "high-priority", "neuralmagic")
    assert (spec.min_replicas, spec.max_replicas, spec.target_requests, spec.scale_down_delay_seconds) == (1, 8, 32, 60)
    # Given prefixHash fields kept, the missing one defaulted.
    assert spec.load_balancing == LoadBalancing(
        strategy="PrefixHash", prefix_hash=PrefixHash(mean_load_factor=150, replication=256, prefix_char_length=200)
    )
    assert spec.parsed_url().ref == "neuralmagic/Meta-Llama-3.1-8B-Instruct-FP8"
    assert model.status is None


@pytest.mark.parametrize(
    ("text", "engine", "feature", "scheme"),
    [
        (GEMMA_OLLAMA, "OLlama", "TextGeneration", "ollama"),
        (WHISPER, "FasterWhisper", "SpeechToText", "hf"),
        (BGE_INFINITY, "Infinity", "TextEmbedding", "hf"),
    ],
)
def test_parses_kubeai_catalog_manifests(text: str, engine: str, feature: str, scheme: str) -> None:
    doc = yaml.safe_load(text)
    model = Model.from_dict(doc)
    assert model.name == doc["metadata"]["name"]
    assert model.spec.engine == engine and model.spec.features == (feature,)
    assert model.spec.parsed_url().scheme == scheme
    assert model.spec.owner == doc["spec"]["owner"]


def test_defaults_applied() -> None:
    spec = Model.from_dict(BASE).spec
    assert spec.adapters == () and spec.args == () and spec.files == () and spec.env_from == ()
    assert spec.env == {} and spec.image == "" and spec.cache_profile == "" and spec.resource_profile == ""
    assert spec.replicas is None and spec.max_replicas is None
    assert spec.min_replicas == 0 and spec.autoscaling_disabled is False
    assert spec.target_requests == 100 and spec.scale_down_delay_seconds == 30
    assert spec.load_balancing.strategy == "LeastLoad"
    assert spec.load_balancing.prefix_hash == PrefixHash(mean_load_factor=125, replication=256, prefix_char_length=100)
    assert spec.parsed_resource_profile() is None
    assert Model.from_dict(BASE).namespace == "default"


def test_explicit_nulls_mean_absent() -> None:
    doc = manifest(**{"spec.maxReplicas": None, "spec.loadBalancing": None, "spec.adapters": None, "status": None})
    spec = Model.from_dict(doc).spec
    assert spec.max_replicas is None and spec.load_balancing == LoadBalancing() and spec.adapters == ()


def test_status_parsed() -> None:
    doc = manifest(status={"replicas": {"all": 3, "ready": 2}, "cache": {"loaded": True}})
    status = Model.from_dict(doc).status
    assert status is not None
    assert (status.replicas.all, status.replicas.ready, status.cache.loaded) == (3, 2, True)
    assert Model.from_dict(manifest(status={})).status == ModelStatus()


@pytest.mark.parametrize("api_version", [API_VERSION, KUBEAI_API_VERSION])
def test_accepts_both_api_versions_and_writes_ours(api_version: str) -> None:
    model = Model.from_dict(manifest(apiVersion=api_version))
    assert model.to_dict()["apiVersion"] == API_VERSION


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"apiVersion": "kubeai.org/v2"}, "apiVersion", "kubeai.org/v2"),
        ({"kind": "Pod"}, "kind", "'Pod'"),
        ({"extra": 1}, "extra", "unknown key"),
        ({"metadata": None}, "metadata", "expected a mapping"),
        ({"metadata": {}}, "metadata.name", "required"),
        ({"metadata.name": 7}, "metadata.name", "expected a string, got 7"),
        ({"metadata.labels": {"a": 1}}, "metadata.labels.a", "expected a string"),
        ({"spec": None}, "spec", "required"),
        ({"spec": []}, "spec", "expected a mapping"),
    ],
)
def test_envelope_errors(changes: dict[str, Any], field: str, fragment: str) -> None:
    err = rejection(manifest(**changes))
    assert err.field == field and fragment in str(err)


def test_wrong_type_message_names_field_path() -> None:
    err = rejection(manifest(**{"spec.maxReplicas": "abc"}))
    assert str(err) == "spec.maxReplicas: expected an integer, got 'abc'"
    assert err.field == "spec.maxReplicas" and isinstance(err, ValueError)


@pytest.mark.parametrize(
    ("path", "value", "field", "expected"),
    [
        ("spec.minReplicas", True, "spec.minReplicas", "integer"),  # YAML booleans are not numbers
        ("spec.targetRequests", 1.5, "spec.targetRequests", "integer"),
        ("spec.autoscalingDisabled", "yes", "spec.autoscalingDisabled", "boolean"),
        ("spec.features", "TextGeneration", "spec.features", "a list"),
        ("spec.features", [1], "spec.features[0]", "string"),
        ("spec.url", 3, "spec.url", "string"),
        ("spec.args", ["--a", 2], "spec.args[1]", "string"),
        ("spec.env", {"PORT": 8000}, "spec.env.PORT", "string"),
        ("spec.env", ["A=1"], "spec.env", "a mapping"),
        ("spec.envFrom", {"secretRef": {}}, "spec.envFrom", "a list"),
        ("spec.adapters", [{"name": 5, "url": "hf://a/b"}], "spec.adapters[0].name", "string"),
        ("spec.adapters", ["colorist"], "spec.adapters[0]", "a mapping"),
        ("spec.files", [{"path": "/a"}], "spec.files[0].content", "required"),
        ("spec.loadBalancing", "PrefixHash", "spec.loadBalancing", "a mapping"),
        ("spec.loadBalancing.prefixHash.replication", "x", "spec.loadBalancing.prefixHash.replication", "integer"),
    ],
)
def test_wrong_types_rejected_with_path(path: str, value: Any, field: str, expected: str) -> None:
    err = rejection(manifest(**{path: value}))
    assert err.field == field and expected in str(err)


@pytest.mark.parametrize(
    ("path", "field", "suggestion"),
    [
        ("spec.maxReplica", "spec.maxReplica", "maxReplicas"),
        ("spec.max_replicas", "spec.max_replicas", "maxReplicas"),
        ("spec.loadBalancing.prefixHash.meanLoadPercentage", "spec.loadBalancing.prefixHash.meanLoadPercentage", ""),
        ("spec.jsonPatches", "spec.jsonPatches", ""),
    ],
)
def test_unknown_spec_fields_rejected(path: str, field: str, suggestion: str) -> None:
    err = rejection(manifest(**{path: 1}))
    assert err.field == field and "unknown key" in str(err) and suggestion in str(err)


@pytest.mark.parametrize("missing", ["url", "engine", "features"])
def test_required_spec_fields(missing: str) -> None:
    doc = manifest()
    del doc["spec"][missing]
    err = rejection(doc)
    assert err.field == f"spec.{missing}" and "required" in str(err)


# ---------------------------------------------------------------------------------------------
# Validation rules. `python_only` marks checks that the CRD leaves to the API server's own
# name validation or that only the Python side makes (url query parameters).

REJECTED = [
    # (id, changes, field, python_only)
    ("name-41-chars", {"metadata.name": "a" * 41}, "metadata.name", False),
    ("name-underscore", {"metadata.name": "llama_3"}, "metadata.name", True),
    ("name-uppercase", {"metadata.name": "Llama"}, "metadata.name", True),
    ("name-empty", {"metadata.name": ""}, "metadata.name", True),
    ("min-over-max", {"spec.minReplicas": 3, "spec.maxReplicas": 2}, "spec.minReplicas", False),
    ("max-zero", {"spec.maxReplicas": 0}, "spec.maxReplicas", False),
    ("min-negative", {"spec.minReplicas": -1}, "spec.minReplicas", False),
    ("replicas-negative", {"spec.replicas": -1}, "spec.replicas", False),
    ("target-zero", {"spec.targetRequests": 0}, "spec.targetRequests", False),
    ("delay-negative", {"spec.scaleDownDelaySeconds": -1}, "spec.scaleDownDelaySeconds", False),
    ("mean-load-99", {"spec.loadBalancing.prefixHash.meanLoadFactor": 99},
     "spec.loadBalancing.prefixHash.meanLoadFactor", False),
    ("replication-zero", {"spec.loadBalancing.prefixHash.replication": 0},
     "spec.loadBalancing.prefixHash.replication", False),
    ("prefix-len-negative", {"spec.loadBalancing.prefixHash.prefixCharLength": -1},
     "spec.loadBalancing.prefixHash.prefixCharLength", False),
    ("strategy-unknown", {"spec.loadBalancing.strategy": "RoundRobin"}, "spec.loadBalancing.strategy", False),
    ("engine-unknown", {"spec.engine": "TGI"}, "spec.engine", False),
    ("feature-unknown", {"spec.features": ["TextGeneration", "Chat"]}, "spec.features[1]", False),
    ("adapters-ollama", {"spec.engine": "OLlama", "spec.url": "ollama://gemma2:2b", "spec.adapters": [adapter("a")]},
     "spec.adapters", False),
    ("adapters-infinity", {"spec.engine": "Infinity", "spec.adapters": [adapter("a")]}, "spec.adapters", False),
    ("adapter-duplicate", {"spec.adapters": [adapter("a"), adapter("b"), adapter("a", "s3://b/p")]},
     "spec.adapters[2].name", False),
    ("adapter-underscore", {"spec.adapters": [adapter("my_lora")]}, "spec.adapters[0].name", False),
    ("adapter-uppercase", {"spec.adapters": [adapter("Lora")]}, "spec.adapters[0].name", False),
    ("adapter-leading-dash", {"spec.adapters": [adapter("-lora")]}, "spec.adapters[0].name", False),
    ("adapter-64-chars", {"spec.adapters": [adapter("a" * 64)]}, "spec.adapters[0].name", False),
    ("adapter-url-pvc", {"spec.adapters": [adapter("a", "pvc://claim/lora")]}, "spec.adapters[0].url", False),
    ("adapter-url-param", {"spec.adapters": [adapter("a", "hf://o/l?rev=2")]}, "spec.adapters[0].url", True),
    ("url-http", {"spec.url": "http://example.com/model"}, "spec.url", False),
    ("url-empty", {"spec.url": ""}, "spec.url", False),
    ("url-uppercase-scheme", {"spec.url": "HF://org/model"}, "spec.url", False),
    ("url-nothing-after-scheme", {"spec.url": "hf://"}, "spec.url", True),
    ("url-space", {"spec.url": "hf://org/my model"}, "spec.url", True),
    ("url-unknown-param", {"spec.url": "hf://org/model?revision=main"}, "spec.url", True),
    ("url-pull-not-bool", {"spec.engine": "OLlama", "spec.url": "ollama://qwen2?pull=no"}, "spec.url", True),
    ("url-empty-model-param", {"spec.url": "pvc://claim?model="}, "spec.url", True),
    ("url-repeated-param", {"spec.url": "ollama://m?insecure=true&insecure=false"}, "spec.url", True),
    ("cache-ollama", {"spec.engine": "OLlama", "spec.url": "ollama://gemma2:2b", "spec.cacheProfile": "fs"},
     "spec.cacheProfile", False),
    ("cache-pvc", {"spec.url": "pvc://claim/model", "spec.cacheProfile": "fs"}, "spec.cacheProfile", False),
    ("cache-file", {"spec.url": "file:///models/m", "spec.cacheProfile": "fs"}, "spec.cacheProfile", False),
    ("gs-without-cache", {"spec.url": "gs://bucket/model"}, "spec.url", False),
    ("oss-without-cache", {"spec.url": "oss://bucket/model"}, "spec.url", False),
    ("file-relative", {"spec.files": [file_("config.yaml")]}, "spec.files[0].path", False),
    ("file-colon", {"spec.files": [file_("/etc/a:b")]}, "spec.files[0].path", False),
    ("file-path-1025", {"spec.files": [file_("/" + "p" * 1024)]}, "spec.files[0].path", False),
    ("file-duplicate", {"spec.files": [file_("/a"), file_("/a", "y")]}, "spec.files[1].path", False),
    ("files-11", {"spec.files": [file_(f"/f{i}") for i in range(11)]}, "spec.files", False),
    ("file-content-100001", {"spec.files": [file_("/big", "x" * 100001)]}, "spec.files[0].content", False),
    ("profile-no-count", {"spec.resourceProfile": "nvidia-gpu-l4"}, "spec.resourceProfile", False),
    ("profile-zero-count", {"spec.resourceProfile": "cpu:0"}, "spec.resourceProfile", False),
]

ACCEPTED = [
    ("name-40-chars-with-dots", {"metadata.name": "qwen2.5-7b-instruct." + "a" * 20}),
    ("sim-with-adapters", {"spec.engine": "Sim", "spec.adapters": [adapter("a"), adapter("b", "file:///loras/b")]}),
    ("vllm-adapters-all-schemes",
     {"spec.adapters": [adapter(f"a{i}", f"{s}://b/p") for i, s in enumerate(["hf", "s3", "gs", "oss"])]}),
    ("random-strategy", {"spec.loadBalancing.strategy": "Random"}),
    ("llamacpp-file-url", {"spec.engine": "LlamaCpp", "spec.url": "file:///models/smollm2.gguf"}),
    ("reranking", {"spec.engine": "Infinity", "spec.features": ["TextEmbedding", "Reranking"]}),
    ("gs-with-cache", {"spec.url": "gs://bucket/model", "spec.cacheProfile": "fs"}),
    ("hf-with-cache", {"spec.cacheProfile": "fs"}),
    ("pvc-model-param", {"spec.engine": "OLlama", "spec.url": "pvc://claim/models?model=qwen2:0.5b"}),
    ("ollama-params", {"spec.engine": "OLlama", "spec.url": "ollama://registry.local/qwen2?insecure=true&pull=false"}),
    ("replicas-above-max", {"spec.replicas": 9, "spec.maxReplicas": 2}),
    ("min-equals-max", {"spec.minReplicas": 2, "spec.maxReplicas": 2}),
    ("ten-files", {"spec.files": [file_(f"/f{i}", "x" * 100000) for i in range(10)]}),
    ("zero-prefix-and-delay", {"spec.loadBalancing.prefixHash.prefixCharLength": 0, "spec.scaleDownDelaySeconds": 0}),
]


@pytest.mark.parametrize(("changes", "field"), [case[1:3] for case in REJECTED], ids=[c[0] for c in REJECTED])
def test_rule_rejected_with_field_named(changes: dict[str, Any], field: str) -> None:
    err = rejection(manifest(**changes))
    assert err.field == field
    assert str(err).startswith(f"{field}: ")


@pytest.mark.parametrize("changes", [case[1] for case in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_valid_variants_accepted(changes: dict[str, Any]) -> None:
    model = Model.from_dict(manifest(**changes))
    assert Model.from_dict(model.to_dict()) == model


def test_direct_construction_is_validated_and_frozen() -> None:
    with pytest.raises(ModelValidationError) as info:
        ModelSpec(url="hf://o/m", engine="VLLM", features=("TextGeneration",), min_replicas=5, max_replicas=1)
    assert info.value.field == "minReplicas"
    with pytest.raises(ModelValidationError) as info:
        PrefixHash(replication=0)
    assert info.value.field == "replication"
    spec = ModelSpec(url="hf://o/m", engine="VLLM", features=("TextGeneration",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.url = "hf://o/other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("minimum", "maximum", "requested", "expected"),
    [(0, None, 0, 0), (0, None, 1000, 1000), (1, 3, 0, 1), (1, 3, 2, 2), (1, 3, 7, 3), (2, 2, 5, 2), (0, 4, -3, 0)],
)
def test_clamp_replicas(minimum: int, maximum: int | None, requested: int, expected: int) -> None:
    spec = ModelSpec(
        url="hf://o/m", engine="VLLM", features=("TextGeneration",), min_replicas=minimum, max_replicas=maximum
    )
    assert spec.clamp_replicas(requested) == expected


# ---------------------------------------------------------------------------------------------
# Updates (transition rules)

UPDATES = [
    # (id, old changes, new changes, field or None when allowed)
    ("replication-changed", {}, {"spec.loadBalancing.prefixHash.replication": 128},
     "spec.loadBalancing.prefixHash.replication"),
    ("url-changed-with-cache", {"spec.cacheProfile": "fs"}, {"spec.cacheProfile": "fs", "spec.url": "hf://o/m2"},
     "spec.url"),
    ("cache-profile-changed", {"spec.cacheProfile": "fs"}, {"spec.cacheProfile": "other"}, "spec.cacheProfile"),
    ("url-changed-without-cache", {}, {"spec.url": "hf://o/m2"}, None),
    ("cache-profile-added", {}, {"spec.cacheProfile": "fs"}, None),
    ("scaling-and-args-changed", {}, {"spec.minReplicas": 2, "spec.args": ["--x"], "spec.replicas": 4}, None),
    ("other-lb-settings-changed", {}, {"spec.loadBalancing.strategy": "PrefixHash",
                                       "spec.loadBalancing.prefixHash.meanLoadFactor": 200}, None),
]


@pytest.mark.parametrize(("old", "new", "field"), [u[1:] for u in UPDATES], ids=[u[0] for u in UPDATES])
def test_validate_update(old: dict[str, Any], new: dict[str, Any], field: str | None) -> None:
    before, after = Model.from_dict(manifest(**old)), Model.from_dict(manifest(**new))
    if field is None:
        validate_update(before, after)
        return
    with pytest.raises(ModelValidationError) as info:
        validate_update(before, after)
    assert info.value.field == field and "immutable" in str(info.value)


# ---------------------------------------------------------------------------------------------
# URLs and adapter names


@pytest.mark.parametrize(
    ("url", "scheme", "ref", "name", "path", "model", "insecure", "pull"),
    [
        ("hf://test-user/model-name", "hf", "test-user/model-name", "test-user", "model-name", "", False, True),
        ("gs://bucket-name/path/to/model", "gs", "bucket-name/path/to/model", "bucket-name", "path/to/model",
         "", False, True),
        ("ollama://gemma2:2b", "ollama", "gemma2:2b", "gemma2:2b", "", "", False, True),
        ("pvc://my-pvc", "pvc", "my-pvc", "my-pvc", "", "", False, True),
        ("pvc://my-pvc/", "pvc", "my-pvc/", "my-pvc", "", "", False, True),
        ("pvc://my-pvc/path/to/model?model=qwen2:0.5b", "pvc", "my-pvc/path/to/model", "my-pvc", "path/to/model",
         "qwen2:0.5b", False, True),
        ("ollama://reg.local/m?insecure=true&pull=false", "ollama", "reg.local/m", "reg.local", "m", "", True, False),
        ("file:///models/smollm2.gguf", "file", "/models/smollm2.gguf", "", "models/smollm2.gguf", "", False, True),
        ("a://path/b://to/model", "a", "path/b://to/model", "path", "b://to/model", "", False, True),
    ],
)
def test_parse_model_url(
    url: str, scheme: str, ref: str, name: str, path: str, model: str, insecure: bool, pull: bool
) -> None:
    parsed = parse_model_url(url)
    assert (parsed.scheme, parsed.ref, parsed.name, parsed.path) == (scheme, ref, name, path)
    assert (parsed.model, parsed.insecure, parsed.pull) == (model, insecure, pull)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "expected <scheme>://<ref>"),
        ("iNv@lid://path/to/model", "expected <scheme>://<ref>"),
        ("hf://org/my model", "without spaces"),
        ("hf://?model=x", "nothing after hf://"),
        ("hf://o/m?foo=1", "unknown query parameter 'foo'"),
        ("ollama://m?insecure=yes", "insecure= must be true or false"),
        ("pvc://c?model=", "model= must be a model name"),
    ],
)
def test_parse_model_url_errors(url: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_model_url(url)


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("m", ("m", "")),
        ("m_a", ("m", "a")),
        ("llama-3.1-8b_sql-lora", ("llama-3.1-8b", "sql-lora")),
        ("m_a_b", ("m", "a_b")),  # first "_" splits: adapter part keeps the rest
        ("m_", ("m", "")),
        ("_a", ("", "a")),
        ("", ("", "")),
    ],
)
def test_split_model_adapter(requested: str, expected: tuple[str, str]) -> None:
    assert split_model_adapter(requested) == expected


def test_join_model_adapter() -> None:
    assert join_model_adapter("m", "") == "m"
    assert join_model_adapter("m", "a") == "m_a"
    with pytest.raises(ValueError, match="contains '_'"):
        join_model_adapter("m_x", "a")


@given(model=st.from_regex(r"[a-z0-9.-]{1,40}", fullmatch=True), adapter_=st.text(max_size=20))
def test_join_then_split_round_trips(model: str, adapter_: str) -> None:
    assert split_model_adapter(join_model_adapter(model, adapter_)) == (model, adapter_)


# ---------------------------------------------------------------------------------------------
# Round trips

_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?", fullmatch=True)
_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
_env_key = st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True)


@st.composite
def _manifests(draw: st.DrawFn) -> dict[str, Any]:
    """Valid manifests with any subset of optional fields present."""
    engine = draw(st.sampled_from(ENGINES))
    cache = draw(st.sampled_from(["", "fs"]))
    schemes = ["hf", "s3", "gs", "oss"] if cache else ["hf", "pvc", "ollama", "s3", "file"]
    spec: dict[str, Any] = {
        "url": f"{draw(st.sampled_from(schemes))}://{draw(_label)}/{draw(_label)}",
        "engine": engine,
        "features": draw(st.lists(st.sampled_from(FEATURES), max_size=3)),
        **({"cacheProfile": cache} if cache else {}),
    }
    minimum = draw(st.integers(0, 5))
    optional: dict[str, Any] = {
        "adapters": draw(st.lists(st.builds(adapter, _label), max_size=3, unique_by=lambda a: a["name"]))
        if engine in ADAPTER_ENGINES else None,
        "resourceProfile": f"{draw(_label)}:{draw(st.integers(1, 8))}",
        "image": draw(_text),
        "args": draw(st.lists(_text, max_size=3)),
        "env": draw(st.dictionaries(_env_key, _text, max_size=3)),
        "envFrom": [{"configMapRef": {"name": draw(_label), "optional": draw(st.booleans())}}],
        "files": draw(st.lists(st.builds(file_, _label.map(lambda s: "/" + s), _text), max_size=3,
                               unique_by=lambda f: f["path"])),
        "priorityClassName": draw(_label),
        "replicas": draw(st.integers(0, 20)),
        "minReplicas": minimum,
        "maxReplicas": draw(st.integers(max(1, minimum), 20)),
        "autoscalingDisabled": draw(st.booleans()),
        "targetRequests": draw(st.integers(1, 1000)),
        "scaleDownDelaySeconds": draw(st.integers(0, 3600)),
        "loadBalancing": {
            "strategy": draw(st.sampled_from(STRATEGIES)),
            "prefixHash": {"meanLoadFactor": draw(st.integers(100, 400)), "replication": draw(st.integers(1, 512)),
                           "prefixCharLength": draw(st.integers(0, 1000))},
        },
        "owner": draw(_text),
    }
    for key, value in optional.items():
        if value and draw(st.booleans()):
            spec[key] = value
    doc = {"apiVersion": draw(st.sampled_from([API_VERSION, KUBEAI_API_VERSION])), "kind": "Model",
           "metadata": {"name": draw(_label), "labels": draw(st.dictionaries(_label, _label, max_size=2))},
           "spec": spec}
    if draw(st.booleans()):
        doc["status"] = {"replicas": {"all": draw(st.integers(0, 9)), "ready": draw(st.integers(0, 9))}}
    return doc


def _contains(given_: Any, written: Any) -> bool:
    """Everything the user wrote survives serialisation (defaults may be added around it)."""
    if isinstance(given_, dict):
        return all(value in ("", [], {}) or (key in written and _contains(value, written[key]))
                   for key, value in given_.items())
    if isinstance(given_, list):
        return len(given_) == len(written) and all(map(_contains, given_, written))
    return given_ == written


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_manifests())
def test_round_trip(doc: dict[str, Any]) -> None:
    model = Model.from_dict(doc)
    written = model.to_dict()
    assert Model.from_dict(written) == model
    assert Model.from_dict(written).to_dict() == written
    assert _contains({k: v for k, v in doc.items() if k != "apiVersion"}, written)
    # Plain JSON/YAML types only, camelCase keys only.
    assert json.loads(json.dumps(written)) == written
    assert yaml.safe_load(yaml.safe_dump(written)) == written
    assert not [key for key in _schema_keys(written["spec"]) if "_" in key]


def _schema_keys(value: Any) -> list[str]:
    """Keys that come from the schema (the keys of env are the user's own)."""
    if isinstance(value, list):
        return [key for item in value for key in _schema_keys(item)]
    if not isinstance(value, dict):
        return []
    return [*value, *(key for name, item in value.items() if name != "env" for key in _schema_keys(item))]


@pytest.mark.parametrize("text", EXAMPLES)
def test_to_dict_includes_defaults(text: str) -> None:
    written = Model.from_dict(yaml.safe_load(text)).to_dict()
    spec = written["spec"]
    for key in ("minReplicas", "targetRequests", "scaleDownDelaySeconds", "autoscalingDisabled", "loadBalancing"):
        assert key in spec
    assert spec["loadBalancing"]["loadUnit"] == "Requests"
    assert set(spec["loadBalancing"]["prefixHash"]) == {"meanLoadFactor", "replication", "prefixCharLength",
                                                        "prefixFrom"}
    if text is not LLAMA_VLLM:
        # Unset optionals stay absent, so CEL's has() and the Python side agree on them.
        assert not {"replicas", "maxReplicas", "cacheProfile", "adapters", "files", "image"} & set(spec)


# ---------------------------------------------------------------------------------------------
# The generated CRD

CRD = crd_manifest()
ROOT_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC_SCHEMA = ROOT_SCHEMA["properties"]["spec"]

KUBEAI_SPEC_FIELDS = {
    "url", "adapters", "features", "engine", "resourceProfile", "cacheProfile", "image", "args", "env", "envFrom",
    "replicas", "minReplicas", "maxReplicas", "autoscalingDisabled", "targetRequests", "scaleDownDelaySeconds",
    "owner", "loadBalancing", "files", "priorityClassName",
}
KVGATE_SPEC_FIELDS = {"splits"}  # kvgate's own, beyond KubeAI's


def _wire(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m[1].upper(), name)


def _assert_type_matches(tp: Any, schema: dict[str, Any], where: str) -> None:
    if typing.get_origin(tp) in (typing.Union, UnionType):
        (tp,) = [arg for arg in typing.get_args(tp) if arg is not NoneType]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        _walk(tp, schema, where)
    elif origin is Literal:
        assert schema["type"] == "string" and schema["enum"] == list(args), where
    elif origin is tuple:
        assert schema["type"] == "array", where
        _assert_type_matches(args[0], schema["items"], f"{where}[]")
    elif origin is dict:
        assert schema["type"] == "object", where
        if args[1] is Any:
            assert schema["x-kubernetes-preserve-unknown-fields"] is True, where
        else:
            _assert_type_matches(args[1], schema["additionalProperties"], f"{where}{{}}")
    else:
        assert schema["type"] == {str: "string", int: "integer", bool: "boolean"}[tp], where


def _walk(cls: type, schema: dict[str, Any], where: str) -> None:
    """Every dataclass field has a schema property of the same type, default and requiredness."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {_wire(f.name) for f in fields}, where
    required = {_wire(f.name) for f in fields
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert set(schema.get("required", [])) == required, where
    for f in fields:
        prop = schema["properties"][_wire(f.name)]
        _assert_type_matches(hints[f.name], prop, f"{where}.{_wire(f.name)}")
        assert prop["description"], f"{where}.{f.name} has no description"
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            assert prop.get("default") == ({} if dataclasses.is_dataclass(default) else None), f.name
        elif f.default not in (dataclasses.MISSING, None, "", ()):
            assert prop["default"] == f.default and type(prop["default"]) is type(f.default), f.name
        else:
            assert "default" not in prop, f.name


def test_crd_schema_mirrors_dataclasses() -> None:
    _walk(ModelSpec, SPEC_SCHEMA, "spec")
    _walk(ModelStatus, ROOT_SCHEMA["properties"]["status"], "status")
    assert set(SPEC_SCHEMA["properties"]) == KUBEAI_SPEC_FIELDS | KVGATE_SPEC_FIELDS


def test_crd_known_constraints() -> None:
    props = SPEC_SCHEMA["properties"]
    prefix = props["loadBalancing"]["properties"]["prefixHash"]["properties"]
    assert set(SPEC_SCHEMA["required"]) == {"url", "engine", "features"}
    assert props["engine"]["enum"] == ["OLlama", "VLLM", "FasterWhisper", "Infinity", "Sim", "LlamaCpp"]
    assert props["features"]["items"]["enum"] == ["TextGeneration", "TextEmbedding", "SpeechToText", "Reranking"]
    assert props["loadBalancing"]["default"] == {}
    assert props["loadBalancing"]["properties"]["strategy"] == {
        "description": props["loadBalancing"]["properties"]["strategy"]["description"], "type": "string",
        "enum": ["LeastLoad", "PrefixHash", "Random", "LeastQueue", "CacheAware"], "default": "LeastLoad"}
    assert (prefix["meanLoadFactor"]["default"], prefix["meanLoadFactor"]["minimum"]) == (125, 100)
    assert (prefix["replication"]["default"], prefix["replication"]["minimum"]) == (256, 1)
    assert {"rule": "self == oldSelf", "message": "is immutable"} in prefix["replication"]["x-kubernetes-validations"]
    assert (prefix["prefixCharLength"]["default"], prefix["prefixCharLength"]["minimum"]) == (100, 0)
    assert (props["targetRequests"]["default"], props["targetRequests"]["minimum"]) == (100, 1)
    assert props["scaleDownDelaySeconds"]["default"] == 30 and props["minReplicas"]["default"] == 0
    assert props["maxReplicas"]["minimum"] == 1 and "default" not in props["maxReplicas"]
    assert props["files"]["maxItems"] == 10 and props["files"]["x-kubernetes-list-map-keys"] == ["path"]
    assert props["files"]["items"]["properties"]["content"]["maxLength"] == 100000
    assert props["adapters"]["x-kubernetes-list-type"] == "map"
    assert props["adapters"]["x-kubernetes-list-map-keys"] == ["name"]
    assert props["env"]["additionalProperties"] == {"type": "string"}
    rules = " ".join(v["rule"] for v in SPEC_SCHEMA["x-kubernetes-validations"])
    for fragment in ("self.minReplicas <= self.maxReplicas", 'self.engine in ["VLLM", "Sim"]',
                     "self.cacheProfile", "oldSelf.cacheProfile"):
        assert fragment in rules
    assert ROOT_SCHEMA["x-kubernetes-validations"][0]["rule"] == "size(self.metadata.name) <= 40"


def test_crd_resource_definition() -> None:
    spec = CRD["spec"]
    version = spec["versions"][0]
    assert (CRD["apiVersion"], CRD["kind"], CRD["metadata"]["name"]) == (
        "apiextensions.k8s.io/v1", "CustomResourceDefinition", "models.kvgate.dev")
    assert spec["group"] == "kvgate.dev" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "Model", "listKind": "ModelList", "plural": "models", "singular": "model"}
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
    assert version["subresources"] == {
        "status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas.all",
                                "labelSelectorPath": ".status.selector"}}
    for column in version["additionalPrinterColumns"]:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        node = ROOT_SCHEMA
        for part in column["jsonPath"].lstrip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == column["type"], column


def test_crd_schema_is_structural() -> None:
    def visit(node: dict[str, Any], where: str) -> None:
        assert "type" in node, where
        assert not ("properties" in node and "additionalProperties" in node), where
        for key, child in node.get("properties", {}).items():
            visit(child, f"{where}.{key}")
        for key in ("items", "additionalProperties"):
            if key in node:
                visit(node[key], f"{where}.{key}")

    visit(ROOT_SCHEMA, "")


# ---------------------------------------------------------------------------------------------
# The CRD enforces what the Python side enforces (API-server stand-in with real CEL evaluation)

needs_cel = pytest.mark.skipif(celpy is None, reason="cel-python is not installed")
_ABSENT = object()


def _with_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, prop in schema["properties"].items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                value[key] = _with_defaults(prop, value[key])
    elif isinstance(value, list) and "items" in schema:
        value = [_with_defaults(schema["items"], item) for item in value]
    return value


def _cel_holds(rule: str, value: Any, old: Any) -> bool:
    if "oldSelf" in rule and old is _ABSENT:
        return True  # transition rules only run on update, and only when the old value exists
    bindings = {"self": value} if old is _ABSENT else {"self": value, "oldSelf": old}
    env = celpy.Environment()
    return bool(env.program(env.compile(rule)).evaluate(celpy.json_to_cel(bindings)))


_TYPES = {"string": str, "integer": int, "boolean": bool, "object": dict, "array": list}


def _violations(schema: dict[str, Any], value: Any, old: Any = _ABSENT, where: str = "") -> list[str]:
    expected = _TYPES[schema["type"]]
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return [f"{where}: type"]
    found = [f"{where}: {name}" for name, bad in (
        ("enum", "enum" in schema and value not in schema["enum"]),
        ("minimum", "minimum" in schema and value < schema["minimum"]),
        ("maxLength", "maxLength" in schema and len(value) > schema["maxLength"]),
        ("maxItems", "maxItems" in schema and len(value) > schema["maxItems"]),
        ("pattern", "pattern" in schema and not re.search(schema["pattern"], value)),
        ("required", any(key not in value for key in schema.get("required", []))),
    ) if bad]
    if schema.get("x-kubernetes-list-type") == "map":
        keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
        if len(set(keys)) != len(keys):
            found.append(f"{where}: duplicate list-map key")
    for key, prop in schema.get("properties", {}).items():
        if key in value:
            before = old.get(key, _ABSENT) if isinstance(old, dict) else _ABSENT
            found += _violations(prop, value[key], before, f"{where}.{key}")
    for key, item in value.items() if "additionalProperties" in schema else ():
        found += _violations(schema["additionalProperties"], item, _ABSENT, f"{where}.{key}")
    for i, item in enumerate(value) if "items" in schema else ():
        found += _violations(schema["items"], item, _ABSENT, f"{where}[{i}]")
    found += [f"{where}: {v['message']}" for v in schema.get("x-kubernetes-validations", [])
              if not _cel_holds(v["rule"], value, old)]
    return found


def apiserver(doc: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Violations the API server would report for this object (create, or update from `old`)."""
    return _violations(ROOT_SCHEMA, _with_defaults(ROOT_SCHEMA, doc),
                       _ABSENT if old is None else _with_defaults(ROOT_SCHEMA, old))


def _problem_path(problem: str) -> str:
    """".spec: minReplicas: must be..." -> "spec.minReplicas" (object-level rules name their field)."""
    where, _, message = problem.partition(": ")
    name, named, _ = message.partition(": ")
    where = where.lstrip(".")
    if named and re.fullmatch(r"[A-Za-z.]+", name):
        return f"{where}.{name}" if where else name
    return where


@needs_cel
@pytest.mark.parametrize(
    ("changes", "field"), [c[1:3] for c in REJECTED if not c[3]], ids=[c[0] for c in REJECTED if not c[3]])
def test_crd_rejects_the_same_manifests(changes: dict[str, Any], field: str) -> None:
    paths = {_problem_path(problem) for problem in apiserver(manifest(**changes))}
    # Same place as the Python error; list-map duplicates are reported on the list itself.
    assert field in paths or any(field.startswith(path + "[") for path in paths), paths


@pytest.mark.parametrize(
    "doc",
    [manifest(**c[1]) for c in ACCEPTED] + [yaml.safe_load(text) for text in EXAMPLES],
    ids=[c[0] for c in ACCEPTED] + ["llama", "gemma", "whisper", "bge"],
)
@needs_cel
def test_crd_accepts_valid_manifests(doc: dict[str, Any]) -> None:
    assert apiserver(doc) == []
    assert apiserver(Model.from_dict(doc).to_dict()) == []


@pytest.mark.parametrize(("old", "new", "field"), [u[1:] for u in UPDATES], ids=[u[0] for u in UPDATES])
@needs_cel
def test_crd_transition_rules_match_validate_update(
    old: dict[str, Any], new: dict[str, Any], field: str | None
) -> None:
    problems = apiserver(manifest(**new), old=manifest(**old))
    assert bool(problems) == (field is not None), problems


def test_crd_defaults_match_python_defaults() -> None:
    defaulted = _with_defaults(ROOT_SCHEMA, copy.deepcopy(BASE))
    assert Model.from_dict(defaulted) == Model.from_dict(BASE)
    assert defaulted["spec"] == Model.from_dict(BASE).to_dict()["spec"]


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_crd_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == CRD


def test_module_runs_as_script(tmp_path: Path) -> None:
    # Run as `python -m lb.model crd` does, from outside the checkout: the repo's operator/
    # directory must not come before the standard library's `operator` on sys.path.
    script = f"import runpy, sys; sys.path.append({str(ROOT)!r}); sys.argv[1:] = ['crd']; " \
             "runpy.run_module('lb.model', run_name='__main__', alter_sys=True)"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout) == CRD


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("\n---\n".join(EXAMPLES + ["apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"]))
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "gemma2-2b-cpu: ok" in out and out.count(": ok") == len(EXAMPLES)

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([manifest(**{"spec.maxReplicas": 0}), BASE]))
    assert main(["validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:9: model m: spec.maxReplicas: must be >= 1, got 0" in err


# ---------------------------------------------------------------------------------------------
# CacheAware's scoring


def test_cache_aware_scores_by_cost_model_unless_told_weights() -> None:
    settings = Model.from_dict(manifest()).spec.load_balancing.cache_aware
    assert (settings.scoring, settings.load_tokens, settings.queue_tokens) == ("CostModel", 16, 0)
    weights = Model.from_dict(manifest(**{"spec.loadBalancing.cacheAware": {
        "scoring": "Weights", "loadTokens": 64, "queueTokens": 256}})).spec.load_balancing
    assert (weights.cache_aware.scoring, weights.cache_aware.load_tokens,
            weights.cache_aware.queue_tokens) == ("Weights", 64, 256)


@pytest.mark.parametrize("value, expected", [
    ("Cost", "must be one of CostModel, Weights, got 'Cost'"),
    (3, "expected a string, got 3"),
])
def test_a_bad_scoring_is_rejected_with_the_choices(value: Any, expected: str) -> None:
    err = rejection(manifest(**{"spec.loadBalancing.cacheAware": {"scoring": value}}))
    assert err.field == "spec.loadBalancing.cacheAware.scoring" and expected in str(err), str(err)


@pytest.mark.parametrize("key", ["loadTokens", "queueTokens"])
def test_cost_model_token_weights_are_bounded(key: str) -> None:
    err = rejection(manifest(**{"spec.loadBalancing.cacheAware": {key: -1}}))
    assert err.field == f"spec.loadBalancing.cacheAware.{key}" and "0" in str(err), str(err)
