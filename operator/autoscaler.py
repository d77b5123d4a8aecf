"""Load-based autoscaling: the gateways' metrics -> each Model's replicas.

Runs on the leader only (the runtime starts `Autoscaler.run` when it wins the election and
cancels it when it loses). Every `interval`:

1. scrape every gateway replica's /metrics concurrently and sum
   `kubeai_inference_requests_active` per model, counting `model_adapter` traffic toward `model`
   (KubeAI forgets it); a replica that does not answer is logged and counted in
   `kvgate_autoscaler_scrape_errors_total` while the others still count; if none answers, the
   tick records nothing rather than reading silence as zero load;
2. read the model servers' own load from the same pages: every gateway scrapes every ready
   replica and re-exports it as `kvgate_engine_*{model,endpoint}` (fresh readings only), so the
   autoscaler opens no connection to a replica. Every gateway sees the same replicas, so a
   replica's value is the maximum over gateways, never their sum (that would count it once per
   gateway). `includeEngineWaiting` adds the requests queued inside the replicas to the request
   signal; `targetKVCacheUsage` adds a second one, the KV-cache usage summed over the replicas
   that report it (= replicas with readings x their mean usage: how many replicas' worth of KV
   cache is in use);
3. per model, append both to a moving window of `timeWindow / interval` readings;
   desired = max(ceil(average requests / targetRequests), ceil(average KV sum / targetKVCacheUsage))
   clamped to [minReplicas, maxReplicas]; scale up at once, scale down only after
   `scaleDownDelaySeconds` of consecutive lower readings; `autoscalingDisabled` models are left
   alone;
4. write changed replica counts through `set_replicas(model, n)` and persist the windows through
   a `StateStore`, so a restarted or newly elected autoscaler continues where the last one was.

Why the KV signal is averaged as a sum over replicas and not as the mean usage: the sum is a
load, like the active requests, and does not move when replicas are added (the same sequences
spread over more caches), so the replicas it asks for stay asked for; the mean halves as soon as
a second replica joins and would undo its own scale-up. A replica without a fresh reading adds
nothing (the gateways drop stale readings, so a replica that stops answering leaves the signal
instead of freezing it); a tick where no replica of a model has one records 0, which lets a
model whose replicas are gone scale down. Both windows keep raw values, not replica counts, so a
changed target applies to the whole window at once.

Everything outside is a callable or a small protocol, so both runtimes wire it the same way:
`lb_operator.kube.autoscaling` holds the Kubernetes pieces (the scale subresource, the state
ConfigMap), `lb_operator.state_files` the local state file.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Protocol

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from lb.model import Model, split_model_adapter

from lb_operator.system_config import ModelAutoscaling

log = logging.getLogger("lb_operator.autoscaler")

ACTIVE_METRIC = "kubeai_inference_requests_active"
ENGINE_WAITING_METRIC = "kvgate_engine_requests_waiting"
ENGINE_KV_METRIC = "kvgate_engine_kv_cache_usage"
STATE_VERSION = 1

SetReplicas = Callable[[str, int], Awaitable[None]]
# A metrics source: `host:port` or a URL to scrape, or a callable returning the exposition text of
# a gateway in this very process (`kvgate up` with its metrics port disabled).
Target = str | Callable[[], str | bytes]
IN_PROCESS = "in-process"
Replica = tuple[str, str]  # (model, endpoint) as the gateways label a replica's readings


async def _resolve(source: Callable[[], Any]) -> Any:
    """Call a source that may be plain (a watch cache) or async (an API list)."""
    value = source()
    return await value if inspect.isawaitable(value) else value


# ---------------------------------------------------------------------------------------------
# Parsing the exposition text


@dataclass(slots=True)
class GatewayPage:
    """What the autoscaler reads of one gateway's /metrics."""

    active: dict[str, float] = field(default_factory=dict)  # base model -> active requests
    waiting: dict[Replica, float] = field(default_factory=dict)  # queued inside the replica
    kv: dict[Replica, float] = field(default_factory=dict)  # the replica's KV-cache usage, 0..1


def parse_page(text: str) -> GatewayPage:
    """Parse one gateway's page (ValueError if it is not an exposition). Adapter traffic counts
    toward its base model; a non-finite engine value is dropped, a KV usage kept within 0..1."""
    page = GatewayPage()
    for family in text_string_to_metric_families(text):
        if family.name == ACTIVE_METRIC:
            for sample in family.samples:
                model, _ = split_model_adapter(sample.labels.get("request_model", ""))
                if model:
                    page.active[model] = page.active.get(model, 0.0) + sample.value
        elif family.name == ENGINE_WAITING_METRIC:
            _engine_samples(family.samples, page.waiting, math.inf)
        elif family.name == ENGINE_KV_METRIC:
            _engine_samples(family.samples, page.kv, 1.0)
    return page


def _engine_samples(samples: Iterable[Any], into: dict[Replica, float], ceiling: float) -> None:
    """Readings keyed by replica; one without both labels cannot be merged across gateways."""
    for sample in samples:
        key = (sample.labels.get("model", ""), sample.labels.get("endpoint", ""))
        if all(key) and math.isfinite(sample.value):
            into[key] = min(ceiling, max(0.0, sample.value))


@dataclass(slots=True)
class EngineLoad:
    """One model's replicas as the gateways report them."""

    waiting: float = 0.0  # requests queued inside its replicas
    kv_sum: float = 0.0  # KV-cache usage summed over the replicas with a reading
    kv_replicas: int = 0  # replicas with a KV reading

    @property
    def kv_mean(self) -> float:
        return self.kv_sum / self.kv_replicas if self.kv_replicas else 0.0


def _max_per_replica(readings: Iterable[dict[Replica, float]]) -> dict[Replica, float]:
    """Every gateway reads the same replicas: one value per replica, the highest seen (a
    gateway whose reading went stale leaves it out, the others still count)."""
    merged: dict[Replica, float] = {}
    for page in readings:
        for key, value in page.items():
            merged[key] = max(value, merged.get(key, value))
    return merged


def engine_loads(pages: Iterable[GatewayPage]) -> dict[str, EngineLoad]:
    """Per model: waiting summed over its replicas, KV usage summed and counted over them."""
    pages = list(pages)
    loads: dict[str, EngineLoad] = {}
    for (model, _), value in _max_per_replica(p.waiting for p in pages).items():
        loads.setdefault(model, EngineLoad()).waiting += value
    for (model, _), value in _max_per_replica(p.kv for p in pages).items():
        load = loads.setdefault(model, EngineLoad())
        load.kv_sum += value
        load.kv_replicas += 1
    return loads


def replicas_for(load: float, target: float) -> int:
    """ceil(load / target), blind to float noise (3 x 0.7 / 0.7 is 3, not 4)."""
    return math.ceil(round(load / target, 9))


def _text(page: str | bytes) -> str:
    return page.decode() if isinstance(page, bytes) else page


# ---------------------------------------------------------------------------------------------
# State


@dataclass(slots=True)
class ModelWindow:
    """One model's moving windows and its run of consecutive lower readings: `readings` are the
    request signal, `kv` the KV usage summed over its replicas (kept only with a KV target)."""

    readings: deque[float]
    kv: deque[float]
    lower: int = 0

    @classmethod
    def empty(cls, size: int) -> "ModelWindow":
        return cls(deque(maxlen=size), deque(maxlen=size))

    def average(self) -> float:
        return _mean(self.readings)

    def kv_average(self) -> float:
        return _mean(self.kv)


def _mean(values: deque[float]) -> float:
    return sum(values) / len(values) if values else 0.0


class StateStore(Protocol):
    async def load(self) -> dict[str, Any] | None:
        """The last saved state, or None when there is none (first start)."""
        ...

    async def save(self, state: dict[str, Any]) -> None:
        ...


# ---------------------------------------------------------------------------------------------
# The autoscaler


@dataclass(slots=True)
class TickReport:
    """What one tick saw and did; also what tests and status pages read."""

    totals: dict[str, float] = field(default_factory=dict)  # request signal per model this tick
    kv: dict[str, float] = field(default_factory=dict)  # KV usage summed over a model's replicas
    failed: dict[str, str] = field(default_factory=dict)  # scrape target -> error
    scaled: dict[str, int] = field(default_factory=dict)  # model -> replicas written
    write_errors: dict[str, str] = field(default_factory=dict)
    skipped: bool = False  # no gateway answered: nothing recorded


class Autoscaler:
    """See the module docstring. Arguments:

    - `models()`: the Models to scale (plain or async callable);
    - `gateways()`: gateway metrics addresses, `host:port` (then `/metrics`) or full URLs, or
      in-process sources (see `Target`);
    - `set_replicas(name, n)`: the runtime's write (cluster: the scale subresource).
    """

    def __init__(self, config: ModelAutoscaling, *, models: Callable[[], Any], gateways: Callable[[], Any],
                 set_replicas: SetReplicas, store: StateStore, session: aiohttp.ClientSession,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.models, self.gateways = models, gateways
        self.set_replicas, self.store, self.session = set_replicas, store, session
        self.interval = config.interval_seconds
        self.window_size = max(1, round(config.time_window_seconds / self.interval))
        self.windows: dict[str, ModelWindow] = {}
        self.last_report = TickReport()
        self._saved: dict[str, Any] | None = None
        self._timeout = aiohttp.ClientTimeout(total=max(0.05, min(self.interval, 5.0)))
        self.registry = registry or CollectorRegistry()
        self.scrape_errors = Counter("kvgate_autoscaler_scrape_errors", "Scrapes that failed, by target.",
                                     ["target"], registry=self.registry)
        self.signal = Gauge("kvgate_autoscaler_average_requests", "Moving average the replicas follow.",
                            ["model"], registry=self.registry)
        self.kv_signal = Gauge("kvgate_autoscaler_average_kv_cache_usage",
                               "Moving average of the KV-cache usage summed over a model's replicas "
                               "(with targetKVCacheUsage).", ["model"], registry=self.registry)

    async def run(self) -> None:
        """Restore the saved state, then tick every interval until cancelled (leadership lost)."""
        await self.restore()
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.tick()
            except Exception:  # a bug or an API outage must not end autoscaling for good
                log.exception("autoscaler tick failed")
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    async def restore(self) -> None:
        try:
            state = await self.store.load()
        except Exception as exc:
            log.warning("autoscaler state not restored, starting empty: %s", exc)
            return
        if not state or state.get("version") != STATE_VERSION:
            return
        for name, saved in (state.get("models") or {}).items():
            window = self.windows[name] = ModelWindow.empty(self.window_size)
            window.readings.extend(float(r) for r in saved.get("readings") or ())
            window.kv.extend(float(r) for r in saved.get("kv") or ())  # absent before KV targets
            window.lower = int(saved.get("lower", 0))
        self._saved = self.state()

    def state(self) -> dict[str, Any]:
        models = {}
        for name, window in sorted(self.windows.items()):
            saved: dict[str, Any] = {"readings": list(window.readings), "lower": window.lower}
            if window.kv:
                saved["kv"] = list(window.kv)
            models[name] = saved
        return {"version": STATE_VERSION, "models": models}

    async def tick(self) -> TickReport:
        models = [m for m in await _resolve(self.models)]
        report = TickReport()
        pages = await self._pages(report)
        if not pages:
            report.skipped = True
            log.warning("autoscaler: no gateway replica answered; skipping this tick")
            self.last_report = report
            return report
        engines = engine_loads(pages)
        totals = self._request_signal(pages, engines)
        names = {m.name for m in models}
        for name in [n for n in self.windows if n not in names]:
            del self.windows[name]
        for model in models:
            kv = engines[model.name].kv_sum if model.name in engines else 0.0
            await self._scale(model, totals.get(model.name, 0.0), kv, report)
        report.totals = {m.name: totals.get(m.name, 0.0) for m in models}
        report.kv = {m.name: engines[m.name].kv_sum for m in models if m.name in engines}
        await self._save()
        self.last_report = report
        return report

    # -- signal --------------------------------------------------------------------------------

    async def _pages(self, report: TickReport) -> list[GatewayPage]:
        """The pages of the gateway replicas that answered."""
        targets = list(await _resolve(self.gateways))
        pages = await asyncio.gather(*(self._scrape(t, report) for t in targets))
        return [page for page in pages if page is not None]

    def _request_signal(self, pages: list[GatewayPage], engines: dict[str, EngineLoad]) -> dict[str, float]:
        """Active requests summed over the gateways (each request passes through one), plus the
        requests queued inside the replicas with `includeEngineWaiting`."""
        totals: dict[str, float] = {}
        for page in pages:
            for model, value in page.active.items():
                totals[model] = totals.get(model, 0.0) + value
        if self.config.include_engine_waiting:
            for model, load in engines.items():
                totals[model] = totals.get(model, 0.0) + load.waiting
        return totals

    async def _scrape(self, target: Target, report: TickReport) -> GatewayPage | None:
        name = target if isinstance(target, str) else IN_PROCESS
        try:
            text = await self._fetch(target) if isinstance(target, str) else _text(target())
            return parse_page(text)  # a page that does not parse counts as a failed scrape
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            report.failed[name] = repr(exc)
            self.scrape_errors.labels(name).inc()
            log.warning("autoscaler: scraping %s failed: %r", name, exc)
            return None

    async def _fetch(self, target: str) -> str:
        url = target if "://" in target else f"http://{target}/metrics"
        async with self.session.get(url, timeout=self._timeout) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(response.request_info, (), status=response.status,
                                                  message=response.reason or "")
            return await response.text()

    # -- decision ------------------------------------------------------------------------------

    async def _scale(self, model: Model, reading: float, kv: float, report: TickReport) -> None:
        spec = model.spec
        if spec.autoscaling_disabled:
            return
        window = self.windows.get(model.name)
        if window is None:
            window = self.windows[model.name] = ModelWindow.empty(self.window_size)
        desired = spec.clamp_replicas(self._desired(model, window, reading, kv))
        current = spec.min_replicas if spec.replicas is None else spec.replicas
        if desired < current:
            window.lower += 1
            if window.lower * self.interval < spec.scale_down_delay_seconds:
                return
        window.lower = 0
        if desired != current:
            await self._write(model.name, desired, report)

    def _desired(self, model: Model, window: ModelWindow, reading: float, kv: float) -> int:
        """Record this tick's readings; the replicas the averages ask for, before clamping."""
        window.readings.append(reading)
        average = window.average()
        self.signal.labels(model.name).set(average)
        desired = replicas_for(average, model.spec.target_requests)
        target_kv = self.config.target_kv_cache_usage
        if target_kv > 0:
            window.kv.append(kv)
            kv_average = window.kv_average()
            self.kv_signal.labels(model.name).set(kv_average)
            desired = max(desired, replicas_for(kv_average, target_kv))
        return desired

    async def _write(self, name: str, replicas: int, report: TickReport) -> None:
        try:
            await self.set_replicas(name, replicas)
        except Exception as exc:  # the next tick tries again
            report.write_errors[name] = repr(exc)
            log.warning("autoscaler: setting %s to %d replicas failed: %r", name, replicas, exc)
            return
        report.scaled[name] = replicas
        log.info("autoscaler: %s -> %d replicas", name, replicas)

    async def _save(self) -> None:
        state = self.state()
        if state == self._saved:
            return
        try:
            await self.store.save(state)
        except Exception as exc:
            log.warning("autoscaler: saving state failed: %r", exc)
            return
        self._saved = state
