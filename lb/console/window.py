"""Recent traffic per model, true across the gateway's worker processes.

Each worker counts its own finished requests and first-byte times (``lb.metrics``: plain
integers, nothing shared on the request path). Once a second its ``Sampler`` (see
``lb.console.sampler``) adds what changed since the last second into this shared table: one row
per (model, worker, 5-second bucket), written only by that worker, so no lock is taken. Any
worker answering the console's API sums every worker's rows. The table is an anonymous shared
memory map made before the workers fork, as the ring's ``LoadTable`` is; a single-process
gateway makes its own.

Layout (64-bit words): a header, a directory of model tags (inserted under a lock, never
removed), per (model, worker) a gauge pair ``[second, waiting]``, then the bucket rows
``[bucket id, requests, errors, first-byte sum in µs, first-byte histogram...]``. A row whose
bucket id is not the one asked for is stale (the ring of buckets wrapped) and reads as empty.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
from dataclasses import dataclass
from typing import Sequence

import mmh3

from lb.metrics import _LATENCY_BUCKETS as BOUNDS

__all__ = ["SharedWindow", "Sample", "Traffic", "quantile", "BOUNDS"]

BUCKET_SECONDS = 5
HISTOGRAM = len(BOUNDS) + 1  # the bounds and +Inf
_ID, _REQUESTS, _ERRORS, _SUM_US, _HIST = 0, 1, 2, 3, 4
ROW = _HIST + HISTOGRAM
GAUGE_FRESH_SECONDS = 5  # a worker that stopped sampling (gone) no longer counts


@dataclass(slots=True)
class Sample:
    """What one worker finished for one model since its previous sample."""

    requests: int = 0
    errors: int = 0
    first_byte_sum: float = 0.0
    first_byte: list[int] | None = None  # per histogram bucket, not cumulative

    def __bool__(self) -> bool:
        return bool(self.requests or (self.first_byte and any(self.first_byte)))


@dataclass(frozen=True, slots=True)
class Traffic:
    """A model's recent traffic, summed over workers: per bucket, oldest first."""

    bucket_seconds: int
    first_bucket: int  # the id of the oldest bucket (its start is id * bucket_seconds)
    requests: list[int]
    errors: list[int]
    first_byte: list[list[int]]  # per bucket, the histogram


def _tag(model: str) -> int:
    data = model.encode("utf-8", "surrogatepass")
    return mmh3.hash64(data, seed=0, x64arch=True, signed=False)[0] or 1  # 0: a free slot


class SharedWindow:
    """The table; ``workers`` rows per model and bucket, ``models`` model slots."""

    HEADER = 8  # words

    def __init__(self, workers: int = 1, models: int = 256, window_seconds: int = 600) -> None:
        if not 1 <= workers <= 1024 or not 1 <= models <= 1 << 16:
            raise ValueError("workers must be in [1, 1024] and models in [1, 65536]")
        self.workers, self.models = workers, models
        self.buckets = math.ceil(window_seconds / BUCKET_SECONDS) + 1  # + the one filling
        self._gauges = self.HEADER + models
        self._rows = self._gauges + models * workers * 2
        words = self._rows + models * workers * self.buckets * ROW
        self._buffer = mmap.mmap(-1, words * 8)  # MAP_SHARED: inherited by forked workers
        self._words = memoryview(self._buffer).cast("q")
        self._tags = memoryview(self._buffer).cast("Q")  # the directory's unsigned view
        self._lock = multiprocessing.get_context("fork").Lock()
        self._slots: dict[str, int] = {}  # this process's cache of the directory

    def slot(self, model: str) -> int | None:
        """The model's slot, inserted if new; None when the directory is full."""
        found = self._slots.get(model)
        if found is not None:
            return found
        tag, tags = _tag(model), self._tags
        with self._lock:
            for i in range(self.models):
                at = (tag + i) % self.models
                if tags[self.HEADER + at] in (0, tag):
                    tags[self.HEADER + at] = tag
                    self._slots[model] = at
                    return at
        return None

    def add(self, worker: int, model: str, now: float, sample: Sample) -> None:
        """Add a worker's sample to the bucket ``now`` falls in (only that worker writes it)."""
        slot = self.slot(model)
        if slot is None or not sample:
            return
        bucket = int(now // BUCKET_SECONDS)
        base = self._row(slot, worker, bucket)
        words = self._words
        if words[base + _ID] != bucket:  # the ring of buckets came round: start it afresh
            words[base + _ID] = -1
            for i in range(1, ROW):
                words[base + i] = 0
            words[base + _ID] = bucket
        words[base + _REQUESTS] += sample.requests
        words[base + _ERRORS] += sample.errors
        words[base + _SUM_US] += round(sample.first_byte_sum * 1e6)
        for i, n in enumerate(sample.first_byte or ()):
            if n:
                words[base + _HIST + i] += n

    def set_waiting(self, worker: int, model: str, now: float, waiting: int) -> None:
        slot = self.slot(model)
        if slot is not None:
            at = self._gauges + 2 * (slot * self.workers + worker)
            self._words[at + 1] = waiting
            self._words[at] = int(now)

    def waiting(self, model: str, now: float) -> int:
        """Requests of ``model`` waiting in every worker that sampled lately."""
        slot = self.slot(model)
        if slot is None:
            return 0
        total = 0
        for worker in range(self.workers):
            at = self._gauges + 2 * (slot * self.workers + worker)
            if now - self._words[at] <= GAUGE_FRESH_SECONDS:
                total += self._words[at + 1]
        return total

    def traffic(self, model: str, now: float, seconds: int) -> Traffic:
        """The last ``seconds`` (whole buckets, the one filling included) of ``model``."""
        count = min(self.buckets, max(1, math.ceil(seconds / BUCKET_SECONDS)))
        last = int(now // BUCKET_SECONDS)
        first = last - count + 1
        requests, errors = [0] * count, [0] * count
        hist = [[0] * HISTOGRAM for _ in range(count)]
        slot = self.slot(model)
        if slot is not None:
            words = self._words
            for worker in range(self.workers):
                for k, bucket in enumerate(range(first, last + 1)):
                    base = self._row(slot, worker, bucket)
                    if words[base + _ID] != bucket:
                        continue
                    requests[k] += words[base + _REQUESTS]
                    errors[k] += words[base + _ERRORS]
                    row = hist[k]
                    for i in range(HISTOGRAM):
                        row[i] += words[base + _HIST + i]
        return Traffic(BUCKET_SECONDS, first, requests, errors, hist)

    def _row(self, slot: int, worker: int, bucket: int) -> int:
        return self._rows + ((slot * self.workers + worker) * self.buckets
                             + bucket % self.buckets) * ROW

    def close(self) -> None:
        self._words.release()
        self._tags.release()
        self._buffer.close()


def quantile(q: float, counts: Sequence[int]) -> float | None:
    """The ``q`` quantile of a histogram over ``BOUNDS`` (counts per bucket, +Inf last),
    interpolated linearly inside its bucket as Prometheus's ``histogram_quantile`` does; the
    +Inf bucket answers its lower bound. None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            low = BOUNDS[i - 1] if i else 0.0
            return low + (BOUNDS[i] - low) * (rank - seen) / n
        seen += n
    return BOUNDS[-1]
