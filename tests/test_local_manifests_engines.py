"""The local runtime's pure parts: models-file errors located by line, engine command templates
and the `local:` settings section (the replica rules are in test_replicas.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lb.config import ConfigError
from lb.model import Model
from lb_operator.local.config import LocalConfig, LocalEngine
from lb_operator.local.engines import EngineUnavailable, check_engine, launch_hash, render_launch
from lb_operator.local.manifests import ManifestError, parse_models, read_models_file
from kvgate.settings import load_settings, settings_from_dict

DOC = """\
apiVersion: kvgate.dev/v1
kind: Model
metadata:
  name: {name}
spec:
  url: {url}
  engine: {engine}
  features: [TextGeneration]
  args: ["--flag"]
"""


def doc(name: str = "m", url: str = "hf://org/repo", engine: str = "Sim") -> str:
    return DOC.format(name=name, url=url, engine=engine)


def model(**kwargs: str) -> Model:
    return parse_models(doc(**kwargs))[0]


# -- models file --------------------------------------------------------------------------------


def test_several_documents_and_empty_ones() -> None:
    models = parse_models("---\n" + doc("a") + "---\n---\n" + doc("b"))
    assert [m.name for m in models] == ["a", "b"]


@pytest.mark.parametrize("text, where", [
    (doc("a") + "---\n" + doc("a"), "f.yaml:14: metadata.name: model a is defined twice (first at line 4)"),
    (doc().replace("engine: Sim", "engine: Sims"), "f.yaml:7: model m: spec.engine"),
    (doc().replace('args: ["--flag"]', "replicaz: 2"), "f.yaml:9: model m: spec.replicaz: unknown key"),
    (doc().replace("url: hf://org/repo", "url: ftp://x"), "f.yaml:6: model m: spec.url"),
    (doc().replace("kind: Model", "kind: Pod"), "f.yaml:2: model m: kind"),
    ("a: b: c\n", "f.yaml:1: not valid YAML"),
])
def test_errors_name_line_and_field(text: str, where: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_models(text, "f.yaml")
    assert str(err.value).startswith(where)


# -- engines ------------------------------------------------------------------------------------


def test_templates_fill_placeholders_and_append_model_args(tmp_path: Path) -> None:
    launch = render_launch(model(), LocalConfig(), port=4321, state=tmp_path, base_dir=tmp_path)
    assert launch.argv[:3] == (sys.executable, "-m", "kvgate_sim")
    assert "4321" in launch.argv and launch.argv[-1] == "--flag" and launch.health_path == "/health"
    gguf = tmp_path / "w.gguf"
    gguf.write_bytes(b"")
    m = model(url="file://w.gguf", engine="LlamaCpp")
    launch = render_launch(m, LocalConfig(), port=1, state=tmp_path, base_dir=tmp_path)
    assert str(gguf) in launch.argv and launch.health_path == "/v1/models"


def test_launch_hash_ignores_the_port_but_not_the_command(tmp_path: Path) -> None:
    m = model()
    custom = LocalConfig(engines={"Sim": LocalEngine(command=("{python}", "-m", "kvgate_sim", "--port", "{port}"))})
    assert launch_hash(m, LocalConfig(), tmp_path) == launch_hash(m, LocalConfig(), tmp_path)
    assert launch_hash(m, LocalConfig(), tmp_path) != launch_hash(m, custom, tmp_path)
    # Overriding only the command keeps the built-in health path.
    assert render_launch(m, custom, port=1, state=tmp_path, base_dir=tmp_path).health_path == "/health"


def test_vllm_with_adapters_is_started_for_runtime_lora_and_sim_does_not_roll(tmp_path: Path) -> None:
    adapters = '  adapters: [{name: sql, url: "file://sql"}]\n'
    vllm = parse_models(doc(engine="VLLM") + adapters)[0]
    launch = render_launch(vllm, LocalConfig(), port=1, state=tmp_path, base_dir=tmp_path)
    assert "--enable-lora" in launch.argv and launch.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    plain = render_launch(model(engine="VLLM"), LocalConfig(), port=1, state=tmp_path, base_dir=tmp_path)
    assert "--enable-lora" not in plain.argv and not plain.env
    # The simulator always serves the LoRA API: adding an adapter keeps its replicas running.
    sim = parse_models(doc() + adapters)[0]
    assert launch_hash(sim, LocalConfig(), tmp_path) == launch_hash(model(), LocalConfig(), tmp_path)


def test_priority_scheduling_starts_local_replicas_with_the_priority_policy(tmp_path: Path) -> None:
    scheduled = parse_models(doc() + "  loadBalancing: {priorityScheduling: true}\n")[0]
    launch = render_launch(scheduled, LocalConfig(), port=1, state=tmp_path, base_dir=tmp_path)
    at = launch.argv.index("--scheduling-policy")
    assert launch.argv[at + 1] == "priority" and launch.argv[-1] == "--flag"
    plain = render_launch(model(), LocalConfig(), port=1, state=tmp_path, base_dir=tmp_path)
    assert "--scheduling-policy" not in plain.argv


def test_missing_engines_and_files_are_reported(tmp_path: Path) -> None:
    check_engine(model(), LocalConfig(), tmp_path)
    with pytest.raises(EngineUnavailable, match="`vllm` is not installed"):
        check_engine(model(engine="VLLM"), LocalConfig(), tmp_path)
    with pytest.raises(EngineUnavailable, match="does not exist"):
        check_engine(model(url="file://nope.gguf", engine="LlamaCpp"),
                     LocalConfig(engines={"LlamaCpp": LocalEngine(command=("true",))}), tmp_path)
    bad = LocalConfig(engines={"Sim": LocalEngine(command=("{python}", "{nope}"))})
    with pytest.raises(EngineUnavailable, match="bad placeholder"):
        check_engine(model(), bad, tmp_path)
    lora = parse_models(doc() + '  adapters: [{name: sql, url: "file://loras/sql"}]\n')[0]
    with pytest.raises(EngineUnavailable, match=r"spec.adapters\[0\].url: .*loras/sql does not exist"):
        check_engine(lora, LocalConfig(), tmp_path)
    (tmp_path / "loras" / "sql").mkdir(parents=True)
    check_engine(lora, LocalConfig(), tmp_path)


def test_an_engine_runs_from_its_own_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`local.engines.<Engine>.python` is what {python} names (absolute: relative to the working
    directory when kvgate starts); the built-in command stays. A missing one is reported with
    how to install it."""
    monkeypatch.chdir(tmp_path)
    settings = settings_from_dict({"local": {"engines": {"VLLM": {"python": "envs/vllm/bin/python"}}}})
    vllm = model(engine="VLLM")
    launch = render_launch(vllm, settings.local, port=1, state=tmp_path, base_dir=tmp_path)
    assert launch.argv[:3] == (str(tmp_path / "envs/vllm/bin/python"), "-m",
                               "vllm.entrypoints.openai.api_server")
    assert launch.health_path == "/health"
    with pytest.raises(EngineUnavailable, match=r"envs/vllm/bin/python is not an executable file "
                                                r"\(local.engines.VLLM.python; `make engines`"):
        check_engine(vllm, settings.local, tmp_path)
    (tmp_path / "envs" / "vllm" / "bin").mkdir(parents=True)
    (tmp_path / "envs" / "vllm" / "bin" / "python").symlink_to(sys.executable)
    check_engine(vllm, settings.local, tmp_path)  # another interpreter: its modules are its own
    # Other engines keep kvgate's interpreter.
    assert render_launch(model(), settings.local, port=1, state=tmp_path,
                         base_dir=tmp_path).argv[0] == sys.executable


def test_the_quickstart_example_is_valid_and_runnable_here() -> None:
    example = read_models_file(Path(__file__).resolve().parent.parent / "examples" / "local.yaml")
    assert {m.name for m in example.models} == {"sim-llama", "sim-tiny"}
    for m in example.models:
        check_engine(m, LocalConfig(), example.base_dir)


# -- settings -----------------------------------------------------------------------------------


def test_local_section_in_the_settings_file() -> None:
    settings = settings_from_dict({"server": {"port": 8100}, "local": {
        "stateDir": "/tmp/x", "gracePeriodSeconds": 3, "engines": {"VLLM": {"healthPath": "/ping"}}}})
    assert settings.gateway.server.port == 8100
    assert settings.local.grace_period_seconds == 3.0
    assert settings.local.engines["VLLM"].health_path == "/ping"
    with pytest.raises(ConfigError, match="local.engines.Nope: unknown engine"):
        settings_from_dict({"local": {"engines": {"Nope": {}}}})
    with pytest.raises(ConfigError, match="local.graceSeconds: unknown key"):
        settings_from_dict({"local": {"graceSeconds": 1}})


@pytest.mark.parametrize("text, where", [
    ("server:\n  port: 8100\nmodelRollouts:\n  surge: 0\n", "4: modelRollouts.surge: must be >= 1, got 0"),
    ("server:\n  port: 8100\nlocal:\n  engines:\n    Nope: {}\n", "5: local.engines.Nope: unknown engine"),
    ("server:\n  port: 8100\nlocall: {}\n", "3: locall: unknown key; did you mean 'local'?"),
    ("local:\n  stateDir: ''\n", "2: local.stateDir: must not be empty"),
])
def test_settings_file_errors_name_the_line_of_the_key(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "kvgate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert str(err.value).startswith(f"{path}:{where}")


def test_files_paths_map_under_the_replica_directory(tmp_path: Path) -> None:
    """Paths naming a file of spec.files, or a directory holding one, point at the replica's
    copy; other absolute paths, relative ones and URLs are left alone."""
    def with_file(content: str) -> Model:
        text = doc().replace('args: ["--flag"]', 'args: ["--chat-template=/etc/app/t.jinja", '
                             '"/etc/app/", "/etc/hosts", "etc/app/t.jinja", '
                             '"http://h/etc/app/t.jinja", "--dirs=/etc/app,/etc"]')
        return parse_models(text + f'  files: [{{path: /etc/app/t.jinja, content: "{content}"}}]\n'
                            '  env: {TEMPLATE_DIR: /etc/app, OTHER: /etc/apple}\n')[0]

    m = with_file("x")
    launch = render_launch(m, LocalConfig(), port=1, state=tmp_path, base_dir=tmp_path, replica="m-3")
    root = tmp_path / "m-3.files"
    assert launch.files == ((str(root / "etc/app/t.jinja"), "x"),)
    assert launch.env["TEMPLATE_DIR"] == str(root / "etc/app") and launch.env["OTHER"] == "/etc/apple"
    assert launch.argv[-6:] == (f"--chat-template={root}/etc/app/t.jinja", str(root / "etc/app"),
                                "/etc/hosts", "etc/app/t.jinja", "http://h/etc/app/t.jinja",
                                f"--dirs={root}/etc/app,{root}/etc")
    # The content is part of the launch hash; the replica's name and directory are not.
    assert launch_hash(m, LocalConfig(), tmp_path) == launch_hash(with_file("x"), LocalConfig(), tmp_path)
    assert launch_hash(m, LocalConfig(), tmp_path) != launch_hash(with_file("y"), LocalConfig(), tmp_path)
    bad = parse_models(doc() + '  files: [{path: /etc/../x, content: ""}]\n')[0]
    with pytest.raises(EngineUnavailable, match="without '.' or '..'"):
        check_engine(bad, LocalConfig(), tmp_path)
