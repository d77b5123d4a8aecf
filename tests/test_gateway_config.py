"""The system config file, and ``kvgate gateway -c file`` run as a real process in
static-endpoints mode."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lb.config import Config, ConfigError, load_config
from tests.gateway_harness import model_manifest

MODEL = yaml.safe_dump({"models": [model_manifest("m", adapters=["lora"])]})


@pytest.mark.parametrize("text,key", [
    ("retries:\n  maxRetries: x\n", "retries.maxRetries: expected an integer, got 'x'"),
    ("retries:\n  maxRetries: 99\n", "retries.maxRetries"),
    ("retries:\n  retryStatuses: [404]\n", "retries.retryStatuses"),
    ("retries:\n  retryStatuses: 500\n", "retries.retryStatuses: expected a list"),
    ("server:\n  port: 70000\n", "server.port"),
    ("server:\n  port: '8000'\n", "server.port: expected an integer"),
    ("server:\n  metricsPort: -1\n", "server.metricsPort"),
    ("server:\n  hots: 1.2.3.4\n", "hots: unknown key"),
    ("limits:\n  maxBodyBytes: true\n", "limits.maxBodyBytes: expected an integer, got True"),
    ("limits:\n  maxBodyBytes: 0\n", "limits.maxBodyBytes"),
    ("queue:\n  timeoutSeconds: 0\n", "queue.timeoutSeconds"),
    ("queue:\n  timeoutSeconds: soon\n", "queue.timeoutSeconds"),
    ("queue:\n  maxQueuedPerModel: -5\n", "queue.maxQueuedPerModel"),
    ("upstream:\n  connectTimeoutSeconds: -1\n", "upstream.connectTimeoutSeconds"),
    ("upstream: 5\n", "upstream: expected a mapping"),
    ("bogus: {}\n", "bogus: unknown key"),
    ("models: {}\n", "models: expected a list"),
    ("models:\n  - kind: Model\n", "models[0]"),
    ("endpoints:\n  ghost:\n    - address: 127.0.0.1:1\n", "endpoints.ghost"),
    (MODEL + "endpoints:\n  m:\n    - address: nohostport\n", "endpoints.m[0].address"),
    (MODEL + "endpoints:\n  m:\n    - address: 127.0.0.1:1\n      adapters: lora\n",
     "endpoints.m[0].adapters: expected a list"),
    ("- just\n- a list\n", "the config must be a mapping"),
    ("server: [unclosed\n", "not valid YAML"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "kvgate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert re.match(rf"{re.escape(str(path))}(:\d+)?: ", message), message
    assert key in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_defaults_and_values(tmp_path):
    assert load_config(None) == Config()
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()
    path = tmp_path / "kvgate.yaml"
    path.write_text(MODEL + textwrap.dedent("""\
        server: {host: 0.0.0.0, port: 8080, metricsPort: 0, logLevel: warning}
        limits: {maxBodyBytes: 1024}
        retries: {maxRetries: 1, retryStatuses: [502, 503]}
        queue: {maxQueuedPerModel: 3, timeoutSeconds: 2, retryAfterSeconds: 1}
        upstream: {connectTimeoutSeconds: 1, readTimeoutSeconds: 30, maxIdlePerHost: 10}
        endpoints:
          m:
            - {address: "10.0.0.1:8000", key: pod-a, adapters: [lora]}
            - {address: "10.0.0.2:8000"}
        """))
    config = load_config(path)
    assert (config.server.host, config.server.port, config.server.metrics_port) == (
        "0.0.0.0", 8080, 0)
    assert config.limits.max_body_bytes == 1024
    assert config.retries.retry_statuses == (502, 503)
    assert config.queue.timeout_seconds == 2.0
    assert isinstance(config.queue.timeout_seconds, float)
    assert [m.name for m in config.models] == ["m"]
    endpoints = config.static_endpoints("m")
    assert [(e.key, e.address, e.adapters) for e in endpoints] == [
        ("pod-a", "10.0.0.1:8000", frozenset({"lora"})),
        ("m/10.0.0.2:8000", "10.0.0.2:8000", frozenset())]


# -- the real command ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kvgate_command() -> list[str]:
    script = Path(sys.executable).parent / "kvgate"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvgate"]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"kvgate exited with {process.returncode}: "
                                 f"{process.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("kvgate did not become ready")


def test_kvgate_gateway_command_serves_static_endpoints(gw, tmp_path):
    backend = gw.backend("static")
    port, metrics_port = free_port(), free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "metricsPort": metrics_port,
                   "logLevel": "warning"},
        "models": [model_manifest("m", adapters=["lora"]),
                   model_manifest("emb", engine="Infinity", features=["TextEmbedding"])],
        "endpoints": {"m": [{"address": backend.address, "key": "static", "adapters": ["lora"]}],
                      "emb": [{"address": backend.address}]},
    }
    path = tmp_path / "kvgate.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([*kvgate_command(), "gateway", "-c", str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", process)
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                               max_retries=0, timeout=10)
        response = client.chat.completions.create(
            model="m_lora", messages=[{"role": "user", "content": "hi"}])
        assert response.system_fingerprint == "static"
        assert backend.last.json["model"] == "lora"
        assert client.embeddings.create(model="emb", input="abc",
                                        encoding_format="float").data[0].embedding == [
            3.0, 0.0, 0.5]
        assert sorted(m.id for m in client.models.list()) == ["m", "m_lora"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=5) as metrics:
            text = metrics.read().decode()
        assert 'kvgate_requests_total{code="200",kind="chat",model="m"} 1.0' in text
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise AssertionError(f"kvgate did not stop on SIGTERM: {stderr}")
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert f"serving the OpenAI API on http://127.0.0.1:{port}/v1 (2 models)" in stdout
    assert "Traceback" not in stderr
    assert backend.total_calls == 2


def test_kvgate_gateway_command_rejects_bad_config(tmp_path):
    path = tmp_path / "kvgate.yaml"
    path.write_text("retries:\n  maxRetries: lots\n")
    result = subprocess.run([*kvgate_command(), "gateway", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "retries.maxRetries: expected an integer, got 'lots'" in result.stderr
    assert "Traceback" not in result.stderr


def test_kvgate_gateway_command_reports_a_busy_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "kvgate.yaml"
        path.write_text(f"server: {{host: 127.0.0.1, port: {port}, metricsPort: 0}}\n")
        result = subprocess.run([*kvgate_command(), "gateway", "-c", str(path)],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
