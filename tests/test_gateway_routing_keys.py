"""What the PrefixHash ring hashes: a session header, the first user message (KubeAI's key), or
the conversation from its start. Through real HTTP with the openai SDK as the client."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from lb.parse import ParsedRequest, parse_request, prefix_of
from tests.gateway_harness import GatewayHarness

SYSTEM = "You are the support assistant of a large retailer. " * 40  # ~2,000 characters


def ask(gw: GatewayHarness, messages: list[dict], model: str = "m",
        headers: dict[str, str] | None = None) -> str:
    response = gw.client().chat.completions.create(model=model, messages=messages,
                                                   extra_headers=headers)
    return response.system_fingerprint


def test_a_session_header_keeps_a_conversation_on_one_replica(gw) -> None:
    gw.model_with("m", [gw.backend(f"r{i}") for i in range(4)], strategy="PrefixHash")
    with_session = {ask(gw, [{"role": "user", "content": f"question {i}"}],
                        headers={"X-Session-ID": "conversation-42"}) for i in range(12)}
    without = {ask(gw, [{"role": "user", "content": f"question {i}"}]) for i in range(12)}
    assert len(with_session) == 1
    assert len(without) > 1
    gw.settle()


def test_the_session_header_name_is_configurable(make_gateway) -> None:
    gw = make_gateway({"routing": {"sessionHeader": "X-Conversation"}})
    gw.model_with("m", [gw.backend(f"r{i}") for i in range(4)], strategy="PrefixHash")
    named = {ask(gw, [{"role": "user", "content": f"q{i}"}], headers={"X-Conversation": "c1"})
             for i in range(12)}
    default = {ask(gw, [{"role": "user", "content": f"q{i}"}], headers={"X-Session-ID": "c1"})
               for i in range(12)}
    assert len(named) == 1
    assert len(default) > 1  # that header means nothing here
    gw.settle()


async def test_a_session_still_spills_over_the_bound(gw) -> None:
    """Sessions are keys like any other: 4 replicas at 125%, the session's replica holding one
    request is at capacity (ceil(1.25 * 2 / 4) = 1), so the next request of the session goes
    to the next replica on the walk, and comes home once the first is done."""
    backends = [gw.backend(f"r{i}") for i in range(4)]
    gw.model_with("m", backends, strategy="PrefixHash")
    home = ask(gw, [{"role": "user", "content": "hi"}], headers={"X-Session-ID": "s"})
    held = next(b for b in backends if b.name == home)
    await gw.loop.acall(held.hold)
    async with gw.async_client() as client:
        def send(text: str):
            return client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": text}],
                extra_headers={"X-Session-ID": "s"})
        first = asyncio.ensure_future(send("one"))
        await gw.await_for(lambda: held.in_flight == 1, what="the first request to be held")
        second = await send("two")
        assert second.system_fingerprint != home
        await gw.loop.acall(held.release)
        assert (await first).system_fingerprint == home
        assert (await send("three")).system_fingerprint == home
    await gw.asettle()


@pytest.mark.parametrize(("prefix_from", "most_replicas"), [("Conversation", 1),
                                                            ("FirstUserMessage", 8)])
def test_a_long_shared_system_prompt_meets_only_with_the_conversation_key(
        gw, prefix_from, most_replicas) -> None:
    gw.model_with("m", [gw.backend(f"r{i}") for i in range(8)], strategy="PrefixHash",
                  prefix_from=prefix_from, prefix_char_length=1000)
    served = [ask(gw, [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": f"Where is my order #{i}?"}])
              for i in range(24)]
    assert len(set(served)) <= most_replicas
    if prefix_from == "FirstUserMessage":
        assert len(set(served)) >= 4  # unique questions scatter
    gw.settle()


# -- the keys themselves ---------------------------------------------------------------------


def chat_request(**payload: object) -> ParsedRequest:
    return parse_request("chat", orjson.dumps({"model": "m", **payload}), b"application/json")


def test_the_conversation_key_renders_tools_roles_and_text_parts_in_order() -> None:
    parsed = chat_request(
        tools=[{"type": "function", "function": {"name": "lookup"}}],
        messages=[{"role": "system", "content": "sys"},
                  {"role": "user", "content": [{"type": "text", "text": "a"},
                                               {"type": "image_url", "image_url": {"url": "x"}},
                                               {"type": "text", "text": "b"}]},
                  {"role": "assistant", "content": None},
                  {"role": "user", "content": "c"}])
    text = prefix_of(parsed, 1000, "Conversation")
    assert text == ('[{"type":"function","function":{"name":"lookup"}}]'
                    "<system>sys<user>ab<assistant><user>c")
    assert prefix_of(parsed, 20, "Conversation") == text[:20]
    assert prefix_of(parsed, 1000) == "ab"  # KubeAI's key: the first user message


def test_the_conversation_key_is_stable_as_the_conversation_grows() -> None:
    turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"}]
    longer = turn + [{"role": "assistant", "content": "answer"}, {"role": "user", "content": "2"}]
    assert (prefix_of(chat_request(messages=turn), 500, "Conversation")
            == prefix_of(chat_request(messages=longer), 500, "Conversation"))


# -- token-weighted loads --------------------------------------------------------------------

BIG = "Summarise this contract. " + "The party of the first part shall " * 1200  # ~10k tokens


async def hold_in_flight(gw: GatewayHarness, backends: list, prompts: list[str]) -> list[str]:
    """Send the prompts one after another, each held in flight on its replica, and return
    where each landed; then let them all finish."""
    for backend in backends:
        await gw.loop.acall(backend.hold)
    landed, tasks = [], []
    async with gw.async_client() as client:
        for i, prompt in enumerate(prompts):
            before = {b.name: b.total_calls for b in backends}
            tasks.append(asyncio.ensure_future(client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], max_tokens=16)))
            await gw.await_for(lambda: sum(b.in_flight for b in backends) == i + 1,
                               what=f"request {i} to be held")
            landed.append(next(b.name for b in backends if b.total_calls > before[b.name]))
        for backend in backends:
            await gw.loop.acall(backend.release)
        await asyncio.gather(*tasks)
    await gw.asettle()
    return landed


@pytest.mark.parametrize("unit", ["Requests", "Tokens"])
async def test_least_load_in_tokens_keeps_small_requests_off_a_long_prompt(gw, unit) -> None:
    backends = [gw.backend("r0"), gw.backend("r1")]
    gw.model_with("m", backends, strategy="LeastLoad", load_unit=unit)
    landed = await hold_in_flight(gw, backends, [BIG] + [f"short {i}" for i in range(5)])
    others = landed[1:]
    if unit == "Tokens":  # one 10k-token prompt outweighs five short requests
        assert others == [b for b in ["r0", "r1"] if b != landed[0]] * 5
    else:  # counts alternate
        assert others.count(landed[0]) == 2


@pytest.mark.parametrize("unit", ["Requests", "Tokens"])
async def test_the_bound_in_tokens_counts_a_long_prompt_for_what_it_costs(gw, unit) -> None:
    """4 replicas at 125%: counting requests, the 4th request of a hot prefix finds room at
    home again (capacity ceil(1.25 * 4 / 4) = 2); counting tokens, the 10k-token request
    held there keeps the short ones away."""
    backends = [gw.backend(f"r{i}") for i in range(4)]
    gw.model_with("m", backends, strategy="PrefixHash", load_unit=unit, prefix_char_length=10)
    landed = await hold_in_flight(gw, backends, [BIG] + [BIG[:10] + f" short {i}"
                                                         for i in range(5)])
    home = landed[0]
    if unit == "Tokens":
        assert home not in landed[1:]
    else:
        assert landed[3] == home
