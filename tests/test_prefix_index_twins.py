"""CacheAware's prefix index in C and its pure-Python twin must be indistinguishable.

``lb/prefix_index.py`` is the specification; ``lb/_prefix_index.pyx`` is the copy the gateway
runs. Every operation is applied to both, and every return value (a match's replicas, depths
and their order), exception type, ``len`` and ``blocks_of`` must agree after every step: if the
C tables ever drift (a backward shift that breaks a probe run or an LRU link, a mask word that
keeps a forgotten replica's bit), a gateway on the fallback would route differently.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tracemalloc
from array import array
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lb import prefix_index

native = pytest.importorskip("lb._prefix_index", reason="the Cython prefix index is not built")

# Few keys, so replicas share blocks; "r64"... only reached by the wide runs below.
KEYS = ["r0", "r1", "a", "é-pod", "ns/pod-7", "\ud800x"]
TOP = (1 << 64) - 1
# Blocks from a few chained "prompts" (so prefixes are shared and diverge), plus the extremes.
BLOCK = st.one_of(st.integers(0, 40), st.sampled_from([0, 1, TOP, TOP - 1, 1 << 63]),
                  st.integers(0, TOP))
BLOCKS = st.lists(BLOCK, max_size=12)
BAD_BLOCKS = st.sampled_from([None, 3, "ab", [1, -1], [1, TOP + 1], [1.0], [1, None], (2, "x"),
                              [True, 2], (x for x in ()), array("q", [1, -1]),
                              array("d", [1.0])])
CAPACITIES = st.one_of(st.integers(1, 12), st.just(1000))
# A record's replica number: the lowest free one (None), or one the ring gave (a slot), which
# may move a key or take another key's number.
BITS = st.one_of(st.none(), st.integers(0, 9), st.just(130))
BAD_BITS = st.sampled_from([-1, True, 1.5, "3", 1 << 20, 2**70])
BAD_CAPACITIES = st.sampled_from([0, -1, 1.5, "3", None, True, 2**70])


def outcome(call: Callable[[Any], Any], index: Any) -> tuple[str, Any]:
    """What an operation did: its value (a match as its items, so order counts too), or the
    type of what it raised."""
    try:
        value = call(index)
    except Exception as exc:  # noqa: BLE001 - the type is the observable here
        return "raised", type(exc)
    return "ok", list(value.items()) if isinstance(value, dict) else value


class Twins(RuleBasedStateMachine):
    """Both indexes driven through the same random history, compared after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.py: Any = None
        self.cy: Any = None
        self.sent: list[list[int]] = []  # prompts recorded so far, to match them again

    @initialize(capacity=CAPACITIES)
    def make(self, capacity: int) -> None:
        self.py, self.cy = prefix_index.PrefixIndex(capacity), native.PrefixIndex(capacity)

    def both(self, call: Callable[[Any], Any]) -> tuple[str, Any]:
        got_py, got_cy = outcome(call, self.py), outcome(call, self.cy)
        assert got_py == got_cy
        return got_py

    @rule(key=st.sampled_from(KEYS), blocks=BLOCKS, extend=st.booleans(), bit=BITS,
          as_array=st.booleans())
    def record(self, key: str, blocks: list[int], extend: bool, bit: int | None,
               as_array: bool) -> None:
        if extend and self.sent:  # a later turn of an earlier prompt: a shared prefix
            blocks = self.sent[-1] + blocks
        self.sent.append(blocks)
        # block_hashes' array('Q') is copied whole by the C index: the same as a list
        sent = array("Q", blocks) if as_array else blocks
        self.both(lambda i: i.record(key, sent, bit))

    @rule(data=st.data(), blocks=BLOCKS)
    def match(self, data: st.DataObject, blocks: list[int]) -> None:
        if self.sent and data.draw(st.booleans()):
            sent = data.draw(st.sampled_from(self.sent))
            blocks = sent[:data.draw(st.integers(0, len(sent)))] + blocks[:2]
        self.both(lambda i: i.match(blocks))
        self.both(lambda i: i.match(tuple(blocks)))
        self.both(lambda i: i.shares(blocks))
        self.both(lambda i: i.shares(iter(blocks)))
        self.both(lambda i: i.share_array(blocks))
        self.both(lambda i: i.share_array(array("Q", blocks)))
        self.both(lambda i: i.match(array("Q", blocks)))

    @rule(key=st.sampled_from(KEYS + ["never"]))
    def forget(self, key: str) -> None:
        self.both(lambda i: i.forget(key))

    @rule(capacity=CAPACITIES)
    def set_capacity(self, capacity: int) -> None:
        self.both(lambda i: setattr(i, "capacity", capacity))

    @rule(key=st.one_of(st.sampled_from(KEYS), st.sampled_from([1, None, ("t",), [], {}])),
          blocks=st.one_of(BLOCKS, BAD_BLOCKS), capacity=BAD_CAPACITIES, bit=BAD_BITS)
    def odd(self, key: Any, blocks: Any, capacity: Any, bit: Any) -> None:
        """Bad blocks, keys, numbers and capacities raise alike and change neither index."""
        self.both(lambda i: i.match(blocks))
        self.both(lambda i: i.shares(blocks))
        self.both(lambda i: i.share_array(blocks))
        self.both(lambda i: i.record(key, blocks))
        self.both(lambda i: i.record(key, blocks, bit))
        self.both(lambda i: i.blocks_of(key))
        self.both(lambda i: setattr(i, "capacity", capacity))
        self.both(lambda i: i.capacity)
        self.both(lambda i: i.forget(key))

    @invariant()
    def same_state(self) -> None:
        if self.py is None:
            return
        assert len(self.py) == len(self.cy)
        assert self.py.capacity == self.cy.capacity
        for key in KEYS:
            assert self.py.blocks_of(key) == self.cy.blocks_of(key)
        for sent in self.sent[-3:]:
            assert self.both(lambda i: i.match(sent))[0] == "ok"


TestTwins = Twins.TestCase
TestTwins.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])


def test_constructors_agree() -> None:
    for capacity in (1, 8, 2**70, 0, -3, 1.5, "8", None, True):
        made = [outcome(lambda cls: cls(capacity), cls)
                for cls in (prefix_index.PrefixIndex, native.PrefixIndex)]
        assert made[0][0] == made[1][0]
        if made[0][0] == "raised":
            assert made[0][1] is made[1][1]
        else:
            assert made[0][1].capacity == made[1][1].capacity == capacity


# -- long histories: many replicas (several mask words), table growth and shrinking ----------


def _random_history(seed: int, steps: int) -> None:
    """Up to 260 replicas (bits past 64, 128 and 192: masks of up to five words), prompts that share
    prefixes and diverge, capacities that rise and fall (tables grow, then shrink), replicas
    that leave and come back (bits reused); compared after every step."""
    rng = random.Random(seed)
    capacity = rng.choice([1, 4, 32, 400])
    py, cy = prefix_index.PrefixIndex(capacity), native.PrefixIndex(capacity)
    keys = [f"default/model-{i}" for i in range(rng.choice([3, 70, 150, 260]))]
    numbered = rng.random() < 0.5  # records give each key its number, as CacheAware does

    def both(call: Callable[[Any], Any]) -> Any:
        got = outcome(call, py), outcome(call, cy)
        assert got[0] == got[1]
        return got[0]

    for step in range(steps):
        op = rng.random()
        key = rng.choice(keys)
        doc = rng.randrange(60)
        blocks = [doc * 1000 + i for i in range(rng.randrange(0, 40))]
        if op < 0.5:
            bit = keys.index(key) if numbered else None  # as the ring numbers them
            both(lambda i: i.record(key, blocks, bit))
        elif op < 0.85:  # draw first: both twins must see the same query
            query = blocks[:rng.randrange(len(blocks) + 1)] + [7, 8][:rng.randrange(3)]
            both(lambda i: i.match(query))
            both(lambda i: i.shares(query))
            both(lambda i: i.share_array(query))
        elif op < 0.95:
            both(lambda i: i.forget(key))
        else:
            capacity = rng.choice([1, 4, 32, 400, 2000])
            both(lambda i: setattr(i, "capacity", capacity))
        assert len(py) == len(cy)
        if step % 200 == 0:
            assert [py.blocks_of(k) for k in keys] == [cy.blocks_of(k) for k in keys]


@pytest.mark.parametrize("seed", range(6))
def test_long_random_histories_agree(seed: int) -> None:
    _random_history(seed, 4000)


def test_many_replicas_share_one_prompt() -> None:
    """200 replicas hold the same prompt to different depths: each one's depth, in bit order."""
    py, cy = prefix_index.PrefixIndex(100), native.PrefixIndex(100)
    prompt = list(range(1000, 1050))
    for index in (py, cy):
        for r in range(200):
            index.record(f"r{r}", prompt[:1 + r % 50])
    assert list(py.match(prompt).items()) == list(cy.match(prompt).items())
    assert cy.match(prompt)["r199"] == 50
    for index in (py, cy):
        for r in range(0, 200, 3):
            index.forget(f"r{r}")
        index.record("late", prompt)  # takes bit 0 again
    assert list(py.match(prompt).items()) == list(cy.match(prompt).items())
    assert cy.match(prompt)["late"] == 50 and "r0" not in cy.match(prompt)


# -- memory ---------------------------------------------------------------------------------


def _traced_now() -> int:
    """Bytes allocated since tracemalloc started (the C twin's tables come from PyMem_*,
    which tracemalloc sees)."""
    return tracemalloc.get_traced_memory()[0]


def _churn(index: Any, replicas: int, requests: int, seed: int = 7) -> Any:
    rng = random.Random(seed)
    for _ in range(requests):
        doc = rng.randrange(5_000)
        blocks = [doc * 1000 + i for i in range(rng.randrange(1, 100))]
        index.record(f"r{rng.randrange(replicas)}", blocks)
    return index


def test_memory_stays_within_the_capacity_per_replica() -> None:
    """A million blocks routed over 16 replicas at 500 blocks each: the C index keeps
    16 x 500 blocks in under 100 bytes each (two tables at most half full), however long it
    runs; lowering the capacity or forgetting the replicas gives the memory back."""
    tracemalloc.start()
    try:
        index = _churn(native.PrefixIndex(500), 16, 20_000)
        full = _traced_now()
        assert len(index) == 16 * 500 and all(index.blocks_of(f"r{r}") == 500 for r in range(16))
        assert full < 16 * 500 * 100, full
        index.capacity = 10
        for r in range(16):
            index.record(f"r{r}", [1])
        assert len(index) == 160 and _traced_now() < full / 10, (_traced_now(), full)
        for r in range(16):
            index.forget(f"r{r}")
        assert len(index) == 0 and _traced_now() < 16 * 1024
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_traffic() -> None:
    """Twice the requests over the same replicas: no more memory than half as many."""
    held = []
    for requests in (5_000, 10_000):
        tracemalloc.start()
        try:
            index = _churn(native.PrefixIndex(300), 8, requests, seed=requests)
            held.append(_traced_now())
            assert len(index) == 8 * 300
        finally:
            tracemalloc.stop()
    assert held[1] < held[0] * 1.5 + 4096, held


# -- which implementation runs --------------------------------------------------------------


def _index_in_use(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "KVGATE_PURE_RING"}
    script = ("import lb.ring as r, lb.cache_aware as c, lb.prefix_index as p; "
              "print(r.INDEX_IMPLEMENTATION, c.PrefixIndex is p.PrefixIndex)")
    done = subprocess.run([sys.executable, "-c", script], env={**environ, **env},
                          capture_output=True, text=True, check=True, timeout=60)
    return done.stdout.strip()


def test_the_built_index_is_the_one_in_use_and_the_ring_switch_selects_the_twin() -> None:
    assert _index_in_use() == "cython False"
    assert _index_in_use(KVGATE_PURE_RING="1") == "python True"
