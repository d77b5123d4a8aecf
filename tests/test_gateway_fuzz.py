"""Bad input: thousands of malformed requests over raw HTTP. Every one must get a 4xx with an
OpenAI-shaped error body, none may reach a model server, and the gateway must keep serving
with every counter back at zero."""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import socket
import string
import urllib.request
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from yarl import URL

BODY_LIMIT = 16 * 1024
MODEL = "m"
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank",
          "/openai/v1/chat/completions", "/openai/v1/completions", "/openai/v1/embeddings"]
AUDIO_ROUTES = ["/v1/audio/transcriptions", "/openai/v1/audio/transcriptions"]


@dataclass
class Case:
    what: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False
    expect: tuple[int, ...] = ()  # exact statuses allowed; empty: any 4xx


# -- the generator ------------------------------------------------------------------------------

WRONG_VALUES: list[Any] = [None, 0, 1, -1, 3.5, True, False, [], [1], ["a"], {}, {"a": 1},
                           "", " ", "\x00", [[]], [{}]]


def wrong_value(rng: random.Random, *, allow: tuple[type, ...] = ()) -> Any:
    while True:
        value = rng.choice(WRONG_VALUES + [rng.randint(-10**9, 10**9), rng.random(),
                                           "x" * rng.randint(1, 50)])
        if allow and isinstance(value, allow) and not isinstance(value, bool):
            continue
        return value


def valid_payload(route: str, rng: random.Random) -> dict[str, Any]:
    kind = route.rsplit("/", 1)[-1]
    if kind == "completions" and "chat" in route:
        return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    if kind == "completions":
        return {"model": MODEL, "prompt": "hello"}
    if kind == "embeddings":
        return {"model": MODEL, "input": "hello"}
    return {"model": MODEL, "query": "q", "documents": ["a"]}


def json_case(rng: random.Random) -> Case:
    """A JSON body for a known model with exactly the fields the gateway checks broken."""
    route = rng.choice(ROUTES)
    payload = valid_payload(route, rng)
    kind = "chat" if "chat" in route else route.rsplit("/", 1)[-1]
    choices = ["model_type", "model_missing", "model_unknown", "stream"]
    if kind == "chat":
        choices += ["messages", "message_item", "role", "content"] * 2
    elif kind == "completions":
        choices += ["prompt"] * 3
    elif kind == "embeddings":
        choices += ["input"] * 3
    what = rng.choice(choices)
    expect: tuple[int, ...] = (400,)
    if what == "model_type":
        payload["model"] = rng.choice([v for v in WRONG_VALUES if not isinstance(v, str)] + [""])
    elif what == "model_missing":
        del payload["model"]
    elif what == "model_unknown":
        payload["model"] = rng.choice([
            "nope", "m-", "M", f"{MODEL}_unknownadapter", "x" * rng.randint(100, 5000),
            "m\u00e9", "\U0001f600", "_m", f"other_{MODEL}", "m " * 3, f"{MODEL}_",
            f"{MODEL}__"])
        expect = (404,)
    elif what == "stream":
        payload["stream"] = rng.choice(["true", 1, 0, [], {}, "false", 1.0])
    elif what == "messages":
        payload["messages"] = rng.choice([None, "hi", 1, {}, [], {"role": "user"}, True])
        if payload["messages"] is None and rng.random() < 0.5:
            del payload["messages"]
    elif what == "message_item":
        payload["messages"] = [{"role": "user", "content": "ok"},
                               rng.choice(["hi", 1, None, [], True, 2.5])]
    elif what == "role":
        payload["messages"] = [{"role": wrong_value(rng, allow=(str,)), "content": "hi"}]
        if rng.random() < 0.3:
            del payload["messages"][0]["role"]
    elif what == "content":
        payload["messages"] = [{"role": "user",
                                "content": rng.choice([1, 2.5, True, False, {}, {"a": "b"}])}]
    elif what == "prompt":
        payload["prompt"] = rng.choice([None, 1, 2.5, True, {}, {"text": "x"}])
        if rng.random() < 0.3:
            del payload["prompt"]
    elif what == "input":
        payload["input"] = rng.choice([None, 1, 2.5, False, {}, {"text": "x"}])
        if rng.random() < 0.3:
            del payload["input"]
    if rng.random() < 0.2:  # noise the gateway does not read
        payload["temperature"] = rng.random()
        payload["user"] = "u" * rng.randint(0, 2000)
    body = json.dumps(payload).encode()
    ctype = rng.choice(["application/json", "text/plain", "application/json; charset=utf-8"])
    if ctype == "text/plain":
        expect = (415,)  # refused before the body is read
    return Case(f"json:{what}", "POST", route, body, {"content-type": ctype}, expect=expect)


def non_object_case(rng: random.Random) -> Case:
    value = rng.choice([[], [{"model": MODEL}], "model", 1, 2.5, None, True,
                        [MODEL, {"messages": []}], "x" * 3000])
    body = json.dumps(value).encode()
    if rng.random() < 0.15:  # nested deeper than any JSON parser's recursion limit
        depth = rng.randint(2000, 6000)
        body = b"[" * depth + b"]" * depth
    return Case("non-object", "POST", rng.choice(ROUTES), body,
                {"content-type": "application/json"}, expect=(400,))


def truncated_case(rng: random.Random) -> Case:
    route = rng.choice(ROUTES)
    body = json.dumps({**valid_payload(route, rng), "extra": "y" * rng.randint(0, 100)}).encode()
    cut = rng.randint(0, len(body) - 1)
    return Case("truncated", "POST", route, body[:cut], {"content-type": "application/json"},
                expect=(400,))


def bad_utf8_case(rng: random.Random) -> Case:
    route = rng.choice(ROUTES)
    body = json.dumps(valid_payload(route, rng)).encode()
    junk = rng.choice([b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80\x80",
                       b"\xf8\x88\x80\x80\x80", b"\xc3", bytes([rng.randint(0x80, 0xff)])])
    # Inside the model string, or inside the message / prompt text.
    anchor = rng.choice([b'"m"', b'"hi"', b'"hello"', b'"q"'])
    if anchor not in body:
        anchor = b'"m"'
    body = body.replace(anchor, anchor[:-1] + junk + b'"', 1)
    return Case("bad-utf8", "POST", route, body, {"content-type": "application/json"},
                expect=(400,))


def garbage_case(rng: random.Random) -> Case:
    size = rng.randint(0, 3000)
    body = bytes(rng.getrandbits(8) for _ in range(size))
    if rng.random() < 0.3:
        body = b"model=m&messages=hi&stream=true"
    if rng.random() < 0.2:
        body = b""
    ctype = rng.choice(["application/json", "application/x-www-form-urlencoded",
                        "text/plain", "multipart/form-data; boundary=xyz",
                        "application/octet-stream"])
    return Case("garbage", "POST", rng.choice(ROUTES), body, {"content-type": ctype},
                expect=(400,) if ctype == "application/json" else (415,))


def huge_case(rng: random.Random) -> Case:
    """Large but under the limit: huge strings in the wrong places."""
    route = rng.choice(ROUTES)
    payload = valid_payload(route, rng)
    big = "z" * rng.randint(5000, BODY_LIMIT - 500)
    if rng.random() < 0.5:
        payload["model"] = big
        expect: tuple[int, ...] = (404,)
    else:
        payload["stream"] = big
        expect = (400,)
    return Case("huge-string", "POST", route, json.dumps(payload).encode(),
                {"content-type": "application/json"}, expect=expect)


def over_limit_case(rng: random.Random) -> Case:
    route = rng.choice(ROUTES + AUDIO_ROUTES)
    size = rng.randint(BODY_LIMIT + 1, 3 * BODY_LIMIT)
    body = json.dumps({"model": MODEL, "prompt": "p" * size,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    ctype = "multipart/form-data; boundary=x" if "audio" in route else "application/json"
    return Case("over-limit", "POST", route, body, {"content-type": ctype},
                chunked=rng.random() < 0.5, expect=(413,))


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes) -> bytes:
    out = b""
    for disposition, data in parts:
        out += b"--" + boundary + b"\r\n" + disposition + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


def audio_case(rng: random.Random) -> Case:
    route = rng.choice(AUDIO_ROUTES)
    boundary = rng.choice([b"abc123", b"----WebKitFormBoundary7MA4YWxkTrZu0gW", b"x"])
    file_part = (b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 b"Content-Type: audio/wav", bytes(rng.getrandbits(8) for _ in range(64)))
    model_part = b'Content-Disposition: form-data; name="model"'
    ctype = "multipart/form-data; boundary=" + boundary.decode()
    what = rng.choice(["no-ctype", "json-ctype", "no-boundary", "garbage", "no-model",
                       "empty-model", "unknown-model", "bad-utf8-model", "truncated",
                       "no-parts", "form-urlencoded"])
    expect: tuple[int, ...] = (400,)
    headers = {"content-type": ctype}
    if what == "no-ctype":
        body, headers, expect = multipart([file_part, (model_part, b"w")], boundary), {}, (415,)
    elif what == "json-ctype":
        body = json.dumps({"model": "w", "file": "abc"}).encode()
        headers, expect = {"content-type": "application/json"}, (415,)
    elif what == "no-boundary":
        body = multipart([file_part, (model_part, b"w")], boundary)
        headers, expect = {"content-type": "multipart/form-data"}, (415,)
    elif what == "form-urlencoded":
        body = b"model=w&file=abc"
        headers, expect = {"content-type": "application/x-www-form-urlencoded"}, (415,)
    elif what == "garbage":
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2000)))
    elif what == "no-model":
        body = multipart([file_part], boundary)
    elif what == "empty-model":
        body = multipart([file_part, (model_part, b"")], boundary)
    elif what == "unknown-model":
        body = multipart([file_part, (model_part, rng.choice([b"nope", b"w_x", b"W"]))],
                         boundary)
        expect = (404,)
    elif what == "bad-utf8-model":
        body = multipart([file_part, (model_part, b"w\xff\xfe")], boundary)
    elif what == "truncated":
        full = multipart([file_part, (model_part, b"w")], boundary)
        body = full[: rng.randint(1, len(full) - 3)]
        expect = (400, 404)  # a cut after the model part can still name a model... not `w`
    else:  # no-parts
        body = b"--" + boundary + b"--\r\n"
    return Case(f"audio:{what}", "POST", route, body, headers, expect=expect)


def path_case(rng: random.Random) -> Case:
    path = rng.choice([
        "/", "/v1", "/v1/", "/v2/chat/completions", "/v1/chat", "/v1/chat/completions/",
        "/v1/chat/completions/x", "/openai/v2/completions", "/openai/chat/completions",
        "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/openai/v1/load_lora_adapter",
        "/metrics", "/health", "/v1/tokenize", "/v1/detokenize", "/v1/models/m",
        "/v1/responses/resp_1", "/v1/messages/count_tokens", "/openai/v1/tokenize",
        "/v1/audio/translations", "/v1/images/generations", "/%2e%2e/v1/models",
        "/v1/chat%2Fcompletionz", "/" + "".join(rng.choices(string.ascii_letters, k=30)),
        "/v1/" + "a/" * 50])
    method = rng.choice(["GET", "POST", "PUT", "DELETE"])
    body = json.dumps(valid_payload("/v1/chat/completions", rng)).encode() if method != "GET" \
        else None
    headers = {"content-type": "application/json"} if body else {}
    return Case("unknown-path", method, path, body, headers, expect=(404,))


def method_case(rng: random.Random) -> Case:
    if rng.random() < 0.6:
        path = rng.choice(ROUTES + AUDIO_ROUTES)
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
    else:
        path = rng.choice(["/v1/models", "/openai/v1/models", "/healthz", "/readyz"])
        method = rng.choice(["POST", "PUT", "DELETE", "PATCH"])
    body = json.dumps(valid_payload("/v1/chat/completions", rng)).encode() \
        if method in ("PUT", "PATCH", "POST") else None
    return Case("method", method, path, body,
                {"content-type": "application/json"} if body else {}, expect=(405,))


def selector_case(rng: random.Random) -> Case:
    """A valid request with a broken or non-matching X-Label-Selector."""
    route = rng.choice(ROUTES)
    body = json.dumps(valid_payload(route, rng)).encode()
    selector, expect = rng.choice([("tenant in", (400,)), ("a b c", (400,)), ("(", (400,)),
                                   ("!x in (a)", (400,)), ("tenant=nobody", (404,)),
                                   ("missing-label", (404,)), ("!team", (404,))])
    return Case("selector", "POST", route, body, {"content-type": "application/json",
                                                  "x-label-selector": selector}, expect=expect)


def feature_case(rng: random.Random) -> Case:
    """A valid request on a route model `m` (TextGeneration only) does not serve."""
    route = rng.choice([r for r in ROUTES if "embeddings" in r] + ["/v1/rerank"])
    return Case("feature", "POST", route, json.dumps(valid_payload(route, rng)).encode(),
                {"content-type": "application/json"}, expect=(404,))


def big_head_case(rng: random.Random) -> Case:
    """Headers over the default 64 KiB: one huge one or many."""
    route = rng.choice(ROUTES + AUDIO_ROUTES)
    size = rng.randint(66 * 1024, 300 * 1024)
    if rng.random() < 0.5:
        headers = {"x-big": "b" * size}
    else:
        headers = {f"x-h{i}": "h" * 1000 for i in range(size // 1000)}
    headers["content-type"] = "application/json"
    body = json.dumps(valid_payload(route, rng)).encode()
    return Case("big-head", "POST", route, body, headers, expect=(431,))


GENERATORS = [(json_case, 30), (non_object_case, 6), (truncated_case, 8), (bad_utf8_case, 8),
              (garbage_case, 8), (huge_case, 4), (over_limit_case, 6), (audio_case, 14),
              (path_case, 6), (method_case, 6), (selector_case, 4), (feature_case, 3),
              (big_head_case, 2)]


def generate(seed: int, n: int) -> list[Case]:
    rng = random.Random(seed)
    generators = [g for g, _ in GENERATORS]
    weights = [w for _, w in GENERATORS]
    cases = [rng.choices(generators, weights)[0](rng) for _ in range(n)]
    # Every generator at least a few times, whatever the seed.
    cases += [g(rng) for g in generators for _ in range(5)]
    return cases


# -- the test -----------------------------------------------------------------------------------


def assert_openai_error(case: Case, status: int, ctype: str, body: bytes) -> None:
    where = f"{case.what} {case.method} {case.path} -> {status}: {body[:200]!r}"
    assert 400 <= status < 500, where
    if case.expect:
        assert status in case.expect, where
    assert ctype == "application/json", where
    payload = json.loads(body)
    assert set(payload) == {"error"}, where
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, where
    assert isinstance(error["message"], str) and error["message"], where
    assert isinstance(error["type"], str), where
    assert "Traceback" not in error["message"], where


async def send(session: aiohttp.ClientSession, base: str, case: Case) -> tuple[int, str, bytes]:
    data: Any = case.body
    if case.chunked and case.body is not None:
        payload = case.body

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 4096):
                yield payload[i:i + 4096]

        data = chunks()
    async with session.request(case.method, URL(base + case.path, encoded=True), data=data,
                               headers=case.headers,
                               skip_auto_headers=["Content-Type"]) as response:
        return response.status, response.headers.get("content-type", ""), await response.read()


@pytest.fixture
def target(make_gateway):
    gw = make_gateway({"limits": {"maxBodyBytes": BODY_LIMIT}})
    backend = gw.backend("b")
    gw.add_model(MODEL, labels={"team": "x"}, strategy="PrefixHash")
    gw.set_endpoints(MODEL, [backend])
    whisper = gw.backend("w")
    gw.model_with("w", [whisper], engine="FasterWhisper", features=["SpeechToText"])
    return gw, backend, whisper


async def test_malformed_requests_get_openai_4xx(target):
    gw, backend, whisper = target
    cases = generate(seed=20240611, n=1200)
    assert len(cases) >= 1200
    seen_statuses: dict[int, int] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=24)) as session:
        semaphore = asyncio.Semaphore(24)

        async def one(case: Case) -> None:
            async with semaphore:
                status, ctype, body = await send(session, gw.url, case)
            assert_openai_error(case, status, ctype, body)
            seen_statuses[status] = seen_statuses.get(status, 0) + 1

        await asyncio.gather(*(one(case) for case in cases))
    assert set(seen_statuses) == {400, 404, 405, 413, 415, 431}, seen_statuses
    # Nothing malformed reached a model server.
    assert backend.total_calls == 0 and whisper.total_calls == 0
    # Still serving, and nothing is left in flight.
    async with gw.async_client() as client:
        ok = await client.chat.completions.create(model=MODEL,
                                                  messages=[{"role": "user", "content": "hi"}])
    assert ok.system_fingerprint == "b"
    counters = await gw.asettle()
    assert counters["ring[m].total"] == 0
    scraped = await asyncio.to_thread(gw.scrape)
    assert gw.metric("kubeai_inference_requests_active", scraped) == 0
    assert gw.metric("kvgate_requests_total", scraped, code="200") == 1
    assert gw.metric("kvgate_requests_total", scraped) >= 1000
    assert gw.metric("kvgate_upstream_retries_total", scraped) == 0


def test_declared_oversize_body_is_refused_before_it_is_sent(target):
    """Content-Length over the limit: 413 at once, without waiting for (or reading) the body."""
    gw, backend, _ = target
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
    assert response.status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert backend.total_calls == 0
    gw.settle()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
MESSAGE = st.fixed_dictionaries(
    {}, optional={"role": st.one_of(st.sampled_from(["user", "system", "assistant"]),
                                    JSON_VALUES),
                  "content": st.one_of(st.text(max_size=30), JSON_VALUES)})
VALID_CHAT_BODIES = st.fixed_dictionaries(
    {"model": st.just(MODEL),
     "messages": st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "system", "assistant", "tool"]),
          "content": st.one_of(st.none(), st.text(max_size=30), st.lists(st.fixed_dictionaries(
              {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}),
              max_size=2))}), min_size=1, max_size=3)},
    optional={"stream": st.booleans(), "temperature": st.floats(0, 2)})
CHAT_BODIES = VALID_CHAT_BODIES | st.fixed_dictionaries(
    {}, optional={"model": st.one_of(st.sampled_from([MODEL, "nope", f"{MODEL}_x", ""]),
                                     JSON_VALUES),
                  "messages": st.one_of(st.lists(st.one_of(MESSAGE, JSON_VALUES), max_size=3),
                                        JSON_VALUES),
                  "stream": st.one_of(st.booleans(), JSON_VALUES)})


def gateway_accepts(payload: dict[str, Any]) -> bool:
    """The contract, stated independently: what the gateway must forward."""
    messages = payload.get("messages")
    return (payload.get("model") == MODEL
            and payload.get("stream") in (None, True, False)
            and isinstance(messages, list) and len(messages) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                    and (m.get("content") is None or isinstance(m.get("content"), (str, list)))
                    for m in messages))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(payload=CHAT_BODIES)
def test_generated_chat_bodies_follow_the_contract(target, payload):
    gw, backend, _ = target
    body = json.dumps(payload).encode()
    request = urllib.request.Request(gw.url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    before = backend.total_calls
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, ctype, data = response.status, response.headers["content-type"], \
                response.read()
    except urllib.error.HTTPError as exc:
        status, ctype, data = exc.code, exc.headers["content-type"], exc.read()
        exc.close()
    event(f"status {status}")
    if gateway_accepts(payload):
        assert status == 200, (payload, data)
        assert backend.total_calls == before + 1
        assert json.loads(backend.last.body) == payload  # forwarded untouched
    else:
        assert_openai_error(Case("hypothesis", "POST", "/v1/chat/completions"), status, ctype,
                            data)
        assert backend.total_calls == before
