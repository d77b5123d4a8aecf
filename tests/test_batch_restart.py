"""A batch survives its gateway being killed: ``kvgate gateway --workers 2`` run for real, killed
with SIGKILL mid-batch (every process of it at once) and started again on the same state
directory. The model server is the harness's test backend in this process, which records every
request it receives, so the test can count how often each line reached it.

What must hold: every line is in the output exactly once, with its own answer; no line is
lost; a line reaches the model server twice only if it was in flight when the gateway died (at
most the per-batch concurrency); and with two worker processes only one of them runs the batch
(the server never sees more requests at once than one batch's cap).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import openai
import pytest

from bench.procs import free_port, gateway_config, wait_for_port
from tests.gateway_harness import Backend, LoopThread, Plan

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 4
LINES = 600


class Gateway:
    """`kvgate gateway --workers 2` in its own session, so a SIGKILL takes every worker."""

    def __init__(self, config: Path, port: int) -> None:
        self.config, self.port = config, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvgate", "gateway", "-c",
                                      str(self.config), "--workers", "2"], cwd=REPO,
                                     start_new_session=True)
        wait_for_port(self.port)

    def kill(self) -> None:
        """SIGKILL every process of the gateway, and wait until none still listens: the
        workers die after the leader is reaped, and a restart racing their sockets would
        find the port taken (or a test would talk to a dying worker)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return
            assert time.monotonic() < deadline, "the killed gateway still listens"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class PeakWatch:
    """Samples the backend's requests in flight on a thread; the highest value seen."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.peak = backend, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.backend.in_flight)
            time.sleep(0.002)

    def close(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


@pytest.fixture
def setup(loop_thread: LoopThread, tmp_path: Path) -> Iterator[tuple[Gateway, Backend]]:
    backend = Backend("b", collections.Counter(), Plan(header_delay=0.01))
    loop_thread.run(backend.start())
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_config(
        {"m": [backend.address]}, port, strategy="LeastLoad",
        settings={"batch": {"stateDir": str(tmp_path / "batch"), "pollSeconds": 0.1,
                            "leaseSeconds": 2, "concurrency": CONCURRENCY}}))
    text = config.read_text().replace("TextGeneration", "TextEmbedding")
    config.write_text(text)
    gateway = Gateway(config, port)
    gateway.start()
    try:
        yield gateway, backend
    finally:
        gateway.stop()
        loop_thread.run(backend.close())


def test_sigkill_mid_batch_loses_and_duplicates_nothing(setup) -> None:
    gateway, backend = setup
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="k",
                           max_retries=3, timeout=30)
    # Line i embeds a text of i + 1 characters: the test backend's vector starts with the
    # length, so each answer says which line it belongs to.
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "m", "input": "x" * (i + 1)}} for i in range(LINES)]
    upload = client.files.create(file=("in.jsonl", "\n".join(map(json.dumps, lines)).encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    peak = PeakWatch(backend)
    deadline = time.monotonic() + 60
    while len(backend.seen) < LINES // 3:
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.01)
    gateway.kill()
    seen_before = len(backend.seen)
    assert seen_before < LINES  # killed mid-batch
    gateway.start()
    deadline = time.monotonic() + 120
    while (batch := client.batches.retrieve(batch.id)).status != "completed":
        assert batch.status in ("validating", "in_progress", "finalizing"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)
    assert peak.close() <= CONCURRENCY  # one process ran the batch at a time

    assert batch.request_counts.total == LINES
    assert batch.request_counts.completed == LINES and batch.request_counts.failed == 0
    assert batch.error_file_id is None
    output = [json.loads(x) for x in client.files.content(batch.output_file_id).content.splitlines()]
    assert sorted(line["custom_id"] for line in output) == sorted(f"line-{i}" for i in range(LINES))
    for line in output:
        i = int(line["custom_id"].removeprefix("line-"))
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["data"][0]["embedding"][0] == i + 1

    received = collections.Counter(len(seen.json["input"]) for seen in backend.seen)
    assert set(received) == set(range(1, LINES + 1))  # every line reached the server
    twice = {n: c for n, c in received.items() if c > 1}
    assert all(c == 2 for c in twice.values())
    assert len(twice) <= CONCURRENCY  # only what was in flight at the kill ran again


def test_cancel_through_any_worker_stops_the_batch(setup) -> None:
    """The cancel lands on whichever worker the kernel picks; the one running the batch sees it
    in the store, aborts what is in flight and writes what finished."""
    gateway, backend = setup
    backend.plan.header_delay = 0.2
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="k",
                           max_retries=3, timeout=30)
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "m", "input": "x" * (i + 1)}} for i in range(200)]
    upload = client.files.create(file=("in.jsonl", "\n".join(map(json.dumps, lines)).encode()),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    deadline = time.monotonic() + 60
    while len(backend.seen) < 3 * CONCURRENCY:
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.01)
    for _ in range(4):  # over fresh connections: both workers get a chance to take it
        with openai.OpenAI(base_url=client.base_url, api_key="k", max_retries=3) as other:
            assert other.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch.id)).status != "cancelled":
        assert batch.status == "cancelling" and time.monotonic() < deadline, batch
        time.sleep(0.05)
    assert batch.request_counts.total == 200
    assert batch.request_counts.completed + batch.request_counts.failed == 200
    assert 0 < batch.request_counts.completed < 200
    while backend.in_flight:  # the aborted requests' connections were closed
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(backend.seen) < 200
