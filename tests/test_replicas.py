"""The replica rules shared by both runtimes (`lb_operator.replicas`): the desired count, the
deletion order and the rollout step, on plain values and through the local runtime's processes
(the Pods' side is in test_kube_pod_plan.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lb.model import Model
from lb_operator.local.processes import ReplicaProcess
from lb_operator.local.runtime import plan_replicas
from lb_operator.replicas import ReplicaState, deletion_order, desired_replicas, replica_step


@dataclass(frozen=True)
class R:
    """A replica as any runtime could describe it."""

    name: str
    ready: bool = True
    current: bool = True
    created: float = 0.0
    scheduled: bool = True
    failed: bool = False


def state(r: R) -> ReplicaState:
    return ReplicaState(r.ready, r.current, r.created, r.scheduled, r.failed)


def model(**spec: object) -> Model:
    return Model.from_dict({"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": "m"},
                            "spec": {"url": "hf://org/repo", "engine": "VLLM",
                                     "features": ["TextGeneration"], **spec}})


@pytest.mark.parametrize("spec, override, expected", [
    ({"minReplicas": 1}, None, 1),  # replicas unset: minReplicas
    ({"minReplicas": 1, "replicas": 3}, None, 3),
    ({"minReplicas": 1, "replicas": 3}, 2, 2),  # a runtime override wins over the spec
    ({"minReplicas": 1, "maxReplicas": 4}, 9, 4),  # clamped
    ({"minReplicas": 2}, 0, 2),
])
def test_desired_replicas(spec: dict[str, object], override: int | None, expected: int) -> None:
    assert desired_replicas(model(**spec), override) == expected


def test_deletion_order_is_not_ready_unscheduled_outdated_youngest() -> None:
    replicas = [R("old-current", created=1), R("young-current", created=3), R("outdated", current=False),
                R("unscheduled", ready=False, scheduled=False), R("not-ready", ready=False)]
    assert [r.name for r in deletion_order(replicas, state)] == [
        "unscheduled", "not-ready", "outdated", "young-current", "old-current"]


def test_step_replaces_failed_and_unready_outdated_at_once() -> None:
    replicas = [R("failed", failed=True), R("stale", ready=False, current=False), R("ok")]
    step = replica_step(replicas, state, desired=2, surge=1)
    assert [(r.name, why) for r, why in step.to_delete] == [
        ("failed", "failed"), ("stale", "outdated and not ready")]
    assert step.create == 1


# -- through the local runtime's processes ---------------------------------------------------


def replica(i: int, hash_: str, state: str = "ready") -> ReplicaProcess:
    r = ReplicaProcess(name=f"r{i}", model="m", host="127.0.0.1", port=1000 + i,
                       launch_hash=hash_, log_path=Path("x"), state=state)
    r.created = float(i)
    return r


def test_scale_up_and_down() -> None:
    assert plan_replicas(3, "h", []) == ([], 3)
    old, young = replica(1, "h"), replica(2, "h")
    starting = replica(3, "h", "starting")
    stop, create = plan_replicas(1, "h", [old, young, starting])
    assert stop == [starting, young] and create == 0  # not ready first, then the youngest


def test_rollout_surges_by_one_and_keeps_ready_capacity() -> None:
    olds = [replica(i, "old") for i in range(3)]
    assert plan_replicas(3, "new", olds) == ([], 1)  # one new replica, nothing stopped yet
    new = replica(10, "new", "starting")
    assert plan_replicas(3, "new", olds + [new]) == ([], 0)  # wait for it to be ready
    new.state = "ready"
    stop, create = plan_replicas(3, "new", olds + [new])
    # One old replica goes now that a new one can take its place, and the next new one starts:
    # never more than desired + 1 processes, never fewer than desired ready.
    assert len(stop) == 1 and stop[0] in olds and create == 1
    stop[0].stopping = True
    new2 = replica(11, "new", "starting")
    assert plan_replicas(3, "new", olds + [new, new2]) == ([], 0)


def test_outdated_replicas_that_are_not_ready_go_at_once() -> None:
    broken = replica(1, "old", "starting")
    stop, create = plan_replicas(1, "new", [broken])
    assert stop == [broken] and create == 1
