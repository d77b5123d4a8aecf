"""LoRA adapters through the cluster runtime: `ClusterOperator` loads each Model's adapters onto
its ready replicas (through the loader sidecars) against the fake API server over HTTP, with
simulated vLLM replicas as the model servers and the gateway driven with the openai SDK
(tests/cluster_harness.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import AsyncIterator

import openai
import pytest

from lb.model import GROUP, PLURAL, VERSION
from tests.cluster_harness import (FAST, GatewayReplica, Kubelet, chat, create_model, eventually,
                                   model_body, patch_model, sdk)
from tests.kube_fake import FakeKube

# The simulated kubelet's loader sidecars run on this machine: file:// adapters are theirs to read.
FILE_URLS = dataclasses.replace(FAST, allow_file_urls=True)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5) as server:
        yield server


def loaded_on_servers(kubelet: Kubelet) -> list[set[str]]:
    """What each running simulator has loaded (its server's own LoRA table)."""
    return [set(dict(r.server.lora.items())) if r.server else set() for r in list(kubelet.replicas.values())]


def adapter_source(root: Path, name: str) -> str:
    """A directory holding an adapter's files; its file:// URL (fetched by the loader sidecars)."""
    directory = root / name
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"r": 8}')
    return f"file://{directory}"


async def test_adapters_follow_the_spec_on_every_ready_replica(kube: FakeKube, kubelet: Kubelet,
                                                               tmp_path: Path) -> None:
    node = await GatewayReplica(kube, options=FILE_URLS).start()
    try:
        async with sdk(node) as client:
            await create_model(node.api, model_body("m", replicas=2))
            await eventually(lambda: len(node.endpoints("m")) == 2, what="two endpoints")

            adapters = [{"name": n, "url": adapter_source(tmp_path, n)} for n in ("a1", "a2")]
            await patch_model(node.api, "m", {"spec": {"adapters": adapters}})

            def on_every_server(wanted: set[str], count: int) -> bool:
                loaded = loaded_on_servers(kubelet)
                return len(loaded) == count and all(s == wanted for s in loaded)

            await eventually(lambda: on_every_server({"a1", "a2"}, 2), what="adapters loaded")
            await eventually(lambda: routed(node, "m", {"a1", "a2"}, 2), what="adapters routed")
            assert await chat(client, "m_a1") and await chat(client, "m_a2")
            listed = {m.id for m in (await client.models.list()).data}
            assert {"m", "m_a1", "m_a2"} <= listed

            # A new replica gets them too.
            await patch_model(node.api, "m", {"spec": {"replicas": 3}})
            await eventually(lambda: on_every_server({"a1", "a2"}, 3), what="the new replica loaded")
            await eventually(lambda: routed(node, "m", {"a1", "a2"}, 3), what="three routed")

            # Removed from the spec: unloaded everywhere, no longer served.
            await patch_model(node.api, "m", {"spec": {"adapters": [adapters[0]]}})
            await eventually(lambda: on_every_server({"a1"}, 3), what="a2 unloaded")
            await eventually(lambda: routed(node, "m", {"a1"}, 3), what="a2 unrouted")
            with pytest.raises(openai.NotFoundError):
                await chat(client, "m_a2")
            assert await chat(client, "m_a1")
    finally:
        await node.stop()


async def test_a_deleted_models_failing_adapter_worker_stops(kube: FakeKube, kubelet: Kubelet,
                                                             tmp_path: Path) -> None:
    """A pass that keeps failing is retried while the Model exists, and no longer once it is gone."""
    node = await GatewayReplica(kube, options=FILE_URLS).start()
    try:
        missing = [{"name": "a1", "url": f"file://{tmp_path / 'missing'}"}]  # every fetch fails
        await create_model(node.api, model_body("m", replicas=1, adapters=missing))
        adapters = node.operator.adapters
        assert adapters is not None
        await eventually(lambda: len(node.endpoints("m")) == 1, what="a ready replica")
        passes = adapters.passes
        await eventually(lambda: adapters.passes >= passes + 2, what="a failed pass retried")
        assert ("default", "m") in adapters.workers.active

        await node.api.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "m")
        await eventually(lambda: not adapters.workers.active, timeout=2, what="the worker ended")
        passes = adapters.passes
        await asyncio.sleep(1.5)  # longer than the next retry's delay would have been
        assert adapters.passes == passes and not adapters.workers.active
    finally:
        await node.stop()


def routed(node: GatewayReplica, model: str, adapters: set[str], count: int) -> bool:
    group = node.registry.groups().get(model)
    if group is None or len(group.endpoints) != count:
        return False
    return all(set(e.adapters) == adapters for e in group.endpoints.values())


