"""The fake Kubernetes API server (tests/kube_fake.py), exercised through the real
kubernetes_asyncio client the operator uses."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import aiohttp
import pytest
from kubernetes_asyncio import watch
from kubernetes_asyncio.client import (BatchV1Api, CoordinationV1Api, CoreV1Api, CustomObjectsApi,
                                       V1ConfigMap, V1DeleteOptions, V1ObjectMeta)
from kubernetes_asyncio.client.exceptions import ApiException

from lb.model import GROUP, PLURAL, VERSION
from tests.kube_fake import FakeKube

NS = "default"
MERGE = "application/merge-patch+json"


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
async def api(kube: FakeKube) -> AsyncIterator[Any]:
    async with kube.api_client() as client:
        yield client


def pod(name: str | None = None, labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": labels or {}, **meta}
    if name:
        metadata["name"] = name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"containers": [{"name": "server", "image": "vllm:1"}]}}


def model(name: str, replicas: int = 1) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Model", "metadata": {"name": name},
            "spec": {"url": "hf://org/model", "engine": "VLLM", "features": ["TextGeneration"],
                     "replicas": replicas, "minReplicas": 0, "maxReplicas": 3}}


async def collect(stream: Any, count: int, timeout: float = 5.0, close: bool = True) -> list[dict[str, Any]]:
    """The first ``count`` events of a ``Watch().stream(...)``; closes the Watch unless told not to."""
    events: list[dict[str, Any]] = []

    async def run() -> None:
        async for event in stream:
            events.append(event)
            if len(events) >= count:
                return

    try:
        await asyncio.wait_for(run(), timeout)
    finally:
        if close:
            await stream.close()
    return events


# -- CRUD ----------------------------------------------------------------------------------------


async def test_create_get_list_with_selectors(kube: FakeKube, api: Any) -> None:
    core = CoreV1Api(api)
    created = await core.create_namespaced_pod(NS, pod("a", {"app": "m", "tier": "x"}))
    await core.create_namespaced_pod(NS, pod("b", {"app": "m", "tier": "y"}))
    await core.create_namespaced_pod(NS, pod("c", {"app": "n"}))
    await core.create_namespaced_pod("other", pod("d", {"app": "m"}))
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert int(created.metadata.resource_version) > 0 and created.metadata.generation == 1
    assert created.status.phase == "Pending"

    got = await core.read_namespaced_pod("a", NS)
    assert got.metadata.uid == created.metadata.uid

    async def names(**kw: Any) -> list[str]:
        return [p.metadata.name for p in (await core.list_namespaced_pod(NS, **kw)).items]

    assert await names() == ["a", "b", "c"]
    assert await names(label_selector="app=m") == ["a", "b"]
    assert await names(label_selector="app==m,tier!=x") == ["b"]
    assert await names(label_selector="tier in (x, z)") == ["a"]
    assert await names(label_selector="tier notin (x)") == ["b", "c"]
    assert await names(label_selector="tier") == ["a", "b"]
    assert await names(label_selector="!tier") == ["c"]
    assert await names(field_selector="metadata.name=c") == ["c"]
    assert await names(field_selector="status.phase=Pending,metadata.name!=a") == ["b", "c"]
    everywhere = await core.list_pod_for_all_namespaces(label_selector="app=m")
    assert [(p.metadata.namespace, p.metadata.name) for p in everywhere.items] == [
        ("default", "a"), ("default", "b"), ("other", "d")]
    assert int(everywhere.metadata.resource_version) == kube.resource_version

    page = await core.list_namespaced_pod(NS, limit=2)
    assert len(page.items) == 2 and page.metadata._continue
    rest = await core.list_namespaced_pod(NS, limit=2, _continue=page.metadata._continue)
    assert [p.metadata.name for p in rest.items] == ["c"] and not rest.metadata._continue

    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod("missing", NS)
    assert err.value.status == 404
    with pytest.raises(ApiException) as err:
        await core.list_namespaced_pod(NS, label_selector="app in (")
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:
        await core.list_namespaced_pod(NS, field_selector="spec.bogus=1")
    assert err.value.status == 400


async def test_generate_name_and_conflicts(kube: FakeKube, api: Any) -> None:
    core = CoreV1Api(api)
    first = await core.create_namespaced_pod(NS, pod(generateName="llama-"))
    second = await core.create_namespaced_pod(NS, pod(generateName="llama-"))
    assert first.metadata.name.startswith("llama-") and len(first.metadata.name) == len("llama-") + 5
    assert first.metadata.name != second.metadata.name

    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod(NS, pod(first.metadata.name))
    assert err.value.status == 409 and '"reason":"AlreadyExists"' in err.value.body.replace(" ", "")

    cm = await core.create_namespaced_config_map(NS, V1ConfigMap(metadata=V1ObjectMeta(name="cfg"),
                                                                 data={"k": "1"}))
    cm.data["k"] = "2"
    updated = await core.replace_namespaced_config_map("cfg", NS, cm)
    assert updated.data == {"k": "2"}
    assert int(updated.metadata.resource_version) > int(cm.metadata.resource_version)
    cm.data["k"] = "3"  # cm still carries the old resourceVersion
    with pytest.raises(ApiException) as err:
        await core.replace_namespaced_config_map("cfg", NS, cm)
    assert err.value.status == 409 and "the object has been modified" in err.value.body

    # Invalid objects: 422 Invalid; undecodable bodies: 400.
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod(NS, pod("Bad_Name"))
    assert err.value.status == 422 and '"reason": "Invalid"' in err.value.body
    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod(NS, {"metadata": {"name": "x"}, "spec": {"containers": []}})
    assert err.value.status == 422
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{kube.url}/api/v1/namespaces/{NS}/pods", data=b"{nope") as resp:
            assert resp.status == 400 and (await resp.json())["kind"] == "Status"


async def test_merge_and_json_patch(api: Any) -> None:
    core = CoreV1Api(api)
    await core.create_namespaced_config_map(NS, {"metadata": {"name": "cfg", "labels": {"a": "1"}},
                                                 "data": {"x": "1", "y": "2"}})
    patched = await core.patch_namespaced_config_map(
        "cfg", NS, {"metadata": {"labels": {"b": "2"}}, "data": {"y": None, "z": "3"}},
        _content_type=MERGE)
    assert patched.metadata.labels == {"a": "1", "b": "2"} and patched.data == {"x": "1", "z": "3"}
    patched = await core.patch_namespaced_config_map(
        "cfg", NS, [{"op": "replace", "path": "/data/x", "value": "9"},
                    {"op": "add", "path": "/metadata/annotations", "value": {"k/v": "w"}},
                    {"op": "remove", "path": "/metadata/labels/a"}])
    assert patched.data["x"] == "9" and patched.metadata.annotations == {"k/v": "w"}
    assert patched.metadata.labels == {"b": "2"}
    with pytest.raises(ApiException) as err:  # failing "test" op
        await core.patch_namespaced_config_map("cfg", NS, [{"op": "test", "path": "/data/x", "value": "0"}])
    assert err.value.status == 422
    # Strategic merge (the client's default for dicts on built-ins) merges lists by key.
    await core.create_namespaced_pod(NS, pod("p"))
    sp = await core.patch_namespaced_pod("p", NS, {"spec": {"containers": [{"name": "server",
                                                                            "image": "vllm:2"}]}})
    assert [(c.name, c.image) for c in sp.spec.containers] == [("server", "vllm:2")]
    # A patch carrying a stale resourceVersion conflicts.
    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_config_map("cfg", NS, {"metadata": {"resourceVersion": "1"}},
                                               _content_type=MERGE)
    assert err.value.status == 409
    # Pod specs are immutable except images.
    with pytest.raises(ApiException) as err:
        await core.patch_namespaced_pod("p", NS, {"spec": {"restartPolicy": "Never"}})
    assert err.value.status == 422


async def test_custom_object_patch_needs_a_patch_content_type(kube: FakeKube, api: Any) -> None:
    custom = CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, model("m"))
    # kubernetes_asyncio sends a dict body as application/json-patch+json unless told otherwise;
    # the real API server answers 400 (jsonpatch.Patch must be a list).
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "m", {"spec": {"replicas": 2}})
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "m", {"spec": {"replicas": 2}},
            _content_type="application/strategic-merge-patch+json")
    assert err.value.status == 415
    done = await custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "m",
                                                       {"spec": {"replicas": 2}}, _content_type=MERGE)
    assert done["spec"]["replicas"] == 2 and done["metadata"]["generation"] == 2


async def test_status_subresource_isolation_and_generation(kube: FakeKube, api: Any) -> None:
    custom = CustomObjectsApi(api)
    body = model("m")
    body["status"] = {"replicas": {"all": 5}}
    created = await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    assert "status" not in created and created["metadata"]["generation"] == 1

    # Writing status through /status changes only status, and not the generation.
    created["status"] = {"replicas": {"all": 1, "ready": 0}}
    created["spec"]["replicas"] = 3
    after = await custom.replace_namespaced_custom_object_status(GROUP, VERSION, NS, PLURAL, "m", created)
    assert after["status"] == {"replicas": {"all": 1, "ready": 0}}
    assert after["spec"]["replicas"] == 1 and after["metadata"]["generation"] == 1

    # Writing the main resource ignores status; a spec change bumps the generation.
    after["status"] = {"replicas": {"all": 99}}
    after["spec"]["replicas"] = 2
    main = await custom.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "m", after)
    assert main["status"] == {"replicas": {"all": 1, "ready": 0}}
    assert main["spec"]["replicas"] == 2 and main["metadata"]["generation"] == 2
    # A metadata-only change does not bump the generation.
    labelled = await custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "m", {"metadata": {"labels": {"x": "y"}}}, _content_type=MERGE)
    assert labelled["metadata"]["generation"] == 2
    status = await custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "m", {"status": {"replicas": {"ready": 1}}, "spec": {"replicas": 0}},
        _content_type=MERGE)
    assert status["status"]["replicas"] == {"all": 1, "ready": 1} and status["spec"]["replicas"] == 2

    # Same for pods: a status write via the main resource is ignored.
    core = CoreV1Api(api)
    await core.create_namespaced_pod(NS, pod("p"))
    ignored = await core.patch_namespaced_pod("p", NS, {"status": {"phase": "Running"}})
    assert ignored.status.phase == "Pending"
    ready = kube.set_pod_ready("p", NS, ip="10.0.0.7")
    assert ready["status"]["podIP"] == "10.0.0.7"
    read = await core.read_namespaced_pod_status("p", NS)
    assert read.status.phase == "Running" and read.status.pod_ip == "10.0.0.7"
    assert any(c.type == "Ready" and c.status == "True" for c in read.status.conditions)


async def test_scale_subresource(kube: FakeKube, api: Any) -> None:
    custom = CustomObjectsApi(api)
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, model("m", replicas=1))
    kube.update_status("models", "m", {"replicas": {"all": 1, "ready": 1}})
    scale = await custom.get_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "m")
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 1} and scale["status"]["replicas"] == 1
    patched = await custom.patch_namespaced_custom_object_scale(
        GROUP, VERSION, NS, PLURAL, "m", {"spec": {"replicas": 3}}, _content_type=MERGE)
    assert patched["spec"]["replicas"] == 3
    obj = await custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "m")
    assert obj["spec"]["replicas"] == 3 and obj["metadata"]["generation"] == 2
    patched["spec"]["replicas"] = 0
    replaced = await custom.replace_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "m", patched)
    assert replaced["spec"]["replicas"] == 0
    with pytest.raises(ApiException) as err:  # stale resourceVersion on the Scale
        await custom.replace_namespaced_custom_object_scale(GROUP, VERSION, NS, PLURAL, "m", patched)
    assert err.value.status == 409
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object_scale(
            GROUP, VERSION, NS, PLURAL, "m", {"spec": {"replicas": -1}}, _content_type=MERGE)
    assert err.value.status == 422


async def test_finalizers_deletion_timestamp_and_gc(kube: FakeKube, api: Any) -> None:
    custom = CustomObjectsApi(api)
    core = CoreV1Api(api)
    body = model("m")
    body["metadata"]["finalizers"] = ["kvgate.dev/cleanup"]
    owner = await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Model", "name": "m",
           "uid": owner["metadata"]["uid"], "controller": True}
    await core.create_namespaced_pod(NS, pod("m-0", ownerReferences=[ref]))

    deleting = await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "m")
    assert deleting["metadata"]["deletionTimestamp"]
    still = await custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "m")
    assert still["metadata"]["deletionTimestamp"] and still["metadata"]["generation"] == 2
    assert kube.get("pods", "m-0") is not None  # dependents live until the owner is gone
    with pytest.raises(ApiException) as err:  # no new finalizers on a terminating object
        await custom.patch_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, "m", {"metadata": {"finalizers": ["a", "b"]}}, _content_type=MERGE)
    assert err.value.status == 422

    await custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "m",
                                                {"metadata": {"finalizers": None}}, _content_type=MERGE)
    with pytest.raises(ApiException) as err:
        await custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "m")
    assert err.value.status == 404
    assert kube.objects("pods", NS) == []  # garbage-collected
    # A dependent created after its owner is gone (a reconcile that raced the deletion) is
    # collected too; one with a living owner among its owners is kept.
    await core.create_namespaced_pod(NS, pod("late", ownerReferences=[ref]))
    assert kube.get("pods", "late") is None
    other = await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, model("o"))
    alive = {**ref, "name": "o", "uid": other["metadata"]["uid"], "controller": False}
    await core.create_namespaced_pod(NS, pod("kept", ownerReferences=[ref, alive]))
    assert kube.get("pods", "kept") is not None
    await core.delete_namespaced_pod("kept", NS)

    # Plain deletion, preconditions, propagationPolicy, deletecollection.
    p = await core.create_namespaced_pod(NS, pod("x", {"app": "m"}))
    with pytest.raises(ApiException) as err:
        await core.delete_namespaced_pod("x", NS, body=V1DeleteOptions(
            preconditions={"resourceVersion": "1"}))
    assert err.value.status == 409
    gone = await core.delete_namespaced_pod("x", NS, propagation_policy="Foreground")
    assert gone.metadata.uid == p.metadata.uid
    assert kube.objects("pods") == []
    for name in ("y", "z"):
        await core.create_namespaced_pod(NS, pod(name, {"app": "m"}))
    await core.create_namespaced_pod(NS, pod("keep", {"app": "k"}))
    await core.delete_collection_namespaced_pod(NS, label_selector="app=m")
    assert [o["metadata"]["name"] for o in kube.objects("pods")] == ["keep"]


async def test_leases_jobs_secrets_events(api: Any) -> None:
    coord = CoordinationV1Api(api)
    lease = await coord.create_namespaced_lease(NS, {"metadata": {"name": "kvgate-leader"},
                                                     "spec": {"holderIdentity": "a"}})
    lease.spec.holder_identity = "b"
    await coord.replace_namespaced_lease("kvgate-leader", NS, lease)
    lease.spec.holder_identity = "c"
    with pytest.raises(ApiException) as err:
        await coord.replace_namespaced_lease("kvgate-leader", NS, lease)
    assert err.value.status == 409
    assert (await coord.read_namespaced_lease("kvgate-leader", NS)).spec.holder_identity == "b"

    batch = BatchV1Api(api)
    job = await batch.create_namespaced_job(NS, {"metadata": {"name": "load"}, "spec": {"template": {
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}})
    assert job.metadata.generation == 1
    assert [j.metadata.name for j in (await batch.list_namespaced_job(NS)).items] == ["load"]

    core = CoreV1Api(api)
    secret = await core.create_namespaced_secret(NS, {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    assert secret.data == {"k": "dg=="}
    await core.create_namespaced_event(NS, {"metadata": {"name": "m.1"}, "reason": "Scaled",
                                            "involvedObject": {"kind": "Model", "name": "m"}})
    events = await core.list_namespaced_event(NS, field_selector="involvedObject.name=m")
    assert [e.reason for e in events.items] == ["Scaled"]
    pvc = await core.create_namespaced_persistent_volume_claim(NS, {"metadata": {"name": "cache"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    assert pvc.status.phase == "Pending"


# -- watch ---------------------------------------------------------------------------------------


async def test_watch_events_in_order_with_selectors(kube: FakeKube, api: Any) -> None:
    core = CoreV1Api(api)
    await core.create_namespaced_pod(NS, pod("pre", {"app": "m"}))
    w = watch.Watch()
    stream = w.stream(core.list_namespaced_pod, NS, label_selector="app=m", timeout_seconds=5)
    task = asyncio.create_task(collect(stream, 6))
    await asyncio.sleep(0.1)
    await core.create_namespaced_pod(NS, pod("other", {"app": "n"}))  # filtered out
    await core.create_namespaced_pod(NS, pod("a", {"app": "m"}))
    kube.set_pod_ready("a", NS, "10.0.0.1")
    await core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"app": "gone"}}})  # leaves selector
    await core.patch_namespaced_pod("other", NS, {"metadata": {"labels": {"app": "m"}}})  # enters selector
    await core.delete_namespaced_pod("other", NS)
    events = await task
    await w.close()
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "pre"), ("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a"),
        ("ADDED", "other"), ("DELETED", "other")]
    assert events[2]["object"].status.pod_ip == "10.0.0.1"
    versions = [int(e["object"].metadata.resource_version) for e in events[1:]]
    assert versions == sorted(versions)


async def test_custom_object_watch_resume_and_bookmarks(kube: FakeKube, api: Any) -> None:
    custom = CustomObjectsApi(api)
    first = await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, model("a"))
    await custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, model("b"))
    await custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "a")
    w = watch.Watch()
    stream = w.stream(custom.list_namespaced_custom_object, GROUP, VERSION, NS, PLURAL,
                      resource_version=first["metadata"]["resourceVersion"], timeout_seconds=5,
                      allow_watch_bookmarks=True)
    events = await collect(stream, 3)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events[:2]] == [("ADDED", "b"), ("DELETED", "a")]
    assert events[2]["type"] == "BOOKMARK"
    assert w.resource_version == str(kube.resource_version)
    await w.close()


async def test_watch_resume_after_compaction_gets_410(kube: FakeKube, api: Any) -> None:
    core = CoreV1Api(api)
    created = await core.create_namespaced_pod(NS, pod("a"))
    await core.create_namespaced_pod(NS, pod("b"))
    kube.compact()
    # With timeout_seconds the client raises the 410 at once (it retries once without it).
    w = watch.Watch()
    with pytest.raises(ApiException) as err:
        await collect(w.stream(core.list_namespaced_pod, NS, timeout_seconds=5,
                               resource_version=created.metadata.resource_version), 1)
    assert err.value.status == 410 and "Expired" in err.value.reason
    # On the wire: HTTP 200 and an ERROR event carrying a Status, then the stream ends.
    async with aiohttp.ClientSession() as session:
        url = f"{kube.url}/api/v1/namespaces/{NS}/pods?watch=true&resourceVersion=1"
        async with session.get(url) as resp:
            assert resp.status == 200
            lines = (await resp.read()).decode().splitlines()
    event = json.loads(lines[0])
    assert len(lines) == 1 and event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    # A relist + watch from the list's resourceVersion works.
    listed = await core.list_namespaced_pod(NS)
    w2 = watch.Watch()
    stream = w2.stream(core.list_namespaced_pod, NS, timeout_seconds=5,
                       resource_version=listed.metadata.resource_version)
    task = asyncio.create_task(collect(stream, 1))
    await asyncio.sleep(0.05)
    await core.delete_namespaced_pod("a", NS)
    assert [(e["type"], e["object"].metadata.name) for e in await task] == [("DELETED", "a")]
    await w2.close()


async def test_small_event_window_expires_old_resume_points(api: Any) -> None:
    async with FakeKube(event_window=2) as kube, kube.api_client() as client:
        core = CoreV1Api(client)
        for name in "abcd":
            await core.create_namespaced_pod(NS, pod(name))
        with pytest.raises(ApiException) as err:
            await collect(watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=2,
                                               resource_version="1"), 1)
        assert err.value.status == 410
        events = await collect(watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=2,
                                                    resource_version="2"), 2)
        assert [e["object"].metadata.name for e in events] == ["c", "d"]


async def test_watch_timeout_ends_stream(api: Any) -> None:
    core = CoreV1Api(api)
    w = watch.Watch()
    loop = asyncio.get_running_loop()
    started = loop.time()
    events = [e async for e in w.stream(core.list_namespaced_pod, NS, timeout_seconds=1)]
    assert events == [] and 0.9 <= loop.time() - started < 3


async def test_dropped_watch_stream_ends_the_clients_stream(kube: FakeKube, api: Any) -> None:
    core = CoreV1Api(api)
    await core.create_namespaced_pod(NS, pod("a"))
    w = watch.Watch()
    stream = w.stream(core.list_namespaced_pod, NS, timeout_seconds=30)
    first = await collect(stream, 1, close=False)
    assert first[0]["type"] == "ADDED"
    assert kube.drop_watches(mid_event=True) == 1
    # A truncated chunked body surfaces as an aiohttp payload error out of the Watch.
    with pytest.raises(aiohttp.ClientPayloadError):
        await collect(stream, 1)
    await w.close()
    # Without mid_event the connection is still cut (no terminating chunk).
    w = watch.Watch()
    stream = w.stream(core.list_namespaced_pod, NS, timeout_seconds=30)
    await collect(stream, 1, close=False)
    await asyncio.sleep(0.05)
    kube.drop_watches(mid_event=False)
    with pytest.raises(aiohttp.ClientPayloadError):
        await collect(stream, 1)
    await w.close()
    await asyncio.sleep(0.05)
    assert kube.watch_count == 0


async def test_injected_failures_and_latency(kube: FakeKube, api: Any) -> None:
    core = CoreV1Api(api)
    fault = kube.fail_next(2, 500, method="GET", path="/pods")
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            await core.list_namespaced_pod(NS)
        assert err.value.status == 500 and '"kind": "Status"' in err.value.body
    assert fault.hits == 2
    await core.list_namespaced_pod(NS)
    await core.create_namespaced_pod(NS, pod("a"))  # POST is not matched

    kube.fail_for(0.3, 503, watch=True)
    with pytest.raises(ApiException) as err:
        await collect(watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1), 1)
    assert err.value.status == 503
    await core.read_namespaced_pod("a", NS)  # non-watch requests pass
    await asyncio.sleep(0.35)
    events = await collect(watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1), 1)
    assert events[0]["type"] == "ADDED"

    kube.latency = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    await core.read_namespaced_pod("a", NS)
    assert loop.time() - started >= 0.2
    kube.latency = 0

    assert ("GET", f"/api/v1/namespaces/{NS}/pods/a") in kube.requests
    usage = kube.rbac_usage()
    assert {("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "create")} <= usage


async def test_discovery_and_helpers(kube: FakeKube, api: Any) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/api", "/apis", "/version", "/api/v1", f"/apis/{GROUP}/{VERSION}"):
            async with session.get(kube.url + path) as resp:
                assert resp.status == 200, path
        async with session.get(f"{kube.url}/apis/{GROUP}/{VERSION}") as resp:
            names = {r["name"] for r in (await resp.json())["resources"]}
    assert {PLURAL, f"{PLURAL}/status", f"{PLURAL}/scale"} <= names
    kube.create("models", model("m"))
    assert [o["metadata"]["name"] for o in kube.objects("Model", NS)] == ["m"]
    custom = CustomObjectsApi(api)
    listed = await custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert listed["kind"] == "ModelList" and listed["items"][0]["kind"] == "Model"


async def test_pod_termination_delay() -> None:
    async with FakeKube(pod_termination_delay=0.2) as kube, kube.api_client() as client:
        core = CoreV1Api(client)
        await core.create_namespaced_pod(NS, pod("a"))
        terminating = await core.delete_namespaced_pod("a", NS)
        assert terminating.metadata.deletion_timestamp is not None
        assert kube.get("pods", "a") is not None
        await asyncio.sleep(0.3)
        assert kube.get("pods", "a") is None
