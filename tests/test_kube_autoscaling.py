"""The autoscaler through the cluster runtime: leader only, summing every gateway replica's
metrics, surviving a fail-over, scaling on the replicas' KV-cache usage as the gateway re-exports
it, run by `ClusterOperator` against the fake API server over HTTP with the gateway driven with
the openai SDK (tests/cluster_harness.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import openai
import pytest

from kvgate_sim.profiles import get_profile
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




# A replica with a 1,024-token KV cache (64 blocks of 16) that decodes a token every ~10 ms and
# never ends a reply early: one long request fills half its cache at once and more as it runs.
SMALL_KV = get_profile("fast", num_kv_blocks=64, time_scale=50, natural_output_tokens=100_000)
KV_AUTOSCALING = system_config_from_dict({"modelAutoscaling": {
    "interval": 0.1, "timeWindow": 0.3, "includeEngineWaiting": True, "targetKVCacheUsage": 0.4}})


async def test_kv_cache_usage_scales_a_model_the_request_count_would_not(kube: FakeKube) -> None:
    """One request (targetRequests 100: one replica by count) whose prompt fills the replica's
    KV cache: the gateway's engine scraper reads the usage, the leader's autoscaler reads it off
    the gateway's /metrics and asks for more replicas through the scale subresource; released,
    the usage drops and the model returns to minReplicas."""
    async with Kubelet(kube, profile=SMALL_KV):
        node = await GatewayReplica(kube, KV_AUTOSCALING, identity="g0", register_pod=True).start()
        client = sdk(node)
        request: asyncio.Task[Any] | None = None
        try:
            await eventually(lambda: node.leading, what="leadership")
            await create_model(node.api, model_body("m", replicas=1, min_replicas=1, max_replicas=3,
                                                    targetRequests=100, scaleDownDelaySeconds=1))
            await eventually(lambda: node.endpoints("m"), what="a ready replica")
            request = asyncio.create_task(client.chat.completions.create(
                model="m", max_tokens=500, messages=[{"role": "user", "content": "x" * 1800}]))
            autoscaler = await eventually(lambda: node.operator.autoscaler, what="the autoscaler")
            await eventually(lambda: autoscaler.last_report.kv.get("m", 0) > 0.4, what="KV usage read")
            await eventually(lambda: spec_of(kube, "m").get("replicas", 0) >= 2, what="KV scale-up")
            assert autoscaler.last_report.totals["m"] <= 1  # one request: not the request count
            assert ("patch", "kvgate.dev", "models/scale") in {c[:3] for c in kube.calls}
            await eventually(lambda: len(node.endpoints("m")) >= 2, what="the new replica serving")
            assert spec_of(kube, "m")["replicas"] >= 2  # its empty cache does not undo the scale-up

            await release([request])  # the request ends: its KV blocks are freed
            await eventually(lambda: spec_of(kube, "m").get("replicas") == 1, timeout=15,
                             what="back to minReplicas")
        finally:
            if request is not None:
                await release([request])
            await client.close()
            await node.stop()
