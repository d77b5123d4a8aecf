"""KV-cache events in vLLM's wire format, published over ZeroMQ.

A router that knows which blocks each replica holds can send a request where its prefix is
already cached. vLLM tells it through `--kv-events-config`: a PUB socket sends one message per
engine step that changed the prefix cache, and a ROUTER socket replays past messages to a
subscriber that noticed a gap. The simulator speaks the same protocol, so a gateway built
against it follows a real vLLM unchanged:

- a message is three frames `[topic, sequence, payload]`; the sequence counts batches from 0
  per publisher (a restarted replica starts again at 0) as 8 bytes big-endian;
- the payload is msgpack of `KVEventBatch(ts, events, data_parallel_rank)`, encoded by the
  msgspec Structs below, declared as vLLM declares them: array-like (a batch is an array, not a
  map), defaults omitted, events tagged with their class name (`["BlockStored", ...]`);
- replay: a client sends `[b"", start]` (start as 8 bytes big-endian) to the ROUTER; the
  publisher answers every buffered batch with sequence >= start as `[b"", sequence, payload]`,
  then the end marker `[b"", -1 as 8 signed bytes, b""]`. It keeps the last `buffer_steps`
  batches; older ones are gone, which the subscriber sees as a replay that starts too late.

Block hashes are the simulator's own (`kvgate_sim.kvcache.block_hash`), unsigned 64-bit ints.
One replica of `--replicas N` offsets both ports by its index, as vLLM offsets them by data
parallel rank. Sending on PUB never blocks (ZeroMQ drops at the high-water mark), so batches
go out from the engine's loop directly; replays are served by a task on the same loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

import msgspec
import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


# --- the wire types, as vLLM declares them ------------------------------------------------------

class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False,  # type: ignore[call-arg]
                   tag=True):
    """Base of the events; the tag is the class name."""


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


# --- configuration: vLLM's --kv-events-config ----------------------------------------------------

@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's `KVEventsConfig` fields; `publisher` "zmq" publishes, "null" does not."""

    enable_kv_cache_events: bool = False
    publisher: str = "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: Optional[str] = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    @classmethod
    def from_json(cls, text: str) -> "KVEventsConfig":
        """Parse the flag's JSON; unknown keys and wrong types raise ValueError, like vLLM."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-events-config is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        for key, value in raw.items():
            if key not in known:
                raise ValueError(f"--kv-events-config: unknown key {key!r} "
                                 f"(known: {', '.join(known)})")
            _check_type(key, value, cls.__dataclass_fields__[key].default)
        config = cls(**raw)
        if config.publisher not in ("zmq", "null"):
            raise ValueError(f"--kv-events-config: unknown publisher {config.publisher!r}")
        if config.buffer_steps < 1 or config.hwm < 0:
            raise ValueError("--kv-events-config: buffer_steps must be >= 1 and hwm >= 0")
        return config

    def for_rank(self, rank: int) -> "KVEventsConfig":
        """This config for replica `rank`: tcp ports offset by the rank (vLLM's DP rule)."""
        if rank == 0:
            return self
        return replace(self, endpoint=offset_port(self.endpoint, rank),
                       replay_endpoint=offset_port(self.replay_endpoint, rank))


def _check_type(key: str, value: Any, default: Any) -> None:
    if key == "replay_endpoint":
        ok = value is None or isinstance(value, str)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"--kv-events-config: {key} has the wrong type ({value!r})")


def offset_port(endpoint: Optional[str], rank: int) -> Optional[str]:
    """`tcp://host:5557` -> `tcp://host:5557+rank`; a wildcard port (`*`) stays as it is."""
    if not endpoint or rank == 0 or not endpoint.startswith("tcp://"):
        return endpoint
    base, _, port = endpoint.rpartition(":")
    if not port.isdigit():
        return endpoint
    return f"{base}:{int(port) + rank}"


def _binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard, ipc or inproc address; connect to anything else."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


# --- the publisher -----------------------------------------------------------------------------

class ZmqEventPublisher:
    """PUB socket + replay ROUTER for one replica; `publish` takes the KV cache's tuples."""

    def __init__(self, config: KVEventsConfig, block_size: int, rank: int = 0) -> None:
        self.config = config
        self.block_size = block_size
        self.rank = rank
        self.next_seq = 0
        self.dropped = 0  # batches ZeroMQ refused (high-water mark)
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._encoder = msgspec.msgpack.Encoder()
        self._lora_ids: dict[str, int] = {}
        self._pub: Optional[zmq.Socket] = None
        self._replay: Optional[zmq.asyncio.Socket] = None
        self._task: Optional[asyncio.Task] = None
        self.endpoint = ""  # as bound (a wildcard port resolved), for the logs and tests
        self.replay_endpoint: Optional[str] = None

    async def start(self) -> None:
        """Open the sockets (retrying a port a replica that just stopped still holds)."""
        pub = zmq.Context.instance().socket(zmq.PUB)  # plain: a PUB send never waits
        pub.setsockopt(zmq.LINGER, 0)
        pub.set_hwm(self.config.hwm)
        self.endpoint = await _open(pub, self.config.endpoint)
        self._pub = pub
        if self.config.replay_endpoint:
            router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.SNDHWM, self.config.buffer_steps + 1)  # a whole replay fits
            self.replay_endpoint = await _open(router, self.config.replay_endpoint)
            self._replay = router
            self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._replay = None

    def publish(self, events: list[tuple[Any, ...]]) -> None:
        """Send one step's events as one batch with the next sequence number."""
        if self._pub is None:
            return
        batch = KVEventBatch(ts=time.time(), events=[self._struct(e) for e in events],
                             data_parallel_rank=self.rank)
        payload = self._encoder.encode(batch)
        seq = self.next_seq
        self.next_seq += 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload),
                                     flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def _struct(self, event: tuple[Any, ...]) -> KVCacheEvent:
        kind = event[0]
        if kind == "stored":
            _, hashes, parent, tokens, adapter = event
            return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                               block_size=self.block_size, lora_id=self._lora_id(adapter),
                               medium=MEDIUM_GPU)
        if kind == "removed":
            return BlockRemoved(block_hashes=event[1], medium=MEDIUM_GPU)
        return AllBlocksCleared()

    def _lora_id(self, adapter: Optional[str]) -> Optional[int]:
        """vLLM's int id of a LoRA (1, 2, ... in the order they are first used here)."""
        if not adapter:
            return None
        return self._lora_ids.setdefault(adapter, len(self._lora_ids) + 1)

    async def _serve_replay(self) -> None:
        router = self._replay
        assert router is not None
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid KV-event replay request (%d frames)", len(frames))
                continue
            client, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await router.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            await router.send_multipart((client, b"", END_SEQ, b""))

    def describe(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "replay_endpoint": self.replay_endpoint,
                "topic": self.config.topic, "next_seq": self.next_seq,
                "buffered": len(self._buffer), "dropped": self.dropped}


async def _open(sock: zmq.Socket, endpoint: str, attempts: int = 40) -> str:
    """Bind (or connect, by vLLM's rule) and return the address as bound."""
    if not _binds(endpoint):
        sock.connect(endpoint)
        return endpoint
    for attempt in range(attempts):
        try:
            sock.bind(endpoint)
            break
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or attempt == attempts - 1:
                sock.close(linger=0)
                raise
            await asyncio.sleep(0.05)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
