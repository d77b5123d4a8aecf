"""Reading the models file of `kvgate up`: Model manifests (the CRD's schema), several per file.

Errors point at a line: `models.yaml:14: model chat: spec.minReplicas: must be <= maxReplicas`.
The YAML is composed once into nodes (which keep their source positions) and the validation
error's field path (`spec.adapters[0].name`) is walked down those nodes to find the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from lb.model import Model, ModelValidationError


class ManifestError(ValueError):
    """A models file that cannot be used; the message starts with `path:line:`."""


@dataclass(frozen=True, slots=True)
class ModelsFile:
    path: Path
    models: tuple[Model, ...]

    @property
    def base_dir(self) -> Path:
        """Relative file:// urls are relative to the models file, not to the working directory."""
        return self.path.resolve().parent


def read_models_file(path: str | Path) -> ModelsFile:
    """Read and validate; blocking, so the runtime calls it in a thread."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text") from None
    return ModelsFile(path, parse_models(text, str(path)))


def parse_models(text: str, label: str = "<models>") -> tuple[Model, ...]:
    try:
        nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}:" if mark else ""
        raise ManifestError(f"{label}:{line} not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{label}: not valid YAML: {exc}") from None
    models: list[Model] = []
    seen: dict[str, int] = {}
    for node in nodes:
        if node is None or _is_empty(node):
            continue
        model = _model(node, label)
        line = _line(node, "metadata.name")
        if model.name in seen:
            raise ManifestError(f"{label}:{line}: metadata.name: model {model.name} is defined twice "
                                f"(first at line {seen[model.name]})")
        seen[model.name] = line
        models.append(model)
    return tuple(models)


def _is_empty(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _model(node: yaml.Node, label: str) -> Model:
    data = yaml.SafeLoader("").construct_document(node)
    name = (data.get("metadata") or {}).get("name") if isinstance(data, dict) else None
    try:
        return Model.from_dict(data)
    except ModelValidationError as exc:
        who = f"model {name}: " if isinstance(name, str) else ""
        raise ManifestError(f"{label}:{_line(node, exc.field)}: {who}{exc}") from None


_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _line(node: yaml.Node, field: str) -> int:
    """1-based line of the deepest key on `field`'s path (the document's start if none)."""
    current, line = node, node.start_mark.line
    for key, index in _TOKEN.findall(field):
        found = _child(current, key, int(index) if index else None)
        if found is None:
            break
        mark_node, current = found
        line = mark_node.start_mark.line
    return line + 1


def _child(node: yaml.Node, key: str, index: int | None) -> tuple[yaml.Node, yaml.Node] | None:
    """(node whose line to report, node to descend into) for one step of a field path."""
    if index is not None:
        if isinstance(node, yaml.SequenceNode) and index < len(node.value):
            return node.value[index], node.value[index]
        return None
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return k, v
    return None


def diff_models(old: dict[str, Model], new: tuple[Model, ...]) -> tuple[list[Model], list[Model], list[str]]:
    """(added, changed, removed names) between the running models and a re-read file."""
    new_by_name = {m.name: m for m in new}
    added = [m for m in new if m.name not in old]
    changed = [m for m in new if m.name in old and old[m.name] != m]
    removed = [name for name in old if name not in new_by_name]
    return added, changed, removed

