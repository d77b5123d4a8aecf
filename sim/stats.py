"""Engine statistics kept as plain Python numbers, exported to Prometheus only at scrape time.

Why not prometheus-client's Counter/Histogram directly: they take a lock per update, and the engine
updates per token for hundreds of streams. A bucket counter here costs one bisect and one list
increment; `kvgate_sim.metrics` turns these into metric families when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Bucket bounds as vLLM v1 declares them (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def one_two_five_buckets(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count histogram buckets)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


class BucketHistogram:
    """Cumulative-on-export histogram with fixed upper bounds (`le`, inclusive)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs including +Inf, as Prometheus exposes them."""
        out, acc = [], 0
        for bound, c in zip(self.bounds, self.counts):
            acc += c
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out

    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0


@dataclass
class EngineStats:
    """Cumulative counters and histograms of one engine (one replica)."""

    max_model_len: int = 16384
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    requests_finished: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    aborted: int = 0
    ttft: BucketHistogram = field(default_factory=lambda: BucketHistogram(TTFT_BUCKETS))
    tpot: BucketHistogram = field(default_factory=lambda: BucketHistogram(TPOT_BUCKETS))
    e2e: BucketHistogram = field(default_factory=lambda: BucketHistogram(LATENCY_BUCKETS))
    queue_time: BucketHistogram = field(default_factory=lambda: BucketHistogram(LATENCY_BUCKETS))
    req_prompt_tokens: BucketHistogram = field(init=False)
    req_generation_tokens: BucketHistogram = field(init=False)

    def __post_init__(self) -> None:
        b = one_two_five_buckets(self.max_model_len)
        self.req_prompt_tokens = BucketHistogram(b)
        self.req_generation_tokens = BucketHistogram(b)
