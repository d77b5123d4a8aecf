"""What running the operator against a real kube-apiserver showed, each checked against the fake
API server over HTTP (kubernetes_asyncio), with the gateway driven by the openai SDK:

- model-server Pods get no API token; file:// URLs make a Model invalid in a cluster;
- a Model that cannot run is not listed and a request for it is told why (503);
- a 4xx the API server will keep answering (here the Priority admission plugin's 403) is logged
  with the server's message, reported as a condition and an Event, and not retried at full rate;
- the scale subresource has a selector; a clamped replica count is said so;
- Events for scaling, rollouts, invalid Models, rate-limited per Model, as `kubectl describe
  model` shows them (the real kubectl against the fake);
- an informer's back-off starts over after a healthy watch (the second outage is short too).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import openai
import pytest

from lb_operator.kube.client import KubeApi
from lb_operator.kube.events import EventRecorder
from lb_operator.kube.pods import ENGINE_LABEL, MODEL_LABEL
from lb_operator.kube.watch import Informer
from lb_operator.retry import Backoff
from tests.cluster_harness import (NS, GatewayReplica, Kubelet, chat, create_model, eventually,
                                   model_body, patch_model, ready_pods, sdk)
from tests.cluster_harness import api, kubelet, replica  # noqa: F401  (fixtures)
from tests.kube_fake import FakeKube


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.5, pod_termination_delay=0.2) as server:
        yield server


def conditions(kube: FakeKube, name: str) -> dict[str, dict[str, Any]]:
    status = (kube.get("models", name) or {}).get("status") or {}
    return {c["type"]: c for c in status.get("conditions") or ()}


def events_of(kube: FakeKube, name: str) -> list[dict[str, Any]]:
    """The Events `kubectl describe model <name>` lists: those whose involvedObject is the Model."""
    return [e for e in kube.objects("events", NS)
            if e["involvedObject"]["kind"] == "Model" and e["involvedObject"]["name"] == name]


def reasons(kube: FakeKube, name: str) -> set[str]:
    return {e["reason"] for e in events_of(kube, name)}


async def listed(node: GatewayReplica) -> set[str]:
    async with sdk(node) as client:
        return {m.id async for m in client.models.list()}


async def test_model_server_pods_get_no_api_token(kube: FakeKube, api: KubeApi, kubelet: Kubelet,  # noqa: F811
                                                  replica: GatewayReplica) -> None:  # noqa: F811
    await create_model(api, model_body("m", replicas=1, adapters=[{"name": "a", "url": "hf://o/a"}]))
    (pod,) = await eventually(lambda: kubelet.pods("m"), what="a pod")
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert {c["name"] for c in pod["spec"]["containers"]} == {"server", "adapter-loader"}


@pytest.mark.parametrize("spec", [
    {"url": "file:///models/smollm2.gguf", "engine": "LlamaCpp"},
    {"adapters": [{"name": "sql", "url": "file://adapters/sql"}]},
], ids=["model", "adapter"])
async def test_file_urls_make_a_model_invalid_in_a_cluster(
        kube: FakeKube, api: KubeApi, kubelet: Kubelet, replica: GatewayReplica,  # noqa: F811
        spec: dict[str, Any]) -> None:
    await create_model(api, model_body("m", replicas=1, **spec))
    valid = await eventually(lambda: conditions(kube, "m").get("Valid"), what="Valid condition")
    assert valid["status"] == "False" and "file://" in valid["message"], valid
    assert "not supported in a cluster" in valid["message"]
    await asyncio.sleep(0.3)
    assert kubelet.pods("m") == []
    await eventually(lambda: "PodSpecError" in reasons(kube, "m"), what="a Warning event")


async def test_a_model_that_cannot_run_is_not_listed_and_requests_are_told_why(
        kube: FakeKube, api: KubeApi, kubelet: Kubelet, replica: GatewayReplica) -> None:  # noqa: F811
    await create_model(api, model_body("ok", replicas=1))
    await create_model(api, model_body("broken", replicas=1, resourceProfile="no-such-profile:1"))
    await eventually(lambda: conditions(kube, "broken").get("Valid", {}).get("status") == "False",
                     what="broken marked invalid")
    await eventually(lambda: replica.registry.unavailable("broken"), what="the gateway told")
    assert await listed(replica) == {"ok"}
    async with sdk(replica) as client:
        with pytest.raises(openai.InternalServerError) as raised:
            await chat(client, "broken")
    assert raised.value.status_code == 503
    message = raised.value.body["message"]  # type: ignore[index]
    assert "cannot serve requests" in message and "no-such-profile" in message
    assert kubelet.pods("broken") == []
    # Fixed: listed and served again.
    await patch_model(api, "broken", {"spec": {"resourceProfile": "cpu:1"}})
    await eventually(lambda: "broken" in replica.registry.groups() and
                     replica.registry.get_model("broken") is not None, what="served again")
    assert await listed(replica) == {"ok", "broken"}
    async with sdk(replica) as client:
        assert await chat(client, "broken")


async def test_a_permanent_api_error_is_explained_and_not_retried_until_the_spec_changes(
        kube: FakeKube, api: KubeApi, kubelet: Kubelet, replica: GatewayReplica,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lb_operator")
    await create_model(api, model_body("m", replicas=1, priorityClassName="batch-high"))
    rejected = await eventually(lambda: conditions(kube, "m").get("Reconciled"), what="Reconciled")
    assert rejected["status"] == "False" and rejected["reason"] == "APIRejected"
    assert "403" in rejected["message"] and "no PriorityClass with name batch-high" in rejected["message"]
    await eventually(lambda: "APIRejected" in reasons(kube, "m"), what="a Warning event")
    assert any("no PriorityClass with name batch-high" in r.getMessage() for r in caplog.records)
    attempts = sum(1 for c in kube.calls if c[:3] == ("create", "", "pods"))
    await asyncio.sleep(1.5)  # backoff would have retried ~10 times by now; a resync runs too
    assert sum(1 for c in kube.calls if c[:3] == ("create", "", "pods")) == attempts
    # The class now exists and the spec changes: reconciled at once.
    kube.create("priorityclasses", {"metadata": {"name": "batch-high"}, "value": 100}, namespace=None)
    await patch_model(api, "m", {"spec": {"args": ["--max-model-len=1024"]}})
    await eventually(lambda: ready_pods(kubelet.pods("m")), what="a ready pod")
    await eventually(lambda: conditions(kube, "m")["Reconciled"]["status"] == "True", what="recovered")


async def test_scale_subresource_has_a_selector_and_clamping_is_reported(
        kube: FakeKube, api: KubeApi, kubelet: Kubelet, replica: GatewayReplica) -> None:  # noqa: F811
    await create_model(api, model_body("m", replicas=5, max_replicas=2))
    await eventually(lambda: len(ready_pods(kubelet.pods("m"))) == 2, what="two replicas")
    scale = await eventually(lambda: _selector_of(api), what="a selector on the scale")
    assert scale["status"]["selector"] == f"{MODEL_LABEL}=m,{ENGINE_LABEL}"
    pods = await api.list_pods(NS, label_selector=scale["status"]["selector"])
    assert len(pods["items"]) == 2  # what HPA/KEDA would count
    clamped = conditions(kube, "m")["ReplicasClamped"]
    assert clamped["status"] == "True" and "spec.replicas 5" in clamped["message"]
    assert "maxReplicas" in clamped["message"]
    await eventually(lambda: "ReplicasClamped" in reasons(kube, "m"), what="a Warning event")
    await patch_model(api, "m", {"spec": {"replicas": 2}})
    await eventually(lambda: conditions(kube, "m")["ReplicasClamped"]["status"] == "False",
                     what="clamping over")


async def _selector_of(api: KubeApi) -> dict[str, Any] | None:
    scale = await api.get_model_scale(NS, "m")
    return scale if (scale.get("status") or {}).get("selector") else None


async def test_events_tell_what_happened_to_a_model(kube: FakeKube, api: KubeApi,
                                                    kubelet: Kubelet,  # noqa: F811
                                                    replica: GatewayReplica,  # noqa: F811
                                                    tmp_path: Path) -> None:
    await create_model(api, model_body("m", replicas=1))
    await eventually(lambda: len(ready_pods(kubelet.pods("m"))) == 1, what="one replica")
    await patch_model(api, "m", {"spec": {"replicas": 2}})
    await eventually(lambda: "Scaled" in reasons(kube, "m") and any(
        "1 -> 2" in e["message"] for e in events_of(kube, "m")), what="a Scaled event")
    await patch_model(api, "m", {"spec": {"args": ["--max-model-len=2048"]}})
    await eventually(lambda: {"RollingOut", "RolledOut"} <= reasons(kube, "m"), timeout=20,
                     what="rollout events")
    for event in events_of(kube, "m"):
        assert event["type"] == "Normal" and event["source"]["component"] == "kvgate-operator"
        assert event["involvedObject"]["uid"] == kube.get("models", "m")["metadata"]["uid"]
    # What kubectl asks for: the Events by field selector on the involved object.
    listed_events = await api.core.list_namespaced_event(
        NS, field_selector="involvedObject.kind=Model,involvedObject.name=m")
    assert {e.reason for e in listed_events.items} >= {"Scaled", "RollingOut", "RolledOut"}
    # And kubectl itself, as a user would look.
    described = await kubectl_describe(kube, tmp_path, "model", "m")
    events = described.split("\nEvents:", 1)[1]
    for reason in ("Scaled", "RollingOut", "RolledOut"):
        assert re.search(rf"^\s*Normal\s+{reason}\s+\S+\s+kvgate-operator\s", events, re.M), described


# Installed beside helm by `make helm` (charts/fetch_helm.py --kubectl); KUBECTL names another.
KUBECTL = Path(os.environ.get("KUBECTL") or Path(sys.prefix) / "bin" / "kubectl")


async def kubectl_describe(kube: FakeKube, tmp_path: Path, *what: str) -> str:
    if not KUBECTL.exists():
        pytest.skip(f"{KUBECTL} is missing: `make helm` installs it (or set KUBECTL)")
    config = kube.write_kubeconfig(str(tmp_path / "kubeconfig"))
    proc = await asyncio.create_subprocess_exec(
        str(KUBECTL), "--kubeconfig", config, "describe", *what,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_events_are_aggregated_and_rate_limited_per_model(kube: FakeKube, api: KubeApi) -> None:  # noqa: F811
    now = [0.0]
    recorder = EventRecorder(api, burst=3, refill_seconds=10.0, clock=lambda: now[0])
    model = {"metadata": {"name": "m", "namespace": NS, "uid": "u1"}}
    other = {"metadata": {"name": "n", "namespace": NS, "uid": "u2"}}
    assert await recorder.record(model, "Normal", "Scaled", "replicas 1 -> 2")
    assert await recorder.record(model, "Normal", "Scaled", "replicas 1 -> 2")  # same: count 2
    assert await recorder.record(model, "Warning", "AdapterFailed", "loader answered 502")
    results = [await recorder.record(model, "Warning", "AdapterFailed", f"try {i}") for i in range(5)]
    assert results == [False] * 5 and recorder.dropped == 5
    assert await recorder.record(other, "Normal", "Scaled", "replicas 0 -> 1")  # its own bucket
    now[0] += 10.0  # one token back
    assert await recorder.record(model, "Warning", "AdapterFailed", "try 5")
    assert not await recorder.record(model, "Warning", "AdapterFailed", "try 6")
    counts = {(e["reason"], e["message"]): e["count"] for e in events_of(kube, "m")}
    assert counts == {("Scaled", "replicas 1 -> 2"): 2,
                      ("AdapterFailed", "loader answered 502"): 1,
                      ("AdapterFailed", "try 5"): 1}


async def test_informer_backoff_starts_over_after_a_healthy_watch(kube: FakeKube, api: KubeApi) -> None:  # noqa: F811
    """Two API-server outages minutes apart: the second is met with the shortest delay again,
    not with the delay the first one had grown to."""
    kube.bookmark_interval = 3600.0  # no bookmarks: only real events make a watch healthy
    seen: list[str] = []
    informer = Informer("pods", functools.partial(api.core.list_namespaced_pod, NS),
                        lister=functools.partial(api.list_pods, NS), watch_timeout=300,
                        backoff=Backoff(initial=0.01, maximum=60.0, jitter=False))
    informer.add_handler(lambda etype, obj: seen.append(obj["metadata"]["name"]))
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 10)
        await eventually(lambda: kube.watch_count == 1, what="watching")

        async def outage(pod: str) -> None:
            kube.fail_next(2, 500, watch=True)  # the API server comes back after two attempts
            assert kube.drop_watches(mid_event=True) == 1
            await eventually(lambda: kube.watch_count == 1 and not any(f.active() for f in kube.faults),
                             what="watching again")
            kube.create("pods", {"metadata": {"name": pod},
                                 "spec": {"containers": [{"name": "c", "image": "i"}]}})
            await eventually(lambda: pod in seen, what=f"{pod} seen")

        await outage("first")
        assert informer.failures == 3  # the cut watch, then two refused attempts
        await outage("second")  # the watch had delivered an event: a new count starts
        assert informer.failures == 3, "the second outage grew the first one's back-off"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
