"""The precise prefix index: each replica's KV-cache blocks, mirrored from its KV events.

A vLLM replica started with ``--kv-events-config`` (and the simulator, which speaks the same
protocol) publishes every change of its prefix cache: blocks stored, blocks evicted, the cache
cleared. Following that stream, the gateway knows which prompt blocks each replica holds
instead of guessing from where it sent past requests, so the scorer can ask
``index.match(endpoint_key, block_hashes)`` (the leading blocks a replica holds; block hashes
from ``lb.prompt_tokens``) and ``index.trusted(endpoint_key)`` (whether the mirror is exact).

The protocol (vLLM's ``vllm/distributed/kv_events.py``): a PUB socket sends ``[topic, seq,
payload]`` with ``seq`` counting batches from 0 per engine process (8 bytes big-endian) and the
payload msgpack of an array-like ``KVEventBatch(ts, events, data_parallel_rank)``, each event a
tagged array ``["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium]``,
``["BlockRemoved", hashes, medium]`` or ``["AllBlocksCleared"]``. A ROUTER socket replays the
batches still in the engine's buffer from a given sequence, then an end marker (sequence -1,
empty payload). Newer vLLM versions encode the events as maps, inside the same array-like batch
(vLLM 0.32, seen from the real engine) or, as guessed before, inside a map batch; all decode here.

Trust, per replica. The mirror is exact ("trusted") only when every batch since the engine
started (or since it last cleared its cache) has been applied. So:

- on (re)connecting, the mirror is cleared and rebuilt from a replay from sequence 0; if the
  engine's buffer no longer starts at 0 (it has run long), what it replays is applied but the
  mirror stays untrusted;
- a gap in the live sequence asks the replay socket for the missed range; if the range is gone
  (the buffer moved past it) or nobody answers, the mirror is cleared and stays untrusted;
- a sequence that goes backwards (or a dropped connection) is a restarted engine: rebuild;
- an ``AllBlocksCleared`` makes an untrusted mirror exact again, as does an engine restart.

An untrusted mirror is cleared at the loss and only fed events after it, so it never claims a
block the replica lost: it is a lower bound the scorer may still use, or it falls back to the
approximate index.

Memory: the mirror is a ``set`` of ints, bounded by the engine's own capacity (it holds what
the engine holds). Measured with tracemalloc on CPython 3.11, random 64-bit hashes applied from
decoded batches: 88 bytes per block at 10,000 blocks, 78 at 100,000, 69 at 1,000,000 (a 40-byte
int object plus the set's 16-byte slots at its load factor), so a replica with 100,000 cached
blocks (1.6 M tokens) costs ~8 MB in each gateway worker. ``max_blocks`` caps it against a
publisher that never removes anything.

Off the request path: one task per followed replica reads its SUB socket (pyzmq's asyncio
sockets); a request only pays for ``match``, a loop of set lookups that stops at the first
miss. Subscriptions follow the registry: a replica of a model whose spec sets
``loadBalancing.cacheAware.kvEvents`` is followed while it is an endpoint of that model.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from lb.model import KVEvents
from lb.registry import Registry

log = logging.getLogger(__name__)

MAX_BLOCKS = 1 << 22  # ~350 MB per replica at most; far above any GPU's block count
BlockHash = Union[int, bytes]  # vLLM's ExternalBlockHash: an int on the wire, bytes in some versions


# -- decoding: vLLM's structs, array-like (what vLLM releases send) and as maps (newer ones) --------

class _StoredArray(msgspec.Struct, array_like=True, tag="BlockStored", gc=False):  # type: ignore[call-arg]
    block_hashes: list[BlockHash]
    parent_block_hash: Optional[BlockHash] = None
    token_ids: msgspec.Raw = msgspec.Raw()  # not needed here: left undecoded
    block_size: int = 0
    lora_id: Optional[int] = None
    medium: Optional[str] = None


class _RemovedArray(msgspec.Struct, array_like=True, tag="BlockRemoved", gc=False):  # type: ignore[call-arg]
    block_hashes: list[BlockHash]
    medium: Optional[str] = None


class _ClearedArray(msgspec.Struct, array_like=True, tag="AllBlocksCleared", gc=False):  # type: ignore[call-arg]
    pass


class _BatchArray(msgspec.Struct, array_like=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Union[_StoredArray, _RemovedArray, _ClearedArray]]
    data_parallel_rank: Optional[int] = None


class _StoredMap(msgspec.Struct, tag="BlockStored", gc=False):  # type: ignore[call-arg]
    block_hashes: list[BlockHash]
    block_size: int = 0
    medium: Optional[str] = None


class _RemovedMap(msgspec.Struct, tag="BlockRemoved", gc=False):  # type: ignore[call-arg]
    block_hashes: list[BlockHash]
    medium: Optional[str] = None


class _ClearedMap(msgspec.Struct, tag="AllBlocksCleared", gc=False):  # type: ignore[call-arg]
    pass


class _BatchMap(msgspec.Struct, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Union[_StoredMap, _RemovedMap, _ClearedMap]]
    data_parallel_rank: Optional[int] = None


class _BatchArrayOfMaps(msgspec.Struct, array_like=True, gc=False):  # type: ignore[call-arg]
    """vLLM 0.32's wire form, seen from the real engine: the batch is still array-like
    (``[ts, events, dp_rank]``) but each event is a map tagged by ``type``."""

    ts: float
    events: list[Union[_StoredMap, _RemovedMap, _ClearedMap]]
    data_parallel_rank: Optional[int] = None


_ARRAY = msgspec.msgpack.Decoder(_BatchArray)
_ARRAY_OF_MAPS = msgspec.msgpack.Decoder(_BatchArrayOfMaps)
_MAP = msgspec.msgpack.Decoder(_BatchMap)
# Tried in order; the one that last worked moves to the front, so a replica's payloads cost one
# decode each once its version is known (a failed decode is an exception, not free).
_DECODERS = [_ARRAY, _ARRAY_OF_MAPS, _MAP]
_STORED = (_StoredArray, _StoredMap)
_REMOVED = (_RemovedArray, _RemovedMap)
_INDEXED_MEDIA = (None, "GPU")  # CPU-offloaded copies are not prefix hits of the GPU cache


def decode_batch(payload: bytes) -> list[Any]:
    """The events of one payload; raises ``msgspec.DecodeError`` (or ``ValidationError``)."""
    last = len(_DECODERS) - 1
    for i, decoder in enumerate(_DECODERS):
        try:
            events = decoder.decode(payload).events
        except msgspec.ValidationError:
            if i < last:
                continue
            raise
        if i:
            _DECODERS.insert(0, _DECODERS.pop(i))
        return events
    return []  # not reached: the last decoder returns or raises


# -- the index ---------------------------------------------------------------------------------

@dataclass(slots=True, eq=False)
class ReplicaIndex:
    """One replica's mirrored cache and how far it can be believed."""

    key: str
    blocks: set[BlockHash] = field(default_factory=set)
    trusted: bool = False
    last_seq: int = -1  # sequence of the last batch applied
    block_size: int = 0  # as the replica reports it in BlockStored (0 until one arrives)
    connected: bool = False
    batches: int = 0
    losses: int = 0  # times the mirror was cleared because events were missed
    restarts: int = 0  # engine restarts seen by a sequence that went backwards
    rebuilds: int = 0  # mirrors started again from a replay from 0 (each connection, restarts)
    decode_errors: int = 0
    max_blocks: int = MAX_BLOCKS

    def apply(self, seq: int, payload: bytes) -> None:
        """Apply one batch, known to follow ``last_seq`` without a gap."""
        self.last_seq = seq
        try:
            events = decode_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.decode_errors += 1
            log.warning("KV events of %s: undecodable batch %d: %s", self.key, seq, exc)
            self.lose()
            return
        blocks = self.blocks
        for event in events:
            if isinstance(event, _STORED):
                if event.medium in _INDEXED_MEDIA:
                    blocks.update(event.block_hashes)
                    self.block_size = event.block_size or self.block_size
            elif isinstance(event, _REMOVED):
                if event.medium in _INDEXED_MEDIA:
                    blocks.difference_update(event.block_hashes)
            else:  # AllBlocksCleared: from here on the mirror is complete
                blocks.clear()
                self.trusted = True
        self.batches += 1
        if len(blocks) > self.max_blocks:
            log.warning("KV events of %s: over %d blocks, dropping the mirror", self.key,
                        self.max_blocks)
            self.lose()

    def accept(self, seq: int, payload: bytes) -> bool:
        """Apply a batch in sequence order; False when batches before it were missed (the
        mirror is then cleared and untrusted, and this batch starts it again)."""
        if seq <= self.last_seq:
            return True  # already applied
        in_order = seq == self.last_seq + 1
        if not in_order:
            self.lose()
        elif seq == 0:
            self.trusted = True  # the engine's first batch onto an empty mirror: all of it
        self.apply(seq, payload)
        return in_order

    def lose(self) -> None:
        """Events were missed: forget everything, so the mirror never claims a lost block."""
        self.blocks.clear()
        self.trusted = False
        self.losses += 1

    def reset(self) -> None:
        """Before a rebuild from sequence 0."""
        self.blocks.clear()
        self.trusted = False
        self.last_seq = -1



class KVIndex:
    """Every followed replica's mirror, by endpoint key: what the scorer reads."""

    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaIndex] = {}

    def match(self, endpoint_key: str, block_hashes: Iterable[BlockHash]) -> int:
        """How many leading blocks of ``block_hashes`` the replica holds (0 if not followed)."""
        replica = self._replicas.get(endpoint_key)
        if replica is None:
            return 0
        blocks, n = replica.blocks, 0
        for h in block_hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def trusted(self, endpoint_key: str) -> bool:
        """Whether the replica's mirror is exact (else: a lower bound, or nothing)."""
        replica = self._replicas.get(endpoint_key)
        return replica is not None and replica.trusted

    def get(self, endpoint_key: str) -> ReplicaIndex | None:
        return self._replicas.get(endpoint_key)

    def keys(self) -> list[str]:
        return list(self._replicas)

    def _add(self, key: str) -> ReplicaIndex:
        replica = self._replicas[key] = ReplicaIndex(key)
        return replica

    def _remove(self, key: str) -> None:
        self._replicas.pop(key, None)


# -- following one replica ------------------------------------------------------------------------

def zmq_host(address: str) -> str:
    """The host of ``host:port`` as a ZeroMQ tcp address wants it (IPv6 in brackets)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host


@dataclass(frozen=True, slots=True)
class Target:
    """Where one replica publishes: what a follower connects to."""

    host: str
    port: int
    replay_port: int
    topic: str

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def replay_url(self) -> str | None:
        return f"tcp://{self.host}:{self.replay_port}" if self.replay_port else None

    @classmethod
    def of(cls, address: str, spec: KVEvents, offset: int = 0) -> Target:
        replay = spec.replay_port + offset if spec.replay_port else 0
        return cls(zmq_host(address), spec.port + offset, replay, spec.topic)


class Follower:
    """Reads one replica's events into its ``ReplicaIndex`` until cancelled."""

    def __init__(self, replica: ReplicaIndex, target: Target, ctx: zmq.asyncio.Context, *,
                 replay_timeout: float = 5.0, settle: float = 0.1,
                 retry_seconds: float = 2.0) -> None:
        self.replica = replica
        self.target = target
        self._ctx = ctx
        self._replay_timeout = replay_timeout
        self._settle = settle  # lets the subscription reach the publisher before a rebuild
        self._retry_ms = int(retry_seconds * 1000)
        self._replayed_upto = -1  # live batches up to here arrived by replay already
        self._unanswered = False  # a replay timed out: try a rebuild again later

    async def run(self) -> None:
        sub = self._socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.target.topic.encode())
        monitor = sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sub.connect(self.target.url)
        poller = zmq.asyncio.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                ready = dict(await poller.poll(self._retry_ms if self._unanswered else -1))
                if monitor in ready and await self._on_monitor(monitor):
                    await asyncio.sleep(self._settle)
                    await self.rebuild()
                elif not ready and self._unanswered and not self.replica.trusted:
                    await self.rebuild()  # the replay socket was silent: it may answer now
                if sub in ready:
                    await self._drain(sub)
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            self.replica.connected = False

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.target.host.startswith("["):
            sock.setsockopt(zmq.IPV6, 1)
        return sock

    async def _on_monitor(self, monitor: zmq.asyncio.Socket) -> bool:
        """Read connection events; True when the replica was (re)connected."""
        connected = False
        while True:
            try:
                message = parse_monitor_message(await monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return connected
            if message["event"] == zmq.EVENT_CONNECTED:
                self.replica.connected = connected = True
            elif message["event"] == zmq.EVENT_DISCONNECTED:
                # the engine may be restarting: what it holds next is unknown until the rebuild
                self.replica.connected = connected = False
                self.replica.trusted = False

    async def _drain(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                continue
            await self.on_batch(int.from_bytes(frames[1], "big"), frames[2])

    async def on_batch(self, seq: int, payload: bytes) -> None:
        """One live batch: in order, a duplicate of a replay, after a gap, or from a restart."""
        replica = self.replica
        if seq <= replica.last_seq:
            if seq <= self._replayed_upto:
                return  # it came by replay while it waited in the socket
            replica.restarts += 1
            log.info("KV events of %s: sequence went back (%d after %d): engine restarted",
                     replica.key, seq, replica.last_seq)
            await self.rebuild()
            return
        self._replayed_upto = -1
        if seq > replica.last_seq + 1:
            await self.replay(replica.last_seq + 1)
        replica.accept(seq, payload)

    async def rebuild(self) -> None:
        """Start the mirror again from the engine's first batch, if it still has it."""
        self.replica.reset()
        self.replica.rebuilds += 1
        self._replayed_upto = -1
        self._unanswered = False
        if await self.replay(0):
            self.replica.trusted = True  # else untrusted, unless the replay held a cache reset

    async def replay(self, start: int) -> bool:
        """Apply the engine's buffered batches from ``start``; True when they covered it."""
        url = self.target.replay_url
        if url is None:
            return False
        replica = self.replica
        dealer = self._socket(zmq.DEALER)
        covered, got_any = True, False
        try:
            dealer.connect(url)
            await dealer.send_multipart((b"", start.to_bytes(8, "big")))
            while True:
                if not await dealer.poll(self._replay_timeout * 1000):
                    log.info("KV events of %s: no replay answer", replica.key)
                    self._unanswered = True
                    return False
                frames = await dealer.recv_multipart()
                seq_bytes, payload = frames[-2], frames[-1]
                if not payload:  # end marker
                    break
                got_any = True
                covered = replica.accept(int.from_bytes(seq_bytes, "big"), payload) and covered
        finally:
            dealer.close(linger=0)
            self._replayed_upto = replica.last_seq
        return covered and (got_any or start == 0)


# -- following the registry ---------------------------------------------------------------------

class KVEventSubscriber:
    """One ``Follower`` per replica of every model that enables KV events, started and stopped
    as the registry's endpoints change; the mirrors are in ``index``."""

    def __init__(self, registry: Registry, index: KVIndex | None = None, *,
                 recheck_seconds: float = 1.0, replay_timeout: float = 5.0) -> None:
        self.registry = registry
        self.index = index or KVIndex()
        self._recheck = recheck_seconds
        self._replay_timeout = replay_timeout
        self._running: dict[str, tuple[Target, asyncio.Task[None]]] = {}
        self._ctx: zmq.asyncio.Context | None = None

    def wanted(self) -> dict[str, Target]:
        """Endpoint key -> where it publishes, for every model that enables KV events."""
        out: dict[str, Target] = {}
        groups = self.registry.groups()
        for model in self.registry.models():
            spec = model.spec.load_balancing.cache_aware.kv_events
            group = groups.get(model.name)
            if spec is None or group is None:
                continue
            for key, endpoint in group.endpoints.items():
                out[key] = Target.of(endpoint.address, spec, endpoint.kv_port_offset)
        return out

    def sync(self) -> None:
        """Start followers for new replicas, stop those of replicas that left or moved."""
        wanted = self.wanted()
        for key, (target, task) in list(self._running.items()):
            if wanted.get(key) != target:
                task.cancel()
                del self._running[key]
                self.index._remove(key)
        for key, target in wanted.items():
            if key not in self._running:
                if self._ctx is None:
                    self._ctx = zmq.asyncio.Context.instance()
                follower = Follower(self.index._add(key), target, self._ctx,
                                    replay_timeout=self._replay_timeout)
                task = asyncio.get_running_loop().create_task(self._follow(follower))
                self._running[key] = (target, task)

    async def _follow(self, follower: Follower) -> None:
        try:
            await follower.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not stop the other replicas' followers
            log.exception("KV events of %s: follower failed", follower.replica.key)
            follower.replica.trusted = False

    async def run(self) -> None:
        """Follow the registry until cancelled: on every endpoint change, or every few seconds
        for models that appear."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                self.sync()
                groups = list(self.registry.groups().values())
                waiters = [group.changed().wait(loop) for group in groups]
                try:
                    if waiters:
                        await asyncio.wait(waiters, timeout=self._recheck,
                                           return_when=asyncio.FIRST_COMPLETED)
                    else:
                        await asyncio.sleep(self._recheck)
                finally:
                    for group, waiter in zip(groups, waiters):
                        group.changed().discard(waiter)
                        waiter.cancel()
        finally:
            await self.stop()

    async def stop(self) -> None:
        tasks = [task for _, task in self._running.values()]
        for key in list(self._running):
            self.index._remove(key)
        self._running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
