"""Kubernetes Events on Models: what ``kubectl describe model`` shows under Events.

One Event object per (Model, what happened): a repeat bumps its ``count`` and ``lastTimestamp``
instead of adding another object, as kubectl's own aggregation presents it. Used by the cache
(`lb_operator.kube.cache`: loaded, failed), the reconciler (name conflicts) and, through the
rate-limited `EventRecorder`, by the reconciler (scaled, rolled out, invalid, replicas clamped,
API rejections) and the adapters (loaded, failed).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Callable, Mapping

from kubernetes_asyncio.client.exceptions import ApiException

from lb.model import API_VERSION, KIND
from lb_operator.kube.apply import now_timestamp
from lb_operator.kube.client import MERGE_PATCH, KubeApi, api_error_text, or_none
from lb_operator.kube.watch import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

SOURCE = "kvgate-operator"


async def record_event(api: KubeApi, *, namespace: str, model: str, uid: str, kind: str,
                       reason: str, message: str, event_name: str) -> None:
    """Record an Event (``kind`` Normal or Warning) on the Model ``namespace/model``."""
    now = now_timestamp()
    body = {"apiVersion": "v1", "kind": "Event",
            "metadata": {"name": event_name, "namespace": namespace},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": model,
                               "namespace": namespace, "uid": uid},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "firstTimestamp": now, "lastTimestamp": now, "source": {"component": SOURCE}}
    try:
        await api.core.create_namespaced_event(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        old = await or_none(api.core.read_namespaced_event(event_name, namespace))
        count = int(getattr(old, "count", None) or 1) + 1
        await api.core.patch_namespaced_event(
            event_name, namespace, {"count": count, "lastTimestamp": now, "message": message},
            _content_type=MERGE_PATCH)


class EventRecorder:
    """Events on Models, the way client-go's recorder keeps them useful and cheap:

    - identical events (same Model, reason and message) are one Event object whose count grows
      (`record_event`), so ``kubectl describe model`` shows "x5 over 3m" instead of five rows;
    - a token bucket per Model (``burst`` events, then one more every ``refill_seconds``) drops
      the excess, so a Model that flaps cannot flood the API server (``dropped`` counts them);
    - a failure to write is logged, never raised: an Event reports what happened, it is not
      state, and a reconcile must not fail (and retry) because its report could not be written.
    """

    def __init__(self, api: KubeApi, *, burst: int = 25, refill_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.clock = clock
        self.dropped = 0
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # -> (tokens, as of)

    async def record(self, obj: Mapping[str, Any], kind: str, reason: str, message: str) -> bool:
        """Record an Event on the Model ``obj`` (its API object); False if it was dropped."""
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace", "default"), meta.get("name", "")
        if not self._take((namespace, name)):
            self.dropped += 1
            log.debug("model %s/%s: event %s dropped (rate limit): %s", namespace, name, reason, message)
            return False
        digest = hashlib.sha256(f"{kind}\0{reason}\0{message}".encode()).hexdigest()[:10]
        try:
            await record_event(self.api, namespace=namespace, model=name, uid=meta.get("uid", ""),
                               kind=kind, reason=reason, message=message,
                               event_name=f"{name}.{reason.lower()}.{digest}")
        except (ApiException, *TRANSIENT_ERRORS) as exc:
            log.warning("model %s/%s: could not record event %s: %s", namespace, name, reason,
                        api_error_text(exc) if isinstance(exc, ApiException) else exc)
            return False
        return True

    def _take(self, key: tuple[str, str]) -> bool:
        now = self.clock()
        tokens, since = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - since) / self.refill_seconds)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True
