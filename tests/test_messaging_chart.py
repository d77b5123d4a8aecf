"""The kvgate chart's `messaging` values (top level, as in KubeAI's chart): rendered into
config.yaml where the gateway's loader reads them, and refused by the values schema when bad."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.test_charts import KVGATE, _config, helm, render_chart  # noqa: F401 (fixture)

STREAM = {"requestsURL": "nats://nats:4222/kvgate.requests",
          "responsesURL": "rabbit://kvgate:${RABBITMQ_PASSWORD}@rabbitmq:5672/responses",
          "maxHandlers": 8}


def test_streams_reach_the_config_and_load(helm: Any, tmp_path: Path, monkeypatch) -> None:
    from kvgate.settings import settings_from_dict

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"messaging": {"errorMaxBackoff": "10s", "streams": [STREAM]}}))
    config = _config(render_chart(helm, KVGATE, "-f", str(values)))
    assert config["messaging"] == {"errorMaxBackoff": "10s", "streams": [STREAM]}
    monkeypatch.setenv("RABBITMQ_PASSWORD", "from-a-secret")
    messaging = settings_from_dict(config).gateway.messaging
    assert messaging.error_max_backoff_seconds == 10 and len(messaging.streams) == 1


def test_no_streams_by_default(helm: Any) -> None:
    assert _config(render_chart(helm, KVGATE))["messaging"]["streams"] == []


def test_bad_streams_fail_at_install_time(helm: Any, tmp_path: Path) -> None:
    for bad, message in ((dict(STREAM, maxHandlers=0), "maxHandlers"),
                         (dict(STREAM, requestsURL="kafka://k/t"), "requestsURL"),
                         (dict(STREAM, queue="x"), "queue")):
        values = tmp_path / "bad.yaml"
        values.write_text(yaml.safe_dump({"messaging": {"streams": [bad]}}))
        proc = helm("template", "kvgate", str(KVGATE), "-f", str(values), check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
