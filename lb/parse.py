"""Reading an OpenAI request once: which model, which adapter, what prefix, streaming or not.

The body is parsed a single time with orjson; it is re-serialised only when the model name
must be rewritten to an adapter's (vLLM serves LoRAs under their own name). Anything the
gateway relies on is type-checked here so that bad input ends as a 400, never as a 500 deeper
in. The rest of the body is the model server's business and passes through untouched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from python_multipart.multipart import MultipartParser, parse_options_header

from lb import dialects
from lb.errors import GatewayError, bad_request
from lb.ring import MAX_WEIGHT

# A malformed form is the client's problem and gets a 400; it must not fill the server's logs.
logging.getLogger("python_multipart").setLevel(logging.ERROR)

# Route suffix (after /v1 or /openai/v1) -> request kind.
KINDS: dict[str, str] = {
    "/chat/completions": "chat",
    "/completions": "completions",
    "/embeddings": "embeddings",
    "/rerank": "rerank",
    "/audio/transcriptions": "transcriptions",
    "/responses": "responses",  # OpenAI's Responses API
    "/messages": "messages",  # Anthropic's Messages API
    "/score": "score",  # vLLM's
}

# Routes vLLM serves at its root rather than under /v1: route suffix (after "" or KubeAI's
# /openai) -> request kind; the model server's path is the suffix itself.
ROOT_KINDS: dict[str, str] = {
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
}


@dataclass(slots=True)
class ParsedRequest:
    kind: str
    model: str  # as the client named it: `model` or `model_adapter`
    stream: bool
    payload: dict[str, Any] | None  # JSON routes only
    body: bytes  # what goes upstream (multipart: without the `model` field)
    content_type: bytes


def check_content_type(kind: str, content_type: bytes) -> None:
    """415 unless the body's declared type suits the route: multipart/form-data for audio,
    JSON elsewhere (any parameters, such as a charset). A JSON route also takes a request that
    declares no type at all, as OpenAI's API does: it reads the body as JSON whatever the
    header says, so clients that never set one (curl -d without -H) work there and must work
    here; the body is still checked to be JSON. A type that says something else is a client
    bug worth naming. (The proxy calls this only when the header is not exactly
    ``application/json``.)"""
    media = content_type.split(b";", 1)[0].strip().lower()
    if kind == "transcriptions":
        if media != b"multipart/form-data":
            raise GatewayError(415, "This endpoint expects multipart/form-data with a boundary, "
                               f"not {_shown(media)}.", code="unsupported_media_type")
    elif media != b"application/json" and content_type.strip():
        raise GatewayError(415, "This endpoint expects a JSON body (Content-Type: "
                           f"application/json), not {_shown(media)}.",
                           code="unsupported_media_type")


def _shown(media: bytes) -> str:
    return repr(media.decode("latin-1")[:100]) if media else "an empty content type"


def parse_request(kind: str, body: bytes, content_type: bytes) -> ParsedRequest:
    if kind == "transcriptions":
        model, body, content_type = parse_multipart(body, content_type)
        return ParsedRequest(kind, model, False, None, body, content_type)
    payload = parse_json(body)
    model = payload.get("model")
    if model is None:
        raise bad_request("you must provide a model parameter", "model")
    if not isinstance(model, str) or not model:
        raise bad_request("`model` must be a non-empty string", "model")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("`stream` must be a boolean", "stream")
    _CHECKS[kind](payload)
    return ParsedRequest(kind, model, bool(stream), payload, body, b"application/json")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request: it is not valid "
                          "JSON (or not UTF-8).") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    return payload


def with_model(parsed: ParsedRequest, model: str) -> bytes:
    """The body to forward with ``model`` set to ``model`` (only re-serialised if it differs)."""
    return with_fields(parsed, model=model)


def with_fields(parsed: ParsedRequest, **fields: Any) -> bytes:
    """The body to forward with these top-level fields set (re-serialised from the parsed
    payload, never parsed again, and only if one differs)."""
    payload = parsed.payload
    if payload is None or all(payload.get(k, _ABSENT) == v for k, v in fields.items()):
        return parsed.body
    return dumps({**payload, **fields})


_ABSENT = object()


def dumps(value: Any) -> bytes:
    """orjson's dumps, which stops at 254 levels of nesting where its loads reads 1024: the
    standard library takes what orjson refuses; what neither can write is the client's 400,
    never a 500."""
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except (RecursionError, ValueError, TypeError):
        raise bad_request("The request's JSON is nested too deeply to be forwarded.") from None


# -- a request's weight for token-weighted loads -------------------------------------------------

# Output tokens assumed when the request sets no limit (the engine's own default is the rest of
# the context, which says nothing about what a reply will really cost).
DEFAULT_OUTPUT_TOKENS = 256


def estimated_tokens(parsed: ParsedRequest) -> int:
    """Prompt tokens estimated from the body (~4 bytes a token) plus the output allowed:
    cheap, and proportional enough to spread long prompts apart."""
    payload = parsed.payload
    limit = payload.get("max_completion_tokens") or payload.get("max_tokens") if payload else None
    if type(limit) is not int or limit < 0:  # bool is not a limit either
        kind = parsed.kind  # the common case without a call
        limit = _output_allowed(kind, payload) if kind in _OWN_OUTPUT else DEFAULT_OUTPUT_TOKENS
    weight = len(parsed.body) // 4 + limit
    return weight if 0 < weight <= MAX_WEIGHT else (MAX_WEIGHT if weight else 1)


# Kinds that generate nothing: their weight is their input.
_NO_OUTPUT = frozenset(("tokenize", "detokenize", "score"))
# Kinds whose output allowance is not the default (``_output_allowed``).
_OWN_OUTPUT = _NO_OUTPUT | {"responses"}


def _output_allowed(kind: str, payload: dict[str, Any] | None) -> int:
    """The output a request without a chat-style limit may cost: the Responses API's own
    limit, nothing for kinds that generate nothing, else the default."""
    if kind in _NO_OUTPUT:
        return 0
    if kind == "responses" and payload:
        limit = payload.get("max_output_tokens")
        if type(limit) is int and limit >= 0:
            return limit
    return DEFAULT_OUTPUT_TOKENS


# -- prefixes for the ring ---------------------------------------------------------------------

def prefix_of(parsed: ParsedRequest, length: int, source: str = "FirstUserMessage") -> str:
    """The ring key's text, cut to ``length`` code points: KubeAI's (the first user message of
    a chat), or with ``source="Conversation"`` the conversation rendered from its start; the
    prompt for completions. The Responses and Anthropic Messages APIs follow chat's rules, their
    instructions or system prompt taken as the system message. Other kinds share no prompt
    cache worth routing on."""
    payload = parsed.payload
    if payload is None or length <= 0:
        return ""
    if parsed.kind == "chat":
        if source == "Conversation":
            return _conversation_text(payload, length)
        return _first_user_text(payload["messages"])[:length]
    if parsed.kind == "completions":
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        return prompt[:length] if isinstance(prompt, str) else ""
    turns = _TURNS.get(parsed.kind)
    if turns is None:
        return ""
    if source == "Conversation":
        return _rendered(payload.get("tools"), turns(payload), length)
    for role, content in turns(payload):
        if role == "user":
            return dialects.part_text(content)[:length]
    return ""


_TURNS = {"responses": dialects.responses_turns, "messages": dialects.messages_turns}


def _rendered(tools: Any, turns: Any, length: int) -> str:
    """``_conversation_text`` over turns: the same rendering, so a conversation gives the same
    key through chat, the Responses API or Anthropic's."""
    text = dumps(tools).decode() if tools else ""
    for role, content in turns:
        if len(text) >= length:
            break
        text += f"<{role}>{dialects.part_text(content)}"
    return text[:length]


def _conversation_text(payload: dict[str, Any], length: int) -> str:
    """The first ``length`` code points of the conversation as the engine sees it, roughly:
    the tools, then each message's role and text, in order. Requests that share a long
    system prompt or document share this prefix even when their questions differ; rendering
    stops as soon as enough text is there."""
    tools = payload.get("tools")
    text = dumps(tools).decode() if tools else ""
    for message in payload["messages"]:
        if len(text) >= length:
            break
        text += f"<{message['role']}>{_content_text(message.get('content'))}"
    return text[:length]


def _first_user_text(messages: list[Any]) -> str:
    for message in messages:
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _content_text(content: Any) -> str:
    """A message's text: the string, or the text parts joined (``null`` and images give "")."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict)
                       and part.get("type") == "text" and isinstance(part.get("text"), str))
    return ""


# -- per-kind checks of the fields the gateway reads --------------------------------------------

def _check_chat(payload: dict[str, Any]) -> None:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("`messages` must be a non-empty array", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"`messages[{i}]` must be an object", f"messages[{i}]")
        if not isinstance(message.get("role"), str):
            raise bad_request(f"`messages[{i}].role` must be a string", f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_request(f"`messages[{i}].content` must be a string, an array of parts "
                              "or null", f"messages[{i}].content")


def _check_completions(payload: dict[str, Any]) -> None:
    prompt = payload.get("prompt")
    if not isinstance(prompt, (str, list)):
        raise bad_request("`prompt` must be a string or an array", "prompt")


def _check_embeddings(payload: dict[str, Any]) -> None:
    if not isinstance(payload.get("input"), (str, list)):
        raise bad_request("`input` must be a string or an array", "input")


def _check_nothing(payload: dict[str, Any]) -> None:
    return None


_CHECKS = {
    "chat": _check_chat,
    "completions": _check_completions,
    "embeddings": _check_embeddings,
    "rerank": _check_nothing,
    "responses": dialects.check_responses,
    "messages": dialects.check_messages,
    "tokenize": lambda payload: dialects.check_tokenize(payload, _check_chat),
    "detokenize": dialects.check_detokenize,
    "score": dialects.check_score,
}


# -- multipart (audio) ---------------------------------------------------------------------------

def parse_multipart(body: bytes, content_type: bytes) -> tuple[str, bytes, bytes]:
    """Read the ``model`` field of a multipart form and return the form without it.

    The other parts are re-emitted byte for byte under the original boundary, so the model
    server receives exactly the file and options the client sent.
    """
    ctype, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise GatewayError(415, "This endpoint expects multipart/form-data with a boundary.",
                           code="unsupported_media_type")
    parts = _split_parts(body, boundary)
    model, kept = None, []
    for headers, data in parts:
        if _field_name(headers) == b"model":
            model = data
        else:
            kept.append((headers, data))
    if model is None:
        raise bad_request("you must provide a model parameter", "model")
    try:
        name = model.decode()
    except UnicodeDecodeError:
        raise bad_request("`model` must be UTF-8 text", "model") from None
    if not name:
        raise bad_request("`model` must be a non-empty string", "model")
    return name, _join_parts(kept, boundary), content_type


def _split_parts(body: bytes, boundary: bytes) -> list[tuple[list[tuple[bytes, bytes]], bytes]]:
    parts: list[tuple[list[tuple[bytes, bytes]], bytes]] = []
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        state.update(headers=[], data=[], field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"].append((state["field"], state["value"]))
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"].append(data[start:end])

    def on_part_end() -> None:
        parts.append((state["headers"], b"".join(state["data"])))

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own error types and ValueError
        raise bad_request(f"malformed multipart body: {exc}") from None
    if not parts:
        raise bad_request("the multipart body has no parts")
    return parts


def _field_name(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"content-disposition":
            return parse_options_header(value)[1].get(b"name")
    return None


def _join_parts(parts: list[tuple[list[tuple[bytes, bytes]], bytes]], boundary: bytes) -> bytes:
    out = []
    for headers, data in parts:
        out.append(b"--" + boundary + b"\r\n")
        out.extend(name + b": " + value + b"\r\n" for name, value in headers)
        out.append(b"\r\n" + data + b"\r\n")
    out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out)
