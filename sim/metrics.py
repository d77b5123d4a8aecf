"""vLLM's Prometheus metrics for one simulated replica, read from the engine at scrape time.

Names, label names and bucket bounds follow vLLM v1 (`vllm/v1/metrics/loggers.py`), so anything
that scrapes a real vLLM (an autoscaler, a load-aware router, a dashboard) reads the simulator
unchanged. Every family carries `model_name` and `engine` labels, except `vllm:lora_requests_info`
which, as in vLLM, carries only `max_lora`, `waiting_lora_adapters` and `running_lora_adapters` and
whose value is the time of the observation. vLLM keeps every label combination it ever reported
(consumers take the series with the newest timestamp); computed at scrape time, the simulator
reports only the current one, which such consumers read the same way.

Each replica gets its own `CollectorRegistry`, so several replicas share a process without mixing.
"""

from __future__ import annotations

import time
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

from .engine import Engine
from .stats import BucketHistogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector:
    """A prometheus-client collector that renders an `Engine`'s state on each scrape."""

    def __init__(self, engine: Engine, model_name: str, enable_lora: bool = True) -> None:
        self.engine = engine
        self.model_name = model_name
        self.enable_lora = enable_lora
        self.labels = ["model_name", "engine"]
        self.values = [model_name, "0"]

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=self.labels)
        g.add_metric(self.values, value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=self.labels)
        c.add_metric(self.values, value)
        return c

    def _histogram(self, name: str, doc: str, h: BucketHistogram) -> HistogramMetricFamily:
        f = HistogramMetricFamily(name, doc, labels=self.labels)
        f.add_metric(self.values, buckets=h.cumulative(), sum_value=h.sum)
        return f

    def collect(self) -> Iterator[Metric]:
        eng, st, kv = self.engine, self.engine.stats, self.engine.kv
        yield self._gauge("vllm:num_requests_running",
                          "Number of requests in model execution batches.", len(eng.running))
        yield self._gauge("vllm:num_requests_waiting",
                          "Number of requests waiting to be processed.", len(eng.waiting))
        usage = kv.usage()
        yield self._gauge("vllm:kv_cache_usage_perc",
                          "KV-cache usage. 1 means 100 percent usage.", usage)
        yield self._gauge("vllm:gpu_cache_usage_perc",
                          "GPU KV-cache usage. 1 means 100 percent usage. "
                          "DEPRECATED: Use vllm:kv_cache_usage_perc instead.", usage)
        yield self._counter("vllm:prefix_cache_queries",
                            "Prefix cache queries, in terms of number of queried tokens.",
                            kv.queries)
        yield self._counter("vllm:prefix_cache_hits",
                            "Prefix cache hits, in terms of number of cached tokens.", kv.hits)
        yield self._counter("vllm:num_preemptions",
                            "Cumulative number of preemption from the engine.", st.preemptions)
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                            st.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            st.generation_tokens)
        yield self._request_success()
        yield from self._histograms()
        yield self._cache_config()
        if self.enable_lora:
            yield self._lora_info()

    def _request_success(self) -> CounterMetricFamily:
        c = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                labels=self.labels + ["finished_reason"])
        for reason, n in self.engine.stats.requests_finished.items():
            c.add_metric(self.values + [reason], n)
        return c

    def _histograms(self) -> Iterator[Metric]:
        st = self.engine.stats
        yield self._histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", st.ttft)
        yield self._histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", st.tpot)
        yield self._histogram("vllm:inter_token_latency_seconds",
                              "Histogram of inter-token latency in seconds.", st.tpot)
        yield self._histogram("vllm:e2e_request_latency_seconds",
                              "Histogram of e2e request latency in seconds.", st.e2e)
        yield self._histogram("vllm:request_queue_time_seconds",
                              "Histogram of time spent in WAITING phase for request.",
                              st.queue_time)
        yield self._histogram("vllm:request_prompt_tokens",
                              "Number of prefill tokens processed.", st.req_prompt_tokens)
        yield self._histogram("vllm:request_generation_tokens",
                              "Number of generation tokens processed.", st.req_generation_tokens)

    def _cache_config(self) -> GaugeMetricFamily:
        p = self.engine.profile
        labels = {"block_size": str(p.block_size), "num_gpu_blocks": str(p.num_kv_blocks),
                  "enable_prefix_caching": str(p.enable_prefix_caching), "engine": "0"}
        g = GaugeMetricFamily("vllm:cache_config_info",
                              "Information of the LLMEngine CacheConfig", labels=list(labels))
        g.add_metric(list(labels.values()), 1.0)
        return g

    def _lora_info(self) -> GaugeMetricFamily:
        g = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                              labels=["max_lora", "waiting_lora_adapters",
                                      "running_lora_adapters"])
        g.add_metric([str(self.engine.profile.max_loras),
                      ",".join(self.engine.waiting_adapters()),
                      ",".join(self.engine.running_adapters())], time.time())
        return g


def make_registry(engine: Engine, model_name: str, enable_lora: bool = True) -> CollectorRegistry:
    """A fresh registry holding only this replica's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name, enable_lora))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text exposition of a registry."""
    return generate_latest(registry)


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Samples of a Prometheus text exposition by sample name, e.g.
    `parse_metrics(t)["vllm:prefix_cache_hits_total"] == [({"model_name": ..}, 42.0)]`."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def sample_value(samples: dict[str, list[tuple[dict, float]]], name: str,
                 **labels: str) -> float:
    """The value of the one sample of `name` whose labels include `labels` (KeyError if none)."""
    for sample_labels, value in samples.get(name, []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    raise KeyError(f"no sample {name} with labels {labels}")
