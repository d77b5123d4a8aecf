"""``kvgate gateway --workers 2``, run for real: two forked processes on one port, one shared
load table, so in-flight counts (and the active-requests gauge the autoscaler reads) cover
both workers."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import free_port, gateway_config, wait_for_port
from lb.parse import DEFAULT_OUTPUT_TOKENS

REPO = Path(__file__).resolve().parent.parent
BODY = (b'{"model":"%s","messages":[{"role":"user","content":"Hello there"}]%s}')


def _config(tmp: Path, port: int, metrics_port: int, backends: dict[str, int]) -> Path:
    path = tmp / "gateway.yaml"
    # Token-weighted loads: the shared table must carry weights, not only counts, and end at 0.
    path.write_text(gateway_config({m: [f"127.0.0.1:{p}"] for m, p in backends.items()}, port,
                                   metrics_port=metrics_port,
                                   load_balancing={"loadUnit": "Tokens"}))
    return path


def _children(pid: int, expect: int = 2) -> list[int]:
    """The worker processes, once all are forked (the port listens before they exist)."""
    deadline = time.monotonic() + 10
    while True:
        found = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        if len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


class Workers:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, metrics_port: int) -> None:
        self.proc, self.port, self.metrics_port = proc, port, metrics_port

    def post(self, conn: http.client.HTTPConnection, model: str, stream: bool = False) -> bytes:
        conn.request("POST", "/v1/chat/completions",
                     BODY % (model.encode(), b',"stream":true' if stream else b""),
                     {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        return response.read()

    def metric(self, name: str, **labels: str) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    total += sample.value
        return total


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    backends = {"fast": free_port(), "slow": free_port()}
    procs = [subprocess.Popen([sys.executable, "-m", "bench.fast_backend", "--port", str(port),
                               "--chunks", "20", "--chunk-gap-ms",
                               "100" if name == "slow" else "0"], cwd=REPO)
             for name, port in backends.items()]
    port, metrics_port = free_port(), free_port()
    config = _config(tmp_path, port, metrics_port, backends)
    gateway = subprocess.Popen([sys.executable, "-m", "kvgate", "gateway", "-c", str(config),
                                "--workers", "2"], cwd=REPO)
    try:
        for p in (*backends.values(), port, metrics_port):
            wait_for_port(p)
        yield Workers(gateway, port, metrics_port)
    finally:
        for proc in (gateway, *procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_both_workers_serve_and_counts_are_shared(workers: Workers) -> None:
    assert len(_children(workers.proc.pid)) == 2

    def client(_: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", workers.port, timeout=30)
        for _ in range(10):
            assert b"chat.completion" in workers.post(conn, "fast")
        conn.close()
        return 10

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(client, range(40))) == 400
    # The metrics port is worker 0's: its own request count is part of the 400, not all of it
    # (40 connections spread by the kernel over both workers).
    served_by_0 = workers.metric("kvgate_requests_total", model="fast", code="200")
    assert 0 < served_by_0 < 400

    # Streams held open on both workers show up in the shared gauges, whoever scrapes.
    opened, release = threading.Barrier(7), threading.Event()

    def stream(_: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", workers.port, timeout=30)
        conn.request("POST", "/v1/chat/completions",
                     BODY % (b"slow", b',"stream":true'), {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.read1()  # the first chunk arrived: the request is in flight
        opened.wait(30)
        release.wait(30)
        response.read()
        conn.close()

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, i) for i in range(6)]
        opened.wait(30)
        assert workers.metric("kubeai_inference_requests_active", request_model="slow") == 6
        weight = len(BODY % (b"slow", b',"stream":true')) // 4 + DEFAULT_OUTPUT_TOKENS
        assert workers.metric("kvgate_endpoint_in_flight", model="slow") == 6 * weight
        release.set()
        for future in futures:
            future.result()
    deadline = time.monotonic() + 10
    while workers.metric("kubeai_inference_requests_active", request_model="slow") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert workers.metric("kvgate_endpoint_in_flight") == 0
    assert workers.metric("kubeai_inference_requests_active") == 0

    children = _children(workers.proc.pid)
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(20) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_dead_worker_stops_the_gateway(workers: Workers) -> None:
    first, second = _children(workers.proc.pid)
    os.kill(first, signal.SIGKILL)
    assert workers.proc.wait(20) == 1  # a supervisor restarts it whole
    deadline = time.monotonic() + 10
    while Path(f"/proc/{second}").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
