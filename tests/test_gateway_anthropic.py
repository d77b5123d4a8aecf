"""Anthropic's Messages API through the gateway, with the official ``anthropic`` SDK as the
client and simulated vLLM replicas (``kvgate_sim``, which serves ``/v1/messages`` as vLLM does)
behind it, over real HTTP.

On this route every error is in Anthropic's shape, ``{"type": "error", "error": {"type",
"message"}}``, the gateway's own and a replica's alike, since that is what Anthropic's clients
read; a stream a replica breaks off ends with an ``event: error`` that the SDK raises.
"""

from __future__ import annotations

import json

import anthropic
import pytest

from tests.gateway_harness import GatewayHarness

MESSAGES = [{"role": "user", "content": "Which bicycle suits a daily commute?"}]
SYSTEM = "You are the support assistant of a bicycle shop; answer in two sentences."


@pytest.fixture
def gw2(gw: GatewayHarness) -> GatewayHarness:
    """``m`` (text, adapter ``sql``) on two simulated replicas; ``emb`` (embeddings only)."""
    gw.model_with("m", [gw.sim("m", "r0", "sql"), gw.sim("m", "r1", "sql")], adapters=["sql"])
    gw.model_with("emb", [gw.backend("emb")], features=["TextEmbedding"])
    return gw


def client(gw: GatewayHarness, prefix: str = "") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url + prefix, api_key="test-key", max_retries=0,
                               timeout=30)


def served(gw: GatewayHarness) -> int:
    return sum(gw.on_loop(lambda r=r: r.snapshot()["http"]["by_path"].get("/v1/messages", 0))
               for r in gw.sims)


def anthropic_error(exc: anthropic.APIStatusError, status: int, error_type: str) -> str:
    """The message of an SDK exception, its body checked to be exactly Anthropic's shape."""
    assert exc.status_code == status
    body = exc.response.json()
    assert body == {"type": "error", "error": {"type": error_type,
                                               "message": body["error"]["message"]}}, body
    assert body["error"]["message"]
    return body["error"]["message"]


@pytest.mark.parametrize("prefix", ["", "/openai"])
def test_messages_create(gw2, prefix):
    message = client(gw2, prefix).messages.create(model="m", max_tokens=6, system=SYSTEM,
                                                  messages=MESSAGES)
    assert message.type == "message" and message.role == "assistant" and message.model == "m"
    assert message.stop_reason == "max_tokens"  # the simulator's answers run past 6 tokens
    assert len(message.content[0].text) == 6 * 4
    assert message.usage.output_tokens == 6 and message.usage.input_tokens > 20
    assert served(gw2) == 1
    assert gw2.metric("kvgate_requests_total", model="m", kind="messages", code="200") == 1
    gw2.settle()


def test_messages_stream(gw2):
    sdk = client(gw2)
    with sdk.messages.stream(model="m", max_tokens=5, messages=MESSAGES,
                             system=[{"type": "text", "text": SYSTEM}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("text") == 5 and "content_block_stop" in kinds
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    again = sdk.messages.create(model="m", max_tokens=5, messages=MESSAGES,
                                system=[{"type": "text", "text": SYSTEM}])
    assert again.content[0].text == final.content[0].text  # same prompt, same answer
    assert gw2.metric("kvgate_requests_total", model="m", kind="messages", code="200") == 2
    gw2.settle()


def test_an_adapters_message_names_the_model_as_requested(gw2):
    sdk = client(gw2)
    message = sdk.messages.create(model="m_sql", max_tokens=3, messages=MESSAGES)
    assert message.model == "m_sql"  # the engine served "sql" (it knows no "m_sql")
    with sdk.messages.stream(model="m_sql", max_tokens=3, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    assert final.model == "m_sql" and final.content[0].text == message.content[0].text
    gw2.settle()


def test_messages_are_keyed_by_their_first_user_message(make_gateway):
    gw = make_gateway()
    gw.model_with("m", [gw.sim("m", "r0"), gw.sim("m", "r1")], strategy="PrefixHash")
    text = gw.prefix_for("m", "r1")
    sdk = client(gw)
    for system in ("one", "another"):
        sdk.messages.create(model="m", max_tokens=1, system=system,
                            messages=[{"role": "user", "content": [{"type": "text",
                                                                    "text": text}]}])
    by_replica = [gw.on_loop(lambda r=r: r.snapshot()["http"]["by_path"].get("/v1/messages", 0))
                  for r in gw.sims]
    assert by_replica == [0, 2]
    gw.settle()


# -- errors in Anthropic's shape ---------------------------------------------------------------


def test_the_gateways_own_errors(gw2):
    sdk = client(gw2)
    with pytest.raises(anthropic.NotFoundError) as info:
        sdk.messages.create(model="nope", max_tokens=5, messages=MESSAGES)
    assert "`nope` does not exist" in anthropic_error(info.value, 404, "not_found_error")
    with pytest.raises(anthropic.NotFoundError) as info:
        sdk.messages.create(model="emb", max_tokens=5, messages=MESSAGES)
    assert "needs the TextGeneration feature" in anthropic_error(info.value, 404,
                                                                 "not_found_error")
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk.messages.create(model="m", max_tokens=5, messages=[])
    assert "`messages`" in anthropic_error(info.value, 400, "invalid_request_error")
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk.messages.create(model="m", max_tokens=5, messages=MESSAGES, system=7)
    anthropic_error(info.value, 400, "invalid_request_error")
    for body, content_type, status in ((b'{"model": "m", ', "application/json", 400),
                                       (b'{"model": "m"}', "text/plain", 415)):
        code, _, raw = gw2.http("POST", "/v1/messages", body, {"content-type": content_type})
        assert code == status
        assert json.loads(raw)["type"] == "error"
    code, _, raw = gw2.http("GET", "/v1/messages")
    assert code == 405 and json.loads(raw)["error"]["type"] == "invalid_request_error"
    assert json.loads(raw)["type"] == "error"
    assert served(gw2) == 0
    gw2.settle()


def test_a_replicas_error_is_passed_on_in_anthropics_shape(gw2):
    # The SDK always sends max_tokens; the engine requires it, so a raw request without it
    # gets the engine's 400, rewritten to Anthropic's shape.
    code, _, raw = gw2.http("POST", "/v1/messages", json.dumps(
        {"model": "m", "messages": MESSAGES}).encode(), {"content-type": "application/json"})
    assert code == 400
    assert json.loads(raw) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}
    for replica in gw2.sims:  # every attempt fails: the last failure reaches the client
        gw2.on_loop(replica.server.faults.update, {"fail_next": 4, "fail_next_status": 503})
    with pytest.raises(anthropic.APIStatusError) as info:
        client(gw2).messages.create(model="m", max_tokens=5, messages=MESSAGES)
    assert "Injected failure" in anthropic_error(info.value, 503, "overloaded_error")
    gw2.settle()


def test_a_stream_broken_off_ends_with_an_error_event_the_sdk_raises(gw2):
    for replica in gw2.sims:  # cut after message_start, content_block_start, ping, 2 tokens
        gw2.on_loop(replica.server.faults.update, {"reset_after_chunks": 5})
    texts = []
    with pytest.raises(anthropic.APIStatusError) as info:
        with client(gw2).messages.stream(model="m", max_tokens=50, messages=MESSAGES) as stream:
            for text in stream.text_stream:
                texts.append(text)
    assert len(texts) == 2
    assert info.value.body == {"type": "error", "error": {
        "type": "api_error", "message": "The model server closed the stream before it finished."}}
    gw2.settle()
