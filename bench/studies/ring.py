"""Ring benchmark: CHWBL pick latency and endpoint add/remove cost, Cython core vs pure twin.

    python -m bench ring            # full run (well under a minute)
    python -m bench ring --quick    # a few seconds, for a smoke check

Pick latency includes hashing a 100-character prompt prefix, because that is what the gateway
pays per request. Each figure is the median, over many batches, of the batch's time divided by
its picks (``time.perf_counter_ns``): batching keeps timer overhead out, the median keeps
scheduler noise out, and Cython and Python batches take turns so a burst of load on a shared
machine skews neither side of the ratio. The time of the Python ``for`` loop driving the calls
is included in every per-call figure; the "loop + C call" line shows how much of it that is.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bench.results import table
from bench.rings import ADAPTER, REPLICATION, SIZES, build, per_call_ns, prefixes
from lb import chwbl, ring as ring_module

try:
    from lb import _chwbl as native
except ImportError:  # still useful: prints the twin's figures and says the core is missing
    native = None


def lighten(ring: Any, tickets: list[int]) -> None:
    """Leave one request in flight: with KubeAI's "+1" no endpoint is then within the bound,
    so every pick falls back to the key's owner (a naive walk visits every vnode to find out)."""
    for ticket in tickets[1:]:
        ring.release(ticket)


def churn_us(ring: Any, reps: int) -> tuple[float, float]:
    """Median µs to add one more endpoint to `ring`, and to remove it again."""
    adds, removes = [], []
    for i in range(reps):
        key = f"default/extra-{i}"
        start = time.perf_counter_ns()
        ring.add(key, (ADAPTER,))
        middle = time.perf_counter_ns()
        ring.remove(key)
        adds.append((middle - start) / 1000)
        removes.append((time.perf_counter_ns() - middle) / 1000)
    return statistics.median(adds), statistics.median(removes)


def check_same_picks(rings: list[Any], keys: list[str]) -> None:
    """Refuse to time rings that disagree (e.g. a wrong fast fill)."""
    for key in keys:
        for args in ((key,), (key, ADAPTER)):
            if len({ring.pick(*args) for ring in rings}) != 1:
                raise SystemExit(f"the rings disagree on {args!r}: not timing them")


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(slow: float | None, fast: float | None) -> str:
    return "n/a" if slow is None or fast is None else f"{slow / fast:.1f}x"


def run(quick: bool) -> None:
    keys = prefixes(500 if quick else 1000)
    rounds = 8 if quick else 40
    classes = [c for c in (native.Ring if native else None, chwbl.Ring) if c is not None]
    loop_ns = per_call_ns({len: (len, keys, 5)}, rounds)[len]

    print(f"ring implementation in use: {ring_module.IMPLEMENTATION} (lb.ring.IMPLEMENTATION)")
    print(f"python {sys.version.split()[0]}; {len(keys)} distinct 100-char prefixes per batch; "
          f"{REPLICATION} vnodes per endpoint; loop + C call (len) = {loop_ns:.0f} ns\n")

    lookup_rows, light_rows, churn_rows = [], [], []
    cy, py = (native.Ring if native else None), chwbl.Ring
    for n in SIZES:
        built = {cls: build(cls, n) for cls in classes}
        check_same_picks([ring for ring, _ in built.values()], keys[:200])
        cases = {cls: (ring.pick, keys, 1 if cls is chwbl.Ring else 5)
                 for cls, (ring, _) in built.items()}
        picks = per_call_ns(cases, rounds)
        adapter_picks = per_call_ns(cases, rounds, ADAPTER)
        for ring, tickets in built.values():
            lighten(ring, tickets)
        light = per_call_ns(cases, rounds)
        churn = {}
        for cls, (ring, _) in built.items():
            reps = (2 if n >= 256 else 5) if cls is chwbl.Ring else (20 if quick else 60)
            churn[cls] = churn_us(ring, reps)
        lookup_rows.append(
            (n, fmt(picks.get(cy)), fmt(picks[py]), ratio(picks[py], picks.get(cy)),
             fmt(adapter_picks.get(cy)), fmt(adapter_picks[py]),
             ratio(adapter_picks[py], adapter_picks.get(cy))))
        light_rows.append((n, fmt(light.get(cy)), fmt(light[py]), ratio(light[py], light.get(cy))))
        cy_churn = churn.get(cy, (None, None))
        churn_rows.append((n, fmt(cy_churn[0], 1), fmt(churn[py][0], 1), fmt(cy_churn[1], 1),
                           fmt(churn[py][1], 1)))
        print(f"  measured {n} endpoints", file=sys.stderr)

    print("Pick latency, median ns per call (hash of a 100-char prefix + bounded-load walk):\n")
    print(table(("endpoints", "Cython", "pure Python", "speedup", "Cython, adapter",
                 "pure Python, adapter", "speedup"), lookup_rows, "r"))
    print("\nPick under light load (1 request in flight: no endpoint within the bound, so "
          "every pick falls back to the key's owner), median ns per call:\n")
    print(table(("endpoints", "Cython", "pure Python", "speedup"), light_rows, "r"))
    print("\nEndpoint add / remove, median µs per endpoint (incremental: merge / compact):\n")
    print(table(("endpoints", "add Cython", "add pure Python", "remove Cython",
                 "remove pure Python"), churn_rows, "r"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ring",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and keys")
    run(parser.parse_args(argv).quick)
    return 0
