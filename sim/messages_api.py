"""Anthropic's Messages API (`POST /v1/messages`) as vLLM serves it: the request read as a chat,
the answer as a `message` object, a stream as Anthropic's named SSE events, errors in
Anthropic's shape.

The request: `system` (a string or text blocks) is the system message; `messages` are user and
assistant turns whose `content` is a string or content blocks (`text` blocks carry the prompt);
`max_tokens` limits the output.

A stream: `message_start` (the message, empty, with the input usage), `content_block_start`,
`ping`, one `content_block_delta` (`text_delta`) per token, `content_block_stop`,
`message_delta` (stop reason and output usage), `message_stop`. Anthropic's SDK reads only
events that carry an `event:` name.
"""

from __future__ import annotations

from typing import Optional, Sequence

import orjson

from .engine import Sequence as Sequence_
from .errors import SimError
from .formats import new_id
from .tokenizer import PIECES

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error",
                413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def chat_messages(body: dict) -> list[dict]:
    """The request as the chat messages the engine's template renders."""
    out: list[dict] = []
    system = body.get("system")
    if isinstance(system, list):
        system = "".join(block.get("text", "") for block in system if isinstance(block, dict))
    if system:
        if not isinstance(system, str):
            raise SimError(400, "system: Input should be a valid string or list of text "
                           "blocks", param="system")
        out.append({"role": "system", "content": system})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError(400, "messages: Field required (a non-empty list).", param="messages")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise SimError(400, "messages: each message needs a role of user or assistant.",
                           param="messages")
        out.append({"role": message["role"], "content": message.get("content")})
    return out


def error_body(err: SimError) -> dict:
    """A `SimError` in Anthropic's shape."""
    kind = _ERROR_TYPES.get(err.status, "api_error" if err.status >= 500
                            else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def _usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    return {"input_tokens": prompt_tokens - cached, "output_tokens": output_tokens,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def message(message_id: str, model: str, text: Optional[str], finish_reason: Optional[str],
            prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    """The message object: the whole answer, or (text None) the empty one a stream opens."""
    return {"id": message_id, "type": "message", "role": "assistant", "model": model,
            "content": [] if text is None else [{"type": "text", "text": text}],
            "stop_reason": _STOP_REASONS.get(finish_reason or "", None) if text is not None
            else None, "stop_sequence": None,
            "usage": _usage(prompt_tokens, output_tokens, cached)}


class MessageEvents:
    """The SSE events of one streamed message (see the module docstring for the order)."""

    _DELTA = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"text_delta","text":"')

    def __init__(self, model: str) -> None:
        self.id = new_id("msg")
        self.model = model

    @staticmethod
    def _event(kind: str, data: dict) -> bytes:
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(
            {"type": kind, **data}) + b"\n\n"

    def opening(self, seq: Sequence_) -> list[bytes]:
        """Sent with the first token, when the prompt's cached part is known."""
        return [self._event("message_start", {"message": message(
                    self.id, self.model, None, None, seq.prompt_len, 0, seq.cached_tokens)}),
                self._event("content_block_start", {"index": 0, "content_block": {
                    "type": "text", "text": ""}}),
                self._event("ping", {})]

    def tokens(self, pieces: Sequence[int]) -> list[bytes]:
        return [self._DELTA + PIECES[p].encode() + b'"}}\n\n' for p in pieces]

    def closing(self, seq: Sequence_) -> list[bytes]:
        output, finish_reason = seq.output, seq.finish_reason or "stop"
        return [self._event("content_block_stop", {"index": 0}),
                self._event("message_delta", {
                    "delta": {"stop_reason": _STOP_REASONS.get(finish_reason, "end_turn"),
                              "stop_sequence": None},
                    "usage": {"output_tokens": len(output)}}),
                self._event("message_stop", {})]

    def failed(self, message_text: str) -> bytes:
        return self._event("error", {"error": {"type": "api_error", "message": message_text}})
