"""Waiting between attempts: exponential backoff, and a wait that a new trigger ends early.

Shared by every retry loop of both runtimes (watches, reconciles, leader tasks, adapter passes,
replica restarts), so none of them needs the Kubernetes client to back off.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff, by default with full jitter in [delay/2, delay]: replicas restarting
    together after an outage do not hammer the API server in lockstep."""

    initial: float = 0.2
    maximum: float = 30.0
    factor: float = 2.0
    jitter: bool = True

    def delay(self, failures: int) -> float:
        delay = min(self.maximum, self.initial * self.factor ** max(0, failures - 1))
        return random.uniform(delay / 2, delay) if self.jitter else delay


async def wait_until_set(event: asyncio.Event, seconds: float) -> bool:
    """Until the event is set or the time is up; True if it was set.

    asyncio.timeout rather than wait_for: on Python 3.11 wait_for can swallow a cancellation that
    arrives as the event fires, and a loop that ignores being stopped never ends.
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
