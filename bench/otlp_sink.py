"""A minimal OTLP/HTTP trace receiver for benchmarks: decodes each export, counts its spans.

``POST /v1/traces`` (protobuf ``ExportTraceServiceRequest``) is answered 200 with an empty
``ExportTraceServiceResponse``; ``GET /count`` says how many spans came so far, so a benchmark
can wait until a gateway has exported everything it traced before reading its CPU count;
``GET /instances`` lists the ``service.instance.id`` of the processes that sent them (JSON).

    python -m bench.otlp_sink --port 4318
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

_lock = threading.Lock()
_spans = 0
_instances: set[str] = set()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        global _spans
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = ExportTraceServiceRequest.FromString(body)
        count = sum(len(scope.spans) for resource in request.resource_spans
                    for scope in resource.scope_spans)
        instances = {attribute.value.string_value for resource in request.resource_spans
                     for attribute in resource.resource.attributes
                     if attribute.key == "service.instance.id"}
        with _lock:
            _spans += count
            _instances.update(instances)
        self._reply(ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")

    def do_GET(self) -> None:  # noqa: N802
        with _lock:
            if self.path == "/instances":
                self._reply(json.dumps(sorted(_instances)).encode(), "application/json")
            else:
                self._reply(str(_spans).encode(), "text/plain")

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), _Handler).serve_forever()


if __name__ == "__main__":
    main()
