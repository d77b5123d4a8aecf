"""Adapter answers carry the client's model name: a request for ``m_sql`` is served by the
engine as ``sql`` (vLLM names a LoRA by itself), and the gateway puts ``m_sql`` back in the JSON
answer and in every SSE chunk, by replacing bytes (``lb.rewrite``). Answers to every other
request pass through byte for byte. Real HTTP and the official ``openai`` SDK throughout
(tests/gateway_harness.py), plus a model server of fixed bytes for exact comparisons."""

from __future__ import annotations

import asyncio
import gzip
import json
import random

import pytest
from aiohttp import web

from lb.registry import Endpoint
from lb.rewrite import ModelRename
from tests.gateway_harness import HOST

MESSAGES = [{"role": "user", "content": "hi"}]


# -- the byte rewrite itself ------------------------------------------------------------------


def test_whole_body_renames_both_spellings_and_nothing_else():
    rename = ModelRename("sql", "m_sql")
    body = (b'{"model":"sql","x":{"model": "sql"},"y":"sqlx","z":{"model":"sqlx"},'
            b'"content":"say \\"model\\":\\"sql\\"","models":"sql"}')
    assert rename.whole(body) == (
        b'{"model":"m_sql","x":{"model": "m_sql"},"y":"sqlx","z":{"model":"sqlx"},'
        b'"content":"say \\"model\\":\\"sql\\"","models":"sql"}')
    assert rename.whole(b'{"id":1}') == b'{"id":1}'


def _stream() -> bytes:
    events = []
    for i in range(6):
        sep = ":" if i % 2 else ": "
        events.append(b'data: {"id":"c","model"' + sep.encode() + b'"sql","choices":[{"delta":'
                      b'{"content":"\\"model\\": \\"sql\\" tok' + str(i).encode() + b'"}}]}\n\n')
    events.append(b'data: {"model":"sqlite"}\n\ndata: {"model": "sql"}')  # ends on an occurrence
    return b"".join(events)


def test_pieces_cut_anywhere_give_the_whole_body_renamed():
    stream = _stream()
    expected = ModelRename("sql", "m_sql").whole(stream)
    assert expected.count(b'"m_sql"') == 7
    for cut in range(len(stream) + 1):  # every single cut, including inside an occurrence
        rename = ModelRename("sql", "m_sql")
        out = rename.feed(stream[:cut]) + rename.feed(stream[cut:]) + rename.flush()
        assert out == expected, cut
    rng = random.Random(7)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
        rename = ModelRename("sql", "m_sql")
        pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        assert b"".join(rename.feed(p) for p in pieces) + rename.flush() == expected


def test_a_held_back_tail_that_was_no_occurrence_comes_out_unchanged():
    rename = ModelRename("sql", "m_sql")
    assert rename.feed(b'data: {"x":1,"model": "sq') == b'data: {"x":1,'
    assert rename.flush() == b'"model": "sq'
    assert rename.feed(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"  # nothing held: no delay


# -- through the gateway, with the test backends (they echo the model they were sent) ---------


@pytest.fixture
def adapters(gw):
    backend = gw.backend("b1")
    gw.add_model("m", adapters=["sql"])
    gw.set_endpoints("m", [backend.endpoint("sql")])
    gw.add_model("e", adapters=["sql"], engine="VLLM", features=["TextEmbedding"])
    gw.set_endpoints("e", [backend.endpoint("sql", key="b1e")])
    return gw, backend


def test_json_answers_carry_the_requested_name(adapters):
    gw, backend = adapters
    client = gw.client()
    chat = client.chat.completions.create(model="m_sql", messages=MESSAGES)
    assert chat.model == "m_sql" and chat.choices[0].message.content == "hello from b1"
    assert backend.last.json["model"] == "sql"  # the engine was asked for the adapter
    completion = client.completions.create(model="m_sql", prompt="hi")
    assert completion.model == "m_sql"
    embedding = client.embeddings.create(model="e_sql", input=["a", "bb"])
    assert embedding.model == "e_sql" and len(embedding.data) == 2
    # Base-model requests are untouched.
    assert client.chat.completions.create(model="m", messages=MESSAGES).model == "m"


def test_json_answer_content_length_is_the_new_size(adapters):
    gw, backend = adapters
    status, headers, body = gw.post_json("/v1/chat/completions",
                                         {"model": "m_sql", "messages": MESSAGES})
    assert status == 200
    assert json.loads(body)["model"] == "m_sql"
    assert int(headers["content-length"]) == len(body)
    assert headers["x-backend"] == "b1"  # the replica's other headers still come through


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_every_stream_chunk_carries_the_requested_name(adapters, kind):
    gw, backend = adapters
    backend.plan.chunks = 5
    client = gw.client()
    if kind == "chat":
        chunks = list(client.chat.completions.create(model="m_sql", messages=MESSAGES,
                                                     stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        chunks = list(client.completions.create(model="m_sql", prompt="hi", stream=True))
        text = "".join(c.choices[0].text for c in chunks)
    assert len(chunks) == 5 and text == "tok0 tok1 tok2 tok3 tok4 "
    assert {c.model for c in chunks} == {"m_sql"}


def test_the_engine_is_asked_for_an_uncompressed_adapter_answer(adapters):
    gw, backend = adapters
    client = gw.client()
    client.chat.completions.create(model="m_sql", messages=MESSAGES,
                                   extra_headers={"accept-encoding": "gzip, br"})
    assert _header(backend.last.headers, "accept-encoding") == "identity"
    client.chat.completions.create(model="m", messages=MESSAGES,
                                   extra_headers={"accept-encoding": "gzip, br"})
    assert _header(backend.last.headers, "accept-encoding") == "gzip, br"  # others: as sent


def _header(headers: dict[str, str], name: str) -> str:
    return {k.lower(): v for k, v in headers.items()}[name]


def test_a_truncated_adapter_answer_is_a_502(adapters):
    gw, backend = adapters
    backend.plan.truncate = True
    status, headers, body = gw.post_json("/v1/chat/completions",
                                         {"model": "m_sql", "messages": MESSAGES})
    assert status == 502 and json.loads(body)["error"]["code"] == "upstream_error"


def test_a_stream_cut_short_ends_with_the_error_event(adapters):
    gw, backend = adapters
    backend.plan.die_after = 2
    status, headers, body = gw.post_json("/v1/chat/completions",
                                         {"model": "m_sql", "messages": MESSAGES,
                                          "stream": True})
    events = [e for e in body.split(b"\n\n") if e]
    assert [json.loads(e[6:])["model"] for e in events[:2]] == ["m_sql", "m_sql"]
    assert b"upstream_closed" in events[2]


# -- byte for byte, with a model server of fixed answers -------------------------------------

# The engine's JSON as it comes (the name also inside a string, where it must stay as it is).
FIXED_JSON = (b'{"id":"x","object":"chat.completion","model": "sql","choices":[{"index":0,'
              b'"message":{"role":"assistant","content":"{\\"model\\": \\"sql\\"}"},'
              b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,'
              b'"total_tokens":2}}')
# A stream written in pieces cut inside the occurrences.
FIXED_SSE = [b'data: {"id":"x","object":"chat.completion.chunk","mod',
             b'el":"sq', b'l","choices":[{"index":0,"delta":{"role":"assistant","content":"a"},'
             b'"finish_reason":null}]}\n\ndata: {"id":"x","object":"chat.completion.chunk",',
             b'"model":"sql"', b',"choices":[{"index":0,"delta":{"content":"b"},'
             b'"finish_reason":"stop"}]}\n\n', b'data: [DONE]\n\n']


class Fixed:
    """A model server that answers every request with FIXED_JSON or, streaming, FIXED_SSE;
    gzip-encoded when ``gzip`` is set, whatever the request accepts."""

    def __init__(self) -> None:
        self.gzip = False
        self.accept: list[str | None] = []
        self.runner: web.AppRunner | None = None
        self.address = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0)
        await site.start()
        self.address = f"{HOST}:{self.runner.addresses[0][1]}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.accept.append(request.headers.get("accept-encoding"))
        payload = await request.json()
        if not payload.get("stream"):
            body = gzip.compress(FIXED_JSON) if self.gzip else FIXED_JSON
            headers = {"content-type": "application/json", "etag": '"abc"'}
            if self.gzip:
                headers["content-encoding"] = "gzip"
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for piece in FIXED_SSE:
            await response.write(piece)
            await asyncio.sleep(0.01)  # each piece its own read at the gateway
        await response.write_eof()
        return response


@pytest.fixture
def fixed(gw):
    server = Fixed()
    gw.run(server.start())
    gw.add_model("m", adapters=["sql"])
    gw.set_endpoints("m", [Endpoint("f", server.address, frozenset({"sql"}))])
    yield gw, server
    gw.run(server.runner.cleanup())


def test_non_adapter_answers_are_byte_identical(fixed):
    gw, server = fixed
    status, headers, body = gw.post_json("/v1/chat/completions",
                                         {"model": "m", "messages": MESSAGES})
    assert status == 200 and body == FIXED_JSON
    assert headers["content-length"] == str(len(FIXED_JSON)) and headers["etag"] == '"abc"'
    status, headers, body = gw.post_json("/v1/chat/completions",
                                         {"model": "m", "messages": MESSAGES, "stream": True})
    assert status == 200 and body == b"".join(FIXED_SSE)


def test_adapter_answers_differ_only_in_the_name(fixed):
    gw, server = fixed
    status, headers, body = gw.post_json("/v1/chat/completions",
                                         {"model": "m_sql", "messages": MESSAGES})
    assert body == FIXED_JSON.replace(b'"model": "sql",', b'"model": "m_sql",', 1)
    assert headers["content-length"] == str(len(body))
    assert "etag" not in headers  # it named the engine's bytes
    assert json.loads(json.loads(body)["choices"][0]["message"]["content"]) == {"model": "sql"}
    status, headers, body = gw.post_json("/v1/chat/completions",
                                         {"model": "m_sql", "messages": MESSAGES,
                                          "stream": True})
    assert body == b"".join(FIXED_SSE).replace(b'"model":"sql"', b'"model":"m_sql"')
    assert body.count(b'"model":"m_sql"') == 2
    client = gw.client()
    chunks = list(client.chat.completions.create(model="m_sql", messages=MESSAGES, stream=True))
    assert [c.model for c in chunks] == ["m_sql", "m_sql"]
    assert "".join(c.choices[0].delta.content for c in chunks) == "ab"


def test_a_compressed_answer_the_engine_sends_anyway_passes_as_it_came(fixed):
    gw, server = fixed
    server.gzip = True
    client = gw.client()
    chat = client.chat.completions.create(model="m_sql", messages=MESSAGES)
    assert chat.model == "sql"  # cannot be renamed without decompressing: left alone
    assert server.accept[-1] == "identity"
