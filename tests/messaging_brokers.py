"""Real brokers for the messaging tests: a NATS server with JetStream and a RabbitMQ node, each
private to the test (its own free ports, its own data directory under the test's tmp dir),
stopped after it. A test whose broker binary is missing skips with the reason (the Debian
packages are in .ci/system-packages.txt)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

HOST = "127.0.0.1"
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the Debian package's, not its su wrapper


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


class Broker:
    """A broker process in its own session (so stopping it reaches its children), restartable
    on the same port and data."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, deadline: float = 60) -> None:
        self.starts += 1
        log = open(self.dir / f"out-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env(), cwd=self.dir, start_new_session=True)
        log.close()
        end = time.monotonic() + deadline
        while not _listening(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command()[0]} exited: {self.output()}")
            if time.monotonic() > end:
                raise RuntimeError(f"{self.command()[0]} did not listen: {self.output()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to the process started (rabbitmq-server's script passes it on to the node and
        waits for it); its whole session is killed only if it does not end in time."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def output(self) -> str:
        return (self.dir / f"out-{self.starts}.log").read_text(errors="replace")[-2000:]


class NatsServer(Broker):
    def command(self) -> list[str]:
        return ["nats-server", "-js", "-a", HOST, "-p", str(self.port), "-sd", str(self.dir / "js")]

    def url(self, subject: str, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"nats://{HOST}:{self.port}/{subject}" + (f"?{query}" if query else "")


class RabbitServer(Broker):
    """A RabbitMQ node of its own: node name, ports (AMQP, distribution, epmd), config, data
    and cookie all under the test's directory."""

    def __init__(self, tmp: Path, name: str) -> None:
        super().__init__(tmp, name)
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"kvgate-test-{self.port}@localhost"
        (self.dir / "home").mkdir(exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {HOST}:{self.port}\nloopback_users = none\n")
        (self.dir / "rabbitmq-env.conf").write_text("")

    def command(self) -> list[str]:
        return [RABBITMQ_SERVER]

    def env(self) -> dict[str, str]:
        d = self.dir
        return {**os.environ, "HOME": str(d / "home"), "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_PORT": str(self.epmd_port), "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
                "RABBITMQ_LOG_BASE": str(d / "log"), "RABBITMQ_LOGS": "-",
                "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
                "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
                "RABBITMQ_PID_FILE": str(d / "pid")}

    def close(self) -> None:
        """Stop the node and the epmd it started (addressed by its private port)."""
        self.stop()
        subprocess.run(["epmd", "-kill"], env=self.env(), capture_output=True, timeout=10)

    def url(self, queue: str) -> str:
        return f"rabbit://guest:guest@{HOST}:{self.port}/{queue}"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{HOST}:{self.port}/"


def need(binary: str) -> None:
    if shutil.which(binary) is None and not os.access(binary, os.X_OK):
        pytest.skip(f"{binary} is not installed (Debian package listed in "
                    ".ci/system-packages.txt; run .ci/system-packages.sh as root)")


# -- the 1,000-message scenario both brokers run ---------------------------------------------

def serve_models(gw) -> None:  # type: ignore[no-untyped-def]
    """A chat model on two simulated replicas, an embedding model, and a model whose only
    replica refuses connections (its requests end in a 5xx from the gateway)."""
    gw.model_with("chat", [gw.sim("chat", "c1"), gw.sim("chat", "c2")], strategy="PrefixHash")
    gw.model_with("emb", [gw.sim("emb", "e1")], features=["TextEmbedding"])
    gw.model_with("broken", [gw.refusing_endpoint("b1")])


def messaging_config(requests_url: str, responses_url: str, handlers: int = 16) -> dict:
    return {"messaging": {"errorMaxBackoff": "2s", "streams": [
        {"requestsURL": requests_url, "responsesURL": responses_url, "maxHandlers": handlers}]}}


def _chat(model: str, text: str, **extra: object) -> dict:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": text}],
            **extra}


class Scenario:
    """``n`` request messages of every kind, each with what its response must say. Message i
    carries metadata {"id": i}, except the ones that are not JSON (their response's metadata
    is null: there was none to read)."""

    def __init__(self, n: int = 1000) -> None:
        import json
        self.messages: list[bytes] = []
        self.expect: dict[int, tuple[int, str]] = {}  # id -> (status, error code or "ok")
        self.not_json = 0
        for i in range(n):
            kind = i % 20
            meta = {"id": i, "tag": f"t{i}"}
            path, body = "/v1/chat/completions", _chat("chat", f"question {i % 50} of many")
            want = (200, "ok")
            if kind == 3:
                self.messages.append(b'{"metadata": {"id": ' + str(i).encode() + b"}, oops")
                self.not_json += 1
                continue
            if kind == 5:
                path, want = "/v1/files", (404, "unknown_path")
            elif kind == 7:
                body, want = _chat("nope", "x"), (404, "model_not_found")
            elif kind == 9:
                body, want = _chat("chat", "x", stream=True), (400, "unsupported_parameter")
            elif kind == 11:
                del body["model"]
                want = (400, "invalid_request")
            elif kind == 13:
                path, body = "/v1/embeddings", {"model": "emb", "input": f"text {i}"}
            elif kind == 15:
                path = "/openai/v1/completions"
                body = {"model": "chat", "prompt": f"complete {i}", "max_tokens": 3}
            elif kind == 17:
                body, want = _chat("broken", "x"), (502, "5xx")
            elif kind == 19:
                body = "not an object"  # type: ignore[assignment]
                want = (400, "invalid_message")
            self.messages.append(json.dumps({"metadata": meta, "path": path, "body": body}).encode())
            self.expect[i] = want

    def check(self, responses: list[bytes], *, duplicates_allowed: bool) -> None:
        """Every message answered (once, unless duplicates are allowed), with its metadata and
        the status and body its request calls for."""
        import json
        seen: dict[int, int] = {}
        not_json = 0
        for raw in responses:
            response = json.loads(raw)
            assert set(response) == {"metadata", "status_code", "body"}, response
            status, body = response["status_code"], response["body"]
            if response["metadata"] is None:
                assert (status, body["error"]["code"]) == (400, "invalid_json"), response
                not_json += 1
                continue
            i = response["metadata"]["id"]
            assert response["metadata"] == {"id": i, "tag": f"t{i}"}, response
            seen[i] = seen.get(i, 0) + 1
            want_status, want_code = self.expect[i]
            if want_code == "ok":
                assert status == 200, response
                assert body["object"] in ("chat.completion", "text_completion", "list"), response
            elif want_code == "5xx":
                assert 500 <= status <= 599, response
                assert set(body["error"]) == {"message", "type", "param", "code"}, response
            else:
                assert status == want_status, response
                assert set(body["error"]) == {"message", "type", "param", "code"}, response
                assert body["error"]["code"] == want_code, response
        missing = sorted(set(self.expect) - set(seen))
        assert not missing, f"{len(missing)} messages got no response, e.g. {missing[:10]}"
        if duplicates_allowed:
            assert not_json >= self.not_json
        else:
            assert not_json == self.not_json
            assert all(count == 1 for count in seen.values()), \
                {i: c for i, c in seen.items() if c > 1}


def check_metrics(gw, scenario: Scenario) -> None:  # type: ignore[no-untyped-def]
    """The gateway's messaging series: one response counted per message, by status; nothing
    left in flight."""
    scraped = gw.scrape()
    assert gw.metric("kvgate_messaging_responses_total", scraped) == len(scenario.messages)
    ok = sum(1 for status, _ in scenario.expect.values() if status == 200)
    assert gw.metric("kvgate_messaging_responses_total", scraped, status_code="200") == ok
    assert gw.metric("kvgate_messaging_in_flight", scraped) == 0
    assert gw.metric("kvgate_messaging_broker_errors_total", scraped) == 0
