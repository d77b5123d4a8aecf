"""Behaviour of the CHWBL ring, checked on both implementations.

Each test states a property the gateway relies on: the load bound, minimal disruption when
replicas come and go, an even spread of prefixes, KubeAI's golden scenario, determinism across
processes, exact in-flight accounting, adapter and exclude filtering, and refusal of bad input
without damage. Loops over 100k keys run on the Cython ring; the twin gets a smaller sample (the
twin tests prove the two give identical answers, so the small sample is a cross-check).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from types import ModuleType
from typing import Any

import pytest

from lb import chwbl

try:
    from lb import _chwbl as native
except ImportError:  # the twin still gets tested; the Cython cases are skipped
    native = None

needs_native = pytest.mark.skipif(native is None, reason="the Cython ring is not built")
IMPLS = [pytest.param(chwbl, id="python"), pytest.param(native, id="cython", marks=needs_native)]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def sample_size(impl: ModuleType, full: int) -> int:
    """The twin is ~20x slower per pick: give it a tenth of the keys."""
    return full if impl is native else full // 10


def random_keys(count: int, seed: int = 2024) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(128):032x}" for _ in range(count)]


def ring_of(impl: ModuleType, keys: list[str], **kwargs: Any) -> Any:
    ring = impl.Ring(**kwargs)
    for key in keys:
        ring.add(key)
    return ring


def capacity(ring: Any) -> int:
    """The paper's capacity for the next request, ceil(f * m / n) with m = total + 1, written
    out independently of the ring's own check (exact, in fractions)."""
    return math.ceil(Fraction(ring.mean_load_factor, 100) * (ring.total + 1) / len(ring))


def within_bound(ring: Any, key: str) -> bool:
    return ring.load(key) < capacity(ring)


def snapshot(ring: Any) -> tuple:
    keys = ring.keys()
    return (keys, [ring.load(k) for k in keys], [ring.adapters(k) for k in keys], ring.total,
            len(ring))


# -- the bound ----------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [100, 125, 150])
def test_no_pick_exceeds_the_bound_while_an_endpoint_within_it_exists(impl, factor) -> None:
    ring = ring_of(impl, [f"pod-{i}" for i in range(6)], replication=64, mean_load_factor=factor)
    ring.set_adapters("pod-1", {"lora"})
    ring.set_adapters("pod-4", {"lora"})
    rng = random.Random(factor)
    in_flight: list[int] = []
    hot = [f"prompt-{i}" for i in range(5)]  # a few hot prefixes push keys past their owner
    fallbacks = 0
    for _ in range(sample_size(impl, 20_000)):
        if in_flight and rng.random() < 0.45:
            assert ring.release(in_flight.pop(rng.randrange(len(in_flight)))) is True
            continue
        adapter = "lora" if rng.random() < 0.2 else ""
        picked = ring.pick(rng.choice(hot), adapter)
        matching = [k for k in ring.keys() if not adapter or adapter in ring.adapters(k)]
        assert picked in matching
        if not within_bound(ring, picked):
            fallbacks += 1
            assert not any(within_bound(ring, k) for k in matching)
        in_flight.append(ring.acquire(picked))
    assert ring.stats()[2] == fallbacks
    while in_flight:
        ring.release(in_flight.pop())
    assert ring.total == 0


def test_bounded_loads_spill_in_ring_order(impl) -> None:
    """One hot prefix at 125%: its owner takes load up to the bound, then the next endpoints
    clockwise take the rest, and no endpoint ever ends above ceil(1.25 * mean)."""
    ring = ring_of(impl, [f"pod-{i}" for i in range(4)], replication=32)
    owner = ring.pick("hot")
    for _ in range(400):
        ring.acquire(ring.pick("hot"))
    loads = [ring.load(k) for k in ring.keys()]
    assert sum(loads) == 400 and ring.load(owner) == max(loads)
    assert max(loads) <= math.ceil(1.25 * 400 / 4) + 1


def test_some_endpoint_always_has_room(impl) -> None:
    """Capacities add up to at least total + 1, so a pick over the whole group never falls
    back, however skewed the keys (the fallback only exists for adapters and exclusions)."""
    ring = ring_of(impl, [f"pod-{i}" for i in range(7)], replication=8, mean_load_factor=100)
    for i in range(sample_size(impl, 3_000)):
        picked = ring.pick(f"hot-{i % 3}")
        assert within_bound(ring, picked)
        ring.acquire(picked)
    assert ring.stats()[2] == 0
    assert max(ring.load(k) for k in ring.keys()) == math.ceil(ring.total / 7)


def hot_key_loads(impl: ModuleType, n: int, requests: int, factor: int = 125) -> list[int]:
    """Loads after `requests` picks of one hot key over `n` endpoints, each kept in flight,
    listed in the order the endpoints first received a request (their order on the key's walk),
    then the idle ones."""
    ring = ring_of(impl, [f"pod-{i}" for i in range(n)], replication=64, mean_load_factor=factor)
    first_seen: list[str] = []
    for _ in range(requests):
        picked = ring.pick("the same long system prompt")
        ring.acquire(picked)
        if picked not in first_seen:
            first_seen.append(picked)
    return [ring.load(k) for k in first_seen] + [0] * (n - len(first_seen))


# Worked by hand from the paper's rule: request m (1-based) goes to the first endpoint on the
# walk whose load is below ceil(1.25 * m / n).
HOT_KEY_GOLDEN = [
    # n = 4: capacity 1 for m <= 3, 2 for m <= 6, 3 for m <= 9, 4 for m <= 12, 5 for m <= 16;
    # three endpoints always have room first, the fourth only once all three hold 5 (m = 16).
    (4, 1, [1, 0, 0, 0]),
    (4, 3, [1, 1, 1, 0]),
    (4, 4, [2, 1, 1, 0]),
    (4, 8, [3, 3, 2, 0]),
    (4, 12, [4, 4, 4, 0]),
    (4, 15, [5, 5, 5, 0]),
    (4, 16, [5, 5, 5, 1]),
    # n = 16: capacity stays 1 up to m = 12 (1.25 * 12 / 16 = 0.94): 12 requests, 12 replicas.
    (16, 12, [1] * 12 + [0] * 4),
    (16, 13, [2] + [1] * 11 + [0] * 4),
    # n = 64: capacity 1 up to m = 51 (63.75 / 64); the 52nd request is the first to share.
    (64, 51, [1] * 51 + [0] * 13),
    (64, 52, [2] + [1] * 50 + [0] * 13),
]


@pytest.mark.parametrize(("n", "requests", "expected"), HOT_KEY_GOLDEN)
def test_one_hot_key_fills_the_walk_to_the_papers_capacity(impl, n, requests, expected) -> None:
    assert hot_key_loads(impl, n, requests) == expected


# -- minimal disruption ---------------------------------------------------------------------------


def test_removing_an_endpoint_moves_only_its_keys(impl) -> None:
    endpoints = [f"10.0.0.{i}:8000" for i in range(10)]
    ring = ring_of(impl, endpoints)
    keys = random_keys(sample_size(impl, 20_000))
    before = {k: ring.pick(k) for k in keys}
    gone = endpoints[3]
    ring.remove(gone)
    after = {k: ring.pick(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == gone for k in moved)
    assert all(after[k] != gone for k in keys)
    assert len(moved) == sum(1 for k in keys if before[k] == gone)


def test_adding_an_endpoint_moves_about_one_in_n_plus_one(impl) -> None:
    n = 10
    ring = ring_of(impl, [f"10.0.0.{i}:8000" for i in range(n)])
    keys = random_keys(sample_size(impl, 50_000), seed=7)
    before = {k: ring.pick(k) for k in keys}
    ring.add("10.0.0.99:8000")
    moved = [k for k in keys if ring.pick(k) != before[k]]
    assert all(ring.pick(k) == "10.0.0.99:8000" for k in moved)  # only onto the newcomer
    fraction = len(moved) / len(keys)
    # The newcomer's share has a relative spread of ~1/sqrt(256) = 6%: 30% tolerance is ~5 sigma.
    assert abs(fraction - 1 / (n + 1)) <= 0.3 / (n + 1), fraction


# -- uniformity -----------------------------------------------------------------------------------


def share_sigma(n: int, replication: int, samples: int) -> float:
    """Relative std-dev of one endpoint's share: vnode arcs (an endpoint's share of a ring of
    random points is Beta(r, (n-1) r), relative sd ~ sqrt((1 - 1/n) / r)) plus key sampling."""
    return math.sqrt((1 - 1 / n) / replication + n / samples)


@pytest.mark.parametrize("n", [2, 3, 8, 16, 64])
def test_uniformity_at_256_vnodes(impl, n) -> None:
    """Every endpoint's share of random prefixes, at KubeAI's default replication.

    What is true at 256 vnodes: a share's relative spread is ~6% (~4.4% for n=2), so the
    issue's literal "+-15% at 64 endpoints" sits at ~2.4 sigma and "+-4% for 2 endpoints" at
    ~0.9 sigma -- whether they hold depends on the endpoint names. We assert what the ring
    must deliver whatever the names: no share beyond 4.5 sigma, and (n >= 8) the spread across
    endpoints no wider than the theory's. The literal tolerances are asserted below at a
    replication where they are a property, not luck."""
    keys = random_keys(sample_size(impl, 100_000))
    ring = ring_of(impl, [f"default/model-{i}" for i in range(n)])
    counts = Counter(map(ring.pick, keys))
    fair = len(keys) / n
    deviations = [(counts[k] - fair) / fair for k in ring.keys()]
    sigma = share_sigma(n, 256, len(keys))
    assert sum(counts.values()) == len(keys) and len(counts) == n
    assert max(map(abs, deviations)) <= 4.5 * sigma, deviations
    if n >= 8:
        rms = math.sqrt(sum(d * d for d in deviations) / n)
        assert rms <= 1.5 * sigma, (rms, sigma)


@needs_native
@pytest.mark.parametrize("n,replication,tolerance", [
    (2, 8192, 0.04), (3, 1024, 0.15), (8, 1024, 0.15), (16, 1024, 0.15), (64, 1024, 0.15)])
def test_uniformity_issue_tolerances(n, replication, tolerance) -> None:
    """The issue's tolerances (+-15%; 2 endpoints within 4% like KubeAI's test) hold with
    margin (>= 3.5 sigma) once replication is high enough, as the theory above predicts."""
    keys = random_keys(100_000, seed=11)
    ring = ring_of(native, [f"default/model-{i}" for i in range(n)], replication=replication)
    counts = Counter(map(ring.pick, keys))
    fair = len(keys) / n
    assert tolerance >= 3.5 * share_sigma(n, replication, len(keys))
    assert all(abs(counts[k] - fair) / fair <= tolerance for k in ring.keys()), counts


@needs_native
def test_key_shares_match_the_arcs_the_vnodes_own() -> None:
    """A key belongs to the first vnode at or after its hash: the share of keys each endpoint
    gets must match the ring arcs its vnodes close, computed here from the hashes alone."""
    endpoints = [f"pod-{i}" for i in range(5)]
    ring = ring_of(native, endpoints, replication=16)
    points = sorted((native.hash64(f"{e}#{i}"), e) for e in endpoints for i in range(16))
    arcs = Counter()
    for (prev, _), (point, owner) in zip([points[-1]] + points[:-1], points):
        arcs[owner] += (point - prev) % 2**64
    keys = random_keys(100_000, seed=5)
    counts = Counter(map(ring.pick, keys))
    for e in endpoints:
        expected = arcs[e] / 2**64
        assert abs(counts[e] / len(keys) - expected) <= 5 * math.sqrt(expected / len(keys))


# -- KubeAI's golden scenario ---------------------------------------------------------------------


def send(ring: Any, key: str, count: int) -> Counter:
    """`count` requests for `key`, each acquired and kept in flight, like KubeAI's test."""
    got: Counter = Counter()
    for _ in range(count):
        endpoint = ring.pick(key)
        ring.acquire(endpoint)
        got[endpoint] += 1
    return got


def golden_rings(impl: ModuleType) -> tuple[Any, Any]:
    model_a = ring_of(impl, ["pod-a-1", "pod-a-2"], replication=1, mean_load_factor=150)
    model_b = ring_of(impl, ["pod-b-1"], replication=1, mean_load_factor=150)
    for _ in range(10):
        model_a.acquire("pod-a-1")
        model_a.acquire("pod-a-2")
    return model_a, model_b


# With replication 1 each endpoint has one vnode, at hash("<key>#0"); hashing exactly that
# string lands on it, so these prefixes prefer pod-a-1 and pod-a-2 respectively.
TO_A1, TO_A2 = "pod-a-1#0", "pod-a-2#0"


def test_kubeai_golden_scenario(impl) -> None:
    model_a, model_b = golden_rings(impl)
    # The j-th request (j = 0, 1, ...) stays on pod-a-1 while 10 + j < ceil(1.5 * (21 + j) / 2),
    # i.e. 10 + j < 0.75 * (21 + j), i.e. j < 23: all 20 requests take it from 10 to 30.
    assert send(model_a, TO_A1, 20) == {"pod-a-1": 20}
    # j = 20, 21, 22 still fit; j = 23 finds pod-a-1 at 33 = ceil(0.75 * 44): pod-a-2.
    assert send(model_a, TO_A1, 4) == {"pod-a-1": 3, "pod-a-2": 1}
    assert (model_a.load("pod-a-1"), model_a.load("pod-a-2"), model_a.total) == (33, 11, 44)
    # pod-a-2 is first on its key's walk, and its j-th extra request needs
    # 11 + j < 0.75 * (45 + j), i.e. j < 91. All 20 go to pod-a-2.
    assert send(model_a, TO_A2, 20) == {"pod-a-2": 20}
    assert (model_a.load("pod-a-1"), model_a.load("pod-a-2")) == (33, 31)
    # A second model's ring is independent: pod-a-2's prefix, 100k requests, one endpoint.
    assert send(model_b, TO_A2, sample_size(impl, 100_000)) == {
        "pod-b-1": sample_size(impl, 100_000)}
    assert (model_a.total, model_a.load("pod-a-2")) == (64, 31)


def test_kubeai_golden_scenario_in_kubeais_own_steps(impl) -> None:
    """KubeAI's test cuts the traffic as 1, 20, 4, then 20 to pod-a-2. Its own check
    (load <= m / n * f) expects 19/1 for the 20 and 3/1 for the 4; the paper's capacity keeps
    pod-a-1 for j < 23 (21 requests), then the 4 go 2, pod-a-2 (33 = ceil(0.75 * 44)), 1
    (33 < ceil(0.75 * 45) = 34)."""
    model_a, _ = golden_rings(impl)
    steps = [(TO_A1, 1, {"pod-a-1": 1}), (TO_A1, 20, {"pod-a-1": 20}),
             (TO_A1, 4, {"pod-a-1": 3, "pod-a-2": 1}), (TO_A2, 20, {"pod-a-2": 20})]
    for key, count, expected in steps:
        assert send(model_a, key, count) == expected


# -- vnode keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("replication", [11, 64])
def test_vnode_separator_keeps_a1_and_a_apart(impl, replication) -> None:
    """KubeAI hashes key+i, so "a1"+"0" and "a"+"10" are the same vnode. Ours differ, and every
    vnode is really on the ring: hashing its exact input lands on its own endpoint."""
    assert "a1" + "0" == "a" + "10"  # the collision being avoided
    ring = ring_of(impl, ["a1", "a"], replication=replication)
    inputs = {key: [f"{key}#{i}" for i in range(replication)] for key in ("a1", "a")}
    hashes = {impl.hash64(text) for texts in inputs.values() for text in texts}
    assert len(hashes) == 2 * replication
    for key, texts in inputs.items():
        assert all(ring.pick(text) == key for text in texts)


# -- determinism ----------------------------------------------------------------------------------


DETERMINISM_ENDPOINTS = [f"ns/vllm-{i}" for i in range(12)]


def picks_for(impl: ModuleType, order: list[str], keys: list[str]) -> list[str]:
    ring = impl.Ring()
    for key in order:
        ring.add(key)
    return [ring.pick(k) for k in keys]


def test_add_order_does_not_change_picks(impl) -> None:
    keys = random_keys(sample_size(impl, 20_000), seed=3)
    reference = picks_for(impl, DETERMINISM_ENDPOINTS, keys)
    rng = random.Random(9)
    for _ in range(3):
        shuffled = DETERMINISM_ENDPOINTS[:]
        rng.shuffle(shuffled)
        assert picks_for(impl, shuffled, keys) == reference
    # Churn that ends with the same set: slots and generations differ, picks must not.
    ring = ring_of(impl, DETERMINISM_ENDPOINTS + ["ns/extra"])
    for key in DETERMINISM_ENDPOINTS[:4]:
        ring.remove(key)
    ring.remove("ns/extra")
    for key in reversed(DETERMINISM_ENDPOINTS[:4]):
        ring.add(key)
    assert [ring.pick(k) for k in keys] == reference


def test_a_fresh_process_picks_the_same(impl) -> None:
    """Two gateway replicas must agree: no dependence on PYTHONHASHSEED or process state."""
    keys = random_keys(500, seed=4) + ["", "é日本", "\ud800x"]
    script = (
        "import json, sys, importlib\n"
        f"impl = importlib.import_module({impl.__name__!r})\n"
        "keys = json.loads(sys.stdin.read())\n"
        "ring = impl.Ring()\n"
        f"for key in {DETERMINISM_ENDPOINTS[::-1]!r}:\n"
        "    ring.add(key)\n"
        "print(json.dumps([ring.pick(k) for k in keys]))\n"
    )
    expected = picks_for(impl, DETERMINISM_ENDPOINTS, keys)
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", script], input=json.dumps(keys),
                              capture_output=True, text=True, env=env, check=True, timeout=60)
        assert json.loads(done.stdout) == expected


# -- accounting -----------------------------------------------------------------------------------


async def hammer(ring: Any, tasks: int, per_task: int, churn: bool) -> dict:
    """`tasks` coroutines pick, acquire, await a random number of times, and release.
    With `churn`, another task removes and re-adds endpoints meanwhile."""
    stale = Counter()
    done = asyncio.Event()

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for i in range(per_task):
            adapter = "lora" if rng.random() < 0.1 else ""
            strategy = rng.random()
            if strategy < 0.7:
                picked = ring.pick(f"user-{rng.randrange(50)}", adapter)
            elif strategy < 0.9:
                picked = ring.pick_least_load(adapter)
            else:
                picked = ring.pick_random(adapter)
            if picked is None:  # churn removed every adapter holder for a moment
                await asyncio.sleep(0)
                continue
            ticket = ring.acquire(picked)
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            stale[ring.release(ticket)] += 1
            assert ring.total >= 0

    async def churner() -> None:
        rng = random.Random(99)
        while not done.is_set():
            victim = rng.choice(ring.keys())
            ring.remove(victim)
            await asyncio.sleep(0)
            ring.add(victim, {"lora"} if rng.random() < 0.5 else ())
            await asyncio.sleep(0)

    churn_task = asyncio.ensure_future(churner()) if churn else None
    await asyncio.gather(*(worker(seed) for seed in range(tasks)))
    done.set()
    if churn_task:
        await churn_task
    return stale


@pytest.mark.parametrize("churn", [False, True], ids=["steady", "churn"])
async def test_interleaved_acquire_release_ends_at_zero(impl, churn) -> None:
    ring = ring_of(impl, [f"pod-{i}" for i in range(8)], replication=32)
    ring.set_adapters("pod-0", {"lora"})
    ring.set_adapters("pod-5", {"lora"})
    per_task = 500
    released = await hammer(ring, tasks=200, per_task=per_task, churn=churn)
    assert ring.total == 0
    assert all(ring.load(k) == 0 for k in ring.keys())
    assert sum(released.values()) >= 200 * per_task * 0.9
    if churn:
        assert released[False] > 0  # stale releases happened and were told apart
    else:
        assert released == {True: 200 * per_task}


def test_removing_an_endpoint_with_requests_in_flight(impl) -> None:
    ring = ring_of(impl, ["a", "b"])
    on_a = [ring.acquire("a") for _ in range(5)]
    on_b = [ring.acquire("b") for _ in range(3)]
    ring.remove("a")
    assert ring.total == 3  # a's requests left the total with it
    assert [ring.release(t) for t in on_a] == [False] * 5
    assert ring.total == 3
    ring.add("a")  # same key, same slot: the old tickets must not touch the new counters
    fresh = ring.acquire("a")
    assert fresh != on_a[0] and fresh & 0xFFFFF == on_a[0] & 0xFFFFF
    assert [ring.release(t) for t in on_a] == [False] * 5
    assert (ring.load("a"), ring.total) == (1, 4)
    assert all(ring.release(t) for t in on_b + [fresh])
    assert (ring.load("a"), ring.load("b"), ring.total) == (0, 0, 0)


def test_slots_are_reused_lowest_first(impl) -> None:
    ring = ring_of(impl, ["a", "b", "c", "d"])
    ring.remove("b")
    ring.remove("a")
    ring.add("x")
    ring.add("y")
    assert ring.keys() == ["x", "y", "c", "d"]
    assert ring.acquire("x") & 0xFFFFF == 0 and ring.acquire("y") & 0xFFFFF == 1


# -- adapters and exclude -------------------------------------------------------------------------


def test_adapter_picks_only_endpoints_that_have_it(impl) -> None:
    ring = ring_of(impl, [f"pod-{i}" for i in range(6)], replication=32)
    ring.set_adapters("pod-2", {"fr", "de"})
    ring.set_adapters("pod-4", {"fr"})
    keys = random_keys(sample_size(impl, 5_000))
    assert {ring.pick(k, "fr") for k in keys} == {"pod-2", "pod-4"}
    assert {ring.pick(k, "de") for k in keys} == {"pod-2"}
    assert {ring.pick_least_load("fr") for _ in range(10)} == {"pod-2", "pod-4"}
    assert {ring.pick_random("de") for _ in range(10)} == {"pod-2"}
    assert ring.pick("k", "es") is None
    assert ring.pick_least_load("es") is None and ring.pick_random("es") is None
    assert ring.pick("k", "de", exclude=["pod-2"]) is None
    ring.set_adapters("pod-2", set())  # unloaded: nobody serves "de" any more
    assert ring.pick("k", "de") is None
    ring.set_adapters("pod-5", ["de"])
    assert {ring.pick(k, "de") for k in keys[:500]} == {"pod-5"}
    assert ring.adapters("pod-5") == frozenset({"de"})
    ring.remove("pod-5")
    assert ring.pick("k", "de") is None


def test_adapter_loads_and_bound_use_the_whole_group(impl) -> None:
    """KubeAI's n in the bound is every endpoint of the model, not just adapter holders; an
    overloaded adapter holder is still returned when it is the only one (the fallback)."""
    ring = ring_of(impl, ["a", "b", "c"], replication=8)
    ring.set_adapters("b", {"fr"})
    for _ in range(50):
        ring.acquire(ring.pick("p", "fr"))
    assert ring.load("b") == 50 and ring.stats()[2] > 0


def test_excluded_endpoints_are_never_picked(impl) -> None:
    endpoints = [f"pod-{i}" for i in range(5)]
    ring = ring_of(impl, endpoints, replication=32)
    keys = random_keys(sample_size(impl, 5_000))
    excluded = {"pod-1", "pod-3"}
    forms = (set, sorted, tuple, frozenset, lambda keys: (k for k in keys), dict.fromkeys)
    for form in forms:  # any collection of keys, even a one-shot generator
        assert not {ring.pick(k, exclude=form(excluded)) for k in keys[:300]} & excluded
    assert not {ring.pick(k, exclude=excluded) for k in keys} & excluded
    assert {ring.pick_least_load(exclude=excluded) for _ in range(20)} == set(endpoints) - excluded
    assert not {ring.pick_random(exclude=excluded) for _ in range(50)} & excluded
    assert ring.pick("k", exclude=["nope", "pod-0"]) != "pod-0"  # unknown keys are ignored
    assert ring.pick("k", exclude=endpoints) is None
    assert ring.pick_least_load(exclude=endpoints) is None
    assert ring.pick_random(exclude=endpoints) is None
    with pytest.raises(TypeError):
        ring.pick("k", exclude="pod-0")  # a str is a collection of characters: refuse it


# -- LeastLoad and Random -------------------------------------------------------------------------


def test_least_load_takes_the_idlest_and_rotates_ties(impl) -> None:
    ring = ring_of(impl, ["a", "b", "c"])
    assert [ring.pick_least_load() for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    ring.acquire("a")
    ring.acquire("c")
    assert ring.pick_least_load() == "b"
    tickets = [ring.acquire(ring.pick_least_load()) for _ in range(30)]
    assert [ring.load(k) for k in "abc"] == [11, 10, 11]
    assert all(ring.release(t) for t in tickets)


def test_random_is_uniform_and_reproducible(impl) -> None:
    rings = [ring_of(impl, ["a", "b", "c", "d"], seed=5) for _ in range(2)]
    draws = [[r.pick_random() for _ in range(4000)] for r in rings]
    assert draws[0] == draws[1]
    counts = Counter(draws[0])
    assert all(abs(counts[k] - 1000) < 150 for k in "abcd")
    assert ring_of(impl, ["a", "b", "c", "d"], seed=6).pick_random() is not None


# -- bad input ------------------------------------------------------------------------------------


def test_empty_ring_answers_none(impl) -> None:
    ring = impl.Ring()
    assert ring.pick("anything") is None
    assert ring.pick_least_load() is None and ring.pick_random() is None
    assert (len(ring), ring.total, ring.keys(), "a" in ring) == (0, 0, [], False)


BAD_CALLS = [
    ("release of a bogus ticket", lambda r: r.release(-1), ValueError),
    ("release of ticket 0", lambda r: r.release(0), ValueError),
    ("release of generation 0", lambda r: r.release(5), ValueError),
    ("release of a future generation", lambda r: r.release(99 << 20), ValueError),
    ("release of a slot never used", lambda r: r.release((1 << 20) | 77), ValueError),
    ("release of a huge int", lambda r: r.release(2**90), ValueError),
    ("release of a bool", lambda r: r.release(True), TypeError),
    ("release of a float", lambda r: r.release(1.0), TypeError),
    ("release of None", lambda r: r.release(None), TypeError),
    ("acquire unknown", lambda r: r.acquire("nope"), KeyError),
    ("remove unknown", lambda r: r.remove("nope"), KeyError),
    ("load unknown", lambda r: r.load("nope"), KeyError),
    ("adapters unknown", lambda r: r.adapters("nope"), KeyError),
    ("set_adapters unknown", lambda r: r.set_adapters("nope", ()), KeyError),
    ("duplicate add", lambda r: r.add("a"), ValueError),
    ("empty key", lambda r: r.add(""), ValueError),
    ("adapters given as a str", lambda r: r.add("z", "lora"), TypeError),
    ("non-str adapter", lambda r: r.add("z", [1]), TypeError),
    ("non-str adapters on set", lambda r: r.set_adapters("a", [None]), TypeError),
    ("non-str key on add", lambda r: r.add(1), TypeError),
    ("None key on acquire", lambda r: r.acquire(None), TypeError),
    ("bytes key on remove", lambda r: r.remove(b"a"), TypeError),
    ("non-str key on load", lambda r: r.load(1), TypeError),
    ("non-str hash key", lambda r: r.pick(None), TypeError),
    ("bytes hash key", lambda r: r.pick(b"x"), TypeError),
    ("non-str adapter on pick", lambda r: r.pick("x", None), TypeError),
    ("non-str adapter on least load", lambda r: r.pick_least_load(1), TypeError),
    ("non-str adapter on random", lambda r: r.pick_random(b""), TypeError),
    ("exclude as a str", lambda r: r.pick_least_load("", "a"), TypeError),
    ("exclude not iterable", lambda r: r.pick("x", "", 5), TypeError),
    ("unhashable exclude item", lambda r: r.pick_random("", [[]]), TypeError),
    ("factor too low", lambda r: setattr(r, "mean_load_factor", 99), ValueError),
    ("factor not int", lambda r: setattr(r, "mean_load_factor", 1.25), ValueError),
]


@pytest.mark.parametrize("call,error", [pytest.param(c, e, id=name) for name, c, e in BAD_CALLS])
def test_bad_input_raises_without_damage(impl, call, error) -> None:
    ring = ring_of(impl, ["a", "b", "c"], replication=16)
    ring.set_adapters("b", {"lora"})
    tickets = [ring.acquire("a"), ring.acquire("b"), ring.acquire("b")]
    before, picks = snapshot(ring), [ring.pick(k) for k in random_keys(50)]
    with pytest.raises(error):
        call(ring)
    assert snapshot(ring) == before
    assert [ring.pick(k) for k in random_keys(50)] == picks
    assert all(ring.release(t) for t in tickets) and ring.total == 0


def test_double_release_is_refused(impl) -> None:
    ring = ring_of(impl, ["a"])
    ticket = ring.acquire("a")
    assert ring.release(ticket) is True
    with pytest.raises(ValueError):
        ring.release(ticket)
    assert (ring.load("a"), ring.total) == (0, 0)


@pytest.mark.parametrize("kwargs", [{"replication": 0}, {"replication": 65537},
                                    {"replication": "256"}, {"mean_load_factor": 99},
                                    {"mean_load_factor": 125.0}])
def test_bad_configuration_is_refused(impl, kwargs) -> None:
    with pytest.raises(ValueError):
        impl.Ring(**kwargs)


# -- which implementation runs --------------------------------------------------------------------


def ring_implementation(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "KVGATE_PURE_RING"}
    script = "import lb.ring as r, lb.chwbl as c; print(r.IMPLEMENTATION, r.Ring is c.Ring)"
    done = subprocess.run([sys.executable, "-c", script], env={**environ, **env},
                          capture_output=True, text=True, check=True, timeout=60)
    return done.stdout.strip()


@needs_native
def test_the_built_extension_is_the_one_in_use() -> None:
    assert ring_implementation() == "cython False"


def test_pure_ring_env_selects_the_twin() -> None:
    assert ring_implementation(KVGATE_PURE_RING="1") == "python True"
