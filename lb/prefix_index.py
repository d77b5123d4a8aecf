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

from array import array
from collections import OrderedDict
from operator import index as as_index
from typing import Callable, Iterable, Sequence

__all__ = ["PrefixIndex", "MAX_BIT"]

_MAX_BLOCK = (1 << 64) - 1
MAX_BIT = (1 << 20) - 1  # the highest replica number a record may give (the ring's last slot)


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
        depths: dict[str, int] = {}
        keys = self._key_of_bit

        def note(bit: int, depth: int) -> None:
            key = keys[bit]
            if key is not None:
                depths[key] = depth
        self._walk(_checked(blocks), note)
        return depths

    def shares(self, blocks: Sequence[int]) -> dict[str, float]:
        """Replica -> the share (0..1] of ``blocks`` ``match`` finds it holding."""
        blocks = _checked(blocks)
        return {key: depth / len(blocks) for key, depth in self.match(blocks).items()}

    def share_array(self, blocks: Sequence[int]) -> array | None:
        """The same shares by replica number (the ring slot each was recorded with), 0.0 for
        a replica holding none: what the ring's scoring picks read without a dict or a key
        lookup per replica. None when no replica holds the first block."""
        blocks = _checked(blocks)
        out: list[array] = []
        size = len(self._key_of_bit)

        def note(bit: int, depth: int) -> None:
            if not out:
                out.append(array("d", bytes(8 * size)))
            out[0][bit] = depth / len(blocks)
        self._walk(blocks, note)
        return out[0] if out else None

    def record(self, key: str, blocks: Sequence[int], bit: int | None = None) -> None:
        """``key`` was sent a request with these blocks: it holds them now (most recent).

        ``bit``: the replica's number, its slot in the ring, so that ``share_array`` is indexed
        as the ring is; a record that moves a key to another number, or gives a number another
        key holds, forgets what was held under the old one (the ring reused the slot). None:
        the lowest free number (give numbers always or never)."""
        blocks = _checked(blocks)
        if bit is not None:
            bit = _checked_bit(bit)
        if not blocks:
            return
        bit = 1 << self._bit_of(key, bit)  # first: it may forget what the key held
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = OrderedDict()
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

    def _bit_of(self, key: str, wanted: int | None) -> int:
        index = self._bit.get(key)
        if wanted is not None and index != wanted:
            if index is not None:
                self.forget(key)
            if wanted < len(self._key_of_bit) and self._key_of_bit[wanted] is not None:
                self.forget(self._key_of_bit[wanted])
            self._key_of_bit.extend([None] * (wanted + 1 - len(self._key_of_bit)))
            self._key_of_bit[wanted] = key
            index = self._bit[key] = wanted
        elif index is None:
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

    def _walk(self, blocks: Sequence[int], note: Callable[[int, int], None]) -> None:
        """``note(bit, depth)`` for each replica holding the first ``depth`` (> 0) of
        ``blocks``: walks the blocks once, whatever the number of replicas, noting a replica
        where its prefix ends (lowest bit first at each depth)."""
        holders = self._holders
        alive = 0
        for depth, block in enumerate(blocks):
            held = holders.get(block, 0)
            if depth:
                held &= alive
                if held != alive:  # some replicas' prefixes end here
                    _note_bits(alive & ~held, depth, note)
            if not held:
                return
            alive = held
        _note_bits(alive, len(blocks), note)


def _note_bits(mask: int, depth: int, note: Callable[[int, int], None]) -> None:
    while mask:
        low = mask & -mask
        note(low.bit_length() - 1, depth)
        mask ^= low


def _checked(blocks: Iterable[int]) -> Sequence[int]:
    """``blocks`` as a list or tuple of unsigned 64-bit ints (or ``block_hashes``' own
    ``array('Q')``), or the error the C twin raises."""
    if isinstance(blocks, array) and blocks.typecode == "Q":
        return blocks
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


def _checked_bit(bit: object) -> int:
    """A replica number in [0, MAX_BIT], or the error the C twin raises."""
    if not isinstance(bit, int) or isinstance(bit, bool):
        raise TypeError("a replica's bit must be int")
    if not 0 <= bit <= MAX_BIT:
        raise OverflowError(f"a replica's bit must be in [0, {MAX_BIT}]")
    return bit
