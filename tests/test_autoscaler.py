"""The autoscaler over real HTTP: gateway /metrics pages rendered by the gateway's own
GatewayMetrics (with its engine readings as its scraper would leave them), Models, their scale
subresource and the state ConfigMap in the fake API server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from kubernetes_asyncio.client import CustomObjectsApi
from prometheus_client import generate_latest

from lb.engine_metrics import EngineMetricsConfig, EngineReading, EngineScraper
from lb.metrics import GatewayMetrics
from lb.model import GROUP, PLURAL, VERSION, Model
from lb.registry import Endpoint, Registry
from lb_operator.autoscaler import Autoscaler, engine_loads, parse_page, replicas_for
from lb_operator.kube.autoscaling import STATE_KEY, ConfigMapStateStore, ScaleWriter
from lb_operator.kube.client import KubeApi
from lb_operator.state_files import JsonFileStateStore
from lb_operator.system_config import ModelAutoscaling
from tests.kube_fake import FakeKube

NS = "default"
STATE_CM = "autoscaler-state"
NOW = 1000.0  # the gateways' monotonic clock, frozen: readings are as old as a test makes them
STALE = 10.0


class MetricsServer:
    """Serves a /metrics page over HTTP; `gateway()` is one gateway replica's real exposition."""

    def __init__(self, render: Any) -> None:
        self.render = render
        self.runner: web.AppRunner | None = None
        self.address = ""

    @classmethod
    def gateway(cls) -> "MetricsServer":
        """A gateway's real exposition: its request gauges and the engine readings its scraper
        keeps (re-exported while fresh, by the gateway's own staleness rule)."""
        metrics, registry = GatewayMetrics(), Registry()
        scraper = EngineScraper(registry, EngineMetricsConfig(stale_after_seconds=STALE), clock=lambda: NOW)
        metrics.watch_engines(registry.groups, scraper)
        server = cls(lambda: generate_latest(metrics.registry))
        server.metrics, server.registry = metrics, registry  # type: ignore[attr-defined]
        return server

    def active(self, model: str, n: int) -> None:
        self.metrics.active_gauge(model).value = n  # type: ignore[attr-defined]

    def engine(self, model: str, endpoint: str, *, waiting: float = 0, kv: float = 0, age: float = 0) -> None:
        """What this gateway last read of one replica's /metrics, `age` seconds ago."""
        group = self.registry.group(model)  # type: ignore[attr-defined]
        endpoints = {**group.endpoints, endpoint: Endpoint(endpoint, f"{endpoint}:8000")}
        group.update(endpoints.values())
        group.engine[endpoint] = EngineReading(waiting, 0, kv, 0, 0, None, NOW - age)

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


async def test_scaled_from_zero_goes_back_after_the_delay_unless_load_was_seen(env: Env) -> None:
    """examples/local.yaml's sim-tiny, at the default interval (10 s) and window (10 m): the
    readings are the requests in flight at each tick. A request that came and went between two
    ticks was never seen, so the window stays at zero and the replica the request woke goes after
    scaleDownDelaySeconds (30 s: 3 lower readings, i.e. 20-30 s after the scale-up); one seen in
    flight at a tick keeps it until that reading leaves the 10-minute window."""
    env.kube.create("models", model_body(targetRequests=100, replicas=1, scaleDownDelaySeconds=30))
    scaler = env.autoscaler(interval=10, window=600)  # 60 readings
    seen = []
    for _ in range(3):  # the request was served between ticks: nothing in flight at any tick
        await scaler.tick()
        seen.append(env.replicas())
    assert seen == [1, 1, 0]

    env.kube.patch("models", "m1", {"spec": {"replicas": 1}})
    env.load(1, 0, 0)  # one request in flight at this tick
    await scaler.tick()
    env.load(0, 0, 0)
    for _ in range(58):  # the reading is still in the window: the average is above zero
        await scaler.tick()
    assert env.replicas() == 1
    for _ in range(4):  # 60 readings after it, it leaves the window; three lower ones later: zero
        await scaler.tick()
    assert env.replicas() == 0


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


def page(server: MetricsServer) -> str:
    return generate_latest(server.metrics.registry).decode()  # type: ignore[attr-defined]


def test_engine_readings_are_the_max_over_gateways_then_summed_per_model() -> None:
    """Every gateway reads the same replicas: a replica counts once, at its highest reading."""
    a, b = MetricsServer.gateway(), MetricsServer.gateway()
    a.engine("m1", "r1", waiting=2, kv=0.5)
    b.engine("m1", "r1", waiting=3, kv=0.4)  # the same replica, read a moment apart
    a.engine("m1", "r2", waiting=1, kv=0.7)  # only one gateway has read r2 yet
    b.engine("m2", "r3", waiting=4, kv=0.1)
    loads = engine_loads([parse_page(page(a)), parse_page(page(b))])
    assert loads["m1"].waiting == 4  # 3 (max of 2, 3) + 1; summing gateways would say 6
    assert loads["m1"].kv_replicas == 2 and loads["m1"].kv_sum == pytest.approx(1.2)
    assert loads["m1"].kv_mean == pytest.approx(0.6)
    assert (loads["m2"].waiting, loads["m2"].kv_sum, loads["m2"].kv_replicas) == (4, 0.1, 1)


def test_stale_missing_and_bad_engine_readings_are_left_out() -> None:
    gateway = MetricsServer.gateway()
    gateway.engine("m1", "fresh", waiting=1, kv=0.6)
    gateway.engine("m1", "stale", waiting=9, kv=1.0, age=STALE + 1)  # not re-exported by the gateway
    text = page(gateway)
    assert 'endpoint="stale"' not in text and 'endpoint="fresh"' in text
    loads = engine_loads([parse_page(text)])
    assert (loads["m1"].waiting, loads["m1"].kv_sum, loads["m1"].kv_replicas) == (1, 0.6, 1)
    # A page from elsewhere: NaN dropped, a usage above 1 read as 1, unlabelled samples ignored.
    odd = ("# TYPE kvgate_engine_kv_cache_usage gauge\n"
           'kvgate_engine_kv_cache_usage{model="m1",endpoint="x"} NaN\n'
           'kvgate_engine_kv_cache_usage{model="m1",endpoint="y"} 1.5\n'
           'kvgate_engine_kv_cache_usage{model="m1"} 0.9\n')
    assert parse_page(odd).kv == {("m1", "y"): 1.0}


def test_replicas_for_is_blind_to_float_noise() -> None:
    assert replicas_for(3 * 0.7, 0.7) == 3  # 2.1000000000000001 / 0.7 is 3.0000000000000004
    assert replicas_for(1.21, 0.6) == 3 and replicas_for(0, 0.5) == 0


async def test_engine_waiting_from_the_gateways_is_added_when_enabled(env: Env) -> None:
    env.kube.create("models", model_body())
    env.load(1, 0, 0)
    for gateway in env.gateways:  # three gateways, one replica queueing 3: counted once
        gateway.engine("m1", "r1", waiting=3)
    off = env.autoscaler()
    assert (await off.tick()).totals == {"m1": 1}
    on = env.autoscaler(config={"include_engine_waiting": True})
    assert (await on.tick()).totals == {"m1": 4} and env.replicas() == 4


async def test_kv_target_asks_for_replicas_the_request_count_does_not(env: Env) -> None:
    env.kube.create("models", model_body(replicas=2, targetRequests=100, maxReplicas=10))
    env.load(2, 1, 0)  # 3 requests at 100 each: one replica by requests
    env.gateways[0].engine("m1", "r1", kv=0.9)
    env.gateways[1].engine("m1", "r1", kv=0.95)  # max over gateways: 0.95
    env.gateways[2].engine("m1", "r2", kv=0.85)
    off = env.autoscaler(window=1)
    assert (await off.tick()).scaled == {"m1": 1}
    env.kube.patch("models", "m1", {"spec": {"replicas": 2}})
    scaler = env.autoscaler(window=1, config={"target_kv_cache_usage": 0.6})
    report = await scaler.tick()
    # 2 replicas x mean 0.9 = 1.8 replicas' worth of KV in use; at 0.6 each: ceil(3.0) = 3.
    assert report.kv == {"m1": pytest.approx(1.8)} and report.scaled == {"m1": 3} and env.replicas() == 3
    assert scaler.registry.get_sample_value("kvgate_autoscaler_average_kv_cache_usage",
                                            {"model": "m1"}) == pytest.approx(1.8)
    # The new replica reads empty: the sum, not the mean, drives, so the scale-up holds.
    env.gateways[0].engine("m1", "r3", kv=0.0)
    assert (await scaler.tick()).scaled == {} and env.replicas() == 3


async def test_kv_desired_is_clamped_and_averaged_over_the_window(env: Env) -> None:
    env.kube.create("models", model_body(replicas=1, minReplicas=1, maxReplicas=4, scaleDownDelaySeconds=2))
    scaler = env.autoscaler(window=2, config={"target_kv_cache_usage": 0.5})
    for i in range(4):
        env.gateways[0].engine("m1", f"r{i}", kv=1.0)  # 4 full caches ask for 8
    await scaler.tick()
    assert env.replicas() == 4  # clamped to maxReplicas
    for gateway in env.gateways:  # the replicas' readings go stale at every gateway
        gateway.registry.group("m1").engine.clear()  # type: ignore[attr-defined]
    seen = []
    for _ in range(3):
        report = await scaler.tick()
        seen.append(env.replicas())
    assert report.kv == {}  # nothing read: the tick records 0 rather than freezing the last value
    # averages of (4, 0) = 2 -> 4 wanted, then 0 -> min: held for the delay (2 lower readings), then down
    assert seen == [4, 4, 1]
    saved = json.loads(env.kube.get("configmaps", STATE_CM)["data"][STATE_KEY])
    assert saved["models"]["m1"]["kv"] == [0.0, 0.0]
    restored = env.autoscaler(window=2, config={"target_kv_cache_usage": 0.5})
    await restored.restore()
    assert list(restored.windows["m1"].kv) == [0.0, 0.0]


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
