"""RFC 6902 JSON Patch, just enough to let cluster admins adjust generated model Pods.

Own implementation (about 60 lines) rather than a dependency: the operator only patches small
plain-dict manifests it built itself, and the six operations are fully specified by the RFC.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping


class JsonPatchError(ValueError):
    """A patch that does not apply; the message names the operation's index and path."""


def apply_patch(document: Any, operations: Iterable[Mapping[str, Any]]) -> Any:
    """Return a patched deep copy: the input is never modified, and a failed patch changes nothing."""
    doc = copy.deepcopy(document)
    for i, op in enumerate(operations):
        try:
            doc = _apply_one(doc, op)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise JsonPatchError(f"jsonPatches[{i}] {op.get('op')} {op.get('path')!r}: {exc}") from None
    return doc


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError("a JSON pointer starts with '/'")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, *, for_add: bool) -> int:
    if for_add and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise ValueError(f"bad array index {token!r}")
    index = int(token)
    if index > len(container) or (index == len(container) and not for_add):
        raise IndexError(f"array index {index} out of range")
    return index


def _parent(doc: Any, tokens: list[str]) -> Any:
    node = doc
    for token in tokens[:-1]:
        node = node[_index(node, token, for_add=False)] if isinstance(node, list) else node[token]
    return node


def _get(doc: Any, tokens: list[str]) -> Any:
    return _parent(doc, tokens + [""]) if tokens else doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _parent(doc, tokens)
    if isinstance(parent, list):
        parent.insert(_index(parent, tokens[-1], for_add=True), value)
    elif isinstance(parent, dict):
        parent[tokens[-1]] = value
    else:
        raise TypeError("parent is not an object or array")
    return doc


def _remove(doc: Any, tokens: list[str]) -> tuple[Any, Any]:
    if not tokens:
        raise ValueError("cannot remove the whole document")
    parent = _parent(doc, tokens)
    key: Any = _index(parent, tokens[-1], for_add=False) if isinstance(parent, list) else tokens[-1]
    return doc, parent.pop(key)


def _apply_one(doc: Any, op: Mapping[str, Any]) -> Any:
    kind, tokens = op["op"], _pointer(op["path"])
    if kind == "add":
        return _add(doc, tokens, copy.deepcopy(op["value"]))
    if kind == "remove":
        return _remove(doc, tokens)[0]
    if kind == "replace":
        doc, _ = _remove(doc, tokens) if tokens else (doc, None)
        return _add(doc, tokens, copy.deepcopy(op["value"]))
    if kind in ("move", "copy"):
        source = _pointer(op["from"])
        if kind == "move" and tokens[: len(source)] == source and tokens != source:
            raise ValueError("cannot move a value into one of its own children")
        value = _remove(doc, source)[1] if kind == "move" else copy.deepcopy(_get(doc, source))
        return _add(doc, tokens, value)
    if kind == "test":
        if _get(doc, tokens) != op["value"]:
            raise ValueError("test failed: value differs")
        return doc
    raise ValueError(f"unknown op {kind!r}")
