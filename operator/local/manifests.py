"""Reading the models file of `kvgate up`: Model manifests (the CRD's schema), several per file.

Errors point at a line: `models.yaml:14: model chat: spec.minReplicas: must be <= maxReplicas`.
lb.schema's YAML loader records where each key was, and the error's key path
(`spec.adapters[0].name`) is looked up there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lb.model import Model
from lb.schema import Lines, SchemaError, load_yaml_documents, read_text

ManifestError = SchemaError  # a models file that cannot be used; the message starts with `path:line:`


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
    return ModelsFile(path, parse_models(read_text(path), str(path)))


def parse_models(text: str, label: str = "<models>") -> tuple[Model, ...]:
    models: list[Model] = []
    seen: dict[str, int | None] = {}
    for data, lines in load_yaml_documents(text, label):
        if data is None:
            continue
        model = _model(data, lines, label)
        line = lines.of(("metadata", "name"))
        if model.name in seen:
            raise ManifestError("metadata.name", f"model {model.name} is defined twice (first at line "
                                f"{seen[model.name]})", file=label, line=line)
        seen[model.name] = line
        models.append(model)
    return tuple(models)


def _model(data: Any, lines: Lines, label: str) -> Model:
    name = (data.get("metadata") or {}).get("name") if isinstance(data, dict) else None
    try:
        return Model.from_dict(data)
    except SchemaError as err:
        who = f"model {name}" if isinstance(name, str) else ""
        raise err.at(label, lines.of(err.path), who) from None


def diff_models(old: dict[str, Model], new: tuple[Model, ...]) -> tuple[list[Model], list[Model], list[str]]:
    """(added, changed, removed names) between the running models and a re-read file."""
    new_by_name = {m.name: m for m in new}
    added = [m for m in new if m.name not in old]
    changed = [m for m in new if m.name in old and old[m.name] != m]
    removed = [name for name in old if name not in new_by_name]
    return added, changed, removed

