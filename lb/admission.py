"""Admitting a request under an API key: 401 without a valid key, 403 for a model the key may
not use, 429 past its limits, and OpenAI's ``x-ratelimit-*`` headers on what is admitted.

The proxy asks this module only when keys are on (``apiKeys.enabled``); with keys off the
request path pays one ``is None`` test. An admitted request's ``send`` is wrapped
(``Ticket.wrap``) to add the rate-limit headers to the response head and, when the key has a
token limit, to read the response's ``usage`` (the JSON body, or the last SSE event that
carries one) and correct the estimate charged at admission by what the model server counted;
an error answer from the model server gives the estimate back.
"""

from __future__ import annotations

import math
from typing import Any, Awaitable, Callable

import orjson

from lb.errors import GatewayError
from lb.keys import KEY_HEADERS, KeyExpired, KeyStore, Tenant
from lb.limits import Decision, LimitTable, duration_text
from lb.metrics import GatewayMetrics
from lb.parse import ParsedRequest, estimated_tokens

Send = Callable[[dict[str, Any]], Awaitable[None]]

# A JSON answer larger than this is passed on without reading its usage (the estimate stays).
_USAGE_BODY_LIMIT = 4 * 1024 * 1024
# How much of a stream's end is kept to find its usage event in.
_SSE_TAIL = 16 * 1024


class Admission:
    """Keys, limits and their metrics, for one gateway process."""

    def __init__(self, store: KeyStore, metrics: GatewayMetrics) -> None:
        self.store = store
        self.table: LimitTable = store.table
        self.metrics = metrics

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Tenant:
        try:
            return self.store.authenticate(headers)
        except KeyExpired as exc:
            self.metrics.key_rejected(exc.name, "expired")
            raise
        except GatewayError:
            self.metrics.key_rejected("unknown", "invalid_key")
            raise

    def admit(self, tenant: Tenant, parsed: ParsedRequest, model: str,
              scope: dict[str, Any]) -> Ticket:
        """Check the model and charge the limits; the request's headers lose the client's key
        (and gain the model's upstream key, if one is configured)."""
        if not tenant.allows(parsed.model):
            self.metrics.key_rejected(tenant.name, "model_not_allowed")
            raise GatewayError(403, f"The API key `{tenant.name}` may not use the model "
                               f"`{parsed.model}`.", code="model_not_allowed", param="model")
        tokens = estimated_tokens(parsed)
        decision = self.table.admit(tenant.slot, tenant.rpm, tenant.tpm, tokens)
        if decision.refused:
            self.metrics.key_rejected(tenant.name, decision.refused)
            raise _rate_limited(tenant, decision, tokens)
        self.metrics.key_admitted(tenant.name, tokens)
        headers = [h for h in scope["headers"] if h[0] not in KEY_HEADERS]
        upstream = self.store.upstream_keys.get(model)
        scope["headers"] = headers + upstream if upstream else headers
        return Ticket(self, tenant, tokens, _limit_headers(tenant, decision))


class Ticket:
    """An admitted request: its charge, and the headers its answer carries."""

    __slots__ = ("_admission", "tenant", "estimate", "headers")

    def __init__(self, admission: Admission, tenant: Tenant, estimate: int,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self._admission = admission
        self.tenant = tenant
        self.estimate = estimate
        self.headers = headers

    def wrap(self, send: Send) -> Send:
        return _Meter(self, send)

    def reconcile(self, used: int) -> None:
        """The model server counted ``used`` tokens: correct the estimate charged."""
        delta = used - self.estimate
        if delta:
            self._admission.table.adjust_tokens(self.tenant.slot, self.tenant.tpm, delta)
            self._admission.metrics.key_tokens_corrected(self.tenant.name, delta)


class _Meter:
    """``send`` with the rate-limit headers on the head, reading the answer's usage."""

    __slots__ = ("_ticket", "_send", "_mode", "_parts", "_size")

    def __init__(self, ticket: Ticket, send: Send) -> None:
        self._ticket = ticket
        self._send = send
        self._mode = ""  # "json" or "sse" while the body is watched for its usage
        self._parts: list[bytes] = []
        self._size = 0

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self._start(message)
        elif self._mode:
            self._body(message)
        await self._send(message)

    def _start(self, message: dict[str, Any]) -> None:
        headers = list(message.get("headers", ())) + self._ticket.headers
        message["headers"] = headers
        if not self._ticket.tenant.tpm:
            return
        if not 200 <= message["status"] < 300:
            self._ticket.reconcile(0)  # the model server refused it: no tokens were spent
            return
        ctype = b""
        for name, value in headers:
            if name == b"content-encoding" and value.strip().lower() != b"identity":
                return  # compressed: its usage is not worth inflating for
            if name == b"content-type":
                ctype = value
        if ctype.startswith(b"application/json"):
            self._mode = "json"
        elif ctype.startswith(b"text/event-stream"):
            self._mode = "sse"

    def _body(self, message: dict[str, Any]) -> None:
        chunk = message.get("body", b"")
        if chunk:
            self._parts.append(chunk)
            self._size += len(chunk)
            if self._mode == "json" and self._size > _USAGE_BODY_LIMIT:
                self._mode, self._parts = "", []
                return
            if self._mode == "sse" and self._size > 2 * _SSE_TAIL and len(self._parts) > 2:
                tail = b"".join(self._parts)[-_SSE_TAIL:]
                self._parts, self._size = [tail], len(tail)
        if message.get("more_body", False):
            return
        body = b"".join(self._parts)
        self._parts = []
        used = _json_usage(body) if self._mode == "json" else _sse_usage(body)
        self._mode = ""
        if used is not None:
            self._ticket.reconcile(used)


def _json_usage(body: bytes) -> int | None:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return _tokens(payload.get("usage")) if isinstance(payload, dict) else None


def _sse_usage(tail: bytes) -> int | None:
    """The usage of the last event that carries one (OpenAI's final chunk with
    ``stream_options.include_usage``)."""
    at = tail.rfind(b'"usage"')
    while at >= 0:
        start = tail.rfind(b"data:", 0, at)
        end = tail.find(b"\n", at)
        if start < 0:
            return None
        try:
            payload = orjson.loads(tail[start + 5:end if end >= 0 else len(tail)])
        except orjson.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            used = _tokens(payload.get("usage"))
            if used is None and isinstance(payload.get("response"), dict):
                used = _tokens(payload["response"].get("usage"))  # Responses API's last event
            if used is not None:
                return used
        at = tail.rfind(b'"usage"', 0, start)
    return None


def _tokens(usage: Any) -> int | None:
    """Total tokens of a usage object: OpenAI's ``total_tokens``, else input + output."""
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if type(total) is int and total >= 0:
        return total
    parts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "input_tokens",
                                    "output_tokens")]
    counted = [p for p in parts if type(p) is int and p >= 0]
    return sum(counted) if counted else None


def _limit_headers(tenant: Tenant, decision: Decision) -> list[tuple[bytes, bytes]]:
    """OpenAI's rate-limit headers, for the limits the key has."""
    headers = []
    if tenant.rpm:
        headers += [(b"x-ratelimit-limit-requests", str(tenant.rpm).encode()),
                    (b"x-ratelimit-remaining-requests",
                     str(decision.remaining_requests).encode()),
                    (b"x-ratelimit-reset-requests",
                     duration_text(decision.reset_requests_ns).encode())]
    if tenant.tpm:
        headers += [(b"x-ratelimit-limit-tokens", str(tenant.tpm).encode()),
                    (b"x-ratelimit-remaining-tokens", str(decision.remaining_tokens).encode()),
                    (b"x-ratelimit-reset-tokens",
                     duration_text(decision.reset_tokens_ns).encode())]
    return headers


def _rate_limited(tenant: Tenant, decision: Decision, tokens: int) -> GatewayError:
    wait_s = decision.retry_after_ns / 1e9
    if decision.refused == "requests":
        what = (f"requests per min (RPM): Limit {tenant.rpm}, "
                f"Used {tenant.rpm - decision.remaining_requests}, Requested 1")
    elif tokens > tenant.tpm:
        what = (f"tokens per min (TPM): Limit {tenant.tpm}, Requested {tokens}. The request "
                "is larger than the key's whole budget; send fewer tokens or a lower max_tokens")
    else:
        what = (f"tokens per min (TPM): Limit {tenant.tpm}, "
                f"Used {tenant.tpm - decision.remaining_tokens}, Requested {tokens}")
    headers = {k.decode(): v.decode() for k, v in _limit_headers(tenant, decision)}
    headers["retry-after"] = str(max(1, math.ceil(wait_s)))
    headers["retry-after-ms"] = str(max(1, math.ceil(wait_s * 1000)))
    return GatewayError(429, f"Rate limit reached for API key `{tenant.name}` on {what}. "
                        f"Please try again in {duration_text(decision.retry_after_ns)}.",
                        code="rate_limit_exceeded", headers=headers)
