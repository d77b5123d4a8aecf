"""LoRA adapters on live replicas, over real HTTP: simulated vLLM servers, real adapter-loader
sidecars (files copied from file:// sources), Pods in the fake Kubernetes API server."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from kvgate_sim.cluster import Replica as SimReplica
from lb.model import Model
from lb.registry import Registry
from lb_operator.loader import LOADER_CONTAINER, LOADER_PORT_ANNOTATION, AdapterStore, loader_app
from lb_operator.adapters import AdapterSync, MemoryRecorder, Replica, StoreFetcher
from lb_operator.kube.client import KubeApi
from lb_operator.kube.adapters import PodRecorder, SidecarFetcher, recorded_adapters, replicas_from_pods
from lb_operator.kube.endpoints import endpoints_from_pods
from lb_operator.kube.pods import ADAPTER_LABEL_PREFIX, PORT_ANNOTATION, POD_HASH_LABEL, pod_for_model
from lb_operator.system_config import system_config_from_dict
from tests.kube_fake import FakeKube

CONFIG = system_config_from_dict({})


def model(adapters: dict[str, str], engine: str = "VLLM") -> Model:
    return Model.from_dict({
        "apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": "m1"},
        "spec": {"url": "hf://org/base", "engine": engine, "features": ["TextGeneration"],
                 "adapters": [{"name": n, "url": u} for n, u in adapters.items()]}})


def adapter_source(root: Path, name: str, rank: int) -> str:
    """A directory holding an adapter's files; returns its file:// URL."""
    directory = root / "sources" / f"{name}-r{rank}"
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(f'{{"r": {rank}}}')
    return f"file://{directory}"


class Node:
    """What one Pod runs: a simulated vLLM server and an adapter-loader sidecar, each on its own port."""

    def __init__(self, root: Path) -> None:
        self.sim = SimReplica("fast", "m1")
        self.store = AdapterStore(root)
        self.runner = web.AppRunner(loader_app(self.store), access_log=None)
        self.loader_port = 0

    async def start(self) -> "Node":
        await self.sim.start()
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.loader_port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        await self.sim.stop()
        await self.runner.cleanup()

    def adapters(self) -> dict[str, str]:
        return dict(self.sim.server.lora.items()) if self.sim.server else {}


class Cluster:
    """Pods in the fake API server, each backed by a Node; the PodRecorder and SidecarFetcher seams."""

    def __init__(self, kube: FakeKube, api: Any, session: aiohttp.ClientSession, root: Path) -> None:
        self.kube, self.root = kube, root
        self.nodes: dict[str, Node] = {}
        self.sync = AdapterSync(session, SidecarFetcher(session), PodRecorder(KubeApi(api)), timeout=5)

    async def add_pod(self, m: Model) -> str:
        node = await Node(self.root / f"node{len(self.nodes)}").start()
        pod = pod_for_model(m, CONFIG)
        pod["metadata"]["annotations"].update({PORT_ANNOTATION: str(node.sim.port),
                                               LOADER_PORT_ANNOTATION: str(node.loader_port)})
        name = self.kube.create("pods", pod)["metadata"]["name"]
        self.kube.set_pod_ready(name, ip="127.0.0.1")
        self.nodes[name] = node
        return name

    def pods(self) -> list[dict[str, Any]]:
        return self.kube.objects("pods")

    async def sync_all(self, m: Model) -> list[Any]:
        return await self.sync.sync(m, replicas_from_pods(self.pods()))

    def labels(self, name: str) -> set[str]:
        labels = self.kube.get("pods", name)["metadata"].get("labels") or {}
        return {k[len(ADAPTER_LABEL_PREFIX):] for k in labels if k.startswith(ADAPTER_LABEL_PREFIX)}


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with FakeKube() as kube, kube.api_client() as api, aiohttp.ClientSession() as session:
        c = Cluster(kube, api, session, tmp_path)
        try:
            yield c
        finally:
            for node in c.nodes.values():
                await node.stop()


async def test_adapters_follow_the_spec_on_every_ready_replica(cluster: Cluster, tmp_path: Path) -> None:
    url_a, url_b = adapter_source(tmp_path, "a", 8), adapter_source(tmp_path, "b", 8)
    m = model({"a": url_a, "b": url_b})
    names = [await cluster.add_pod(m), await cluster.add_pod(m)]

    # Added to the spec: loaded on every replica, from files the sidecar fetched; labels set.
    results = await cluster.sync_all(m)
    assert all(r.ok and r.loaded == {"a": url_a, "b": url_b} for r in results)
    for name in names:
        loaded = cluster.nodes[name].adapters()
        assert set(loaded) == {"a", "b"}
        assert (Path(loaded["a"]) / "adapter_config.json").read_text() == '{"r": 8}'
        assert cluster.labels(name) == {"a", "b"}
        assert recorded_adapters(cluster.kube.get("pods", name)) == {"a": url_a, "b": url_b}

    # Routed: the endpoints the registry gets carry the adapters.
    registry = Registry()
    registry.set_model(m)
    registry.set_endpoints("m1", endpoints_from_pods(cluster.pods()))
    assert all(e.adapters == {"a", "b"} for e in registry.group("m1").endpoints.values())

    # A second pass changes nothing (no API writes, no reloads).
    writes = len(cluster.kube.calls)
    results = await cluster.sync_all(m)
    assert all(r.ok and not r.changed for r in results)
    assert [c for c in cluster.kube.calls[writes:] if c[0] == "patch"] == []

    # Removed from the spec: unloaded, label gone.
    m = model({"a": url_a})
    await cluster.sync_all(m)
    for name in names:
        assert set(cluster.nodes[name].adapters()) == {"a"}
        assert cluster.labels(name) == {"a"}

    # URL changed: reloaded from the new files.
    url_a2 = adapter_source(tmp_path, "a", 16)
    m = model({"a": url_a2})
    await cluster.sync_all(m)
    for name in names:
        path = cluster.nodes[name].adapters()["a"]
        assert (Path(path) / "adapter_config.json").read_text() == '{"r": 16}'
        assert recorded_adapters(cluster.kube.get("pods", name)) == {"a": url_a2}

    # A new replica gets them.
    new = await cluster.add_pod(m)
    assert cluster.labels(new) == set()
    await cluster.sync_all(m)
    assert set(cluster.nodes[new].adapters()) == {"a"} and cluster.labels(new) == {"a"}


async def test_restarted_server_gets_its_adapters_back(cluster: Cluster, tmp_path: Path) -> None:
    m = model({"a": adapter_source(tmp_path, "a", 4)})
    name = await cluster.add_pod(m)
    await cluster.sync_all(m)
    await cluster.nodes[name].sim.restart()  # a container restart: same Pod and labels, no adapters
    assert cluster.nodes[name].adapters() == {} and cluster.labels(name) == {"a"}
    results = await cluster.sync_all(m)
    assert results[0].ok and set(cluster.nodes[name].adapters()) == {"a"}


async def test_a_failing_replica_is_reported_and_the_others_are_synced(cluster: Cluster, tmp_path: Path) -> None:
    m = model({"a": adapter_source(tmp_path, "a", 4), "bad": "file:///nonexistent/adapter"})
    down, up = await cluster.add_pod(m), await cluster.add_pod(m)
    await cluster.nodes[down].sim.stop()
    results = {r.replica.key.split("/")[1]: r for r in await cluster.sync_all(m)}
    assert "listing adapters failed" in results[down].errors[0]
    # On the live replica the good adapter loads; the unfetchable one is reported, not labelled.
    assert results[up].loaded.keys() == {"a"} and "loading bad failed" in results[up].errors[0]
    assert set(cluster.nodes[up].adapters()) == {"a"} and cluster.labels(up) == {"a"}
    assert cluster.labels(down) == set()


async def test_already_loaded_counts_as_loaded(tmp_path: Path) -> None:
    """The server has the adapter (loaded by an earlier operator that crashed before recording)."""
    url = adapter_source(tmp_path, "a", 4)
    recorder = MemoryRecorder()
    async with _sim() as sim, aiohttp.ClientSession() as session:
        fetcher = StoreFetcher(AdapterStore(tmp_path / "store"))
        sync = AdapterSync(session, fetcher, recorder)
        path = await fetcher(Replica("k", sim.address), model({"a": url}).spec.adapters[0])
        await sync.load(sim.address, "a", path)
        await sync.load(sim.address, "a", path)  # vLLM answers 400 "already been loaded": success
        replica = Replica("m1/0", sim.address)
        result = await sync.sync_replica(model({"a": url}), replica)
        assert result.ok and recorder.get("m1/0") == {"a": url}
        assert dict(sim.server.lora.items())["a"] == path
        await sync.unload(sim.address, "gone")  # 404: already what we wanted


@contextlib.asynccontextmanager
async def _sim() -> AsyncIterator[SimReplica]:
    sim = await SimReplica("fast", "m1").start()
    try:
        yield sim
    finally:
        await sim.stop()


async def test_local_runtime_records_in_memory(tmp_path: Path) -> None:
    """The local runtime's wiring: files fetched into a local store, the loaded set kept in memory."""
    url = adapter_source(tmp_path, "a", 4)
    recorder = MemoryRecorder()
    async with _sim() as sim, aiohttp.ClientSession() as session:
        sync = AdapterSync(session, StoreFetcher(AdapterStore(tmp_path / "store")), recorder)
        await sync.sync(model({"a": url}), [Replica("m1/0", sim.address)])
        assert recorder.get("m1/0") == {"a": url} and [n for n, _ in sim.server.lora.items()] == ["a"]
        replica = Replica("m1/0", sim.address, recorder.get("m1/0"))
        await sync.sync(model({}), [replica])
        assert recorder.get("m1/0") == {} and sim.server.lora.items() == []


def test_adapter_loader_sidecar_in_the_pod_and_adapter_changes_do_not_roll_pods() -> None:
    one = pod_for_model(model({"a": "hf://org/a"}), CONFIG)
    two = pod_for_model(model({"a": "s3://bucket/a", "b": "gs://bucket/b"}), CONFIG)
    assert one["metadata"]["labels"][POD_HASH_LABEL] == two["metadata"]["labels"][POD_HASH_LABEL]
    server, loader = one["spec"]["containers"]
    assert loader["name"] == LOADER_CONTAINER and loader["image"] == CONFIG.model_loading.image
    assert {m["mountPath"]: m.get("readOnly", False) for m in server["volumeMounts"]}["/adapters"] is True
    assert {m["mountPath"]: m.get("readOnly", False) for m in loader["volumeMounts"]}["/adapters"] is False
    loader_env = {e["name"] for e in loader["env"]}
    assert {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS"} <= loader_env
    assert one["spec"]["containers"][1] == two["spec"]["containers"][1]
    plain = pod_for_model(model({}), CONFIG)
    assert len(plain["spec"]["containers"]) == 1
    assert LOADER_PORT_ANNOTATION not in plain["metadata"]["annotations"]
