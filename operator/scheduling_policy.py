"""The engine flag behind ``spec.loadBalancing.priorityScheduling``: vLLM's
``--scheduling-policy priority`` (the simulator takes it too), so the engine admits waiting
requests by the ``priority`` the gateway puts on each from its class. Both runtimes add it,
unless the Model's own args already set a policy (theirs wins)."""

from __future__ import annotations

from lb.model import PRIORITY_ENGINES, Model

__all__ = ["scheduling_policy_args", "FLAG"]

FLAG = "--scheduling-policy"


def scheduling_policy_args(model: Model) -> list[str]:
    """``[FLAG, "priority"]`` for a replica of a Model that schedules by priority, else nothing."""
    if not model.spec.load_balancing.priority_scheduling or model.spec.engine not in PRIORITY_ENGINES:
        return []
    if any(arg == FLAG or arg.startswith(FLAG + "=") for arg in model.spec.args):
        return []
    return [FLAG, "priority"]
