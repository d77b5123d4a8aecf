"""The upstream side: one aiohttp ClientSession per process, and header hygiene.

The session never decompresses (bytes pass through with their Content-Encoding), keeps no
cookies, and adds no headers of its own, so a model server sees what the client sent.
"""

from __future__ import annotations

import aiohttp

from lb.config import UpstreamConfig

# Hop-by-hop headers (RFC 9110 7.6.1) and those the gateway itself owns.
_REQUEST_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
    b"x-label-selector", b"expect",
})
_RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te", b"trailer",
    b"upgrade", b"server", b"date",
})


def create_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.max_connections,
        limit_per_host=0,
        keepalive_timeout=config.keepalive_seconds,
        ttl_dns_cache=300,
    )
    timeout = aiohttp.ClientTimeout(total=None, connect=config.connect_timeout_seconds,
                                    sock_read=config.read_timeout_seconds)
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
    )


def request_headers(scope_headers: list[tuple[bytes, bytes]],
                    content_type: bytes) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, with the body's content type."""
    headers = [(name.decode("latin-1"), value.decode("latin-1"))
               for name, value in scope_headers
               if name not in _REQUEST_DROP and name != b"content-type"]
    headers.append(("Content-Type", content_type.decode("latin-1")))
    return headers


def response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in raw if name.lower() not in _RESPONSE_DROP]
