"""Paged KV cache with automatic prefix caching, modelled on vLLM v1's block pool.

Why it matters: routing quality shows up only through this structure. A replica can skip prefill
for the longest run of *full* 16-token blocks whose chained hashes it still holds; blocks nobody
references stay cached until the allocator needs them and evicts the least recently freed first.
The working set of a workload versus `num_blocks` is what separates prefix-aware routing from
random routing.

Semantics mirrored from vLLM:
- block hash = hash(parent block hash, this block's token ids); the chain root carries extra keys
  (the LoRA adapter), so identical text under different adapters does not share KV;
- only full blocks are hashed and reusable;
- freed blocks go to the tail of the free queue (a request frees its blocks tail-first, so its last
  blocks are evicted before its first ones); allocation takes from the head and evicts what it
  takes;
- usage = 1 - free/total, where cached-but-unreferenced blocks count as free (vLLM v1's
  `BlockPool.get_usage`: they sit in its free queue), so `kv_cache_usage_perc` measures what live
  sequences hold and falls to 0 when the last request ends even though the prefix cache stays
  warm; vLLM also reserves one null block and divides by total - 1, which the simulator, having
  no null block, does not;
- prefix-cache queries and hits are counted in tokens.

The block hash is a documented rule another process can reproduce (the gateway's twin in
`lb.prompt_tokens` does, to match requests against the KV events this cache emits):

    hash(parent, tokens) = low 64 bits of MurmurHash3_x64_128 (seed 0) over
                           parent as 8 bytes little-endian, then each token id as 8 bytes
                           little-endian two's complement (ids reduced modulo 2**64)
    root(adapter)        = ROOT_HASH, or ROOT_HASH ^ (crc32(utf-8 adapter name) << 1)

A hash is an unsigned 64-bit int, the int form vLLM's KV events carry.

KV events: when `events` is a list (`enable_events()`), the cache appends what changed its
index, in order, as plain tuples the engine drains after each step (`kvgate_sim.kv_events`
publishes them in vLLM's wire format): `("stored", hashes, parent or None, token_ids, adapter)`
for a run of blocks that entered the index, `("removed", hashes)` for evicted blocks,
`("cleared",)` after a reset. With events off (`events` is None) the cost is one branch.
"""

from __future__ import annotations

import struct
import zlib
from collections import OrderedDict
from typing import Any, Optional, Sequence

import mmh3

BLOCK_SIZE = 16
ROOT_HASH = 0x5EED_B10C


def root_hash(extra_key: Optional[str]) -> int:
    """Parent hash of a sequence's first block; adapters get their own chain."""
    if not extra_key:
        return ROOT_HASH
    return ROOT_HASH ^ (zlib.crc32(extra_key.encode()) << 1)


MASK64 = (1 << 64) - 1
_PACKERS: dict[int, struct.Struct] = {}


def _packer(n_tokens: int) -> struct.Struct:
    packer = _PACKERS.get(n_tokens)
    if packer is None:
        packer = _PACKERS[n_tokens] = struct.Struct(f"<Q{n_tokens}q")
    return packer


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """The hash of one full block chained on its parent's (the rule in the module docstring)."""
    try:
        data = _packer(len(tokens)).pack(parent, *tokens)
    except struct.error:  # an id outside int64 (a client's token list): reduce it mod 2**64
        data = struct.pack(f"<Q{len(tokens)}Q", parent, *(t & MASK64 for t in tokens))
    return mmh3.hash128(data) & MASK64


def extend_block_hashes(
    hashes: list[int], tokens: Sequence[int], block_size: int, root: int
) -> list[int]:
    """Append the chained hashes of every full block of `tokens` not yet in `hashes`.

    Incremental, so a sequence hashes each block once even as it grows during decoding.
    """
    n_full = len(tokens) // block_size
    parent = hashes[-1] if hashes else root
    pack, murmur = _packer(block_size).pack, mmh3.hash128
    for i in range(len(hashes), n_full):
        start = i * block_size
        try:
            parent = murmur(pack(parent, *tokens[start:start + block_size])) & MASK64
        except struct.error:
            parent = block_hash(parent, tokens[start:start + block_size])
        hashes.append(parent)
    return hashes


class KVCache:
    """Fixed pool of `num_blocks` blocks with ref counts, a hash index and an LRU free queue."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE,
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[Optional[int]] = [None] * num_blocks
        self._cached: dict[int, int] = {}
        # Free queue in eviction order: head is evicted first. Values unused.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.queries = 0  # prompt tokens looked up (vLLM: prefix_cache_queries)
        self.hits = 0  # of which found cached (vLLM: prefix_cache_hits)
        self.evictions = 0  # cached blocks whose contents were discarded for reuse
        self.events: Optional[list[tuple[Any, ...]]] = None  # KV events sink; None: off

    def enable_events(self) -> None:
        """Start recording index changes in `events` (see the module docstring)."""
        if self.events is None:
            self.events = []

    def take_events(self) -> list[tuple[Any, ...]]:
        """The events recorded since the last call, oldest first (empty when off)."""
        events = self.events
        if not events:
            return []
        self.events = []
        return events

    # --- introspection -----------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks available to allocate now (free or cached-but-unreferenced)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks currently findable by hash (referenced or not)."""
        return len(self._cached)

    def usage(self) -> float:
        """Fraction of blocks held by live sequences, as vLLM's kv_cache_usage_perc reports."""
        return 1.0 - len(self._free) / self.num_blocks

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    # --- prefix lookup -----------------------------------------------------------------------

    def match_prefix(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks holding the longest cached prefix of `block_hashes` (at most `max_blocks`)."""
        if not self.enable_prefix_caching:
            return []
        out: list[int] = []
        cached = self._cached
        for h in block_hashes[:max_blocks]:
            block = cached.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one request's prefix lookup, in tokens like vLLM's counters."""
        self.queries += queried_tokens
        self.hits += hit_tokens

    def can_allocate(self, hit_blocks: Sequence[int], n_new: int) -> bool:
        """Whether `n_new` fresh blocks fit once `hit_blocks` are pinned.

        Hit blocks that sit in the free queue (ref 0) stop being allocatable when pinned, so they
        are subtracted from the free count, as vLLM does.
        """
        ref = self._ref
        pinned_from_free = sum(1 for b in hit_blocks if ref[b] == 0)
        return n_new <= len(self._free) - pinned_from_free

    # --- allocation --------------------------------------------------------------------------

    def acquire(self, blocks: Sequence[int]) -> None:
        """Take a reference on cached blocks reused by a sequence."""
        ref, free = self._ref, self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> Optional[list[int]]:
        """Take `n` blocks from the head of the free queue, evicting their cached contents.

        Returns None when there are not enough (the engine then preempts, like vLLM).
        """
        if n > len(self._free):
            return None
        ref, hashes, cached, free = self._ref, self._hash, self._cached, self._free
        events = self.events
        removed: list[int] = []
        out = []
        for _ in range(n):
            b, _unused = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                    if events is not None:
                        removed.append(h)
                hashes[b] = None
                self.evictions += 1
            ref[b] = 1
            out.append(b)
        if removed:
            events.append(("removed", removed))  # type: ignore[union-attr]
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop a sequence's references; unreferenced blocks join the free queue tail-first."""
        ref, free = self._ref, self._free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
            elif ref[b] < 0:
                raise RuntimeError(f"block {b} freed more often than referenced")

    def register(self, block: int, block_hash: int) -> bool:
        """Make a just-filled block findable by its hash (the first copy wins, like vLLM).

        Returns whether the hash entered the index (a copy of a cached block does not)."""
        if not self.enable_prefix_caching or self._hash[block] is not None:
            return False
        if block_hash in self._cached:
            return False
        self._cached[block_hash] = block
        self._hash[block] = block_hash
        return True

    def register_run(self, blocks: Sequence[int], hashes: Sequence[int], start: int, end: int,
                     tokens: Sequence[int], adapter: Optional[str] = None) -> None:
        """Register blocks[start:end] of one sequence under hashes[start:end].

        With events on, each contiguous run of blocks that entered the index becomes one
        "stored" event with its parent hash (None for a sequence's first block) and tokens,
        as vLLM reports a request's newly cached blocks.
        """
        register = self.register
        if self.events is None:
            for i in range(start, end):
                register(blocks[i], hashes[i])
            return
        run = -1
        for i in range(start, end):
            if register(blocks[i], hashes[i]):
                if run < 0:
                    run = i
            elif run >= 0:
                self._stored(hashes, run, i, tokens, adapter)
                run = -1
        if run >= 0:
            self._stored(hashes, run, end, tokens, adapter)

    def _stored(self, hashes: Sequence[int], start: int, end: int, tokens: Sequence[int],
                adapter: Optional[str]) -> None:
        bs = self.block_size
        parent = hashes[start - 1] if start > 0 else None
        self.events.append(("stored", list(hashes[start:end]), parent,  # type: ignore[union-attr]
                            list(tokens[start * bs:end * bs]), adapter))

    def cached_hashes(self) -> list[int]:
        """Every block hash findable now, sorted (what a KV-event subscriber should hold)."""
        return sorted(self._cached)

    def reset(self) -> bool:
        """Forget every unreferenced cached block (vLLM's /reset_prefix_cache).

        Like vLLM, refuses (returns False) while any block is referenced.
        """
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        if self.events is not None:
            self.events.append(("cleared",))
        return True

    def check_invariants(self) -> None:
        """Raise if internal bookkeeping is inconsistent (used by tests)."""
        for b in range(self.num_blocks):
            in_free = b in self._free
            if (self._ref[b] == 0) != in_free:
                raise AssertionError(f"block {b}: ref {self._ref[b]} but in_free={in_free}")
        for h, b in self._cached.items():
            if self._hash[b] != h:
                raise AssertionError(f"hash index points to block {b} holding {self._hash[b]}")
