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
    # Refused on its head alone: the answer does not wait for a body.
    import socket
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 415


# -- a replica's own error shapes ----------------------------------------------------------------

VLLM_OLD = {"object": "error", "message": "This model's maximum context length is 4096 tokens.",
            "type": "BadRequestError", "param": None, "code": 400}
VLLM_NEW = {"error": {"message": "The model `x` does not exist.", "type": "NotFoundError",
                      "param": "model", "code": 404}}
NGINX = ("<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 "
         "Bad Gateway</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>")
# (status, body, content type, gzip) -> (SDK exception, message, type, param, code)
UPSTREAM_ERRORS = [
    ((400, json.dumps(VLLM_OLD), "application/json", False),
     (openai.BadRequestError, VLLM_OLD["message"], "BadRequestError", None, "400")),
    ((404, json.dumps(VLLM_NEW), "application/json", False),
     (openai.NotFoundError, "The model `x` does not exist.", "NotFoundError", "model", "404")),
    ((404, "404: Not Found", "text/plain; charset=utf-8", False),
     (openai.NotFoundError, "404: Not Found", "invalid_request_error", None, None)),
    ((502, NGINX, "text/html", False),
     (openai.InternalServerError, "502 Bad Gateway", "server_error", None, None)),
    ((500, "<html><body><h1>Internal error</h1><p>a &amp; b</p></body></html>", "text/html",
      False), (openai.InternalServerError, "Internal error a & b", "server_error", None, None)),
    ((422, json.dumps({"detail": [{"loc": ["body", "messages"], "msg": "Field required",
                                   "type": "missing"}]}), "application/json", False),
     (openai.UnprocessableEntityError, "body.messages: Field required", "invalid_request_error",
      None, None)),
    ((404, json.dumps({"detail": "Not Found"}), "application/json", False),
     (openai.NotFoundError, "Not Found", "invalid_request_error", None, None)),
    ((429, json.dumps({"error": "queue is full"}), "application/json", False),
     (openai.RateLimitError, "queue is full", "rate_limit_exceeded", None, None)),
    ((503, "", "text/plain", False),
     (openai.InternalServerError, "The model server answered 503 Service Unavailable with no "
      "message.", "service_unavailable", None, None)),
    ((400, json.dumps(VLLM_OLD), "application/json", True),
     (openai.BadRequestError, VLLM_OLD["message"], "BadRequestError", None, "400")),
    ((401, '{"error": {"message": "bad key", "type": "auth", "code": "invalid_api_key"}}',
      "application/json", False),
     (openai.AuthenticationError, "bad key", "auth", None, "invalid_api_key")),
    ((400, '{"message": "cut', "application/json", False),
     (openai.BadRequestError, '{"message": "cut', "invalid_request_error", None, None)),
]


@pytest.fixture
def replica(make_gateway):
    gw = make_gateway({"retries": {"maxRetries": 0}})  # each 5xx reaches the client as sent
    backend = gw.backend("r")
    gw.model_with("text", [backend])
    return gw, backend


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sent,expected", UPSTREAM_ERRORS,
                         ids=[f"{s[0]}-{s[2].split(';')[0]}{'-gzip' if s[3] else ''}-{i}"
                              for i, (s, _) in enumerate(UPSTREAM_ERRORS)])
def test_upstream_errors_reach_the_client_in_openai_shape(replica, sent, expected, stream):
    gw, backend = replica
    status, body, ctype, gzipped = sent
    exception, message, error_type, param, code = expected
    plan = {"status": status, "error_body": body, "error_content_type": ctype,
            "error_gzip": gzipped}
    client = gw.client()
    with pytest.raises(exception) as info:
        response = client.chat.completions.create(
            model="text", messages=MESSAGES, stream=stream,
            extra_headers={"x-test-plan": json.dumps(plan), "accept-encoding": "gzip"})
        list(response) if stream else None
    error = openai_error(info.value, status)
    assert error == {"message": message, "type": error_type, "param": param, "code": code}
    assert info.value.message.endswith(message) or message in info.value.message
    assert "content-encoding" not in info.value.response.headers
    assert backend.total_calls == 1
    scraped = gw.scrape()
    assert gw.metric("kvgate_requests_total", scraped, model="text", code=str(status)) == 1
    gw.settle()


def test_a_huge_upstream_error_becomes_a_bounded_message(replica):
    gw, backend = replica
    huge = "<html><body>" + "<p>so much html</p>" * 50_000 + "</body></html>"  # ~1 MB
    big = gw.backend("big", status=500, error_body=huge, error_content_type="text/html")
    gw.model_with("big", [big])
    status, headers, data = gw.post_json("/v1/chat/completions",
                                         {"model": "big", "messages": MESSAGES})
    assert status == 500 and headers["content-type"] == "application/json"
    error = json.loads(data)["error"]
    assert error["message"].startswith("so much html so much html")
    assert len(error["message"]) <= 2000 and int(headers["content-length"]) == len(data)
    # Still serving, with a fresh upstream connection.
    assert gw.client().chat.completions.create(model="text", messages=MESSAGES).choices
    gw.settle()


def test_upstream_success_bodies_pass_untouched(replica):
    """Only non-2xx answers are rewritten: a 2xx body, whatever its shape, is relayed as is."""
    gw, backend = replica
    for status, body in [(200, '{"object": "error", "message": "not really"}'),
                         (201, "plain text, not JSON")]:
        plan = {"status": status, "error_body": body, "error_content_type": "text/plain"}
        code, headers, data = gw.post_json(
            "/v1/chat/completions", {"model": "text", "messages": MESSAGES},
            {"x-test-plan": json.dumps(plan)})
        if status == 200:  # the backend's plan sends its normal answer on 200
            assert json.loads(data)["object"] == "chat.completion"
        else:
            assert (code, data) == (201, body.encode())
            assert headers["content-type"] == "text/plain"


# -- the size of a request's head ------------------------------------------------------------------


def raw_request(port: int, head: bytes, body: bytes = b"", chunk: int = 65536,
                ) -> tuple[int, dict[str, str], bytes]:
    """Send a request byte for byte (in ``chunk``-sized writes), then read the answer."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        data = head + body
        try:
            for i in range(0, len(data), chunk):
                sock.sendall(data[i:i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early: the answer is still there to read
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            response.read()


def chat_head(extra: bytes, length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(length).encode()
            + b"\r\n" + extra + b"\r\n")


@pytest.mark.parametrize("size,chunk", [(20_000, 65536), (20_000, 1000), (4 * 1024 * 1024,
                                                                           65536)])
def test_oversized_headers_get_431(make_gateway, size, chunk):
    gw = make_gateway({"limits": {"maxHeaderBytes": 16384}})
    backend = gw.backend("b")
    gw.model_with("text", [backend])
    body = json.dumps({"model": "text", "messages": MESSAGES}).encode()
    # One huge header, or many small ones.
    for extra in (b"X-Big: " + b"a" * size + b"\r\n",
                  b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(size // 100))):
        status, headers, data = raw_request(gw.port, chat_head(extra, len(body)), body, chunk)
        assert status == 431, data
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        error = json.loads(data)["error"]
        assert error["code"] == "request_headers_too_large" and "16384" in error["message"]
    assert backend.total_calls == 0
    gw.settle()


def fill(total: int) -> dict[str, str]:
    """Headers of ``total`` value bytes, in pieces small enough for the test backend."""
    return {f"x-fill-{i}": "f" * min(4000, total - i * 4000)
            for i in range((total + 3999) // 4000)}


def test_headers_under_the_limit_pass_and_the_body_does_not_count(make_gateway):
    gw = make_gateway({"limits": {"maxHeaderBytes": 16384}})
    backend = gw.backend("b")
    gw.model_with("text", [backend])
    client = gw.client()
    # A head just under the limit, a body far over it: in one write, in pieces, and with the
    # head itself cut in small pieces.
    payload = {"model": "text", "messages": [{"role": "user", "content": "x" * 200_000}]}
    body = json.dumps(payload).encode()
    head = chat_head(b"", len(body))
    room = 16384 - len(head)
    extra = b"".join(b"X-Fill-%d: %s\r\n" % (i, b"f" * 3980) for i in range(room // 4000))
    extra += b"X-Last: " + b"l" * (room - len(extra) - 10) + b"\r\n"
    head = chat_head(extra, len(body))
    assert 16300 < len(head) <= 16384, len(head)
    for first, rest, chunk in [(head + body, b"", 1 << 20), (head + body, b"", 4096),
                               (head, body, 7)]:
        status, _, data = raw_request(gw.port, first, rest, chunk)
        assert status == 200, data
    # Keep-alive: many requests on one connection, each head counted on its own, bodies
    # large and small never counted.
    for content in ["hi", "x" * 100_000, "y" * 3000, "z" * 30_000, "hi"]:
        client.chat.completions.create(model="text",
                                       messages=[{"role": "user", "content": content}],
                                       extra_headers=fill(12000))
    assert backend.total_calls == 8
    # The SDK sees a 431 as an APIStatusError.
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="text", messages=MESSAGES,
                                       extra_headers=fill(20000))
    openai_error(info.value, 431)
    assert client.chat.completions.create(model="text", messages=MESSAGES).choices
    assert backend.total_calls == 9
    gw.settle()


def test_the_default_header_limit_is_64_kib(gw):
    backend = gw.backend("b")
    gw.model_with("text", [backend])
    client = gw.client()
    assert client.chat.completions.create(model="text", messages=MESSAGES,
                                          extra_headers=fill(60_000)).choices
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="text", messages=MESSAGES,
                                       extra_headers=fill(70_000))
    assert info.value.status_code == 431
    assert backend.total_calls == 1


# -- hostile input never gets a 500 -----------------------------------------------------------------


def deep(fields: dict, key: str, depth: int) -> bytes:
    """``fields`` as JSON with ``key`` set to arrays nested ``depth`` deep (deeper than the
    standard library's json handles)."""
    return json.dumps(fields).encode()[:-1] + b', "' + key.encode() + b'": ' \
        + b"[" * depth + b"]" * depth + b"}"


HOSTILE = [
    # (what, raw request bytes)
    ("not HTTP", b"GARBAGE\r\n\r\n"),
    ("bad content-length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: application/json\r\nContent-Length: abc\r\n\r\n{}"),
    ("negative content-length", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: -5\r\n\r\n{}"),
    ("two content-lengths", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"),
    ("bad chunk", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"),
    ("NUL in a header", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n"
     b"Content-Length: 2\r\n\r\n{}"),
]


def hostile_bodies() -> list[tuple[str, str, dict | bytes | None, dict]]:
    """(what, path, JSON body, extra headers): each well-formed HTTP, each nasty."""
    chat = {"model": "text", "messages": MESSAGES}
    return [
        ("deep payload to an adapter", "/v1/chat/completions",
         deep({**chat, "model": "text_lora"}, "x", 300), {}),
        ("too deep to re-encode", "/v1/chat/completions",
         deep({**chat, "model": "text_lora"}, "x", 1020), {}),
        ("deep tools, conversation key", "/v1/chat/completions",
         deep({**chat, "model": "conv"}, "tools", 300), {}),
        ("space-run selector", "/v1/chat/completions", chat,
         {"x-label-selector": " " * 30000 + "#"}),
        ("space-run selector, models", "/v1/models", None,
         {"x-label-selector": " " * 30000 + "!" + " " * 20000 + "#"}),
        ("latin-1 session", "/v1/chat/completions", {**chat, "model": "conv"},
         {"x-session-id": "\u00ff\u00e9" * 100}),
        ("huge max_tokens", "/v1/chat/completions",
         {**chat, "model": "conv", "max_tokens": 10**18}, {}),
        ("parts that are not objects", "/v1/chat/completions",
         {"model": "conv", "messages": [{"role": "user", "content": [1, None, "x", {"type":
                                                                                   "text"}]}]},
         {}),
    ]


def test_hostile_requests_never_get_a_500(make_gateway):
    import time
    gw = make_gateway()
    backend = gw.backend("b")
    gw.model_with("text", [backend.endpoint("lora")], adapters=["lora"])
    gw.model_with("conv", [backend], strategy="PrefixHash", prefix_from="Conversation",
                  load_unit="Tokens")
    for what, request in HOSTILE:
        status, headers, data = raw_request(gw.port, request)
        assert 400 <= status < 500, (what, status, data)
        assert headers["content-type"] == "application/json", what
        assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}, what
    for what, path, payload, headers in hostile_bodies():
        began = time.monotonic()
        if payload is None:
            status, _, data = gw.http("GET", path, headers=headers)
        else:
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            status, _, data = gw.http("POST", path, body,
                                      {"content-type": "application/json", **headers})
        assert status < 500, (what, status, data)
        assert time.monotonic() - began < 2, what  # and never holds the event loop
        if status >= 400:
            assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}
    assert backend.last.json["messages"] == [
        {"role": "user", "content": [1, None, "x", {"type": "text"}]}]
    assert gw.client().chat.completions.create(model="text", messages=MESSAGES).choices
    gw.settle()


def test_an_oversized_pipelined_head_closes_without_corrupting_the_answer_going_out(
        make_gateway):
    import socket
    import time
    gw = make_gateway({"limits": {"maxHeaderBytes": 16384}})
    backend = gw.backend("b", chunks=4, chunk_delay=0.15)
    gw.model_with("text", [backend])
    body = json.dumps({"model": "text", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(chat_head(b"", len(body)) + body)
        time.sleep(0.2)  # the stream is going out
        sock.sendall(chat_head(b"X-Big: " + b"a" * 20000 + b"\r\n", len(body)) + body)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert b" 431 " not in received and b"request_headers_too_large" not in received
    assert backend.total_calls == 1
    gw.settle()


def test_an_oversized_head_after_an_early_answer_on_the_same_connection_gets_431(make_gateway):
    """A 415 answered before its body was read leaves uvicorn's cycle looking mid-body; the
    next head on that keep-alive connection, arriving in one read, is still measured."""
    import socket
    gw = make_gateway({"limits": {"maxHeaderBytes": 16384}})
    backend = gw.backend("b")
    gw.model_with("text", [backend])
    body = json.dumps({"model": "text", "messages": MESSAGES}).encode()
    early = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
             b"Content-Type: text/plain\r\nContent-Length: " + str(len(body)).encode()
             + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        for head, status in [(early, 415), (chat_head(b"", len(body)), 200), (early, 415),
                             (chat_head(b"X-Big: " + b"a" * 24000 + b"\r\n", len(body)), 431)]:
            if status == 415:  # the answer comes before the body is sent
                sock.sendall(head)
            else:
                sock.sendall(head + body)
            response = http.client.HTTPResponse(sock)
            response.begin()
            response.read()
            assert response.status == status
            if status == 415:
                sock.sendall(body)
    assert backend.total_calls == 1
    gw.settle()
