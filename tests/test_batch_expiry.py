"""File expiry as OpenAI defines it, through the official `openai` SDK against a real gateway:
`expires_after` on uploads, `output_expires_after` on batches, `expires_at` on file objects, a
404 once a file has expired, and the sweeper that deletes expired files from the store.

The gateways here accept expiries of a second (`batch.minExpirySeconds: 1`) and sweep five
times a second, so that files expire and vanish within the tests' patience.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import openai
import pytest

from lb.batch.store import SqliteStore
from tests.test_batch_api import FAST, chat_line, jsonl, wait_batch

THIRTY_DAYS = 30 * 24 * 3600


def until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stored_ids(state: Path) -> set[str]:
    """The ids of every file row in the store, expired or not (read from the SQLite file)."""
    with sqlite3.connect(state / "batch.db", timeout=30) as db:
        return {row[0] for row in db.execute("SELECT id FROM files")}


@pytest.fixture
def egw(make_gateway, tmp_path):
    state = tmp_path / "batch"
    gw = make_gateway({"batch": {"stateDir": str(state), **FAST, "minExpirySeconds": 1,
                                 "sweepSeconds": 0.2}})
    gw.model_with("chat", [gw.sim("chat", "c1")])
    return gw, state


def assert_openai_error(exc: Any, status: int, param: str | None, code: str) -> None:
    assert exc.status_code == status
    error = exc.body
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert error["param"] == param and error["code"] == code and error["message"]


def test_an_uploaded_file_expires_and_is_swept(egw):
    gw, state = egw
    client = gw.client()
    kept = client.files.create(file=("kept.jsonl", jsonl([chat_line("a", "b")])), purpose="batch")
    short = client.files.create(file=("short.jsonl", jsonl([chat_line("a", "b")])),
                                purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": 2})
    # OpenAI's default for a batch file that names no policy: 30 days.
    assert kept.expires_at == kept.created_at + THIRTY_DAYS
    assert short.expires_at == short.created_at + 2
    assert client.files.retrieve(short.id).expires_at == short.expires_at
    assert client.files.content(short.id).content == jsonl([chat_line("a", "b")])
    assert short.id in {f.id for f in client.files.list()}

    until(lambda: time.time() >= short.expires_at + 0.05, "the expiry")
    with pytest.raises(openai.NotFoundError) as exc:
        client.files.retrieve(short.id)
    assert_openai_error(exc.value, 404, None, "file_not_found")
    with pytest.raises(openai.NotFoundError):
        client.files.content(short.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(short.id)
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.create(input_file_id=short.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert_openai_error(exc.value, 404, "input_file_id", "file_not_found")
    assert {f.id for f in client.files.list()} == {kept.id}

    # The sweeper deletes the body and the metadata; the other file stays whole.
    until(lambda: short.id not in stored_ids(state), "the sweep of the metadata")
    assert not (state / "files" / short.id).exists()
    assert (state / "files" / kept.id).exists() and kept.id in stored_ids(state)
    assert client.files.retrieve(kept.id).id == kept.id


def test_a_batch_output_expires_as_asked(egw):
    gw, state = egw
    client = gw.client()
    lines = [chat_line(f"r{i}", f"question {i}") for i in range(5)]
    lines.append(chat_line("bad", "x", model="chat", stream=True))  # to the error file
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="1h",
                                  output_expires_after={"anchor": "created_at", "seconds": 3})
    assert batch.expires_at == batch.created_at + 3600  # set by completion_window
    batch = wait_batch(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts.completed == 5 and batch.request_counts.failed == 1
    output = client.files.retrieve(batch.output_file_id)
    errors = client.files.retrieve(batch.error_file_id)
    for file in (output, errors):
        assert file.purpose == "batch_output"
        assert file.expires_at == file.created_at + 3  # anchored at the file's creation
    assert len(client.files.content(output.id).content.splitlines()) == 5

    until(lambda: time.time() >= max(output.expires_at, errors.expires_at) + 0.05, "the expiry")
    for file in (output, errors):
        with pytest.raises(openai.NotFoundError):
            client.files.content(file.id)
    assert client.files.retrieve(upload.id).id == upload.id  # the input keeps its own policy
    again = client.batches.retrieve(batch.id)  # the batch still names its (expired) files
    assert again.output_file_id == output.id and again.status == "completed"
    until(lambda: not {output.id, errors.id} & stored_ids(state), "the sweep")
    assert not (state / "files" / output.id).exists()


def test_without_output_expires_after_the_output_is_kept(egw):
    gw, _ = egw
    client = gw.client()
    upload = client.files.create(file=("in.jsonl", jsonl([chat_line("r", "q")])),
                                 purpose="batch")
    batch = wait_batch(client, client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert client.files.retrieve(batch.output_file_id).expires_at is None


@pytest.mark.parametrize("policy, param", [
    ({"anchor": "created_at", "seconds": 0}, "expires_after.seconds"),
    ({"anchor": "created_at", "seconds": THIRTY_DAYS + 1}, "expires_after.seconds"),
    ({"anchor": "last_active_at", "seconds": 60}, "expires_after.anchor"),
    ({"anchor": "created_at", "seconds": "soon"}, "expires_after.seconds"),
    ({"seconds": 60}, "expires_after.anchor"),
])
def test_bad_upload_policies_are_400s_naming_the_field(egw, policy, param):
    gw, state = egw
    client = gw.client()
    before = set((state / "files").iterdir())
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch", expires_after=policy)
    assert_openai_error(exc.value, 400, param, "invalid_request")
    assert set((state / "files").iterdir()) == before  # nothing kept of a refused upload


@pytest.mark.parametrize("policy, param", [
    ({"anchor": "created_at", "seconds": 0}, "output_expires_after.seconds"),
    ({"anchor": "created_at", "seconds": 1.5}, "output_expires_after.seconds"),
    ({"anchor": "created_at", "seconds": True}, "output_expires_after.seconds"),
    ({"anchor": "created_at", "seconds": "60"}, "output_expires_after.seconds"),
    ({"anchor": "created_at"}, "output_expires_after.seconds"),
    ({"anchor": "input_created_at", "seconds": 60}, "output_expires_after.anchor"),
    ("1h", "output_expires_after"),
])
def test_bad_output_policies_are_400s_naming_the_field(egw, policy, param):
    gw, _ = egw
    client = gw.client()
    upload = client.files.create(file=("in.jsonl", jsonl([chat_line("r", "q")])),
                                 purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                              completion_window="24h", output_expires_after=policy)
    assert_openai_error(exc.value, 400, param, "invalid_request")
    assert not client.batches.list().data  # no batch was made


def test_openai_minimum_applies_by_default(make_gateway, tmp_path):
    gw = make_gateway({"batch": {"stateDir": str(tmp_path / "batch"), **FAST}})
    client = gw.client()
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch",
                            expires_after={"anchor": "created_at", "seconds": 3599})
    assert_openai_error(exc.value, 400, "expires_after.seconds", "invalid_request")
    assert "3600" in exc.value.body["message"]
    ok = client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch",
                             expires_after={"anchor": "created_at", "seconds": 3600})
    assert ok.expires_at == ok.created_at + 3600
    # Raw JSON, as any client may send it: the error is OpenAI's shape.
    status, _, body = gw.http("POST", "/v1/batches", json.dumps({
        "input_file_id": ok.id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
        "output_expires_after": {"anchor": "created_at", "seconds": 60}}).encode(),
        {"content-type": "application/json"})
    assert status == 400
    assert json.loads(body)["error"]["param"] == "output_expires_after.seconds"


def test_one_process_of_those_sharing_a_store_sweeps(tmp_path):
    """The sweeper's role is a lease in the store: two stores on one directory (two processes'
    worth), one holder at a time, taken over once the holder's lease lapses."""
    async def scenario() -> None:
        a = await SqliteStore(tmp_path).open()
        b = await SqliteStore(tmp_path).open()
        try:
            now = time.time()
            assert await a.hold("sweeper", "host/1/a", now, 5)
            assert not await b.hold("sweeper", "host/2/b", now + 1, 5)
            assert await a.hold("sweeper", "host/1/a", now + 2, 5)  # renewed
            assert not await b.hold("sweeper", "host/2/b", now + 6, 5)
            assert await b.hold("sweeper", "host/2/b", now + 7.5, 5)  # a's lease lapsed
            assert not await a.hold("sweeper", "host/1/a", now + 8, 5)
        finally:
            await a.close()
            await b.close()
    asyncio.run(scenario())


def test_a_store_made_before_expiry_is_upgraded(tmp_path):
    """A store written by a gateway from before expiry (no expires_at, no output policy, no
    roles) opens, keeps its files (never expiring) and takes policies from then on."""
    from lb.batch import store as store_module

    old = (store_module._SCHEMA.replace(",\n    expires_at INTEGER", "")
           .replace(",\n    output_expires_after INTEGER", ""))
    assert "expires" not in old.split("CREATE TABLE IF NOT EXISTS roles")[0]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-old").write_bytes(b"{}\n")
    with sqlite3.connect(tmp_path / "batch.db") as db:
        db.executescript(old)
        db.execute("INSERT INTO files (id, filename, purpose, bytes, created_at) "
                   "VALUES ('file-old', 'old.jsonl', 'batch', 3, 1)")

    async def scenario() -> None:
        store = await SqliteStore(tmp_path).open()
        try:
            assert (await store.get_file("file-old"))["expires_at"] is None
            new = await store.create_file("new.jsonl", "batch", io.BytesIO(b"x"), None, 60)
            assert new["expires_at"] == new["created_at"] + 60
            assert await store.sweep(int(time.time()) + 61, 10) == 1
            assert await store.get_file(new["id"]) is None
            assert await store.get_file("file-old") is not None
        finally:
            await store.close()
    asyncio.run(scenario())
