"""The simulator as a real HTTP server on 127.0.0.1: OpenAI surface, prefix cache, preemption,
metrics, LoRA admin API, readiness and failure injection."""

import asyncio
import time

import aiohttp
import orjson
import pytest

from kvgate_sim import Replica, get_profile, start_replicas
from kvgate_sim.metrics import parse_metrics, sample_value
from kvgate_sim.tokenizer import encode_chat

MODEL = "sim-llama"


@pytest.fixture
async def start():
    """Factory: start a replica with profile overrides; all are stopped after the test."""
    replicas = []

    async def _start(profile: str = "fast", overrides: dict | None = None, **kwargs) -> Replica:
        r = Replica(get_profile(profile, **(overrides or {})), MODEL, **kwargs)
        await r.start()
        replicas.append(r)
        return r

    yield _start
    for r in replicas:
        await r.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def chat_body(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def sse_events(raw: bytes) -> list:
    """Parse an SSE body into JSON objects (and the literal "[DONE]")."""
    out = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: "), block
        payload = block[6:]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


async def stream_chat(http, url: str, body: dict) -> tuple[float, list]:
    """POST a streaming chat request; returns (seconds to first content token, events)."""
    t0 = time.perf_counter()
    ttft = None
    chunks = []
    async with http.post(url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for chunk in r.content.iter_any():
            chunks.append(chunk)
            if ttft is None and b'"content":"' in chunk and b'"content":""' not in chunk:
                ttft = time.perf_counter() - t0
    return ttft, sse_events(b"".join(chunks))


async def metrics(http, url: str) -> dict:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        return parse_metrics(await r.text())


async def stats(http, url: str) -> dict:
    async with http.get(url + "/sim/stats") as r:
        return await r.json()


# --- OpenAI surface ------------------------------------------------------------------------------

async def test_stream_format_matches_vllm(start, http):
    r = await start()
    _, events = await stream_chat(http, r.url, chat_body(
        "hello there", max_tokens=5, stream_options={"include_usage": True}))
    assert events[-1] == "[DONE]"
    first, *tokens, usage_ev, _ = events
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(tokens) == 5
    assert all(t["choices"][0]["finish_reason"] is None for t in tokens[:-1])
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert len({e["id"] for e in events[:-1]}) == 1 and first["model"] == MODEL
    assert usage_ev["choices"] == []
    assert usage_ev["usage"]["completion_tokens"] == 5
    assert usage_ev["usage"]["prompt_tokens"] == len(
        encode_chat([{"role": "user", "content": "hello there"}]))
    # Without include_usage there is no usage event.
    _, events = await stream_chat(http, r.url, chat_body("hi", max_tokens=2))
    assert all("usage" not in e for e in events[:-1])


async def test_non_stream_chat_and_completions(start, http):
    r = await start(overrides={"natural_output_tokens": 7})
    async with http.post(r.url + "/v1/chat/completions",
                         json=chat_body("x", max_completion_tokens=3)) as resp:
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    u = body["usage"]
    assert u["completion_tokens"] == 3 and u["total_tokens"] == u["prompt_tokens"] + 3
    assert u["prompt_tokens_details"] == {"cached_tokens": 0}
    # No max_tokens on chat: the model stops on its own.
    async with http.post(r.url + "/v1/chat/completions", json=chat_body("y")) as resp:
        body = await resp.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 7
    # Completions default to 16 max tokens (natural stop at 7 here) and accept prompt lists.
    async with http.post(r.url + "/v1/completions",
                         json={"model": MODEL, "prompt": ["a b", "c d"], "max_tokens": 4,
                               "stream": True}) as resp:
        events = sse_events(await resp.read())
    assert {e["choices"][0]["index"] for e in events[:-1]} == {0, 1}
    assert sum(1 for e in events[:-1] if e["choices"][0]["finish_reason"] == "length") == 2
    async with http.post(r.url + "/v1/completions",
                         json={"model": MODEL, "prompt": "tell me", "ignore_eos": True}) as resp:
        body = await resp.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 16


async def test_bad_requests_get_openai_shaped_errors(start, http):
    r = await start(overrides={"max_model_len": 200})
    cases = [
        (b"{not json", 400),
        (orjson.dumps({"model": MODEL}), 400),
        (orjson.dumps(chat_body("x" * 2000)), 400),
        (orjson.dumps(chat_body("x", max_tokens=500)), 400),
        (orjson.dumps({**chat_body("x"), "model": "other"}), 404),
        # as vLLM: a priority needs --scheduling-policy priority; and it must be an integer
        (orjson.dumps(chat_body("x", priority=-5)), 400),
        (orjson.dumps(chat_body("x", priority="high")), 400),
    ]
    for raw, status in cases:
        async with http.post(r.url + "/v1/chat/completions", data=raw,
                             headers={"Content-Type": "application/json"}) as resp:
            body = await resp.json()
            assert resp.status == status, body
            assert set(body["error"]) == {"message", "type", "param", "code"}
            assert body["error"]["code"] == status
    async with http.post(r.url + "/v1/chat/completions",
                         json={**chat_body("x"), "model": "other"}) as resp:
        err = (await resp.json())["error"]
    assert err == {"message": "The model `other` does not exist.", "type": "NotFoundError",
                   "param": "model", "code": 404}


async def test_priority_field_under_the_priority_policy(start, http):
    r = await start(overrides={"scheduling_policy": "priority"})
    for priority in (-5, 0, 7):
        async with http.post(r.url + "/v1/chat/completions",
                             json=chat_body("x", priority=priority, max_tokens=2)) as resp:
            assert resp.status == 200, await resp.text()


async def test_embeddings_models_and_version(start, http):
    r = await start()
    async with http.post(r.url + "/v1/embeddings",
                         json={"model": MODEL, "input": ["abc", "abc", "xyz"]}) as resp:
        body = await resp.json()
    vecs = [d["embedding"] for d in body["data"]]
    assert len(vecs[0]) == 384 and vecs[0] == vecs[1] and vecs[0] != vecs[2]
    assert abs(sum(v * v for v in vecs[0]) - 1.0) < 1e-9
    assert body["usage"]["prompt_tokens"] == 3
    async with http.get(r.url + "/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["owned_by"] == "vllm" and models["data"][0]["max_model_len"]
    async with http.get(r.url + "/version") as resp:
        assert resp.status == 200


# --- engine behaviour over HTTP ------------------------------------------------------------------

async def test_repeated_prompt_hits_prefix_cache_and_cuts_ttft(start, http):
    # ~2000-token prompt at 50 us/token of prefill: ~100 ms cold, ~1 ms when cached.
    r = await start(overrides={"prefill_token_s": 50e-6})
    body = chat_body("The quick brown fox jumps over the lazy dog. " * 180, max_tokens=3,
                     stream_options={"include_usage": True})
    cold_ttft, events = await stream_chat(http, r.url, body)
    cold_usage = events[-2]["usage"]
    warm_ttft, events = await stream_chat(http, r.url, body)
    warm_usage = events[-2]["usage"]
    assert cold_usage["prompt_tokens_details"]["cached_tokens"] == 0
    n = warm_usage["prompt_tokens"]
    assert n > 1900
    assert warm_usage["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
    assert cold_ttft > 0.08
    assert warm_ttft < cold_ttft / 3
    # Non-streaming responses report the same cached tokens.
    async with http.post(r.url + "/v1/chat/completions",
                         json={**body, "stream": False}) as resp:
        usage = (await resp.json())["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16


async def test_lru_eviction_under_memory_pressure(start, http):
    # 64 blocks = 1024 tokens; three ~400-token prompts cannot all stay cached.
    r = await start(overrides={"num_kv_blocks": 64})

    async def cached(tag: str) -> int:
        async with http.post(r.url + "/v1/chat/completions",
                             json=chat_body(f"{tag} " + "lorem ipsum dolor " * 90,
                                            max_tokens=2)) as resp:
            return (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert [await cached(t) for t in ("alpha", "bravo", "charlie")] == [0, 0, 0]
    c_again = await cached("charlie")
    a_again = await cached("alpha")
    assert c_again >= 384  # most recently used: still fully cached
    assert a_again < 384  # least recently used: (partly) evicted
    snap = await stats(http, r.url)
    assert snap["engine"]["evicted_blocks"] > 0
    assert snap["engine"]["kv_blocks_total"] == 64


async def test_preemption_when_kv_is_exhausted_and_requests_complete(start, http):
    r = await start(overrides={"num_kv_blocks": 40, "max_model_len": 640})

    async def one(i: int) -> dict:
        async with http.post(r.url + "/v1/chat/completions",
                             json=chat_body(f"request {i} " + "x y z " * 60, max_tokens=200,
                                            ignore_eos=True)) as resp:
            assert resp.status == 200
            return await resp.json()

    bodies = await asyncio.gather(*(one(i) for i in range(4)))
    assert all(b["usage"]["completion_tokens"] == 200 for b in bodies)
    assert all(b["choices"][0]["finish_reason"] == "length" for b in bodies)
    m = await metrics(http, r.url)
    assert sample_value(m, "vllm:num_preemptions_total") > 0
    assert sample_value(m, "vllm:kv_cache_usage_perc") == 0.0


async def test_metrics_values_after_known_traffic(start, http):
    r = await start()
    prompts = ["first question", "second question", "first question"]
    for p in prompts:
        async with http.post(r.url + "/v1/chat/completions",
                             json=chat_body(p * 10, max_tokens=5)) as resp:
            assert resp.status == 200
    m = await metrics(http, r.url)
    labels = {"model_name": MODEL, "engine": "0"}
    prompt_lens = [len(encode_chat([{"role": "user", "content": p * 10}])) for p in prompts]
    assert sample_value(m, "vllm:prompt_tokens_total", **labels) == sum(prompt_lens)
    assert sample_value(m, "vllm:generation_tokens_total", **labels) == 15
    assert sample_value(m, "vllm:request_success_total", finished_reason="length") == 3
    assert sample_value(m, "vllm:time_to_first_token_seconds_count", **labels) == 3
    assert sample_value(m, "vllm:time_per_output_token_seconds_count", **labels) == 12
    assert sample_value(m, "vllm:prefix_cache_queries_total", **labels) == sum(prompt_lens)
    assert sample_value(m, "vllm:prefix_cache_hits_total", **labels) == \
        (prompt_lens[2] - 1) // 16 * 16
    assert sample_value(m, "vllm:num_requests_running", **labels) == 0
    assert sample_value(m, "vllm:num_requests_waiting", **labels) == 0
    assert sample_value(m, "vllm:gpu_cache_usage_perc", **labels) == 0
    assert sample_value(m, "vllm:time_to_first_token_seconds_bucket", le="+Inf") == 3
    lora = m["vllm:lora_requests_info"]
    assert lora[0][0] == {"max_lora": "4", "running_lora_adapters": "",
                          "waiting_lora_adapters": ""}


async def test_live_gauges_running_waiting_kv_and_lora(start, http):
    r = await start(overrides={"max_num_seqs": 1, "step_fixed_s": 0.01, "max_loras": 1},
                    lora_modules={"ad-a": "/adapters/a", "ad-b": "/adapters/b"})

    async def go(model: str) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": model}],
                "max_tokens": 60, "ignore_eos": True}
        async with http.post(r.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200

    tasks = [asyncio.create_task(go("ad-a"))]
    await asyncio.sleep(0.1)
    tasks.append(asyncio.create_task(go("ad-b")))
    await asyncio.sleep(0.1)
    m = await metrics(http, r.url)
    assert sample_value(m, "vllm:num_requests_running") == 1
    assert sample_value(m, "vllm:num_requests_waiting") == 1
    assert sample_value(m, "vllm:kv_cache_usage_perc") > 0
    (labels, ts), = m["vllm:lora_requests_info"]
    assert labels == {"max_lora": "1", "running_lora_adapters": "ad-a",
                      "waiting_lora_adapters": "ad-b"}
    assert abs(ts - time.time()) < 60
    await asyncio.gather(*tasks)


async def test_client_disconnect_aborts_and_frees(start, http):
    r = await start(overrides={"step_fixed_s": 0.005})
    async with http.post(r.url + "/v1/chat/completions",
                         json=chat_body("long one", max_tokens=2000, ignore_eos=True,
                                        stream=True)) as resp:
        await resp.content.readline()
    for _ in range(100):
        snap = await stats(http, r.url)
        if snap["engine"]["running"] == 0:
            break
        await asyncio.sleep(0.01)
    assert snap["engine"]["running"] == 0 and snap["engine"]["kv_cache_usage"] == 0
    assert snap["engine"]["aborted"] == 1 and snap["http"]["active"] == 0


# --- LoRA admin API ------------------------------------------------------------------------------

async def test_lora_load_unload_and_unloaded_adapter_requests(start, http):
    r = await start()

    async def post(path: str, body: dict) -> tuple[int, str]:
        async with http.post(r.url + path, json=body) as resp:
            return resp.status, await resp.text()

    async def ask(model: str) -> tuple[int, dict]:
        async with http.post(r.url + "/v1/chat/completions",
                             json={"model": model, "max_tokens": 2,
                                   "messages": [{"role": "user", "content": "hi"}]}) as resp:
            return resp.status, await resp.json()

    status, _ = await ask("sql-lora")
    assert status == 404
    status, text = await post("/v1/load_lora_adapter",
                              {"lora_name": "sql-lora", "lora_path": "/models/sql"})
    assert (status, text) == (200, "Success: LoRA adapter 'sql-lora' added successfully.")
    status, text = await post("/v1/load_lora_adapter",
                              {"lora_name": "sql-lora", "lora_path": "/models/sql"})
    assert status == 400 and "has already been loaded" in orjson.loads(text)["error"]["message"]
    status, text = await post("/v1/load_lora_adapter", {"lora_name": "x"})
    assert status == 400
    async with http.get(r.url + "/v1/models") as resp:
        cards = (await resp.json())["data"]
    assert [(c["id"], c["parent"], c["root"]) for c in cards] == [
        (MODEL, None, MODEL), ("sql-lora", MODEL, "/models/sql")]
    status, body = await ask("sql-lora")
    assert status == 200 and body["model"] == "sql-lora"
    status, text = await post("/v1/unload_lora_adapter", {"lora_name": "sql-lora"})
    assert (status, text) == (200, "Success: LoRA adapter 'sql-lora' removed successfully.")
    status, body = await ask("sql-lora")
    assert status == 404
    assert body["error"]["message"] == "The model `sql-lora` does not exist."
    status, text = await post("/v1/unload_lora_adapter", {"lora_name": "sql-lora"})
    assert status == 404 and "cannot be found" in text


async def test_lora_load_latency(start, http):
    r = await start(overrides={"lora_load_s": 0.15})
    t0 = time.perf_counter()
    async with http.post(r.url + "/v1/load_lora_adapter",
                         json={"lora_name": "a", "lora_path": "/a"}) as resp:
        assert resp.status == 200
    assert time.perf_counter() - t0 >= 0.15


# --- readiness and failure injection -------------------------------------------------------------

async def test_health_503_during_startup_delay(start, http):
    r = await start(startup_delay_s=0.3)
    async with http.get(r.url + "/health") as resp:
        assert resp.status == 503
    async with http.post(r.url + "/v1/chat/completions", json=chat_body("x")) as resp:
        assert resp.status == 503
    await asyncio.sleep(0.35)
    async with http.get(r.url + "/health") as resp:
        assert resp.status == 200
    async with http.post(r.url + "/sim/faults", json={"unhealthy": True}) as resp:
        assert (await resp.json())["unhealthy"] is True
    async with http.get(r.url + "/health") as resp:
        assert resp.status == 503


async def test_injected_errors_and_validation(start, http):
    r = await start()

    async def status_of() -> int:
        async with http.post(r.url + "/v1/chat/completions",
                             json=chat_body("x", max_tokens=1)) as resp:
            await resp.read()
            return resp.status

    async with http.post(r.url + "/sim/faults",
                         json={"fail_next": 2, "fail_next_status": 502}) as resp:
        assert resp.status == 200
    assert [await status_of() for _ in range(3)] == [502, 502, 200]
    async with http.post(r.url + "/sim/faults",
                         json={"error_rate": 1.0, "error_status": 429}) as resp:
        assert resp.status == 200
    async with http.post(r.url + "/v1/chat/completions", json=chat_body("x")) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == 429
    async with http.post(r.url + "/sim/faults", json={"error_rate": 0.5, "seed": 1}) as resp:
        assert resp.status == 200
    got = [await status_of() for _ in range(40)]
    assert 5 < got.count(429) < 35 and got.count(200) + got.count(429) == 40
    for bad in ({"nope": 1}, {"error_rate": 2}, {"error_status": 200}):
        async with http.post(r.url + "/sim/faults", json=bad) as resp:
            assert resp.status == 400
    snap = await stats(http, r.url)
    assert snap["http"]["injected_errors"] == 3 + got.count(429)
    assert snap["http"]["by_path"]["/v1/chat/completions"] == 44


async def test_reset_mid_stream_and_dropped_connection(start, http):
    r = await start(faults={"reset_after_chunks": 3, "reset_count": 1})
    seen = 0
    with pytest.raises(aiohttp.ClientError):
        async with http.post(r.url + "/v1/chat/completions",
                             json=chat_body("x", max_tokens=20, stream=True)) as resp:
            assert resp.status == 200
            async for line in resp.content:
                seen += line.startswith(b"data: ")
    assert seen == 3
    _, events = await stream_chat(http, r.url, chat_body("x", max_tokens=4))
    assert events[-1] == "[DONE]"  # only the next stream was cut
    async with http.post(r.url + "/sim/faults", json={"drop_next": 1}) as resp:
        assert resp.status == 200
    with pytest.raises(aiohttp.ClientError):
        async with http.post(r.url + "/v1/chat/completions", json=chat_body("x")) as resp:
            await resp.read()
    snap = await stats(http, r.url)
    assert snap["http"]["resets"] == 1 and snap["http"]["dropped"] == 1
    assert snap["engine"]["running"] == 0 and snap["engine"]["kv_cache_usage"] == 0


async def test_extra_latency_delays_first_token(start, http):
    r = await start(faults={"extra_latency_s": 0.2})
    ttft, _ = await stream_chat(http, r.url, chat_body("x", max_tokens=2))
    assert ttft >= 0.2


async def test_several_replicas_in_one_process_are_independent(http):
    cluster = await start_replicas(3, "fast", MODEL)
    try:
        assert len(set(cluster.urls)) == 3
        body = chat_body("shared prompt " * 30, max_tokens=2)
        for url in (cluster.urls[0], cluster.urls[0], cluster.urls[1]):
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
        hits = [s["engine"]["prefix_cache_hits"] for s in cluster.snapshots()]
        assert hits[0] > 0 and hits[1] == 0 and hits[2] == 0
        port = cluster[0].port
        await cluster.restart()  # same ports, cold caches
        assert cluster[0].port == port
        assert cluster.snapshots()[0]["engine"]["prefix_cache_queries"] == 0
        async with http.get(cluster.urls[0] + "/health") as resp:
            assert resp.status == 200
    finally:
        await cluster.stop()


async def test_multi_turn_replay_reuses_history_including_replies(start, http):
    from bench.workloads import multi_turn_threads

    r = await start()
    thread = multi_turn_threads(1, seed=9).threads[0]
    conv = thread.conversation()
    prev_total = None
    for _ in range(3):
        messages = conv.next_messages()
        body = {"model": MODEL, "messages": messages, "max_tokens": thread.max_tokens,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        _, events = await stream_chat(http, r.url, body)
        reply = "".join(e["choices"][0]["delta"].get("content") or ""
                        for e in events[:-1] if e.get("choices"))
        usage = events[-2]["usage"]
        if prev_total is not None:
            # Everything computed last turn (prompt + reply but the last sampled token), in
            # full blocks, is a cache hit now.
            assert usage["prompt_tokens_details"]["cached_tokens"] == (prev_total - 1) // 16 * 16
        prev_total = usage["prompt_tokens"] + usage["completion_tokens"]
        conv.add_reply(reply)
