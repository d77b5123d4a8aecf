"""The status document: what the console shows and ``kvgate status`` prints.

One JSON object per call, built from what this gateway knows: the registry (models, endpoints,
the ring and its shared in-flight counts), each replica's engine reading and ejection, and the
traffic window shared by the workers. A control plane that runs the replicas (``kvgate up``)
adds what only it knows (desired counts, replicas not ready yet, pids, logs) through
``control``: its own status document, merged in by model name and replica address.

Loads, waiting counts and traffic are true across worker processes; ejections and engine
readings are those of the worker answering (every worker scrapes and judges the same replicas).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from lb.console.ring_view import capacity, ring_picture
from lb.console.window import BUCKET_SECONDS, HISTOGRAM, SharedWindow, quantile
from lb.model import Model
from lb.registry import EndpointGroup, EngineReading, Registry

ControlStatus = Callable[[], dict[str, Any]]
RATE_SECONDS = 60  # requests/s is averaged over this much
TTFT_SECONDS = 300  # the first-byte percentiles cover this much


class StatusSource:
    """Builds the status document of one gateway process."""

    def __init__(self, registry: Registry, window: Callable[[], SharedWindow | None],
                 window_seconds: int, engine_stale_after: float, workers: Callable[[], int]) -> None:
        self._registry = registry
        self._window = window
        self._window_seconds = window_seconds
        self._stale_after = engine_stale_after
        self._workers = workers
        self.control: ControlStatus | None = None
        self.started = time.time()

    def status(self) -> dict[str, Any]:
        control = self.control() if self.control is not None else {}
        now, mono = time.time(), time.monotonic()
        planned = {m["name"]: m for m in control.get("models", [])}
        models = [self._model(m, planned.pop(m.name, None), now, mono)
                  for m in self._registry.models()]
        doc = {k: v for k, v in control.items() if k != "models"}
        doc.setdefault("pid", os.getpid())
        doc["gateway"] = {"pid": os.getpid(), "workers": self._workers(),
                          "started": self.started, "time": now}
        doc["models"] = models + list(planned.values())  # known to the control plane only
        return doc

    def _model(self, model: Model, planned: dict[str, Any] | None, now: float,
               mono: float) -> dict[str, Any]:
        group = self._registry.group(model.name)
        spec = model.spec
        replicas = self._replicas(group, (planned or {}).get("replicas", []), mono)
        ring = group.ring
        total = ring.total
        factor = ring.mean_load_factor
        window = self._window()
        waiting = window.waiting(model.name, now) if window is not None else 0
        entry: dict[str, Any] = {
            "name": model.name, "engine": spec.engine, "features": list(spec.features),
            "strategy": spec.load_balancing.strategy,
            "adapters": [a.name for a in spec.adapters],
            "desired": spec.replicas if spec.replicas is not None else len(group.endpoints),
            "minReplicas": spec.min_replicas, "maxReplicas": spec.max_replicas,
            **{k: v for k, v in (planned or {}).items() if k != "replicas"},
            "ready": sum(1 for r in replicas if r["ready"]),
            "inFlight": total, "waiting": waiting,
            "ring": {"replication": ring.replication, "meanLoadFactor": factor,
                     "capacity": capacity(total, len(group.endpoints), factor)},
            "replicas": replicas,
        }
        entry["traffic"] = self._traffic(window, model.name, now)
        return entry

    def _replicas(self, group: EndpointGroup, planned: list[dict[str, Any]],
                  mono: float) -> list[dict[str, Any]]:
        """The control plane's replicas (ready or not) with what the gateway knows of each,
        then any endpoint it did not list (static endpoints have no control plane)."""
        ring = group.ring
        ejected = group.outliers.current() if group.outliers is not None else {}
        keys = tuple(sorted(group.endpoints))
        picture = ring_picture(keys, ring.replication) if keys else None
        shares = dict(zip(keys, picture.shares)) if picture else {}
        by_address = {e.address: e for e in group.endpoints.values()}
        out = []
        for replica in planned:
            endpoint = by_address.pop(replica.get("address", ""), None)
            out.append(self._replica(dict(replica), endpoint, group, ejected, shares, mono))
        for endpoint in by_address.values():
            base = {"name": endpoint.key, "address": endpoint.address, "state": "ready",
                    "ready": True, "pid": None}
            out.append(self._replica(base, endpoint, group, ejected, shares, mono))
        return out

    def _replica(self, entry: dict[str, Any], endpoint: Any, group: EndpointGroup,
                 ejected: dict[str, float], shares: dict[str, float],
                 mono: float) -> dict[str, Any]:
        if endpoint is None:  # not (yet) an endpoint of the gateway: starting, or gone
            entry.update(key=None, inFlight=0, ringShare=0.0, ejectedSeconds=None,
                         engine=None)
            entry.setdefault("adapters", [])
            return entry
        key = endpoint.key
        entry.update(key=key, adapters=sorted(endpoint.adapters),
                     inFlight=group.ring.load(key) if key in group.ring else 0,
                     ringShare=round(shares.get(key, 0.0), 5),
                     ejectedSeconds=round(ejected[key] - mono, 1) if key in ejected else None,
                     engine=self._engine(group.engine.get(key), mono))
        return entry

    def _engine(self, reading: EngineReading | None, mono: float) -> dict[str, float] | None:
        """The replica's own load as last scraped; None when unknown or stale."""
        if reading is None or mono - reading.read_at > self._stale_after:
            return None
        return {"waiting": reading.waiting, "running": reading.running,
                "kvUsage": round(reading.kv_usage, 3),
                "ageSeconds": round(mono - reading.read_at, 1)}

    def _traffic(self, window: SharedWindow | None, model: str, now: float) -> dict[str, Any]:
        """Requests/s over the last minute, first-byte percentiles over the last five, and
        the whole window per bucket (for the sparkline)."""
        if window is None:
            return {"requestsPerSecond": 0.0, "errorsPerSecond": 0.0,
                    "ttftSeconds": {"p50": None, "p90": None, "p99": None},
                    "bucketSeconds": BUCKET_SECONDS, "series": []}
        traffic = window.traffic(model, now, self._window_seconds)
        # The bucket filling now counts for the part of it that has passed.
        span = RATE_SECONDS - BUCKET_SECONDS + (now % BUCKET_SECONDS)
        recent = RATE_SECONDS // BUCKET_SECONDS
        rate = sum(traffic.requests[-recent:]) / span
        errors = sum(traffic.errors[-recent:]) / span
        merged = [0] * HISTOGRAM
        for row in traffic.first_byte[-(TTFT_SECONDS // BUCKET_SECONDS):]:
            merged = [a + b for a, b in zip(merged, row)]
        return {
            "requestsPerSecond": round(rate, 3), "errorsPerSecond": round(errors, 3),
            "ttftSeconds": {f"p{int(q * 100)}": _rounded(quantile(q, merged))
                            for q in (0.5, 0.9, 0.99)},
            "bucketSeconds": BUCKET_SECONDS, "seriesStart": traffic.first_bucket * BUCKET_SECONDS,
            "series": [{"requests": n, "ttftP90": _rounded(quantile(0.9, h))}
                       for n, h in zip(traffic.requests, traffic.first_byte)],
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def ring_document(registry: Registry, model: Model) -> dict[str, Any]:
    """The picture of ``model``'s ring with each replica's load against the bound."""
    group = registry.group(model.name)
    ring = group.ring
    keys = tuple(sorted(group.endpoints))
    total = ring.total
    doc: dict[str, Any] = {
        "model": model.name, "strategy": model.spec.load_balancing.strategy,
        "replication": ring.replication, "meanLoadFactor": ring.mean_load_factor,
        "total": total, "capacity": capacity(total, len(keys), ring.mean_load_factor),
        "replicas": [], "ends": [], "owners": [],
    }
    if keys:
        picture = ring_picture(keys, ring.replication)
        doc["replicas"] = [{"key": k, "share": round(s, 5), "inFlight": ring.load(k)}
                           for k, s in zip(keys, picture.shares)]
        doc["ends"] = [round(e, 6) for e in picture.ends]
        doc["owners"] = list(picture.owners)
    return doc
