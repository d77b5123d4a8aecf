"""The official OpenAI SDK, sync and async, against the gateway over real HTTP.

Each test starts a gateway and OpenAI-compatible test backends (tests/gateway_harness.py) and
uses ``openai.OpenAI`` / ``openai.AsyncOpenAI`` exactly as an application would, under both
``/v1`` and KubeAI's ``/openai/v1``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json

import openai
import pytest

PREFIXES = ["/v1", "/openai/v1"]
AUDIO = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n" + b"\x00\xff" * 100  # binary


@pytest.fixture
def zoo(gw):
    """A text model with two adapters, an embedding model and a speech model."""
    b1, b2 = gw.backend("b1"), gw.backend("b2")
    gw.add_model("chat", adapters=["lora1", "lora2"], labels={"tenant": "a", "tier": "gold"})
    gw.set_endpoints("chat", [b1.endpoint(), b2.endpoint("lora1")])
    emb = gw.backend("emb")
    gw.model_with("emb", [emb], engine="Infinity", features=["TextEmbedding"],
                  labels={"tenant": "b"})
    whisper = gw.backend("whisper")
    gw.model_with("whisper", [whisper], engine="FasterWhisper", features=["SpeechToText"],
                  labels={"tenant": "a"})
    return gw, b1, b2, emb, whisper


# -- sync SDK ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
def test_chat_completion(zoo, prefix):
    gw, b1, b2, *_ = zoo
    client = gw.client(prefix)
    response = client.chat.completions.create(
        model="chat", messages=[{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hi"}])
    assert response.object == "chat.completion"
    served = response.system_fingerprint
    assert response.choices[0].message.content == f"hello from {served}"
    backend = {"b1": b1, "b2": b2}[served]
    seen = backend.last
    assert seen.path == "/v1/chat/completions"  # /openai/v1 maps onto the server's /v1
    assert seen.json["model"] == "chat"
    assert seen.json["messages"][1] == {"role": "user", "content": "hi"}
    assert seen.headers["Authorization"] == "Bearer test-key"
    assert "X-Label-Selector" not in seen.headers


@pytest.mark.parametrize("prefix", PREFIXES)
def test_chat_stream(zoo, prefix):
    gw, b1, b2, *_ = zoo
    client = gw.client(prefix)
    stream = client.chat.completions.create(
        model="chat", stream=True, messages=[{"role": "user", "content": "count"}])
    chunks = list(stream)
    assert [c.object for c in chunks] == ["chat.completion.chunk"] * 3
    assert "".join(c.choices[0].delta.content for c in chunks) == "tok0 tok1 tok2 "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert b1.total_calls + b2.total_calls == 1


@pytest.mark.parametrize("prefix", PREFIXES)
def test_completions(zoo, prefix):
    gw, b1, b2, *_ = zoo
    client = gw.client(prefix)
    response = client.completions.create(model="chat", prompt="Once upon a time")
    assert response.object == "text_completion"
    assert response.choices[0].text.startswith("hello from b")
    stream = client.completions.create(model="chat", prompt=["Once", "Twice"], stream=True,
                                       max_tokens=5)
    assert "".join(c.choices[0].text for c in stream) == "tok0 tok1 tok2 "
    bodies = [s.json for b in (b1, b2) for s in b.seen]
    assert sorted(b["prompt"] if isinstance(b["prompt"], str) else "list" for b in bodies) == [
        "Once upon a time", "list"]
    assert all(s.path == "/v1/completions" for b in (b1, b2) for s in b.seen)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_embeddings(zoo, prefix):
    gw, *_, emb, _ = zoo
    client = gw.client(prefix)
    # The SDK asks for base64 by default and decodes it itself.
    response = client.embeddings.create(model="emb", input=["a", "bbb"])
    assert [d.embedding for d in response.data] == [[1.0, 0.0, 0.5], [3.0, 1.0, 0.5]]
    assert emb.last.json["encoding_format"] == "base64"
    response = client.embeddings.create(model="emb", input="abcd", encoding_format="float")
    assert response.data[0].embedding == [4.0, 0.0, 0.5]
    assert emb.last.path == "/v1/embeddings"


@pytest.mark.parametrize("prefix", PREFIXES)
def test_audio_transcription_multipart(zoo, prefix):
    gw, *_, whisper = zoo
    client = gw.client(prefix)
    result = client.audio.transcriptions.create(model="whisper", file=("clip.wav", AUDIO,
                                                                       "audio/wav"),
                                                language="en", temperature=0.2)
    echoed = json.loads(result.text)
    assert echoed["backend"] == "whisper"
    fields = echoed["fields"]
    assert "model" not in fields  # the gateway removed it from the forwarded form
    assert fields["language"] == "en"
    assert fields["file"] == {"filename": "clip.wav", "size": len(AUDIO),
                              "sha256": hashlib.sha256(AUDIO).hexdigest()}
    seen = whisper.last
    assert seen.path == "/v1/audio/transcriptions"
    assert seen.form["file"][1] == AUDIO  # byte for byte
    assert seen.headers["Content-Type"].startswith("multipart/form-data; boundary=")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_models_list(zoo, prefix):
    gw, *_ = zoo
    client = gw.client(prefix)
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["chat", "chat_lora1", "chat_lora2"]  # TextGeneration by default
    models = {m.id: m for m in client.models.list()}
    assert models["chat_lora1"].model_extra["parent"] == "chat"
    assert models["chat"].owned_by == "kvgate"
    selected = client.models.list(extra_headers={"X-Label-Selector": "tenant=b"})
    assert [m.id for m in selected] == []
    selected = client.models.list(extra_headers={"X-Label-Selector": "tier in (gold,silver)"})
    assert sorted(m.id for m in selected) == ["chat", "chat_lora1", "chat_lora2"]


def test_models_feature_filter_raw(zoo):
    gw, *_ = zoo

    def ids(path, headers=()):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.putrequest("GET", path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        assert response.status == 200
        assert body["object"] == "list"
        return sorted(m["id"] for m in body["data"])

    assert ids("/v1/models?feature=TextEmbedding") == ["emb"]
    assert ids("/openai/v1/models?feature=SpeechToText") == ["whisper"]
    assert ids("/v1/models?feature=TextEmbedding&feature=SpeechToText") == ["emb", "whisper"]
    assert ids("/v1/models?feature=Reranking") == []
    every = "/v1/models?feature=TextGeneration&feature=TextEmbedding&feature=SpeechToText"
    assert ids(every) == ["chat", "chat_lora1", "chat_lora2", "emb", "whisper"]
    # Several X-Label-Selector headers are ANDed.
    assert ids(every, [("X-Label-Selector", "tenant=a")]) == [
        "chat", "chat_lora1", "chat_lora2", "whisper"]
    assert ids(every, [("X-Label-Selector", "tenant=a"), ("X-Label-Selector", "tier")]) == [
        "chat", "chat_lora1", "chat_lora2"]
    assert ids(every, [("X-Label-Selector", "tenant=a"), ("X-Label-Selector", "!tier")]) == [
        "whisper"]
    status, _, body = gw.http("GET", "/v1/models", headers={"X-Label-Selector": "a in b"})
    assert status == 400 and "X-Label-Selector" in json.loads(body)["error"]["message"]


def test_label_selector_applies_to_requests(zoo):
    gw, b1, b2, *_ = zoo
    client = gw.client()
    messages = [{"role": "user", "content": "hi"}]
    ok = client.chat.completions.create(model="chat", messages=messages,
                                        extra_headers={"X-Label-Selector": "tenant=a"})
    assert ok.choices[0].message.content.startswith("hello from")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="chat", messages=messages,
                                       extra_headers={"X-Label-Selector": "tenant=b"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=messages,
                                       extra_headers={"X-Label-Selector": "tenant in"})
    assert b1.total_calls + b2.total_calls == 1


# -- adapters -----------------------------------------------------------------------------------


def test_adapter_requests_go_only_to_replicas_with_the_adapter(zoo):
    gw, b1, b2, *_ = zoo
    client = gw.client()
    for i in range(12):
        response = client.chat.completions.create(
            model="chat_lora1", messages=[{"role": "user", "content": f"question {i}"}])
        assert response.system_fingerprint == "b2"
        assert response.model == "chat_lora1"  # the name asked for, though the server saw "lora1"
    assert b1.total_calls == 0
    assert b2.total_calls == 12
    assert {s.json["model"] for s in b2.seen} == {"lora1"}
    # Everything else in the body is forwarded unchanged.
    assert b2.last.json["messages"] == [{"role": "user", "content": "question 11"}]
    # The base model may use both replicas.
    for i in range(8):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert b1.total_calls > 0
    assert {s.json["model"] for s in b1.seen} == {"chat"}


# -- SDK exceptions --------------------------------------------------------------------------------


def _assert_openai_error(exc: openai.APIStatusError, status: int, code: str | None = None):
    assert exc.status_code == status
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    assert exc.response.headers["content-type"] == "application/json"


def test_bad_request_errors(zoo):
    gw, b1, b2, emb, _ = zoo
    client = gw.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=[])
    _assert_openai_error(info.value, 400, "invalid_request")
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": 1}])
    assert info.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"stream": "yes"})
    assert info.value.param == "stream"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="emb", input="x", extra_body={"input": {"not": "ok"}})
    assert info.value.param == "input"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="", prompt="x")
    assert info.value.param == "model"
    assert b1.total_calls + b2.total_calls + emb.total_calls == 0


def test_not_found_errors(zoo):
    gw, b1, b2, *_ = zoo
    client = gw.client()
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=messages)
    _assert_openai_error(info.value, 404, "model_not_found")
    assert "nope" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="chat_nope", messages=messages)
    _assert_openai_error(info.value, 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="emb_lora1", input="x")  # emb has no adapters
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisperx", file=("a.wav", b"abc"))
    assert b1.total_calls + b2.total_calls == 0


def test_rate_limit_error_when_queue_full(make_gateway):
    gw = make_gateway({"queue": {"maxQueuedPerModel": 1, "retryAfterSeconds": 7}})
    backend = gw.backend("late")
    gw.add_model("cold")
    client = gw.client()
    messages = [{"role": "user", "content": "hi"}]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(client.chat.completions.create, model="cold", messages=messages)
        gw.wait_for(lambda: gw.balancer.waiting("cold") == 1, what="one waiter")
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="cold", messages=messages)
        _assert_openai_error(info.value, 429, "queue_full")
        assert info.value.response.headers["retry-after"] == "7"
        status, headers, body = gw.post_json("/v1/chat/completions",
                                             {"model": "cold", "messages": messages})
        assert status == 429 and headers["retry-after"] == "7"
        assert json.loads(body)["error"]["type"] == "rate_limit_exceeded"
        gw.set_endpoints("cold", [backend])
        assert waiter.result(10).system_fingerprint == "late"
    assert backend.total_calls == 1
    assert gw.metric("kvgate_queue_rejected_total", model="cold", priority="default", reason="full") == 2
    gw.settle()


# -- async SDK ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_async_sdk(zoo, prefix):
    gw, b1, b2, emb, whisper = zoo
    async with gw.async_client(prefix) as client:
        response = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}])
        assert response.choices[0].message.content.startswith("hello from b")
        stream = await client.chat.completions.create(
            model="chat_lora1", stream=True, messages=[{"role": "user", "content": "hi"}])
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content for c in chunks) == "tok0 tok1 tok2 "
        assert {c.model for c in chunks} == {"chat_lora1"}
        completion = await client.completions.create(model="chat", prompt="p", stream=True)
        assert len([c async for c in completion]) == 3
        embedded = await client.embeddings.create(model="emb", input=["xy"])
        assert embedded.data[0].embedding == [2.0, 0.0, 0.5]
        transcript = await client.audio.transcriptions.create(
            model="whisper", file=("clip.wav", AUDIO, "audio/wav"))
        fields = json.loads(transcript.text)["fields"]
        assert "model" not in fields and fields["file"]["size"] == len(AUDIO)
        ids = sorted([m.id async for m in client.models.list()])
        assert ids == ["chat", "chat_lora1", "chat_lora2"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="chat_lora9",
                                                 messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model="emb", input="x", extra_body={"input": 5})
    assert b2.seen[-1].json["model"] in ("chat", "lora1")
    await gw.asettle()


def test_header_hygiene(gw):
    """End-to-end headers pass, hop-by-hop ones and the gateway's own do not; the model
    server's response headers come back."""
    backend = gw.backend("b")
    gw.model_with("m", [backend], labels={"tenant": "a"})
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    conn.request("POST", "/v1/chat/completions", body=body, headers={
        "Content-Type": "application/json", "Authorization": "Bearer secret",
        "X-Request-Id": "req-42", "OpenAI-Organization": "org", "X-Label-Selector": "tenant=a",
        "Keep-Alive": "timeout=5", "Proxy-Authorization": "Basic abc", "TE": "trailers",
        "Connection": "keep-alive", "Host": "gateway.example"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    assert response.status == 200 and data["object"] == "chat.completion"
    assert response.getheader("x-backend") == "b"
    assert response.getheader("content-type") == "application/json"
    seen = {k.lower(): v for k, v in backend.last.headers.items()}
    assert seen["authorization"] == "Bearer secret"
    assert seen["x-request-id"] == "req-42"
    assert seen["openai-organization"] == "org"
    assert seen["content-type"] == "application/json"
    assert seen["content-length"] == str(len(body))
    assert seen["host"] == backend.address
    for hop in ("x-label-selector", "keep-alive", "proxy-authorization", "te"):
        assert hop not in seen, hop


def test_method_not_allowed_names_post(gw):
    for path in ("/v1/chat/completions", "/openai/v1/embeddings", "/v1/audio/transcriptions"):
        status, headers, body = gw.http("GET", path)
        assert status == 405
        assert headers["allow"] == "POST"
        assert json.loads(body)["error"]["code"] == "method_not_allowed"


def test_large_request_and_response_bodies_pass_intact(zoo):
    gw, *_, emb, _ = zoo
    client = gw.client()
    inputs = [f"sentence number {i} " * (i % 97 + 1) for i in range(2000)]  # ~2 MB
    response = client.embeddings.create(model="emb", input=inputs, encoding_format="float")
    assert len(response.data) == 2000
    assert [d.embedding[0] for d in response.data] == [float(len(s)) for s in inputs]
    assert emb.last.json["input"] == inputs
    gw.settle()
