"""`python -m kvgate_sim` runs for real: several replicas, serving, clean exit on SIGTERM."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from kvgate_sim.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


async def test_cli_starts_replicas_and_stops_on_sigterm():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvgate_sim", "--port", "0", "--replicas", "2", "--profile", "fast",
        "--served-model-name", "cli-model", "--startup-delay", "0.2", "--kv-blocks", "128",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        urls = []
        for _ in range(2):
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line.startswith("sim replica"), line
            urls.append(line.split()[3])
        assert len(set(urls)) == 2
        async with aiohttp.ClientSession() as http:
            async with http.get(urls[0] + "/health") as resp:
                assert resp.status == 503  # still in its startup delay
            await asyncio.sleep(0.25)
            for url in urls:
                async with http.get(url + "/health") as resp:
                    assert resp.status == 200
            body = {"model": "cli-model", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3}
            async with http.post(urls[1] + "/v1/chat/completions", json=body) as resp:
                assert (await resp.json())["usage"]["completion_tokens"] == 3
            async with http.get(urls[1] + "/metrics") as resp:
                assert 'num_gpu_blocks="128"' in await resp.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_rejects_bad_settings(capsys):
    assert main(["--replicas", "0"]) == 2
    assert main(["--error-rate", "3"]) == 2
    assert main(["--slowdown", "0.5"]) == 2  # a factor below 1 would be a speed-up
    assert build_parser().parse_args(["--slowdown", "3"]).slowdown == 3.0
    assert main(["--list-profiles"]) == 0
    assert "l4-llama3.1-8b" in capsys.readouterr().out
    args = build_parser().parse_args(["--max-num-seqs", "8", "--lora-modules", "a=/x"])
    assert args.max_num_seqs == 8 and args.lora_modules == ["a=/x"]


def test_simulator_depends_on_neither_plane_nor_bench():
    """The simulator is a product engine on its own: importing every module of it loads nothing
    from the gateway, the operator or the benchmarks."""
    modules = sorted(p.stem for p in (ROOT / "sim").glob("*.py") if p.stem != "__main__")
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module('kvgate_sim.' + m if m != '__init__' else 'kvgate_sim')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lb', 'lb_operator', 'bench'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                         check=True)
    assert out.stdout.strip() == "[]"


async def test_cli_publishes_kv_events_per_replica():
    """vLLM's --kv-events-config: each replica of the process publishes on its own sockets and
    says where; a bad config is refused before anything starts."""
    config = ('{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv-events",'
              ' "endpoint": "tcp://127.0.0.1:*", "replay_endpoint": "tcp://127.0.0.1:*"}')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvgate_sim", "--port", "0", "--replicas", "2", "--profile", "fast",
        "--kv-events-config", config, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 20)).decode() for _ in range(2)]
        endpoints = [dict(w.split("=", 1) for w in line.split() if "=" in w) for line in lines]
        for e in endpoints:
            assert e["kv-events"].startswith("tcp://127.0.0.1:") and e["replay"] != e["kv-events"]
        assert endpoints[0]["kv-events"] != endpoints[1]["kv-events"]
        async with aiohttp.ClientSession() as http:
            async with http.get(lines[1].split()[3] + "/sim/stats") as resp:
                events = (await resp.json())["kv_events"]
        assert events["endpoint"] == endpoints[1]["kv-events"] and events["topic"] == "kv-events"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert main(["--kv-events-config", '{"enable_kv_cache_events": 1}']) == 2
    assert main(["--kv-events-config", "not json"]) == 2
