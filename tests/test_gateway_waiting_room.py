"""The waiting room: requests for a model without a ready replica wait, and leave when a replica
appears, when their deadline passes, when the room is full, or when the client goes away."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import aiohttp
import openai
import pytest

MESSAGES = [{"role": "user", "content": "hello"}]


class RecordingScaler:
    """A Scaler that only records what it was asked (the control plane is not under test)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def ensure_replica(self, model: str) -> None:
        self.asked.append(model)


def waiting(gw, model: str) -> int:
    return gw.on_loop(gw.balancer.waiting, model)


def test_requests_wait_for_a_replica_and_complete_when_one_appears(gw):
    gw.add_model("m")
    backend = gw.backend("late")
    client = gw.client()
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(client.chat.completions.create, model="m", messages=MESSAGES)
                   for _ in range(5)]
        gw.wait_for(lambda: gw.balancer.waiting("m") == 5, what="five waiters")
        time.sleep(0.2)
        assert not any(f.done() for f in futures)
        assert gw.metric("kvgate_waiting_requests", model="m") == 5
        gw.set_endpoints("m", [backend])
        results = [f.result(10) for f in futures]
    assert {r.system_fingerprint for r in results} == {"late"}
    assert backend.total_calls == 5
    assert gw.metric("kvgate_waiting_requests", model="m") == 0
    assert gw.metric("kvgate_waiting_seconds_count", model="m") == 5
    assert gw.metric("kvgate_waiting_seconds_sum", model="m") >= 5 * 0.2
    gw.settle()


async def test_waiters_across_both_prefixes_and_kinds(gw):
    """Async clients: chat, completions and embeddings waiting on the same cold model."""
    gw.add_model("m", features=["TextGeneration", "TextEmbedding"])
    backend = gw.backend("late")
    async with gw.async_client() as c1, gw.async_client("/openai/v1") as c2:
        tasks = [asyncio.ensure_future(c1.chat.completions.create(model="m", messages=MESSAGES)),
                 asyncio.ensure_future(c2.completions.create(model="m", prompt="p")),
                 asyncio.ensure_future(c2.embeddings.create(model="m", input="e"))]
        await gw.await_for(lambda: gw.balancer.waiting("m") == 3, what="three waiters")
        await gw.loop.acall(gw.registry.set_endpoints, "m", [backend.endpoint()])
        chat, completion, embedding = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert chat.choices[0].message.content == "hello from late"
    assert completion.choices[0].text == "hello from late"
    assert embedding.data[0].embedding == [1.0, 0.0, 0.5]
    await gw.asettle()


def test_scale_from_zero_asks_the_scaler_once(gw):
    """A stand-in control plane: asked for a replica, it 'starts' one 0.3 s later by writing
    the endpoint into the registry. Three waiters share one scale-up call."""
    gw.add_model("m")
    backend = gw.backend("started")
    scaler = RecordingScaler()

    async def ensure_replica(model: str) -> None:
        scaler.asked.append(model)
        await asyncio.sleep(0.3)
        gw.registry.set_endpoints(model, [backend.endpoint()])

    scaler.ensure_replica = ensure_replica
    gw.on_loop(setattr, gw.balancer, "_scaler", scaler)
    client = gw.client()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.chat.completions.create, model="m", messages=MESSAGES)
                   for _ in range(3)]
        results = [f.result(10) for f in futures]
    assert {r.system_fingerprint for r in results} == {"started"}
    assert scaler.asked == ["m"]
    gw.settle()


def test_adapter_appearing_later_releases_waiters(gw):
    plain = gw.backend("plain")
    gw.add_model("m", adapters=["lora"])
    gw.set_endpoints("m", [plain.endpoint()])
    client = gw.client()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.chat.completions.create, model="m_lora",
                               messages=MESSAGES) for _ in range(3)]
        gw.wait_for(lambda: gw.balancer.waiting("m") == 3, what="three adapter waiters")
        # Base-model requests are served meanwhile.
        assert client.chat.completions.create(model="m", messages=MESSAGES).model == "m"
        # An unrelated endpoint change wakes the waiters; they re-check and keep waiting.
        other = gw.backend("other")
        gw.set_endpoints("m", [plain.endpoint(), other.endpoint()])
        time.sleep(0.1)
        assert waiting(gw, "m") == 3 and not any(f.done() for f in futures)
        # The adapter is loaded into the existing replica: the waiters go there.
        gw.set_endpoints("m", [plain.endpoint("lora"), other.endpoint()])
        results = [f.result(10) for f in futures]
    assert {r.system_fingerprint for r in results} == {"plain"}
    assert {r.model for r in results} == {"m_lora"}  # the answer names the model as requested
    assert [s.json["model"] for s in plain.seen] == ["m", "lora", "lora", "lora"]
    assert other.total_calls == 0
    gw.settle()


def test_full_room_gives_429_with_retry_after(make_gateway):
    gw = make_gateway({"queue": {"maxQueuedPerModel": 2, "retryAfterSeconds": 3}})
    gw.add_model("m")
    gw.add_model("other")
    client = gw.client()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.chat.completions.create, model="m", messages=MESSAGES)
                   for _ in range(2)]
        gw.wait_for(lambda: gw.balancer.waiting("m") == 2, what="a full room")
        status, headers, body = gw.post_json("/v1/chat/completions",
                                             {"model": "m", "messages": MESSAGES})
        assert status == 429
        assert headers["retry-after"] == "3"
        error = json.loads(body)["error"]
        assert error["code"] == "queue_full" and "`m`" in error["message"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=MESSAGES)
        # The bound is per model: another cold model still has room.
        other = pool.submit(client.chat.completions.create, model="other", messages=MESSAGES)
        gw.wait_for(lambda: gw.balancer.waiting("other") == 1, what="a waiter for `other`")
        backend = gw.backend("b")
        gw.set_endpoints("m", [backend])
        gw.set_endpoints("other", [backend])
        assert all(f.result(10).system_fingerprint == "b" for f in [*futures, other])
    assert gw.metric("kvgate_queue_rejected_total", model="m", priority="default", reason="full") == 2
    assert gw.metric("kvgate_requests_total", model="m", code="429") == 2
    gw.settle()


def test_zero_sized_room_rejects_at_once(make_gateway):
    gw = make_gateway({"queue": {"maxQueuedPerModel": 0}})
    gw.add_model("m")
    with pytest.raises(openai.RateLimitError):
        gw.client().chat.completions.create(model="m", messages=MESSAGES)


def test_deadline_gives_503_with_a_clear_message(make_gateway):
    gw = make_gateway({"queue": {"timeoutSeconds": 0.4}})
    gw.add_model("m", adapters=["lora"])
    began = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        gw.client().chat.completions.create(model="m", messages=MESSAGES)
    elapsed = time.monotonic() - began
    assert 0.35 < elapsed < 2
    assert info.value.status_code == 503
    error = info.value.response.json()["error"]
    assert error["code"] == "no_replica_ready"
    assert error["message"] == "No ready replica of model `m` became available within 0.4s."
    # With an adapter, the message names it.
    backend = gw.backend("plain")
    gw.set_endpoints("m", [backend])
    status, _, body = gw.post_json("/v1/chat/completions", {"model": "m_lora",
                                                            "messages": MESSAGES})
    assert status == 503
    assert "with adapter `lora`" in json.loads(body)["error"]["message"]
    assert backend.total_calls == 0
    gw.settle()


def test_deleted_model_ends_its_waiters_with_404(gw):
    gw.add_model("m")
    client = gw.client()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.chat.completions.create, model="m", messages=MESSAGES)
        gw.wait_for(lambda: gw.balancer.waiting("m") == 1, what="a waiter")
        gw.on_loop(gw.registry.delete_model, "m")
        with pytest.raises(openai.NotFoundError):
            future.result(10)
    gw.settle()


async def test_client_disconnect_while_waiting_leaves_the_room(gw):
    gw.add_model("m")
    async with aiohttp.ClientSession() as session:
        async def wait_for_model() -> None:
            async with session.post(f"{gw.url}/v1/chat/completions",
                                    json={"model": "m", "messages": MESSAGES}):
                pass

        tasks = [asyncio.ensure_future(wait_for_model()) for _ in range(4)]
        await gw.await_for(lambda: gw.balancer.waiting("m") == 4, what="four waiters")
        assert gw.metric("kvgate_waiting_requests", model="m") == 4
        for task in tasks[:3]:
            task.cancel()  # closes their connections
        await gw.await_for(lambda: gw.balancer.waiting("m") == 1, timeout=2,
                           what="three waiters to leave")
        assert gw.metric("kvgate_waiting_requests", model="m") == 1
        tasks[3].cancel()
        await gw.await_for(lambda: gw.balancer.waiting("m") == 0, timeout=2,
                           what="the last waiter to leave")
        await asyncio.gather(*tasks, return_exceptions=True)
    assert gw.metric("kvgate_waiting_requests", model="m") == 0
    assert gw.metric("kvgate_requests_total", model="m", code="499") == 4
    # Nothing is left behind: a replica appearing now serves only new requests.
    backend = gw.backend("late")
    gw.set_endpoints("m", [backend])
    async with gw.async_client() as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    assert backend.total_calls == 1
    await gw.asettle()


def test_replica_removed_then_back(gw):
    """Endpoints going to zero sends new requests to the room; old ones finish normally."""
    backend = gw.backend("b", chunks=3, chunk_delay=0.1)
    gw.model_with("m", [backend])
    client = gw.client()
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    iterator = iter(stream)
    next(iterator)
    gw.set_endpoints("m", [])  # the replica goes away while a stream is running
    assert len(list(iterator)) == 2  # the running stream is not cut
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.chat.completions.create, model="m", messages=MESSAGES)
        gw.wait_for(lambda: gw.balancer.waiting("m") == 1, what="a waiter")
        gw.set_endpoints("m", [backend])
        assert future.result(10).system_fingerprint == "b"
    gw.settle()


def test_failing_scaler_is_logged_and_the_request_keeps_waiting(make_gateway):
    """Scaler errors are the control plane's problem: logged, while the request waits on."""
    from tests.gateway_harness import ERRORS

    gw = make_gateway({"queue": {"timeoutSeconds": 5}})
    gw.allow_errors("scaling model m from zero failed")
    backend = gw.backend("late")

    async def ensure_replica(model: str) -> None:
        raise RuntimeError("the cluster said no")

    scaler = RecordingScaler()
    scaler.ensure_replica = ensure_replica
    gw.on_loop(setattr, gw.balancer, "_scaler", scaler)
    gw.add_model("m")
    client = gw.client()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.chat.completions.create, model="m", messages=MESSAGES)
        gw.wait_for(lambda: gw.balancer.waiting("m") == 1, what="a waiter")
        deadline = time.monotonic() + 5
        while not any("the cluster said no" in r.getMessage() for r in ERRORS.records):
            assert time.monotonic() < deadline, "the scaler failure was not logged"
            time.sleep(0.01)
        assert not future.done()
        gw.set_endpoints("m", [backend])
        assert future.result(10).system_fingerprint == "late"
    gw.settle()
