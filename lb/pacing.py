"""Spacing out the dispatches of offline work to each replica.

A class held to a share of each replica (``capacityShare`` below 1) keeps its replicas at that
many requests in flight; with ``paced: true`` (the default ``batch`` class, which runs a
batch's lines) this module spaces them out. Left to itself it moves in waves: lines sent
together are prefilled in one engine step, decode together and end in the same step, and the
slots they free are filled again at once, so every few steps one step prefills a whole
share's worth of prompts. An interactive request that arrives during that step waits for it
to end (an engine never cuts a running step short), which is the tail of its time to first
token. The pacer sends a replica its next such request only once the previous one's part of
the replica's cycle has passed: ``weight / capacity`` of how long these requests have lately
taken there, times ``SPREAD`` (< 1, so in a steady state the share, not the pace, bounds the
throughput). The waves flatten into about one line per step; the class's throughput stays.

Per gateway worker and per replica (a batch runs in one worker, so its lines share one pacer).
"""

from __future__ import annotations

__all__ = ["Pacer", "SPREAD"]

SPREAD = 0.8  # of a request's share of the replica's cycle: the least gap before the next
_SMOOTHING = 0.2  # weight of each new duration in the running mean


class Pacer:
    """Per replica: when it may next be sent a paced request, and how long they last there."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}  # replica -> monotonic time of its next paced dispatch
        self._seconds: dict[str, float] = {}  # replica -> running mean of a paced request's time

    def held(self, now: float) -> list[str]:
        """Replicas that may not take a paced request at ``now``."""
        return [key for key, at in self._next.items() if at > now]

    def dispatched(self, key: str, weight: int, capacity: int, now: float) -> None:
        """``key`` was sent a paced request of ``weight`` out of its ``capacity``."""
        self._next[key] = now + self._seconds.get(key, 0.0) * SPREAD * weight / capacity

    def finished(self, key: str, seconds: float) -> None:
        """A paced request on ``key`` ended after ``seconds`` (answered, failed or abandoned)."""
        mean = self._seconds.get(key)
        self._seconds[key] = seconds if mean is None else mean + _SMOOTHING * (seconds - mean)

    def forget(self, key: str) -> None:
        """The replica is gone (or changed address): a new one starts unpaced."""
        self._next.pop(key, None)
        self._seconds.pop(key, None)
