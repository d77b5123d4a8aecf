"""Interactive latency while a batch runs: a Batch API job of many lines and interactive streams
on the same simulated replicas, against the same streams alone.

The batch's lines run through the gateway's own routing in the lowest priority class (`batch`)
and at most ``batch.concurrency`` at once; with ``replicaCapacity`` set, an interactive request
that finds the replicas full is served before every queued line. Each round starts fresh
simulators and a fresh gateway (`kvgate gateway --workers 2`, the store in a temporary
directory), measures the interactive clients' time to first token alone, then uploads the batch
with the OpenAI SDK, measures the same clients while it runs, and waits for the batch to finish.

    python -m bench batch [--lines 10000] [--clients 4] [--seconds 20] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import openai

from bench.procs import consecutive_free_ports, free_port, gateway_config, spawn, stop, wait_for_port
from bench.results import check, save, table, targets_table

MODEL = "m"
TARGETS = {"p99_ratio": 1.5}
WARM_UP_S = 3.0  # before the first window: connections, the simulators' first steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench batch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000, help="lines in the batch")
    parser.add_argument("--clients", type=int, default=4, help="interactive streams at once")
    parser.add_argument("--seconds", type=float, default=20.0, help="each measurement window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians reported")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--capacity", type=int, default=16,
                        help="replicaCapacity: requests in flight per replica")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="batch.concurrency: the batch's lines in flight at once")
    parser.add_argument("--profile", default="cpu-scaled", help="the simulator's profile")
    parser.add_argument("--batch-share", type=float, default=0.5,
                        help="the batch class's capacityShare: its part of each replica")
    parser.add_argument("--pacing", action=argparse.BooleanOptionalAction, default=True,
                        help="the batch class's `paced` (lb.pacing), as in the default classes")
    parser.add_argument("--engine-priority", action=argparse.BooleanOptionalAction, default=True,
                        help="the Model's priorityScheduling: the replicas admit waiting requests "
                        "by their class (vLLM's --scheduling-policy priority)")
    parser.add_argument("--quick", action="store_true", help="one short round, 300 lines")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.lines, args.seconds, args.rounds = 300, 5.0, 1
    rounds = []
    for i in range(args.rounds):
        rounds.append(_round(args))
        r = rounds[-1]
        print(f"  round {i + 1}: TTFT p99 alone {r['alone']['p99_ms']:.0f} ms, with the batch "
              f"{r['with_batch']['p99_ms']:.0f} ms; batch {r['batch']['status']} "
              f"{r['batch']['completed']}/{args.lines} in {r['batch']['seconds']:.0f} s", flush=True)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
              "rounds": rounds, "median": _median(rounds)}
    result["settings"]["out"] = str(args.out)
    result["targets"] = _targets(result["median"], args.lines)
    text = _markdown(result)
    print("\n" + text)
    written = save(args.out, "batch", result, text)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def _round(args: argparse.Namespace) -> dict[str, Any]:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        sim_port = consecutive_free_ports(args.replicas)
        sims = spawn([sys.executable, "-m", "kvgate_sim", "--port", str(sim_port), "--replicas",
                      str(args.replicas), "--profile", args.profile, "--model-name", MODEL,
                      "--scheduling-policy", "priority" if args.engine_priority else "fcfs"])
        stack.callback(stop, sims)
        port = free_port()
        config = tmp / "gateway.yaml"
        config.write_text(gateway_config(
            {MODEL: [f"127.0.0.1:{sim_port + i}" for i in range(args.replicas)]}, port,
            strategy="LeastLoad", engine="Sim",
            load_balancing={"replicaCapacity": args.capacity,
                            "priorityScheduling": args.engine_priority},
            settings={"batch": {"stateDir": str(tmp / "batch"), "concurrency": args.concurrency,
                                "pollSeconds": 0.2},
                      "queue": {"classes": [  # the default classes, with the options' batch
                          {"name": "critical", "priority": 200},
                          {"name": "default", "priority": 100},
                          {"name": "batch", "priority": 0, "timeoutSeconds": 86_400,
                           "capacityShare": args.batch_share, "paced": args.pacing}]}}))
        gateway = spawn([sys.executable, "-m", "kvgate", "gateway", "-c", str(config),
                         "--workers", "2"])
        stack.callback(stop, gateway)
        for p in [*(sim_port + i for i in range(args.replicas)), port]:
            wait_for_port(p, timeout=60)
        base = f"http://127.0.0.1:{port}/v1"
        asyncio.run(_interactive(base, args.clients, WARM_UP_S, "warm-up"))  # cold paths
        alone = asyncio.run(_interactive(base, args.clients, args.seconds, "alone"))
        client = openai.OpenAI(base_url=base, api_key="bench", max_retries=2, timeout=120)
        started = time.monotonic()
        batch = client.batches.create(input_file_id=_upload(client, args.lines).id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        with_batch = asyncio.run(_interactive(base, args.clients, args.seconds, "busy"))
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.5)
            batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        return {"alone": alone, "with_batch": with_batch,
                "batch": {"status": batch.status, "seconds": time.monotonic() - started,
                          "completed": counts.completed if counts else 0,
                          "failed": counts.failed if counts else 0}}


def _upload(client: openai.OpenAI, lines: int) -> Any:
    body = "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST",
                               "url": "/v1/chat/completions",
                               "body": {"model": MODEL, "max_tokens": 8, "messages": [
                                   {"role": "user", "content": f"Summarise record {i}."}]}}) + "\n"
                   for i in range(lines))
    return client.files.create(file=("batch.jsonl", io.BytesIO(body.encode())), purpose="batch")


async def _interactive(base: str, clients: int, seconds: float, tag: str) -> dict[str, float]:
    """``clients`` closed-loop streams for ``seconds``: their times to first token."""
    ttfts: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def client(http: aiohttp.ClientSession, c: int) -> None:
        nonlocal errors
        n = 0
        while time.monotonic() < deadline:
            n += 1
            body = {"model": MODEL, "stream": True, "max_tokens": 16, "messages": [
                {"role": "user", "content": f"{tag} client {c} question {n}: what is new?"}]}
            sent = time.monotonic()
            first = None
            async with http.post(base + "/chat/completions", json=body,
                                 headers={"Authorization": "Bearer bench"}) as response:
                async for line in response.content:  # SSE lines: the first token's event
                    if first is None and _has_token(line):
                        first = time.monotonic() - sent
                if response.status != 200:
                    errors += 1
                elif first is not None:
                    ttfts.append(first)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(client(http, c) for c in range(clients)))
    ttfts.sort()
    return {"requests": len(ttfts), "errors": errors,
            "p50_ms": 1000 * _quantile(ttfts, 0.5), "p99_ms": 1000 * _quantile(ttfts, 0.99)}


def _has_token(line: bytes) -> bool:
    """An SSE ``data:`` line whose delta carries generated text (not the role-only first one)."""
    if not line.startswith(b"data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def _median(rounds: list[dict[str, Any]]) -> dict[str, float]:
    def med(path: tuple[str, str]) -> float:
        return statistics.median(r[path[0]][path[1]] for r in rounds)
    out = {f"{a}_{b}": med((a, b)) for a in ("alone", "with_batch") for b in ("p50_ms", "p99_ms")}
    out["batch_seconds"] = med(("batch", "seconds"))
    out["batch_completed"] = min(r["batch"]["completed"] for r in rounds)
    out["batch_failed"] = max(r["batch"]["failed"] for r in rounds)
    return out


def _targets(median: dict[str, float], lines: int) -> list[dict[str, Any]]:
    return [check("interactive TTFT p99 with the batch ÷ alone (median of rounds)",
                  median["with_batch_p99_ms"] / median["alone_p99_ms"], TARGETS["p99_ratio"]),
            check("batch lines completed, every round (÷ lines)",
                  median["batch_completed"] / lines, 1.0, higher_is_better=True)]


def _markdown(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["median"]
    rows = [(f"round {i + 1}", f"{r['alone']['p50_ms']:.0f}", f"{r['alone']['p99_ms']:.0f}",
             f"{r['with_batch']['p50_ms']:.0f}", f"{r['with_batch']['p99_ms']:.0f}",
             f"{r['batch']['completed']}/{r['batch']['failed']}", f"{r['batch']['seconds']:.0f}")
            for i, r in enumerate(result["rounds"])]
    rows.append(("median", f"{m['alone_p50_ms']:.0f}", f"{m['alone_p99_ms']:.0f}",
                 f"{m['with_batch_p50_ms']:.0f}", f"{m['with_batch_p99_ms']:.0f}",
                 f"{m['batch_completed']}/{m['batch_failed']}", f"{m['batch_seconds']:.0f}"))
    return "\n".join([
        f"Interactive streams ({s['clients']} closed-loop clients, {s['seconds']:g} s windows) "
        f"alone and while a {s['lines']}-line batch runs; {s['replicas']} simulated replicas "
        f"(`{s['profile']}`), replicaCapacity {s['capacity']}, batch.concurrency "
        f"{s['concurrency']}; `kvgate gateway --workers 2`.", "",
        table(("round", "alone TTFT p50 ms", "alone p99 ms", "with batch p50 ms",
               "with batch p99 ms", "lines done/failed", "batch s"), rows, "lrrrrrr"),
        "", targets_table(result["targets"])]) + "\n"
