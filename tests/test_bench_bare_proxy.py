"""The calibration reference of the overhead benches (``bench/bare_proxy.py``) must be a
working proxy: kvgate's CPU targets are read as ratios to it, and a reference that failed or
shortened responses would flatter kvgate. Driven with the openai SDK, against the benches'
own backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import openai
import pytest

from bench.procs import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ports() -> Iterator[tuple[int, int]]:
    """(backend port, bare proxy port)."""
    backend, proxy = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "bench.fast_backend", "--port", str(backend),
                               "--chunks", "20", "--chunk-gap-ms", "1"], cwd=REPO),
             subprocess.Popen([sys.executable, "-m", "bench.bare_proxy", "--port", str(proxy),
                               "--upstream", f"127.0.0.1:{backend}"], cwd=REPO)]
    try:
        for port in (backend, proxy):
            wait_for_port(port)
        yield backend, proxy
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(15)


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)


def test_json_response_is_the_backends(ports: tuple[int, int]) -> None:
    messages = [{"role": "user", "content": "hello"}]
    direct = _client(ports[0]).chat.completions.create(model="m", messages=messages)
    proxied = _client(ports[1]).chat.completions.create(model="m", messages=messages)
    assert proxied.model_dump() == direct.model_dump()
    assert proxied.choices[0].message.content


def test_stream_arrives_whole_and_in_order(ports: tuple[int, int]) -> None:
    def pieces(port: int) -> list[str]:
        stream = _client(port).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hello"}], stream=True)
        return [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]

    direct = pieces(ports[0])
    assert len(direct) >= 20
    assert pieces(ports[1]) == direct
