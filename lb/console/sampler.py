"""Once a second, what this worker finished since the last second goes into the shared window.

The request path only bumps the worker's own counters (``lb.metrics``), as it did before the
console existed; this task reads them off the loop's idle time, so the console costs a request
nothing. It also publishes how many requests of each model wait in this worker's waiting room.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

from lb.console.window import HISTOGRAM, Sample, SharedWindow
from lb.metrics import GatewayMetrics

PERIOD_SECONDS = 1.0


class Sampler:
    """Turns one worker's cumulative counters into per-bucket additions to the window."""

    def __init__(self, window: SharedWindow, worker: int, metrics: GatewayMetrics,
                 waiting: Callable[[str], int], models: Callable[[], Iterable[str]]) -> None:
        self.window = window
        self.worker = worker
        self._metrics = metrics
        self._waiting = waiting
        self._models = models
        self._last: dict[str, tuple[int, int, float, list[int]]] = {}

    def totals(self) -> dict[str, tuple[int, int, float, list[int]]]:
        """Per model since start: (requests, 5xx answers, first-byte seconds, histogram)."""
        out: dict[str, tuple[int, int, float, list[int]]] = {}
        for (model, _kind, code), n in list(self._metrics.codes.items()):
            requests, errors, total, hist = out.get(model, (0, 0, 0.0, [0] * HISTOGRAM))
            out[model] = (requests + n, errors + (n if code >= 500 else 0), total, hist)
        for (model, _kind), buckets in list(self._metrics.first_bytes.items()):
            requests, errors, total, hist = out.get(model, (0, 0, 0.0, [0] * HISTOGRAM))
            out[model] = (requests, errors, total + buckets.total,
                          [a + b for a, b in zip(hist, buckets.counts)])
        return out

    def sample(self, now: float) -> None:
        """Add the change since the last call; publish the waiting counts."""
        totals = self.totals()
        for model, (requests, errors, total, hist) in totals.items():
            before = self._last.get(model, (0, 0, 0.0, [0] * HISTOGRAM))
            self.window.add(self.worker, model, now, Sample(
                requests - before[0], errors - before[1], total - before[2],
                [a - b for a, b in zip(hist, before[3])]))
        self._last = totals
        for model in self._models():
            self.window.set_waiting(self.worker, model, now, self._waiting(model))

    async def run(self) -> None:
        """Sample until cancelled; the last sample is taken on the way out."""
        try:
            while True:
                self.sample(time.time())
                await asyncio.sleep(PERIOD_SECONDS)
        finally:
            self.sample(time.time())
