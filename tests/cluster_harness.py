"""Harness for the cluster-mode tests: FakeKube + gateway replicas + a kubelet stand-in.

Everything runs on the test's event loop over real HTTP: the fake API server
(tests/kube_fake.py), each gateway replica (`lb_operator.kube.manager.ClusterOperator` feeding a real
`lb.app.Gateway` served by `lb.server.serve`), and simulated vLLM replicas (kvgate_sim) that the
``Kubelet`` starts for Pods the operator creates. The Kubelet plays the node: it gives a new Pod a
simulator on 127.0.0.1, records the port in the Pod's port annotation (what the operator reads
for the endpoint address), marks it Ready, and stops the simulator once the Pod is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, AsyncIterator, Callable

import openai
import pytest

from aiohttp import web

from kvgate_sim.cluster import Replica
from kvgate_sim.profiles import Profile
from lb.config import config_from_dict
from lb.app import Gateway
from lb.model import GROUP, PLURAL, VERSION
from lb.registry import Registry
from lb.server import bind, serve
from lb_operator.kube.client import KubeApi
from lb_operator.loader import LOADER_PORT_ANNOTATION, AdapterStore, loader_app
from lb_operator.kube.pods import MODEL_LABEL, PORT_ANNOTATION, POD_HASH_LABEL
from lb_operator.kube.manager import ClusterOperator, ClusterOptions
from lb_operator.system_config import SystemConfig, system_config_from_dict
from lb_operator.retry import Backoff
from tests.kube_fake import FakeKube

NS = "default"
GATEWAY_LABELS = {"app.kubernetes.io/name": "kvgate", "app.kubernetes.io/instance": "kvgate"}
MERGE = "application/merge-patch+json"

FAST = ClusterOptions(lease_duration=1.0, renew_deadline=0.6, retry_period=0.1, watch_timeout=5,
                      resync_seconds=5.0, workers=2, backoff=Backoff(initial=0.05, maximum=0.5))


def model_body(name: str, replicas: int | None = 1, *, min_replicas: int = 0,
               max_replicas: int | None = 3, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"url": "hf://org/model", "engine": "VLLM", "features": ["TextGeneration"],
                            "minReplicas": min_replicas, **spec}
    if replicas is not None:
        body["replicas"] = replicas
    if max_replicas is not None:
        body["maxReplicas"] = max_replicas
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Model", "metadata": {"name": name},
            "spec": body}


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


class Kubelet:
    """Starts a simulator for each new model Pod and makes the Pod Ready; stops it when the Pod
    is gone. A Pod with the adapter-loader sidecar also gets a real loader (`loader_app` over a
    per-Pod directory) on its own port. ``ready_delay`` is the time a server takes to start;
    ``profile`` is the simulators' (a small KV cache, a slower clock).

    Every Pod gets its own IP in 127.0.0.0/8 (all of it is loopback on Linux), as a cluster gives
    each Pod its own address: a new Pod's server can never answer on a port a deleted Pod's
    server just freed, while a gateway may still hold the old endpoint for a moment."""

    def __init__(self, kube: FakeKube, *, ready_delay: float = 0.05, namespace: str = NS,
                 profile: Profile | str = "fast") -> None:
        self.kube = kube
        self.profile = profile
        self.ready_delay = ready_delay
        self.namespace = namespace
        self.replicas: dict[str, Replica] = {}  # pod uid -> simulator
        self.loaders: dict[str, web.AppRunner] = {}  # pod uid -> adapter-loader sidecar
        self.paused = False
        self._task: asyncio.Task[None] | None = None
        self._root = ""
        self._pods_started = 0

    async def __aenter__(self) -> "Kubelet":
        self._root = tempfile.mkdtemp(prefix="kubelet-")
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await asyncio.gather(*(r.stop() for r in self.replicas.values()),
                             *(r.cleanup() for r in self.loaders.values()))
        shutil.rmtree(self._root, ignore_errors=True)

    def pods(self, model: str | None = None) -> list[dict[str, Any]]:
        """Model Pods (of one model); gateway Pods are not the node's to run."""
        found = [p for p in self.kube.objects("pods", self.namespace)
                 if MODEL_LABEL in p["metadata"].get("labels", {})]
        return [p for p in found if model is None or p["metadata"]["labels"][MODEL_LABEL] == model]

    async def _loop(self) -> None:
        starting: dict[str, float] = {}
        while True:
            await asyncio.sleep(0.01)
            live = {p["metadata"]["uid"]: p for p in self.pods()}
            for uid in [u for u in self.replicas if u not in live]:
                await self.replicas.pop(uid).stop()
                if uid in self.loaders:
                    await self.loaders.pop(uid).cleanup()
            if self.paused:
                continue
            for uid, pod in live.items():
                if uid in self.replicas or pod["metadata"].get("deletionTimestamp"):
                    continue
                first_seen = starting.setdefault(uid, time.monotonic())
                if time.monotonic() - first_seen >= self.ready_delay:
                    await self._start(pod)

    async def _start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self._pods_started += 1
        ip = f"127.1.{self._pods_started // 250}.{self._pods_started % 250 + 1}"
        replica = await Replica(self.profile, meta["labels"][MODEL_LABEL], host=ip).start()
        self.replicas[meta["uid"]] = replica
        annotations = {PORT_ANNOTATION: str(replica.port)}
        if LOADER_PORT_ANNOTATION in (meta.get("annotations") or {}):
            annotations[LOADER_PORT_ANNOTATION] = str(await self._start_loader(meta["uid"], ip))
        self.kube.patch("pods", meta["name"], {"metadata": {"annotations": annotations}}, self.namespace)
        self.kube.set_pod_ready(meta["name"], self.namespace, ip=ip)

    async def _start_loader(self, uid: str, ip: str) -> int:
        runner = web.AppRunner(loader_app(AdapterStore(os.path.join(self._root, uid))), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, ip, 0).start()
        self.loaders[uid] = runner
        return int(runner.addresses[0][1])


class GatewayReplica:
    """One `kvgate serve` replica in-process: operator + gateway on ephemeral ports (API and
    metrics). ``register_pod`` also creates a Ready Pod for it, labelled as the chart labels its
    Pods, with its metrics port: what the autoscaler discovers and scrapes."""

    def __init__(self, kube: FakeKube, system: SystemConfig | None = None,
                 options: ClusterOptions = FAST, identity: str = "replica",
                 register_pod: bool = False) -> None:
        self.kube = kube
        self.system = system or system_config_from_dict({})
        self.options = dataclasses.replace(options, identity=identity)
        self.identity = identity
        self.register_pod = register_pod
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> "GatewayReplica":
        self.client = self.kube.api_client()
        self.api = KubeApi(self.client)
        self.registry = Registry()
        self.operator = ClusterOperator(self.api, self.registry, self.system, self.options)
        config = config_from_dict({"server": {"logLevel": "warning"},
                                   "queue": {"timeoutSeconds": 15}})
        self.gateway = Gateway(config, self.registry, self.operator.scaler)
        self.operator.metrics = self.gateway.metrics.registry
        sock, metrics_sock = bind("127.0.0.1", 0), bind("127.0.0.1", 0)
        self.port, self.metrics_port = sock.getsockname()[1], metrics_sock.getsockname()[1]
        started = asyncio.Event()
        self._tasks = [asyncio.create_task(serve(self.gateway, sock, metrics_sock, started))]
        await asyncio.wait_for(started.wait(), 10)
        if self.register_pod:
            self._create_pod()
        self._tasks.append(asyncio.create_task(self.operator.run()))
        await asyncio.wait_for(self.operator.wait_synced(), 10)
        return self

    @property
    def pod_name(self) -> str:
        return f"kvgate-{self.identity}"

    @property
    def metrics_address(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def _create_pod(self) -> None:
        self.kube.create("pods", {"metadata": {"name": self.pod_name, "labels": dict(GATEWAY_LABELS)},
                                  "spec": {"containers": [{"name": "kvgate", "image": "kvgate", "ports": [
                                      {"name": "http", "containerPort": self.port},
                                      {"name": "metrics", "containerPort": self.metrics_port}]}]}})
        self.kube.set_pod_ready(self.pod_name, ip="127.0.0.1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def leading(self) -> bool:
        return self.operator.elector.is_leader

    def endpoints(self, model: str) -> dict[str, str]:
        group = self.registry.groups().get(model)
        return {} if group is None else {k: e.address for k, e in group.endpoints.items()}

    async def stop(self, *, release: bool = True) -> None:
        """Stop; ``release=False`` acts as a crash: the Lease is left to expire."""
        if not release:
            async def no_release() -> None:
                return None
            self.operator.elector._release = no_release  # type: ignore[method-assign]
        for task in self._tasks:
            task.cancel()
        async with asyncio.timeout(10):  # a replica that ignores being stopped fails the test
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.register_pod and self.kube.get("pods", self.pod_name) is not None:
            self.kube.delete("pods", self.pod_name)
        await self.client.close()


async def create_model(api: KubeApi, body: dict[str, Any]) -> dict[str, Any]:
    return await api.custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)


async def patch_model(api: KubeApi, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    return await api.custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name, patch,
                                                           _content_type=MERGE)


def pod_hashes(pods: list[dict[str, Any]]) -> set[str]:
    return {p["metadata"]["labels"][POD_HASH_LABEL] for p in pods}


def ready_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (p.get("status") or {}).get("conditions") or ())]



# Fixtures shared by the cluster test modules; each module defines its own `kube` (FakeKube
# options differ) and imports these.

@pytest.fixture
async def api(kube: FakeKube) -> AsyncIterator[KubeApi]:
    async with kube.api_client() as client:
        yield KubeApi(client)


@pytest.fixture
async def kubelet(kube: FakeKube) -> AsyncIterator["Kubelet"]:
    async with Kubelet(kube) as node:
        yield node


@pytest.fixture
async def replica(kube: FakeKube) -> AsyncIterator["GatewayReplica"]:
    node = await GatewayReplica(kube).start()
    yield node
    await node.stop()


def sdk(node: "GatewayReplica") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.url, api_key="unused", max_retries=0, timeout=20)


async def chat(client: openai.AsyncOpenAI, model: str, text: str = "hello") -> str:
    reply = await client.chat.completions.create(model=model, max_tokens=4,
                                                 messages=[{"role": "user", "content": text}])
    return reply.choices[0].message.content or ""
