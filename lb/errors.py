"""OpenAI-shaped errors.

Every failure the gateway itself produces is one of these, so that OpenAI SDKs raise the
exception class that matches the status (BadRequestError, NotFoundError, RateLimitError, ...)
and clients see a message, never a traceback.
"""

from __future__ import annotations

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
               param: str | None = None) -> bytes:
    return orjson.dumps({"error": {
        "message": message,
        "type": _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
        "param": param,
        "code": code,
    }})


def bad_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code="invalid_request", param=param)


def model_not_found(name: str) -> GatewayError:
    return GatewayError(404, f"The model `{name}` does not exist.", code="model_not_found",
                        param="model")
