"""Ring fixtures the ring and scale studies share: prompt prefixes, busy rings of N endpoints,
and a per-call timer that keeps timer overhead and machine noise out of the figures."""

from __future__ import annotations

import random
import statistics
import string
import time
from typing import Any, Callable

from lb import chwbl

SIZES = (8, 64, 256, 1024)
REPLICATION = 256
ADAPTER = "lora-a"


def prefixes(count: int, length: int = 100, seed: int = 1) -> list[str]:
    """Distinct prompt prefixes of `length` printable ASCII characters."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " .,;:!?'-"
    return ["".join(rng.choices(alphabet, k=length)) for _ in range(count)]


def endpoint_keys(n: int) -> list[str]:
    return [f"default/model-{i // 256}-{i % 256}" for i in range(n)]


def fill_twin(ring: chwbl.Ring, keys: list[str]) -> None:
    """Add `keys` to the pure-Python twin with one sort instead of one merge per add.

    The twin's ``add`` is O(vnodes) by design, so building 1024 endpoints one by one would
    take minutes. This runs the twin's own ``add`` for all bookkeeping and only defers the
    vnode merge, ordering the vnodes exactly as ``add`` does ((hash, key)); ``run`` checks
    that the result picks like the Cython ring before timing anything.
    """
    pending: list[tuple[str, int]] = []
    ring._merge_vnodes = lambda key, slot: pending.append((key, slot))  # type: ignore[method-assign]
    try:
        for key in keys:
            ring.add(key)
    finally:
        del ring._merge_vnodes
    vnodes = sorted((chwbl.hash64(f"{key}#{i}"), key, slot)
                    for key, slot in pending for i in range(ring.replication))
    ring._hashes = [h for h, _, _ in vnodes]
    ring._owners = [slot for _, _, slot in vnodes]


def build(cls: type, n: int) -> tuple[Any, list[int]]:
    """A ring of `n` endpoints, every other one serving ADAPTER, each with 4 requests in
    flight (returned as tickets): the bound is computed on every pick (at zero load it is
    skipped), and the key's own endpoint passes it, as in a busy but balanced gateway."""
    ring = cls(replication=REPLICATION)
    keys = endpoint_keys(n)
    if cls is chwbl.Ring:
        fill_twin(ring, keys)
    else:
        for key in keys:
            ring.add(key)
    for key in keys[::2]:
        ring.set_adapters(key, {ADAPTER})
    return ring, [ring.acquire(key) for key in keys for _ in range(4)]


def batch_ns(call: Callable[..., Any], keys: list[str], adapter: str | None) -> float:
    """One batch: its time divided by its calls. Two plain loops rather than
    ``call(key, *args)``, whose argument unpacking would cost more than a Cython pick."""
    if adapter is None:
        start = time.perf_counter_ns()
        for key in keys:
            call(key)
    else:
        start = time.perf_counter_ns()
        for key in keys:
            call(key, adapter)
    return (time.perf_counter_ns() - start) / len(keys)


def per_call_ns(cases: dict[Any, tuple[Callable[..., Any], list[str], int]], rounds: int,
                adapter: str | None = None) -> dict[Any, float]:
    """Median per-call time of each case. The cases take turns, round after round, so a
    burst of load on this machine hits Cython and Python alike instead of skewing the ratio;
    each case runs its own number of batches per round (the fast one more)."""
    samples: dict[Any, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (call, keys, batches) in cases.items():
            samples[name].extend(batch_ns(call, keys, adapter) for _ in range(batches))
    return {name: statistics.median(values) for name, values in samples.items()}
