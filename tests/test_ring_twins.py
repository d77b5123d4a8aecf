"""The Cython ring core and its pure-Python twin must be indistinguishable.

``lb/chwbl.py`` is the specification; ``lb/_chwbl.pyx`` is the fast copy the gateway runs. Every
operation below is applied to both, and every return value, exception type, load, total, key
list and ``stats()`` counter must agree after every step: if the C code ever drifts (a walk that
stops too early, a merge that misplaces a vnode, a ticket that decodes differently), a gateway
on the fallback would stop agreeing with one on the extension about where a prefix lives.
"""

from __future__ import annotations

import random
from array import array
from typing import Any, Callable

import mmh3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant,
                                 multiple, rule)

from lb import chwbl

native = pytest.importorskip("lb._chwbl", reason="the Cython ring is not built")

# Keys that stress the vnode hashing: KubeAI's "a"/"a1" collision pair, non-ASCII, a lone
# surrogate (hashed through surrogatepass), and realistic pod keys.
ENDPOINTS = ["ns/pod-0", "ns/pod-1", "a", "a1", "10.0.0.1:8000", "é-pod", "\ud800pod", "日本-2"]
ADAPTERS = ["", "lora-a", "lora-b", "x"]
# Text with a healthy share of lone surrogates, which `st.text()` alone almost never draws.
TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"]),
                         st.sampled_from("aé日😀#0")), max_size=120)
BAD_STR = st.sampled_from([None, 1, b"a", 1.5, ("a",)])
ADAPTER_SETS = st.frozensets(st.sampled_from(ADAPTERS), max_size=3)


# CacheAware's inputs: shares of the prompt held (endpoints and strangers), engine queues, and
# score weights with ties (zeros, equal shares) as likely as not.
SHARES = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0))
AFFINITY = st.dictionaries(st.sampled_from(ENDPOINTS + ["unknown"]), SHARES, max_size=5)
SEQUENCES = st.sampled_from([array, list])  # how the shares reach the pick (array: one copy)
QUEUES = st.dictionaries(st.sampled_from(ENDPOINTS), st.one_of(st.sampled_from([0.0, 1.0, 4.0]),
                                                                st.floats(0.0, 64.0)), max_size=5)
SCORE_WEIGHTS = st.tuples(*[st.sampled_from([0.0, 1.0, 3.0, 0.5, 10.0])] * 3)
# The cost model's inputs: prompt tokens, tokens per in-flight request and per queued request,
# with zeros (every cost equal: the home must win) as likely as real sizes.
COSTS = st.tuples(st.one_of(st.sampled_from([0.0, 64.0, 2560.0]), st.floats(0.0, 1e5)),
                  st.sampled_from([0.0, 1.0, 16.0, 0.5]),
                  st.sampled_from([0.0, 512.0, 3.0]))


class Gen(list):
    """An ``exclude`` given as a one-shot generator: each ring gets a fresh one."""

    def fresh(self):
        return (key for key in self)


def by_slot(ring: Any, shares: dict[str, float], kind: type = array) -> Any:
    """``shares`` (endpoint key -> share) as the sequence by slot a scoring pick reads; keys
    the ring does not have are left out, and the sequence ends at the last slot given."""
    slots = {ring.slot_of(key): share for key, share in shares.items() if key in ring}
    values = [slots.get(slot, 0.0) for slot in range(max(slots, default=-1) + 1)]
    return array("d", values) if kind is array else values


def outcome(call: Callable[[Any], Any], ring: Any) -> tuple[str, Any]:
    """What an operation did: its value, or the type of what it raised."""
    try:
        return "ok", call(ring)
    except Exception as exc:  # noqa: BLE001 - the type is the observable here
        return "raised", type(exc)


def native_hash_matches_mmh3(key: str) -> None:
    try:
        data = key.encode()
    except UnicodeEncodeError:
        data = key.encode("utf-8", "surrogatepass")
    expected = mmh3.hash64(data, signed=False)[0]
    assert native.hash64(key) == expected
    assert chwbl.hash64(key) == expected


# -- hashing ----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_native_hash64_equals_mmh3(key: str) -> None:
    native_hash_matches_mmh3(key)


def test_native_hash64_every_tail_length() -> None:
    """MurmurHash3 handles the last 0..15 bytes in a separate tail path: cover each length,
    with multi-byte characters straddling block boundaries."""
    for length in range(0, 70):
        native_hash_matches_mmh3("k" * length)
        native_hash_matches_mmh3("é" * length)
        native_hash_matches_mmh3("a" + "日" * length)


@settings(max_examples=300, deadline=None)
@given(TEXT, st.sampled_from([1, 3, 4, 16, 64]), st.integers(0, 40))
def test_block_hashes_agree(text: str, block_bytes: int, max_blocks: int) -> None:
    """CacheAware's chained block hashes: the same list from both, over odd sizes, non-ASCII
    and lone surrogates; a bad argument raises the same type."""
    assert native.block_hashes(text, block_bytes, max_blocks) == chwbl.block_hashes(
        text, block_bytes, max_blocks)


def test_block_hashes_reject_alike() -> None:
    for args in (("abc", 0, 3), ("abc", 4, -1), (b"abc", 4, 3), (None, 4, 3)):
        assert outcome(lambda m: m.block_hashes(*args), native) == outcome(
            lambda m: m.block_hashes(*args), chwbl)


def test_native_hash64_rejects_non_str() -> None:
    for bad in (None, 1, b"abc"):
        with pytest.raises(TypeError):
            native.hash64(bad)


# -- constructor and configuration ------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {}, {"replication": 1}, {"replication": 65536}, {"replication": 0}, {"replication": 65537},
    {"replication": "8"}, {"replication": 8.0}, {"replication": None}, {"replication": True},
    {"mean_load_factor": 100}, {"mean_load_factor": 99}, {"mean_load_factor": 1_000_001},
    {"mean_load_factor": 150.0}, {"mean_load_factor": "150"}, {"seed": 0}, {"seed": -1},
    {"seed": 2**70 + 5}, {"seed": "x"}, {"seed": 1.5}, {"replication": 0, "seed": "x"},
])
def test_constructor_agrees(kwargs: dict) -> None:
    made = [outcome(lambda cls: cls(**kwargs), cls) for cls in (chwbl.Ring, native.Ring)]
    assert made[0][0] == made[1][0]
    if made[0][0] == "raised":
        assert made[0][1] is made[1][1]
        return
    py, cy = made[0][1], made[1][1]
    assert (py.replication, py.mean_load_factor) == (cy.replication, cy.mean_load_factor)
    for ring in (py, cy):  # the seed drives pick_random: equal seeds, equal draws
        for i in range(5 if ring.replication <= 1024 else 2):
            ring.add(f"e{i}")
    assert [py.pick_random() for _ in range(50)] == [cy.pick_random() for _ in range(50)]


def test_read_only_properties_agree() -> None:
    for attr in ("replication", "total"):
        for cls in (chwbl.Ring, native.Ring):
            with pytest.raises(AttributeError):
                setattr(cls(), attr, 3)
    for cls in (chwbl.Ring, native.Ring):
        with pytest.raises(AttributeError):
            del cls().mean_load_factor


# -- random operation sequences -----------------------------------------------------------------


WEIGHTS = st.one_of(st.just(1), st.integers(1, 40), st.just(2**32))
# Not weights: zero, negative, over the maximum, and not ints (both twins raise the same way).
BAD_WEIGHTS = [0, -3, 2**32 + 1, 2**70, True, 1.5, None, "2"]


class Twins(RuleBasedStateMachine):
    """Both rings driven through the same random history, compared after every step.

    Valid operations on endpoints that exist get their own rules (so picks land, loads build up
    and the bounded-load fallback is reached); malformed calls get separate rules, so errors
    are covered without drowning the interesting states."""

    tickets = Bundle("tickets")

    def __init__(self) -> None:
        super().__init__()
        self.py: Any = None
        self.cy: Any = None

    @initialize(replication=st.integers(1, 12), factor=st.integers(100, 260),
                seed=st.integers(0, 2**64),
                endpoints=st.lists(st.tuples(st.sampled_from(ENDPOINTS), ADAPTER_SETS),
                                   min_size=1, max_size=6, unique_by=lambda e: e[0]))
    def make(self, replication: int, factor: int, seed: int, endpoints: list) -> None:
        self.py = chwbl.Ring(replication, factor, seed)
        self.cy = native.Ring(replication, factor, seed)
        for key, adapters in endpoints:
            self.both(lambda r: r.add(key, adapters))

    def both(self, call: Callable[[Any], Any]) -> tuple[str, Any]:
        got_py, got_cy = outcome(call, self.py), outcome(call, self.cy)
        assert got_py == got_cy
        return got_py

    def present(self, data: st.DataObject) -> str:
        """An endpoint in the ring, or (rarely, and always when empty) one that is not."""
        keys = self.py.keys()
        if keys and data.draw(st.integers(0, 9)) > 0:
            return data.draw(st.sampled_from(keys))
        return data.draw(st.sampled_from(ENDPOINTS))

    def _acquired(self, result: tuple[str, Any], take: bool, weight: int = 1):
        if take and result[0] == "ok" and result[1] is not None:
            status, ticket = self.both(lambda r: r.acquire(result[1], weight))
            return multiple((ticket, weight)) if status == "ok" else multiple()
        return multiple()

    # endpoints

    @rule(key=st.sampled_from(ENDPOINTS), adapters=ADAPTER_SETS)
    def add(self, key: str, adapters: frozenset) -> None:
        self.both(lambda r: r.add(key, adapters))

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        key = self.present(data)
        self.both(lambda r: r.remove(key))

    @rule(data=st.data(), adapters=st.one_of(ADAPTER_SETS, st.lists(st.sampled_from(ADAPTERS))))
    def set_adapters(self, data: st.DataObject, adapters: Any) -> None:
        key = self.present(data)
        self.both(lambda r: r.set_adapters(key, adapters))

    # loads

    @rule(target=tickets, data=st.data(), count=st.integers(1, 25), weight=WEIGHTS)
    def acquire(self, data: st.DataObject, count: int, weight: int):
        key = self.present(data)
        issued = []
        for _ in range(count):
            status, value = self.both(lambda r: r.acquire(key, weight))
            if status == "ok":
                issued.append((value, weight))
        return multiple(*issued)

    @rule(held=tickets, heavier=st.booleans())
    def release(self, held: tuple[int, int], heavier: bool) -> None:
        ticket, weight = held  # valid, stale (endpoint gone), or spent; or more than it held
        self.both(lambda r: r.release(ticket, weight + 7 if heavier else weight))

    @rule(factor=st.integers(90, 400))
    def set_factor(self, factor: int) -> None:
        self.both(lambda r: setattr(r, "mean_load_factor", factor))

    # picks (optionally acquiring the pick, so loads follow the traffic)

    @rule(target=tickets, key=TEXT, take=st.booleans(), adapter=st.sampled_from(ADAPTERS),
          exclude=st.one_of(st.just(()), st.lists(st.sampled_from(ENDPOINTS + ["unknown"]),
                                                  max_size=4)), weight=WEIGHTS)
    def pick(self, key: str, adapter: str, exclude: Any, take: bool, weight: int):
        return self._acquired(self.both(lambda r: r.pick(key, adapter, exclude, weight)), take,
                              weight)

    @rule(target=tickets, take=st.booleans(), adapter=st.sampled_from(ADAPTERS),
          exclude=st.one_of(st.just(()), st.lists(st.sampled_from(ENDPOINTS), max_size=3)),
          weight=WEIGHTS)
    def pick_least_load(self, adapter: str, exclude: Any, take: bool, weight: int):
        return self._acquired(self.both(lambda r: r.pick_least_load(adapter, exclude)), take,
                              weight)

    @rule(target=tickets, key=TEXT, take=st.booleans(), adapter=st.sampled_from(ADAPTERS),
          exclude=st.one_of(st.just(()), st.lists(st.sampled_from(ENDPOINTS + ["unknown"]),
                                                  max_size=4)), weight=WEIGHTS,
          affinity=AFFINITY, kind=SEQUENCES, queues=st.one_of(st.none(), QUEUES),
          weights=SCORE_WEIGHTS)
    def pick_scored(self, key: str, adapter: str, exclude: Any, take: bool, weight: int,
                    affinity: dict, kind: type, queues: dict | None, weights: tuple) -> None:
        picked = self.both(lambda r: r.pick_scored(key, adapter, exclude, weight,
                                                   by_slot(r, affinity, kind), queues, *weights))
        return self._acquired(picked, take, weight)

    @rule(target=tickets, key=TEXT, take=st.booleans(), adapter=st.sampled_from(ADAPTERS),
          exclude=st.one_of(st.just(()), st.lists(st.sampled_from(ENDPOINTS + ["unknown"]),
                                                  max_size=4)), weight=WEIGHTS,
          affinity=AFFINITY, kind=SEQUENCES, queues=st.one_of(st.none(), QUEUES), costs=COSTS)
    def pick_cost(self, key: str, adapter: str, exclude: Any, take: bool, weight: int,
                  affinity: dict, kind: type, queues: dict | None, costs: tuple) -> None:
        picked = self.both(lambda r: r.pick_cost(key, adapter, exclude, weight,
                                                 by_slot(r, affinity, kind), queues, *costs))
        return self._acquired(picked, take, weight)

    @rule(target=tickets, take=st.booleans(), adapter=st.sampled_from(ADAPTERS),
          exclude=st.one_of(st.just(()), st.frozensets(st.sampled_from(ENDPOINTS))))
    def pick_random(self, adapter: str, exclude: Any, take: bool):
        return self._acquired(self.both(lambda r: r.pick_random(adapter, exclude)), take)

    # malformed calls: same exception type from both, and no change to either ring

    @rule(key=st.one_of(TEXT, BAD_STR), adapter=st.one_of(st.sampled_from(ADAPTERS), BAD_STR),
          exclude=st.one_of(st.sampled_from(["a", "", None, [[]], 5, ("a", [])]),
                            st.builds(Gen, st.lists(st.sampled_from(ENDPOINTS)))))
    def pick_odd(self, key: Any, adapter: Any, exclude: Any) -> None:
        fresh = exclude.fresh if isinstance(exclude, Gen) else (lambda: exclude)
        self.both(lambda r: r.pick(key, adapter, fresh()))
        for weight in BAD_WEIGHTS:
            self.both(lambda r: r.pick(key, adapter, fresh(), weight))
        self.both(lambda r: r.pick_least_load(adapter, fresh()))
        self.both(lambda r: r.pick_random(adapter, fresh()))

    @rule(key=st.one_of(st.sampled_from(ENDPOINTS + [""]), BAD_STR, st.just([])),
          adapters=st.one_of(ADAPTER_SETS, st.sampled_from(["lora-a", [1], None, 3, [[]]])))
    def endpoint_odd(self, key: Any, adapters: Any) -> None:
        self.both(lambda r: r.add(key, adapters))
        self.both(lambda r: r.set_adapters(key, adapters))
        for call in (lambda r: r.adapters(key), lambda r: r.load(key),
                     lambda r: key in r, lambda r: r.acquire(key), lambda r: r.remove(key)):
            self.both(call)

    @rule(ticket=st.one_of(st.integers(-(2**70), 2**70), st.integers(0, 12 << 20),
                           st.builds(lambda g, s: (g << 20) | s, st.integers(0, 40),
                                     st.integers(0, 12)),
                           st.sampled_from([True, False, 1.0, None, "1", 2**64, -1])))
    def release_odd(self, ticket: Any) -> None:
        self.both(lambda r: r.release(ticket))
        for weight in BAD_WEIGHTS:
            self.both(lambda r: r.release(ticket, weight))

    @rule(data=st.data(), weight=st.sampled_from(BAD_WEIGHTS))
    def acquire_odd(self, data: st.DataObject, weight: Any) -> None:
        key = self.present(data)
        self.both(lambda r: r.acquire(key, weight))

    @rule(factor=st.sampled_from([99, 1_000_001, 1.5, True, 10**7, "125", None]))
    def set_factor_odd(self, factor: Any) -> None:
        self.both(lambda r: setattr(r, "mean_load_factor", factor))

    @invariant()
    def same_state(self) -> None:
        if self.py is None:
            return
        py, cy = self.py, self.cy
        assert py.keys() == cy.keys()
        assert len(py) == len(cy)
        assert py.total == cy.total
        assert py.stats() == cy.stats()
        assert (py.mean_load_factor, py.replication) == (cy.mean_load_factor, cy.replication)
        loads = [py.load(k) for k in py.keys()]
        assert loads == [cy.load(k) for k in cy.keys()]
        assert [py.adapters(k) for k in py.keys()] == [cy.adapters(k) for k in cy.keys()]
        assert sum(loads) == py.total and min(loads, default=0) >= 0


TestTwins = Twins.TestCase
TestTwins.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.filter_too_much])


# -- long histories at production replication -------------------------------------------------


def _random_history(seed: int, steps: int) -> None:
    """A long random history at 64 vnodes and up to 24 endpoints: more vnodes per endpoint
    than the state machine uses, so merges, compaction and the bucket index are exercised at
    sizes where every bucket holds several vnodes."""
    rng = random.Random(seed)
    factor = rng.choice([100, 125, 150])
    py, cy = chwbl.Ring(64, factor, seed), native.Ring(64, factor, seed)
    pool = [f"default/model-{i}" for i in range(24)]
    tickets: list[int] = []

    def both(call: Callable[[Any], Any]) -> tuple[str, Any]:
        got = outcome(call, py), outcome(call, cy)
        assert got[0] == got[1]
        return got[0]

    for _ in range(steps):
        op = rng.random()
        key = rng.choice(pool)
        # Draw every random argument before calling `both`: each ring must see the same one.
        if op < 0.06:
            adapters = frozenset(rng.sample(ADAPTERS[1:], rng.randrange(3)))
            both(lambda r: r.add(key, adapters))
        elif op < 0.09:
            both(lambda r: r.remove(key))
        elif op < 0.11:
            adapters = ADAPTERS[rng.randrange(4):]
            both(lambda r: r.set_adapters(key, adapters))
        elif op < 0.45 and tickets:
            ticket, weight = tickets.pop(rng.randrange(len(tickets)))
            both(lambda r: r.release(ticket, weight))
        else:
            prefix = f"user-{rng.randrange(200)}"
            adapter = rng.choice(ADAPTERS + ["nope"])
            exclude = rng.sample(pool, rng.randrange(3)) if rng.random() < 0.2 else ()
            kind = rng.random()
            weight = rng.randrange(1, 2000) if rng.random() < 0.3 else 1
            if kind < 0.6:
                status, picked = both(lambda r: r.pick(prefix, adapter, exclude, weight))
            elif kind < 0.8:
                affinity = {k: rng.choice([0.0, 0.5, 1.0, rng.random()])
                            for k in rng.sample(pool, rng.randrange(4))}
                queues = {k: rng.choice([0.0, 2.0, rng.random() * 8]) for k in pool[:12]}
                status, picked = both(lambda r: r.pick_scored(prefix, adapter, exclude, weight,
                                                              by_slot(r, affinity), queues, 3.0,
                                                              1.0, 1.0))
            elif kind < 0.85:
                affinity = {k: rng.choice([0.0, 0.5, 1.0, rng.random()])
                            for k in rng.sample(pool, rng.randrange(4))}
                queues = {k: rng.choice([0.0, 2.0, rng.random() * 8]) for k in pool[:12]}
                tokens = rng.choice([0.0, 256.0, rng.random() * 8000])
                status, picked = both(lambda r: r.pick_cost(prefix, adapter, exclude, weight,
                                                            by_slot(r, affinity), queues, tokens,
                                                            16.0, 512.0))
            elif kind < 0.9:
                status, picked = both(lambda r: r.pick_least_load(adapter, exclude))
            else:
                status, picked = both(lambda r: r.pick_random(adapter, exclude))
            if picked is not None:
                tickets.append((both(lambda r: r.acquire(picked, weight))[1], weight))
        assert py.total == cy.total and py.stats() == cy.stats()
    assert py.keys() == cy.keys()
    assert [py.load(k) for k in py.keys()] == [cy.load(k) for k in cy.keys()]


@pytest.mark.parametrize("seed", range(4))
def test_long_random_histories_agree(seed: int) -> None:
    _random_history(seed, 3000)


class Text(str):
    """A str subclass (what some frameworks hand over): accepted and hashed like str."""


def test_str_subclasses_are_treated_as_str() -> None:
    rings = [chwbl.Ring(replication=16), native.Ring(replication=16)]
    for ring in rings:
        ring.add(Text("pod-é"), [Text("lora")])
        ring.add("pod-b")
    calls = [lambda r: r.pick(Text("prefix")), lambda r: r.pick("p", Text("lora")),
             lambda r: r.acquire(Text("pod-b")), lambda r: r.pick_least_load(Text("lora")),
             lambda r: r.pick("q", "", [Text("pod-b")]), lambda r: r.keys(), lambda r: r.stats()]
    for call in calls:
        assert outcome(call, rings[0]) == outcome(call, rings[1])
    assert native.hash64(Text("é\ud800")) == chwbl.hash64(Text("é\ud800"))
