"""Passive health checks: a replica that keeps failing is left out of picks for a while.

Retries already hide a dead replica from clients, but each request that picks it first pays a
failed connect (one of four static replicas killed cost 2,670 requests a connection-refused
retry). Envoy's outlier detection answers that, and this is its consecutive-gateway-failure
flavour: after ``consecutive_failures`` failed attempts in a row (connect errors, timeouts,
500/502/503/504), the replica is ejected for ``base_seconds``, doubled for each ejection in a
row up to ``max_seconds``. It comes back by itself when the time is up; if it is still down,
the next ``consecutive_failures`` attempts eject it again, so a dead replica costs at most that
many failed attempts per ejection period. A success resets the failure count, and a replica
that stayed in for ``max_seconds`` starts its doubling afresh.

Never more than ``max_ejected_percent`` of a model's replicas are out at once (at least one may
be, when there are two or more): ejection must not turn a partial outage into a full one. And
an ejected replica is only skipped, not removed: when nothing else can serve a request (its
adapter lives only there) the balancer still falls back to it.

The state is per gateway process, like Envoy's per-host detectors; with several worker
processes each learns of a dead replica from its own attempts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

from lb.schema import setting


@dataclass(frozen=True, slots=True)
class EjectionConfig:
    consecutive_failures: int = setting(
        3, doc="Failed attempts in a row (connect errors, timeouts, 500/502/503/504) that eject a replica; "
        "0 turns ejection off.", minimum=0)
    base_seconds: float = setting(5.0, doc="First ejection's length; each ejection in a row doubles it.",
                                  exclusive_minimum=0)
    max_seconds: float = setting(300.0, doc="Longest ejection.", exclusive_minimum=0)
    max_ejected_percent: int = setting(50, doc="Most replicas of a model ejected at once, in percent (at least "
                                       "one of two or more may be).", minimum=0, maximum=100)


@dataclass(slots=True)
class _Health:
    failures: int = 0  # consecutive failed attempts
    ejections: int = 0  # ejections in a row; the period doubles with each
    until: float = 0.0  # ejected while the clock is below this
    last_ejected: float = 0.0


class Outliers:
    """The health of one model's replicas, as seen from this process's attempts.

    Only replicas with something to remember (a failure, an ejection) have an entry, so the
    common case — every attempt succeeding — costs one dict lookup per attempt.
    """

    __slots__ = ("_config", "_clock", "_health", "ejected", "ejections_total")

    def __init__(self, config: EjectionConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._health: dict[str, _Health] = {}
        self.ejected: dict[str, float] = {}  # key -> until; read on every pick, so kept apart
        self.ejections_total = 0

    def succeeded(self, key: str) -> None:
        health = self._health.get(key)
        if health is not None:
            health.failures = 0
            if health.ejections == 0:
                del self._health[key]

    def failed(self, key: str, n_endpoints: int) -> bool:
        """Record a failed attempt on ``key``; True if it ejected the replica."""
        config = self._config
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = _Health()
        health.failures += 1
        if (config.consecutive_failures <= 0 or health.failures < config.consecutive_failures
                or key in self.current()):
            return False
        if len(self.ejected) + 1 > self._allowed(n_endpoints):
            return False
        self._eject(key, health)
        return True

    def current(self) -> dict[str, float]:
        """The replicas ejected now (those whose time is up are let back in first)."""
        ejected = self.ejected
        if ejected:
            now = self._clock()
            for key in [k for k, until in ejected.items() if until <= now]:
                del ejected[key]
        return ejected

    def forget(self, keys: Iterable[str]) -> None:
        """Drop what is known of replicas that left the model (a new one may reuse a key)."""
        for key in keys:
            self._health.pop(key, None)
            self.ejected.pop(key, None)

    def _allowed(self, n_endpoints: int) -> int:
        if n_endpoints < 2:
            return 0
        return max(1, n_endpoints * self._config.max_ejected_percent // 100)

    def _eject(self, key: str, health: _Health) -> None:
        config, now = self._config, self._clock()
        if now - health.last_ejected > config.max_seconds + self._period(health.ejections):
            health.ejections = 0  # it stayed in long enough: start the doubling afresh
        health.ejections += 1
        health.failures = 0
        health.last_ejected = now
        health.until = now + self._period(health.ejections)
        self.ejected[key] = health.until
        self.ejections_total += 1

    def _period(self, ejections: int) -> float:
        if ejections <= 0:
            return 0.0
        return min(self._config.base_seconds * 2 ** (ejections - 1), self._config.max_seconds)
