"""OpenAI's Responses API (`POST /v1/responses`) as vLLM serves it: the request read as a chat,
the answer as a `response` object, and a stream as named SSE events.

The request: `instructions` is the system message; `input` is a string (the user's turn) or a
list of items, of which messages (`role`, `content` as a string or `input_text`/`output_text`
parts) carry the prompt. `max_output_tokens` limits the output.

A stream, as OpenAI and vLLM send it (every event `event: <type>` + `data: {"type": <type>,
"sequence_number": n, ...}`, no `[DONE]`):
`response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, one `response.output_text.delta` per token,
`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, then
`response.completed` (or `response.incomplete` when the output limit cut the answer).
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import orjson

from .engine import Sequence as Sequence_
from .errors import SimError
from .formats import new_id, text_of
from .tokenizer import PIECES


def chat_messages(body: dict) -> list[dict]:
    """The request as the chat messages the engine's template renders."""
    messages: list[dict] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise SimError(400, "'instructions' must be a string.", param="instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list) and items:
        for item in items:
            if not isinstance(item, dict):
                raise SimError(400, "Each input item must be an object.", param="input")
            if isinstance(item.get("role"), str):
                messages.append({"role": item["role"], "content": item.get("content")})
    else:
        raise SimError(400, "'input' must be a string or a non-empty list of items.",
                       param="input")
    return messages


def _usage(prompt_tokens: int, output_tokens: int, cached: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


class ResponseObject:
    """One response's constant fields; `snapshot` gives the object at any stage."""

    def __init__(self, body: dict, model: str) -> None:
        self.id = new_id("resp")
        self.item_id = new_id("msg")
        self.created_at = int(time.time())
        self.model = model
        self.body = body

    def snapshot(self, status: str, output: list, usage: Optional[dict] = None,
                 incomplete: bool = False) -> dict:
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": self.model,
            "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": None,
            "service_tier": "auto", "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0), "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0), "truncation": "disabled", "usage": usage,
            "user": None, "metadata": body.get("metadata") or {},
        }

    def message(self, text: str, status: str) -> dict:
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                "content": [self.part(text)] if status == "completed" else []}

    @staticmethod
    def part(text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def final(self, text: str, finish_reason: str, prompt_tokens: int, output_tokens: int,
              cached: int) -> dict:
        """The finished response (non-streaming answer, and the last event's `response`)."""
        incomplete = finish_reason == "length"
        return self.snapshot("incomplete" if incomplete else "completed",
                             [self.message(text, "completed")],
                             _usage(prompt_tokens, output_tokens, cached), incomplete)


class ResponseEvents:
    """The SSE events of one streamed response (see the module docstring for the order)."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.sequence = 0
        where = orjson.dumps({"item_id": response.item_id, "output_index": 0,
                              "content_index": 0})[1:-1]
        # A token's event is constant but for its piece and sequence number.
        self._delta = (b'event: response.output_text.delta\ndata: {"type":'
                       b'"response.output_text.delta",' + where + b',"logprobs":[],"delta":"')

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def opening(self, seq: Sequence_) -> list[bytes]:
        r = self.response
        started = r.snapshot("in_progress", [])
        return [self._event("response.created", response=started),
                self._event("response.in_progress", response=started),
                self._event("response.output_item.added", output_index=0,
                            item=r.message("", "in_progress")),
                self._event("response.content_part.added", item_id=r.item_id, output_index=0,
                            content_index=0, part=r.part(""))]

    def tokens(self, pieces: Sequence[int]) -> list[bytes]:
        events = []
        for piece in pieces:  # filler pieces need no JSON escaping
            events.append(self._delta + PIECES[piece].encode() + b'","sequence_number":'
                          + str(self.sequence).encode() + b"}\n\n")
            self.sequence += 1
        return events

    def closing(self, seq: Sequence_) -> list[bytes]:
        r = self.response
        output, finish_reason = seq.output, seq.finish_reason or "stop"
        prompt_tokens, cached = seq.prompt_len, seq.cached_tokens
        text = text_of(output)
        where = {"item_id": r.item_id, "output_index": 0, "content_index": 0}
        final = r.final(text, finish_reason, prompt_tokens, len(output), cached)
        last = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return [self._event("response.output_text.done", text=text, logprobs=[], **where),
                self._event("response.content_part.done", part=r.part(text), **where),
                self._event("response.output_item.done", output_index=0,
                            item=r.message(text, "completed")),
                self._event(last, response=final)]

    def failed(self, message: str) -> bytes:
        return self._event("error", code="engine_error", message=message, param=None)
