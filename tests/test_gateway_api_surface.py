"""The routes beside chat and completions, through the gateway to simulated vLLM replicas
(``kvgate_sim``) over real HTTP: OpenAI's Responses API with the official ``openai`` SDK
(``client.responses.create``, streaming too), vLLM's ``/tokenize`` and ``/detokenize`` (at the
root, as vLLM serves them, and under KubeAI's ``/openai``), ``/v1/score`` and ``/v1/rerank``.

Each is routed (the routing key follows chat's rules), retried, counted by kind, refused for
models whose features do not cover it, and answers bad input with an OpenAI-shaped 4xx before
any replica sees it. Anthropic's Messages API has its own file (test_gateway_anthropic.py).
"""

from __future__ import annotations

import json

import aiohttp
import openai
import pytest

from lb.parse import estimated_tokens, parse_request, prefix_of
from tests.gateway_harness import HOST, GatewayHarness

INSTRUCTIONS = ("You are the support assistant of a company that sells bicycles, spare parts "
                "and repairs; answer in two sentences, politely, and name the shop's hours.")


@pytest.fixture
def zoo(gw: GatewayHarness) -> GatewayHarness:
    """``m`` (text, adapter ``sql``) on two simulated replicas that both have the adapter;
    ``rank`` (Reranking) and ``emb`` (TextEmbedding) on one each."""
    gw.model_with("m", [gw.sim("m", "r1", "sql"), gw.sim("m", "r2", "sql")], adapters=["sql"])
    gw.model_with("rank", [gw.sim("rank", "rank1")], features=["Reranking"])
    gw.model_with("emb", [gw.sim("emb", "emb1")], features=["TextEmbedding"])
    return gw


def served(gw: GatewayHarness, path: str) -> dict[int, int]:
    """Requests each simulated replica received on ``path``, by its index in ``gw.sims``."""
    return {i: gw.on_loop(lambda r=r: r.snapshot()["http"]["by_path"].get(path, 0))
            for i, r in enumerate(gw.sims)}


def post(gw: GatewayHarness, path: str, payload: object,
         content_type: str = "application/json") -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, _, data = gw.http("POST", path, body, {"content-type": content_type})
    return status, json.loads(data)


# -- the Responses API -----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_responses_create(zoo, prefix):
    client = zoo.client(prefix)
    response = client.responses.create(model="m", instructions=INSTRUCTIONS,
                                       input="When do you open?", max_output_tokens=6)
    assert response.object == "response" and response.model == "m"
    assert response.status == "incomplete"  # the simulator's answers run past 6 tokens
    assert response.incomplete_details.reason == "max_output_tokens"
    assert len(response.output_text) == 6 * 4  # six 4-character filler tokens
    assert response.usage.output_tokens == 6 and response.usage.input_tokens > 30
    assert sum(served(zoo, "/v1/responses").values()) == 1
    assert zoo.metric("kvgate_requests_total", model="m", kind="responses", code="200") == 1
    zoo.settle()


def test_responses_stream_passes_named_events_through(zoo):
    client = zoo.client()
    events = list(client.responses.create(
        model="m", stream=True, max_output_tokens=5,
        input=[{"role": "developer", "content": "Be brief."},
               {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}]))
    kinds = [e.type for e in events]
    assert kinds == (["response.created", "response.in_progress",
                      "response.output_item.added", "response.content_part.added"]
                     + ["response.output_text.delta"] * 5
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", "response.incomplete"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
        final.output_text
    assert final.usage.output_tokens == 5
    assert zoo.metric("kvgate_requests_total", model="m", kind="responses", code="200") == 1
    zoo.settle()


def test_responses_for_an_adapter_name_the_model_as_requested(zoo):
    client = zoo.client()
    response = client.responses.create(model="m_sql", input="select", max_output_tokens=3)
    assert response.model == "m_sql"  # the engine served "sql" (it knows no "m_sql")
    events = list(client.responses.create(model="m_sql", input="select", stream=True,
                                          max_output_tokens=3))
    snapshots = [e.response for e in events if hasattr(e, "response")]
    assert [s.model for s in snapshots] == ["m_sql"] * 3  # created, in_progress, incomplete
    assert events[-1].response.output_text == response.output_text  # same prompt, same answer
    zoo.settle()


def test_a_conversation_meets_its_cache_whichever_api_sends_it(make_gateway):
    """Under the Conversation key, instructions are the system message: a Responses request
    and a chat request that share the instructions go to the same replica, and the chat's
    prompt finds the instructions already in that replica's prefix cache."""
    gw = make_gateway()
    gw.model_with("m", [gw.sim("m", f"r{i}") for i in range(4)], strategy="PrefixHash",
                  prefix_from="Conversation")
    client = gw.client()
    for question in ("When do you open?", "Do you fix brakes?", "Where are you?"):
        client.responses.create(model="m", instructions=INSTRUCTIONS, input=question,
                                max_output_tokens=2)
    chat = client.chat.completions.create(
        model="m", max_tokens=2, messages=[{"role": "system", "content": INSTRUCTIONS},
                                           {"role": "user", "content": "Any discounts?"}])
    responses, chats = served(gw, "/v1/responses"), served(gw, "/v1/chat/completions")
    (replica,) = [i for i, n in responses.items() if n]
    assert responses[replica] == 3 and chats[replica] == 1
    assert chat.usage.prompt_tokens_details.cached_tokens >= 32  # the instructions' blocks
    gw.settle()


def test_first_user_message_keys_responses_like_chat(make_gateway):
    gw = make_gateway()
    gw.model_with("m", [gw.sim("m", "r0"), gw.sim("m", "r1")], strategy="PrefixHash")
    text = gw.prefix_for("m", "r1")
    client = gw.client()
    for instructions in ("one", "another", None):  # the instructions do not count
        client.responses.create(model="m", instructions=instructions, max_output_tokens=1,
                                input=[{"role": "user", "content": text}])
    assert served(gw, "/v1/responses") == {0: 0, 1: 3}
    gw.settle()


def test_a_failed_attempt_is_retried_on_another_replica(make_gateway):
    gw = make_gateway()
    gw.model_with("m", [gw.sim("m", "r0"), gw.sim("m", "r1")], strategy="PrefixHash")
    text = gw.prefix_for("m", "r0")
    gw.on_loop(gw.sims[0].server.faults.update, {"fail_next": 1, "fail_next_status": 503})
    response = gw.client().responses.create(model="m", input=text, max_output_tokens=2)
    assert response.status == "incomplete"
    assert gw.metric("kvgate_upstream_retries_total", model="m", reason="503") == 1
    assert served(gw, "/v1/responses") == {0: 1, 1: 1}
    assert gw.metric("kvgate_requests_total", model="m", kind="responses", code="200") == 1
    gw.settle()


def test_prefix_keys_of_the_new_apis():
    def key(path_kind: str, payload: dict, source: str = "FirstUserMessage") -> str:
        parsed = parse_request(path_kind, json.dumps(payload).encode(), b"application/json")
        return prefix_of(parsed, 60, source)

    chat = {"model": "m", "tools": [{"type": "function"}],
            "messages": [{"role": "system", "content": "sys"},
                         {"role": "user", "content": [{"type": "text", "text": "question"}]}]}
    responses = {"model": "m", "instructions": "sys", "tools": [{"type": "function"}],
                 "input": [{"type": "message", "role": "user",
                            "content": [{"type": "input_text", "text": "question"}]}]}
    messages = {"model": "m", "system": [{"type": "text", "text": "sys"}], "max_tokens": 1,
                "tools": [{"type": "function"}],
                "messages": [{"role": "user", "content": "question"}]}
    for source in ("FirstUserMessage", "Conversation"):
        assert key("chat", chat, source) == key("responses", responses, source) == \
            key("messages", messages, source), source
    assert key("responses", {**responses, "input": "question"}) == "question"
    assert key("responses", {**responses, "input": "question"}, "Conversation") == \
        '[{"type":"function"}]<system>sys<user>question'
    assert key("tokenize", {"model": "m", "prompt": "question"}) == ""


def test_token_estimates_of_the_new_kinds():
    def weight(kind: str, payload: dict) -> int:
        body = json.dumps(payload).encode()
        return estimated_tokens(parse_request(kind, body, b"application/json")) - len(body) // 4

    assert weight("responses", {"model": "m", "input": "x", "max_output_tokens": 40}) == 40
    assert weight("responses", {"model": "m", "input": "x"}) == 256
    assert weight("messages", {"model": "m", "max_tokens": 30,
                               "messages": [{"role": "user", "content": "x"}]}) == 30
    assert weight("tokenize", {"model": "m", "prompt": "x"}) == 0
    assert weight("detokenize", {"model": "m", "tokens": [1]}) == 0
    assert weight("score", {"model": "m", "text_1": "a", "text_2": "b"}) == 0


# -- tokenize and detokenize -------------------------------------------------------------------


@pytest.mark.parametrize("root", ["", "/openai"])
async def test_tokenize_and_detokenize_at_vllms_root_paths(zoo, root):
    prompt = "Hello, bicycles!"
    async with aiohttp.ClientSession(f"http://{HOST}:{zoo.port}") as session:
        async with session.post(root + "/tokenize", json={"model": "m", "prompt": prompt}) as r:
            assert r.status == 200, await r.text()
            tokenized = await r.json()
        # The same as the replica says when asked directly.
        direct = zoo.sims[0].url + "/tokenize"
        async with session.post(direct, json={"model": "m", "prompt": prompt}) as r:
            assert tokenized == await r.json()
        assert tokenized["count"] == len(tokenized["tokens"]) == 5  # <bos> + 4 of 4 bytes
        assert tokenized["max_model_len"] > 0
        async with session.post(root + "/detokenize",
                                json={"model": "m", "tokens": tokenized["tokens"][1:]}) as r:
            assert (r.status, await r.json()) == (200, {"prompt": prompt})
        chat = {"model": "m_sql", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(root + "/tokenize", json=chat) as r:
            assert r.status == 200
            assert (await r.json())["count"] == 9  # <bos>, header of 3, "hi", <eot>, prompt
        for model in ("emb", "rank"):  # every model with a tokenizer answers
            async with session.post(root + "/tokenize",
                                    json={"model": model, "prompt": "x"}) as r:
                assert r.status == 200
        async with session.post("/v1/tokenize", json={"model": "m", "prompt": "x"}) as r:
            assert r.status == 404  # vLLM serves it at the root only; so does the gateway
    assert sum(served(zoo, "/tokenize").values()) == 5  # one of them sent directly
    await zoo.asettle()
    assert zoo.metric("kvgate_requests_total", kind="tokenize", code="200") == 4
    assert zoo.metric("kvgate_requests_total", kind="detokenize", code="200") == 1


def test_tokenize_is_not_served_for_a_speech_model(gw):
    gw.model_with("whisper", [gw.backend("w")], engine="FasterWhisper",
                  features=["SpeechToText"])
    status, body = post(gw, "/tokenize", {"model": "whisper", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_does_not_serve_route"
    assert "one of the TextGeneration, TextEmbedding or Reranking features" in \
        body["error"]["message"]
    assert gw.backends[0].total_calls == 0


# -- score and rerank ----------------------------------------------------------------------------


@pytest.mark.parametrize("first,second", [("text_1", "text_2"), ("queries", "documents")])
def test_score(zoo, first, second):
    client = zoo.client()
    result = client.post("/score", cast_to=object, body={
        "model": "rank", first: "capital of France",
        second: ["Paris is the capital of France", "Bicycles have two wheels"]})
    assert result["object"] == "list" and result["model"] == "rank"
    scores = [d["score"] for d in result["data"]]
    assert [d["index"] for d in result["data"]] == [0, 1]
    assert scores[0] > scores[1] >= 0
    assert served(zoo, "/v1/score")[2] == 1
    assert zoo.metric("kvgate_requests_total", model="rank", kind="score", code="200") == 1


@pytest.mark.parametrize("prefix", ["/v1", "/openai/v1"])
def test_rerank(zoo, prefix):
    client = zoo.client(prefix)
    documents = ["Bicycles have two wheels", "Paris is the capital of France",
                 "France is in Europe"]
    result = client.post("/rerank", cast_to=object, body={
        "model": "rank", "query": "What is the capital of France?", "documents": documents,
        "top_n": 2})
    assert [r["index"] for r in result["results"]] == [1, 2]
    assert result["results"][0]["document"] == {"text": documents[1]}
    assert result["results"][0]["relevance_score"] > result["results"][1]["relevance_score"]
    assert result["usage"]["total_tokens"] > 0


def test_score_needs_the_reranking_feature(zoo):
    client = zoo.client()
    for model in ("m", "emb"):
        with pytest.raises(openai.NotFoundError) as info:
            client.post("/score", cast_to=object,
                        body={"model": model, "text_1": "a", "text_2": "b"})
        error = info.value.response.json()["error"]
        assert error["code"] == "model_does_not_serve_route"
        assert "the Reranking feature" in error["message"]
    assert sum(served(zoo, "/v1/score").values()) == 0


# -- bad input: a 4xx in OpenAI's shape, and no replica bothered ----------------------------------

BAD = [
    ("/v1/responses", b'{"model": "m", "input": ', None),
    ("/v1/responses", {"input": "hi"}, "model"),
    ("/v1/responses", {"model": "m"}, "input"),
    ("/v1/responses", {"model": "m", "input": 5}, "input"),
    ("/v1/responses", {"model": "m", "input": ["hi"]}, "input[0]"),
    ("/v1/responses", {"model": "m", "input": [{"role": 1, "content": "x"}]}, "input[0].role"),
    ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": 5}]},
     "input[0].content"),
    ("/v1/responses", {"model": "m", "input": "x", "instructions": ["x"]}, "instructions"),
    ("/v1/responses", {"model": "m", "input": "x", "stream": "yes"}, "stream"),
    ("/tokenize", {"model": "m"}, "prompt"),
    ("/tokenize", {"model": "m", "prompt": ["x"]}, "prompt"),
    ("/tokenize", {"model": "m", "messages": "hi"}, "messages"),
    ("/openai/tokenize", {"model": 5, "prompt": "x"}, "model"),
    ("/detokenize", {"model": "m", "tokens": "1 2"}, "tokens"),
    ("/detokenize", {"model": "m", "tokens": [1, "2"]}, "tokens"),
    ("/detokenize", {"model": "m", "tokens": [True]}, "tokens"),
    ("/detokenize", [1, 2], None),
    ("/v1/score", {"model": "rank"}, "text_1"),
    ("/v1/score", {"model": "rank", "text_1": "a", "text_2": 5}, "text_2"),
    ("/v1/score", {"model": "rank", "queries": "a"}, "documents"),
]


@pytest.mark.parametrize("path,payload,param", BAD)
def test_bad_input_is_a_400_before_any_replica(zoo, path, payload, param):
    status, body = post(zoo, path, payload)
    assert status == 400, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert all(n == 0 for n in served(zoo, path.removeprefix("/openai")).values())
    zoo.settle()


@pytest.mark.parametrize("path", ["/v1/responses", "/tokenize", "/detokenize", "/v1/score",
                                  "/openai/v1/responses"])
def test_a_declared_non_json_body_is_a_415(zoo, path):
    status, body = post(zoo, path, {"model": "m", "prompt": "x"}, "text/plain")
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"
    status, _, _ = zoo.http("GET", path)
    assert status == 405


def test_unknown_models_and_adapters_are_404(zoo):
    for path, payload in (("/v1/responses", {"model": "nope", "input": "x"}),
                          ("/tokenize", {"model": "m_nope", "prompt": "x"}),
                          ("/v1/score", {"model": "rank_x", "text_1": "a", "text_2": "b"})):
        status, body = post(zoo, path, payload)
        assert status == 404 and body["error"]["code"] == "model_not_found", (path, body)
