"""OpenAI-shaped errors.

Every failure the gateway itself produces is one of these, so that OpenAI SDKs raise the
exception class that matches the status (BadRequestError, NotFoundError, RateLimitError, ...)
and clients see a message, never a traceback.
"""

from __future__ import annotations

import http
import re
from typing import Any

import orjson

# The `type` field OpenAI uses for each status family; SDKs key on the status, people on this.
_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout",
}


class GatewayError(Exception):
    """A request the gateway answers itself, with an OpenAI error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.status, self.message, code=self.code, param=self.param)


def error_body(status: int, message: str, *, code: str | None = None,
               param: str | None = None, error_type: str | None = None) -> bytes:
    return orjson.dumps({"error": {
        "message": message,
        "type": error_type or _TYPES.get(status, "invalid_request_error" if status < 500
                                         else "server_error"),
        "param": param,
        "code": code,
    }})


# -- Anthropic's shape, for the Messages API ---------------------------------------------------
#
# Anthropic's clients read `{"type": "error", "error": {"type", "message"}}`: its SDK exposes
# that body to the application and keys its own retries on the status, and tools written
# against the API branch on `error.type`. On /v1/messages every error, the gateway's own and a
# replica's, is given in that shape (the status is the same as on the other routes).

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {
        "type": _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500
                                     else "api_error"),
        "message": message,
    }})


def as_anthropic(status: int, openai_body: bytes) -> bytes:
    """An OpenAI-shaped error body (the gateway's, or a replica's once rewritten) in
    Anthropic's shape, with the same message."""
    return anthropic_error_body(status, orjson.loads(openai_body)["error"]["message"])


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code="invalid_request", param=param)


def model_not_found(name: str) -> GatewayError:
    return GatewayError(404, f"The model `{name}` does not exist.", code="model_not_found",
                        param="model")


def model_unavailable(name: str, reason: str) -> GatewayError:
    """A Model that exists but cannot run (invalid spec or profile): 503 with the reason, not a
    wait for replicas that will never come."""
    return GatewayError(503, f"The model `{name}` cannot serve requests: {reason}",
                        code="model_unavailable", param="model")


# -- a model server's own errors ------------------------------------------------------------------

# How much of an upstream error body is read: a message, not a page.
UPSTREAM_ERROR_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 2000
_TAG = re.compile(rb"<[^>]*>")
_SPACE = re.compile(r"\s+")
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.I | re.S)
_SCRIPT = re.compile(rb"<(script|style)\b.*?</\1\s*>", re.I | re.S)


def upstream_error_body(status: int, content_type: bytes, raw: bytes) -> bytes:
    """An error a model server sent (non-2xx), in OpenAI's shape, keeping its message, and its
    type, param and code where it gave them. Understood: OpenAI's own shape; vLLM's older
    top-level ``{"object": "error", "message", "type", "param", "code"}``; FastAPI's
    ``{"detail": ...}`` (a string, or a list of validation errors); ``{"error": "text"}``
    (TGI, Ollama); an SSE ``data:`` line; HTML (its title, else its text); any other text.
    Never raises: what cannot be read becomes a message saying so."""
    message: Any = None
    source: dict[str, Any] = {}
    text = raw.strip()
    if text.startswith(b"data:"):
        text = text.split(b"\n", 1)[0][5:].strip()
    if text[:1] == b"{":
        try:
            payload = orjson.loads(text)
        except orjson.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            inner = payload.get("error")
            if isinstance(inner, dict):
                source = inner
            else:
                source = payload
                if isinstance(inner, str) and inner:
                    message = inner
            if message is None:
                message = _first(source, "message", "detail", "msg", "error_message")
            if isinstance(message, list):
                message = _validation_errors(message)
            if message is not None and not isinstance(message, str):
                message = orjson.dumps(message).decode()
    if not message:
        message = _text_of(text, content_type)
    if not message:
        phrase = _phrase(status)
        message = f"The model server answered {status}{' ' + phrase if phrase else ''} " \
                  "with no message."
    error_type = source.get("type")
    param = source.get("param")
    code = source.get("code")
    return error_body(status, message[:_MESSAGE_LIMIT],
                      code=str(code) if isinstance(code, (str, int)) and not isinstance(
                          code, bool) else None,
                      param=param if isinstance(param, str) else None,
                      error_type=error_type if isinstance(error_type, str) and error_type
                      else None)


def _first(source: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = source.get(key)
        if value:
            return value
    return None


def _validation_errors(items: list[Any]) -> str:
    """FastAPI's 422 detail: ``body.messages: Field required; ...``."""
    parts = []
    for item in items:
        if isinstance(item, dict) and "msg" in item:
            loc = item.get("loc")
            where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
            parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
        else:
            parts.append(orjson.dumps(item).decode() if not isinstance(item, str) else item)
    return "; ".join(parts)


def _text_of(raw: bytes, content_type: bytes) -> str:
    if b"html" in content_type.lower() or raw[:1] == b"<":
        title = _TITLE.search(raw)
        raw = title.group(1) if title and title.group(1).strip() else \
            _TAG.sub(b" ", _SCRIPT.sub(b" ", raw))
        raw = raw.replace(b"&nbsp;", b" ").replace(b"&lt;", b"<").replace(b"&gt;", b">") \
            .replace(b"&amp;", b"&")
    return _SPACE.sub(" ", raw[:_MESSAGE_LIMIT * 4].decode("utf-8", "replace")).strip()


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""
