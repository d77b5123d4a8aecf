"""Pod planning (`kube.pods.plan_pods`, the shared replica rules on Pods): scaling, KubeAI's
deletion order, recreation, clamping, rollouts, endpoints."""

import copy
import itertools

import pytest

from lb.model import Model
from lb.registry import Endpoint
from lb_operator.kube.endpoints import address_override, endpoints_from_pods
from lb_operator.kube.pods import plan_pods, pod_for_model, replica_state, replica_status
from lb_operator.replicas import deletion_order, desired_replicas
from lb_operator.system_config import system_config_from_dict

CONFIG = system_config_from_dict({})


def model(**spec):
    spec.setdefault("url", "hf://org/repo")
    spec.setdefault("engine", "VLLM")
    spec.setdefault("features", ["TextGeneration"])
    spec.setdefault("autoscalingDisabled", True)
    return Model.from_dict({"apiVersion": "kvgate.dev/v1", "kind": "Model",
                            "metadata": {"name": "m", "namespace": "ns", "annotations": spec.pop("ann", {})},
                            "spec": spec})


class Cluster:
    """A tiny stand-in for the API server's pod store: names, timestamps, readiness set by the test."""

    def __init__(self):
        self.pods: dict[str, dict] = {}
        self.clock = itertools.count(1)

    def apply(self, plan):
        for pod in plan.to_delete:
            del self.pods[pod["metadata"]["name"]]
        for template in plan.to_create:
            pod = copy.deepcopy(template)
            t = next(self.clock)
            pod["metadata"]["name"] = f"{pod['metadata']['generateName']}{t}"
            pod["metadata"]["creationTimestamp"] = f"2024-01-01T00:{t // 60:02d}:{t % 60:02d}Z"
            pod["status"] = {"phase": "Pending", "conditions": []}
            self.pods[pod["metadata"]["name"]] = pod

    def mark_ready(self, name, ip=None):
        pod = self.pods[name]
        pod["status"] = {"phase": "Running", "podIP": ip or f"10.0.0.{len(name) + next(self.clock)}",
                         "conditions": [{"type": "PodScheduled", "status": "True"},
                                        {"type": "Ready", "status": "True"}]}

    def ready_names(self):
        return sorted(n for n, p in self.pods.items() if is_ready(p))

    def list(self):
        return list(self.pods.values())


def is_ready(pod):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def converge(cluster, m, config=CONFIG):
    """Apply plans and mark every pod ready until the plan is empty."""
    for _ in range(50):
        plan = plan_pods(m, config, cluster.list())
        if plan.empty:
            return
        cluster.apply(plan)
        for name in list(cluster.pods):
            cluster.mark_ready(name)
    raise AssertionError("did not converge")


def pod(name, *, hash_="h", ready=True, scheduled=True, created="2024-01-01T00:00:00Z", phase="Running",
        deleting=False, ip="10.0.0.1", labels=None):
    conditions = [{"type": "PodScheduled", "status": "True" if scheduled else "False"}]
    conditions.append({"type": "Ready", "status": "True" if ready else "False"})
    meta = {"name": name, "namespace": "ns", "creationTimestamp": created,
            "labels": {"model": "m", "pod-hash": hash_, **(labels or {})}}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-02T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, "conditions": conditions, "podIP": ip}}


def names(pods):
    return [p["metadata"]["name"] for p in pods]


def current_hash(m):
    return pod_for_model(m, CONFIG)["metadata"]["labels"]["pod-hash"]


# -- desired count -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ({}, 0), ({"minReplicas": 2}, 2), ({"replicas": 5, "maxReplicas": 3}, 3),
    ({"replicas": 1, "minReplicas": 2}, 2), ({"replicas": 4}, 4), ({"replicas": 0}, 0),
])
def test_desired_replicas_clamped(spec, expected):
    assert desired_replicas(model(**spec)) == expected


def test_scale_up_from_zero_creates_identical_pods():
    m = model(replicas=3)
    plan = plan_pods(m, CONFIG, [])
    assert len(plan.to_create) == 3 and not plan.to_delete
    assert plan.to_create[0] == plan.to_create[2] and plan.to_create[0] is not plan.to_create[1]
    assert plan.to_create[0]["metadata"]["labels"]["pod-hash"] == plan.expected_hash


def test_clamped_to_max_when_scaling_up():
    plan = plan_pods(model(replicas=10, maxReplicas=2), CONFIG, [])
    assert len(plan.to_create) == 2 and plan.desired == 2


def test_at_scale_is_a_no_op_and_idempotent():
    m = model(replicas=2)
    cluster = Cluster()
    converge(cluster, m)
    assert len(cluster.pods) == 2
    assert plan_pods(m, CONFIG, cluster.list()).empty
    assert plan_pods(m, CONFIG, cluster.list()).empty


# -- deletion order --------------------------------------------------------------------------------

def test_scale_down_follows_kubeai_deletion_order():
    m = model(replicas=1)
    h = current_hash(m)
    pods = [
        pod("old-ready", hash_="old", created="2024-01-01T00:00:00Z"),
        pod("young", hash_=h, created="2024-01-03T00:00:00Z"),
        pod("oldest", hash_=h, created="2024-01-01T00:00:00Z"),
        pod("unscheduled", hash_=h, ready=False, scheduled=False, created="2024-01-01T00:00:00Z"),
        pod("not-ready", hash_=h, ready=False, scheduled=True, created="2024-01-01T00:00:00Z"),
        pod("middle", hash_=h, created="2024-01-02T00:00:00Z"),
    ]
    order = names(deletion_order(pods, lambda p: replica_state(p, h)))
    assert order == ["unscheduled", "not-ready", "old-ready", "young", "middle", "oldest"]


def test_scale_down_deletes_cheapest_first_and_keeps_oldest_ready():
    m = model(replicas=2)
    h = current_hash(m)
    pods = [pod("a", hash_=h, created="2024-01-01T00:00:00Z"), pod("b", hash_=h, created="2024-01-05T00:00:00Z"),
            pod("c", hash_=h, ready=False), pod("d", hash_=h, created="2024-01-03T00:00:00Z")]
    plan = plan_pods(m, CONFIG, pods)
    assert names(plan.to_delete) == ["c", "b"] and not plan.to_create


def test_pod_without_timestamp_counts_as_youngest():
    h = "h"
    order = deletion_order([pod("old", created="2024-01-01T00:00:00Z"), pod("new", created=None)],
                           lambda p: replica_state(p, h))
    assert names(order) == ["new", "old"]


# -- recreation -----------------------------------------------------------------------------------

def test_deleted_pod_is_recreated():
    m = model(replicas=3)
    cluster = Cluster()
    converge(cluster, m)
    victim = sorted(cluster.pods)[0]
    del cluster.pods[victim]
    plan = plan_pods(m, CONFIG, cluster.list())
    assert len(plan.to_create) == 1 and not plan.to_delete


def test_terminating_pods_are_ignored_and_failed_pods_replaced():
    m = model(replicas=2)
    h = current_hash(m)
    pods = [pod("ok", hash_=h), pod("going", hash_=h, deleting=True), pod("crashed", hash_=h, phase="Failed")]
    plan = plan_pods(m, CONFIG, pods)
    assert names(plan.to_delete) == ["crashed"]  # never re-delete a terminating pod
    assert len(plan.to_create) == 1
    assert replica_status(pods) == {"all": 1, "ready": 1}


def test_scale_to_zero_deletes_everything():
    m = model(replicas=0)
    h = current_hash(m)
    plan = plan_pods(m, CONFIG, [pod("a", hash_=h), pod("b", hash_="old"), pod("c", hash_="old", ready=False)])
    assert sorted(names(plan.to_delete)) == ["a", "b", "c"] and not plan.to_create


# -- rollout ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("replicas", [1, 3])
def test_rollout_step_by_step_never_loses_ready_capacity(replicas):
    old, new = model(replicas=replicas), model(replicas=replicas, args=["--max-model-len=2048"])
    cluster = Cluster()
    converge(cluster, old)
    old_names = set(cluster.pods)
    assert len(cluster.ready_names()) == replicas
    new_hash = current_hash(new)
    for step in range(100):
        plan = plan_pods(new, CONFIG, cluster.list())
        pending = [n for n, p in cluster.pods.items() if not is_ready(p)]
        if plan.empty and not pending:
            break
        for p in plan.to_delete:
            assert p["metadata"]["labels"]["pod-hash"] != new_hash and is_ready(p)
        cluster.apply(plan)
        # Surge of one: never more than desired + 1 pods, and Ready capacity never drops.
        assert len(cluster.pods) <= replicas + 1
        assert len(cluster.ready_names()) >= replicas, f"step {step}: {plan.details}"
        if plan.empty:
            # Waiting on a new pod: the planner must not act until it turns Ready.
            assert len(pending) == 1, "one surge pod at a time"
            cluster.mark_ready(pending[0])
    else:
        raise AssertionError("rollout did not finish")
    assert len(cluster.pods) == replicas and not (set(cluster.pods) & old_names)
    assert all(p["metadata"]["labels"]["pod-hash"] == new_hash for p in cluster.list())
    assert len(cluster.ready_names()) == replicas


def test_rollout_deletes_outdated_not_ready_pods_at_once():
    m = model(replicas=2)
    h = current_hash(m)
    pods = [pod("old-ready", hash_="old"), pod("old-broken", hash_="old", ready=False)]
    plan = plan_pods(m, CONFIG, pods)
    assert names(plan.to_delete) == ["old-broken"]
    # One ready old pod remains: it is kept until two new ones are ready; create 2 (1 to fill + 1 surge).
    assert len(plan.to_create) == 2
    assert all(p["metadata"]["labels"]["pod-hash"] == h for p in plan.to_create)


def test_rollout_keeps_outdated_ready_pod_while_new_one_is_not_ready():
    m = model(replicas=1)
    h = current_hash(m)
    plan = plan_pods(m, CONFIG, [pod("old", hash_="old"), pod("new", hash_=h, ready=False)])
    assert plan.empty
    plan = plan_pods(m, CONFIG, [pod("old", hash_="old"), pod("new", hash_=h)])
    assert names(plan.to_delete) == ["old"] and not plan.to_create


def test_rollout_with_larger_surge():
    config = system_config_from_dict({"modelRollouts": {"surge": 2}})
    m = model(replicas=3)
    plan = plan_pods(m, config, [pod(f"o{i}", hash_="old") for i in range(3)])
    assert len(plan.to_create) == 2 and not plan.to_delete


# -- files, status, endpoints ---------------------------------------------------------------------

def test_plan_carries_files_config_map():
    plan = plan_pods(model(replicas=1, files=[{"path": "/etc/a", "content": "x"}]), CONFIG, [])
    assert plan.config_map["metadata"]["name"] == "model-m-files"
    assert plan_pods(model(replicas=1), CONFIG, []).config_map is None


def test_endpoints_from_ready_pods_with_adapters():
    pods = [
        pod("p1", ip="10.0.0.1", labels={"adapter.kvgate.dev/sql": "abc", "adapter.kvgate.dev/chat": "def"}),
        pod("p2", ip="10.0.0.2", ready=False),
        pod("p3", ip="10.0.0.3", deleting=True),
        pod("p4", ip=None),
        pod("p0", ip="10.0.0.9"),
    ]
    assert endpoints_from_pods(pods) == [
        Endpoint("ns/p0", "10.0.0.9:8000", frozenset()),
        Endpoint("ns/p1", "10.0.0.1:8000", frozenset({"sql", "chat"})),
    ]
    assert [e.address for e in endpoints_from_pods(pods, address_override="127.0.0.1:9000")] == [
        "127.0.0.1:9000", "127.0.0.1:9000"]


def test_address_override_needs_system_permission():
    m = model(ann={"kvgate.dev/model-pod-ip": "127.0.0.1", "kvgate.dev/model-pod-port": "7001"})
    assert address_override(m, CONFIG) is None
    allowed = system_config_from_dict({"allowPodAddressOverride": True})
    assert address_override(m, allowed) == "127.0.0.1:7001"
    assert address_override(model(ann={"kvgate.dev/model-pod-ip": "10.1.1.1"}), allowed) == "10.1.1.1:8000"
    assert address_override(model(), allowed) is None
