"""The runtime's hooks for the rest of the control plane, driven in-process against real
simulator processes: set_replicas (the autoscaler), ensure_replica (the gateway's Scaler),
ready hooks and set_adapters (LoRA loading), and the registry it keeps in sync."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp

from lb.model import Model
from lb.kv_events import KVEventSubscriber
from lb.registry import Registry
from lb_operator.local.config import LocalConfig, LocalEngine
from lb_operator.local.runtime import LocalRuntime, ReplicaView
from bench.procs import consecutive_free_ports
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


# An engine that reads a file of spec.files: the path comes in the Model's args, its directory in
# its env, both written as KubeAI's Pods see them (/config/...); the content becomes the
# simulator's --model, which its /v1/models reports as `root`.
READS_A_FILE = """
import os, runpy, sys
path = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--root-file="))
assert os.environ["ROOT_DIR"] == os.path.dirname(path), (os.environ["ROOT_DIR"], path)
host, port, name = sys.argv[1:4]
sys.argv = ["kvgate_sim", "--host", host, "--port", port, "--model-name", name,
            "--model", open(path).read().strip(), "--profile", "fast"]
runpy.run_module("kvgate_sim", run_name="__main__")
"""


def model_with_files(content: str) -> Model:
    return Model.from_dict({
        "apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": "f"},
        "spec": {"url": "hf://org/f", "engine": "Sim", "features": ["TextGeneration"],
                 "minReplicas": 1, "args": ["--root-file=/config/root.txt"],
                 "env": {"ROOT_DIR": "/config"}, "resourceProfile": "gpu:1",
                 "files": [{"path": "/config/root.txt", "content": content}]}})


async def test_files_are_written_per_replica_and_the_engine_is_pointed_at_them(
        tmp_path: Path, caplog: Any) -> None:
    engine = LocalEngine(command=("{python}", "-c", READS_A_FILE, "{host}", "{port}", "{name}"))
    runtime = LocalRuntime(Registry(), LocalConfig(state_dir=str(tmp_path), grace_period_seconds=5,
                                                   engines={"Sim": engine}))
    session = aiohttp.ClientSession()

    async def roots() -> set[str]:
        found = set()
        for replica in runtime.replicas("f"):
            if replica.ready:
                async with session.get(f"http://{replica.address}/v1/models") as response:
                    found.add((await response.json())["data"][0]["root"])
        return found

    try:
        with caplog.at_level(logging.WARNING, logger="lb_operator.local.runtime"):
            runtime.apply(model_with_files("first\n"), tmp_path)
            runtime.apply(model_with_files("first\n"), tmp_path)
        warnings = [r.getMessage() for r in caplog.records if "ignored in local mode" in r.getMessage()]
        assert len(warnings) == 1 and "spec.resourceProfile" in warnings[0]
        await until(lambda: any(r.ready for r in runtime.replicas("f")))
        assert await roots() == {"first"}
        written = tmp_path / "logs" / "f" / "f-1.files" / "config" / "root.txt"
        assert written.read_text() == "first\n"

        # New content rolls the replicas; each new one reads its own copy.
        runtime.apply(model_with_files("second\n"), tmp_path)
        deadline = asyncio.get_running_loop().time() + 30
        while await roots() != {"second"}:
            assert asyncio.get_running_loop().time() < deadline, "no roll to the new content"
            await asyncio.sleep(0.1)
        assert written.read_text() == "first\n"
        assert (tmp_path / "logs" / "f" / "f-2.files" / "config" / "root.txt").read_text() == "second\n"
    finally:
        await session.close()
        await runtime.close()


async def test_replicas_publish_kv_events_on_ports_offset_by_rank(tmp_path: Path) -> None:
    """A Model with cacheAware.kvEvents: each local replica publishes on the ports + its rank
    and its endpoint says so, so the gateway's subscriber follows every replica (real ZeroMQ
    sockets); a replaced replica takes the freed rank."""
    port = consecutive_free_ports(6)
    replay = port + 3
    manifest = sim_model("m", min_replicas=2, strategy="CacheAware")
    manifest["spec"]["loadBalancing"]["cacheAware"] = {
        "kvEvents": {"port": port, "replayPort": replay, "topic": "kv"}}
    model = Model.from_dict(manifest)
    registry = Registry()
    runtime = LocalRuntime(registry, LocalConfig(state_dir=str(tmp_path), grace_period_seconds=5))
    subscriber = KVEventSubscriber(registry, recheck_seconds=0.1)
    following = asyncio.create_task(subscriber.run())
    try:
        runtime.apply(model, tmp_path)
        await until(lambda: len(registry.group("m").endpoints) == 2, timeout=30)
        endpoints = registry.group("m").endpoints.values()
        assert sorted(e.kv_port_offset for e in endpoints) == [0, 1]
        await until(lambda: all(subscriber.index.trusted(e.key) for e in endpoints), timeout=30)
        targets = subscriber.wanted()
        assert sorted(t.port for t in targets.values()) == [port, port + 1]
        assert sorted(t.replay_port for t in targets.values()) == [replay, replay + 1]

        first = next(e.key for e in endpoints if e.kv_port_offset == 0)
        pid = next(r.pid for r in runtime.replicas("m") if first.endswith(r.name))
        os.kill(pid, signal.SIGKILL)  # a crash: its replacement takes rank 0 again

        def replaced() -> bool:
            group = registry.group("m").endpoints
            return len(group) == 2 and first not in group and sorted(
                e.kv_port_offset for e in group.values()) == [0, 1]
        await until(replaced, timeout=30)
        await until(lambda: all(subscriber.index.trusted(k)
                                for k in registry.group("m").endpoints), timeout=30)
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
        await runtime.close()
