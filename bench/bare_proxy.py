"""The calibration reference: the plainest uvicorn + aiohttp proxy one would write.

The issue's CPU targets are set against "a bare uvicorn+aiohttp proxy" measured on the
reference machine (~125 µs per JSON request, ~185 µs per 20-chunk stream). Running this next to
kvgate in the same run turns those absolute figures into ratios that hold on any machine: a raw
ASGI app (no routing, no parsing), one ``aiohttp.ClientSession`` with a keep-alive connector,
the body forwarded as is and the response relayed chunk by chunk.

    python -m bench.bare_proxy --port 8001 --upstream 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

_HOP = frozenset({b"host", b"content-length", b"connection", b"transfer-encoding"})
_RESPONSE_HOP = frozenset({"Content-Length", "Transfer-Encoding", "Connection", "Date", "Server"})


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self._base = f"http://{upstream}"
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"] if k not in _HOP}
        assert self._session is not None
        async with self._session.post(self._base + scope["path"], data=body,
                                      headers=headers) as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()
                                    if k not in _RESPONSE_HOP]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        await receive()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=75),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"))
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await self._session.close()
        await send({"type": "lifespan.shutdown.complete"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port of the backend")
    args = parser.parse_args(argv)
    uvicorn.run(BareProxy(args.upstream), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
