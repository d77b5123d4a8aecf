"""Admitting a request under an API key: 401 without a valid key, 403 for a model the key may
not use, 429 past its limits, and OpenAI's ``x-ratelimit-*`` headers on what is admitted.

The proxy asks this module only when keys are on (``apiKeys.enabled``); with keys off the
request path pays a few ``is None`` tests. An admitted request gets a ``Ticket``: the proxy puts
its rate-limit headers on the response head (through kvgate's own server as ready-made lines,
see ``HEAD_LINES``) and, when the answer is complete, hands it the
answer's last reads (``Ticket.settle``), where the usage is (a JSON body's end, or the last SSE
event with ``include_usage``), to correct the estimate charged at admission by what the model
server counted; an error answer from the model server gives the estimate back. Nothing is done
per chunk: a wrapper around ``send`` cost ~1 µs a message, 20 µs a 20-chunk stream.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

from lb.errors import GatewayError
from lb.keys import KeyStore, Tenant
from lb.limits import Decision, LimitTable, duration_text
from lb.metrics import GatewayMetrics
from lb.parse import ParsedRequest, estimated_tokens

if TYPE_CHECKING:
    from lb.model import Model

# The scope key under which kvgate's server (lb.server) offers to take header lines for the
# response head it writes next: ``scope[HEAD_LINES](b"name: value\r\n...")``. The lines are
# written as they are, so only bytes the gateway made itself may be handed over, never a
# client's or a model server's, and never a framing header (Content-Length, Connection,
# Transfer-Encoding), which the server must see to frame the body.
HEAD_LINES = "kvgate.head_lines"


class Admission:
    """Keys, limits and their metrics, for one gateway process."""

    def __init__(self, store: KeyStore, metrics: GatewayMetrics) -> None:
        self.store = store
        self.table: LimitTable = store.table
        self.metrics = metrics
        store.rejected = metrics.key_rejected  # 401s counted as "unknown", or under the name
        # The tenant whose key the request carries, or a 401: the store's own method, bound
        # once (no wrapper per request).
        self.authenticate: Callable[[list[tuple[bytes, bytes]]], Tenant] = store.authenticate

    def admit(self, tenant: Tenant, parsed: ParsedRequest, requested: Model,
              served: str, scope: dict[str, Any]) -> Ticket:
        """Check the model and charge the limits: ``requested`` is the Model of the name the
        client asked for (its labels meet the key's selector), ``served`` the model that serves
        it (after a split: its upstream key is the one sent). The client's key is dropped by
        the proxy when it builds the upstream request (``KEY_HEADERS``)."""
        # Remembered with the Model it was allowed on: one lookup; anything else decides.
        if tenant.allowed.get(parsed.model) is not requested and not tenant.allows(
                parsed.model, requested):
            self.metrics.key_rejected(tenant.name, "model_not_allowed")
            raise GatewayError(403, f"The API key `{tenant.name}` may not use the model "
                               f"`{parsed.model}`.", code="model_not_allowed", param="model")
        tokens = estimated_tokens(parsed)
        # One call: the check, the charge and the admitted request's header lines.
        lines = self.table.admit_lines(tenant.slot, tenant.rpm, tenant.tpm, tokens)
        if lines.__class__ is not bytes:
            self.metrics.key_rejected(tenant.name, lines.refused)
            raise _rate_limited(tenant, lines, tokens)
        counts = tenant.counts or self._counts(tenant)
        counts[0] += 1
        counts[1] += tokens
        return Ticket(self, tenant, tokens, lines, scope.get(HEAD_LINES),
                      self.store.upstream_keys.get(served))

    def _counts(self, tenant: Tenant) -> list[int]:
        """The metrics' counts of the key's name, kept with the tenant from its first
        admission on (a reload's new tenant fetches the same list)."""
        tenant.counts = self.metrics.key_counts(tenant.name)
        return tenant.counts


class Ticket:
    """An admitted request: its charge, and the headers its answer carries."""

    __slots__ = ("_admission", "tenant", "estimate", "_lines", "_head_lines", "upstream_key")

    def __init__(self, admission: Admission, tenant: Tenant, estimate: int, lines: bytes,
                 head_lines: Callable[[bytes], None] | None = None,
                 upstream_key: list[tuple[bytes, bytes]] | None = None) -> None:
        self._admission = admission
        self.tenant = tenant
        self.estimate = estimate
        self._lines = lines  # the rate-limit header lines (``lb.limits.limit_lines``)
        self._head_lines = head_lines
        self.upstream_key = upstream_key  # the served model's own key header, if configured

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """The rate-limit headers of the answer whose head is sent next; call it just before.

        Under kvgate's own server (it offers ``HEAD_LINES``) they are handed to the server as
        header lines for that head, and the list returned is empty: bytes the gateway made
        from numbers need none of the checks the server runs on every header it is given (two
        regex searches and a ``lower()`` each). Under another ASGI server they are the
        list."""
        lines = self._lines
        if not lines:  # a key without limits
            return []
        if self._head_lines is None:
            return [_header(line) for line in lines.split(b"\r\n") if line]
        self._head_lines(lines)
        return []

    def settle(self, status: int, last: bytes, before: bytes = b"") -> None:
        """The answer is complete: ``last`` is its last read, ``before`` the one before it.
        Correct the estimate by the usage found at their end; an error answer gives the
        estimate back."""
        if not self.tenant.tpm:
            return
        if not 200 <= status < 300:
            self.reconcile(0)  # the model server refused it: no tokens were spent
            return
        tenant = self.tenant
        delta = self._admission.table.settle(
            tenant.slot, tenant.tpm, self.estimate,
            before[-_TAIL:] + last[-_TAIL:] if before else last[-_TAIL:])
        if delta:
            tenant.counts[1] += delta  # type: ignore[index]  # set at admission

    def reconcile(self, used: int) -> None:
        """The model server counted ``used`` tokens: correct the estimate charged."""
        delta = used - self.estimate
        if delta:
            self._admission.table.adjust_tokens(self.tenant.slot, self.tenant.tpm, delta)
            self.tenant.counts[1] += delta  # type: ignore[index]  # set at admission


def _header(line: bytes) -> tuple[bytes, bytes]:
    name, _, value = line.partition(b": ")
    return name, value


# How much of an answer's end is searched for its usage: the usage object is its last part.
_TAIL = 16 * 1024


def _limit_headers(tenant: Tenant, decision: Decision) -> list[tuple[bytes, bytes]]:
    """OpenAI's rate-limit headers, for the limits the key has."""
    headers = []
    if tenant.rpm:
        headers += ((b"x-ratelimit-limit-requests", tenant.rpm_text),
                    (b"x-ratelimit-remaining-requests", b"%d" % decision.remaining_requests),
                    (b"x-ratelimit-reset-requests",
                     duration_text(decision.reset_requests_ns).encode()))
    if tenant.tpm:
        headers += ((b"x-ratelimit-limit-tokens", tenant.tpm_text),
                    (b"x-ratelimit-remaining-tokens", b"%d" % decision.remaining_tokens),
                    (b"x-ratelimit-reset-tokens",
                     duration_text(decision.reset_tokens_ns).encode()))
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
