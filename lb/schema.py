"""One decoder from YAML/JSON data to frozen dataclasses, and one error type for every config file.

The dataclasses are the schema: field names give the keys (snake_case -> camelCase, one rule, a
per-field `key` override where a name needs it), type hints give the shapes, field metadata
(`setting(...)`) gives documentation and constraints. The same description feeds the JSON schemas
of the chart (`JsonSchema`), so a field added to a dataclass shows up everywhere at once.

Every problem is a `SchemaError` that names the dotted key path (`server.port`); when the data came
from a YAML file read here, also the file and the line of that key (`config.yaml:12: server.port:
expected an integer, got 'abc'`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
from dataclasses import MISSING, dataclass, field
from functools import cache
from pathlib import Path
from types import NoneType, UnionType
from typing import (Any, Callable, Iterable, Iterator, Literal, Mapping, TypeVar, Union, get_args, get_origin,
                    get_type_hints)

import yaml

T = TypeVar("T")
KeyPath = tuple[str | int, ...]  # a location in the data: mapping keys and list indexes

_META_KEY = "kvgate"
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class SchemaError(ValueError):
    """Data that does not fit its schema, located by key path and, when known, file and line."""

    def __init__(self, path: str | KeyPath, message: str, *, file: str | None = None,
                 line: int | None = None, subject: str = "") -> None:
        self.path: KeyPath = parse_path(path) if isinstance(path, str) else tuple(path)
        self.message = message
        self.file = file
        self.line = line
        self.subject = subject  # what the data describes, e.g. "model chat", when a file holds several
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file and self.line else self.file
        return ": ".join(part for part in (where, self.subject, self.field, self.message) if part)

    @property
    def field(self) -> str:
        """The dotted key path, list indexes in brackets: `spec.adapters[0].name`."""
        return format_path(self.path)

    def under(self, parent: str | KeyPath) -> SchemaError:
        """The same error seen from a container of the data (its path prefixed)."""
        prefix = parse_path(parent) if isinstance(parent, str) else tuple(parent)
        return self._copy(path=prefix + self.path)

    def at(self, file: str, line: int | None, subject: str = "") -> SchemaError:
        """The same error placed in a file; a location already known is kept."""
        return self._copy(file=self.file or file, line=self.line or line, subject=self.subject or subject)

    def _copy(self, **changes: Any) -> SchemaError:
        kwargs = {"file": self.file, "line": self.line, "subject": self.subject, **changes}
        path = kwargs.pop("path", self.path)
        return type(self)(path, self.message, **kwargs)


def parse_path(text: str) -> KeyPath:
    """`a.b[0].c` -> ("a", "b", 0, "c"); keys containing dots need the tuple form instead."""
    return tuple(int(index) if index else key for key, index in _TOKEN.findall(text))


def format_path(path: KeyPath) -> str:
    """("a", "b", 0, "c") -> `a.b[0].c`, the form errors show."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------------------------------------
# Field metadata


@dataclass(frozen=True, slots=True)
class Meta:
    """What a field's type does not say: its documentation, its key if not derived, its bounds.

    The bounds are checked by `decode` and written into the JSON schema; `json` holds further
    JSON-schema keywords for the chart only (the Python side checks those with its own code).
    """

    doc: str = ""
    key: str | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    exclusive_minimum: int | float | None = None
    min_length: int | None = None
    max_length: int | None = None
    max_items: int | None = None
    pattern: str | None = None  # written with ^...$: JSON schema patterns search, Python fullmatches
    json: Mapping[str, Any] = field(default_factory=dict)


def setting(default: Any = MISSING, *, factory: Any = MISSING, meta: type[Meta] = Meta, **kwargs: Any) -> Any:
    """A dataclass field with `Meta` (or a subclass of it, given as `meta`) in its metadata."""
    return field(default=default, default_factory=factory, metadata={_META_KEY: meta(**kwargs)})


def camel(name: str) -> str:
    """The one key rule: `max_body_bytes` -> `maxBodyBytes` (only the first letter of a part changes)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    key: str
    type: Any
    required: bool
    default: Any
    meta: Meta


@cache
def fields_of(cls: type) -> tuple[FieldSpec, ...]:
    """The decoded view of a dataclass's fields, computed once per class."""
    hints = get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(_META_KEY) or Meta()
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        specs.append(FieldSpec(f.name, meta.key or camel(f.name), hints[f.name], default is MISSING, default, meta))
    return tuple(specs)


def keys_of(cls: type) -> frozenset[str]:
    return frozenset(spec.key for spec in fields_of(cls))


# ---------------------------------------------------------------------------------------------
# Decoding

_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
          dict: "a mapping"}


def _show(value: Any) -> str:
    """A value as an error message quotes it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _expected(kind: Any, value: Any, path: KeyPath) -> SchemaError:
    name = _NAMES.get(kind) or getattr(kind, "__name__", str(kind))
    return SchemaError(path, f"expected {name}, got {_show(value)}")


def decode(tp: Any, data: Any, path: str | KeyPath = ()) -> Any:
    """Build a value of type `tp` from plain data (what YAML or JSON gives); SchemaError otherwise."""
    return _decode(tp, data, parse_path(path) if isinstance(path, str) else tuple(path))


def _decode(tp: Any, value: Any, path: KeyPath) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value  # passed through as given (e.g. Kubernetes objects inside a config)
    if origin in (Union, UnionType):
        return _decode_union(args, value, path)
    if dataclasses.is_dataclass(tp):
        return decode_object(tp, value, path)
    if origin is Literal:
        _decode_scalar(type(args[0]), value, path)
        if value not in args:
            raise SchemaError(path, f"must be one of {', '.join(map(str, args))}, got {_show(value)}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _decode_enum(tp, value, path)
    if origin in (tuple, list):
        items = _decode_list(args[0] if args else Any, value, path)
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        return _decode_dict(args[1] if args else Any, value, path)
    return _decode_scalar(tp, value, path)


def _decode_scalar(tp: type, value: Any, path: KeyPath) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise _expected(tp, value, path)
    return value


def _decode_enum(tp: type[enum.Enum], value: Any, path: KeyPath) -> Any:
    try:
        return tp(value)
    except ValueError:
        known = ", ".join(str(member.value) for member in tp)
        raise SchemaError(path, f"must be one of {known}, got {_show(value)}") from None


def _decode_list(item: Any, value: Any, path: KeyPath) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _expected(list, value, path)
    return [_decode(item, v, path + (i,)) for i, v in enumerate(value)]


def _decode_dict(item: Any, value: Any, path: KeyPath) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _expected(dict, value, path)
    out = {}
    for key, v in value.items():
        if not isinstance(key, str):
            raise SchemaError(path, f"keys must be strings, got {_show(key)}")
        out[key] = _decode(item, v, path + (key,))
    return out


def _decode_union(args: tuple[Any, ...], value: Any, path: KeyPath) -> Any:
    """The first option the value decodes to, in declaration order (`str | int | float`)."""
    if value is None and NoneType in args:
        return None
    options = [a for a in args if a is not NoneType]
    if len(options) == 1:
        return _decode(options[0], value, path)
    for option in options:
        try:
            return _decode(option, value, path)
        except SchemaError:
            continue
    names = " or ".join(_NAMES.get(o) or getattr(o, "__name__", str(o)) for o in options)
    raise SchemaError(path, f"expected {names}, got {_show(value)}")


def decode_object(cls: type[T], data: Any, path: str | KeyPath = ()) -> T:
    """A dataclass from a mapping of its keys; a null value means the key is absent."""
    path = parse_path(path) if isinstance(path, str) else tuple(path)
    if not isinstance(data, Mapping):
        raise _expected(dict, data, path)
    specs = fields_of(cls)
    known = [spec.key for spec in specs]
    for key in data:
        if key not in known:
            raise unknown_key(path + (str(key),), known)
    values = {}
    for spec in specs:
        raw = data.get(spec.key)
        if raw is None:
            if spec.required:
                raise SchemaError(path + (spec.key,), "required key is missing")
            continue
        values[spec.name] = _decode(spec.type, raw, path + (spec.key,))
        check_bounds(spec.meta, values[spec.name], path + (spec.key,))
    try:
        return cls(**values)
    except SchemaError as err:  # a check in __post_init__, relative to the object
        raise err.under(path) from None


def unknown_key(path: KeyPath, known: Iterable[str]) -> SchemaError:
    """The error for a key not in `known` (the last part of `path`), with the closest known key."""
    known = sorted(known)
    close = difflib.get_close_matches(str(path[-1]), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return SchemaError(path, f"unknown key{hint} (known: {', '.join(known)})")


def check_bounds(meta: Meta, value: Any, path: str | KeyPath) -> None:
    """The bounds a `Meta` states, on a decoded value (None, an unset optional, passes)."""
    if value is None:
        return
    if meta.min_length == 1 and not value:
        raise SchemaError(path, "must not be empty")
    size = len(value) if isinstance(value, (str, tuple, list, dict)) else None
    checks = (  # (bound, holds, message, what the message quotes)
        (meta.minimum, lambda m: value >= m, "must be >= {}", value),
        (meta.maximum, lambda m: value <= m, "must be <= {}", value),
        (meta.exclusive_minimum, lambda m: value > m, "must be > {}", value),
        (meta.min_length, lambda m: size >= m, "must be at least {} characters", size),
        (meta.max_length, lambda m: size <= m, "must be at most {} characters", size),
        (meta.max_items, lambda m: size <= m, "must have at most {} items", size),
        (meta.pattern, lambda p: re.fullmatch(p, value) is not None, "must match {}", value),
    )
    for bound, holds, message, got in checks:
        if bound is not None and not holds(bound):
            raise SchemaError(path, f"{message.format(bound)}, got {_show(got)}")


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class Lines:
    """Where each key and list item of one YAML document was, to put a line on an error's path."""

    def __init__(self, root: Any, marks: dict[int, Any]) -> None:
        self._root = root
        self._marks = marks  # id(mapping) -> {key: line}; id(list) -> [line per item]

    def of(self, path: KeyPath) -> int | None:
        """The line of the deepest key on `path` that is in the document; the first key's if none."""
        node, line = self._root, self._first()
        for part in path:
            marks = self._marks.get(id(node))
            try:
                line, node = marks[part], node[part]
            except (KeyError, IndexError, TypeError):
                break
        return line

    def _first(self) -> int | None:
        marks = self._marks.get(id(self._root))
        if isinstance(marks, dict):
            return min(marks.values(), default=None)
        return marks[0] if marks else None


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that also records the line of every mapping key and list item it builds."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.key_lines: dict[int, Any] = {}

    def _map(self, node: yaml.MappingNode) -> Iterator[dict[Any, Any]]:
        data: dict[Any, Any] = {}
        yield data
        data.update(self.construct_mapping(node))  # also flattens `<<` merges into node.value
        self.key_lines[id(data)] = {self.construct_object(k): k.start_mark.line + 1 for k, _ in node.value}

    def _seq(self, node: yaml.SequenceNode) -> Iterator[list[Any]]:
        data: list[Any] = []
        yield data
        data.extend(self.construct_sequence(node))
        self.key_lines[id(data)] = [item.start_mark.line + 1 for item in node.value]


_LineLoader.add_constructor("tag:yaml.org,2002:map", _LineLoader._map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _LineLoader._seq)


def load_yaml_documents(text: str, label: str) -> list[tuple[Any, Lines]]:
    """Every document of a YAML stream with its line table; SchemaError (with a line) if not YAML."""
    loader = _LineLoader(text)
    try:
        docs = []
        while loader.check_data():
            data = loader.get_data()
            docs.append((data, Lines(data, loader.key_lines)))
        return docs
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise SchemaError((), f"not valid YAML: {exc.problem or exc}", file=label,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise SchemaError((), f"not valid YAML: {exc}", file=label) from None
    finally:
        loader.dispose()


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SchemaError((), f"cannot read: {exc.strerror}", file=str(path)) from None
    except UnicodeDecodeError:
        raise SchemaError((), "not UTF-8 text", file=str(path)) from None


def read_yaml(path: str | Path, build: Callable[[Any], T]) -> T:
    """Read one YAML document and `build` it; any SchemaError names the file and the key's line."""
    docs = load_yaml_documents(read_text(path), str(path))
    if len(docs) > 1:
        raise SchemaError((), "expected one YAML document, got several", file=str(path))
    data, lines = docs[0] if docs else (None, Lines(None, {}))
    try:
        return build({} if data is None else data)
    except SchemaError as err:
        raise err.at(str(path), lines.of(err.path)) from None


# ---------------------------------------------------------------------------------------------
# JSON schema


class JsonSchema:
    """The JSON schema of a dataclass tree, from the same fields, types and `Meta` that `decode` reads.

    Subclasses add their dialect's keywords (the Model CRD's Kubernetes extensions); `closed`
    objects refuse unknown keys as `decode` does (helm's values schema; a CRD prunes them instead).
    """

    _TYPES = {str: "string", bool: "boolean", int: "integer", float: "number"}
    _BOUNDS = {"minimum": "minimum", "maximum": "maximum", "exclusive_minimum": "exclusiveMinimum",
               "min_length": "minLength", "max_length": "maxLength", "max_items": "maxItems", "pattern": "pattern"}

    def __init__(self, *, closed: bool = False) -> None:
        self.closed = closed

    def of(self, tp: Any) -> dict[str, Any]:
        origin, args = get_origin(tp), get_args(tp)
        options = [a for a in args if a is not NoneType]
        if origin in (Union, UnionType):
            return self.of(options[0]) if len(options) == 1 else {"anyOf": [self.of(o) for o in options]}
        if dataclasses.is_dataclass(tp):
            return self.object(tp)
        if origin is Literal:
            return {"type": self._TYPES[type(args[0])], "enum": list(args)}
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return {"enum": [member.value for member in tp]}
        if origin in (tuple, list):
            return {"type": "array", "items": self.of(args[0]) if args else {}}
        if origin is dict or tp is dict:
            item = args[1] if args else Any
            return self.open_object() if item is Any else {"type": "object", "additionalProperties": self.of(item)}
        return {} if tp is Any else {"type": self._TYPES[tp]}

    def open_object(self) -> dict[str, Any]:
        """A mapping of anything (Kubernetes objects inside a config)."""
        return {"type": "object"}

    def object(self, cls: type) -> dict[str, Any]:
        specs = fields_of(cls)
        schema: dict[str, Any] = {"type": "object", "properties": {spec.key: self.field(spec) for spec in specs}}
        required = [spec.key for spec in specs if spec.required]
        if required:
            schema["required"] = required
        if self.closed:
            schema["additionalProperties"] = False
        return schema

    def field(self, spec: FieldSpec) -> dict[str, Any]:
        schema: dict[str, Any] = {"description": spec.meta.doc} if spec.meta.doc else {}
        schema.update(self.of(spec.type))
        if not spec.required and spec.default not in (None, "", (), {}):
            schema["default"] = _plain(spec.default)
        for name, keyword in self._BOUNDS.items():
            if getattr(spec.meta, name) is not None:
                schema[keyword] = getattr(spec.meta, name)
        schema.update(spec.meta.json)
        return schema


def _plain(value: Any) -> Any:
    """A default as JSON writes it; a nested object's default is its own fields' defaults, so `{}`."""
    if dataclasses.is_dataclass(value):
        return {}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value.value if isinstance(value, enum.Enum) else value
