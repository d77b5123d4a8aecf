"""API keys from a Kubernetes Secret: the chart mounts the Secret (``apiKeysSecret``) as a volume,
and the kubelet updates such a volume the way its atomic writer does — the new files in a fresh
timestamped directory, then the ``..data`` symlink swapped to it in one rename, the key's own
path (``keys.yaml -> ..data/keys.yaml``) never changing. The gateway must see that as a change
and reload without a restart. The layout and the swap are made here exactly as the kubelet
makes them."""

from __future__ import annotations

import os
import time
from pathlib import Path

import openai
import pytest
import yaml

from lb.keys import hash_secret, new_secret


def _publish(volume: Path, keys: dict[str, str], generation: int) -> None:
    """What the kubelet's atomic writer does for one update of the Secret."""
    data = volume / f"..2026_12_05_10_00_0{generation}.000000000"
    data.mkdir()
    entries = [{"name": name, "hash": hash_secret(secret), "models": ["*"]}
               for name, secret in keys.items()]
    (data / "keys.yaml").write_text(yaml.safe_dump({"keys": entries}))
    temp = volume / "..data_tmp"
    temp.symlink_to(data.name)
    os.replace(temp, volume / "..data")  # the one atomic step
    link = volume / "keys.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/keys.yaml")


def _status(gw, secret: str) -> int:
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0, timeout=30)
    try:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        return 200
    except openai.AuthenticationError:
        return 401


def test_a_secret_volume_update_is_reloaded_live(make_gateway, tmp_path: Path) -> None:
    volume = tmp_path / "keys"
    volume.mkdir()
    first, second = new_secret(), new_secret()
    _publish(volume, {"team-a": first}, 1)
    gw = make_gateway({"apiKeys": {"enabled": True, "file": str(volume / "keys.yaml"),
                                   "reloadSeconds": 0.1}})
    gw.model_with("m", [gw.backend("b")])
    assert _status(gw, first) == 200 and _status(gw, second) == 401
    _publish(volume, {"team-b": second}, 2)  # team-a revoked, team-b added
    deadline = time.monotonic() + 10
    while _status(gw, second) != 200:
        if time.monotonic() > deadline:
            pytest.fail("the Secret's update was not reloaded")
        time.sleep(0.05)
    assert _status(gw, first) == 401
