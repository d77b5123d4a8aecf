"""Failure injection for one replica, changeable at runtime through `POST /sim/faults`.

Why: the gateway's reliability rules (retry 5xx and connect errors before the first byte, never
retry a stream once bytes went out, end the client's stream cleanly when an upstream dies, wait for
a replica that is still starting) can only be tested against a server that fails on purpose in each
of those ways.

Knobs (all optional in an update; unknown keys are rejected):
- `error_rate` (0..1) with `error_status`: fail that fraction of inference requests, seeded RNG;
- `fail_next` with `fail_next_status`: fail exactly the next N inference requests;
- `drop_next`: close the connection of the next N inference requests without any response;
- `reset_after_chunks` with `reset_count`: cut streaming responses with a TCP reset after K SSE
  events (`reset_count` None = every stream, else only the next N streams);
- `extra_latency_s`: delay every inference request before it reaches the engine (the engine itself
  stays as fast, so its queue does not grow: a slow network, not a slow replica);
- `slowdown` (>= 1): multiply the modelled time of every engine step, so the replica serves fewer
  tokens per second: under load its waiting queue (`vllm:num_requests_waiting`) grows and its TTFT
  rises, as on a throttled or degraded GPU. Queue-aware routing and outlier ejection are tested
  against this;
- `startup_delay_s`: report not-ready (503 on /health and inference) for that many seconds from now;
- `unhealthy`: force /health to 503 (a replica that went bad after starting).

A replica made to fail on demand: `error_rate`/`fail_next` answer with 5xx, `drop_next` closes the
connection unanswered, `reset_after_chunks` cuts streams, `unhealthy` fails the health check;
`slowdown` makes it slow without failing.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from .errors import SimError


@dataclass
class Faults:
    """Current failure-injection settings of a replica."""

    error_rate: float = 0.0
    error_status: int = 500
    fail_next: int = 0
    fail_next_status: int = 503
    drop_next: int = 0
    reset_after_chunks: Optional[int] = None
    reset_count: Optional[int] = None
    extra_latency_s: float = 0.0
    slowdown: float = 1.0
    startup_delay_s: float = 0.0
    unhealthy: bool = False
    seed: int = 0
    ready_at: float = field(default=0.0, repr=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        self._rng.seed(self.seed)
        self.ready_at = time.monotonic() + self.startup_delay_s

    # --- configuration -----------------------------------------------------------------------

    def update(self, changes: dict[str, Any]) -> None:
        """Apply a partial update from JSON; raises SimError(400) on bad keys or values."""
        known = {f.name: f for f in fields(self) if not f.name.startswith("_") and
                 f.name != "ready_at"}
        for key, value in changes.items():
            if key not in known:
                raise SimError(400, f"unknown fault setting {key!r}; known: {sorted(known)}")
            setattr(self, key, self._coerce(key, value))
        self._validate()
        if "seed" in changes:
            self._rng.seed(self.seed)
        if "startup_delay_s" in changes:
            self.ready_at = time.monotonic() + self.startup_delay_s

    @staticmethod
    def _coerce(key: str, value: Any) -> Any:
        if value is None:
            if key in ("reset_after_chunks", "reset_count"):
                return None
            raise SimError(400, f"{key} cannot be null")
        try:
            if key in ("error_rate", "extra_latency_s", "startup_delay_s", "slowdown"):
                return float(value)
            if key == "unhealthy":
                return bool(value)
            return int(value)
        except (TypeError, ValueError):
            raise SimError(400, f"invalid value for {key}: {value!r}") from None

    def _validate(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise SimError(400, "error_rate must be within [0, 1]")
        for key in ("error_status", "fail_next_status"):
            if not 400 <= getattr(self, key) <= 599:
                raise SimError(400, f"{key} must be an HTTP error status (400-599)")
        if min(self.fail_next, self.drop_next) < 0 or self.extra_latency_s < 0:
            raise SimError(400, "counts and latencies must not be negative")
        if not self.slowdown >= 1.0:
            raise SimError(400, "slowdown must be a factor of at least 1")
        if self.reset_after_chunks is not None and self.reset_after_chunks < 0:
            raise SimError(400, "reset_after_chunks must not be negative")

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_") and k != "ready_at"}
        d["ready"] = self.ready()
        return d

    # --- decisions, called per request -------------------------------------------------------

    def ready(self) -> bool:
        return time.monotonic() >= self.ready_at

    def take_drop(self) -> bool:
        """Whether to drop this request's connection without answering."""
        if self.drop_next > 0:
            self.drop_next -= 1
            return True
        return False

    def take_error(self) -> Optional[int]:
        """The status to fail this request with, or None to serve it."""
        if self.fail_next > 0:
            self.fail_next -= 1
            return self.fail_next_status
        if self.error_rate > 0 and self._rng.random() < self.error_rate:
            return self.error_status
        return None

    def take_reset(self) -> Optional[int]:
        """How many SSE events this stream may send before being reset, or None."""
        if self.reset_after_chunks is None:
            return None
        if self.reset_count is not None:
            if self.reset_count <= 0:
                return None
            self.reset_count -= 1
        return self.reset_after_chunks
