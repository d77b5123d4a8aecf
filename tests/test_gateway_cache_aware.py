"""CacheAware through real HTTP (the openai SDK as client): requests go where their prompt's
blocks are (a shared system prompt, a growing conversation), within CHWBL's bound; a replica
that leaves is forgotten; and with KV events followed, the engines' own caches steer requests
the gateway never sent (the precise index), against the ring's home.

Which replica answered is read from ``system_fingerprint`` (the test backends put their name
there) or, for simulated replicas, from their own request counters.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any, Callable

import openai
import pytest

from bench.procs import consecutive_free_ports
from kvgate_sim import Replica, get_profile
from kvgate_sim.kv_events import KVEventsConfig
from lb import prompt_tokens
from lb.parse import parse_request
from lb.registry import Endpoint
from tests.gateway_harness import GatewayHarness

SYSTEM = "You are the archive's assistant: answer from the filed documents, citing them. " * 30


def chat(client: openai.OpenAI, model: str, messages: list[dict[str, str]]) -> str:
    """The name of the replica that answered."""
    response = client.chat.completions.create(model=model, messages=messages, max_tokens=4)
    return response.system_fingerprint


def test_a_shared_system_prompt_meets_on_one_replica(gw: GatewayHarness) -> None:
    """Twelve different first user messages behind one long system prompt: PrefixHash
    (KubeAI's key, the first user message) spreads them, losing the shared prefix on every
    replica but one; CacheAware keeps them where the system prompt's blocks already are."""
    backends = [gw.backend(f"r{i}") for i in range(4)]
    gw.model_with("aware", backends, strategy="CacheAware")
    gw.model_with("hashed", backends, strategy="PrefixHash")
    client = gw.client()
    served: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for model in ("aware", "hashed"):
        for i in range(12):
            question = f"Question {i}: what does file {i * 7} say about tides?"
            served[model][chat(client, model, [{"role": "system", "content": SYSTEM},
                                               {"role": "user", "content": question}])] += 1
    assert len(served["aware"]) == 1, served["aware"]
    assert len(served["hashed"]) >= 2, served["hashed"]
    gw.settle()


def test_each_conversation_stays_on_its_replica_and_conversations_spread(
        gw: GatewayHarness) -> None:
    backends = [gw.backend(f"r{i}") for i in range(4)]
    gw.model_with("m", backends, strategy="CacheAware")
    client = gw.client()
    homes: dict[int, set[str]] = collections.defaultdict(set)
    conversations = {c: [{"role": "user", "content": f"Conversation {c} opens on its own "
                          f"long topic, number {c}. " * 12}] for c in range(16)}
    for turn in range(4):
        for c, messages in conversations.items():
            homes[c].add(chat(client, "m", messages))
            messages += [{"role": "assistant", "content": f"Answer {turn} of {c}. " * 5},
                         {"role": "user", "content": f"Follow-up {turn} on {c}."}]
    assert all(len(replicas) == 1 for replicas in homes.values()), homes
    assert len(set().union(*homes.values())) >= 3
    gw.settle()


def test_the_bound_caps_the_replica_holding_the_prefix(gw: GatewayHarness) -> None:
    """Eight requests in flight at once on one shared prompt: the holder takes no more than
    CHWBL's capacity ceil(1.25 * (in flight + 1) / 4) at any pick; the rest spill."""
    backends = [gw.backend(f"r{i}") for i in range(4)]
    gw.model_with("m", backends, strategy="CacheAware")
    client = gw.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Warm up."}]
    holder = next(b for b in backends if b.name == chat(client, "m", messages))
    for backend in backends:
        gw.on_loop(backend.hold)

    async def flood() -> list[str]:
        aclient = gw.async_client()
        try:
            calls = [aclient.chat.completions.create(
                model="m", max_tokens=4, messages=[{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": f"Ask {i}."}])
                for i in range(8)]
            tasks = [asyncio.ensure_future(call) for call in calls]
            await gw.await_for(lambda: sum(b.in_flight for b in backends) == 8, timeout=20,
                               what="all eight requests to reach a replica")
            in_flight = {b.name: b.in_flight for b in backends}
            for backend in backends:
                await gw.loop.acall(backend.release)
            answers = await asyncio.gather(*tasks)
            assert in_flight[holder.name] <= 3, in_flight  # ceil(1.25 * 8 / 4) = 3 at the last pick
            assert in_flight[holder.name] >= 2, in_flight  # it still took its share first
            return [a.system_fingerprint for a in answers]
        finally:
            await aclient.close()

    answered = asyncio.run(flood())
    assert len(answered) == 8
    gw.settle()


def test_a_replica_that_leaves_is_forgotten(gw: GatewayHarness) -> None:
    backends = [gw.backend(f"r{i}") for i in range(3)]
    gw.model_with("m", backends, strategy="CacheAware")
    client = gw.client()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "First."}]
    first = chat(client, "m", messages)
    index = gw.on_loop(lambda: gw.registry.group("m").prefix_index)
    assert gw.on_loop(index.blocks_of, first) > 0
    gw.set_endpoints("m", [b for b in backends if b.name != first])
    assert gw.on_loop(index.blocks_of, first) == 0
    second = chat(client, "m", messages)
    assert second != first
    # the new holder keeps the prompt from now on
    assert {chat(client, "m", [*messages[:1], {"role": "user", "content": f"Again {i}."}])
            for i in range(5)} == {second}
    gw.settle()


def test_an_unknown_prompt_goes_to_the_least_loaded_replica_its_home_on_ties(
        gw: GatewayHarness) -> None:
    """No replica holds any of the prompt: among equally loaded replicas its CHWBL home (so
    idle gateway workers agree on where a new prefix goes); when the home is busier, the least
    loaded instead, so new conversations do not pile onto a replica by hash."""
    backends = [gw.backend(f"r{i}") for i in range(4)]
    gw.model_with("m", backends, strategy="CacheAware", cache_aware={"blockChars": 64})
    client = gw.client()
    ring = gw.on_loop(lambda: gw.registry.group("m").ring)
    prompts = [f"A brand new prompt {i} that nobody has sent before, long enough."
               for i in range(40)]
    for prompt in prompts[:8]:
        home = gw.on_loop(ring.pick, prompt[:64], "")
        assert client.completions.create(model="m", prompt=prompt,
                                          max_tokens=2).system_fingerprint == home
    homes = {}  # replica -> the unsent prompts whose home it is
    for prompt in prompts[8:]:
        homes.setdefault(gw.on_loop(ring.pick, prompt[:64], ""), []).append(prompt)
    busy = [name for name, own in homes.items() if len(own) >= 2][0]
    others = [name for name in homes if name != busy][:2]
    assert len(others) == 2, homes
    for backend in backends:
        gw.on_loop(backend.hold)

    async def with_three_replicas_busy() -> str:
        aclient = gw.async_client()
        try:
            held = [asyncio.ensure_future(aclient.completions.create(
                model="m", prompt=homes[name][0], max_tokens=2)) for name in (busy, *others)]
            await gw.await_for(lambda: sum(b.in_flight for b in backends) == 3, timeout=20,
                               what="three prompts to reach their homes")
            # the busy home is within CHWBL's bound (1 of 3 in flight on 4 replicas), so the
            # ring alone would send the next prompt of that home there
            second = asyncio.ensure_future(aclient.completions.create(
                model="m", prompt=homes[busy][1], max_tokens=2))
            await gw.await_for(lambda: sum(b.in_flight for b in backends) == 4, timeout=20,
                               what="the fourth prompt to reach a replica")
            for backend in backends:
                await gw.loop.acall(backend.release)
            answers = await asyncio.gather(*held)
            assert [a.system_fingerprint for a in answers] == [busy, *others]
            return (await second).system_fingerprint
        finally:
            await aclient.close()

    idle = ({b.name for b in backends} - {busy, *others}).pop()
    assert asyncio.run(with_three_replicas_busy()) == idle
    gw.settle()


# -- the precise index: the engines' own KV events ---------------------------------------------


def requests_served(replica: Replica) -> int:
    return replica.snapshot()["http"]["requests"]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.mark.parametrize("precise", [True, False])
def test_kv_events_steer_requests_to_the_replica_that_holds_them(gw: GatewayHarness,
                                                                   precise: bool) -> None:
    """Prompts sent to replica b behind the gateway's back (b's cache holds them, the
    approximate index knows nothing) and whose ring home is a: with KV events followed they go
    to b; without, to a. Both replicas share one host, so replica i publishes on the model's
    KV-event ports + i (its endpoint's ``kv_port_offset``), as local mode runs them."""
    port = consecutive_free_ports(4)
    replay = port + 2

    async def start(rank: int) -> Replica:
        events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                endpoint=f"tcp://*:{port + rank}",
                                replay_endpoint=f"tcp://*:{replay + rank}", topic="kv")
        return await Replica(get_profile("fast"), "m", kv_events=events).start()

    a, b = (gw.run(start(rank)) for rank in range(2))
    try:
        settings: dict[str, Any] = {"blockChars": 64}
        if precise:
            settings["kvEvents"] = {"port": port, "replayPort": replay, "topic": "kv"}
        gw.model_with("m", [Endpoint("a", a.address), Endpoint("b", b.address, kv_port_offset=1)],
                      strategy="CacheAware", engine="Sim", cache_aware=settings)
        if precise:
            wait_for(lambda: gw.on_loop(lambda: all(gw.gateway.kv_events.index.trusted(k)
                                                    for k in "ab")), what="both mirrors")
        ring = gw.on_loop(lambda: gw.registry.group("m").ring)
        prompts = [p for p in (f"Document {i} of the shared archive, read in full. " * 8
                               for i in range(40)) if gw.on_loop(ring.pick, p[:64], "") == "a"][:5]
        assert len(prompts) == 5
        direct = openai.OpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0, timeout=30)
        for prompt in prompts:
            direct.completions.create(model="m", prompt=prompt, max_tokens=2)
        if precise:
            hashes = [prompt_tokens.SIM.block_hashes(prompt_tokens.SIM.token_ids(parse_request(
                "completions", json.dumps({"model": "m", "prompt": p}).encode(),
                b"application/json"))) for p in prompts]
            index = gw.gateway.kv_events.index
            wait_for(lambda: all(gw.on_loop(index.match, "b", h) == len(h) for h in hashes),
                     what="b's mirror to hold the prompts")
        before = {r: requests_served(r) for r in (a, b)}
        client = gw.client()
        for prompt in prompts:
            client.completions.create(model="m", prompt=prompt, max_tokens=2)
        took = {name: requests_served(r) - before[r] for name, r in zip("ab", (a, b))}
        assert took == ({"a": 0, "b": 5} if precise else {"a": 5, "b": 0})
    finally:
        for replica in (a, b):
            gw.run(replica.stop())
    gw.settle()
