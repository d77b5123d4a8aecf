"""The queue across worker processes: ``kvgate gateway --workers 2``, a model of capacity 1 on one
slow backend, a flood of batch-class streams queued, then critical ones. Each request opens its
own connection, so the kernel spreads them over both workers; the critical requests must still
be served next, whichever worker holds them (a worker leaves a freed slot to a higher class
queued in the other, seen through the shared per-class counts)."""

from __future__ import annotations

import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import free_port, gateway_config, spawn, stop, wait_for_port

HOST = "127.0.0.1"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[int, int]]:
    backend, port, metrics = free_port(), free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_config({"m": [f"{HOST}:{backend}"]}, port, metrics_port=metrics,
                                     strategy="LeastLoad", load_balancing={"replicaCapacity": 1}))
    procs = [spawn([sys.executable, "-m", "bench.fast_backend", "--port", str(backend),
                    "--chunks", "8", "--chunk-gap-ms", "40"], stderr=None),
             spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config), "--workers", "2"],
                   stderr=None)]
    try:
        for p in (backend, port, metrics):
            wait_for_port(p)
        yield port, metrics
    finally:
        for proc in procs:
            stop(proc)


def queued(metrics_port: int) -> dict[str, float]:
    """Requests queued per class, over both workers (any worker answers the scrape)."""
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.labels["priority"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "kvgate_queued_requests"}


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_higher_class_queued_in_either_worker_is_served_first(gateway) -> None:
    port, metrics_port = gateway
    finished: list[str] = []
    errors: list[BaseException] = []

    def stream(name: str, priority: str) -> None:
        try:
            with openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="k", max_retries=0,
                               timeout=60) as client:  # a connection of its own
                chunks = client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": name}], stream=True,
                    extra_headers={"X-Kvgate-Priority": priority})
                list(chunks)
            finished.append(name)
        except BaseException as exc:  # reported by the test, not lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(f"batch{i}", "batch")) for i in range(7)]
    for t in threads:
        t.start()
    wait_until(lambda: queued(metrics_port).get("batch") == 6, "six batch requests queued")
    urgent = [threading.Thread(target=stream, args=(f"urgent{i}", "critical")) for i in range(2)]
    for t in urgent:
        t.start()
    wait_until(lambda: queued(metrics_port).get("critical") == 2
               or any(name.startswith("urgent") for name in finished), "the critical ones queued")
    done_then = len(finished)  # batches may finish while the critical clients start (load)
    for t in threads + urgent:
        t.join(60)
    assert not errors, errors
    assert len(finished) == 9
    # Once both are queued, only the request in flight then finishes before them.
    last_urgent = max(finished.index("urgent0"), finished.index("urgent1"))
    assert last_urgent <= done_then + 2, finished
    assert queued(metrics_port) == {"critical": 0, "default": 0, "batch": 0}
