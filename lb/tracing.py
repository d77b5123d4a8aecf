"""OpenTelemetry traces of the requests through the gateway: off by default, free when off.

Switched on by the gateway config (``tracing.enabled: true``). The OpenTelemetry environment
then configures the rest, as every SDK reads it: ``OTEL_TRACES_EXPORTER`` (``otlp``, the
default, or ``console``; ``none`` keeps tracing off), ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``,
``..._HEADERS`` and ``..._PROTOCOL`` (``http/protobuf``), ``OTEL_SERVICE_NAME`` (``kvgate`` when
unset), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]``, ``OTEL_BSP_*`` and
``OTEL_PROPAGATORS``. ``OTEL_SDK_DISABLED=true`` keeps it off whatever the config says. The
environment is not enough on its own: platforms inject ``OTEL_*`` variables into every
container, and a gateway should not start paying for spans because its neighbour wanted them.

Free when off: this module imports nothing of OpenTelemetry at import time. ``start`` imports
the SDK, in each worker process after the fork (the gateway's lifespan runs there, so the batch
processor's export thread belongs to the process that makes the spans), and returns None when
tracing is off; the proxy then makes no ``Trace`` and each hook is one ``is None`` test.

One trace per request (the client's own when it sends a W3C ``traceparent``):

- ``POST <path>`` (server span, from the first byte of the request to the last of the answer;
  a ``first_byte`` event when the answer starts), its children:
- ``parse``: reading the body, parsing it, resolving model and adapter;
- ``pick``: the scheduler's choice (strategy, a hash of the routing key, the candidate replica,
  its load and CHWBL's bound at that moment), one per attempt;
- ``queue``: the time spent in the waiting room when no replica was free;
- ``upstream``: one client span per attempt on a replica (a retried attempt is its own span,
  marked ``kvgate.attempt.retried``); its context is the ``traceparent`` the model server gets.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lb.ring import hash64
from lb.schema import SchemaError, setting

if TYPE_CHECKING:  # the balancer and the model only for their types: no import at run time
    from lb.balancer import Lease
    from lb.model import Model
    from lb.parse import ParsedRequest

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class TracingConfig:
    enabled: bool = setting(False, doc="OpenTelemetry spans for every request (parse, pick, queue, "
                            "each upstream attempt), exported as the standard OTEL_* environment "
                            "variables say (OTLP over HTTP by default); the W3C traceparent is "
                            "honoured from clients and passed to the model servers. Off by default: "
                            "when off, nothing of OpenTelemetry is loaded. OTEL_SDK_DISABLED=true or "
                            "OTEL_TRACES_EXPORTER=none keep it off.")


_OTLP_PROTOCOLS = ("http/protobuf", "grpc")


def active(config: TracingConfig) -> bool:
    """Whether this process traces: the config says so and the environment does not forbid it."""
    if not config.enabled:
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(_exporter_names())


def check(config: TracingConfig) -> None:
    """Refuse at start-up an environment the exporters cannot honour (no OpenTelemetry import:
    the CLI calls this before forking, tracing on or off)."""
    if not active(config):
        return
    for name in _exporter_names():
        if name not in ("otlp", "console"):
            raise SchemaError("tracing", f"OTEL_TRACES_EXPORTER={name!r} is not supported here "
                              "(use otlp, console or none)")
        if name == "otlp" and _otlp_protocol() not in _OTLP_PROTOCOLS:
            raise SchemaError("tracing", f"OTLP protocol {_otlp_protocol()!r} is not supported "
                              "(use http/protobuf, or grpc with opentelemetry-exporter-otlp-proto-grpc "
                              "installed)")


def _exporter_names() -> list[str]:
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    return [n for n in (part.strip().lower() for part in raw.split(",")) if n and n != "none"]


def _otlp_protocol() -> str:
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()


def start(config: TracingConfig, exporter: Any = None) -> Tracing | None:
    """This process's tracing, or None when off. ``exporter``: a span exporter to use instead
    of the environment's (the tests' in-memory one), exporting each span as it ends."""
    if exporter is None and not active(config):
        return None
    check(config)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "kvgate"}))
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for made in _exporters():  # batched: span.end() only queues, the loop never waits
            provider.add_span_processor(BatchSpanProcessor(made))
    return Tracing(provider)


def _exporters() -> list[Any]:
    made: list[Any] = []
    for name in _exporter_names():
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            made.append(ConsoleSpanExporter())
        elif _otlp_protocol() == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise SchemaError("tracing", "OTLP over grpc needs the "
                                  "opentelemetry-exporter-otlp-proto-grpc package") from None
            made.append(OTLPSpanExporter())
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter)

            made.append(HttpExporter())
    return made


class Tracing:
    """One process's tracer provider, the tracer the proxy makes spans with, the propagator."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self.tracer = provider.get_tracer("kvgate")
        self.propagator = propagate.get_global_textmap()  # OTEL_PROPAGATORS; W3C by default
        self.trace_api = trace

    def begin(self, kind: str, scope: dict[str, Any]) -> Trace:
        """The trace of one request, its server span started now."""
        return Trace(self, kind, scope)

    def shutdown(self) -> None:
        """Flush what is queued and stop the export threads (blocking: run it off the loop)."""
        self.provider.shutdown()


class _AsgiHeaders:
    """The propagator's getter over ASGI's list of (lower-case name, value) byte pairs."""

    @staticmethod
    def get(carrier: Headers, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for n, value in carrier if n == name]
        return values or None

    @staticmethod
    def keys(carrier: Headers) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier]


_GETTER = _AsgiHeaders()


class Trace:
    """One request's spans. The proxy calls the hooks in order: ``parsed``, then per attempt
    ``picking`` (``queued`` when it must wait), ``picked``, ``attempt``, ``attempt_done``;
    ``first_byte`` when the answer starts; ``finish`` always, last. Spans left open by an
    exception (a queue that timed out, an attempt cut short) are closed by ``finish``."""

    __slots__ = ("_tracing", "_root", "_ctx", "_began", "_pick_at", "_queued_at", "_attempt",
                 "_attempts", "_model")

    def __init__(self, tracing: Tracing, kind: str, scope: dict[str, Any]) -> None:
        self._tracing = tracing
        self._began = time.time_ns()
        parent = tracing.propagator.extract(scope["headers"], getter=_GETTER)
        api = tracing.trace_api
        self._root = tracing.tracer.start_span(
            f"{scope.get('method', 'POST')} {scope['path']}", context=parent,
            kind=api.SpanKind.SERVER, start_time=self._began,
            attributes={"http.request.method": scope.get("method", "POST"),
                        "url.path": scope["path"], "kvgate.request.kind": kind})
        self._ctx = api.set_span_in_context(self._root)
        self._pick_at = self._queued_at = 0
        self._attempt: Any = None
        self._attempts = 0
        self._model = ""

    def _span(self, name: str, start: int, end: int, attributes: dict[str, Any]) -> Any:
        span = self._tracing.tracer.start_span(name, context=self._ctx, start_time=start,
                                               attributes=attributes)
        span.end(end_time=end)
        return span

    def parsed(self, parsed: ParsedRequest, model: Model, adapter: str) -> None:
        self._model = model.name
        self._root.set_attributes({"kvgate.model": model.name, "kvgate.adapter": adapter,
                                   "kvgate.stream": parsed.stream})
        self._span("parse", self._began, time.time_ns(),
                   {"kvgate.request.body_bytes": len(parsed.body), "kvgate.model": model.name})

    def picking(self) -> None:
        self._pick_at = time.time_ns()

    def queued(self) -> None:
        """No replica now: the pick ends empty-handed and the wait begins."""
        self._queued_at = now = time.time_ns()
        self._span("pick", self._pick_at, now, {"kvgate.pick.queued": True})

    def picked(self, model: Model, adapter: str, key: str, lease: Lease, weight: int) -> None:
        now = time.time_ns()
        attributes = _pick_attributes(model, adapter, key, lease, weight)
        if self._queued_at:
            self._span("queue", self._queued_at, now, attributes)
            self._queued_at = 0
        else:
            self._span("pick", self._pick_at, now, attributes)

    def attempt(self, lease: Lease, headers: Headers) -> Headers:
        """Start the attempt's span; the headers to send it with, carrying its traceparent (the
        client's own traceparent and tracestate give way to the gateway's)."""
        api = self._tracing.trace_api
        host, _, port = lease.address.rpartition(":")
        self._attempt = span = self._tracing.tracer.start_span(
            "upstream", context=self._ctx, kind=api.SpanKind.CLIENT,
            attributes={"kvgate.attempt": self._attempts, "kvgate.replica": lease.key,
                        "server.address": host, "server.port": int(port) if port.isdigit() else 0})
        self._attempts += 1
        carrier: dict[str, str] = {}
        self._tracing.propagator.inject(carrier, context=api.set_span_in_context(span))
        names = {name.encode() for name in carrier}
        sent = [(name, value) for name, value in headers if name not in names
                and name != b"traceparent" and name != b"tracestate"]
        sent += [(name.encode(), value.encode("latin-1")) for name, value in carrier.items()]
        return sent

    def attempt_done(self, status: int, retried: bool) -> None:
        """The attempt ended with ``status`` (0: no answer, the connection failed); ``retried``:
        the request goes on to another attempt."""
        span, self._attempt = self._attempt, None
        if span is None:
            return
        if status:
            span.set_attribute("http.response.status_code", status)
        if retried:
            span.set_attribute("kvgate.attempt.retried", True)
        if status == 0 or status >= 500:
            span.set_attribute("error.type", str(status) if status else "connect_error")
            span.set_status(self._tracing.trace_api.StatusCode.ERROR)
        span.end()

    def first_byte(self) -> None:
        """The answer starts (the upstream's head came and is passed on)."""
        now = time.time_ns()
        self._root.add_event("first_byte", timestamp=now)
        self._root.set_attribute("kvgate.time_to_first_byte_ms", (now - self._began) / 1e6)

    def finish(self, status: int) -> None:
        """End the request's trace with the status the client got (499: it left)."""
        now = time.time_ns()
        if self._queued_at:
            self._span("queue", self._queued_at, now, {"error.type": str(status)})
        if self._attempt is not None:
            self.attempt_done(status, False)
        root = self._root
        root.set_attribute("http.response.status_code", status)
        if status >= 500:
            root.set_attribute("error.type", str(status))
            root.set_status(self._tracing.trace_api.StatusCode.ERROR)
        root.end(end_time=now)


def _pick_attributes(model: Model, adapter: str, key: str, lease: Lease,
                     weight: int) -> dict[str, Any]:
    """What the scheduler saw: the routing key as the ring hashes it (a hash, not the prompt's
    text), the replica it chose, that replica's load before this request and CHWBL's bound
    (the most load a replica may carry: mean load times the model's meanLoadFactor)."""
    strategy = model.spec.load_balancing.strategy
    ring = lease.group.ring
    attributes: dict[str, Any] = {"kvgate.pick.strategy": strategy,
                                  "kvgate.pick.candidate": lease.key,
                                  "kvgate.pick.load": ring.load(lease.key) - weight,
                                  "kvgate.pick.weight": weight}
    if key:
        attributes["kvgate.pick.key_hash"] = f"{hash64(adapter + key):016x}"
        attributes["kvgate.pick.key_length"] = len(key)
    replicas = len(ring)
    if replicas:
        attributes["kvgate.pick.bound"] = ring.mean_load_factor * ring.total / (100 * replicas)
    return attributes
