"""The routing study's oracle (sim/oracle.py), for real over HTTP with the openai SDK as client:
it sends a prompt to the replica whose KV cache holds its prefix, spreads cold prompts by the
replicas' queues, forwards streams untouched, and answers like a replica for bad input."""

from __future__ import annotations

import asyncio

import openai
import pytest

from kvgate_sim import SimCluster, get_profile
from kvgate_sim.oracle import Oracle

MODEL = "sim-llama"
# ~2,000 tokens: long enough that holding it decides the estimate.
SYSTEM = "You answer from the shared manual, section by section, citing it. " * 120


@pytest.fixture
async def routed():
    # Prefill slow enough (0.1 ms a token) that a cold long prompt stays queued for a while.
    profile = get_profile("fast", prefill_token_s=1.0e-4, max_num_batched_tokens=2048)
    cluster = await SimCluster(4, profile, MODEL).start()
    oracle = await Oracle(cluster).start()
    yield cluster, oracle
    await oracle.stop()
    await cluster.stop()


def client_for(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                              timeout=60.0)


async def test_the_replica_holding_the_prefix_gets_the_request(routed) -> None:
    cluster, oracle = routed
    warm = client_for(cluster[2].url)  # replica 2 alone has the manual cached
    await warm.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "First question."}])
    client = client_for(f"http://127.0.0.1:{oracle.port}")
    for i in range(3):
        reply = await client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}])
        assert reply.usage.prompt_tokens_details.cached_tokens >= 1900, reply.usage
    assert oracle.picks == [0, 0, 3, 0]
    await warm.close()
    await client.close()


async def test_cold_prompts_spread_over_the_queues(routed) -> None:
    cluster, oracle = routed
    client = client_for(f"http://127.0.0.1:{oracle.port}")
    await asyncio.gather(*(client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "user", "content": f"Topic {i}: " + "unrelated words here " * 300}])
        for i in range(4)))
    assert sorted(oracle.picks) == [1, 1, 1, 1], oracle.picks
    # each replica's engine really served one (the counts are not just the oracle's own)
    assert [sum(r.server.engine.stats.requests_finished.values()) for r in cluster] == [1] * 4
    await client.close()


async def test_streams_are_forwarded_whole(routed) -> None:
    cluster, oracle = routed
    client = client_for(f"http://127.0.0.1:{oracle.port}")
    direct = client_for(cluster[0].url)
    messages = [{"role": "user", "content": "Name three colours."}]
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = await direct.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert text == expected.choices[0].message.content  # the same tokens, every one forwarded
    assert chunks[-1].usage.completion_tokens == 6
    completion = await client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4)
    assert completion.usage.completion_tokens == 4
    await client.close()
    await direct.close()


async def test_bad_input_gets_the_replicas_openai_error(routed) -> None:
    _cluster, oracle = routed
    client = client_for(f"http://127.0.0.1:{oracle.port}")
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert "messages" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", max_tokens=2,
                                             messages=[{"role": "user", "content": "hi"}])
    await client.close()
