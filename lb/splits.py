"""Traffic splits (canary routing): a Model, or one of its adapters, sends a weighted share of the
requests for its name to another name — another Model, or a ``model_adapter`` — instead.

Which side a request lands on is decided per request: by the hash of its session header's value
when it has one (a conversation stays on one side for as long as the weights stay), otherwise by
a low-discrepancy sequence per name (the golden-ratio Weyl sequence), so that any run of N
requests lands within about 1/N of the weights, not the ~1/sqrt(N) of a coin toss. A target that
does not exist (or cannot serve the request's kind) is passed over: the request stays on its
name. The answer keeps the name the client asked for; ``kvgate_split_requests_total`` counts
where requests went.
"""

from __future__ import annotations

import mmh3

from lb.model import Model, Split, split_model_adapter
from lb.registry import Registry

_GOLDEN = 0.6180339887498949  # 1/phi: the Weyl sequence's step, spreading points evenly


class Splitter:
    """The split decisions of one gateway worker: one sequence position per split name."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._turns: dict[str, float] = {}

    def route(self, model: Model, adapter: str, requested: str, session: bytes,
              feature: str) -> tuple[Model, str] | None:
        """The (model, adapter) a request for ``requested`` goes to instead, or None to stay."""
        splits = _splits_of(model, adapter)
        if not splits:
            return None
        point = self._point(requested, session)
        reached = 0.0
        for split in splits:
            reached += split.weight
            if point < reached:
                return self._target(split.to, feature)
        return None

    def _point(self, name: str, session: bytes) -> float:
        """Where this request falls in [0, 100)."""
        if session:
            return mmh3.hash(session, seed=0x5EED, signed=False) % 10_000 / 100
        turn = (self._turns.get(name, 0.0) + _GOLDEN) % 1.0
        self._turns[name] = turn
        return turn * 100

    def _target(self, name: str, feature: str) -> tuple[Model, str] | None:
        model_name, adapter = split_model_adapter(name)
        model = self._registry.get_model(model_name)
        if model is None or feature not in model.spec.features:
            return None
        if adapter and adapter not in {a.name for a in model.spec.adapters}:
            return None
        return model, adapter


def _splits_of(model: Model, adapter: str) -> tuple[Split, ...]:
    if not adapter:
        return model.spec.splits
    for spec in model.spec.adapters:
        if spec.name == adapter:
            return spec.splits
    return ()
