"""Streaming through the gateway: chunks are relayed as they come, a client that leaves cancels
the upstream request, an upstream that dies ends the client's stream cleanly."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

MESSAGES = [{"role": "user", "content": "stream please"}]


def test_first_chunk_arrives_before_backend_finishes(gw):
    backend = gw.backend("slow", chunks=6, chunk_delay=0.2)
    gw.model_with("m", [backend])
    client = gw.client()
    began = time.monotonic()
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    arrivals = []
    for chunk in stream:
        arrivals.append(time.monotonic())
    assert len(arrivals) == 6
    sent = backend.chunk_times
    assert len(sent) == 6
    # The first chunk is in the client's hands about when the backend wrote it, a second
    # before the backend wrote its last one: nothing was buffered.
    assert arrivals[0] - began < 0.6
    assert arrivals[0] < sent[-1] - 0.6
    for received, written in zip(arrivals, sent):
        assert 0 <= received - written < 0.3  # relayed as written (chunks are 0.2 s apart)
    assert gw.metric("kvgate_requests_total", model="m", kind="chat", code="200") == 1


async def test_first_chunk_async_raw_sse(gw):
    """The same with a raw HTTP client: SSE bytes pass through unchanged, chunk by chunk."""
    backend = gw.backend("slow", chunks=4, chunk_delay=0.25)
    gw.model_with("m", [backend])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/v1/completions",
                                json={"model": "m", "prompt": "p", "stream": True}) as response:
            assert response.status == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert response.headers["x-backend"] == "slow"
            first = await response.content.readuntil(b"\n\n")
            first_at = time.monotonic()
            rest = await response.read()
    assert json.loads(first.removeprefix(b"data: "))["choices"][0]["text"] == "tok0 "
    assert first_at < backend.chunk_times[-1] - 0.5
    assert rest.endswith(b"data: [DONE]\n\n")
    assert rest.count(b"data: ") == 4  # three more chunks and [DONE]


def test_client_disconnect_cancels_backend_request(gw):
    backend = gw.backend("slow", chunks=100, chunk_delay=0.1)
    gw.model_with("m", [backend])
    client = gw.client()
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    iterator = iter(stream)
    next(iterator), next(iterator)
    closed_at = time.monotonic()
    stream.close()  # the client goes away mid-stream
    gw.wait_for(lambda: backend.cancelled == 1, timeout=3, what="the backend to see the close")
    assert backend.cancel_times[0] - closed_at < 0.5
    assert len(backend.chunk_times) < 10
    assert backend.completed == 0
    gw.settle()
    assert gw.metric("kvgate_requests_total", model="m", code="499") == 1


async def test_client_disconnect_before_headers_cancels_backend(gw):
    """A client that gives up while the backend is still thinking (no byte sent yet)."""
    backend = gw.backend("thinker", header_delay=30)
    gw.model_with("m", [backend])
    async with gw.async_client(timeout=0.5) as client:
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
    await gw.await_for(lambda: backend.cancelled == 1, timeout=3, what="backend cancellation")
    await gw.asettle()


async def test_client_disconnect_cancels_hanging_backend(gw):
    backend = gw.backend("hang", hang=True)
    gw.model_with("m", [backend])
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.post(
            f"{gw.url}/v1/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True}))
        await gw.await_for(lambda: backend.in_flight == 1, what="the backend to get it")
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    await gw.await_for(lambda: backend.cancelled == 1, timeout=3, what="backend cancellation")
    await gw.asettle()


def test_backend_dying_mid_stream_ends_client_stream(gw):
    backend = gw.backend("fragile", chunks=10, chunk_delay=0.05, die_after=3)
    spare = gw.backend("spare")
    gw.model_with("m", [backend, spare], strategy="PrefixHash")
    # Aim the request at the fragile replica.
    prefix = gw.prefix_for("m", "fragile")
    client = gw.client()
    began = time.monotonic()
    stream = client.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": prefix}])
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert time.monotonic() - began < 3
    assert received == ["tok0 ", "tok1 ", "tok2 "]
    assert "closed the stream" in info.value.message
    assert info.value.body["code"] == "upstream_closed"
    assert spare.total_calls == 0  # bytes went out: never retried
    gw.settle()
    assert gw.metric("kvgate_requests_total", model="m", code="502") == 1


async def test_backend_dying_mid_stream_raw(gw):
    """Raw view of the same: the relayed bytes, one SSE error event, then a clean end."""
    backend = gw.backend("fragile", chunks=5, die_after=2)
    gw.model_with("m", [backend])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/v1/chat/completions",
                                json={"model": "m", "messages": MESSAGES, "stream": True},
                                timeout=aiohttp.ClientTimeout(total=5)) as response:
            assert response.status == 200
            body = await response.read()  # completes: the chunked body is terminated properly
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 3
    error = json.loads(events[-1].removeprefix(b"data: "))
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert b"[DONE]" not in body


async def test_backend_dying_mid_json_body_drops_connection(gw):
    """A non-SSE body cut short is not passed off as complete: the client's read fails."""
    backend = gw.backend("fragile", truncate=True)
    # The gateway drops the client connection by returning mid-response; uvicorn logs that.
    gw.allow_errors("ASGI callable returned without completing response")
    gw.model_with("m", [backend])
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/v1/chat/completions",
                                json={"model": "m", "messages": MESSAGES},
                                timeout=aiohttp.ClientTimeout(total=5)) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    assert backend.total_calls == 1
    await gw.asettle()
    assert gw.metric("kvgate_requests_total", model="m", code="502") == 1


def test_upstream_silence_mid_stream_ends_the_stream(make_gateway):
    """A model server that stops sending mid-stream for longer than the read timeout: the
    client gets what was sent, then an error event, and the upstream request is abandoned."""
    gw = make_gateway({"upstream": {"readTimeoutSeconds": 0.3}})
    backend = gw.backend("stalls", chunks=3, chunk_delay=2.0)
    gw.model_with("m", [backend])
    began = time.monotonic()
    stream = gw.client().chat.completions.create(model="m", messages=MESSAGES, stream=True)
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["tok0 "]
    assert time.monotonic() - began < 1.5
    gw.wait_for(lambda: backend.cancelled == 1, timeout=3, what="the upstream to be dropped")
    gw.settle()


async def test_chunked_request_body_is_forwarded(gw):
    """A request body sent with Transfer-Encoding: chunked is read whole and forwarded with
    its length; the model server gets the same JSON."""
    backend = gw.backend("b")
    gw.model_with("m", [backend])
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 50000}],
                          "stream": True}).encode()

    async def body():
        for i in range(0, len(payload), 7000):
            yield payload[i:i + 7000]
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/v1/chat/completions", data=body(),
                                headers={"content-type": "application/json"}) as response:
            assert response.status == 200
            assert (await response.read()).endswith(b"data: [DONE]\n\n")
    assert backend.last.body == payload
    assert backend.last.headers["Content-Length"] == str(len(payload))
    assert "Transfer-Encoding" not in backend.last.headers
    await gw.asettle()


def test_disconnect_is_noticed_under_any_asgi_server(gw):
    """Without kvgate's own server (no disconnect hook in the scope), the proxy watches
    ``receive`` for ``http.disconnect`` and still cancels the backend request."""
    backend = gw.backend("slow", chunks=100, chunk_delay=0.1)
    gw.model_with("m", [backend])
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    sent: list[dict] = []

    async def scenario() -> None:
        messages: asyncio.Queue[dict] = asyncio.Queue()
        messages.put_nowait({"type": "http.request", "body": body, "more_body": False})

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": [(b"content-type", b"application/json")], "query_string": b""}
        handler = asyncio.ensure_future(gw.gateway(scope, messages.get, send))
        while len(sent) < 3:  # the head and two chunks: the stream is flowing
            await asyncio.sleep(0.01)
        messages.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(handler, 3)

    gw.run(scenario())
    gw.wait_for(lambda: backend.cancelled == 1, timeout=3, what="the backend to see the close")
    assert not any(m.get("more_body") is False for m in sent)  # the stream was not finished
    gw.settle()
    assert gw.metric("kvgate_requests_total", model="m", code="499") == 1
