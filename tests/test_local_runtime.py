"""The runtime's hooks for the rest of the control plane, driven in-process against real
simulator processes: set_replicas (the autoscaler), ensure_replica (the gateway's Scaler),
ready hooks and set_adapters (LoRA loading), and the registry it keeps in sync."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lb.model import Model
from lb.registry import Registry
from lb_operator.local.config import LocalConfig
from lb_operator.local.runtime import LocalRuntime, ReplicaView
from tests.local_harness import pid_alive, sim_model


async def until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_hooks_drive_replicas_and_registry(tmp_path: Path) -> None:
    registry = Registry()
    runtime = LocalRuntime(registry, LocalConfig(state_dir=str(tmp_path), grace_period_seconds=5))
    ready: list[ReplicaView] = []

    async def on_ready(model: Model, view: ReplicaView) -> None:
        ready.append(view)
        runtime.set_adapters(model.name, view.name, {"sql"})

    runtime.add_ready_hook(on_ready)
    pids: set[int] = set()
    try:
        runtime.apply(Model.from_dict(sim_model("m", min_replicas=0, max_replicas=3)), tmp_path)
        assert runtime.desired("m") == 0 and registry.group("m").endpoints == {}

        await runtime.ensure_replica("m")  # scale from zero
        await until(lambda: len(registry.group("m").endpoints) == 1)
        await runtime.set_replicas("m", 5)  # clamped to maxReplicas
        assert runtime.desired("m") == 3 and registry.get_model("m").spec.replicas == 5
        await until(lambda: len(registry.group("m").endpoints) == 3)
        await until(lambda: len(ready) == 3 and all(
            e.adapters == {"sql"} for e in registry.group("m").endpoints.values()))
        pids = {r.pid for r in runtime.replicas("m") if r.pid}
        assert {e.address for e in registry.group("m").endpoints.values()} == \
            {r.address for r in runtime.replicas("m")}

        await runtime.set_replicas("m", 0)
        await until(lambda: not registry.group("m").endpoints)
        await until(lambda: not any(pid_alive(p) for p in pids))
    finally:
        await runtime.close()
    assert not any(pid_alive(p) for p in pids)
