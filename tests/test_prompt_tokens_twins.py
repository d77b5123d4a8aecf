"""The gateway's twin of the simulator's tokenizer and block hash (lb.prompt_tokens) against the
simulator itself (kvgate_sim.tokenizer, kvgate_sim.kvcache): for any request both must give the
same token ids and the same chained block hashes, or the precise prefix index matches nothing.
"""

from __future__ import annotations

import struct
import zlib

import mmh3
import orjson
from hypothesis import given, settings, strategies as st

from kvgate_sim import tokenizer as sim_tok
from kvgate_sim.kvcache import BLOCK_SIZE, ROOT_HASH, block_hash, extend_block_hashes, root_hash
from lb import prompt_tokens as gw
from lb.model import Model
from lb.parse import parse_request

ROLES = ("system", "user", "assistant", "tool", "developer", "critic")
text = st.text(max_size=300) | st.sampled_from(["", "a", "héllo wörld 🦙" * 9, "x" * 64])
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.just({"type": "image_url", "image_url": {"url": "http://x/y.png"}}),
    st.builds(lambda t: {"type": "input_audio", "text": t}, text),
)
content = st.one_of(text, st.lists(part, max_size=4), st.none())
message = st.builds(lambda role, c: {"role": role, "content": c}, st.sampled_from(ROLES), content)
adapter = st.sampled_from(["", "sql", "lora-7", "ünï"])
# JSON as the gateway reads it (orjson) holds ids in [-2**63, 2**64): those beyond int64 take
# the modulo path of the rule
token_ids = st.lists(st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1), max_size=80) | \
    st.lists(st.integers(min_value=0, max_value=(1 << 32) - 1), max_size=200)


def sim_hashes(tokens: list[int], name: str) -> list[int]:
    return extend_block_hashes([], tokens, BLOCK_SIZE, root_hash(name or None))


@settings(max_examples=300, deadline=None)
@given(messages=st.lists(message, min_size=1, max_size=6), name=adapter)
def test_chat_requests_give_the_simulators_tokens_and_hashes(messages: list[dict],
                                                             name: str) -> None:
    body = orjson.dumps({"model": "m", "messages": messages})
    parsed = parse_request("chat", body, b"application/json")
    tokens = gw.SIM.token_ids(parsed)
    assert tokens == sim_tok.encode_chat(messages)
    assert gw.SIM.block_hashes(tokens, name) == sim_hashes(tokens, name)


@settings(max_examples=300, deadline=None)
@given(prompt=text | token_ids | st.lists(text, min_size=1, max_size=3), name=adapter)
def test_completions_requests_give_the_simulators_tokens_and_hashes(prompt: object,
                                                                    name: str) -> None:
    body = orjson.dumps({"model": "m", "prompt": prompt})
    parsed = parse_request("completions", body, b"application/json")
    tokens = gw.SIM.token_ids(parsed)
    first = prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) \
        else prompt
    assert tokens == sim_tok.encode_prompt(first)
    assert gw.SIM.block_hashes(tokens, name) == sim_hashes(tokens, name)


@settings(max_examples=200, deadline=None)
@given(tokens=token_ids, name=adapter, cut=st.integers(min_value=0, max_value=12))
def test_hashes_are_incremental_and_capped(tokens: list[int], name: str, cut: int) -> None:
    """The simulator extends a sequence's hashes as it grows; the gateway may stop early."""
    full = sim_hashes(tokens, name)
    grown = extend_block_hashes(sim_hashes(tokens[:cut * BLOCK_SIZE], name), tokens, BLOCK_SIZE,
                                root_hash(name or None))
    assert grown == full
    assert gw.SIM.block_hashes(tokens, name, max_blocks=cut) == full[:cut]


def test_the_rule_is_the_documented_one() -> None:
    """Written out from the docstring, without either implementation's code."""
    tokens = list(range(-3, 13)) + [2**32 - 1] * 16 + [5]
    parent, expected = ROOT_HASH ^ (zlib.crc32(b"sql") << 1), []
    for i in range(2):
        block = tokens[i * 16:(i + 1) * 16]
        data = parent.to_bytes(8, "little") + b"".join(
            (t % 2**64).to_bytes(8, "little") for t in block)
        parent = mmh3.hash64(data, seed=0, signed=False)[0]
        expected.append(parent)
    assert gw.SIM.block_hashes(tokens, "sql") == expected == sim_hashes(tokens, "sql")
    assert block_hash(expected[0], tokens[16:32]) == expected[1]
    assert all(0 <= h < 2**64 for h in expected)
    # ids beyond int64 are taken modulo 2**64, so they hash like their two's complement twin
    assert block_hash(7, [2**64 - 1] * 16) == block_hash(7, [-1] * 16)
    assert struct.calcsize("<Q16q") == 8 + 16 * 8


def test_the_twin_is_chosen_by_engine_only_for_the_simulator() -> None:
    def model(engine: str) -> Model:
        return Model.from_dict({"apiVersion": "kvgate.dev/v1", "kind": "Model",
                                "metadata": {"name": "m"},
                                "spec": {"url": "hf://a/b", "engine": engine,
                                         "features": ["TextGeneration"]}})
    assert gw.for_model(model("Sim")) is gw.SIM
    assert gw.for_model(model("VLLM")) is None  # the seam: no vLLM tokenizer here yet
    parsed = parse_request("embeddings", b'{"model":"m","input":"x"}', b"application/json")
    assert gw.SIM.token_ids(parsed) is None
