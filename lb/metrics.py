"""Prometheus metrics of the gateway, in a registry of its own (several gateways can share a
process in tests, and the metrics port serves exactly these).

The active-requests gauge keeps KubeAI's name and labels so its autoscaler queries work; unlike
KubeAI, a request for ``model_adapter`` counts toward its base model, where the autoscaler
looks.

Per-request figures (active requests, requests by code, duration, time to first byte) are
plain integers and bucket counts updated on the event loop and turned into metric families at
scrape time: prometheus-client's own metric objects take a lock per update, which costs ~1 µs
each and seven updates per request. The queue's gauge and histogram are kept the same
way: it is rare, but when a replica appears thousands of requests leave it at once, and
prometheus-client's gauge set and histogram observe cost ~3.5 µs per request there, against
~0.4 µs. Ring counters (lookups, walk length, fallbacks) are read from the rings at scrape
time too. Rare events (retries, a full queue) use ordinary metrics.

With several worker processes (``kvgate gateway --workers N``) the active-requests gauge and the
per-endpoint in-flight counts are read from the shared load table, so they cover every worker
(the autoscaler reads the gauge); the other series are the serving worker's own.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from lb.loads import LocalCount

if TYPE_CHECKING:
    from lb.engine_metrics import EngineScraper
    from lb.kv_events import KVIndex
    from lb.registry import EndpointGroup
    from lb.ring import LoadTable, SharedCount

_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)


class _Buckets:
    """A histogram's state: counts per bucket (plus +Inf) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        running, out = 0, []
        for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.retries = Counter("kvgate_upstream_retries_total",
                               "Attempts retried on another replica.", ["model", "reason"],
                               registry=r)
        self.rejected = Counter("kvgate_queue_rejected_total",
                                "Queued requests refused or ended: the queue full (newcomer refused), "
                                "shed (displaced by a higher class or smaller flow), or timeout.",
                                ["model", "priority", "reason"], registry=r)
        self.splits = Counter("kvgate_split_requests_total",
                              "Requests for a name sent to another by a traffic split (spec.splits).",
                              ["requested", "target"], registry=r)
        self.active: dict[str, LocalCount | SharedCount] = {}
        self._loads: LoadTable | None = None
        self.codes: dict[tuple[str, str, int], int] = {}
        self.durations: dict[tuple[str, str], _Buckets] = {}
        self.first_bytes: dict[tuple[str, str], _Buckets] = {}
        # requests queued for a replica, by model: class -> count over every worker
        self.queues: dict[str, Callable[[], dict[str, int]]] = {}
        self.wait_times: dict[str, _Buckets] = {}  # time spent there, by model
        # Per API key name (never the secret): [admitted requests, tokens charged] (a list the
        # request path adds to in place: ``key_counts``), and refusals.
        self.key_counts_by_name: dict[str, list[int]] = {}
        self.key_rejections: dict[tuple[str, str], int] = {}
        r.register(_RequestCollector(self))

    def watch_rings(self, groups: Callable[[], dict[str, EndpointGroup]]) -> None:
        self.registry.register(_RingCollector(groups))

    def watch_engines(self, groups: Callable[[], dict[str, EndpointGroup]],
                      scraper: EngineScraper) -> None:
        self.registry.register(_EngineCollector(groups, scraper))

    def watch_kv_events(self, groups: Callable[[], dict[str, EndpointGroup]], index: KVIndex) -> None:
        """Export each followed replica's KV-event mirror: whether the CacheAware router is
        really fed by the engine, which nothing else outside the process shows."""
        self.registry.register(_KVEventsCollector(groups, index))

    def watch_keys(self) -> None:
        """Export the per-key series (only with API keys on)."""
        self.registry.register(_KeyCollector(self))

    def watch_health(self, groups: Callable[[], dict[str, EndpointGroup]]) -> None:
        """Export each endpoint's active health (only when health checks are on: without
        them a 1 would claim a check that never ran)."""
        self.registry.register(_HealthCollector(groups))

    def share_active(self, loads: LoadTable) -> None:
        """Count active requests in ``loads``, across the processes sharing it. Call before
        the first request."""
        self._loads = loads

    def active_gauge(self, model: str) -> LocalCount | SharedCount:
        count = self.active.get(model)
        if count is None:
            if self._loads is None:
                count = LocalCount()
            else:
                from lb.ring import SharedCount  # lazily: lb.ring logs which ring is in use

                count = SharedCount(self._loads, "\x00active", model)
            self.active[model] = count
        return count

    def finished(self, model: str, kind: str, code: int, seconds: float) -> None:
        key = (model, kind, code)
        self.codes[key] = self.codes.get(key, 0) + 1
        _buckets(self.durations, (model, kind)).observe(seconds)

    def first_byte_after(self, model: str, kind: str, seconds: float) -> None:
        _buckets(self.first_bytes, (model, kind)).observe(seconds)

    def retried(self, model: str, reason: str) -> None:
        self.retries.labels(model, reason).inc()

    def watch_queue(self, model: str, counts: Callable[[], dict[str, int]]) -> None:
        """Report ``model``'s queue: ``counts`` gives its requests per priority class."""
        self.queues[model] = counts

    def waited(self, model: str, seconds: float) -> None:
        buckets = self.wait_times.get(model)
        if buckets is None:
            buckets = self.wait_times[model] = _Buckets()
        buckets.observe(seconds)

    def split(self, name: str, target: str) -> None:
        self.splits.labels(name, target).inc()

    def queue_rejected(self, model: str, priority: str, reason: str) -> None:
        self.rejected.labels(model, priority, reason).inc()

    def key_counts(self, key: str) -> list[int]:
        """The key's ``[admitted requests, tokens charged]``, which the caller adds to in place
        (``lb.admission`` keeps it with the key: no call and no lookup per request)."""
        counts = self.key_counts_by_name.get(key)
        if counts is None:
            counts = self.key_counts_by_name[key] = [0, 0]
        return counts

    def key_rejected(self, key: str, reason: str) -> None:
        self.key_rejections[key, reason] = self.key_rejections.get((key, reason), 0) + 1


def _buckets(table: dict[tuple[str, str], _Buckets], key: tuple[str, str]) -> _Buckets:
    buckets = table.get(key)
    if buckets is None:
        buckets = table[key] = _Buckets()
    return buckets


class _RequestCollector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily("kubeai_inference_requests_active",
                                   "Requests in flight through this gateway, by base model.",
                                   labels=["request_model", "request_type"])
        for model, count in self._m.active.items():
            active.add_metric([model, "http"], count.value)
        requests = CounterMetricFamily("kvgate_requests", "Finished requests.",
                                       labels=["model", "kind", "code"])
        for (model, kind, code), n in self._m.codes.items():
            requests.add_metric([model, kind, str(code)], n)
        yield active
        yield requests
        yield _histogram("kvgate_request_duration_seconds",
                         "Time from request to the last byte of the response.",
                         self._m.durations.items())
        yield _histogram("kvgate_time_to_first_byte_seconds",
                         "Time from request to the first response byte from upstream.",
                         self._m.first_bytes.items())
        waiting = GaugeMetricFamily("kvgate_waiting_requests", "Requests queued for a replica (none ready "
                                    "yet, or all at capacity), over every worker.", labels=["model"])
        by_class = GaugeMetricFamily("kvgate_queued_requests", "Requests queued for a replica, by priority "
                                     "class, over every worker.", labels=["model", "priority"])
        for model, counts in list(self._m.queues.items()):
            per_class = counts()
            waiting.add_metric([model], sum(per_class.values()))
            for priority, n in per_class.items():
                by_class.add_metric([model, priority], n)
        yield waiting
        yield by_class
        yield _histogram("kvgate_waiting_seconds", "Time spent queued for a replica.",
                         (((model,), buckets) for model, buckets in self._m.wait_times.items()),
                         labels=["model"])


def _histogram(name: str, doc: str, series: Iterable[tuple[tuple[str, ...], _Buckets]],
               labels: tuple[str, ...] | list[str] = ("model", "kind")) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for values, buckets in series:
        family.add_metric(list(values), buckets.cumulative(), buckets.total)
    return family


class _KeyCollector(Collector):
    """Requests, tokens and refusals by API key name (this worker's own, as the request
    counts are)."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("kvgate_key_requests", "Requests admitted under an API "
                                       "key.", labels=["key"])
        for key, (n, _) in self._m.key_counts_by_name.items():
            requests.add_metric([key], n)
        tokens = CounterMetricFamily("kvgate_key_tokens", "Tokens charged to an API key: the "
                                     "estimate at admission, corrected by the response's usage.",
                                     labels=["key"])
        for key, (_, n) in self._m.key_counts_by_name.items():
            tokens.add_metric([key], n)
        rejections = CounterMetricFamily(
            "kvgate_key_rejections", "Requests refused by reason: invalid_key (key \"unknown\"), "
            "expired, model_not_allowed, requests or tokens (a limit).", labels=["key", "reason"])
        for (key, reason), n in self._m.key_rejections.items():
            rejections.add_metric([key, reason], n)
        yield from (requests, tokens, rejections)


class _RingCollector(Collector):
    def __init__(self, groups: Callable[[], dict[str, EndpointGroup]]) -> None:
        self._groups = groups

    def collect(self) -> Iterator[Metric]:
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
        ejected = GaugeMetricFamily("kvgate_endpoint_ejected",
                                    "1 while an endpoint is ejected after failing in a row.",
                                    labels=["model", "endpoint"])
        ejections = CounterMetricFamily("kvgate_endpoint_ejections",
                                        "Endpoints ejected after failing in a row.",
                                        labels=["model"])
        for model, group in self._groups().items():
            ring = group.ring
            n_lookups, n_steps, n_fallbacks = ring.stats()
            lookups.add_metric([model], n_lookups)
            steps.add_metric([model], n_steps)
            fallbacks.add_metric([model], n_fallbacks)
            endpoints.add_metric([model], len(ring))
            out = group.outliers.current() if group.outliers is not None else {}
            for key in ring.keys():
                in_flight.add_metric([model, key], ring.load(key))
                ejected.add_metric([model, key], 1 if key in out else 0)
            ejections.add_metric([model], group.outliers.ejections_total if group.outliers else 0)
        yield from (lookups, steps, fallbacks, in_flight, endpoints, ejected, ejections)


class _EngineCollector(Collector):
    """The replicas' own load as last scraped (fresh readings only: a stale one is absent)."""

    def __init__(self, groups: Callable[[], dict[str, EndpointGroup]],
                 scraper: EngineScraper) -> None:
        self._groups = groups
        self._scraper = scraper

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "endpoint"]
        waiting = GaugeMetricFamily("kvgate_engine_requests_waiting",
                                    "Requests queued in the replica's scheduler (its /metrics).",
                                    labels=labels)
        running = GaugeMetricFamily("kvgate_engine_requests_running",
                                    "Requests running on the replica (its /metrics).",
                                    labels=labels)
        kv = GaugeMetricFamily("kvgate_engine_kv_cache_usage",
                               "Share of the replica's KV-cache blocks in use, 0..1.", labels=labels)
        hit_rate = GaugeMetricFamily("kvgate_engine_prefix_cache_hit_rate",
                                     "Prefix-cache hits per query since the scrape before.",
                                     labels=labels)
        failures = CounterMetricFamily("kvgate_engine_scrape_failures",
                                       "Replica /metrics scrapes that failed.", labels=["model"])
        for model, group in self._groups().items():
            for key, reading in self._scraper.fresh(group).items():
                waiting.add_metric([model, key], reading.waiting)
                running.add_metric([model, key], reading.running)
                kv.add_metric([model, key], reading.kv_usage)
                if reading.prefix_hit_rate is not None:
                    hit_rate.add_metric([model, key], reading.prefix_hit_rate)
        for model, n in self._scraper.failures.items():
            failures.add_metric([model], n)
        yield from (waiting, running, kv, hit_rate, failures)


class _HealthCollector(Collector):
    """Every endpoint of every model, 1 or 0 by its active health checks (``lb.health_checks``).
    Each worker process checks, and exports, on its own; all export the same series, from the
    same endpoints."""

    def __init__(self, groups: Callable[[], dict[str, EndpointGroup]]) -> None:
        self._groups = groups

    def collect(self) -> Iterator[Metric]:
        healthy = GaugeMetricFamily("kvgate_endpoint_healthy",
                                    "1 while an endpoint passes its active health checks, 0 once "
                                    "it has failed them (healthChecks).",
                                    labels=["model", "endpoint"])
        for model, group in self._groups().items():
            for key in group.endpoints:
                healthy.add_metric([model, key], 0 if key in group.unhealthy else 1)
        yield healthy


class _KVEventsCollector(Collector):
    """Per replica whose KV events are followed (``lb.kv_events``): blocks mirrored, whether the
    mirror is trusted, batches applied and undecodable. Read at scrape time from the index."""

    def __init__(self, groups: Callable[[], dict[str, EndpointGroup]], index: KVIndex) -> None:
        self._groups = groups
        self._index = index

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "endpoint"]
        blocks = GaugeMetricFamily("kvgate_kv_events_blocks",
                                   "KV-cache blocks the replica's events say it holds.", labels=labels)
        trusted = GaugeMetricFamily("kvgate_kv_events_trusted",
                                    "1 while the mirror has every batch since the engine started.",
                                    labels=labels)
        batches = CounterMetricFamily("kvgate_kv_events_batches", "KV-event batches applied.",
                                      labels=labels)
        errors = CounterMetricFamily("kvgate_kv_events_decode_errors",
                                     "KV-event batches that could not be decoded.", labels=labels)
        for model, group in self._groups().items():
            for key in group.endpoints:
                replica = self._index.get(key)
                if replica is None:
                    continue
                blocks.add_metric([model, key], len(replica.blocks))
                trusted.add_metric([model, key], 1 if replica.trusted else 0)
                batches.add_metric([model, key], replica.batches)
                errors.add_metric([model, key], replica.decode_errors)
        yield from (blocks, trusted, batches, errors)
