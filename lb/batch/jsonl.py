"""The batch file formats: checking an input file line by line, and the lines of the output
and error files, exactly as OpenAI's Batch API writes them.

Input line: ``{"custom_id": str, "method": "POST", "url": <the batch's endpoint>, "body": {...}}``.
Output line: ``{"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id",
"body"}, "error": null}``; a request that got no answer (refused here, expired, cancelled) has
``"response": null`` and ``"error": {"code", "message"}`` instead. Answers with status >= 400
go to the error file, like requests that got none.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from lb.batch.limits import BatchLimits
from lb.batch.store import FAILED, NO_USAGE, PENDING, Usage

# The endpoints a batch may name: those kvgate serves that OpenAI's Batch API also runs.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one input line cannot run (OpenAI's BatchError fields)."""

    line: int
    code: str
    message: str
    param: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class Checked:
    """An input file read line by line: a row per request for the store, and the errors."""

    rows: list[tuple[int, str | None, bytes | None, int, bytes | None]]
    errors: list[LineError]

    @property
    def runnable(self) -> int:
        return len(self.rows) - len(self.errors)


def check_input(data: bytes, endpoint: str, limits: BatchLimits) -> Checked:
    """Every non-blank line becomes a request: PENDING with its body when it can run, FAILED
    with its error line when it cannot (bad JSON, wrong method or url, missing or duplicate
    custom_id, no model, a stream, or past one of the batch's ``limits``). Runs on a worker
    thread: it is all CPU."""
    rows: list[tuple[int, str | None, bytes | None, int, bytes | None]] = []
    errors: list[LineError] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        custom_id, body, error = _check_line(number, raw, endpoint, seen, limits)
        if error is None:
            rows.append((number, custom_id, body, PENDING, None))
        else:
            errors.append(error)
            rows.append((number, custom_id, None, FAILED,
                         error_line(custom_id, error.code, error.message, error.line)))
    return Checked(rows, errors)


def _check_line(number: int, raw: bytes, endpoint: str, seen: set[str],
                limits: BatchLimits) -> tuple[str | None, bytes | None, LineError | None]:
    too_long = limits.size(number, len(raw.rstrip(b"\r")))
    if too_long is not None:
        custom_id = _custom_id_of(raw, seen)
        return custom_id, None, LineError(number, *too_long)
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, None, LineError(number, "invalid_json_line",
                                     f"Line {number} is not valid JSON: {exc}.")
    if not isinstance(item, dict):
        return None, None, LineError(number, "invalid_json_line",
                                     f"Line {number} is not a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, None, LineError(number, "missing_required_parameter",
                                     f"Line {number} has no custom_id (a non-empty string).",
                                     "custom_id")
    if custom_id in seen:
        return custom_id, None, LineError(
            number, "duplicate_custom_id", f"The custom_id {custom_id!r} of line {number} was "
            "used on an earlier line; each request needs its own.", "custom_id")
    seen.add(custom_id)
    error = _check_request(number, item, endpoint)
    if error is not None:
        return custom_id, None, error
    refused = limits.admit(number, item["body"])
    if refused is not None:
        return custom_id, None, LineError(number, *refused)
    return custom_id, orjson.dumps(item["body"]), None


def _custom_id_of(raw: bytes, seen: set[str]) -> str | None:
    """The custom_id of a line refused before it is checked (too long), if it has one, for its
    error line; a later line may not use it again."""
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    custom_id = item.get("custom_id") if isinstance(item, dict) else None
    if not isinstance(custom_id, str) or not custom_id:
        return None
    seen.add(custom_id)
    return custom_id


def _check_request(number: int, item: dict[str, Any], endpoint: str) -> LineError | None:
    method = item.get("method")
    if method != "POST":
        return LineError(number, "invalid_method", f"Line {number} has method {method!r}; only "
                         "POST is supported.", "method")
    url = item.get("url")
    if url != endpoint:
        return LineError(number, "mismatched_url", f"Line {number} has url {url!r}, but the "
                         f"batch's endpoint is {endpoint}; every line must use it.", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        return LineError(number, "invalid_request", f"Line {number} has no body object.", "body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return LineError(number, "missing_required_parameter",
                         f"Line {number} names no model (body.model).", "body.model")
    if body.get("stream") is True:
        return LineError(number, "invalid_request", f"Line {number} asks for a stream; batch "
                         "requests cannot stream.", "body.stream")
    return None


def response_line(custom_id: str, status: int, request_id: str,
                  body: bytes) -> tuple[bytes, Usage]:
    """The output (or error) line of a request that got an answer, and the tokens its
    answer reports (OpenAI's `usage`; none for a body without one)."""
    try:
        parsed: Any = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = body.decode("utf-8", "replace")
    line = orjson.dumps({"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id,
                         "response": {"status_code": status, "request_id": request_id,
                                      "body": parsed},
                         "error": None})
    return line, usage_of(parsed)


def usage_of(body: Any) -> Usage:
    """(input, cached, output, reasoning) tokens from an answer's `usage`, wrong types as 0."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return NO_USAGE
    prompt = usage.get("prompt_tokens_details")
    completion = usage.get("completion_tokens_details")
    return (_count(usage.get("prompt_tokens")),
            _count(prompt.get("cached_tokens")) if isinstance(prompt, dict) else 0,
            _count(usage.get("completion_tokens")),
            _count(completion.get("reasoning_tokens")) if isinstance(completion, dict) else 0)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def error_line(custom_id: str | None, code: str, message: str, line: int | None = None) -> bytes:
    """The error-file line of a request that got no answer."""
    error: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    return orjson.dumps({"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id,
                         "response": None, "error": error})
