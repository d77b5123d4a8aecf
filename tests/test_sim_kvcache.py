"""The simulator's paged KV cache: chained block hashes, prefix reuse, ref counts, LRU eviction."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kvgate_sim.kvcache import KVCache, extend_block_hashes, root_hash
from kvgate_sim.tokenizer import encode, encode_chat

BS = 16


def hashes_of(tokens, adapter=None):
    return extend_block_hashes([], tokens, BS, root_hash(adapter))


def test_block_hashes_are_chained_and_full_blocks_only():
    a = list(range(40))
    b = list(range(32)) + [999] * 8
    ha, hb = hashes_of(a), hashes_of(b)
    assert len(ha) == 2  # 40 tokens -> 2 full blocks, the partial third is not hashed
    assert ha == hb  # same first 32 tokens -> same hashes
    c = [7] + list(range(1, 40))
    hc = hashes_of(c)
    assert hc[0] != ha[0] and hc[1] != ha[1]  # a change in block 0 changes every later hash
    assert hashes_of(a, adapter="lora-x") != ha  # adapters do not share KV


def test_incremental_hashing_matches_one_shot():
    toks = list(range(100))
    inc: list[int] = []
    for n in (10, 17, 33, 64, 100):
        extend_block_hashes(inc, toks[:n], BS, root_hash(None))
    assert inc == hashes_of(toks)


def test_identical_text_prefixes_give_identical_blocks():
    shared = "You are a helpful assistant. " * 20
    p1 = encode_chat([{"role": "system", "content": shared}, {"role": "user", "content": "a?"}])
    p2 = encode_chat([{"role": "system", "content": shared}, {"role": "user", "content": "b!"}])
    h1, h2 = hashes_of(p1), hashes_of(p2)
    common = min(len(h1), len(h2))
    assert common >= 8 and h1[:common - 1] == h2[:common - 1]
    assert len(encode("abcd" * 25)) == 25  # ~4 characters per token


def test_prefix_match_reuse_and_refcounts():
    kv = KVCache(8, BS)
    hs = hashes_of(list(range(48)))  # 3 blocks
    blocks = kv.allocate(3)
    for b, h in zip(blocks, hs):
        kv.register(b, h)
    assert kv.match_prefix(hs, 3) == blocks
    assert kv.match_prefix(hs, 2) == blocks[:2]
    kv.acquire(blocks[:2])  # a second sequence shares the first two blocks
    assert kv.ref_count(blocks[0]) == 2
    kv.free(blocks)
    assert kv.ref_count(blocks[0]) == 1 and kv.ref_count(blocks[2]) == 0
    assert kv.num_free == 6  # 5 never used + the released third block
    kv.free(blocks[:2])
    assert kv.num_free == 8 and kv.usage() == 0.0
    assert kv.match_prefix(hs, 3) == blocks  # freed blocks stay cached until reused
    kv.check_invariants()


def test_lru_eviction_takes_least_recently_freed_tail_first():
    kv = KVCache(4, BS)
    seq_a = kv.allocate(2)
    ha = hashes_of(list(range(32)))
    for b, h in zip(seq_a, ha):
        kv.register(b, h)
    seq_b = kv.allocate(2)
    hb = hashes_of(list(range(100, 132)))
    for b, h in zip(seq_b, hb):
        kv.register(b, h)
    kv.free(seq_a)  # A freed first: its blocks are evicted before B's
    kv.free(seq_b)
    got = kv.allocate(1)
    assert got == [seq_a[1]]  # a sequence's tail block goes first
    assert kv.match_prefix(ha, 2) == [seq_a[0]]
    assert kv.evictions == 1
    kv.allocate(1)
    assert kv.match_prefix(ha, 2) == []
    assert kv.match_prefix(hb, 2) == seq_b  # more recently freed B survives
    kv.check_invariants()


def test_allocation_failure_and_pinned_hits_count_against_free():
    kv = KVCache(4, BS)
    blocks = kv.allocate(2)
    hs = hashes_of(list(range(32)))
    for b, h in zip(blocks, hs):
        kv.register(b, h)
    kv.free(blocks)
    hit = kv.match_prefix(hs, 2)
    assert kv.can_allocate(hit, 2)
    assert not kv.can_allocate(hit, 3)  # pinning the hits removes them from the free pool
    assert kv.allocate(5) is None


def test_reset_refuses_while_in_use_then_forgets_everything():
    kv = KVCache(4, BS)
    b = kv.allocate(1)
    kv.register(b[0], 123)
    assert not kv.reset()
    kv.free(b)
    assert kv.reset() and kv.num_cached == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "hit"]), st.integers(0, 7)),
                max_size=60))
def test_random_operations_keep_invariants(ops):
    kv = KVCache(12, BS)
    live: list[list[int]] = []
    counter = 0
    for op, arg in ops:
        if op == "alloc":
            got = kv.allocate(arg % 4 + 1)
            if got is not None:
                for b in got:
                    counter += 1
                    kv.register(b, counter % 5)  # collisions on purpose: first copy wins
                live.append(got)
        elif op == "free" and live:
            kv.free(live.pop(arg % len(live)))
        elif op == "hit":
            hit = kv.match_prefix([arg % 5], 1)
            if hit and kv.can_allocate(hit, 0):
                kv.acquire(hit)
                live.append(hit)
        kv.check_invariants()
        assert kv.num_free == sum(1 for b in range(12) if kv.ref_count(b) == 0)
    for blocks in live:
        kv.free(blocks)
    assert kv.num_free == 12 and kv.usage() == 0.0
