"""The Scaler: the only thing the gateway asks of the control plane.

The gateway never knows whether Pods or local processes serve a model. When a request finds
no ready replica, it calls ``ensure_replica`` and waits on the registry; whoever runs the
replicas (the Kubernetes operator, the local runtime, or nobody in static mode) implements this.
"""

from __future__ import annotations

from typing import Protocol


class Scaler(Protocol):
    async def ensure_replica(self, model: str) -> None:
        """Make sure at least one replica of ``model`` is wanted (scale 0 -> 1).

        Must be idempotent and cheap when replicas are already wanted; it is called by every
        request that queues while the model has no replica. Errors are logged by the caller, not raised to
        the client: the request keeps waiting until its deadline.
        """
        ...


class StaticScaler:
    """Static-endpoints mode: replicas are not ours to start, so waiting is all we can do."""

    async def ensure_replica(self, model: str) -> None:
        return None
