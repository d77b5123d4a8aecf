"""Which replica serves a request: PrefixHash (CHWBL) keeps a first user message on one replica
until its load bound is hit; LeastLoad and Random spread load. All through real HTTP, with
load built by holding requests open in the backends."""

from __future__ import annotations

import asyncio
import collections
import math
from fractions import Fraction

import pytest

from tests.gateway_harness import GatewayHarness


def walk_order(gw: GatewayHarness, model: str, key: str, adapter: str = "") -> list[str]:
    """The replicas in the order the ring's walk meets them for ``key`` (asked of the gateway's
    ring with nothing in flight: each pick excluding the previous ones)."""
    ring = gw.on_loop(lambda: gw.registry.group(model).ring)
    order: list[str] = []
    while True:
        key_found = gw.on_loop(ring.pick, adapter + key, adapter, list(order))
        if key_found is None or key_found in order:
            return order
        order.append(key_found)


def expected_bounded_picks(order: list[str], n_requests: int, factor: int,
                           n_endpoints: int) -> list[str]:
    """The paper's rule, written out independently: walk the replicas in ring order and take
    the first whose load is below ``ceil(factor / 100 * (total + 1) / n)``; if none is, the
    first one. Every pick stays in flight."""
    loads = collections.Counter()
    picks = []
    for _ in range(n_requests):
        total = sum(loads.values())
        room = math.ceil(Fraction(factor, 100) * (total + 1) / n_endpoints)
        chosen = next((e for e in order if loads[e] < room), order[0])
        loads[chosen] += 1
        picks.append(chosen)
    return picks


def conversation(first_user: str, variant: int) -> list[dict]:
    """Different system prompts and later turns around the same first user message."""
    messages = [{"role": "system", "content": f"You are assistant #{variant}."}] if variant % 2 \
        else []
    messages.append({"role": "user", "content": first_user})
    for turn in range(variant % 4):
        messages += [{"role": "assistant", "content": f"answer {turn}"},
                     {"role": "user", "content": f"follow-up {turn} of {variant}"}]
    return messages


def test_same_first_user_message_same_replica(gw):
    backends = [gw.backend(f"r{i}") for i in range(4)]
    gw.model_with("m", backends, strategy="PrefixHash")
    client = gw.client()
    served: dict[str, set[str]] = collections.defaultdict(set)
    for p in range(16):
        first = f"Summarise document {p} for me please."
        for variant in range(6):
            response = client.chat.completions.create(model="m",
                                                      messages=conversation(first, variant))
            served[first].add(response.system_fingerprint)
        assert served[first] == {walk_order(gw, "m", first)[0]}
    # Different prefixes spread over the replicas.
    assert len(set().union(*served.values())) >= 3
    gw.settle()


def test_prefix_is_the_first_characters_and_content_parts_count(gw):
    backends = [gw.backend(f"r{i}") for i in range(5)]
    gw.model_with("m", backends, strategy="PrefixHash", prefix_char_length=20)
    client = gw.client()
    expected = walk_order(gw, "m", "ABCDEFGHIJKLMNOPQRST")[0]
    variants = [
        "ABCDEFGHIJKLMNOPQRST",
        "ABCDEFGHIJKLMNOPQRST and then something else entirely",
        [{"type": "text", "text": "ABCDEFGHIJ"}, {"type": "text", "text": "KLMNOPQRST-tail"}],
        [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
         {"type": "text", "text": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}],
    ]
    for content in variants:
        response = client.chat.completions.create(
            model="m", messages=[{"role": "system", "content": "sys"},
                                 {"role": "user", "content": content}])
        assert response.system_fingerprint == expected, content
    # Completions route on the prompt (or its first string).
    for prompt in ["ABCDEFGHIJKLMNOPQRST!!", ["ABCDEFGHIJKLMNOPQRST??", "other"]]:
        assert client.completions.create(model="m", prompt=prompt).system_fingerprint == expected
    gw.settle()


@pytest.mark.parametrize("factor,n_backends,n_requests", [(125, 3, 9), (150, 4, 14)])
async def test_prefix_spills_when_load_bound_is_hit(gw, factor, n_backends, n_requests):
    backends = [gw.backend(f"r{i}") for i in range(n_backends)]
    by_name = {b.name: b for b in backends}
    gw.model_with("m", backends, strategy="PrefixHash", mean_load_factor=factor)
    first = "A very popular shared system preamble and question"
    order = walk_order(gw, "m", first)
    assert sorted(order) == sorted(by_name)
    for backend in backends:
        await gw.loop.acall(backend.hold)
    async with gw.async_client() as client:
        tasks, picks = [], []
        for i in range(n_requests):
            before = {b.name: b.total_calls for b in backends}
            tasks.append(asyncio.ensure_future(client.chat.completions.create(
                model="m", messages=conversation(first, i))))
            await gw.await_for(lambda: sum(b.in_flight for b in backends) == i + 1,
                               what=f"request {i} to reach a replica")
            picks.append(next(b.name for b in backends if b.total_calls > before[b.name]))
        loads = await gw.loop.acall(lambda: {k: gw.registry.group("m").ring.load(k)
                                             for k in by_name})
        assert loads == {name: picks.count(name) for name in by_name}
        for backend in backends:
            await gw.loop.acall(backend.release)
        results = await asyncio.gather(*tasks)
    assert [r.system_fingerprint for r in results] == picks
    assert picks == expected_bounded_picks(order, n_requests, factor, n_backends)
    assert picks[0] == order[0]
    assert len(set(picks)) > 1  # it spilled
    await gw.asettle()
    # Load gone, the prefix goes home again.
    async with gw.async_client() as client:
        again = await client.chat.completions.create(model="m", messages=conversation(first, 0))
    assert again.system_fingerprint == order[0]
    scraped = await asyncio.to_thread(gw.scrape)
    assert gw.metric("kvgate_hash_lookups_total", scraped, model="m") >= n_requests + 1
    # The paper's capacities add up to at least total + 1: some replica always had room.
    assert gw.metric("kvgate_hash_lookup_fallbacks_total", scraped, model="m") == 0
    await gw.asettle()


async def test_prefix_routing_with_adapters(gw):
    plain, l1, l2 = gw.backend("plain"), gw.backend("l1"), gw.backend("l2")
    gw.add_model("m", adapters=["lora"], strategy="PrefixHash")
    gw.set_endpoints("m", [plain.endpoint(), l1.endpoint("lora"), l2.endpoint("lora")])
    async with gw.async_client() as client:
        for p in range(10):
            first = f"adapter question {p}"
            expected = walk_order(gw, "m", first, adapter="lora")[0]
            for variant in range(3):
                response = await client.chat.completions.create(
                    model="m_lora", messages=conversation(first, variant))
                assert response.system_fingerprint == expected
    assert plain.total_calls == 0
    await gw.asettle()


async def test_least_load_spreads_in_flight_requests(gw):
    backends = [gw.backend(f"r{i}") for i in range(3)]
    gw.model_with("m", backends, strategy="LeastLoad")
    for backend in backends:
        await gw.loop.acall(backend.hold)
    async with gw.async_client() as client:
        tasks = []
        for i in range(7):
            tasks.append(asyncio.ensure_future(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "same prompt"}])))
            await gw.await_for(lambda: sum(b.in_flight for b in backends) == i + 1,
                               what=f"request {i} to reach a replica")
            loads = sorted(b.in_flight for b in backends)
            assert loads[-1] - loads[0] <= 1  # always the least loaded
        for backend in backends:
            await gw.loop.acall(backend.release)
        await asyncio.gather(*tasks)
    assert sorted(b.total_calls for b in backends) == [2, 2, 3]
    await gw.asettle()


def test_least_load_rotates_idle_replicas(gw):
    backends = [gw.backend(f"r{i}") for i in range(3)]
    gw.model_with("m", backends, strategy="LeastLoad")
    client = gw.client()
    for _ in range(9):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert [b.total_calls for b in backends] == [3, 3, 3]


def test_random_strategy_uses_every_replica(gw):
    backends = [gw.backend(f"r{i}") for i in range(3)]
    lora = gw.backend("lora-only")
    gw.add_model("m", adapters=["lora"], strategy="Random",
                 features=["TextGeneration", "TextEmbedding"])
    gw.set_endpoints("m", [*backends, lora.endpoint("lora")])
    client = gw.client()
    for _ in range(240):
        client.embeddings.create(model="m", input="same", encoding_format="float")
    counts = [b.total_calls for b in [*backends, lora]]
    assert sum(counts) == 240
    assert all(30 <= c <= 100 for c in counts), counts
    for _ in range(20):
        client.embeddings.create(model="m_lora", input="x", encoding_format="float")
    assert lora.total_calls == counts[-1] + 20
    gw.settle()
