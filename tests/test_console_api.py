"""The console's status API, run for real: `kvgate gateway --workers 2` in front of simulated
vLLM replicas, with API keys on. The document's shape, its figures summed across both worker
processes, its ring picture held to the ring's own picks, and who may read it."""

from __future__ import annotations

import json
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest

from bench.procs import free_port, gateway_config, spawn, stop, wait_for_port
from lb.chwbl import Ring as PureRing
from lb.console.ring_view import ring_picture
from lb.console.window import BOUNDS, Sample, SharedWindow, quantile
from lb.ring import Ring, hash64
from tests.local_harness import UpProcess, kvgate, sim_model, wait_for



def get(url: str, key: str = "", method: str = "GET") -> tuple[int, Any, dict[str, str]]:
    """One request on a new connection (so the kernel may hand it to either worker)."""
    request = urllib.request.Request(url, method=method, headers={
        "Authorization": f"Bearer {key}", "Connection": "close"} if key else {"Connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            kind = response.headers.get("content-type", "")
            return response.status, json.loads(body) if "json" in kind else body, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def assert_openai_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]


# -- the pieces, in one process --------------------------------------------------------------------


@pytest.mark.parametrize("ring_class", [Ring, PureRing])
def test_ring_picture_is_the_ring_s_own_ownership(ring_class: type) -> None:
    """Every key lands, with no load anywhere, on the replica whose arc holds its hash."""
    keys = tuple(sorted(f"chat/replica-{i}" for i in range(5)))
    ring = ring_class(replication=64)
    for key in keys:
        ring.add(key)
    picture = ring_picture(keys, 64)
    assert abs(sum(picture.shares) - 1) < 1e-9 and all(s > 0 for s in picture.shares)
    assert list(picture.ends) == sorted(picture.ends)
    rng = random.Random(7)
    for _ in range(2000):
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(0, 30)))
        where = hash64(prompt) / 2**64
        j = next((i for i, end in enumerate(picture.ends) if where <= end), 0)
        assert keys[picture.owners[j]] == ring.pick(prompt)


def test_window_sums_workers_and_forgets_old_buckets() -> None:
    window = SharedWindow(workers=2, models=4, window_seconds=60)
    first_byte = [0] * (len(BOUNDS) + 1)
    first_byte[3] = 4  # four answers between 5 and 10 ms
    window.add(0, "chat", 1000.0, Sample(4, 1, 0.03, first_byte))
    window.add(1, "chat", 1001.0, Sample(3, 0, 0.0, None))
    window.add(1, "chat", 900.0, Sample(50, 0, 0.0, None))  # long before the window
    traffic = window.traffic("chat", 1002.0, 60)
    assert sum(traffic.requests) == 7 and sum(traffic.errors) == 1
    merged = [sum(col) for col in zip(*traffic.first_byte)]
    assert 0.005 <= quantile(0.5, merged) <= 0.01
    assert quantile(0.5, [0] * len(merged)) is None
    assert sum(window.traffic("other", 1002.0, 60).requests) == 0
    # a bucket reused once the ring of buckets comes round starts from zero
    window.add(0, "chat", 1000.0 + 13 * 5, Sample(2, 0, 0.0, None))
    assert sum(window.traffic("chat", 1000.0 + 13 * 5, 5).requests) == 2
    window.set_waiting(0, "chat", 1000.0, 3)
    window.set_waiting(1, "chat", 1000.0, 2)
    assert window.waiting("chat", 1001.0) == 5
    assert window.waiting("chat", 1100.0) == 0  # workers that stopped sampling do not count
    window.close()


# -- a real gateway with two workers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("console")
    keys = str(tmp / "keys.yaml")
    secrets = {}
    for name in ("ops", "team"):
        made = kvgate("keys", "create", name, "-f", keys)
        assert made.returncode == 0, made.stderr
        secrets[name] = made.stdout.strip()
    sim, port, metrics = free_port(), free_port(), free_port()
    while sim + 1 in (port, metrics):
        sim = free_port()
    config = tmp / "gateway.yaml"
    config.write_text(gateway_config(
        {"chat": [f"127.0.0.1:{sim}", f"127.0.0.1:{sim + 1}"]}, port, engine="Sim",
        metrics_port=metrics,
        settings={"apiKeys": {"enabled": True, "file": keys, "reloadSeconds": 0.2},
                  "console": {"enabled": True, "adminKeys": ["ops"]},
                  "engineMetrics": {"intervalSeconds": 0.5}}))
    procs = [spawn([sys.executable, "-m", "kvgate", "sim", "--port", str(sim), "--replicas", "2",
                    "--profile", "fast", "--model-name", "chat"]),
             spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config), "--workers", "2"],
                   stdout=None)]
    try:
        for p in (sim, sim + 1, port):
            wait_for_port(p)
        yield {"url": f"http://127.0.0.1:{port}", "keys": secrets,
               "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        for proc in reversed(procs):
            stop(proc)


def status(gateway: dict[str, Any]) -> dict[str, Any]:
    code, body, _ = get(gateway["url"] + "/ui/api/status", gateway["keys"]["ops"])
    assert code == 200, body
    return body


def test_status_document_shape(gateway: dict[str, Any]) -> None:
    doc = status(gateway)
    assert doc["gateway"]["workers"] == 2
    [chat] = doc["models"]
    assert chat["name"] == "chat" and chat["strategy"] == "PrefixHash"
    assert chat["features"] == ["TextGeneration"] and chat["adapters"] == []
    assert chat["ready"] == chat["desired"] == 2
    assert chat["ring"]["replication"] == 256 and chat["ring"]["meanLoadFactor"] == 125
    assert set(chat["traffic"]) >= {"requestsPerSecond", "ttftSeconds", "series", "bucketSeconds"}
    shares = 0.0
    for replica in chat["replicas"]:
        assert replica["state"] == "ready" and replica["ready"] is True
        assert replica["inFlight"] == 0 and replica["ejectedSeconds"] is None
        shares += replica["ringShare"]
    assert abs(shares - 1) < 1e-3
    def replicas_with_engine_readings() -> list[dict[str, Any]] | None:
        # Each call may reach either worker, and each scrapes its replicas on its own clock:
        # check the document that had the readings, not a later one from the other worker.
        replicas = status(gateway)["models"][0]["replicas"]
        return replicas if all(r["engine"] for r in replicas) else None

    for replica in wait_for(replicas_with_engine_readings, 15, "engine readings"):
        assert 0 <= replica["engine"]["kvUsage"] <= 1 and replica["engine"]["waiting"] >= 0


def test_traffic_is_counted_across_both_workers(gateway: dict[str, Any]) -> None:
    """Requests on new connections spread over both workers; whichever worker answers the
    status API counts all of them, while each worker's own /metrics counts only its share."""
    def total() -> int:
        return sum(b["requests"] for b in status(gateway)["models"][0]["traffic"]["series"])

    before = total()
    sent = 24
    for i in range(sent):
        with openai.OpenAI(base_url=gateway["url"] + "/v1", api_key=gateway["keys"]["team"],
                           max_retries=0) as client:  # a new connection each time
            stream = client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": f"hello {i}"}],
                max_tokens=4, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    wait_for(lambda: total() - before == sent, 15, f"{sent} requests in the status")
    for _ in range(6):  # every answer, from either worker, agrees
        doc = status(gateway)["models"][0]
        assert sum(b["requests"] for b in doc["traffic"]["series"]) - before == sent
        assert doc["traffic"]["requestsPerSecond"] > 0
        assert 0 < doc["traffic"]["ttftSeconds"]["p50"] <= doc["traffic"]["ttftSeconds"]["p99"]
        assert doc["inFlight"] == 0 and doc["waiting"] == 0
    # worker 0 alone (its own /metrics) served only part of them: the figure above is a sum
    with urllib.request.urlopen(gateway["metrics"], timeout=10) as response:
        own = sum(float(line.rsplit(" ", 1)[1]) for line in response.read().decode().splitlines()
                  if line.startswith("kvgate_requests_total{") and 'model="chat"' in line)
    assert 0 < own < sent + before, own


def test_ring_document(gateway: dict[str, Any]) -> None:
    code, ring, _ = get(gateway["url"] + "/ui/api/ring?model=chat", gateway["keys"]["ops"])
    assert code == 200, ring
    assert ring["model"] == "chat" and ring["replication"] == 256
    assert len(ring["replicas"]) == 2 and len(ring["ends"]) == len(ring["owners"]) > 2
    assert ring["ends"] == sorted(ring["ends"]) and set(ring["owners"]) == {0, 1}
    assert abs(sum(r["share"] for r in ring["replicas"]) - 1) < 1e-3
    assert ring["capacity"] == 1  # ceil(1.25 * (0 + 1) / 2)
    for url, expected in (("/ui/api/ring", 400), ("/ui/api/ring?model=nope", 404)):
        code, body, _ = get(gateway["url"] + url, gateway["keys"]["ops"])
        assert_openai_error(code, body, expected)


def test_api_needs_an_admin_key_but_the_page_does_not(gateway: dict[str, Any]) -> None:
    url = gateway["url"]
    for path in ("/ui/api/status", "/ui/api/ring?model=chat"):
        code, body, _ = get(url + path)
        assert_openai_error(code, body, 401)
        code, body, _ = get(url + path, "sk-kvg-not-a-key")
        assert_openai_error(code, body, 401)
        code, body, _ = get(url + path, gateway["keys"]["team"])
        assert_openai_error(code, body, 403)
        assert "console.adminKeys" in body["error"]["message"]
    code, page, headers = get(url + "/ui/")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert b"console.js" in page


def test_page_is_served_whole_and_offline(gateway: dict[str, Any]) -> None:
    url = gateway["url"]
    request = urllib.request.Request(url + "/ui")
    with urllib.request.urlopen(request, timeout=10) as response:  # follows the redirect
        assert response.url.endswith("/ui/") and response.status == 200
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        code, body, headers = get(f"{url}/ui/{name}")
        assert code == 200 and headers["content-type"].startswith(kind) and body
        # nothing is loaded from elsewhere: the page works offline
        assert b"https://" not in body and b"//cdn" not in body
    code, body, _ = get(url + "/ui/missing.js")
    assert_openai_error(code, body, 404)
    code, body, _ = get(url + "/ui/api/status", gateway["keys"]["ops"], method="POST")
    assert_openai_error(code, body, 405)


def test_console_is_off_by_default_in_kvgate_gateway(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_config({"chat": ["127.0.0.1:9"]}, port))
    proc = spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config)])
    try:
        wait_for_port(port)
        for path in ("/ui/", "/ui/api/status"):
            code, body, _ = get(f"http://127.0.0.1:{port}{path}")
            assert_openai_error(code, body, 404)
    finally:
        stop(proc)


def test_kvgate_status_reads_the_api_with_an_admin_key(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys.yaml")
    secret = kvgate("keys", "create", "ops", "-f", keys).stdout.strip()
    up = UpProcess(tmp_path, [sim_model("chat")], config={
        "apiKeys": {"enabled": True, "file": keys}, "console": {"adminKeys": ["ops"]}})
    try:
        wait_for(lambda: up.ready_pids("chat"), 30, "chat ready")
        refused = kvgate("status", "--state-dir", str(up.state_dir))
        assert refused.returncode == 1 and "--api-key" in refused.stderr
        shown = kvgate("status", "--state-dir", str(up.state_dir), "--api-key", secret, "--json")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert doc["gateway"]["workers"] == 1 and doc["models"][0]["traffic"]["series"]
        assert doc["models"][0]["replicas"][0]["log"]  # the control plane's part, merged in
        text = kvgate("status", "--state-dir", str(up.state_dir), "--api-key", secret).stdout
        assert "REQ/S" in text and "chat " in text
    finally:
        up.close()


def test_kvgate_status_falls_back_to_the_file_with_the_console_off(tmp_path: Path) -> None:
    up = UpProcess(tmp_path, [sim_model("chat")], config={"console": {"enabled": False}})
    try:
        wait_for(lambda: up.ready_pids("chat"), 30, "chat ready")
        code, body, _ = get(f"http://127.0.0.1:{up.port}/ui/api/status")
        assert_openai_error(code, body, 404)
        shown = kvgate("status", "--state-dir", str(up.state_dir), "--json")
        assert shown.returncode == 0, shown.stderr
        doc = json.loads(shown.stdout)
        assert "gateway" not in doc and doc["models"][0]["ready"] == 1  # the file's document
    finally:
        up.close()
