"""The upstream side: one keep-alive connection pool per process, and header hygiene.

The pool is ``lb.http1`` (httptools on asyncio protocols) rather than aiohttp's client: on this
hop aiohttp spends ~150 µs of CPU per request against ~25 µs (``python -m bench upstream``), and
the gateway's whole budget is 100 µs. Bytes pass through untouched (no decompression, no
cookies, no headers of the pool's own), so a model server sees what the client sent.
"""

from __future__ import annotations

from lb.config import UpstreamConfig
from lb.http1 import UpstreamPool

# Hop-by-hop headers (RFC 9110 7.6.1) and those the gateway itself owns.
REQUEST_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
    b"x-label-selector", b"expect",
})
_RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"server", b"date",
})
# Headers of a body that no longer hold once the gateway rewrote it.
_REWRITTEN_DROP = frozenset({b"content-length", b"etag", b"content-md5", b"digest",
                             b"repr-digest", b"content-digest"})


def create_pool(config: UpstreamConfig) -> UpstreamPool:
    return UpstreamPool(connect_timeout=config.connect_timeout_seconds,
                        read_timeout=config.read_timeout_seconds,
                        keepalive_timeout=config.keepalive_seconds,
                        max_idle_per_host=config.max_idle_per_host)


def request_headers(scope_headers: list[tuple[bytes, bytes]], content_type: bytes,
                    drop: frozenset[bytes] = REQUEST_DROP) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop ones (including any the client's ``Connection``
    header names, RFC 9110 7.6.1) and the others in ``drop`` (with API keys on, the client's
    key: ``lb.keys.KEY_HEADERS``), with the body's content type."""
    for name, value in scope_headers:
        if name == b"connection":
            drop = drop | {token.strip().lower() for token in value.split(b",")}
    headers = [(name, value) for name, value in scope_headers
               if name not in drop and name != b"content-type"]
    headers.append((b"content-type", content_type))
    return headers


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Upstream headers (names already lowercase) minus hop-by-hop ones."""
    return [(name, value) for name, value in headers if name not in _RESPONSE_DROP]


def sized_headers(headers: list[tuple[bytes, bytes]],
                  length: int | None) -> list[tuple[bytes, bytes]]:
    """``response_headers`` for a body the gateway rewrote: Content-Length says ``length``, or
    is left out (``None``: a stream whose size is not known ahead, sent chunked); digests of
    the body as it came no longer describe it."""
    relayed = [(name, value) for name, value in headers
               if name not in _RESPONSE_DROP and name not in _REWRITTEN_DROP]
    if length is not None:
        relayed.append((b"content-length", str(length).encode()))
    return relayed


def identity_encoding(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Request headers asking for an uncompressed answer (a body the gateway must rewrite):
    without Accept-Encoding any coding would be acceptable (RFC 9110 12.5.3)."""
    kept = [(name, value) for name, value in headers if name != b"accept-encoding"]
    kept.append((b"accept-encoding", b"identity"))
    return kept
