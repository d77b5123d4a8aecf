"""Every image of the project that the chart or the operator names is one the repository builds.

On a real cluster the LoRA adapter-loader sidecars and the cache Jobs pulled an image nothing
built. The Dockerfile names the image each final stage makes (a `dev.kvgate.image` label); the
chart is rendered by the real helm binary (tests/test_charts.py's fixture) with its default
values and the cloud presets, and the operator's own defaults are read from its system config.
Images of other projects (vLLM, Ollama, ...) are theirs to build and are left out.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from lb_operator.kube.cache import loader_job, eviction_job
from lb_operator.kube.engines import adapter_loader_container
from lb_operator.system_config import SystemConfig, system_config_from_dict
from lb.model import API_VERSION, KIND, Model
from tests.test_charts import KVGATE, helm, render_chart  # noqa: F401  (helm is a fixture)

ROOT = Path(__file__).resolve().parent.parent
PROJECT_REGISTRY = "ghcr.io/kvgate/"
ENVELOPE = {"apiVersion": API_VERSION, "kind": KIND}
APP_VERSION = yaml.safe_load((KVGATE / "Chart.yaml").read_text())["appVersion"]


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Named stages of the Dockerfile: name -> [(INSTRUCTION, arguments)]."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            named = re.search(r"\s+AS\s+(\S+)$", rest, re.I)
            current = stages.setdefault(named.group(1) if named else f"#{len(stages)}", [])
        if current is not None:
            current.append((instruction.upper(), rest.strip()))
    return stages


def built_images() -> dict[str, str]:
    """Repository -> the stage that builds it, from each stage's `dev.kvgate.image` label."""
    built = {}
    for name, stage in dockerfile_stages().items():
        for instruction, rest in stage:
            found = re.fullmatch(r'dev\.kvgate\.image="([^"]+)"', rest) if instruction == "LABEL" else None
            if found:
                built[found.group(1)] = name
    return built


def images_in(node: Any) -> Iterator[str]:
    """Every `image` of a container (or a config entry) anywhere in a document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str) and value:
                yield value
            elif key == "images" and isinstance(value, dict):
                yield from (v for v in value.values() if isinstance(v, str) and v)
            else:
                yield from images_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from images_in(item)


def rendered_images(docs: list[dict[str, Any]]) -> set[str]:
    """Images in the rendered objects, and in the system config the chart hands the operator."""
    found = set(images_in(docs))
    for doc in docs:
        if doc.get("kind") == "ConfigMap" and "config.yaml" in (doc.get("data") or {}):
            config = yaml.safe_load(doc["data"]["config.yaml"])
            found |= set(images_in(config))
    return found


def operator_images(system: SystemConfig) -> set[str]:
    """What the operator puts in Pods and Jobs with a given system config."""
    model = Model.from_dict({**ENVELOPE, "metadata": {"name": "m"}, "spec": {
        "url": "hf://org/m", "engine": "VLLM", "features": ["TextGeneration"],
        "adapters": [{"name": "a", "url": "s3://bucket/a"}]}})
    sidecar = adapter_loader_container(model, system)
    assert sidecar is not None
    cached = Model.from_dict({**ENVELOPE, "metadata": {"name": "c"}, "spec": {
        "url": "s3://bucket/c", "engine": "VLLM", "features": ["TextGeneration"],
        "cacheProfile": "p"}})
    jobs = [loader_job(cached, system), eviction_job(cached, system)]
    return {sidecar["image"], *images_in(jobs), *(image for server in system.model_servers.values() for image in server.images.values())}


def check_built(images: set[str]) -> None:
    built = built_images()
    ours = {image for image in images if image.startswith(PROJECT_REGISTRY)}
    assert ours, "the project's own images are referenced somewhere"
    for image in ours:
        repository, _, tag = image.rpartition(":")
        assert repository in built, f"{image} is referenced but no Dockerfile stage builds it"
        assert tag == APP_VERSION, f"{image}: not the chart's appVersion {APP_VERSION}"


def test_the_dockerfile_builds_the_gateway_and_the_loader() -> None:
    built = built_images()
    assert set(built) == {"ghcr.io/kvgate/kvgate", "ghcr.io/kvgate/kvgate-model-loader"}
    stages = dockerfile_stages()
    assert list(stages)[-1] == built["ghcr.io/kvgate/kvgate"], "`docker build .` makes the gateway"
    (entrypoint,) = [json.loads(r) for i, r in stages[built["ghcr.io/kvgate/kvgate-model-loader"]]
                     if i == "ENTRYPOINT"]
    assert entrypoint == ["python", "-m", "lb_operator.loader"]


@pytest.mark.parametrize("values", [None, "values-eks.yaml", "values-gke.yaml"])
def test_the_chart_renders_only_images_the_repo_builds(helm: Any, values: str | None) -> None:  # noqa: F811
    args = ["-f", str(KVGATE / values)] if values else []
    docs = render_chart(helm, KVGATE, *args)
    images = rendered_images(docs)
    check_built(images)
    assert f"ghcr.io/kvgate/kvgate-model-loader:{APP_VERSION}" in images


def test_the_charts_loader_image_follows_the_gateway_image(helm: Any) -> None:  # noqa: F811
    docs = render_chart(helm, KVGATE, "--set", "image.repository=registry.example.com/kv/kvgate",
                        "--set", "image.tag=1.2.3")
    images = rendered_images(docs)
    assert "registry.example.com/kv/kvgate-model-loader:1.2.3" in images
    assert "registry.example.com/kv/kvgate:1.2.3" in images


def test_the_operator_defaults_are_images_the_repo_builds() -> None:
    system = system_config_from_dict({"cacheProfiles": {"p": {"sharedFilesystem": {
        "storageClassName": "rwx"}}}})
    check_built(operator_images(system))


def test_the_loader_command_the_operator_runs_exists() -> None:
    """The sidecar and the Jobs run `python -m lb_operator.loader <verb>`: the installed package
    (what the image holds) answers each verb."""
    for verb in ("serve", "fetch", "evict"):
        proc = subprocess.run([sys.executable, "-m", "lb_operator.loader", verb, "--help"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
