"""What makes API keys cheap per request, and what it must not change.

* The ``x-ratelimit-*`` headers reach the client as lines kvgate's server writes into the
  response head as they are (``lb.admission.HEAD_LINES``), not through uvicorn's checks of each
  header: the head on the wire must be byte for byte the one uvicorn writes from the same
  headers (which a server without ``HEAD_LINES`` still does), for a JSON answer, a stream
  (chunked), a client that asks to close, and a model server's error.
* A secret that matched a key is remembered (``KeyStore``): a reload forgets it (revocation
  takes effect), an expiry still holds, and secrets that match nothing are never remembered, so
  a flood of bad keys cannot grow the cache, and each still gets its 401.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path
from typing import Any

import openai
import pytest

import lb.server
from lb.errors import GatewayError
from lb.keys import KeyExpired, KeysFile, KeyStore, read_keys
from tests.test_gateway_api_keys import chat, client, wait_until, write_keys

HOST = "127.0.0.1"
LIMITS = {"requestsPerMinute": 60, "tokensPerMinute": 600000}


def _plain_protocol(config: Any) -> type:
    """kvgate's protocol without ``HEAD_LINES``: the rate-limit headers go through uvicorn's
    own path, as they did before the fast path (and do under any other ASGI server)."""
    return type("_Protocol", (lb.server._Protocol,),
                {"max_head": config.limits.max_header_bytes, "head_lines": False})


def _head(port: int, request: bytes) -> bytes:
    """The response head the gateway writes for ``request`` (raw bytes, up to the blank line)."""
    with socket.create_connection((HOST, port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before the head ended: {data!r}"
            data += chunk
    return data[:data.index(b"\r\n\r\n") + 4]


def _request(secret: str, body: bytes, close: bool = False, plan: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + secret.encode() + b"\r\n"
            + (b"connection: close\r\n" if close else b"")
            + (b"x-test-plan: " + plan + b"\r\n" if plan else b"")
            + b"content-length: %d\r\n\r\n" % len(body) + body)


JSON = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}'
STREAM = JSON[:-1] + b', "stream": true}'
CASES = {"json": (JSON, False, b""), "stream": (STREAM, False, b""),
         "close": (JSON, True, b""), "error": (JSON, False, b'{"status": 400}')}


@pytest.fixture
def twin_gateways(make_gateway, tmp_path, monkeypatch):
    """Two gateways with the same keys, one backend each: the first hands the rate-limit
    headers over as lines, the second (its server built without ``HEAD_LINES``) does not.
    Each key is fresh in each gateway's own limit table, so the same request gets the same
    remaining counts and reset times from both."""
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, **{name: {"limits": LIMITS} for name in CASES},
                         rpm_only={"limits": {"requestsPerMinute": 60}}, unlimited={})
    gateways = []
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(lb.server, "protocol_for", _plain_protocol)
        gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path)}})
        gw.model_with("chat", [gw.backend("b")])
        gateways.append(gw)
    return gateways, secrets


@pytest.mark.parametrize("case", list(CASES))
def test_rate_limit_headers_on_the_wire_are_unchanged(twin_gateways, case):
    (fast, plain), secrets = twin_gateways
    body, close, plan = CASES[case]
    request = _request(secrets[case], body, close, plan)
    head = _head(fast.port, request)
    assert head == _head(plain.port, request)
    if case == "error":  # a model server's refusal never carried them
        assert head.startswith(b"HTTP/1.1 400 ") and b"x-ratelimit" not in head
        return
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert (b"x-ratelimit-limit-requests: 60" in lines
            and b"x-ratelimit-remaining-requests: 59" in lines
            and b"x-ratelimit-reset-requests: 1s" in lines
            and b"x-ratelimit-limit-tokens: 600000" in lines)
    if case == "stream":  # uvicorn's framing stays last, after the headers handed over
        assert lines[-3] == b"transfer-encoding: chunked"
    if case == "close":
        assert lines[-3] == b"connection: close"


@pytest.mark.parametrize("key", ["rpm_only", "unlimited"])
def test_keys_with_fewer_limits_send_fewer_headers(twin_gateways, key):
    (fast, plain), secrets = twin_gateways
    request = _request(secrets[key], JSON)
    head = _head(fast.port, request)
    assert head == _head(plain.port, request)
    assert (b"x-ratelimit-limit-requests: 60" in head) == (key == "rpm_only")
    assert b"x-ratelimit-limit-tokens" not in head


def test_the_sdk_reads_the_headers_handed_over(twin_gateways):
    (fast, _), secrets = twin_gateways
    c = client(fast, secrets["json"])
    remaining = [chat(c).headers["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["59", "58", "57"]
    stream = c.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert stream.headers["x-ratelimit-remaining-requests"] == "56"
    assert len(list(stream.parse())) > 0


# -- the cache of secrets ------------------------------------------------------------------------


def _store(path: Path) -> KeyStore:
    from lb.keys import ApiKeysConfig
    from lb.limits import LimitTable

    return KeyStore(ApiKeysConfig(enabled=True, file=str(path)), LimitTable(capacity=64))


def _bearer(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + secret.encode())]


def test_a_reload_forgets_remembered_secrets(tmp_path):
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, a={}, b={})
    store = _store(path)
    for _ in range(2):  # the second time from the cache
        assert store.authenticate(_bearer(secrets["a"])).name == "a"
    assert store.cached_keys == 1
    kept = KeysFile(tuple(key for key in read_keys(path).keys if key.name == "b"))
    store.load(kept)  # a is revoked
    assert store.cached_keys == 0
    with pytest.raises(GatewayError) as refused:
        store.authenticate(_bearer(secrets["a"]))
    assert refused.value.status == 401
    assert store.authenticate(_bearer(secrets["b"])).name == "b"


def test_bad_secrets_are_never_remembered(keyed_gateway):
    gw, secrets = keyed_gateway
    store = gw.gateway.admission.store
    assert chat(client(gw, secrets["a"])).http_response.status_code == 200
    for i in range(200):  # each a 401, and the cache keeps only the one good key
        with pytest.raises(openai.AuthenticationError):
            chat(client(gw, f"sk-kvg-flood-{i}"))
    assert store.cached_keys == 1
    assert chat(client(gw, secrets["a"])).http_response.status_code == 200


def test_the_cache_is_capped(tmp_path, monkeypatch):
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, **{f"k{i}": {} for i in range(5)})
    monkeypatch.setattr(KeyStore, "CACHE_SIZE", 2)
    store = _store(path)
    for _ in range(3):
        for name, secret in secrets.items():
            assert store.authenticate(_bearer(secret)).name == name
            assert store.cached_keys <= 2


def test_a_remembered_key_still_expires(tmp_path):
    path = tmp_path / "keys.yaml"
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
    secrets = write_keys(path, soon={"expiresAt": soon.isoformat()})
    store = _store(path)
    assert store.authenticate(_bearer(secrets["soon"])).name == "soon"
    assert store.cached_keys == 1

    def expired() -> bool:
        try:
            store.authenticate(_bearer(secrets["soon"]))
        except KeyExpired:
            return True
        return False

    wait_until(expired)


def test_revoking_a_remembered_key_over_http(keyed_gateway):
    gw, secrets = keyed_gateway
    path = Path(gw.gateway.admission.store.config.file)
    c = client(gw, secrets["a"])
    for _ in range(2):
        assert chat(c).http_response.status_code == 200
    write_keys(path, other={})

    def revoked() -> bool:
        try:
            chat(c)
        except openai.AuthenticationError:
            return True
        return False

    wait_until(revoked)


@pytest.fixture
def keyed_gateway(make_gateway, tmp_path):
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, a={"limits": LIMITS})
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path), "reloadSeconds": 0.1}})
    gw.model_with("chat", [gw.backend("b")])
    return gw, secrets
