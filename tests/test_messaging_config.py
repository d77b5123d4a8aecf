"""The `messaging:` section: KubeAI's shape decodes, and every bad value fails at start-up with
the key's path (never later, on a message)."""

from __future__ import annotations

import subprocess

import pytest

from lb.config import ConfigError, config_from_dict
from lb.messaging.urls import parse_broker_url
from tests.test_gateway_config import kvgate_command

NATS, RABBIT = "nats://nats:4222/requests", "rabbit://user:p%40ss@rabbit:5672/responses?vhost=ai"


def test_kubeai_shape_decodes():
    config = config_from_dict({"messaging": {"errorMaxBackoff": "1m30s", "streams": [
        {"requestsURL": NATS, "responsesURL": RABBIT, "maxHandlers": 8}]}})
    assert config.messaging.error_max_backoff_seconds == 90
    stream = config.messaging.streams[0]
    assert (stream.requests_url, stream.responses_url, stream.max_handlers) == (NATS, RABBIT, 8)
    assert config_from_dict({}).messaging.streams == ()
    assert config_from_dict({}).messaging.error_max_backoff_seconds == 30


def test_urls_name_broker_place_and_credentials():
    rabbit = parse_broker_url(RABBIT)
    assert (rabbit.broker, rabbit.host, rabbit.port, rabbit.name) == ("rabbit", "rabbit", 5672, "responses")
    assert (rabbit.user, rabbit.password, rabbit.options) == ("user", "p@ss", {"vhost": "ai"})
    assert "p@ss" not in rabbit.redacted and "p%40ss" not in rabbit.redacted
    nats = parse_broker_url("nats://localhost/a.b?stream=S&consumer=c&ackWait=5")
    assert (nats.port, nats.name, nats.options["ackWait"]) == (4222, "a.b", "5")


@pytest.mark.parametrize("messaging, key, fragment", [
    ({"streams": [{"requestsURL": "kafka://k/t", "responsesURL": NATS}]},
     "messaging.streams[0].requestsURL", "unsupported broker URL"),
    ({"streams": [{"requestsURL": NATS, "responsesURL": "nats://n/a.*"}]},
     "messaging.streams[0].responsesURL", "without wildcards"),
    ({"streams": [{"requestsURL": NATS, "responsesURL": "rabbit://h/"}]},
     "messaging.streams[0].responsesURL", "one queue name"),
    ({"streams": [{"requestsURL": NATS, "responsesURL": "nats://nats/requests"}]},
     "messaging.streams[0].responsesURL", "must differ from requestsURL"),
    ({"streams": [{"requestsURL": NATS, "responsesURL": "nats://n/x?ackWait=-1"}]},
     "messaging.streams[0].responsesURL", "ackWait"),
    ({"streams": [{"requestsURL": NATS, "responsesURL": "rabbit://h/q?durable=1"}]},
     "messaging.streams[0].responsesURL", "unknown option 'durable'"),
    ({"streams": [{"requestsURL": NATS, "responsesURL": RABBIT, "maxHandlers": 0}]},
     "messaging.streams[0].maxHandlers", "must be >= 1"),
    ({"streams": [{"requestsURL": NATS}]}, "messaging.streams[0].responsesURL", "required"),
    ({"errorMaxBackoff": "soon"}, "messaging.errorMaxBackoff", "not a duration"),
    ({"errorMaxBackoff": 0}, "messaging.errorMaxBackoff", "must be > 0"),
    ({"stream": []}, "messaging.stream", "did you mean 'streams'"),
])
def test_bad_values_name_the_key(messaging, key, fragment):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"messaging": messaging})
    assert err.value.field == key and fragment in err.value.message, str(err.value)


def test_a_password_in_a_bad_url_is_not_shown():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"messaging": {"streams": [
            {"requestsURL": "rabbit://u:hunter2@h:99999/q", "responsesURL": NATS}]}})
    assert "hunter2" not in str(err.value) and "bad port" in str(err.value)


def test_with_api_keys_a_stream_names_its_key(tmp_path):
    stream = {"requestsURL": NATS, "responsesURL": RABBIT}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"apiKeys": {"enabled": True, "file": str(tmp_path / "k.yaml")},
                          "messaging": {"streams": [stream]}})
    assert err.value.field == "messaging.streams[0].apiKey"


def test_kvgate_gateway_command_rejects_bad_messaging(tmp_path):
    path = tmp_path / "kvgate.yaml"
    path.write_text("messaging:\n  streams:\n    - requestsURL: kafka://k/t\n"
                    "      responsesURL: nats://n/r\n")
    result = subprocess.run([*kvgate_command(), "gateway", "-c", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "kvgate.yaml:3: messaging.streams[0].requestsURL: unsupported broker URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_credentials_come_from_the_environment(monkeypatch):
    """``${NAME}`` in a URL is read from the environment (percent-encoded), so a password can
    come from a Secret; an unset one is a config error at start-up."""
    url = "rabbit://kvgate:${KVGATE_TEST_RABBIT_PASSWORD}@rabbit/requests"
    monkeypatch.setenv("KVGATE_TEST_RABBIT_PASSWORD", "p@ss/w:rd")
    assert parse_broker_url(url).password == "p@ss/w:rd"
    monkeypatch.delenv("KVGATE_TEST_RABBIT_PASSWORD")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"messaging": {"streams": [{"requestsURL": url, "responsesURL": NATS}]}})
    assert "KVGATE_TEST_RABBIT_PASSWORD is not set" in str(err.value)
