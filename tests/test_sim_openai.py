"""The official `openai` SDK (sync and async, streaming and not) accepts the simulator's output."""

import asyncio

import openai
import pytest

from kvgate_sim import Replica, get_profile

MODEL = "sim-llama"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours, please."}]


@pytest.fixture
async def replica():
    r = Replica(get_profile("fast"), MODEL, lora_modules={"tuned": "/adapters/tuned"})
    await r.start()
    yield r
    await r.stop()


def sync_calls(base_url: str) -> dict:
    """Everything the sync client does; runs in a worker thread so the server loop keeps going."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    out = {}
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6)
    out["chat"] = resp
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True})
    out["chat_stream"] = list(stream)
    out["completion"] = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4)
    out["completion_stream"] = list(client.completions.create(
        model=MODEL, prompt="Once upon", max_tokens=4, stream=True))
    out["models"] = [m.id for m in client.models.list()]
    out["embedding"] = client.embeddings.create(model=MODEL, input=["a", "b"])
    try:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    except openai.NotFoundError as exc:
        out["not_found"] = exc
    client.close()
    return out


async def test_sync_client(replica):
    out = await asyncio.to_thread(sync_calls, replica.url + "/v1")
    chat = out["chat"]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 6
    assert chat.usage.prompt_tokens_details.cached_tokens == 0

    chunks = out["chat_stream"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) == 6 * 4  # six 4-character filler tokens
    assert text == chat.choices[0].message.content  # same prompt, same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 6
    assert usage.prompt_tokens_details.cached_tokens > 0  # second time this prompt was seen

    assert out["completion"].choices[0].text and out["completion"].usage.completion_tokens == 4
    assert "".join(c.choices[0].text for c in out["completion_stream"]) == \
        out["completion"].choices[0].text
    assert out["models"] == [MODEL, "tuned"]
    emb = out["embedding"].data  # the SDK asks for base64 and decodes it
    assert len(emb) == 2 and len(emb[0].embedding) == 384
    assert out["not_found"].status_code == 404
    assert "does not exist" in str(out["not_found"])


async def test_async_client(replica):
    client = openai.AsyncOpenAI(base_url=replica.url + "/v1", api_key="unused", max_retries=0)
    try:
        resp = await client.chat.completions.create(model="tuned", messages=MESSAGES,
                                                    max_completion_tokens=5)
        assert resp.model == "tuned" and resp.usage.completion_tokens == 5

        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                      max_tokens=5, stream=True)
        deltas = [c.choices[0].delta async for c in stream]
        assert deltas[0].role == "assistant"
        assert sum(1 for d in deltas if d.content) == 5

        async def one(i: int) -> int:
            s = await client.chat.completions.create(
                model=MODEL, stream=True, max_tokens=8,
                messages=[{"role": "user", "content": f"parallel {i}"}])
            n = 0
            async for c in s:
                n += bool(c.choices and c.choices[0].delta.content)
            return n

        assert await asyncio.gather(*(one(i) for i in range(20))) == [8] * 20

        comp = await client.completions.create(model=MODEL, prompt="abc", max_tokens=3,
                                               stream=True,
                                               stream_options={"include_usage": True})
        items = [c async for c in comp]
        assert items[-1].usage.completion_tokens == 3
    finally:
        await client.close()
