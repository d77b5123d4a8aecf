"""The Files and Batches API through the official `openai` SDK, against a real gateway whose
batches run on simulated replicas (and, where a test needs to hold requests, on the harness's
test backend).

Each test gets its own gateway and its own store directory; the runner polls fast and holds
short leases so that batches start and end within the test's patience.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from typing import Any, Callable

import openai
import pytest

PREFIXES = ["/v1", "/openai/v1"]
FAST = {"pollSeconds": 0.1, "leaseSeconds": 3, "concurrency": 8}
# Batches that mix models (to see each line's own answer: an unknown model's 404, an adapter,
# a model a key may not use); the one-model rule has its tests in test_batch_limits.py.
MIXED = {**FAST, "singleModel": False}


@pytest.fixture
def bgw(make_gateway, tmp_path):
    """A gateway with the Batch API on, a chat model (with an adapter) and an embedding model,
    each on simulated replicas."""
    gw = make_gateway({"batch": {"stateDir": str(tmp_path / "batch"), **MIXED}})
    gw.model_with("chat", [gw.sim("chat", "c1", "sql"), gw.sim("chat", "c2", "sql")],
                  adapters=["sql"], strategy="PrefixHash")
    gw.model_with("emb", [gw.sim("emb", "e1")], features=["TextEmbedding"])
    return gw


def jsonl(lines: list[Any]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines).encode()


def chat_line(custom_id: str, content: str, model: str = "chat", **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 4,
                     "messages": [{"role": "user", "content": content}], **extra}}


def wait_batch(client: openai.OpenAI, batch_id: str, done: Callable[[Any], bool] | None = None,
               timeout: float = 120) -> Any:
    done = done or (lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch}"
        time.sleep(0.1)


def read_lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    """custom_id -> line, each custom_id exactly once (lines refused for having no custom_id,
    or a duplicate one, left out)."""
    if file_id is None:
        return {}
    lines = [json.loads(x) for x in client.files.content(file_id).content.splitlines()]
    lines = [x for x in lines if x["custom_id"] is not None
             and (x["error"] or {}).get("code") != "duplicate_custom_id"]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id appears twice"
    return by_id


# -- the whole flow -------------------------------------------------------------------------


def test_thousand_lines_with_invalid_ones_mixed_in(bgw):
    """1,000 lines: valid chat requests (some for an adapter, some for an unknown model) and
    lines validation refuses; every line ends up exactly once in the output or the error file,
    with what it asked for."""
    client = bgw.client()
    lines: list[Any] = []
    expect: dict[str, str] = {}  # custom_id -> "ok" | "404" | error code
    for i in range(1000):
        cid = f"req-{i}"
        kind = i % 20
        if kind == 3:
            lines.append("{not json")
            continue
        if kind == 5:
            lines.append({**chat_line(cid, "x"), "url": "/v1/embeddings"})
            expect[cid] = "mismatched_url"
        elif kind == 7:
            line = chat_line(cid, "x")
            del line["body"]["model"]
            lines.append(line)
            expect[cid] = "missing_required_parameter"
        elif kind == 11:
            lines.append(chat_line(cid, "x", model="nope"))
            expect[cid] = "404"
        elif kind == 13:
            lines.append(chat_line(cid, f"adapter question {i}", model="chat_sql"))
            expect[cid] = "ok"
        else:
            lines.append(chat_line(cid, f"question number {i}"))
            expect[cid] = "ok"
    lines.append(chat_line("req-0", "a second req-0"))  # duplicate custom_id: refused
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch"
    assert uploaded.bytes == len(jsonl(lines)) and uploaded.filename == "input.jsonl"

    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    assert batch.expires_at == batch.created_at + 24 * 3600
    batch = wait_batch(client, batch.id)

    assert batch.status == "completed", batch
    invalid_json = sum(1 for line in lines if isinstance(line, str))
    ok = sum(1 for v in expect.values() if v == "ok")
    assert batch.request_counts.total == 1001
    assert batch.request_counts.completed == ok
    assert batch.request_counts.failed == 1001 - ok
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at
    output, errors = read_lines(client, batch.output_file_id), read_lines(client, batch.error_file_id)
    assert set(output) == {c for c, v in expect.items() if v == "ok"}
    for cid, line in output.items():
        response = line["response"]
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert response["status_code"] == 200 and response["request_id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["model"] == ("chat_sql" if int(cid[4:]) % 20 == 13 else "chat")
    assert set(errors) == {c for c, v in expect.items() if v != "ok"}
    for cid, v in expect.items():
        if v == "404":
            assert errors[cid]["response"]["status_code"] == 404
            assert errors[cid]["response"]["body"]["error"]["code"] == "model_not_found"
        elif v != "ok":
            assert errors[cid]["response"] is None
            assert errors[cid]["error"]["code"] == v
    error_lines = client.files.content(batch.error_file_id).content.splitlines()
    assert len(error_lines) == 1001 - ok  # unreadable and duplicate lines included
    codes = [json.loads(x)["error"]["code"] for x in error_lines if json.loads(x)["error"]]
    assert codes.count("invalid_json_line") == invalid_json
    assert codes.count("duplicate_custom_id") == 1
    usages = [line["response"]["body"]["usage"] for line in output.values()]
    assert batch.usage.input_tokens == sum(u["prompt_tokens"] for u in usages) > 0
    assert batch.usage.output_tokens == sum(u["completion_tokens"] for u in usages) > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert batch.usage.input_tokens_details.cached_tokens == sum(
        u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    out_file = client.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output"
    bgw.settle()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_embeddings_and_completions_batches(bgw, prefix):
    client = bgw.client(prefix)
    emb = client.files.create(file=("e.jsonl", jsonl([
        {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "emb", "input": f"text {i}"}} for i in range(5)])), purpose="batch")
    comp = client.files.create(file=("c.jsonl", jsonl([
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "chat", "prompt": f"Once {i}", "max_tokens": 3}} for i in range(5)])),
        purpose="batch")
    b1 = client.batches.create(input_file_id=emb.id, endpoint="/v1/embeddings",
                               completion_window="24h")
    b2 = client.batches.create(input_file_id=comp.id, endpoint="/v1/completions",
                               completion_window="24h")
    b1, b2 = wait_batch(client, b1.id), wait_batch(client, b2.id)
    assert (b1.status, b2.status) == ("completed", "completed")
    assert b1.error_file_id is None and b2.error_file_id is None
    embeddings = read_lines(client, b1.output_file_id)
    assert sorted(embeddings) == [f"e{i}" for i in range(5)]
    assert all(x["response"]["body"]["object"] == "list" for x in embeddings.values())
    assert all(x["response"]["body"]["data"][0]["embedding"] for x in embeddings.values())
    completions = read_lines(client, b2.output_file_id)
    assert all(x["response"]["body"]["object"] == "text_completion" for x in completions.values())


def test_files_list_retrieve_delete_and_batches_list(bgw):
    client = bgw.client()
    ids = [client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line("a", "b")])),
                               purpose="batch").id for i in range(3)]
    listed = [f.id for f in client.files.list()]
    assert listed[:3] == ids[::-1]  # newest first
    page = client.files.list(limit=2, order="asc")
    assert [f.id for f in page.data] == ids[:2] and page.has_more
    assert [f.id for f in client.files.list(after=ids[1], order="asc")] == ids[2:]
    assert [f.id for f in page] == ids  # the SDK follows the cursor through every page
    assert client.files.retrieve(ids[0]).filename == "f0.jsonl"
    assert client.files.content(ids[0]).content == jsonl([chat_line("a", "b")])
    deleted = client.files.delete(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[0])
    with pytest.raises(openai.NotFoundError):
        client.files.content(ids[0])

    batches = [client.batches.create(input_file_id=ids[1], endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == batches[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=100, after=batches[2])] == batches[:2][::-1]
    assert [b.id for b in client.batches.list(limit=2)][:2] == batches[::-1][:2]
    assert sorted(b.id for b in client.batches.list(limit=2)) != []
    assert {b.id for b in client.batches.list(limit=2)} <= set(batches)
    assert [b.id for b in page] == batches[::-1]  # auto-pagination
    for batch_id in batches:
        assert wait_batch(client, batch_id).status == "completed"
    with pytest.raises(openai.ConflictError) as exc:
        client.batches.cancel(batches[0])
    assert exc.value.body["code"] == "batch_not_cancellable"


# -- cancel and expiry ------------------------------------------------------------------------


@pytest.fixture
def held(make_gateway, tmp_path):
    """A gateway whose model's only replica holds every request until released."""
    gw = make_gateway({"batch": {"stateDir": str(tmp_path / "batch"), **FAST}})
    backend = gw.backend("slow")
    gw.model_with("m", [backend])
    gw.call(backend.hold)
    return gw, backend


def test_cancel_keeps_what_finished(held):
    gw, backend = held
    client = gw.client()
    upload = client.files.create(file=("in.jsonl", jsonl(
        [chat_line(f"r{i}", f"q{i}", model="m") for i in range(40)])), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    gw.wait_for(lambda: backend.in_flight == FAST["concurrency"], 30, "the batch's requests")
    gw.call(backend.release)
    gw.wait_for(lambda: backend.completed >= 8, 30, "some answers")
    gw.call(backend.hold)
    gw.wait_for(lambda: backend.in_flight == FAST["concurrency"], 30, "more requests held")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_batch(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    gw.wait_for(lambda: backend.in_flight == 0, 30, "held requests aborted")
    done = read_lines(client, batch.output_file_id)
    errors = read_lines(client, batch.error_file_id)
    assert len(done) >= 8 and set(done).isdisjoint(errors)
    assert set(done) | set(errors) == {f"r{i}" for i in range(40)}
    assert {e["error"]["code"] for e in errors.values()} == {"batch_cancelled"}
    assert batch.request_counts.completed == len(done)
    assert batch.request_counts.failed == len(errors)
    assert client.batches.cancel(batch.id).status == "cancelled"  # again: nothing changes
    gw.call(backend.release)
    gw.settle()
    assert gw.metric("kubeai_inference_requests_total", status="500") == 0


def test_expiry_ends_the_batch_and_keeps_what_finished(held):
    gw, backend = held
    client = gw.client()
    gw.call(backend.release)
    # 60 lines of 1 s each, 8 at a time, need 8 s; the window (3 s, from a whole second) ends
    # after the first round and long before the last.
    upload = client.files.create(file=("in.jsonl", jsonl(
        [chat_line(f"r{i}", f"q{i}", model="m") for i in range(60)])), purpose="batch")
    gw.call(lambda: setattr(backend.plan, "header_delay", 1.0))
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="3s")
    assert batch.expires_at == batch.created_at + 3
    batch = wait_batch(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    done = read_lines(client, batch.output_file_id)
    errors = read_lines(client, batch.error_file_id)
    assert done and errors and set(done).isdisjoint(errors)
    assert set(done) | set(errors) == {f"r{i}" for i in range(60)}
    assert {e["error"]["code"] for e in errors.values()} == {"batch_expired"}
    assert batch.request_counts.completed == len(done)
    gw.settle()


# -- bad input ------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors(bgw):
    client = bgw.client()
    good = client.files.create(file=("in.jsonl", jsonl([chat_line("a", "b")])), purpose="batch")
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert exc.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError) as exc:
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert exc.value.body["code"] == "file_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=good.id, endpoint="/v1/moderations",
                              completion_window="24h")
    assert exc.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions",
                              completion_window="tomorrow")
    assert exc.value.body["param"] == "completion_window"
    with pytest.raises(openai.BadRequestError) as exc:
        client.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"k": "v" * 600})
    assert exc.value.body["param"] == "metadata"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")
    with pytest.raises(openai.BadRequestError):
        client.batches.list(limit=1000)
    for method, path, body, headers, status in [
        ("POST", "/v1/files", b"{}", {"content-type": "application/json"}, 415),
        ("POST", "/v1/files", b"--x\r\nbroken", {"content-type": "multipart/form-data; boundary=x"}, 400),
        ("POST", "/v1/batches", b"[1,", {"content-type": "application/json"}, 400),
        ("POST", "/v1/batches", b"[]", {"content-type": "application/json"}, 400),
        ("PUT", "/v1/batches", b"", {}, 405),
    ]:
        got, _, raw = bgw.http(method, path, body, headers)
        assert got == status, (path, raw)
        error = json.loads(raw)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_file_size_limit(make_gateway, tmp_path):
    gw = make_gateway({"batch": {"stateDir": str(tmp_path / "b"), "maxFileBytes": 1000, **FAST}})
    client = gw.client()
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", b"x" * 200_000), purpose="batch")
    assert exc.value.status_code == 413 and exc.value.body["code"] == "file_too_large"
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.create(file=("big.jsonl", b"x" * 2000), purpose="batch")
    assert exc.value.status_code == 413
    assert client.files.create(file=("ok.jsonl", b"x" * 900), purpose="batch").bytes == 900


def test_a_batch_with_no_runnable_line_fails_with_errors(bgw):
    client = bgw.client()
    bad = client.files.create(file=("bad.jsonl", jsonl(["{oops", {"custom_id": "a"}])),
                              purpose="batch")
    batch = wait_batch(client, client.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and batch.failed_at
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (1, "invalid_json_line"), (2, "invalid_method")]
    empty = client.files.create(file=("empty.jsonl", b"\n\n"), purpose="batch")
    batch = wait_batch(client, client.batches.create(
        input_file_id=empty.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "failed" and batch.errors.data[0].code == "empty_file"


def test_the_api_is_off_without_a_state_directory(gw):
    with pytest.raises(openai.NotFoundError) as exc:
        gw.client().files.list()
    assert exc.value.body["code"] == "batch_api_disabled"


def test_replica_errors_and_broken_answers_go_to_the_error_file(make_gateway, tmp_path):
    """A replica's error answer is kept with its status (in OpenAI's shape, as the gateway
    rewrites it); an answer cut off mid-body is a 502, never a truncated success."""
    gw = make_gateway({"batch": {"stateDir": str(tmp_path / "batch"), **MIXED},
                       "retries": {"maxRetries": 0}})
    gw.model_with("ok", [gw.backend("fine")])
    gw.model_with("bad", [gw.backend("refuses", status=422)])
    gw.model_with("cut", [gw.backend("cuts", truncate=True)])
    client = gw.client()
    upload = client.files.create(file=("in.jsonl", jsonl(
        [chat_line(f"{model}-{i}", "hi", model=model) for model in ("ok", "bad", "cut")
         for i in range(3)])), purpose="batch")
    batch = wait_batch(client, client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 6)
    assert sorted(read_lines(client, batch.output_file_id)) == ["ok-0", "ok-1", "ok-2"]
    errors = read_lines(client, batch.error_file_id)
    for i in range(3):
        refused, cut = errors[f"bad-{i}"]["response"], errors[f"cut-{i}"]["response"]
        assert refused["status_code"] == 422
        assert "refuses failed on purpose" in refused["body"]["error"]["message"]
        assert cut["status_code"] == 502 and cut["body"]["error"]["code"] == "upstream_error"
    gw.settle()


def test_a_broken_store_is_a_503_not_a_traceback(bgw, tmp_path):
    client = bgw.client()
    kept = client.files.create(file=("in.jsonl", jsonl([chat_line("a", "b")])), purpose="batch")
    shutil.rmtree(tmp_path / "batch" / "files")  # the volume of file bodies is gone
    with pytest.raises(openai.InternalServerError) as exc:
        client.files.content(kept.id)
    assert exc.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as exc:
        client.files.create(file=("in.jsonl", jsonl([chat_line("a", "b")])), purpose="batch")
    assert exc.value.status_code == 503 and exc.value.body["code"] == "store_unavailable"
    assert client.batches.list().data == []  # the metadata still answers


def test_with_api_keys_each_key_sees_its_own_and_lines_run_under_it(make_gateway, tmp_path):
    """Keys on: the routes need a key; a key sees only its own files and batches; a batch's
    lines run under the key that created it (its model globs apply), and once that key is
    revoked the lines left fail with 401."""
    from tests.test_gateway_api_keys import write_keys

    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, a={"models": ["chat"]}, b={"models": ["*"]})
    gw = make_gateway({"batch": {"stateDir": str(tmp_path / "batch"), **MIXED},
                       "apiKeys": {"enabled": True, "file": str(path), "reloadSeconds": 0.1}})
    backend = gw.backend("b1")
    gw.model_with("chat", [backend])
    gw.model_with("other", [backend])
    with pytest.raises(openai.AuthenticationError):
        gw.client().files.list()  # the harness's client sends a key nobody issued
    a = openai.OpenAI(base_url=gw.url + "/v1", api_key=secrets["a"], max_retries=0, timeout=30)
    b = openai.OpenAI(base_url=gw.url + "/v1", api_key=secrets["b"], max_retries=0, timeout=30)
    upload = a.files.create(file=("in.jsonl", jsonl(
        [chat_line("mine", "hi"), chat_line("not-mine", "hi", model="other")])), purpose="batch")
    assert [f.id for f in a.files.list()] == [upload.id] and not b.files.list().data
    with pytest.raises(openai.NotFoundError):
        b.files.content(upload.id)
    with pytest.raises(openai.NotFoundError):
        b.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                         completion_window="24h")
    batch = wait_batch(a, a.batches.create(input_file_id=upload.id,
                                           endpoint="/v1/chat/completions",
                                           completion_window="24h").id)
    assert batch.status == "completed" and not b.batches.list().data
    with pytest.raises(openai.NotFoundError):
        b.batches.retrieve(batch.id)
    assert list(read_lines(a, batch.output_file_id)) == ["mine"]
    refused = read_lines(a, batch.error_file_id)["not-mine"]["response"]
    assert refused["status_code"] == 403 and refused["body"]["error"]["code"] == "model_not_allowed"
    with pytest.raises(openai.NotFoundError):
        b.files.content(batch.output_file_id)
    assert all("authorization" not in {k.lower() for k in seen.headers} for seen in backend.seen)

    gw.call(backend.hold)
    upload = a.files.create(file=("in.jsonl", jsonl(
        [chat_line(f"r{i}", f"q{i}") for i in range(20)])), purpose="batch")
    batch = a.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    gw.wait_for(lambda: backend.in_flight == FAST["concurrency"], 30, "the batch's requests")
    write_keys(path, b={"models": ["*"]})  # a's key is revoked
    time.sleep(0.5)  # reloaded within reloadSeconds; the held lines were admitted before
    with pytest.raises(openai.AuthenticationError):
        a.batches.list()
    gw.call(backend.release)
    db = sqlite3.connect(f"file:{tmp_path / 'batch' / 'batch.db'}?mode=ro", uri=True)
    deadline = time.monotonic() + 30
    while db.execute("SELECT status FROM batches WHERE id = ?", (batch.id,)).fetchone()[0] \
            != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    db.close()
    again = write_keys(path, a={"models": ["chat"]})  # the name back, under a new secret
    a = openai.OpenAI(base_url=gw.url + "/v1", api_key=again["a"], max_retries=0, timeout=30)
    deadline = time.monotonic() + 30
    while True:
        try:
            batch = a.batches.retrieve(batch.id)
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert batch.request_counts.completed == FAST["concurrency"]
    errors = read_lines(a, batch.error_file_id)
    assert len(errors) == 20 - FAST["concurrency"]
    assert {e["response"]["status_code"] for e in errors.values()} == {401}
    gw.settle()


def test_lines_past_the_keys_rate_limit_wait_rather_than_fail(make_gateway, tmp_path):
    """A key of 60 requests a minute has 60 at once, then one a second: a batch of 63 lines
    under it finishes with every line answered, the last three after waiting their turn."""
    from tests.test_gateway_api_keys import write_keys

    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, a={"models": ["*"], "limits": {"requestsPerMinute": 60}})
    gw = make_gateway({"batch": {"stateDir": str(tmp_path / "batch"), **FAST},
                       "apiKeys": {"enabled": True, "file": str(path)}})
    gw.model_with("chat", [gw.backend("b1")])
    a = openai.OpenAI(base_url=gw.url + "/v1", api_key=secrets["a"], max_retries=0, timeout=30)
    upload = a.files.create(file=("in.jsonl", jsonl(
        [chat_line(f"r{i}", f"q{i}") for i in range(63)])), purpose="batch")
    batch = wait_batch(a, a.batches.create(input_file_id=upload.id,
                                           endpoint="/v1/chat/completions",
                                           completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.completed == 63
    assert batch.error_file_id is None
    assert gw.metric("kvgate_key_rejections_total", key="a", reason="requests") > 0
