"""A cheap, deterministic stand-in for a BPE tokenizer.

Why this shape: the simulator only needs token *counts* that look like a real model's (~4
characters per token for English text) and token *ids* that are a pure function of the text, so
that two prompts sharing a text prefix share a token prefix and therefore the same 16-token block
hashes, exactly the property vLLM's prefix cache relies on.

A token is 4 UTF-8 bytes of a segment read as a little-endian integer (the last token of a segment
is zero-padded). That is one C call per segment (`struct.unpack`), collision-free within a segment,
and stable across processes (no `hash()` of str, whose seed is per process).

Chat prompts are rendered like a Llama-3 template: special tokens (negative ids, never produced by
text) frame each message, and each message's text is tokenized on its own. Because segments restart
at message boundaries, an assistant reply that the client appends to the conversation re-tokenizes
into exactly the ids the simulator generated, so multi-turn prefix reuse covers the replies too, as
it does on a real tokenizer whose special tokens are atomic.
"""

from __future__ import annotations

import struct
from typing import Any, Sequence

BYTES_PER_TOKEN = 4

BOS = -1
START_HEADER = -2
END_HEADER = -3
EOT = -4

_ROLE_IDS = {"system": -10, "user": -11, "assistant": -12, "tool": -13, "developer": -14}
_OTHER_ROLE = -19


def encode(text: str) -> list[int]:
    """Token ids of one text segment (~4 characters per token for ASCII)."""
    if not text:
        return []
    data = text.encode("utf-8", "surrogatepass")
    n, rem = divmod(len(data), BYTES_PER_TOKEN)
    if rem:
        data += b"\0" * (BYTES_PER_TOKEN - rem)
        n += 1
    return list(struct.unpack(f"<{n}I", data))


def count_tokens(text: str) -> int:
    """Number of tokens `encode` would return, without building the list."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def message_text(content: Any) -> str:
    """Text of an OpenAI message `content`: a string, a list of parts, or null.

    Only `text` parts carry tokens here; images and audio parts are ignored, as a text-only model
    would reject or skip them.
    """
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


def encode_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """Render chat messages to token ids, framed like the Llama-3 chat template.

    `<bos>` then per message `<start_header> role <end_header> text... <eot>`, then the assistant
    header as the generation prompt. Framing tokens are fixed ids so the same conversation prefix
    always yields the same token prefix.
    """
    tokens = [BOS]
    for msg in messages:
        role = msg.get("role", "user") if isinstance(msg, dict) else "user"
        content = msg.get("content") if isinstance(msg, dict) else msg
        tokens.append(START_HEADER)
        tokens.append(_ROLE_IDS.get(role, _OTHER_ROLE))
        tokens.append(END_HEADER)
        tokens.extend(encode(message_text(content)))
        tokens.append(EOT)
    if add_generation_prompt:
        tokens.extend((START_HEADER, _ROLE_IDS["assistant"], END_HEADER))
    return tokens


def encode_prompt(prompt: Any) -> list[int]:
    """Token ids of a completions `prompt`: a string, or already a list of token ids."""
    if isinstance(prompt, str):
        return [BOS] + encode(prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return [BOS] + list(prompt)
    raise ValueError("prompt must be a string or a list of token ids")


# --- deterministic filler output -----------------------------------------------------------------
#
# Every output token is one 4-byte ASCII piece, so the emitted text re-tokenizes to exactly the
# generated ids (see module docstring). Pieces contain no characters that need JSON escaping, which
# lets the server splice them into pre-encoded SSE chunk templates.

_WORDS = (
    "the and for are but not you all any can had her was one our out day get has him his how "
    "man new now old see two way who boy did its let put say she too use yes set run map key "
    "log end big top few low job far ask own lot why may try add fix sum row bit raw tag net "
    "law war art act age air car cut eat eye fit fun god gun hit hot ice kid lay leg lie mix "
    "oil pay per red sea sit sky son sun tax tea ten tie toy van web win "
).split()

PIECES: tuple[str, ...] = tuple(w + " " for w in _WORDS) + (
    "data", "mode", "code", "then", "with", "from", "this", "that", "into", "over", "when", "each",
    "also", "more", "some", "time", "just", "like", "well", "only", ". It", ", so", ". We", ", as",
)
PIECE_IDS: tuple[int, ...] = tuple(encode(p)[0] for p in PIECES)
PIECE_BYTES: tuple[bytes, ...] = tuple(p.encode() for p in PIECES)
assert all(len(b) == BYTES_PER_TOKEN for b in PIECE_BYTES)
assert all(b'"' not in b and b"\\" not in b for b in PIECE_BYTES)


def output_seed(tokens: Sequence[int]) -> int:
    """A seed for the filler text that depends on the prompt, so a repeated prompt gives the same
    answer (like greedy decoding) while different prompts get different answers."""
    return hash(tuple(tokens[-64:])) & 0xFFFFFFFF ^ len(tokens)


def output_piece(seed: int, index: int) -> int:
    """Index into PIECES of the `index`-th output token for a given seed (cheap integer mixing)."""
    x = (seed * 0x9E3779B1 + index * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 15
    return (x * 0x2C1B3C6D & 0xFFFFFFFF) % len(PIECES)


def filler_text(seed: int, n_tokens: int) -> str:
    """The text the simulator emits for `n_tokens` output tokens under `seed`."""
    return "".join(PIECES[output_piece(seed, i)] for i in range(n_tokens))


# --- decoding (vLLM's /detokenize) --------------------------------------------------------------

# Special tokens' text, as a Llama-3 tokenizer decodes them (special tokens are not skipped).
_SPECIAL_TEXT = {BOS: "<|begin_of_text|>", START_HEADER: "<|start_header_id|>",
                 END_HEADER: "<|end_header_id|>", EOT: "<|eot_id|>", _OTHER_ROLE: "other",
                 **{token: role for role, token in _ROLE_IDS.items()}}
_MAX_ID = 2 ** (8 * BYTES_PER_TOKEN)


def valid_token(token: int) -> bool:
    """Whether `token` is an id this tokenizer can produce (its vocabulary)."""
    return 0 <= token < _MAX_ID or token in _SPECIAL_TEXT


def decode(tokens: Sequence[int]) -> str:
    """The text of token ids: the inverse of `encode` on each run of text tokens (a segment's
    zero padding dropped), special tokens as their text. Ids must be `valid_token`."""
    out: list[str] = []
    run: list[int] = []
    for token in tokens:
        if token >= 0:
            run.append(token)
            continue
        out.append(_decode_run(run))
        run = []
        out.append(_SPECIAL_TEXT[token])
    out.append(_decode_run(run))
    return "".join(out)


def _decode_run(run: list[int]) -> str:
    if not run:
        return ""
    data = struct.pack(f"<{len(run)}I", *run)
    return data.rstrip(b"\0").decode("utf-8", "replace")
