"""What the model servers say about their own load: vLLM's /metrics, read off the request path.

The gateway's own in-flight counts miss what it did not send (other gateway replicas, clients
that call a replica directly) and say nothing of how far behind a replica is. vLLM publishes
that: requests running and waiting in its scheduler, the share of KV-cache blocks in use, and
prefix-cache hits. A scraper task polls every ready replica's ``/metrics`` at a fixed interval
(all replicas at once, each with a timeout) and keeps the last reading per replica, stamped
with the time it was read; a reading older than ``stale_after_seconds`` counts as unknown, so
a replica that stops answering drops out of the signal instead of freezing it.

Parsing is prometheus-client's, over the few families wanted: the lines are filtered first,
since a vLLM page is mostly histograms nobody here reads. ``LeastQueue`` picks on these
readings (see ``lb.balancer``); the gateway re-exports them as ``kvgate_engine_*`` gauges,
which is also how the autoscaler gets them, with no extra connection to any replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from lb.registry import EndpointGroup, EngineReading, Registry
from lb.schema import setting

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # new name, then old
PREFIX_HITS = "vllm:prefix_cache_hits"
PREFIX_QUERIES = "vllm:prefix_cache_queries"
_WANTED = (WAITING, RUNNING, *KV_USAGE, PREFIX_HITS, PREFIX_QUERIES)
_WANTED_LINES = tuple(f"{p}{name}" for name in _WANTED for p in ("", "# TYPE ", "# HELP "))


@dataclass(frozen=True, slots=True)
class EngineMetricsConfig:
    interval_seconds: float = setting(2.0, doc="How often every ready replica's metrics are read; 0 turns "
                                      "scraping off.", minimum=0)
    timeout_seconds: float = setting(1.0, doc="Timeout of one scrape.", exclusive_minimum=0)
    stale_after_seconds: float = setting(10.0, doc="Age after which a replica's last reading is ignored.",
                                         exclusive_minimum=0)
    path: str = setting("/metrics", doc="Path of the replicas' Prometheus metrics.", pattern="^/.*$")


def parse_reading(text: str, read_at: float, before: EngineReading | None) -> EngineReading:
    """A reading from a /metrics page; samples are summed over label sets (vLLM labels them
    by model name and engine index). Raises ValueError when the page has no vLLM gauges."""
    lines = "\n".join(line for line in text.splitlines() if line.startswith(_WANTED_LINES))
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(lines + "\n"):
        for sample in family.samples:
            if sample.name in _WANTED or sample.name.removesuffix("_total") in _WANTED:
                name = sample.name.removesuffix("_total")
                values[name] = values.get(name, 0.0) + sample.value
    if WAITING not in values and RUNNING not in values:
        raise ValueError("no vLLM scheduler gauges on the page")
    kv = next((values[name] for name in KV_USAGE if name in values), 0.0)
    hits, queries = values.get(PREFIX_HITS, 0.0), values.get(PREFIX_QUERIES, 0.0)
    rate = None
    if before is not None and queries > before.prefix_queries:
        rate = (hits - before.prefix_hits) / (queries - before.prefix_queries)
    return EngineReading(values.get(WAITING, 0.0), values.get(RUNNING, 0.0), kv, hits, queries,
                         rate, read_at)


class EngineScraper:
    """Polls every endpoint of every model in the registry; readings live on each group
    (``group.engine``), pruned when endpoints leave."""

    def __init__(self, registry: Registry, config: EngineMetricsConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._config = config
        self._clock = clock
        self.failures: dict[str, int] = {}  # model -> failed scrapes (a gateway metric)

    async def run(self) -> None:
        """Scrape forever (until cancelled), one round per interval."""
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                started = self._clock()
                await self.scrape_once(session)
                await asyncio.sleep(max(0.0, self._config.interval_seconds
                                        - (self._clock() - started)))

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        jobs = [self._scrape(session, model, group, key, endpoint.address)
                for model, group in self._registry.groups().items()
                for key, endpoint in list(group.endpoints.items())]
        await asyncio.gather(*jobs)
        for group in self._registry.groups().values():
            group.prune_readings()

    async def _scrape(self, session: aiohttp.ClientSession, model: str, group: EndpointGroup,
                      key: str, address: str) -> None:
        try:
            async with session.get(f"http://{address}{self._config.path}") as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                text = await response.text()
            reading = parse_reading(text, self._clock(), group.engine.get(key))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, UnicodeDecodeError) as exc:
            self.failures[model] = self.failures.get(model, 0) + 1
            log.debug("engine metrics of %s (%s) unreadable: %s", key, address, exc)
            return
        if key in group.endpoints:  # it may have left while we read
            group.set_reading(key, reading)

    def fresh(self, group: EndpointGroup) -> dict[str, EngineReading]:
        return fresh_readings(group, self._config.stale_after_seconds, self._clock())


def fresh_readings(group: EndpointGroup, stale_after: float, now: float) -> dict[str, EngineReading]:
    """The group's readings young enough to trust."""
    return {k: r for k, r in group.engine.items() if now - r.read_at <= stale_after}
