"""API keys run for real: ``kvgate keys`` writes the file, ``kvgate gateway --workers 2`` enforces
it, and one key's limits hold across both worker processes (their budgets live in shared
memory). Every request opens a new connection, so the kernel spreads them over the workers:
with per-worker budgets, twice the limit would get through."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import openai
import pytest
import yaml

from bench.procs import free_port, gateway_config, wait_for_port

REPO = Path(__file__).resolve().parent.parent


def kvgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvgate", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60)


def test_keys_cli(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.yaml")
    made = kvgate("keys", "create", "team-a", "-f", path, "--model", "llama-*",
                  "--model", "qwen_*", "--rpm", "60", "--tpm", "1000", "--expires", "30d")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("sk-kvg-") and len(secret) > 40
    text = Path(path).read_text()
    assert secret not in text  # only its hash is kept
    entry = yaml.safe_load(text)["keys"][0]
    assert entry["models"] == ["llama-*", "qwen_*"]
    assert entry["limits"] == {"requestsPerMinute": 60, "tokensPerMinute": 1000}
    assert entry["expiresAt"] > entry["createdAt"]
    assert kvgate("keys", "create", "team-a", "-f", path).returncode == 2  # names are unique
    assert kvgate("keys", "create", "team b", "-f", path).returncode == 2  # and well formed
    listed = kvgate("keys", "list", "-f", path)
    assert listed.returncode == 0 and "team-a" in listed.stdout
    assert secret not in listed.stdout
    assert kvgate("keys", "revoke", "team-a", "-f", path).returncode == 0
    assert yaml.safe_load(Path(path).read_text())["keys"] == []
    assert kvgate("keys", "revoke", "team-a", "-f", path).returncode == 1


def test_a_bad_keys_file_fails_at_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n- name: a\n  hash: sha256:abc\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"apiKeys": {"enabled": True, "file": str(keys)}}))
    started = kvgate("gateway", "-c", str(config), "--port", str(free_port()),
                     "--metrics-port", "0", "--workers", "2")
    assert started.returncode == 2
    assert "keys.yaml:3: keys[0].hash" in started.stderr


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    keys = str(tmp_path / "keys.yaml")
    secrets = {}
    for name, limits in (("rpm", ["--rpm", "6"]), ("tpm", ["--tpm", "3500"])):
        made = kvgate("keys", "create", name, "-f", keys, *limits)
        assert made.returncode == 0, made.stderr
        secrets[name] = made.stdout.strip()
    backend, port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_config({"m": [f"127.0.0.1:{backend}"]}, port,
                                     settings={"apiKeys": {"enabled": True, "file": keys}}))
    procs = [subprocess.Popen([sys.executable, "-m", "bench.fast_backend", "--port",
                               str(backend), "--chunks", "2"], cwd=REPO),
             subprocess.Popen([sys.executable, "-m", "kvgate", "gateway", "-c", str(config),
                               "--workers", "2"], cwd=REPO)]
    try:
        for p in (backend, port):
            wait_for_port(p)
        yield port, secrets
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _fresh_client(port: int, key: str) -> openai.OpenAI:
    """A client of its own: a new connection, which the kernel may give to either worker."""
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                         timeout=30)


def _outcomes(port: int, key: str, n: int, **extra: object) -> list[str]:
    out = []
    for _ in range(n):
        with _fresh_client(port, key) as c:
            try:
                stream = c.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                    **extra)  # type: ignore[call-overload]
                list(stream)
                out.append("ok")
            except openai.RateLimitError:
                out.append("429")
    return out


def test_limits_hold_across_two_workers(gateway: tuple[int, dict[str, str]]) -> None:
    port, secrets = gateway
    # 6 requests a minute, 12 sent (a unit comes back every 10 s: the 12 take far less).
    assert _outcomes(port, secrets["rpm"], 12) == ["ok"] * 6 + ["429"] * 6
    # 3,500 tokens a minute, ~1,025 estimated per request (a stream's answer carries no usage
    # here, so the estimate stands): 3 fit, the 4th would not.
    assert _outcomes(port, secrets["tpm"], 5, max_tokens=1000) == ["ok"] * 3 + ["429"] * 2
    with pytest.raises(openai.AuthenticationError):
        with _fresh_client(port, "sk-kvg-wrong") as c:
            c.models.list()
