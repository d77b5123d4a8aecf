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
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Optional, Sequence

BLOCK_SIZE = 16
ROOT_HASH = 0x5EED_B10C


def root_hash(extra_key: Optional[str]) -> int:
    """Parent hash of a sequence's first block; adapters get their own chain."""
    if not extra_key:
        return ROOT_HASH
    return ROOT_HASH ^ (zlib.crc32(extra_key.encode()) << 1)


def extend_block_hashes(
    hashes: list[int], tokens: Sequence[int], block_size: int, root: int
) -> list[int]:
    """Append the chained hashes of every full block of `tokens` not yet in `hashes`.

    Incremental, so a sequence hashes each block once even as it grows during decoding. Python's
    hash of a tuple of ints is deterministic across processes (only str/bytes hashing is salted).
    """
    n_full = len(tokens) // block_size
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), n_full):
        start = i * block_size
        parent = hash((parent, tuple(tokens[start:start + block_size])))
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
        out = []
        for _ in range(n):
            b, _unused = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                hashes[b] = None
                self.evictions += 1
            ref[b] = 1
            out.append(b)
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

    def register(self, block: int, block_hash: int) -> None:
        """Make a just-filled block findable by its hash (the first copy wins, like vLLM)."""
        if not self.enable_prefix_caching or self._hash[block] is not None:
            return
        if block_hash not in self._cached:
            self._cached[block_hash] = block
            self._hash[block] = block_hash

    def reset(self) -> bool:
        """Forget every unreferenced cached block (vLLM's /reset_prefix_cache).

        Like vLLM, refuses (returns False) while any block is referenced.
        """
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
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
