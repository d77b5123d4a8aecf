"""Response bodies and SSE events in the exact shapes vLLM's OpenAI server produces.

Streaming cost is per token, so each stream pre-encodes the constant bytes of its token event once;
a token event is then `prefix + piece + suffix` (the filler pieces never need JSON escaping).

Streaming sequence, as vLLM emits it:
- chat: a first event with `delta: {"role": "assistant", "content": ""}`, then one event per token
  with `delta: {"content": ...}`; the last token's event carries `finish_reason`;
- completions: one event per token with `text`; the last carries `finish_reason`;
- if `stream_options.include_usage`: an event with `"choices": []` and `usage`;
- then `data: [DONE]`.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import time
import uuid
from typing import Optional, Sequence

import orjson

from .tokenizer import PIECE_BYTES, PIECES

DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def text_of(pieces: Sequence[int]) -> str:
    return "".join(PIECES[p] for p in pieces)


def sse(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class StreamEncoder:
    """Pre-encoded SSE events for one streamed response (chat or completions)."""

    def __init__(self, kind: str, model: str, request_id: Optional[str] = None,
                 created: Optional[int] = None) -> None:
        self.kind = kind
        self.chat = kind == "chat"
        self.id = request_id or new_id("chatcmpl" if self.chat else "cmpl")
        self.created = created if created is not None else int(time.time())
        self.model = model
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        self._head = (b'data: {"id":' + orjson.dumps(self.id) + b',"object":"' + obj.encode()
                      + b'","created":' + str(self.created).encode() + b',"model":'
                      + orjson.dumps(model) + b',"choices":[{"index":')
        self._parts: dict[int, tuple[bytes, bytes]] = {}

    def _token_parts(self, index: int) -> tuple[bytes, bytes]:
        head = self._head + str(index).encode()
        if self.chat:
            return (head + b',"delta":{"content":"',
                    b'"},"logprobs":null,"finish_reason":null}]}\n\n')
        return (head + b',"text":"',
                b'","logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n')

    def start(self, index: int = 0) -> bytes:
        """The role event that opens a chat stream (completions have none)."""
        if not self.chat:
            return b""
        return (self._head + str(index).encode()
                + b',"delta":{"role":"assistant","content":""},"logprobs":null,'
                  b'"finish_reason":null}]}\n\n')

    def tokens(self, pieces: Sequence[int], index: int = 0) -> list[bytes]:
        """One event per token piece."""
        pre, suf = self._parts_cached(index)
        return [pre + PIECE_BYTES[p] + suf for p in pieces]

    def _parts_cached(self, index: int) -> tuple[bytes, bytes]:
        parts = self._parts.get(index)
        if parts is None:
            parts = self._parts[index] = self._token_parts(index)
        return parts

    def last(self, piece: Optional[int], finish_reason: str, index: int = 0) -> bytes:
        """The final token's event, carrying finish_reason (piece None = empty content)."""
        content = PIECES[piece] if piece is not None else ""
        if self.chat:
            choice = {"index": index, "delta": {"content": content}, "logprobs": None,
                      "finish_reason": finish_reason, "stop_reason": None}
        else:
            choice = {"index": index, "text": content, "logprobs": None,
                      "finish_reason": finish_reason, "stop_reason": None}
        return sse(self._envelope([choice]))

    def usage_event(self, prompt_tokens: int, completion_tokens: int, cached: int) -> bytes:
        body = self._envelope([])
        body["usage"] = usage(prompt_tokens, completion_tokens, cached)
        return sse(body)

    def error_event(self, message: str, status: int = 500) -> bytes:
        return sse({"error": {"message": message, "type": "InternalServerError", "param": None,
                              "code": status}})

    def _envelope(self, choices: list) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else
                "text_completion", "created": self.created, "model": self.model,
                "choices": choices}


def chat_response(model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int, cached: int) -> dict:
    """Non-streaming /v1/chat/completions body."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None,
                        "annotations": None, "audio": None, "function_call": None,
                        "tool_calls": [], "reasoning_content": None},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens, cached),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def completion_response(model: str, choices: list[tuple[str, str]], prompt_tokens: int,
                        completion_tokens: int, cached: int) -> dict:
    """Non-streaming /v1/completions body; `choices` are (text, finish_reason) per prompt."""
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason,
                     "stop_reason": None, "prompt_logprobs": None}
                    for i, (text, reason) in enumerate(choices)],
        "usage": usage(prompt_tokens, completion_tokens, cached),
        "kv_transfer_params": None,
    }


def model_card(model_id: str, root: str, parent: Optional[str], max_model_len: Optional[int],
               created: int) -> dict:
    """One entry of /v1/models as vLLM's ModelCard serializes."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [{
            "id": new_id("modelperm"), "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False,
        }],
    }


def embedding_vector(text: str, dim: int) -> list[float]:
    """A unit vector that depends only on the text: same input, same embedding."""
    seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def encode_embedding(vec: list[float], encoding_format: str) -> object:
    """Float list, or base64 of little-endian float32 (what the OpenAI SDK asks for by default)."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
    return vec
