"""KV events over real ZeroMQ sockets: the simulator publishes in vLLM's wire format, the
gateway's follower mirrors each replica's prefix cache, fills gaps from the replay socket, and
says when its mirror cannot be trusted.

The mirror is compared with what the simulator really holds (`GET /sim/cache`); vLLM's own
struct declarations are restated here to check the bytes on both sides.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Optional, Union

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from kvgate_sim import Replica, get_profile
from kvgate_sim.kv_events import KVEventsConfig
from lb import prompt_tokens
from lb.kv_events import Follower, ReplicaIndex, Target, decode_batch
from lb.parse import parse_request

MODEL = "sim-kv"


# -- vLLM's declarations (vllm/distributed/kv_events.py), as released: array-like, tagged ---------

class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False,  # type: ignore[call-arg]
                   tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: Optional[int]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: Optional[str]


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[Union[BlockStored, BlockRemoved, AllBlocksCleared]]


# -- newer vLLM: the same events as maps, with more fields ---------------------------------------

class NewKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    pass


class NewBlockStored(NewKVCacheEvent, tag="BlockStored"):
    block_hashes: list[Union[int, bytes]]
    parent_block_hash: Union[int, bytes, None]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]
    extra_keys: Optional[list[Optional[tuple[Any, ...]]]] = None
    group_idx: Optional[int] = None


class NewBlockRemoved(NewKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[Union[int, bytes]]
    medium: Optional[str]
    group_idx: Optional[int] = None


class NewAllBlocksCleared(NewKVCacheEvent, tag="AllBlocksCleared"):
    pass


class NewKVEventBatch(msgspec.Struct, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Union[NewBlockStored, NewBlockRemoved, NewAllBlocksCleared]]
    data_parallel_rank: Optional[int] = None


def applied(*payloads: bytes) -> ReplicaIndex:
    replica = ReplicaIndex("r")
    for seq, payload in enumerate(payloads):
        replica.accept(seq, payload)
    return replica


def test_decodes_batches_encoded_with_vllms_structs() -> None:
    encode = msgspec.msgpack.encode
    first = encode(KVEventBatch(ts=1.0, events=[
        BlockStored([11, 12, 13], None, list(range(48)), 16, None, "GPU"),
        BlockStored([21], 13, list(range(16)), 16, 3, None),
        BlockStored([99], None, list(range(16)), 16, None, "CPU"),  # offloaded: no prefix hit
    ], data_parallel_rank=0))
    second = encode(KVEventBatch(ts=2.0, events=[BlockRemoved([12, 21], "GPU"),
                                                 BlockRemoved([11], "CPU")]))
    replica = applied(first, second)
    assert replica.blocks == {11, 13} and replica.trusted and replica.block_size == 16
    assert applied(first, second, encode(KVEventBatch(ts=3.0, events=[AllBlocksCleared()]))
                   ).blocks == set()
    # the wire form really is an array with the tag first
    assert msgspec.msgpack.decode(second)[1][0] == ["BlockRemoved", [12, 21], "GPU"]


def test_decodes_newer_vllms_map_encoding() -> None:
    payload = msgspec.msgpack.encode(NewKVEventBatch(ts=1.0, events=[
        NewBlockStored([1, b"\x01\x02"], None, [5] * 32, 16, None, "GPU", "sql", [None, None]),
        NewBlockRemoved([1], "GPU", 0), NewBlockStored([7], None, [1] * 16, 16, None, None,
                                                         None)]))
    assert applied(payload).blocks == {b"\x01\x02", 7}


def test_decodes_vllm_032s_array_batch_of_map_events() -> None:
    """What vLLM 0.32 (CPU build) really sends, seen in tests/engines/test_vllm.py: the batch
    is array-like, its events are maps tagged by `type` with extra keys; the two encodings
    above still decode after it (the decoder that last worked is only tried first)."""
    class Batch(msgspec.Struct, array_like=True, omit_defaults=True):  # type: ignore[call-arg]
        ts: float
        events: list[Union[NewBlockStored, NewBlockRemoved, NewAllBlocksCleared]]
        data_parallel_rank: Optional[int] = None

    payload = msgspec.msgpack.encode(Batch(1.0, [
        NewBlockStored([3, 4], None, [1] * 32, 16, None, "GPU", None, [None, None]),
        NewBlockRemoved([3], "GPU", 0)]))
    wire = msgspec.msgpack.decode(payload)
    assert isinstance(wire, list) and wire[1][0]["type"] == "BlockStored"
    assert applied(payload).blocks == {4}
    test_decodes_batches_encoded_with_vllms_structs()
    test_decodes_newer_vllms_map_encoding()
    assert applied(payload).blocks == {4}


def test_older_batches_without_medium_and_garbage() -> None:
    class OldStored(msgspec.Struct, array_like=True, tag="BlockStored"):  # type: ignore[call-arg]
        block_hashes: list[int]
        parent_block_hash: Optional[int]
        token_ids: list[int]
        block_size: int
        lora_id: Optional[int]

    class OldBatch(msgspec.Struct, array_like=True):  # type: ignore[call-arg]
        ts: float
        events: list[OldStored]

    old = msgspec.msgpack.encode(OldBatch(1.0, [OldStored([4, 5], None, [0] * 32, 16, None)]))
    assert decode_batch(old)[0].block_hashes == [4, 5]
    replica = applied(old, b"\xc1 not msgpack")
    assert replica.blocks == set() and not replica.trusted and replica.decode_errors == 1


# -- the simulator's publisher and the follower, in process ---------------------------------------

@pytest.fixture
async def start():
    """Factory: a simulated replica with KV events on ephemeral ports; stopped after the test."""
    replicas: list[Replica] = []

    async def _start(kv_blocks: int = 8192, **config: Any) -> Replica:
        events = KVEventsConfig(**{"enable_kv_cache_events": True, "publisher": "zmq",
                                   "endpoint": "tcp://127.0.0.1:*",
                                   "replay_endpoint": "tcp://127.0.0.1:*",
                                   "topic": "kv-events", **config})
        replica = Replica(get_profile("fast", num_kv_blocks=kv_blocks), MODEL, kv_events=events)
        await replica.start()
        replicas.append(replica)
        return replica

    yield _start
    for replica in replicas:
        await replica.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def target_of(replica: Replica) -> Target:
    events = replica.server.kv_events
    return Target("127.0.0.1", int(events.endpoint.rsplit(":", 1)[1]),
                  int(events.replay_endpoint.rsplit(":", 1)[1]), "kv-events")


async def cache_of(http: aiohttp.ClientSession, replica: Replica) -> set[int]:
    async with http.get(replica.url + "/sim/cache") as response:
        assert response.status == 200
        return set((await response.json())["block_hashes"])


async def chat(http: aiohttp.ClientSession, replica: Replica, text: str,
               model: str = MODEL) -> dict:
    body = {"model": model, "max_tokens": 3,
            "messages": [{"role": "system", "content": "You are terse. " * 20},
                         {"role": "user", "content": text}]}
    async with http.post(replica.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def batches(replica: Replica, start: int = 0) -> list[tuple[int, bytes]]:
    """Everything the replica's replay socket holds from `start`, as a client of vLLM's
    replay protocol sees it ([b"", seq, payload] ... then the end marker)."""
    ctx = zmq.asyncio.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(replica.server.kv_events.replay_endpoint)
    out = []
    try:
        await dealer.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            assert await dealer.poll(10_000), "no replay answer"
            empty, seq, payload = await dealer.recv_multipart()
            assert empty == b""
            if not payload:
                assert int.from_bytes(seq, "big", signed=True) == -1
                return out
            out.append((int.from_bytes(seq, "big"), payload))
    finally:
        dealer.close()


async def until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_simulator_batches_are_vllms_bytes_and_the_gateways_hashes(start, http) -> None:
    replica = await start()
    reply = await chat(http, replica, "What is the capital of France? " * 5)
    sent = await batches(replica)
    assert [seq for seq, _ in sent] == list(range(len(sent))) and sent
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    stored = [e for _, p in sent for e in decoder.decode(p).events if isinstance(e, BlockStored)]
    # the gateway computes the same tokens and hashes for the request it would route
    body = {"model": MODEL, "messages": [{"role": "system", "content": "You are terse. " * 20},
                                          {"role": "user",
                                           "content": "What is the capital of France? " * 5}]}
    parsed = parse_request("chat", msgspec.json.encode(body), b"application/json")
    tokens = prompt_tokens.SIM.token_ids(parsed)
    hashes = prompt_tokens.SIM.block_hashes(tokens)
    assert len(tokens) == reply["usage"]["prompt_tokens"]
    assert stored[0].parent_block_hash is None and stored[0].block_size == 16
    assert stored[0].medium == "GPU" and stored[0].lora_id is None
    assert [h for e in stored for h in e.block_hashes][:len(hashes)] == hashes
    assert [t for e in stored for t in e.token_ids][:len(hashes) * 16] == tokens[:len(hashes) * 16]
    assert set(hashes) <= await cache_of(http, replica)
    # and re-encoding the decoded batch gives the same bytes: nothing vLLM-foreign on the wire
    assert all(msgspec.msgpack.encode(decoder.decode(p)) == p for _, p in sent)


async def test_a_dropped_range_is_replayed(start, http) -> None:
    replica = await start(kv_blocks=40)  # small: evictions, so BlockRemoved flows too
    for i in range(12):
        await chat(http, replica, f"question {i} " * 30)
    sent = await batches(replica)
    assert len(sent) >= 8
    assert replica.snapshot()["engine"]["evicted_blocks"] > 0
    mirror = ReplicaIndex("r")
    follower = Follower(mirror, target_of(replica), zmq.asyncio.Context.instance())
    for seq, payload in sent[:2]:
        await follower.on_batch(seq, payload)
    last_seq, last = sent[-1]
    await follower.on_batch(last_seq, last)  # 2 .. last-1 never arrived live
    assert mirror.last_seq == last_seq and mirror.losses == 0
    assert mirror.trusted and mirror.blocks == await cache_of(http, replica)
    # the replayed batches may come again live (they waited in the socket): ignored
    await follower.on_batch(*sent[3])
    assert mirror.last_seq == last_seq and mirror.restarts == 0


async def test_a_range_past_the_buffer_leaves_the_mirror_untrusted_until_a_reset(start,
                                                                                http) -> None:
    replica = await start(kv_blocks=40, buffer_steps=3)
    for i in range(10):
        await chat(http, replica, f"topic {i} " * 30)
    sent = await batches(replica)
    assert len(sent) == 3 and sent[0][0] > 1  # the buffer moved on
    mirror = ReplicaIndex("r")
    follower = Follower(mirror, target_of(replica), zmq.asyncio.Context.instance())
    await follower.rebuild()  # a replay from 0 that starts later cannot be trusted
    assert not mirror.trusted and mirror.losses == 1
    assert mirror.blocks <= await cache_of(http, replica)  # a lower bound, never a false block
    async with http.post(replica.url + "/reset_prefix_cache") as response:
        assert response.status == 200
    for seq, payload in await batches(replica, mirror.last_seq + 1):
        await follower.on_batch(seq, payload)
    assert mirror.trusted and mirror.blocks == await cache_of(http, replica) == set()
    await chat(http, replica, "after the reset " * 30)
    for seq, payload in await batches(replica, mirror.last_seq + 1):
        await follower.on_batch(seq, payload)
    assert mirror.trusted and mirror.blocks == await cache_of(http, replica) != set()


async def test_a_sequence_that_goes_back_rebuilds_the_mirror(start, http) -> None:
    replica = await start()
    await chat(http, replica, "one " * 40)
    await chat(http, replica, "two " * 40)
    sent = await batches(replica)
    mirror = ReplicaIndex("r")
    follower = Follower(mirror, target_of(replica), zmq.asyncio.Context.instance())
    for seq, payload in sent:
        await follower.on_batch(seq, payload)
    mirror.blocks.add(12345)  # what a previous engine process held
    await follower.on_batch(0, sent[0][1])  # a new process starts counting again
    assert mirror.restarts == 1 and mirror.trusted
    assert mirror.blocks == await cache_of(http, replica)


async def test_a_replay_socket_that_never_answers(start, http) -> None:
    replica = await start()
    await chat(http, replica, "three " * 40)
    await chat(http, replica, "four " * 40)
    sent = await batches(replica)
    assert len(sent) >= 2
    dead = Target("127.0.0.1", 1, 1, "kv-events")  # nobody there
    mirror = ReplicaIndex("r")
    follower = Follower(mirror, dead, zmq.asyncio.Context.instance(), replay_timeout=0.3)
    await follower.on_batch(*sent[-1])  # batches before it were missed, and cannot be had
    assert not mirror.trusted and mirror.losses == 1 and mirror.last_seq == sent[-1][0]
    assert mirror.blocks <= await cache_of(http, replica)
    no_replay = Follower(ReplicaIndex("s"), Target("127.0.0.1", 1, 0, ""),
                         zmq.asyncio.Context.instance())
    assert await no_replay.replay(0) is False
    await no_replay.on_batch(*sent[0])  # the engine's first batch, live: complete
    assert no_replay.replica.trusted


async def test_disabled_events_publish_nothing(http) -> None:
    replica = Replica(get_profile("fast"), MODEL)
    await replica.start()
    try:
        await chat(http, replica, "quiet " * 40)
        assert replica.server.kv_events is None and replica.server.engine.kv.events is None
        async with http.get(replica.url + "/sim/cache") as response:
            body = await response.json()
        assert body["kv_events"] is None and len(body["block_hashes"]) > 0
    finally:
        await replica.stop()


def test_kv_events_config_is_vllms() -> None:
    config = KVEventsConfig.from_json(
        '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",'
        ' "replay_endpoint": "tcp://*:5558", "topic": "kv-events", "buffer_steps": 5,'
        ' "hwm": 10, "max_queue_size": 3}')
    assert config.enabled and config.for_rank(2).endpoint == "tcp://*:5559"
    assert config.for_rank(2).replay_endpoint == "tcp://*:5560"
    assert not KVEventsConfig.from_json('{"enable_kv_cache_events": true}').enabled
    for bad in ('{"enable_kv_cache_events": "yes"}', '{"endpiont": "tcp://*:1"}', "[]", "{",
                '{"publisher": "kafka"}', '{"buffer_steps": 0}'):
        with pytest.raises(ValueError):
            KVEventsConfig.from_json(bad)


async def test_a_silent_replay_socket_is_asked_again_until_it_answers(start, http) -> None:
    """The follower's own loop: connected to a real publisher whose replay socket is not there
    yet, it stays untrusted, retries, and is exact once a replay answers (here a ROUTER the test
    binds later, speaking vLLM's protocol with the publisher's own batches)."""
    replica = await start()
    await chat(http, replica, "five " * 40)
    sent = await batches(replica)
    real = target_of(replica)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        late_port = probe.getsockname()[1]
    mirror = ReplicaIndex("r")
    follower = Follower(mirror, Target("127.0.0.1", real.port, late_port, "kv-events"),
                        zmq.asyncio.Context.instance(), replay_timeout=0.3, retry_seconds=0.2)
    task = asyncio.get_running_loop().create_task(follower.run())
    tasks = [task]
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        await until(lambda: _true(mirror.rebuilds >= 2))  # asked, no answer, asked again
        assert not mirror.trusted
        router.bind(f"tcp://127.0.0.1:{late_port}")
        starts: list[int] = []

        async def serve() -> None:  # every request: one may come from a follower that gave up
            while True:
                client, _, start_seq = await router.recv_multipart()
                starts.append(int.from_bytes(start_seq, "big"))
                for seq, payload in sent:
                    await router.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
                await router.send_multipart([client, b"", (-1).to_bytes(8, "big", signed=True),
                                             b""])

        serving = asyncio.get_running_loop().create_task(serve())
        tasks.append(serving)
        await until(lambda: _true(mirror.trusted))
        assert starts and set(starts) == {0}
        assert mirror.blocks == await cache_of(http, replica)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        router.close()


async def _true(value: bool) -> bool:
    return value
