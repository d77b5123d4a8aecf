"""lb.schema: the one decoder every config file and the Model go through, and its one error.

Each check below is something a user meets when a file is wrong: the exact type (a YAML `true`
is not a port, `"8000"` is not an int), the key path down nested objects, lists and maps, the
known keys beside an unknown one, the line of the key in the file, and the JSON schema that the
chart's helm install checks with, written from the same fields.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.schema import (JsonSchema, SchemaError, camel, decode, decode_object, format_path, keys_of,
                       load_yaml_documents, parse_path, read_yaml, setting)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True, slots=True)
class Inner:
    port: int = setting(8000, doc="A port.", minimum=1, maximum=65535)
    ratio: float = 0.5
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    by_name: dict[str, Inner] = field(default_factory=dict)
    mode: Literal["fast", "slow"] = "fast"
    color: Color = Color.RED
    limit: int | None = None
    enabled: bool = False
    url_path: str = setting("/", key="URLPath")
    extra: dict[str, Any] = field(default_factory=dict)


def error(tp: Any, data: Any) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode(tp, data)
    return info.value


def test_a_tree_decodes_with_defaults_and_camel_case_keys() -> None:
    value = decode(Outer, {"name": "a", "inner": {"port": 80, "ratio": 1, "tags": ["x"]},
                           "byName": {"b": {}}, "mode": "slow", "color": "blue", "limit": 3,
                           "enabled": True, "URLPath": "/v1", "extra": {"any": [1, {"x": None}]}})
    assert value == Outer("a", Inner(80, 1.0, ("x",)), {"b": Inner()}, "slow", Color.BLUE, 3, True, "/v1",
                          {"any": [1, {"x": None}]})
    assert isinstance(value.inner.ratio, float) and isinstance(value.inner.tags, tuple)
    assert decode(Outer, {"name": "a"}) == Outer("a")


def test_null_means_absent() -> None:
    assert decode(Outer, {"name": "a", "inner": None, "limit": None}) == Outer("a")
    assert error(Outer, {"name": None}).field == "name"


@pytest.mark.parametrize("data, where, message", [
    ({"name": "a", "inner": {"port": "8000"}}, "inner.port", "expected an integer, got '8000'"),
    ({"name": "a", "inner": {"port": True}}, "inner.port", "expected an integer, got True"),
    ({"name": "a", "inner": {"ratio": False}}, "inner.ratio", "expected a number, got False"),
    ({"name": "a", "enabled": 1}, "enabled", "expected a boolean, got 1"),
    ({"name": 5}, "name", "expected a string, got 5"),
    ({"name": "a", "inner": {"tags": "x"}}, "inner.tags", "expected a list, got 'x'"),
    ({"name": "a", "inner": {"tags": ["x", 2]}}, "inner.tags[1]", "expected a string, got 2"),
    ({"name": "a", "byName": {"b": {"port": 0}}}, "byName.b.port", "must be >= 1, got 0"),
    ({"name": "a", "byName": {"b": {"port": 70000}}}, "byName.b.port", "must be <= 65535, got 70000"),
    ({"name": "a", "byName": {3: {}}}, "byName", "keys must be strings, got 3"),
    ({"name": "a", "inner": []}, "inner", "expected a mapping, got []"),
    ({"name": "a", "mode": "medium"}, "mode", "must be one of fast, slow, got 'medium'"),
    ({"name": "a", "color": "green"}, "color", "must be one of red, blue, got 'green'"),
    ({"name": "a", "limit": "3"}, "limit", "expected an integer, got '3'"),
    ({}, "name", "required key is missing"),
])
def test_wrong_values_name_the_key_path(data: dict[str, Any], where: str, message: str) -> None:
    err = error(Outer, data)
    assert (err.field, err.message) == (where, message)
    assert str(err) == f"{where}: {message}"


def test_unknown_keys_are_reported_with_the_known_ones() -> None:
    err = error(Outer, {"name": "a", "inner": {"prot": 1}})
    assert err.field == "inner.prot"
    assert err.message == "unknown key; did you mean 'port'? (known: port, ratio, tags)"
    # snake_case is not an alias: only the one key rule (or an explicit key) is accepted
    assert error(Outer, {"name": "a", "url_path": "/"}).field == "url_path"
    assert error(Outer, {"name": "a", "urlPath": "/"}).field == "urlPath"


def test_unions_try_each_option_in_order() -> None:
    assert decode(str | int, 3) == 3 and decode(str | int, "3") == "3"
    assert decode(int | float, 2) == 2 and isinstance(decode(float | int, 2), float)
    assert error(str | int, 1.5).message == "expected a string or an integer, got 1.5"


@given(st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=1, max_size=4))
def test_camel_case_is_one_rule(parts: list[str]) -> None:
    key = camel("_".join(parts))
    assert key == parts[0] + "".join(p[0].upper() + p[1:] for p in parts[1:])
    assert "_" not in key


def test_keys_of_a_dataclass() -> None:
    assert keys_of(Inner) == {"port", "ratio", "tags"}
    assert "URLPath" in keys_of(Outer) and "byName" in keys_of(Outer)


@pytest.mark.parametrize("text, path", [
    ("a.b[0].c", ("a", "b", 0, "c")), ("x", ("x",)), ("", ()), ("spec.adapters[12]", ("spec", "adapters", 12)),
])
def test_paths_round_trip(text: str, path: tuple[Any, ...]) -> None:
    assert parse_path(text) == path and format_path(path) == text


def test_errors_seen_from_a_container_and_placed_in_a_file() -> None:
    err = SchemaError("port", "must be >= 1").under(("servers", "nvidia.com/gpu", 0))
    assert err.path == ("servers", "nvidia.com/gpu", 0, "port")
    assert str(err.at("f.yaml", 7, "model m")) == "f.yaml:7: model m: servers.nvidia.com/gpu[0].port: must be >= 1"
    assert str(SchemaError((), "cannot read", file="f.yaml")) == "f.yaml: cannot read"


# -- YAML files: errors carry the line of the key ------------------------------------------------

CONFIG = """\
name: a
inner:
  ratio: 2
  tags:
    - ok
    - 7
byName:
  first: {}
  second:
    port: abc
"""


@pytest.mark.parametrize("text, line, where", [
    (CONFIG, 6, "inner.tags[1]"),
    (CONFIG.replace("    - 7", "    - b"), 10, "byName.second.port"),
    (CONFIG.replace("    - 7", "    - b").replace("port: abc", "prot: 1"), 10, "byName.second.prot"),
    ("name: a\ninner:\n  ratio: 1\n", None, None),
    ("inner: {}\n", 1, "name"),  # a missing key: the line of the first key
])
def test_file_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int | None,
                                            where: str | None) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    if where is None:
        assert read_yaml(path, lambda data: decode_object(Outer, data)).inner.ratio == 1.0
        return
    with pytest.raises(SchemaError) as info:
        read_yaml(path, lambda data: decode_object(Outer, data))
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, where)
    assert str(err).startswith(f"{path}:{line}: {where}: ")


def test_a_server_port_error_reads_like_the_docs_say(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("name: a\n\ninner:\n  port: abc\n")
    with pytest.raises(SchemaError, match=rf"^{path}:4: inner\.port: expected an integer, got 'abc'$"):
        read_yaml(path, lambda data: decode_object(Outer, data))


def test_anchors_and_merge_keys_keep_their_lines() -> None:
    text = "base: &b\n  port: 1\nname: a\ninner:\n  <<: *b\n  ratio: 2\n"
    [(data, lines)] = load_yaml_documents(text, "f.yaml")
    assert data["inner"] == {"port": 1, "ratio": 2}
    assert lines.of(("inner", "ratio")) == 6 and lines.of(("name",)) == 3


@pytest.mark.parametrize("text, line, fragment", [
    ("a: [\n", 2, "not valid YAML"),
    ("a: b: c\n", 1, "not valid YAML"),
    ("a: 1\n---\nb: 2\n", None, "expected one YAML document"),
])
def test_bad_yaml_is_a_schema_error_too(tmp_path: Path, text: str, line: int | None, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SchemaError) as info:
        read_yaml(path, lambda data: data)
    assert info.value.line == line and fragment in str(info.value) and str(info.value).startswith(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"nope\.yaml: cannot read"):
        read_yaml(tmp_path / "nope.yaml", lambda data: data)


# -- JSON schema from the same fields -----------------------------------------------------------


def test_json_schema_follows_types_bounds_and_keys() -> None:
    schema = JsonSchema(closed=True).of(Outer)
    props = schema["properties"]
    assert schema["required"] == ["name"] and schema["additionalProperties"] is False
    assert props["inner"]["properties"]["port"] == {"description": "A port.", "type": "integer", "default": 8000,
                                                    "minimum": 1, "maximum": 65535}
    assert props["byName"]["additionalProperties"]["properties"].keys() == {"port", "ratio", "tags"}
    assert props["mode"] == {"type": "string", "enum": ["fast", "slow"], "default": "fast"}
    assert props["color"] == {"enum": ["red", "blue"], "default": "red"}
    assert props["limit"] == {"type": "integer"}
    assert props["URLPath"]["type"] == "string" and props["extra"] == {"type": "object"}
    assert props["inner"]["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    json.dumps(schema)  # every default is plain JSON


def test_json_schema_and_decoder_agree_on_bounds() -> None:
    """What the schema allows at a bound, the decoder allows; one step beyond, both refuse."""
    port = JsonSchema().of(Inner)["properties"]["port"]
    for value in (port["minimum"], port["maximum"]):
        assert decode(Inner, {"port": value}).port == value
    for value in (port["minimum"] - 1, port["maximum"] + 1):
        assert error(Inner, {"port": value}).field == "port"
