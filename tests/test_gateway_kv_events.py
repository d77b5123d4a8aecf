"""The gateway follows its replicas' KV events: after real traffic through the gateway (the
openai SDK as client), each replica's mirror in the gateway equals what that simulated replica
really holds, the gateway's own block hashes of a request match it, and a replica restarted as a
new process is noticed and its mirror rebuilt.

Each model has its own KV-event ports: a Model's kvEvents ports are the same on every replica
(distinct Pods in Kubernetes), and two processes on one machine cannot share them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Callable

import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvgate_sim import Replica, get_profile
from kvgate_sim.kv_events import KVEventsConfig
from lb import prompt_tokens
from lb.model import Model
from lb.parse import parse_request
from lb.registry import Endpoint
from tests.gateway_harness import GatewayHarness, model_manifest

SYSTEM = "You answer questions about the sea, briefly and with care. " * 4


def sim_model(name: str, port: int, replay_port: int) -> Model:
    manifest = model_manifest(name, engine="Sim")
    manifest["spec"]["loadBalancing"]["cacheAware"] = {
        "kvEvents": {"port": port, "replayPort": replay_port, "topic": "kv-events"}}
    return Model.from_dict(manifest)


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def sim_cache(base_url: str) -> set[int]:
    with urllib.request.urlopen(base_url + "/sim/cache", timeout=10) as response:
        return set(json.loads(response.read())["block_hashes"])


def kv_event_samples(gw: GatewayHarness) -> dict[tuple[str, tuple[str, str]], float]:
    """The gateway's kvgate_kv_events_* samples by (name, (model, endpoint))."""
    with urllib.request.urlopen(gw.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, (s.labels["model"], s.labels["endpoint"])): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("kvgate_kv_events_")}


def mirror(gw: GatewayHarness, key: str) -> tuple[bool, set[int]]:
    def read() -> tuple[bool, set[int]]:
        replica = gw.gateway.kv_events.index.get(key)
        return (False, set()) if replica is None else (replica.trusted, set(replica.blocks))
    return gw.on_loop(read)


def mirrors_cache(gw: GatewayHarness, key: str, base_url: str) -> bool:
    trusted, blocks = mirror(gw, key)
    return trusted and blocks == sim_cache(base_url)


def conversation(client: openai.OpenAI, model: str, topic: str, turns: int) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Tell me about {topic}, part {turn}. " * 6})
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    return messages


def request_hashes(model: str, messages: list[dict]) -> list[int]:
    parsed = parse_request("chat", orjson.dumps({"model": model, "messages": messages}),
                           b"application/json")
    return prompt_tokens.SIM.block_hashes(prompt_tokens.SIM.token_ids(parsed))


def test_the_gateway_mirrors_each_replicas_cache(gw: GatewayHarness) -> None:
    async def start(name: str, kv_blocks: int) -> Replica:
        events = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*",
                                topic="kv-events")
        replica = Replica(get_profile("fast", num_kv_blocks=kv_blocks), name, kv_events=events)
        return await replica.start()

    replicas = {"sea": gw.run(start("sea", 64)), "lake": gw.run(start("lake", 4096))}
    try:
        for name, replica in replicas.items():
            events = replica.server.kv_events
            port, replay = (int(e.rsplit(":", 1)[1])
                            for e in (events.endpoint, events.replay_endpoint))
            gw.on_loop(gw.registry.set_model, sim_model(name, port, replay))
            gw.set_endpoints(name, [Endpoint(f"{name}/0", replica.address)])
        for name, replica in replicas.items():
            wait_for(lambda: mirror(gw, f"{name}/0")[0], what=f"{name} trusted")
        client = gw.client()
        last: dict[str, list[dict]] = {}
        for i in range(6):
            for name in replicas:
                last[name] = conversation(client, name, f"{name} waves {i}", turns=3)
        assert replicas["sea"].snapshot()["engine"]["evicted_blocks"] > 0  # removals flowed
        for name, replica in replicas.items():
            wait_for(lambda: mirrors_cache(gw, f"{name}/0", replica.url),
                     what=f"{name} mirror equal to its cache")
        index = gw.gateway.kv_events.index
        hashes = {}
        for name in replicas:
            # the prompt the replica last served, minus the reply it has not seen as a prompt
            hashes[name] = request_hashes(name, last[name][:-1])
            assert gw.on_loop(index.match, f"{name}/0", hashes[name]) == len(hashes[name]) > 4
        # the mirrors are on the gateway's /metrics, as they stand
        samples = kv_event_samples(gw)
        for name in replicas:
            key = (name, f"{name}/0")
            assert samples["kvgate_kv_events_blocks", key] == len(mirror(gw, f"{name}/0")[1]) > 4
            assert samples["kvgate_kv_events_trusted", key] == 1
            assert samples["kvgate_kv_events_batches_total", key] > 0
            assert samples["kvgate_kv_events_decode_errors_total", key] == 0
        # the other model's prompt: only the blocks of the system prompt both share
        shared = next(i for i, (a, b) in enumerate(zip(hashes["sea"], hashes["lake"])) if a != b)
        assert 0 < shared < len(hashes["lake"])
        assert gw.on_loop(index.match, "sea/0", hashes["lake"]) == shared
        assert gw.on_loop(index.match, "sea/0", request_hashes("sea", [
            {"role": "system", "content": "Another system prompt. " * 9}])) == 0
        # a replica that leaves its model is no longer followed
        gw.set_endpoints("lake", [])
        wait_for(lambda: gw.on_loop(index.get, "lake/0") is None, what="lake unfollowed")
        assert gw.on_loop(index.trusted, "sea/0")
    finally:
        for replica in replicas.values():
            gw.run(replica.stop())


# -- a replica as its own process, restarted ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SimProcess:
    """`python -m kvgate_sim` with --kv-events-config, on fixed ports (restartable on them)."""

    def __init__(self, http_port: int, port: int, replay_port: int) -> None:
        self.http_port = http_port
        self.config = json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                  "endpoint": f"tcp://*:{port}",
                                  "replay_endpoint": f"tcp://*:{replay_port}",
                                  "topic": "kv-events"})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvgate_sim", "--port", str(self.http_port), "--model-name",
             "tide", "--profile", "fast", "--kv-blocks", "256",
             "--kv-events-config", self.config],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
        wait_for(self._healthy, what="the simulator process")

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.proc.stdout.read()
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def sim_process() -> Any:
    processes: list[SimProcess] = []

    def make() -> SimProcess:
        process = SimProcess(free_port(), free_port(), free_port())
        processes.append(process)
        return process

    yield make
    for process in processes:
        process.kill()


def test_a_restarted_replica_is_noticed_and_its_mirror_rebuilt(gw: GatewayHarness,
                                                               sim_process: Any) -> None:
    sim = sim_process()
    sim.start()
    port = int(sim.config.split("tcp://*:")[1].split('"')[0])
    replay = int(sim.config.split("tcp://*:")[2].split('"')[0])
    gw.on_loop(gw.registry.set_model, sim_model("tide", port, replay))
    gw.set_endpoints("tide", [Endpoint("tide/0", f"127.0.0.1:{sim.http_port}")])
    client = gw.client()
    conversation(client, "tide", "currents", turns=4)
    wait_for(lambda: mirrors_cache(gw, "tide/0", sim.url), what="mirror of the first process")
    first = mirror(gw, "tide/0")[1]
    assert first

    sim.kill()
    wait_for(lambda: not mirror(gw, "tide/0")[0], what="untrusted once the replica is gone")
    sim.start()  # a new process on the same ports: empty cache, sequence from 0 again
    wait_for(lambda: mirrors_cache(gw, "tide/0", sim.url), what="rebuilt mirror")
    assert mirror(gw, "tide/0")[1] == set()
    replica = gw.on_loop(gw.gateway.kv_events.index.get, "tide/0")
    assert replica.rebuilds >= 2 and replica.connected

    messages = conversation(client, "tide", "tides", turns=2)
    wait_for(lambda: mirrors_cache(gw, "tide/0", sim.url), what="mirror of the new process")
    hashes = request_hashes("tide", messages[:-1])
    assert gw.on_loop(gw.gateway.kv_events.index.match, "tide/0", hashes) == len(hashes)
    gone = first - sim_cache(sim.url)  # what only the first process held
    assert gone and not gone & mirror(gw, "tide/0")[1]
