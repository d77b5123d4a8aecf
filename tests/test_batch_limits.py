"""Per-line and per-batch limits, through the official `openai` SDK against a real gateway on
simulated replicas: one model per batch (`mismatched_model`), the longest line
(`line_too_long`), and the embedding inputs of an embeddings batch
(`too_many_embedding_inputs`). Each refused line is in the error file with its custom_id and
line number, counted as failed; the rest of the batch runs.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from lb.batch.limits import embedding_inputs
from tests.test_batch_api import FAST, chat_line, jsonl, wait_batch


@pytest.fixture
def make(make_gateway, tmp_path):
    def start(**batch: Any) -> Any:
        gw = make_gateway({"batch": {"stateDir": str(tmp_path / "batch"), **FAST, **batch}})
        gw.model_with("chat", [gw.sim("chat", "c1", "sql")], adapters=["sql"])
        gw.model_with("emb", [gw.sim("emb", "e1")], features=["TextEmbedding"])
        return gw
    return start


def run(client: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions") -> Any:
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = wait_batch(client, client.batches.create(input_file_id=upload.id, endpoint=endpoint,
                                                     completion_window="24h").id)
    assert batch.status == "completed", batch
    return batch


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).content.splitlines()]


def test_one_model_per_batch(make):
    """The batch's model is its first runnable line's (an unreadable first line does not set
    it); another model, an adapter of the same model included, is `mismatched_model`."""
    client = make().client()
    lines = ["{not json",
             chat_line("first", "q1"),
             chat_line("other", "q2", model="emb"),
             chat_line("second", "q3"),
             chat_line("adapter", "q4", model="chat_sql"),
             chat_line("unknown", "q5", model="nope")]
    batch = run(client, lines)
    assert batch.request_counts.total == 6
    assert batch.request_counts.completed == 2 and batch.request_counts.failed == 4
    output = lines_of(client, batch.output_file_id)
    assert [x["custom_id"] for x in output] == ["first", "second"]
    assert all(x["response"]["body"]["model"] == "chat" for x in output)
    errors = {x["custom_id"]: x["error"] for x in lines_of(client, batch.error_file_id)}
    assert errors[None]["code"] == "invalid_json_line"
    for custom_id, line in (("other", 3), ("adapter", 5), ("unknown", 6)):
        assert errors[custom_id]["code"] == "mismatched_model"
        assert errors[custom_id]["line"] == line and "chat" in errors[custom_id]["message"]


def test_single_model_off_lets_a_batch_mix_models(make):
    client = make(singleModel=False).client()
    batch = run(client, [chat_line("a", "q1"), chat_line("b", "q2", model="chat_sql")])
    assert batch.request_counts.completed == 2 and batch.request_counts.failed == 0
    models = {x["custom_id"]: x["response"]["body"]["model"]
              for x in lines_of(client, batch.output_file_id)}
    assert models == {"a": "chat", "b": "chat_sql"}


def test_a_line_too_long_is_an_error_line(make):
    client = make(maxLineBytes=400).client()
    short = chat_line("short", "q")
    long = chat_line("long", "x" * 400)
    lines = [short, long, '{"custom_id": "broken", ' + "y" * 400, chat_line("after", "q")]
    assert len(json.dumps(short)) <= 400 < len(json.dumps(long))
    batch = run(client, lines)
    assert batch.request_counts.total == 4
    assert batch.request_counts.completed == 2 and batch.request_counts.failed == 2
    assert [x["custom_id"] for x in lines_of(client, batch.output_file_id)] == ["short", "after"]
    errors = lines_of(client, batch.error_file_id)
    assert [(x["custom_id"], x["error"]["code"], x["error"]["line"]) for x in errors] == [
        ("long", "line_too_long", 2), (None, "line_too_long", 3)]
    assert "400" in errors[0]["error"]["message"] and errors[0]["response"] is None


def test_a_long_lines_custom_id_is_taken(make):
    """A custom_id used by a refused long line cannot be used again by a later line."""
    client = make(maxLineBytes=400).client()
    batch = run(client, [chat_line("a", "x" * 400), chat_line("a", "q"), chat_line("b", "q")])
    errors = [(x["custom_id"], x["error"]["code"]) for x in lines_of(client, batch.error_file_id)]
    assert errors == [("a", "line_too_long"), ("a", "duplicate_custom_id")]
    assert batch.request_counts.completed == 1 and batch.request_counts.failed == 2


def emb_line(custom_id: str, value: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "emb", "input": value}}


def test_embedding_inputs_across_the_batch(make):
    """Lines run while their inputs fit in what is left of the cap; one that does not fit is
    refused and uses none of it, so a smaller line after it may still run."""
    client = make(maxEmbeddingInputs=10).client()
    lines = [emb_line("a", ["w"] * 4),       # 4
             emb_line("b", ["w"] * 5),       # 9
             emb_line("c", ["w"] * 3),       # would be 12: refused
             emb_line("d", "one string"),    # 10
             emb_line("e", [1, 2, 3])]       # a token array is one input: 11, refused
    batch = run(client, lines, "/v1/embeddings")
    assert batch.request_counts.total == 5
    assert batch.request_counts.completed == 3 and batch.request_counts.failed == 2
    output = {x["custom_id"]: x["response"]["body"] for x in lines_of(client, batch.output_file_id)}
    assert set(output) == {"a", "b", "d"}
    assert [len(output[c]["data"]) for c in ("a", "b", "d")] == [4, 5, 1]
    errors = lines_of(client, batch.error_file_id)
    assert [(x["custom_id"], x["error"]["code"], x["error"]["line"]) for x in errors] == [
        ("c", "too_many_embedding_inputs", 3), ("e", "too_many_embedding_inputs", 5)]


def test_the_embedding_cap_leaves_chat_batches_alone(make):
    client = make(maxEmbeddingInputs=1).client()
    batch = run(client, [chat_line(f"r{i}", f"q{i}") for i in range(3)])
    assert batch.request_counts.completed == 3 and batch.request_counts.failed == 0


def test_embedding_input_counting():
    assert embedding_inputs("text") == 1
    assert embedding_inputs(["a", "b", "c"]) == 3
    assert embedding_inputs([1, 2, 3]) == 1
    assert embedding_inputs([[1, 2], [3]]) == 2
    assert embedding_inputs([]) == 0
    assert embedding_inputs(None) == 1
