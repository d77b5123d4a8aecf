"""The approximate prefix index of the CacheAware strategy: which replica was recently sent
which blocks of which prompt.

No engine cooperation is needed: the gateway cuts each prompt (the conversation rendered from
its start, ``lb.parse.prefix_of(..., "Conversation")``) into fixed-size blocks of bytes and
chains their hashes (``block_hashes``, in the ring core and its twin), so block ``i``'s hash
stands for the whole prefix up to its end. Whoever was sent
that hash recently very likely still holds the prefix in its KV cache. The index remembers, per
replica, the blocks it was sent, least recently routed forgotten first, up to a capacity sized
like the replica's prefix cache: it forgets about when the engine would have evicted.

Kept per gateway worker (each learns from the requests it routes): a prompt's first routing,
when no replica is known to hold any of it, follows the CHWBL ring from its first block, which
every worker computes alike, so the workers' separate indexes agree on where a prefix lives
without sharing memory or taking a lock on the request path.
"""

from __future__ import annotations

from collections import OrderedDict
from operator import index as as_index
from typing import Iterable, Sequence

__all__ = ["PrefixIndex"]

_MAX_BLOCK = (1 << 64) - 1


class PrefixIndex:
    """Per replica, the block hashes it was recently sent (LRU, ``capacity`` each); and, per
    block, which replicas hold it (a bit mask), so a match walks the prompt's blocks once
    whatever the number of replicas.

    Block hashes are unsigned 64-bit ints (what ``block_hashes`` gives): any other value
    raises (TypeError, or OverflowError out of range) before anything changes, so the Cython
    twin (``lb._prefix_index``) can hold them in C and still behave alike."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._holders: dict[int, int] = {}  # block hash -> mask of replica bits
        self._recent: dict[str, OrderedDict[int, None]] = {}  # replica -> blocks, oldest first
        self._bit: dict[str, int] = {}
        self._key_of_bit: list[str | None] = []

    @property
    def capacity(self) -> int:
        """Blocks kept per replica; a lower one takes effect at the replica's next record."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        value = as_index(value)
        if value < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = value

    def __len__(self) -> int:
        """Blocks remembered, summed over the replicas."""
        return sum(len(blocks) for blocks in self._recent.values())

    def match(self, blocks: Sequence[int]) -> dict[str, int]:
        """Replica -> how many of ``blocks``, from the first, it is believed to hold (replicas
        holding none are left out)."""
        blocks = _checked(blocks)
        holders = self._holders
        depths: dict[str, int] = {}
        alive = 0
        depth = 0
        for depth, block in enumerate(blocks):
            held = holders.get(block, 0)
            if depth:
                held &= alive
                if held != alive:  # some replicas' prefixes end here
                    self._note_dropped(alive & ~held, depth, depths)
            if not held:
                return depths
            alive = held
        self._note_dropped(alive, len(blocks), depths)
        return depths

    def shares(self, blocks: Sequence[int]) -> dict[str, float]:
        """Replica -> the share (0..1] of ``blocks`` ``match`` finds it holding: what
        CacheAware scores, in one call (the C twin divides as it notes each depth)."""
        blocks = _checked(blocks)
        return {key: depth / len(blocks) for key, depth in self.match(blocks).items()}

    def record(self, key: str, blocks: Sequence[int]) -> None:
        """``key`` was sent a request with these blocks: it holds them now (most recent)."""
        blocks = _checked(blocks)
        if not blocks:
            return
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = OrderedDict()
        bit = 1 << self._bit_of(key)
        holders = self._holders
        # Last block first: the first blocks end up the most recent, so the LRU forgets a
        # prompt from its tail, as the engine does (a prefix missing its start matches nothing).
        for block in reversed(blocks):
            if block in recent:
                recent.move_to_end(block)
            else:
                recent[block] = None
                holders[block] = holders.get(block, 0) | bit
        while len(recent) > self._capacity:
            self._drop(recent.popitem(last=False)[0], bit)

    def forget(self, key: str) -> None:
        """The replica is gone (or restarted): nothing it held counts any more."""
        recent = self._recent.pop(key, None)
        index = self._bit.pop(key, None)
        if index is None:
            return
        bit = 1 << index
        for block in recent or ():
            self._drop(block, bit)
        self._key_of_bit[index] = None

    def blocks_of(self, key: str) -> int:
        recent = self._recent.get(key)
        return len(recent) if recent is not None else 0

    def _bit_of(self, key: str) -> int:
        index = self._bit.get(key)
        if index is None:
            try:
                index = self._key_of_bit.index(None)
                self._key_of_bit[index] = key
            except ValueError:
                index = len(self._key_of_bit)
                self._key_of_bit.append(key)
            self._bit[key] = index
        return index

    def _drop(self, block: int, bit: int) -> None:
        left = self._holders[block] & ~bit
        if left:
            self._holders[block] = left
        else:
            del self._holders[block]

    def _note_dropped(self, mask: int, depth: int, depths: dict[str, int]) -> None:
        keys = self._key_of_bit
        while mask:
            low = mask & -mask
            key = keys[low.bit_length() - 1]
            if key is not None:
                depths[key] = depth
            mask ^= low


def _checked(blocks: Iterable[int]) -> Sequence[int]:
    """``blocks`` as a list or tuple of unsigned 64-bit ints, or the error the C twin raises."""
    if not isinstance(blocks, (list, tuple)):
        try:
            blocks = list(blocks)
        except TypeError:
            raise TypeError("blocks must be a sequence of ints") from None
    for block in blocks:
        if not isinstance(block, int):
            raise TypeError(f"a block hash must be int, not {type(block).__name__}")
        if not 0 <= block <= _MAX_BLOCK:
            raise OverflowError("a block hash must be in [0, 2**64)")
    return blocks
