"""`make engines`' reading of .ci/engine-packages.txt: which pip calls go into which engine's
virtualenv (the installs themselves are the opt-in engine suite's set-up)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def installer():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("install_engines", REPO / ".ci" / "install_engines.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pinned_list_names_an_install_per_engine_and_its_variables() -> None:
    module = installer()
    steps = module.read_packages(REPO / ".ci" / "engine-packages.txt")
    assert set(steps) == {"vllm", "fasterwhisper", "infinity", "llamacpp"}
    for engine, calls in steps.items():
        first = module.split_env(calls[0])[1]
        assert first and first[0] != "uninstall", engine
        # every requirement is pinned, so a run here is the run recorded in the README
        pinned = [w for c in calls for w in module.split_env(c)[1] if not w.startswith("-")
                  and w != "uninstall" and c[0] != "uninstall"]
        assert pinned and all("==" in w for w in pinned), (engine, pinned)
    env, args = module.split_env(steps["llamacpp"][0])
    assert env == {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"}
    assert args[-1] == "llama-cpp-python[server]==0.3.36"
    assert module.split_env(["gguf==0.19.0", "A=1"]) == ({}, ["gguf==0.19.0", "A=1"])
    assert ["uninstall", "torchvision", "torchaudio", "torchcodec"] in steps["vllm"]
