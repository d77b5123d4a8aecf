"""A request's prompt as the engine will see it: token ids and the chained hashes of its blocks.

The precise prefix index (``lb.kv_events``) holds, per replica, the hashes of the KV blocks the
engine reports cached. To ask "how much of this request's prompt does replica R hold", the
gateway must hash the prompt exactly as the engine does: same tokenizer, same chat template,
same block size and hash rule. That is engine-specific, so it sits behind a small interface,
``PromptTokens``; ``for_model`` picks the implementation for a Model's engine.

Implemented: the simulator (``engine: Sim``), as a twin of ``kvgate_sim.tokenizer`` and of the
block hash in ``kvgate_sim.kvcache`` (the gateway may not import the simulator; a property test
holds the two together):

- a text segment is its UTF-8 bytes (surrogates passed), zero-padded to a multiple of 4, read
  as little-endian unsigned 32-bit ids; a chat is ``<bos>``, then per message ``<start_header>
  role <end_header> text <eot>``, then the assistant header; special ids are negative; a
  completions prompt is ``<bos>`` + its text, or ``<bos>`` + its token ids;
- block hash = low 64 bits of MurmurHash3_x64_128 (seed 0) over the parent hash (8 bytes
  little-endian) then the block's ids (8 bytes little-endian each, modulo 2**64); the first
  block's parent is the root, ``ROOT_HASH`` or, for an adapter, ``ROOT_HASH ^ (crc32(name) << 1)``.

Not implemented, and named here as the seam for it: real engines. A vLLM model needs its HF
tokenizer (the ``tokenizers`` library) with the model's chat template, and vLLM's hash rule
(``--prefix-caching-hash-algo``: sha256 of the parent and the block's ids and extra keys such as
the LoRA name, reported in the events as an int). ``for_model`` returns None for those
engines, and the scorer falls back to the approximate index.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Protocol, Sequence

import mmh3

from lb.model import Model
from lb.parse import ParsedRequest

BLOCK_SIZE = 16  # vLLM's default, and every simulator profile's
ROOT_HASH = 0x5EED_B10C
MASK64 = (1 << 64) - 1

BOS, START_HEADER, END_HEADER, EOT = -1, -2, -3, -4
_ROLE_IDS = {"system": -10, "user": -11, "assistant": -12, "tool": -13, "developer": -14}
_OTHER_ROLE = -19
_GENERATION_PROMPT = (START_HEADER, _ROLE_IDS["assistant"], END_HEADER)


class PromptTokens(Protocol):
    """What the precise prefix index needs from an engine: its tokens and its block hashes."""

    block_size: int

    def token_ids(self, parsed: ParsedRequest) -> list[int] | None:
        """The prompt's token ids as the engine computes them (None: nothing to match)."""

    def block_hashes(self, token_ids: Sequence[int], adapter: str = "",
                     max_blocks: int | None = None) -> list[int]:
        """Chained hashes of the full blocks of ``token_ids``, first block first."""


class SimPromptTokens:
    """The simulator's tokenizer and hash rule (the twin of ``kvgate_sim``)."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self._pack = struct.Struct(f"<Q{block_size}q").pack

    def token_ids(self, parsed: ParsedRequest) -> list[int] | None:
        payload = parsed.payload
        if payload is None:
            return None
        if parsed.kind == "chat":
            messages = payload.get("messages")
            return encode_chat(messages) if isinstance(messages, list) else None
        if parsed.kind == "completions":
            return encode_prompt(first_prompt(payload.get("prompt")))
        return None

    def block_hashes(self, token_ids: Sequence[int], adapter: str = "",
                     max_blocks: int | None = None) -> list[int]:
        bs = self.block_size
        n = len(token_ids) // bs
        if max_blocks is not None:
            n = min(n, max_blocks)
        parent = root_hash(adapter)
        pack, murmur, out = self._pack, mmh3.hash128, []
        for start in range(0, n * bs, bs):
            try:
                parent = murmur(pack(parent, *token_ids[start:start + bs])) & MASK64
            except struct.error:  # an id outside int64: reduced modulo 2**64, as the engine does
                block = [t & MASK64 for t in token_ids[start:start + bs]]
                parent = murmur(struct.pack(f"<Q{bs}Q", parent, *block)) & MASK64
            out.append(parent)
        return out


SIM = SimPromptTokens()


def for_model(model: Model) -> PromptTokens | None:
    """The implementation for the Model's engine, or None when the gateway cannot reproduce
    the engine's tokens (real engines: see the module docstring)."""
    return SIM if model.spec.engine == "Sim" else None


def root_hash(adapter: str = "") -> int:
    """Parent hash of a sequence's first block; each adapter has its own chain."""
    if not adapter:
        return ROOT_HASH
    return ROOT_HASH ^ (zlib.crc32(adapter.encode()) << 1)


# -- the simulator's tokenizer ---------------------------------------------------------------------

def encode(text: str) -> list[int]:
    """Ids of one text segment: 4 UTF-8 bytes per id, little-endian, the last zero-padded."""
    if not text:
        return []
    data = text.encode("utf-8", "surrogatepass")
    n, rem = divmod(len(data), 4)
    if rem:
        data += b"\0" * (4 - rem)
        n += 1
    return list(struct.unpack(f"<{n}I", data))


def message_text(content: Any) -> str:
    """The text the engine reads from a message's content: a string, the ``text`` of each part
    (and bare string parts), or nothing for null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
            elif isinstance(part, str):
                out.append(part)
        return "".join(out)
    return str(content)


def encode_chat(messages: Sequence[Any]) -> list[int]:
    """A chat rendered with the simulator's Llama-3-like framing, generation prompt included."""
    tokens = [BOS]
    for msg in messages:
        is_dict = isinstance(msg, dict)
        role = msg.get("role", "user") if is_dict else "user"
        content = msg.get("content") if is_dict else msg
        tokens += (START_HEADER, _ROLE_IDS.get(role, _OTHER_ROLE), END_HEADER)
        tokens += encode(message_text(content))
        tokens.append(EOT)
    tokens += _GENERATION_PROMPT
    return tokens


def first_prompt(prompt: Any) -> Any:
    """The first of a completions request's prompts (each is its own sequence in the engine):
    a string, a list of ids, or the first of a list of either."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


def encode_prompt(prompt: Any) -> list[int] | None:
    """``<bos>`` + the prompt's ids; None for what the engine would refuse."""
    if isinstance(prompt, str):
        return [BOS] + encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return [BOS] + prompt
    return None
