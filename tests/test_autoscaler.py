"""The autoscaler over real HTTP: gateway /metrics pages rendered by the gateway's own
GatewayMetrics, Models, their scale subresource and the state ConfigMap in the fake API server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from kubernetes_asyncio.client import CustomObjectsApi
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from kvgate_sim.cluster import Replica as SimReplica
from lb.metrics import GatewayMetrics
from lb.model import GROUP, PLURAL, VERSION, Model
from lb_operator.autoscaler import Autoscaler
from lb_operator.kube.autoscaling import STATE_KEY, ConfigMapStateStore, ScaleWriter
from lb_operator.kube.client import KubeApi
from lb_operator.state_files import JsonFileStateStore
from lb_operator.system_config import ModelAutoscaling
from tests.kube_fake import FakeKube

NS = "default"
STATE_CM = "autoscaler-state"


class MetricsServer:
    """Serves a /metrics page over HTTP; `gateway()` is one gateway replica's real exposition."""

    def __init__(self, render: Any) -> None:
        self.render = render
        self.runner: web.AppRunner | None = None
        self.address = ""

    @classmethod
    def gateway(cls) -> "MetricsServer":
        metrics = GatewayMetrics()
        server = cls(lambda: generate_latest(metrics.registry))
        server.metrics = metrics  # type: ignore[attr-defined]
        return server

    def active(self, model: str, n: int) -> None:
        self.metrics.active_gauge(model).value = n  # type: ignore[attr-defined]

    async def start(self) -> "MetricsServer":
        async def page(_request: web.Request) -> web.Response:
            return web.Response(body=self.render(), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", page)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def model_body(name: str = "m1", **spec: Any) -> dict[str, Any]:
    spec = {"url": "hf://org/base", "engine": "VLLM", "features": ["TextGeneration"], "targetRequests": 1,
            "minReplicas": 0, "maxReplicas": 10, "scaleDownDelaySeconds": 0, "replicas": 0, **spec}
    return {"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": name}, "spec": spec}


def kube_models(api: Any, namespace: str) -> Callable[[], Awaitable[list[Model]]]:
    """A `models` source listing the namespace's Models through the API on every tick."""
    custom = CustomObjectsApi(api)

    async def models() -> list[Model]:
        listed = await custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        return [Model.from_dict(item) for item in listed.get("items", ())]

    return models


class Env:
    def __init__(self, kube: FakeKube, api: Any, session: aiohttp.ClientSession,
                 gateways: list[MetricsServer]) -> None:
        self.kube, self.api, self.session, self.gateways = kube, api, session, gateways
        self.extra_targets: list[str] = []

    def autoscaler(self, interval: float = 1, window: float = 4, **kwargs: Any) -> Autoscaler:
        """Tests call `tick()` themselves, so the interval only sets window size and delay steps."""
        config = ModelAutoscaling(interval=interval, time_window=window, state_config_map_name=STATE_CM,
                                  **kwargs.pop("config", {}))
        return Autoscaler(config, models=kube_models(self.api, NS),
                          gateways=lambda: [g.address for g in self.gateways] + self.extra_targets,
                          set_replicas=ScaleWriter(KubeApi(self.api), NS),
                          store=kwargs.pop("store", None) or ConfigMapStateStore(KubeApi(self.api), NS, STATE_CM),
                          session=self.session, **kwargs)

    def replicas(self, name: str = "m1") -> int:
        return self.kube.get("models", name)["spec"]["replicas"]

    def load(self, *per_gateway: int, model: str = "m1") -> None:
        for gateway, n in zip(self.gateways, per_gateway):
            gateway.active(model, n)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    gateways = [await MetricsServer.gateway().start() for _ in range(3)]
    try:
        async with FakeKube() as kube, kube.api_client() as api, aiohttp.ClientSession() as session:
            yield Env(kube, api, session, gateways)
    finally:
        for gateway in gateways:
            await gateway.stop()


async def test_three_gateways_summed_with_adapter_traffic_and_a_failing_replica(env: Env) -> None:
    env.kube.create("models", model_body())
    env.gateways[0].active("m1", 1)
    env.gateways[1].active("m1", 2)
    env.gateways[2].active("m1_sql", 3)  # adapter traffic counts toward its base model
    dead = await MetricsServer.gateway().start()
    await dead.stop()  # a gateway replica that no longer answers
    env.extra_targets.append(dead.address)
    scaler = env.autoscaler()
    report = await scaler.tick()
    assert report.totals == {"m1": 6} and report.scaled == {"m1": 6}
    assert env.replicas() == 6  # written through the scale subresource
    assert ("patch", "kvgate.dev", "models/scale") in {c[:3] for c in env.kube.calls}
    assert list(report.failed) == [dead.address]
    assert scaler.registry.get_sample_value("kvgate_autoscaler_scrape_errors_total",
                                            {"target": dead.address}) == 1


async def test_load_drives_zero_to_max_and_back_to_min_after_the_delay(env: Env) -> None:
    env.kube.create("models", model_body(minReplicas=0, maxReplicas=4, scaleDownDelaySeconds=2))
    scaler = env.autoscaler()  # window: 4 readings; delay: 2 consecutive lower readings
    assert env.replicas() == 0
    env.load(4, 3, 3)
    await scaler.tick()
    assert env.replicas() == 4  # ceil(10 / 1) clamped to maxReplicas, at once
    env.load(0, 0, 0)
    seen = []
    for _ in range(4):
        await scaler.tick()
        seen.append(env.replicas())
    # averages 5, 3.3 (still >= 4 wanted), 2.5 (lower: held, 1 of 2), 0 (lower again: scaled down)
    assert seen == [4, 4, 4, 0]


async def test_a_higher_reading_restarts_the_scale_down_delay(env: Env) -> None:
    env.kube.create("models", model_body(replicas=3, scaleDownDelaySeconds=2))
    scaler = env.autoscaler(window=1)  # one reading: the average is the last reading
    seen = []
    for load in (1, 3, 1, 1):
        env.load(load, 0, 0)
        await scaler.tick()
        seen.append(env.replicas())
    assert seen == [3, 3, 3, 1]


async def test_state_survives_a_restart(env: Env) -> None:
    env.kube.create("models", model_body())
    env.load(2, 2, 2)
    first = env.autoscaler()
    for _ in range(4):
        await first.tick()
    assert env.replicas() == 6
    saved = json.loads(env.kube.get("configmaps", STATE_CM)["data"][STATE_KEY])
    assert saved["models"]["m1"]["readings"] == [6, 6, 6, 6]

    # Under load: the restored window keeps the replicas; nothing is written.
    second = env.autoscaler()
    await second.restore()
    assert (await second.tick()).scaled == {} and env.replicas() == 6

    # Without load: the restored average comes down reading by reading, then reaches zero.
    env.load(0, 0, 0)
    third = env.autoscaler()
    await third.restore()
    seen = []
    for _ in range(4):
        await third.tick()
        seen.append(env.replicas())
    assert seen == [5, 3, 2, 0]  # ceil(18/4), ceil(12/4), ceil(6/4), 0


async def test_autoscaling_disabled_and_silence_leave_replicas_alone(env: Env) -> None:
    env.kube.create("models", model_body("fixed", replicas=2, autoscalingDisabled=True))
    env.kube.create("models", model_body("auto", replicas=2))
    scaler = env.autoscaler()
    for gateway in env.gateways:
        await gateway.stop()  # no gateway answers: no reading, rather than "zero load"
    report = await scaler.tick()
    assert report.skipped and len(report.failed) == 3
    assert env.replicas("fixed") == 2 and env.replicas("auto") == 2
    env.gateways[:] = [await MetricsServer.gateway().start()]
    await scaler.tick()
    assert env.replicas("fixed") == 2 and env.replicas("auto") == 0


async def test_engine_waiting_requests_are_added_when_enabled(env: Env) -> None:
    env.kube.create("models", model_body())
    registry = CollectorRegistry()
    Gauge("vllm:num_requests_waiting", "queued", ["model_name"], registry=registry).labels("m1").set(3)
    engine = await MetricsServer(lambda: generate_latest(registry)).start()
    sim = await SimReplica("fast", "m1").start()  # the simulator's real vLLM metrics (nothing queued)
    try:
        env.load(1, 0, 0)
        replicas = {"m1": [engine.address, sim.address]}
        off = env.autoscaler(engine_replicas=replicas.get)
        assert (await off.tick()).totals == {"m1": 1}
        on = env.autoscaler(engine_replicas=replicas.get, config={"include_engine_waiting": True})
        assert (await on.tick()).totals == {"m1": 4} and env.replicas() == 4
    finally:
        await engine.stop()
        await sim.stop()


async def test_run_loop_with_the_local_runtime_seams(tmp_path: Path) -> None:
    """Local wiring: models from memory, replicas into memory, state in a JSON file; the real loop."""
    gateway = await MetricsServer.gateway().start()
    replicas: dict[str, int] = {}

    async def set_replicas(name: str, n: int) -> None:
        replicas[name] = n

    def models() -> list[Model]:
        return [Model.from_dict(model_body(replicas=replicas.get("m1", 0)))]

    store = JsonFileStateStore(tmp_path / "state" / "autoscaler.json")
    config = ModelAutoscaling(interval=0.02, time_window=0.1)
    try:
        async with aiohttp.ClientSession() as session:
            gateway.active("m1", 3)
            scaler = Autoscaler(config, models=models, gateways=lambda: [gateway.address],
                                set_replicas=set_replicas, store=store, session=session)
            task = asyncio.create_task(scaler.run())
            try:
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if replicas.get("m1") == 3 and store.path.exists():
                        break
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert replicas["m1"] == 3
            restored = Autoscaler(config, models=models, gateways=lambda: [gateway.address],
                                  set_replicas=set_replicas, store=store, session=session)
            await restored.restore()
            assert list(restored.windows["m1"].readings)[-1] == 3
    finally:
        await gateway.stop()


async def test_in_process_gateway_metrics_need_no_port() -> None:
    """`kvgate up` with its metrics port disabled: the gateway's own registry is read directly,
    and a source that breaks is a failed scrape like an unreachable replica."""
    metrics = GatewayMetrics()
    metrics.active_gauge("m1").value = 2
    replicas: dict[str, int] = {}

    async def set_replicas(name: str, n: int) -> None:
        replicas[name] = n

    def broken() -> str:
        return "not { an exposition"

    async with aiohttp.ClientSession() as session:
        scaler = Autoscaler(ModelAutoscaling(interval=1, time_window=1),
                            models=lambda: [Model.from_dict(model_body())],
                            gateways=lambda: [lambda: generate_latest(metrics.registry), broken],
                            set_replicas=set_replicas, store=_NullStore(), session=session)
        report = await scaler.tick()
    assert report.totals == {"m1": 2} and replicas == {"m1": 2}
    assert list(report.failed) == ["in-process"]


class _NullStore:
    async def load(self) -> None:
        return None

    async def save(self, state: dict[str, Any]) -> None:
        pass
