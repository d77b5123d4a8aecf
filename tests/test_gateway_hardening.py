"""Hardening: what a client sees when the request, or the replica's answer, is not the happy
path. Every error is OpenAI-shaped, whoever produced it; the SDK raises the class that matches
the status. Real HTTP throughout (tests/gateway_harness.py)."""

from __future__ import annotations

import http.client
import json

import openai
import pytest

MESSAGES = [{"role": "user", "content": "hi"}]


def openai_error(exc: openai.APIStatusError, status: int) -> dict:
    """The error object of an SDK exception, checked to be exactly OpenAI's shape."""
    assert exc.status_code == status
    assert exc.response.headers["content-type"] == "application/json"
    body = exc.response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and body["error"]["type"]
    return body["error"]


@pytest.fixture
def zoo(gw):
    """One model per feature, each on its own backend."""
    backends = {name: gw.backend(name) for name in ("text", "emb", "whisper", "rank")}
    gw.model_with("text", [backends["text"].endpoint("lora")], adapters=["lora"])
    gw.model_with("emb", [backends["emb"]], engine="Infinity", features=["TextEmbedding"])
    gw.model_with("whisper", [backends["whisper"]], engine="FasterWhisper",
                  features=["SpeechToText"])
    gw.model_with("rank", [backends["rank"]], engine="Infinity", features=["Reranking"])
    return gw, backends


# -- `model_`: an empty adapter name --------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_empty_adapter_is_unknown(zoo, prefix):
    gw, backends = zoo
    client = gw.client(prefix)
    for name in ("text_", "text__", "text_lora_"):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=name, messages=MESSAGES)
        error = openai_error(info.value, 404)
        assert error["code"] == "model_not_found" and name in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper_", file=("a.wav", b"abc"))
    assert sum(b.total_calls for b in backends.values()) == 0
    # The adapter and the base model themselves still work.
    assert client.chat.completions.create(model="text_lora", messages=MESSAGES).choices
    assert backends["text"].last.json["model"] == "lora"
    assert client.chat.completions.create(model="text", messages=MESSAGES).choices
    assert backends["text"].last.json["model"] == "text"


# -- features: a route the model does not serve ----------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_routes_the_model_does_not_serve_get_404(zoo, prefix):
    gw, backends = zoo
    client = gw.client(prefix)
    calls = {
        "/embeddings": lambda m: client.embeddings.create(model=m, input="x"),
        "/chat/completions": lambda m: client.chat.completions.create(model=m,
                                                                      messages=MESSAGES),
        "/completions": lambda m: client.completions.create(model=m, prompt="x"),
        "/audio/transcriptions": lambda m: client.audio.transcriptions.create(
            model=m, file=("a.wav", b"abc")),
        "/rerank": lambda m: client.post("/rerank", cast_to=object,
                                         body={"model": m, "query": "q", "documents": ["a"]}),
    }
    serves = {"text": {"/chat/completions", "/completions"}, "emb": {"/embeddings"},
              "whisper": {"/audio/transcriptions"}, "rank": {"/rerank"}}
    needs = {"/chat/completions": "TextGeneration", "/completions": "TextGeneration",
             "/embeddings": "TextEmbedding", "/audio/transcriptions": "SpeechToText",
             "/rerank": "Reranking"}
    for model, routes in serves.items():
        for route, call in calls.items():
            before = backends[model].total_calls
            if route in routes:
                call(model)
                assert backends[model].total_calls == before + 1
                continue
            with pytest.raises(openai.NotFoundError) as info:
                call(model)
            error = openai_error(info.value, 404)
            assert error["code"] == "model_does_not_serve_route"
            assert error["param"] == "model"
            message = error["message"]
            assert f"`{model}`" in message and prefix + route in message, message
            assert needs[route] in message, message
            assert backends[model].total_calls == before
    # An adapter inherits its model's features.
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text_lora", input="x")
    scraped = gw.scrape()
    assert gw.metric("kvgate_requests_total", scraped, model="text", kind="embeddings",
                     code="404") == 2
    gw.settle()


# -- Content-Type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x", "application/jsonx",
                                   "application/octet-stream", "json"])
def test_json_routes_refuse_other_content_types(zoo, ctype):
    gw, backends = zoo
    client = gw.client()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="text", messages=MESSAGES,
                                       extra_headers={"Content-Type": ctype})
    error = openai_error(info.value, 415)
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"]
    with pytest.raises(openai.APIStatusError) as info:
        client.embeddings.create(model="emb", input="x", extra_headers={"Content-Type": ctype})
    openai_error(info.value, 415)
    assert sum(b.total_calls for b in backends.values()) == 0
    gw.settle()


@pytest.mark.parametrize("ctype", [None, "application/json", "application/json; charset=utf-8",
                                   "Application/JSON;charset=UTF-8", "application/json ; x=y"])
def test_json_routes_take_json_with_or_without_a_content_type(zoo, ctype):
    """A charset or other parameter is fine; no Content-Type at all is read as JSON, as OpenAI's
    API does (curl -d without -H works there)."""
    gw, backends = zoo
    body = json.dumps({"model": "text", "messages": MESSAGES}).encode()
    if ctype:
        status, _, data = gw.http("POST", "/v1/chat/completions", body, {"content-type": ctype})
    else:  # urllib would add a form type to a body without one: a bare request
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.putrequest("POST", "/v1/chat/completions", skip_accept_encoding=True)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        status, data = response.status, response.read()
        conn.close()
    assert status == 200, data
    assert json.loads(data)["object"] == "chat.completion"
    seen = backends["text"].last
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.json["messages"] == MESSAGES


def test_audio_takes_multipart_only(zoo):
    gw, backends = zoo
    client = gw.client()
    # The SDK's own multipart request works ...
    assert client.audio.transcriptions.create(model="whisper", file=("a.wav", b"abc")).text
    # ... JSON, form-urlencoded or nothing is refused before the body is read.
    for headers, body in [({"content-type": "application/json"}, b'{"model": "whisper"}'),
                          ({"content-type": "application/x-www-form-urlencoded"}, b"model=x"),
                          ({"content-type": "text/plain"}, b"whisper")]:
        status, response_headers, data = gw.http("POST", "/v1/audio/transcriptions", body,
                                                  headers)
        assert status == 415, data
        assert response_headers["content-type"] == "application/json"
        assert json.loads(data)["error"]["code"] == "unsupported_media_type"
    assert backends["whisper"].total_calls == 1
