"""The replica rules both runtimes follow: desired count, deletion order, the rollout step.

Level-triggered: a step depends only on the Model and the replicas that exist now, so re-running
it after a crash, a missed event or a conflict is always safe. A runtime describes each of its
replicas (a Pod, a local process) as a `ReplicaState` and acts on the `ReplicaStep` it gets back;
starting, stopping and watching replicas stay the runtime's business.

Rules (KubeAI's, with its rollout made strict about capacity):
- desired replicas = a runtime override (the local runtime's autoscaled count), else
  spec.replicas, else minReplicas, clamped to [minReplicas, maxReplicas];
- failed replicas are deleted and replaced;
- a rollout (a replica not running the expected spec) adds up to `surge` new replicas, deletes
  outdated replicas that are not ready at once (they serve nothing), and deletes a ready outdated
  one only while the ready count stays >= desired, i.e. once a new replica is ready in its place;
- scale-down deletes in KubeAI's order: not ready, then unscheduled, then outdated, then youngest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from lb.model import Model

T = TypeVar("T")
JUST_CREATED = float("inf")  # `created` of a replica without a creation time: the youngest


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What the rules need to know of one live replica (not already being deleted)."""

    ready: bool
    current: bool  # runs the expected spec (a Pod's pod-hash, a process's launch hash)
    created: float  # seconds on any clock the runtime keeps consistent; JUST_CREATED if unknown
    scheduled: bool = True  # placed on a node (local processes always are)
    failed: bool = False  # stopped for good: it will not serve again


@dataclass(slots=True)
class ReplicaStep(Generic[T]):
    """Replicas to delete, each with the reason, in order; then how many to create."""

    to_delete: list[tuple[T, str]] = field(default_factory=list)
    create: int = 0


def desired_replicas(model: Model, override: int | None = None) -> int:
    """`override`, else spec.replicas, else minReplicas (autoscaling not yet run), clamped."""
    spec = model.spec
    wanted = override if override is not None else spec.replicas
    return spec.clamp_replicas(spec.min_replicas if wanted is None else wanted)


def deletion_order(replicas: Sequence[T], state: Callable[[T], ReplicaState]) -> list[T]:
    """Cheapest to lose first: not ready, unscheduled, outdated, youngest."""
    def key(replica: T) -> tuple[bool, bool, bool, float]:
        s = state(replica)
        return s.ready, s.scheduled, s.current, -s.created
    return sorted(replicas, key=key)


def replica_step(replicas: Sequence[T], state: Callable[[T], ReplicaState], desired: int,
                 surge: int) -> ReplicaStep[T]:
    """The next step towards `desired` current ready replicas without lowering ready capacity.

    `replicas` are the live ones; a runtime leaves out those it is already deleting.
    """
    step: ReplicaStep[T] = ReplicaStep()
    failed = [r for r in replicas if state(r).failed]
    step.to_delete += [(r, "failed") for r in failed]
    live = [r for r in replicas if not state(r).failed]
    current = deletion_order([r for r in live if state(r).current], state)
    outdated = deletion_order([r for r in live if not state(r).current], state)
    step.to_delete += [(r, "outdated and not ready") for r in outdated if not state(r).ready]
    outdated_ready = [r for r in outdated if state(r).ready]
    excess, replaced, step.create = _rollout(current, outdated_ready, desired, surge,
                                             lambda r: state(r).ready)
    step.to_delete += [(r, "scale down") for r in excess]
    step.to_delete += [(r, "outdated, replaced by a ready replica") for r in replaced]
    return step


def _rollout(current: Sequence[T], outdated_ready: Sequence[T], desired: int, surge: int,
                 ready: Callable[[T], bool]) -> tuple[list[T], list[T], int]:
    """The scale and rollout rule.

    `current`: up-to-date replicas, cheapest to lose first; `outdated_ready`: the outdated ready
    ones. Returns (up-to-date replicas beyond `desired`, outdated ones the ready count can spare,
    how many to create within the surge).
    """
    excess = max(0, len(current) - desired)
    kept = current[excess:]
    ready_count = sum(1 for r in kept if ready(r)) + len(outdated_ready)
    removable = min(len(outdated_ready), max(0, ready_count - desired))
    remaining_old = len(outdated_ready) - removable
    create = min(desired - len(kept), desired + surge - len(kept) - remaining_old)
    return list(current[:excess]), list(outdated_ready[:removable]), max(0, create)
