"""Retries on other replicas: which failures, how many attempts, what the client finally sees.

The PrefixHash ring is deterministic, so each test first asks the gateway's own ring which
replica a prompt goes to and makes *that* replica the failing one: call counts are exact.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.gateway_harness import GatewayHarness


def chat(gw: GatewayHarness, content: str, **kwargs):
    return gw.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}], **kwargs)


def retries(gw: GatewayHarness, reason: str | None = None) -> float:
    labels = {"model": "m"} if reason is None else {"model": "m", "reason": reason}
    return gw.metric("kvgate_upstream_retries_total", **labels)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried_on_another_replica(gw, status):
    bad, good = gw.backend("bad", status=status), gw.backend("good")
    gw.model_with("m", [bad, good], strategy="PrefixHash")
    response = chat(gw, gw.prefix_for("m", "bad"))
    assert response.system_fingerprint == "good"
    assert (bad.total_calls, good.total_calls) == (1, 1)
    assert bad.last.body == good.last.body  # the body is replayed as sent
    assert retries(gw, str(status)) == 1
    gw.settle()


def test_connection_refused_is_retried(gw):
    good = gw.backend("good")
    dead = gw.refusing_endpoint("dead")
    gw.model_with("m", [dead, good], strategy="PrefixHash")
    response = chat(gw, gw.prefix_for("m", "dead"))
    assert response.system_fingerprint == "good"
    assert good.total_calls == 1
    assert retries(gw, "connect") == 1
    gw.settle()


def test_connection_reset_before_headers_is_retried(gw):
    flaky, good = gw.backend("flaky", reset=True), gw.backend("good")
    gw.model_with("m", [flaky, good], strategy="PrefixHash")
    response = chat(gw, gw.prefix_for("m", "flaky"))
    assert response.system_fingerprint == "good"
    assert (flaky.total_calls, good.total_calls) == (1, 1)
    gw.settle()


def test_each_retry_excludes_replicas_already_tried(gw):
    backends = [gw.backend(f"b{i}", status=503) for i in range(4)]
    gw.model_with("m", backends, strategy="PrefixHash")
    with pytest.raises(openai.InternalServerError) as info:
        chat(gw, "anything")
    # 4 attempts (1 + maxRetries 3), each on a different replica; the last 503 passes through.
    assert [b.total_calls for b in backends] == [1, 1, 1, 1]
    assert info.value.status_code == 503
    assert info.value.message.endswith("failed on purpose with 503")
    assert retries(gw, "503") == 3
    gw.settle()


def test_last_upstream_response_is_passed_through(gw):
    a, b = gw.backend("a", status=503), gw.backend("b", status=503)
    gw.model_with("m", [a, b], strategy="LeastLoad")
    status, headers, body = gw.post_json("/v1/chat/completions",
                                         {"model": "m", "messages": [{"role": "user",
                                                                       "content": "x"}]})
    assert status == 503
    # Both replicas were tried, then (all tried) the retries went back to them: 4 in all.
    assert a.total_calls + b.total_calls == 4
    assert min(a.total_calls, b.total_calls) >= 1
    assert json.loads(body)["error"]["message"].endswith("failed on purpose with 503")
    assert gw.metric("kvgate_requests_total", model="m", code="503") == 1
    gw.settle()


def test_fewer_retries_when_configured(make_gateway):
    gw = make_gateway({"retries": {"maxRetries": 1}})
    backends = [gw.backend(f"b{i}", status=500) for i in range(3)]
    gw.model_with("m", backends)
    with pytest.raises(openai.InternalServerError):
        chat(gw, "x")
    assert sum(b.total_calls for b in backends) == 2
    gw.settle()


def test_retry_statuses_are_configurable(make_gateway):
    gw = make_gateway({"retries": {"retryStatuses": [503]}})
    bad, good = gw.backend("bad", status=500), gw.backend("good")
    gw.model_with("m", [bad, good], strategy="PrefixHash")
    with pytest.raises(openai.InternalServerError):
        chat(gw, gw.prefix_for("m", "bad"))
    assert (bad.total_calls, good.total_calls) == (1, 0)


@pytest.mark.parametrize("status", [400, 404, 422, 429])
def test_4xx_is_not_retried(gw, status):
    bad, good = gw.backend("bad", status=status), gw.backend("good")
    gw.model_with("m", [bad, good], strategy="PrefixHash")
    with pytest.raises(openai.APIStatusError) as info:
        chat(gw, gw.prefix_for("m", "bad"))
    assert info.value.status_code == status
    assert (bad.total_calls, good.total_calls) == (1, 0)
    assert retries(gw) == 0
    gw.settle()


def test_all_refused_gives_502(gw):
    dead = [gw.refusing_endpoint(f"dead{i}") for i in range(2)]
    gw.model_with("m", dead)
    with pytest.raises(openai.InternalServerError) as info:
        chat(gw, "x")
    assert info.value.status_code == 502
    body = info.value.response.json()["error"]
    assert body["code"] == "upstream_unreachable"
    assert "after 4 attempts" in body["message"]
    assert "127.0.0.1" not in body["message"]  # no internal addresses leak
    assert retries(gw, "connect") == 3
    gw.settle()


def test_retry_then_success_mixed_failures(gw):
    """A refused replica, a 500 and a 503 before a healthy one: success on the 4th attempt,
    each failed replica tried exactly once, in ring order."""
    dead = gw.refusing_endpoint("dead")
    b500, b503 = gw.backend("b500", status=500), gw.backend("b503", status=503)
    good = gw.backend("good")
    gw.model_with("m", [dead, b500, b503, good], strategy="PrefixHash")
    ring = gw.on_loop(lambda: gw.registry.group("m").ring)

    def walk(prompt: str) -> list[str]:
        order: list[str] = []
        while not order or order[-1] != "good":
            order.append(gw.on_loop(ring.pick, prompt, "", list(order)))
        return order

    prompt = next(p for p in (f"p{i}" for i in range(2000)) if len(walk(p)) == 4)
    response = chat(gw, prompt)
    assert response.system_fingerprint == "good"
    assert (b500.total_calls, b503.total_calls, good.total_calls) == (1, 1, 1)
    assert retries(gw, "connect") == 1
    assert retries(gw, "500") == 1
    assert retries(gw, "503") == 1
    gw.settle()


def test_stream_is_never_retried_after_bytes_went_out(gw):
    fragile = gw.backend("fragile", chunks=5, die_after=1)
    good = gw.backend("good")
    gw.model_with("m", [fragile, good], strategy="PrefixHash")
    stream = chat(gw, gw.prefix_for("m", "fragile"), stream=True)
    chunks = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            chunks.append(chunk)
    assert len(chunks) == 1
    assert (fragile.total_calls, good.total_calls) == (1, 0)
    assert retries(gw) == 0
    gw.settle()


def test_stream_failing_before_first_byte_is_retried(gw):
    bad, good = gw.backend("bad", status=503), gw.backend("good", chunks=4)
    gw.model_with("m", [bad, good], strategy="PrefixHash")
    stream = chat(gw, gw.prefix_for("m", "bad"), stream=True)
    assert len(list(stream)) == 4
    assert (bad.total_calls, good.total_calls) == (1, 1)
    gw.settle()


def test_adapter_retries_stay_on_replicas_with_the_adapter(gw):
    plain = gw.backend("plain")
    bad, good = gw.backend("bad", status=500), gw.backend("good")
    gw.add_model("m", adapters=["lora"], strategy="PrefixHash")
    gw.set_endpoints("m", [plain.endpoint(), bad.endpoint("lora"), good.endpoint("lora")])
    prompt = gw.prefix_for("m", "bad", adapter="lora")
    response = gw.client().chat.completions.create(
        model="m_lora", messages=[{"role": "user", "content": prompt}])
    assert response.system_fingerprint == "good"
    assert (plain.total_calls, bad.total_calls, good.total_calls) == (0, 1, 1)
    assert good.last.json["model"] == "lora"
    gw.settle()


def test_read_timeout_gives_504(make_gateway):
    gw = make_gateway({"upstream": {"readTimeoutSeconds": 0.3}})
    slow = gw.backend("slow", header_delay=5)
    gw.model_with("m", [slow])
    with pytest.raises(openai.InternalServerError) as info:
        chat(gw, "x")
    assert info.value.status_code == 504
    assert info.value.response.json()["error"]["code"] == "upstream_timeout"
    gw.settle()


def test_single_replica_transient_failure_is_retried_on_it(gw):
    """With one replica, every replica has been tried after the first failure: the retry goes
    back to it rather than waiting for another that may never come."""
    only = gw.backend("only")
    gw.model_with("m", [only])
    gw.call(only.fail_next, 2, 503)
    response = chat(gw, "x")
    assert response.system_fingerprint == "only"
    assert only.total_calls == 3
    assert retries(gw, "503") == 2
    gw.settle()
