"""Request-based autoscaling: active requests over all gateway replicas -> each Model's replicas.

Runs on the leader only (the runtime starts `Autoscaler.run` when it wins the election and
cancels it when it loses). Every `interval`:

1. scrape every gateway replica's /metrics concurrently and sum
   `kubeai_inference_requests_active` per model, counting `model_adapter` traffic toward `model`
   (KubeAI forgets it); a replica that does not answer is logged and counted in
   `kvgate_autoscaler_scrape_errors_total` while the others still count; if none answers, the
   tick records nothing rather than reading silence as zero load;
2. optionally add the model servers' own queues (`vllm:num_requests_waiting`);
3. per model, append the sum to a moving window of `timeWindow / interval` readings;
   desired = ceil(average / targetRequests) clamped to [minReplicas, maxReplicas];
   scale up at once, scale down only after `scaleDownDelaySeconds` of consecutive lower readings;
   `autoscalingDisabled` models are left alone;
4. write changed replica counts through `set_replicas(model, n)` and persist the windows through
   a `StateStore`, so a restarted or newly elected autoscaler continues where the last one was.

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
from typing import Any, Awaitable, Callable, Iterable, Protocol, Sequence

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from lb.model import Model, split_model_adapter

from lb_operator.system_config import ModelAutoscaling

log = logging.getLogger("lb_operator.autoscaler")

ACTIVE_METRIC = "kubeai_inference_requests_active"
WAITING_METRIC = "vllm:num_requests_waiting"
STATE_VERSION = 1

SetReplicas = Callable[[str, int], Awaitable[None]]
# A metrics source: `host:port` or a URL to scrape, or a callable returning the exposition text of
# a gateway in this very process (`kvgate up` with its metrics port disabled).
Target = str | Callable[[], str | bytes]
IN_PROCESS = "in-process"


async def _resolve(source: Callable[[], Any]) -> Any:
    """Call a source that may be plain (a watch cache) or async (an API list)."""
    value = source()
    return await value if inspect.isawaitable(value) else value


# ---------------------------------------------------------------------------------------------
# Parsing the exposition text


def active_requests(text: str) -> dict[str, float]:
    """Active requests per base model in one gateway's /metrics (adapter traffic folded in)."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != ACTIVE_METRIC:
            continue
        for sample in family.samples:
            model, _ = split_model_adapter(sample.labels.get("request_model", ""))
            if model:
                totals[model] = totals.get(model, 0.0) + sample.value
    return totals


def waiting_requests(text: str) -> float:
    """Requests queued inside one model server (vLLM's gauge, also exported by the simulator)."""
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == WAITING_METRIC for sample in family.samples)


def _text(page: str | bytes) -> str:
    return page.decode() if isinstance(page, bytes) else page


# ---------------------------------------------------------------------------------------------
# State


@dataclass(slots=True)
class ModelWindow:
    """One model's moving window of readings and its run of consecutive lower readings."""

    readings: deque[float]
    lower: int = 0

    def average(self) -> float:
        return sum(self.readings) / len(self.readings) if self.readings else 0.0


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

    totals: dict[str, float] = field(default_factory=dict)  # signal per model this tick
    failed: dict[str, str] = field(default_factory=dict)  # scrape target -> error
    scaled: dict[str, int] = field(default_factory=dict)  # model -> replicas written
    write_errors: dict[str, str] = field(default_factory=dict)
    skipped: bool = False  # no gateway answered: nothing recorded


class Autoscaler:
    """See the module docstring. Arguments:

    - `models()`: the Models to scale (plain or async callable);
    - `gateways()`: gateway metrics addresses, `host:port` (then `/metrics`) or full URLs, or
      in-process sources (see `Target`);
    - `set_replicas(name, n)`: the runtime's write (cluster: the scale subresource);
    - `engine_replicas(name)`: a model's server addresses, for `includeEngineWaiting`.
    """

    def __init__(self, config: ModelAutoscaling, *, models: Callable[[], Any], gateways: Callable[[], Any],
                 set_replicas: SetReplicas, store: StateStore, session: aiohttp.ClientSession,
                 engine_replicas: Callable[[str], Sequence[str]] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.models, self.gateways = models, gateways
        self.set_replicas, self.store, self.session = set_replicas, store, session
        self.engine_replicas = engine_replicas
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
            readings = [float(r) for r in saved.get("readings") or ()]
            self.windows[name] = ModelWindow(deque(readings, maxlen=self.window_size), int(saved.get("lower", 0)))
        self._saved = self.state()

    def state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "models": {
            name: {"readings": list(w.readings), "lower": w.lower} for name, w in sorted(self.windows.items())}}

    async def tick(self) -> TickReport:
        models = [m for m in await _resolve(self.models)]
        report = TickReport()
        totals, answered = await self._gateway_totals(report)
        if not answered:
            report.skipped = True
            log.warning("autoscaler: no gateway replica answered; skipping this tick")
            self.last_report = report
            return report
        if self.config.include_engine_waiting and self.engine_replicas is not None:
            await self._add_engine_waiting(models, totals, report)
        names = {m.name for m in models}
        for name in [n for n in self.windows if n not in names]:
            del self.windows[name]
        for model in models:
            await self._scale(model, totals.get(model.name, 0.0), report)
        report.totals = {m.name: totals.get(m.name, 0.0) for m in models}
        await self._save()
        self.last_report = report
        return report

    # -- signal --------------------------------------------------------------------------------

    async def _gateway_totals(self, report: TickReport) -> tuple[dict[str, float], int]:
        targets = list(await _resolve(self.gateways))
        texts = await asyncio.gather(*(self._scrape(t, report) for t in targets))
        totals: dict[str, float] = {}
        for text in texts:
            for model, value in active_requests(text or "").items():
                totals[model] = totals.get(model, 0.0) + value
        return totals, sum(text is not None for text in texts)

    async def _add_engine_waiting(self, models: Iterable[Model], totals: dict[str, float],
                                  report: TickReport) -> None:
        for model in models:
            targets = list(self.engine_replicas(model.name) or ())  # type: ignore[misc]
            texts = await asyncio.gather(*(self._scrape(t, report) for t in targets))
            waiting = sum(waiting_requests(text) for text in texts if text is not None)
            if waiting:
                totals[model.name] = totals.get(model.name, 0.0) + waiting

    async def _scrape(self, target: Target, report: TickReport) -> str | None:
        name = target if isinstance(target, str) else IN_PROCESS
        try:
            text = await self._fetch(target) if isinstance(target, str) else _text(target())
            active_requests(text)  # a page that does not parse counts as a failed scrape
            return text
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

    async def _scale(self, model: Model, reading: float, report: TickReport) -> None:
        spec = model.spec
        if spec.autoscaling_disabled:
            return
        window = self.windows.get(model.name)
        if window is None:
            window = self.windows[model.name] = ModelWindow(deque(maxlen=self.window_size))
        window.readings.append(reading)
        average = window.average()
        self.signal.labels(model.name).set(average)
        desired = spec.clamp_replicas(math.ceil(average / spec.target_requests))
        current = spec.min_replicas if spec.replicas is None else spec.replicas
        if desired < current:
            window.lower += 1
            if window.lower * self.interval < spec.scale_down_delay_seconds:
                return
        window.lower = 0
        if desired != current:
            await self._write(model.name, desired, report)

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
