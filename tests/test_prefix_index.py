"""The approximate prefix index: chained block hashes mean equal prefixes; a match is the
depth of the longest held prefix per replica; the LRU forgets a prompt from its tail, stays
within its capacity per replica, and a replica that leaves is forgotten whole. Checked against
a plain model of the same rules (lists of prompts, walked from the start)."""

from __future__ import annotations

import random

import mmh3
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.prefix_index import PrefixIndex
from lb.ring import block_hashes


def test_blocks_chain_the_whole_prefix() -> None:
    a = block_hashes("x" * 64 + "y" * 64 + "z" * 10, 64, 10)
    b = block_hashes("w" * 64 + "y" * 64, 64, 10)
    assert len(a) == 2  # the partial last block is left out, as an engine leaves it
    assert a[1] != b[1]  # same block bytes, different prefix before them
    assert a[0] == mmh3.hash64(b"x" * 64, seed=0, signed=False)[0]
    assert block_hashes("x" * 640, 64, 3) == block_hashes("x" * 192, 64, 3)
    assert block_hashes("é" * 40, 64, 9) == block_hashes("é" * 32, 64, 9)  # counted in bytes
    assert len(block_hashes("short", 64, 9)) == 0
    assert block_hashes("x" * 192, 64, 3).typecode == "Q"  # what the index copies whole


def prefix_depth(held: list[list[int]], blocks: list[int]) -> int:
    """The model: the longest run of ``blocks`` from the start held as a prefix."""
    depth = 0
    for seq in held:
        n = 0
        while n < min(len(seq), len(blocks)) and seq[n] == blocks[n]:
            n += 1
        depth = max(depth, n)
    return depth


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"),
                          st.lists(st.integers(0, 3), min_size=1, max_size=6)),
                max_size=20),
       st.lists(st.integers(0, 3), max_size=6))
def test_match_is_the_longest_held_prefix(sent: list[tuple[str, list[int]]],
                                          query: list[int]) -> None:
    """With room for everything, a replica holds every prefix it was sent."""
    def chain(path: list[int]) -> list[int]:  # chained ids (uint64), like chained hashes
        return [hash(tuple(path[:i + 1])) & 0xFFFF_FFFF_FFFF_FFFF for i in range(len(path))]

    index = PrefixIndex(capacity=1000)
    held: dict[str, list[list[int]]] = {}
    for replica, path in sent:
        index.record(replica, chain(path))
        held.setdefault(replica, []).append(chain(path))
    expected = {r: d for r, seqs in held.items() if (d := prefix_depth(seqs, chain(query)))}
    assert index.match(chain(query)) == expected


def test_capacity_bounds_each_replica_and_forgets_the_tail_first() -> None:
    index = PrefixIndex(capacity=8)
    old = list(range(100, 106))
    index.record("r", old)
    new = list(range(200, 206))
    index.record("r", new)
    assert index.blocks_of("r") == 8
    # the old prompt lost its last four blocks: the first two still match
    assert index.match(old) == {"r": 2}
    assert index.match(new) == {"r": 6}
    index.record("s", old)
    assert index.match(old) == {"r": 2, "s": 6}


def test_forget_drops_a_replica_and_its_bit_is_reused() -> None:
    index = PrefixIndex(capacity=100)
    index.record("a", [1, 2, 3])
    index.record("b", [1, 2])
    index.forget("a")
    assert index.match([1, 2, 3]) == {"b": 2}
    index.record("c", [1, 2, 3])  # takes a's bit: nothing of a's must show through
    assert index.match([1, 2, 3]) == {"b": 2, "c": 3}
    assert index.blocks_of("a") == 0 and len(index) == 5


def test_memory_stays_bounded_over_a_long_run() -> None:
    """A million blocks routed over 16 replicas: what is kept is capacity x replicas, and
    the reverse map holds no block no replica remembers."""
    rng = random.Random(7)
    index = PrefixIndex(capacity=500)
    replicas = [f"r{i}" for i in range(16)]
    for _ in range(20_000):
        doc = rng.randrange(5_000)
        blocks = [doc * 1000 + i for i in range(rng.randrange(1, 100))]
        index.record(rng.choice(replicas), blocks)
    assert len(index) <= 500 * 16
    assert all(index.blocks_of(r) <= 500 for r in replicas)
    assert len(index._holders) <= len(index)


def test_share_array_is_indexed_by_the_number_each_record_gave() -> None:
    index = PrefixIndex(100)
    index.record("a", [1, 2, 3, 4], bit=3)
    index.record("b", [1, 2], bit=0)
    assert list(index.share_array([1, 2, 3, 4])) == [0.5, 0.0, 0.0, 1.0]
    assert index.share_array([9, 1]) is None  # nobody holds the first block
    assert index.shares([1, 2, 3, 4]) == {"b": 0.5, "a": 1.0}


def test_a_number_given_again_forgets_what_was_held_under_it() -> None:
    index = PrefixIndex(100)
    index.record("a", [1, 2], bit=1)
    index.record("c", [5, 6], bit=1)  # the ring gave a's old slot to c: a is gone
    assert index.match([1, 2]) == {} and index.blocks_of("a") == 0
    index.record("c", [5, 6, 7], bit=2)  # c moved: what it held under 1 is dropped too
    assert index.blocks_of("c") == 3 and list(index.share_array([5, 6])) == [0.0, 0.0, 1.0]
