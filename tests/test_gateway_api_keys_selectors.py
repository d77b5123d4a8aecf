"""API keys limited by a label selector (``modelSelector``), over real HTTP with the OpenAI SDK.

A key may use a model when a glob of its ``models`` allows the name and its selector matches
the Model's labels (an adapter: its base Model's). The gateway runs in-process
(tests/gateway_harness.py) in front of recording test backends; the CLI runs as a process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from lb.keys import hash_secret, new_secret, read_keys
from lb.schema import SchemaError
from tests.local_harness import kvgate
from tests.test_gateway_api_keys import chat, client, metric, wait_until


def write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    """The keys file, written beside and renamed over (as the CLI does)."""
    temp = path.with_name(path.name + ".new")
    temp.write_text(yaml.safe_dump({"keys": entries}))
    os.replace(temp, path)


@pytest.fixture
def selected(make_gateway, tmp_path):
    """Keys with selectors in front of three labelled models (one with adapters)."""
    path = tmp_path / "keys.yaml"
    secrets = {name: new_secret() for name in ("team_a", "chat_or_gpu", "gpu_only")}
    entries = [
        {"name": "team_a", "hash": hash_secret(secrets["team_a"]),
         "modelSelector": "team=a,tier!=gpu"},
        {"name": "chat_or_gpu", "hash": hash_secret(secrets["chat_or_gpu"]),
         "models": ["chat*", "gpu"], "modelSelector": "team in (a, b)"},
        {"name": "gpu_only", "hash": hash_secret(secrets["gpu_only"]),
         "modelSelector": "tier=gpu"},
    ]
    write_entries(path, entries)
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(path), "reloadSeconds": 0.1}})
    backends = {name: gw.backend(name) for name in ("chat", "gpu", "other")}
    gw.model_with("chat", [backends["chat"].endpoint("lora1")], adapters=["lora1"],
                  labels={"team": "a", "tier": "cpu"})
    gw.model_with("gpu", [backends["gpu"]], labels={"team": "a", "tier": "gpu"})
    gw.model_with("other", [backends["other"]], labels={"team": "c"})
    return gw, secrets, entries, path, backends


def allowed(c: openai.OpenAI, model: str) -> bool:
    """True on a 200, False on the 403 of a model the key may not use."""
    try:
        return chat(c, model=model).http_response.status_code == 200
    except openai.PermissionDeniedError as denied:
        assert denied.status_code == 403 and denied.code == "model_not_allowed"
        assert denied.body["param"] == "model"
        return False


def test_a_selector_limits_the_models_and_adapters_follow_their_base(selected):
    gw, secrets, _, _, backends = selected
    team_a = client(gw, secrets["team_a"])
    assert allowed(team_a, "chat")
    assert allowed(team_a, "chat_lora1")  # the adapter has its base Model's labels
    assert not allowed(team_a, "gpu")  # tier!=gpu
    assert not allowed(team_a, "other")  # team=c
    # The glob and the selector must both allow a name.
    both = client(gw, secrets["chat_or_gpu"])
    assert allowed(both, "chat") and allowed(both, "chat_lora1") and allowed(both, "gpu")
    assert not allowed(both, "other")
    gpu_only = client(gw, secrets["gpu_only"])
    assert allowed(gpu_only, "gpu")
    assert not allowed(gpu_only, "chat") and not allowed(gpu_only, "chat_lora1")
    with pytest.raises(openai.NotFoundError):  # an unknown model is still 404, whatever the key
        chat(team_a, model="nope")
    assert backends["other"].total_calls == 0
    assert backends["gpu"].total_calls == 2
    assert metric(gw, "kvgate_key_rejections_total", key="team_a",
                  reason="model_not_allowed") == 2


def test_models_lists_only_what_the_selector_allows(selected):
    gw, secrets, *_ = selected
    listed = {name: sorted(m.id for m in client(gw, secret).models.list())
              for name, secret in secrets.items()}
    assert listed == {"team_a": ["chat", "chat_lora1"],
                      "chat_or_gpu": ["chat", "chat_lora1", "gpu"],
                      "gpu_only": ["gpu"]}
    # Every model listed is one the key may use, and none it may not.
    for name, secret in secrets.items():
        c = client(gw, secret)
        for model in ("chat", "chat_lora1", "gpu", "other"):
            assert allowed(c, model) == (model in listed[name])


def test_a_models_new_labels_are_decided_again(selected):
    """The key's answer per model is remembered with the Model; a Model with new labels (as
    the control plane sets them) is decided afresh, for requests and for /v1/models."""
    gw, secrets, *_ = selected
    team_a = client(gw, secrets["team_a"])
    assert allowed(team_a, "chat") and not allowed(team_a, "other")
    gw.add_model("other", labels={"team": "a"})
    gw.add_model("chat", adapters=["lora1"], labels={"team": "a", "tier": "gpu"})
    assert allowed(team_a, "other")
    assert not allowed(team_a, "chat") and not allowed(team_a, "chat_lora1")
    assert sorted(m.id for m in team_a.models.list()) == ["other"]


def test_selectors_reload_live_and_a_bad_one_keeps_the_keys_in_force(selected):
    gw, secrets, entries, path, _ = selected
    team_a = client(gw, secrets["team_a"])
    assert not allowed(team_a, "other")
    entries[0]["modelSelector"] = "team in (a, c)"
    write_entries(path, entries)
    wait_until(lambda: allowed(team_a, "other"))
    assert allowed(team_a, "gpu")  # tier!=gpu is gone too
    # A selector that does not parse: the file is refused and the keys in force are kept.
    gw.allow_errors("API keys not reloaded")
    store = gw.gateway.admission.store
    reloads = store.reloads
    entries[0]["modelSelector"] = "team in (a"
    write_entries(path, entries)
    identity = os.stat(path)
    wait_until(lambda: gw.call(lambda: store._identity)
               == (identity.st_mtime_ns, identity.st_size, identity.st_ino))
    assert store.reloads == reloads
    assert allowed(team_a, "other") and allowed(team_a, "gpu")


def test_a_selector_that_does_not_parse_makes_the_file_invalid(tmp_path):
    path = tmp_path / "keys.yaml"
    write_entries(path, [{"name": "a", "hash": hash_secret(new_secret()),
                          "modelSelector": "team=a,tier notin (gpu"}])
    with pytest.raises(SchemaError) as invalid:
        read_keys(path)
    assert "keys[0].modelSelector" in str(invalid.value)
    assert "invalid label selector term 'tier notin (gpu'" in str(invalid.value)


def test_a_bad_label_selector_header_is_still_a_400(selected):
    gw, secrets, *_ = selected
    c = client(gw, secrets["team_a"]).with_options(
        default_headers={"X-Label-Selector": "team in (a"})
    with pytest.raises(openai.BadRequestError) as bad:
        chat(c)
    assert "X-Label-Selector" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        c.models.list()


def test_keys_cli_selector(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.yaml")
    made = kvgate("keys", "create", "team-a", "-f", path, "-l", "team=a,tier!=gpu",
                  "--selector", "env in (prod, dev)")
    assert made.returncode == 0, made.stderr
    entry = yaml.safe_load(Path(path).read_text())["keys"][0]
    assert entry["modelSelector"] == "team=a,tier!=gpu,env in (prod, dev)"
    plain = kvgate("keys", "create", "plain", "-f", path)
    assert plain.returncode == 0, plain.stderr
    assert "modelSelector" not in yaml.safe_load(Path(path).read_text())["keys"][1]
    listed = kvgate("keys", "list", "-f", path)
    assert listed.returncode == 0
    header, team_a, plain_row = listed.stdout.splitlines()
    assert "SELECTOR" in header.split()
    assert "team=a,tier!=gpu,env in (prod, dev)" in team_a
    assert plain_row.split()[:3] == ["plain", "*", "-"]
    before = Path(path).read_text()
    refused = kvgate("keys", "create", "bad", "-f", path, "-l", "team in (a")
    assert refused.returncode == 2
    assert "modelSelector: invalid label selector term 'team in (a'" in refused.stderr
    assert Path(path).read_text() == before  # nothing written
