"""API keys with per-key limits (``apiKeys``), over real HTTP with the official OpenAI SDK.

The gateway runs in-process (tests/gateway_harness.py) in front of recording test backends and
the simulator; the keys file is written the way ``kvgate keys`` writes it. What a client sees:
401 without a valid key, 403 for a model its key may not use, 429 at the limit with OpenAI's
headers; what the model server sees: never the client's key.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lb.keys import hash_secret, new_secret

HOST = "127.0.0.1"


def write_keys(path: Path, **keys: dict[str, Any]) -> dict[str, str]:
    """A keys file with one key per name (its fields in the file's form); the secrets. Written
    beside and renamed over, as the CLI does."""
    secrets = {name: new_secret() for name in keys}
    entries = [{"name": name, "hash": hash_secret(secrets[name]), **fields}
               for name, fields in keys.items()]
    temp = path.with_name(path.name + ".new")
    temp.write_text(yaml.safe_dump({"keys": entries}))
    os.replace(temp, path)
    return secrets


def client(gw: Any, key: str, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + prefix, api_key=key, max_retries=0, timeout=30)


def chat(c: openai.OpenAI, model: str = "chat", **extra: Any) -> Any:
    return c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **extra)


def metric(gw: Any, name: str, **labels: str) -> float:
    conn = http.client.HTTPConnection(HOST, gw.metrics_port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


def metrics_text(gw: Any) -> str:
    conn = http.client.HTTPConnection(HOST, gw.metrics_port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def wait_until(check: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture
def keyed(make_gateway, tmp_path, monkeypatch):
    """A gateway with keys on, in front of a model with two adapters and a second model; the
    second model's servers get their own key from the environment."""
    monkeypatch.setenv("KVGATE_TEST_UPSTREAM_KEY", "upstream-secret")
    path = tmp_path / "keys.yaml"
    secrets = write_keys(
        path,
        all={"models": ["*"]},
        chat_only={"models": ["chat", "chat_lora1"]},
        slow={"limits": {"requestsPerMinute": 3}},
        thrifty={"limits": {"tokensPerMinute": 1000}},
    )
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path), "reloadSeconds": 0.1,
                                   "upstreamKeyEnv": {"other": "KVGATE_TEST_UPSTREAM_KEY"}}})
    chat_backend, other_backend = gw.backend("b1"), gw.backend("b2")
    gw.model_with("chat", [chat_backend.endpoint("lora1", "lora2")], adapters=["lora1", "lora2"])
    gw.model_with("other", [other_backend])
    return gw, secrets, path, chat_backend, other_backend


# -- who is calling ------------------------------------------------------------------------------


def test_missing_or_bad_key_is_401(keyed):
    gw, secrets, _, backend, _ = keyed
    with pytest.raises(openai.AuthenticationError) as bad:
        chat(client(gw, "sk-kvg-not-a-key"))
    assert bad.value.code == "invalid_api_key"
    assert "sk-kvg-not-a-key" not in str(bad.value.body)  # a key is never echoed
    # No key at all (the SDK always sends one): raw HTTP.
    conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", b'{"model":"chat","messages":[]}',
                 {"content-type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 401
    assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"]
    with pytest.raises(openai.AuthenticationError):
        client(gw, "wrong").models.list()
    assert backend.total_calls == 0
    assert metric(gw, "kvgate_key_rejections_total", key="unknown", reason="invalid_key") == 3
    # A good key passes, as Bearer (OpenAI's SDK) or x-api-key (Anthropic's header).
    assert chat(client(gw, secrets["all"])).http_response.status_code == 200
    conn.request("POST", "/v1/chat/completions",
                 b'{"model":"chat","messages":[{"role":"user","content":"hi"}]}',
                 {"content-type": "application/json", "x-api-key": secrets["all"]})
    response = conn.getresponse()
    response.read()
    assert response.status == 200
    conn.close()


def test_the_clients_key_never_reaches_the_model_server(keyed):
    gw, secrets, _, chat_backend, other_backend = keyed
    chat(client(gw, secrets["all"]))
    chat(client(gw, secrets["all"]).with_options(default_headers={"x-api-key": secrets["all"]}))
    for seen in chat_backend.seen:
        assert "Authorization" not in seen.headers and "X-Api-Key" not in seen.headers
        assert secrets["all"] not in json.dumps(seen.headers)
    # A model with an upstream key configured: its servers get that one instead.
    chat(client(gw, secrets["all"]), model="other")
    assert other_backend.last.headers["Authorization"] == "Bearer upstream-secret"
    stream = client(gw, secrets["all"]).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert len(list(stream)) == 3
    assert "Authorization" not in chat_backend.last.headers


def test_secrets_never_in_metrics(keyed):
    gw, secrets, _, _, _ = keyed
    chat(client(gw, secrets["all"]))
    text = metrics_text(gw)
    assert 'kvgate_key_requests_total{key="all"} 1.0' in text
    for secret in secrets.values():
        assert secret not in text and hash_secret(secret)[7:] not in text


# -- which models --------------------------------------------------------------------------------


def test_a_model_the_key_may_not_use_is_403(keyed):
    gw, secrets, _, chat_backend, other_backend = keyed
    c = client(gw, secrets["chat_only"])
    assert chat(c).http_response.status_code == 200
    assert chat(c, model="chat_lora1").http_response.status_code == 200
    for model in ("other", "chat_lora2"):
        with pytest.raises(openai.PermissionDeniedError) as denied:
            chat(c, model=model)
        assert denied.value.status_code == 403
        assert denied.value.code == "model_not_allowed"
    assert other_backend.total_calls == 0
    assert metric(gw, "kvgate_key_rejections_total", key="chat_only",
                  reason="model_not_allowed") == 2
    # An unknown model is still 404, whatever the key.
    with pytest.raises(openai.NotFoundError):
        chat(c, model="nope")


def test_models_lists_what_the_key_may_use(keyed):
    gw, secrets, *_ = keyed
    assert sorted(m.id for m in client(gw, secrets["chat_only"]).models.list()) == \
        ["chat", "chat_lora1"]
    assert sorted(m.id for m in client(gw, secrets["all"], "/openai/v1").models.list()) == \
        ["chat", "chat_lora1", "chat_lora2", "other"]


# -- how much ------------------------------------------------------------------------------------


def test_requests_per_minute(keyed):
    gw, secrets, _, backend, _ = keyed
    c = client(gw, secrets["slow"])
    remaining = []
    for _ in range(3):
        raw = chat(c)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in raw.headers  # no token limit on this key
    assert remaining == ["2", "1", "0"]
    with pytest.raises(openai.RateLimitError) as limited:
        chat(c)
    error = limited.value
    assert error.code == "rate_limit_exceeded"
    assert "requests per min" in error.message and secrets["slow"] not in error.message
    # One unit comes back every 20 s: the wait is up to 20 s.
    assert 1 <= int(error.response.headers["retry-after"]) <= 20
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert backend.total_calls == 3
    # Another key is not affected.
    assert chat(client(gw, secrets["all"])).http_response.status_code == 200
    assert metric(gw, "kvgate_key_rejections_total", key="slow", reason="requests") == 1
    assert metric(gw, "kvgate_key_requests_total", key="slow") == 3


def test_tokens_per_minute_are_corrected_by_the_usage(keyed):
    gw, secrets, *_ = keyed
    c = client(gw, secrets["thrifty"])
    # ~925 tokens estimated (max_tokens + prompt bytes / 4), then 6 charged: the test backend's
    # usage. Without the correction the second would not fit in 1,000.
    for _ in range(2):
        raw = chat(c, max_tokens=900)
        assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100  # said at admission
    assert metric(gw, "kvgate_key_tokens_total", key="thrifty") == 12
    # The model server refuses one: its estimate is given back.
    with pytest.raises(openai.BadRequestError):
        chat(c.with_options(default_headers={"x-test-plan": json.dumps({"status": 400})}),
             max_tokens=100)
    assert metric(gw, "kvgate_key_tokens_total", key="thrifty") == 12
    with pytest.raises(openai.RateLimitError) as limited:
        chat(c, max_tokens=990)  # 12 used + 990 + the prompt > 1,000
    assert "tokens per min" in limited.value.message
    assert int(limited.value.response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError) as too_large:
        chat(c, max_tokens=5000)  # larger than a whole minute's budget
    assert "larger than the key's whole budget" in too_large.value.message
    assert metric(gw, "kvgate_key_rejections_total", key="thrifty", reason="tokens") == 2
    assert int(chat(c, max_tokens=10).headers["x-ratelimit-remaining-tokens"]) > 900


def test_stream_usage_corrects_the_estimate(make_gateway, tmp_path):
    """The simulator's last SSE event carries the usage (``include_usage``)."""
    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, t={"limits": {"tokensPerMinute": 100000}})
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path)}})
    gw.add_model("m")
    gw.set_endpoints("m", [gw.sim("m", "r1")])
    c = client(gw, secrets["t"])
    total = 0
    for _ in range(2):
        stream = c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "count to five"}], max_tokens=8,
            stream=True, stream_options={"include_usage": True})
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        total += usage[-1].total_tokens
    assert metric(gw, "kvgate_key_tokens_total", key="t") == total


# -- the file ------------------------------------------------------------------------------------


def test_keys_reload_live(keyed):
    gw, secrets, path, *_ = keyed
    c = client(gw, secrets["chat_only"])
    assert chat(c).http_response.status_code == 200
    fresh = write_keys(path, all={"models": ["*"]}, newcomer={"models": ["other"]})
    # chat_only is gone from the file (revoked), newcomer is in.

    def revoked() -> bool:
        try:
            chat(c)
        except openai.AuthenticationError:
            return True
        return False

    wait_until(revoked)
    assert chat(client(gw, fresh["newcomer"]), model="other").http_response.status_code == 200
    assert chat(client(gw, fresh["all"])).http_response.status_code == 200
    with pytest.raises(openai.AuthenticationError):
        chat(client(gw, secrets["all"]))  # the same name under a new secret


def test_a_broken_file_keeps_the_keys_in_force(keyed):
    gw, secrets, path, *_ = keyed
    gw.allow_errors("API keys not reloaded")
    path.write_text("keys:\n- name: x\n  hash: not-a-hash\n")
    reloads = gw.gateway.admission.store.reloads
    time.sleep(0.5)  # several polls: nothing may change
    assert gw.gateway.admission.store.reloads == reloads
    assert chat(client(gw, secrets["all"])).http_response.status_code == 200


def test_expired_keys_are_refused(make_gateway, tmp_path):
    path = tmp_path / "keys.yaml"
    soon = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2))
    secrets = write_keys(path, old={"expiresAt": "2020-01-01T00:00:00Z"},
                         soon={"expiresAt": soon.isoformat()})
    # YAML's own timestamps (unquoted) are read too.
    path.write_text(path.read_text().replace("'2020-01-01T00:00:00Z'", "2020-01-01T00:00:00Z"))
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path)}})
    gw.model_with("chat", [gw.backend("b")])
    with pytest.raises(openai.AuthenticationError) as expired:
        chat(client(gw, secrets["old"]))
    assert "expired" in expired.value.message
    assert chat(client(gw, secrets["soon"])).http_response.status_code == 200

    def refused() -> bool:
        try:
            chat(client(gw, secrets["soon"]))
        except openai.AuthenticationError:
            return True
        return False

    wait_until(refused)
    assert metric(gw, "kvgate_key_rejections_total", key="old", reason="expired") == 1


def test_keys_off_by_default_pass_the_header_through(gw):
    backend = gw.backend("b")
    gw.model_with("chat", [backend])
    chat(client(gw, "anything"))
    assert backend.last.headers["Authorization"] == "Bearer anything"
    assert "kvgate_key_" not in metrics_text(gw)


def test_anthropic_clients_send_their_key_as_x_api_key(make_gateway, tmp_path):
    import anthropic

    path = tmp_path / "keys.yaml"
    secrets = write_keys(path, a={"models": ["m"], "limits": {"tokensPerMinute": 100000}})
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path)}})
    gw.model_with("m", [gw.sim("m", "r0")])
    sdk = anthropic.Anthropic(base_url=gw.url, api_key=secrets["a"], max_retries=0, timeout=30)
    message = sdk.messages.create(model="m", max_tokens=4,
                                  messages=[{"role": "user", "content": "hi"}])
    # Anthropic's usage (input + output tokens) corrects the estimate.
    assert metric(gw, "kvgate_key_tokens_total", key="a") == \
        message.usage.input_tokens + message.usage.output_tokens
    wrong = anthropic.Anthropic(base_url=gw.url, api_key="sk-kvg-wrong", max_retries=0,
                                timeout=30)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        wrong.messages.create(model="m", max_tokens=4,
                              messages=[{"role": "user", "content": "hi"}])
    assert refused.value.response.json()["error"]["type"] == "authentication_error"


def test_config_mistakes_are_named(tmp_path, monkeypatch):
    from lb.app import Gateway
    from lb.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="apiKeys.file"):
        config_from_dict({"apiKeys": {"enabled": True}})
    path = tmp_path / "keys.yaml"
    write_keys(path, a={})
    monkeypatch.delenv("KVGATE_TEST_NO_SUCH_KEY", raising=False)
    config = config_from_dict({"apiKeys": {"enabled": True, "file": str(path),
                                           "upstreamKeyEnv": {"m": "KVGATE_TEST_NO_SUCH_KEY"}}})
    with pytest.raises(ConfigError, match="KVGATE_TEST_NO_SUCH_KEY is not set"):
        Gateway(config)
