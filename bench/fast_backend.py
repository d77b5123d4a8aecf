"""A deliberately cheap OpenAI-shaped backend for overhead benchmarks.

It answers every POST with a fixed chat completion, or, when the body asks for
``"stream": true``, with a fixed number of SSE chunks spaced ``--chunk-gap-ms`` apart (1 ms: the
proxy under test sees each chunk as its own read, as with a model server generating tokens; 0:
one write per chunk, all in one go, so chunks mostly share a read). It is
a raw asyncio protocol over httptools, costing a few microseconds per request, so measurements
describe the proxy, not the backend.

    python -m bench.fast_backend --port 9100 --chunks 20 --chunk-gap-ms 1
"""

from __future__ import annotations

import argparse
import asyncio

import httptools

_COMPLETION = (b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
               b'"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":'
               b'"Hello from the benchmark backend."},"finish_reason":"stop"}],"usage":'
               b'{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}')
_CHUNK = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
          b'"model":"m","choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}]}'
          b'\n\n')
_DONE = b"data: [DONE]\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                  % len(_COMPLETION)) + _COMPLETION
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
             b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n")
_SSE_CHUNK = _chunked(_CHUNK)
_SSE_END = _chunked(_DONE) + b"0\r\n\r\n"


class _Protocol(asyncio.Protocol):
    def __init__(self, chunks: int, gap: float) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._body: list[bytes] = []
        self._chunks = chunks
        self._gap = gap
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_begin(self) -> None:
        self._body = []

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if b'"stream":true' in b"".join(self._body).replace(b" ", b""):
            transport.write(_SSE_HEAD)
            if self._gap > 0:
                asyncio.get_running_loop().create_task(self._stream(transport))
                return
            for _ in range(self._chunks):  # all tokens ready: one write per chunk, no pause
                transport.write(_SSE_CHUNK)
            transport.write(_SSE_END)
        else:
            transport.write(_JSON_RESPONSE)

    async def _stream(self, transport: asyncio.Transport) -> None:
        for _ in range(self._chunks):
            if transport.is_closing():
                return
            transport.write(_SSE_CHUNK)
            await asyncio.sleep(self._gap)
        if not transport.is_closing():
            transport.write(_SSE_END)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(host: str, port: int, chunks: int, gap_ms: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Protocol(chunks, gap_ms / 1000), host, port,
                                      backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-gap-ms", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    run(serve(args.host, args.port, args.chunks, args.chunk_gap_ms))


if __name__ == "__main__":
    main()
