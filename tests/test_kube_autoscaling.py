"""The autoscaler through the cluster runtime: leader only, summing every gateway replica's
metrics, surviving a fail-over, run by `ClusterOperator` against the fake API server over HTTP
with the gateway driven with the openai SDK (tests/cluster_harness.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import openai
import pytest

from lb_operator.system_config import system_config_from_dict
from tests.cluster_harness import (GatewayReplica, Kubelet, chat, create_model, eventually,
                                   model_body, sdk)
from tests.kube_fake import FakeKube

@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5) as server:
        yield server


def spec_of(kube: FakeKube, name: str) -> dict[str, Any]:
    return (kube.get("models", name) or {}).get("spec") or {}


AUTOSCALING = system_config_from_dict({"modelAutoscaling": {"interval": 0.1, "timeWindow": 0.3}})


async def hold(client: openai.AsyncOpenAI, model: str, count: int) -> list[asyncio.Task[Any]]:
    """Requests that stay active: no replica ever becomes Ready, so they wait in the waiting room."""
    return [asyncio.create_task(chat(client, model, f"held {i}")) for i in range(count)]


async def release(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()  # the client disconnects: the gateway drops the request at once
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_autoscaler_sums_gateways_survives_failover_and_scales_back(kube: FakeKube,
                                                                          kubelet: Kubelet) -> None:
    kubelet.paused = True
    nodes = [await GatewayReplica(kube, AUTOSCALING, identity=f"g{i}", register_pod=True).start()
             for i in range(3)]
    clients = [sdk(node) for node in nodes]
    held: list[list[asyncio.Task[Any]]] = [[] for _ in nodes]
    try:
        await eventually(lambda: nodes[0].leading, what="the first replica leads")
        body = model_body("m", replicas=0, min_replicas=0, max_replicas=8, targetRequests=1,
                          scaleDownDelaySeconds=1, adapters=[{"name": "a1", "url": "hf://org/a1"}])
        await create_model(nodes[0].api, body)
        await eventually(lambda: all(n.registry.get_model("m") for n in nodes), what="model everywhere")
        # 1 + 2 + 3 active requests on three gateways, adapter traffic included -> 6 replicas.
        held[0] = await hold(clients[0], "m", 1)
        held[1] = await hold(clients[1], "m_a1", 2)
        held[2] = await hold(clients[2], "m", 2) + await hold(clients[2], "m_a1", 1)
        await eventually(lambda: spec_of(kube, "m").get("replicas") == 6, what="6 replicas")
        autoscaler = nodes[0].operator.autoscaler
        assert autoscaler is not None
        assert set(await autoscaler.gateways()) == {n.metrics_address for n in nodes}
        await asyncio.sleep(0.5)
        assert spec_of(kube, "m")["replicas"] == 6  # steady under steady load
        assert kube.get("configmaps", AUTOSCALING.model_autoscaling.state_config_map_name)
        assert nodes[1].operator.autoscaler is None and nodes[2].operator.autoscaler is None

        # The leader goes away (its request with it); the next leader restores the state.
        await release(held[0])
        await nodes[0].stop()
        new_leader = await eventually(lambda: next((n for n in nodes[1:] if n.leading), None),
                                      what="a new leader")
        successor = await eventually(lambda: new_leader.operator.autoscaler, what="its autoscaler")
        await eventually(lambda: successor.last_report.totals.get("m") == 5.0, what="5 active")
        assert spec_of(kube, "m")["replicas"] >= 5  # no reset to zero after the failover

        # No load: back to minReplicas, but only after scaleDownDelaySeconds.
        await release(held[1] + held[2])
        await eventually(lambda: successor.last_report.totals.get("m") == 0.0, what="no load")
        await asyncio.sleep(0.5)
        assert spec_of(kube, "m")["replicas"] >= 5
        await eventually(lambda: spec_of(kube, "m").get("replicas") == 0, timeout=5, what="scaled to 0")
    finally:
        for tasks in held:
            await release(tasks)
        for client in clients:
            await client.close()
        for node in nodes:
            await node.stop()


