"""Prometheus metrics of the gateway, in a registry of its own (several gateways can share a
process in tests, and the metrics port serves exactly these).

The active-requests gauge keeps KubeAI's name and labels so its autoscaler queries work; unlike
KubeAI, a request for ``model_adapter`` counts toward its base model, where the autoscaler
looks. Ring counters (lookups, walk length, fallbacks) are read from the rings at scrape time
instead of being bumped per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from lb.registry import EndpointGroup

_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active = Gauge("kubeai_inference_requests_active",
                            "Requests in flight through this gateway, by base model.",
                            ["request_model", "request_type"], registry=r)
        self.requests = Counter("kvgate_requests_total", "Finished requests.",
                                ["model", "kind", "code"], registry=r)
        self.duration = Histogram("kvgate_request_duration_seconds",
                                  "Time from request to the last byte of the response.",
                                  ["model", "kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.first_byte = Histogram("kvgate_time_to_first_byte_seconds",
                                    "Time from request to the first response byte from upstream.",
                                    ["model", "kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter("kvgate_upstream_retries_total",
                               "Attempts retried on another replica.", ["model", "reason"],
                               registry=r)
        self.waiting = Gauge("kvgate_waiting_requests",
                             "Requests waiting for a ready replica.", ["model"], registry=r)
        self.wait_time = Histogram("kvgate_waiting_seconds", "Time spent in the waiting room.",
                                   ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("kvgate_waiting_room_rejected_total",
                                "Requests refused because the waiting room was full.",
                                ["model"], registry=r)
        # Label lookups take a lock and hash a tuple; requests reuse the children instead.
        self._active_children: dict[str, Gauge] = {}
        self._timing_children: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}
        self._count_children: dict[tuple[str, str, int], Counter] = {}

    def watch_rings(self, groups: Callable[[], dict[str, EndpointGroup]]) -> None:
        self.registry.register(_RingCollector(groups))

    def active_gauge(self, model: str) -> Gauge:
        child = self._active_children.get(model)
        if child is None:
            child = self._active_children[model] = self.active.labels(model, "http")
        return child

    def finished(self, model: str, kind: str, code: int, seconds: float) -> None:
        counter = self._count_children.get((model, kind, code))
        if counter is None:
            counter = self._count_children[(model, kind, code)] = self.requests.labels(
                model, kind, str(code))
        counter.inc()
        self._timings(model, kind)[0].observe(seconds)

    def first_byte_after(self, model: str, kind: str, seconds: float) -> None:
        self._timings(model, kind)[1].observe(seconds)

    def _timings(self, model: str, kind: str) -> tuple[Histogram, Histogram]:
        children = self._timing_children.get((model, kind))
        if children is None:
            children = self._timing_children[(model, kind)] = (
                self.duration.labels(model, kind), self.first_byte.labels(model, kind))
        return children

    def retried(self, model: str, reason: str) -> None:
        self.retries.labels(model, reason).inc()

    def waiting_changed(self, model: str, count: int) -> None:
        self.waiting.labels(model).set(count)

    def waited(self, model: str, seconds: float) -> None:
        self.wait_time.labels(model).observe(seconds)

    def waiting_room_rejected(self, model: str) -> None:
        self.rejected.labels(model).inc()


class _RingCollector(Collector):
    def __init__(self, groups: Callable[[], dict[str, EndpointGroup]]) -> None:
        self._groups = groups

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        lookups = CounterMetricFamily("kvgate_hash_lookups", "CHWBL ring lookups.", labels=["model"])
        steps = CounterMetricFamily("kvgate_hash_lookup_iterations",
                                    "Virtual nodes visited by CHWBL lookups.", labels=["model"])
        fallbacks = CounterMetricFamily(
            "kvgate_hash_lookup_fallbacks",
            "Lookups where no endpoint was under the load bound (first match used).",
            labels=["model"])
        in_flight = GaugeMetricFamily("kvgate_endpoint_in_flight",
                                      "In-flight requests per endpoint through this gateway.",
                                      labels=["model", "endpoint"])
        endpoints = GaugeMetricFamily("kvgate_endpoints", "Ready endpoints per model.",
                                      labels=["model"])
        for model, group in self._groups().items():
            ring = group.ring
            n_lookups, n_steps, n_fallbacks = ring.stats()
            lookups.add_metric([model], n_lookups)
            steps.add_metric([model], n_steps)
            fallbacks.add_metric([model], n_fallbacks)
            endpoints.add_metric([model], len(ring))
            for key in ring.keys():
                in_flight.add_metric([model, key], ring.load(key))
        yield from (lookups, steps, fallbacks, in_flight, endpoints)
