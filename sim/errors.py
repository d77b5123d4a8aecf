"""Errors shaped like vLLM's OpenAI server returns them.

Clients (the OpenAI SDK, the gateway's retry logic) branch on the status code and on
`error.type`, so the simulator must produce the same body vLLM does:
`{"error": {"message": ..., "type": ..., "param": ..., "code": <status>}}`.
"""

from __future__ import annotations

from typing import Optional

_DEFAULT_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class SimError(Exception):
    """An error the simulated server reports to the client with an HTTP status."""

    def __init__(self, status: int, message: str, err_type: Optional[str] = None,
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type or _DEFAULT_TYPES.get(status, "InternalServerError")
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.err_type,
                          "param": self.param, "code": self.status}}


def model_not_found(model: str) -> SimError:
    """vLLM's answer for a model name that is neither the base model nor a loaded adapter."""
    return SimError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
