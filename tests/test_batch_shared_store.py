"""Two gateway processes on one store directory, as two replicas of the chart on one
ReadWriteMany volume: `kvgate gateway` run twice for real, on two ports, with the same
`batch.stateDir`, in each of the store's journal modes.

Semantics under test (there is no leader election outside Kubernetes, and none is needed): every
process serves the whole Files and Batches API from the shared store, and runs batches; each
batch is run by one process at a time, the holder of its lease in the store, so every line
reaches the model server exactly once. The sweeper of expired files is one process's too (the
store's `sweeper` role).
"""

from __future__ import annotations

import collections
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import openai
import pytest

from bench.procs import free_port, gateway_config, wait_for_port
from lb.config import ConfigError, config_from_dict
from tests.gateway_harness import Backend, LoopThread, Plan

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 4
LINES = 150


def until(predicate: Callable[[], Any], what: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


class Gateway:
    def __init__(self, config: Path, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen([sys.executable, "-m", "kvgate", "gateway", "-c",
                                      str(config)], cwd=REPO)
        wait_for_port(port)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k",
                                    max_retries=3, timeout=30)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(params=["wal", "delete"])
def pair(request: pytest.FixtureRequest, loop_thread: LoopThread,
         tmp_path: Path) -> Iterator[tuple[Gateway, Gateway, Backend, Path, str]]:
    backend = Backend("b", collections.Counter(), Plan(header_delay=0.01))
    loop_thread.run(backend.start())
    state = tmp_path / "batch"
    gateways: list[Gateway] = []
    try:
        for name in ("a", "b"):
            port = free_port()
            config = tmp_path / f"{name}.yaml"
            config.write_text(gateway_config(
                {"m": [backend.address]}, port, strategy="LeastLoad",
                settings={"batch": {"stateDir": str(state), "pollSeconds": 0.1,
                                    "leaseSeconds": 3, "concurrency": CONCURRENCY,
                                    "journalMode": request.param, "minExpirySeconds": 1,
                                    "sweepSeconds": 0.2}}
            ).replace("TextGeneration", "TextEmbedding"))
            gateways.append(Gateway(config, port))
        yield gateways[0], gateways[1], backend, state, request.param
    finally:
        for gateway in gateways:
            gateway.stop()
        loop_thread.run(backend.close())


def lines(batch: str, count: int) -> bytes:
    """Line i embeds a text of i + 1 characters after the batch's own marker: the test
    backend's vector starts with the text's length, so each answer says which line it is."""
    return "\n".join(json.dumps({"custom_id": f"{batch}-{i}", "method": "POST",
                                 "url": "/v1/embeddings",
                                 "body": {"model": "m", "input": batch + "x" * (i + 1)}})
                     for i in range(count)).encode()


def test_two_processes_share_files_and_batches_and_run_each_line_once(pair) -> None:
    a, b, backend, state, mode = pair
    with sqlite3.connect(state / "batch.db", timeout=30) as db:  # WAL is kept in the file
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == mode

    # Uploaded through one, used and watched through the other.
    ups = [a.client.files.create(file=("p.jsonl", lines("p", LINES)), purpose="batch"),
           b.client.files.create(file=("q.jsonl", lines("q", LINES)), purpose="batch")]
    assert b.client.files.retrieve(ups[0].id).bytes == ups[0].bytes
    assert b.client.files.content(ups[0].id).content == lines("p", LINES)
    batches = [b.client.batches.create(input_file_id=ups[0].id, endpoint="/v1/embeddings",
                                       completion_window="24h"),
               a.client.batches.create(input_file_id=ups[1].id, endpoint="/v1/embeddings",
                                       completion_window="24h")]
    for batch in batches:
        assert a.client.batches.retrieve(batch.id).id == batch.id
        assert {x.id for x in b.client.batches.list()} >= {batch.id}
    done = [until(lambda: (x := other.client.batches.retrieve(batch.id)).status == "completed"
                  and x, f"batch {batch.id}")
            for batch, other in zip(batches, (a, b))]

    for marker, batch in zip("pq", done):
        assert batch.request_counts.total == LINES
        assert batch.request_counts.completed == LINES and batch.request_counts.failed == 0
        for client in (a.client, b.client):
            output = [json.loads(x) for x in
                      client.files.content(batch.output_file_id).content.splitlines()]
            assert [x["custom_id"] for x in output] == [f"{marker}-{i}" for i in range(LINES)]
            for i, line in enumerate(output):
                assert line["response"]["body"]["data"][0]["embedding"][0] == i + 2
    # Every line reached the model server exactly once, whichever process ran its batch.
    received = collections.Counter(seen.json["input"] for seen in backend.seen)
    assert len(received) == 2 * LINES and set(received.values()) == {1}
    assert backend.most_in_flight <= 2 * CONCURRENCY  # at most one runner per batch


def test_an_expired_file_is_gone_from_both_and_swept_once(pair) -> None:
    a, b, _, state, _ = pair
    short = a.client.files.create(file=("s.jsonl", lines("s", 3)), purpose="batch",
                                  expires_after={"anchor": "created_at", "seconds": 1})
    assert b.client.files.retrieve(short.id).expires_at == short.created_at + 1
    until(lambda: time.time() >= short.expires_at + 0.05, "the expiry")
    for gateway in (a, b):
        with pytest.raises(openai.NotFoundError) as exc:
            gateway.client.files.retrieve(short.id)
        assert exc.value.body["code"] == "file_not_found"
    until(lambda: not (state / "files" / short.id).exists(), "the sweep")

    def rows() -> Any:
        with sqlite3.connect(state / "batch.db", timeout=30) as db:
            return (db.execute("SELECT count(*) FROM files WHERE id = ?", (short.id,)).fetchone()[0],
                    db.execute("SELECT count(*) FROM roles WHERE name = 'sweeper' AND owner IS NOT "
                               "NULL").fetchone()[0])
    assert until(lambda: rows()[0] == 0 and rows(), "the metadata's sweep") == (0, 1)


@pytest.mark.parametrize("key, value", [("journalMode", "memory"), ("minExpirySeconds", 0),
                                        ("maxLineBytes", 0), ("maxEmbeddingInputs", 0)])
def test_bad_store_settings_are_config_errors(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"batch": {"stateDir": "/nowhere", key: value}})
    assert f"batch.{key}" in str(info.value)


def test_defaults_are_openais(tmp_path: Path) -> None:
    config = config_from_dict({"batch": {"stateDir": str(tmp_path)}})
    assert config.batch.journal_mode == "wal" and config.batch.single_model
    assert config.batch.max_embedding_inputs == 50_000 and config.batch.min_expiry_seconds == 3600


# Run in a process of its own (forking there is safe: it has no threads), so that the pool's
# processes are not the test runner's children.
_OPEN_TOGETHER = """
import asyncio, multiprocessing, sqlite3, sys
from lb.batch.store import SqliteStore

def open_and_close(directory):
    async def run():
        store = await SqliteStore(directory).open()
        await store.close()
    try:
        asyncio.run(run())
    except sqlite3.OperationalError as exc:
        return repr(exc)
    return "ok"

with multiprocessing.get_context("fork").Pool(4) as pool:
    for round_ in range(40):
        for outcome in pool.map(open_and_close, [f"{sys.argv[1]}/store-{round_}"] * 4):
            print(outcome)
"""


def test_processes_opening_a_new_store_together_all_open(tmp_path: Path) -> None:
    """Processes opening a new store at the same moment, as a gateway's workers do at start:
    SQLite answers a connection that meets another switching the database to WAL with
    "database is locked" at once, without waiting out its busy timeout. The store retries,
    so every process opens (without the retry ~1 open in 10 failed here)."""
    done = subprocess.run([sys.executable, "-c", _OPEN_TOGETHER, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    outcomes = collections.Counter(done.stdout.split("\n")[:-1])
    assert outcomes == {"ok": 160}, outcomes
