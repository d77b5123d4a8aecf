"""Active health checks: replicas that stop answering their health path leave the picks.

Passive ejection (``lb.ejection``) learns of a dead replica from requests: each ejection period
costs a few failed attempts, each one a request that pays a retry. A static endpoint list has
nobody else to take a dead server off the ring, so here the gateway asks itself: every
``interval_seconds`` it GETs each replica's ``path`` (vLLM's ``/health``), all replicas at
once, each with ``timeout_seconds`` (connect included). A connect error, a timeout or a non-2xx
answer fails the check. After ``unhealthy_threshold`` failed checks in a row a replica is marked
unhealthy (its key joins ``group.unhealthy``) and the balancer skips it exactly as it skips an
ejected one (falling back to it only when nothing else can serve); after ``healthy_threshold``
passed checks in a row it is back. A replica starts healthy, so a new endpoint takes traffic
at once, as before.

Off by default. When on, it checks every model's endpoints, whoever wrote them: in static mode
it is the only thing that takes a dead server away for good; with the operator the runtimes
already gate on readiness, but this adds the view from the gateway itself (its own network path
to the replica), and sooner than a readiness change travels through the endpoint watch.

With several worker processes each worker checks on its own: one GET per replica per interval
per worker is nothing beside inference traffic, no state crosses processes (the shared table
holds load counts), and no worker depends on another to notice an outage — the same choice as
the ejection record, which is per process too. Workers probe the same replicas at the same
pace, so their views agree within about one interval.

The request path pays one attribute read and an emptiness test (``group.unhealthy``); the
set is read only while some replica is unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp

from lb.registry import Registry
from lb.schema import setting

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    interval_seconds: float = setting(
        0.0, doc="How often every replica's health path is requested; 0 (the default) turns active "
        "health checks off.", minimum=0)
    timeout_seconds: float = setting(1.0, doc="Timeout of one check, connect included (at most "
                                     "intervalSeconds).", exclusive_minimum=0)
    path: str = setting("/health", doc="Path requested on each replica; a 2xx answer passes.",
                        pattern="^/.*$")
    unhealthy_threshold: int = setting(
        2, doc="Failed checks in a row (connect error, timeout, non-2xx) that leave a replica out "
        "of picks.", minimum=1, maximum=100)
    healthy_threshold: int = setting(2, doc="Passed checks in a row that bring it back.", minimum=1,
                                     maximum=100)

    @property
    def enabled(self) -> bool:
        return self.interval_seconds > 0


@dataclass(slots=True)
class _Streak:
    """The latest checks of one replica that all went the same way."""

    address: str
    passed: bool
    count: int


class HealthChecker:
    """Checks every endpoint of every model in the registry and keeps ``group.unhealthy``."""

    def __init__(self, registry: Registry, config: HealthCheckConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._config = config
        self._clock = clock
        self._streaks: dict[tuple[str, str], _Streak] = {}  # (model, endpoint key) -> streak
        self.rounds = 0

    async def run(self) -> None:
        """Check forever (until cancelled), one round per interval.

        Each check opens a fresh connection (``force_close``): connecting is part of what is
        checked, and a kept-alive connection the replica has just closed would fail a healthy
        replica's check. No connection limit: with many replicas, checks must not queue for
        one and time out waiting.
        """
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_seconds)
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while True:
                started = self._clock()
                await self.check_once(session)
                await asyncio.sleep(max(0.0, self._config.interval_seconds
                                        - (self._clock() - started)))

    async def check_once(self, session: aiohttp.ClientSession) -> None:
        targets = [(model, key, endpoint.address)
                   for model, group in self._registry.groups().items()
                   for key, endpoint in list(group.endpoints.items())]
        outcomes = await asyncio.gather(*(self._check(session, address)
                                          for _, _, address in targets))
        for (model, key, address), failure in zip(targets, outcomes):
            self._record(model, key, address, failure)
        checked = {(model, key) for model, key, _ in targets}
        for gone in [k for k in self._streaks if k not in checked]:
            del self._streaks[gone]
        self.rounds += 1

    async def _check(self, session: aiohttp.ClientSession, address: str) -> str | None:
        """None if the replica passed, else why it failed (for the log)."""
        try:
            async with session.get(f"http://{address}{self._config.path}",
                                   allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except asyncio.TimeoutError:
            return f"no answer within {self._config.timeout_seconds:g}s"
        except aiohttp.ClientError as exc:
            return str(exc) or type(exc).__name__

    def _record(self, model: str, key: str, address: str, failure: str | None) -> None:
        # Looked up again: the endpoint may have left, moved, or its model been rebuilt (a new
        # group) while the check ran.
        group = self._registry.groups().get(model)
        endpoint = group.endpoints.get(key) if group is not None else None
        if group is None or endpoint is None or endpoint.address != address:
            self._streaks.pop((model, key), None)
            return
        passed = failure is None
        streak = self._streaks.get((model, key))
        if streak is None or streak.address != address or streak.passed != passed:
            streak = self._streaks[(model, key)] = _Streak(address, passed, 0)
        streak.count += 1
        config = self._config
        if passed and key in group.unhealthy and streak.count >= config.healthy_threshold:
            group.unhealthy.discard(key)
            log.info("model %s: replica %s (%s) is healthy again after %d passed health checks; "
                     "back in picks", model, key, address, streak.count)
        elif (not passed and key not in group.unhealthy
              and streak.count >= config.unhealthy_threshold):
            group.unhealthy.add(key)
            log.warning("model %s: replica %s (%s) is unhealthy after %d failed health checks in a "
                        "row (last: %s); left out of picks", model, key, address, streak.count,
                        failure)
