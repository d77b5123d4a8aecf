"""Flow control under saturation: priority, fairness across tenants, and exact counters after chaos.

The real gateway (``kvgate gateway --workers 2``, API keys on, static endpoints) runs in front of
simulated replicas (``kvgate_sim`` with a hardware profile, so a request takes the time a GPU
would give it), with the Model's ``replicaCapacity`` set so the replicas saturate and requests
queue in the gateway. Each round starts both fresh, measures what one request costs alone, and
runs four phases on that figure:

1. **Priority, unloaded.** A critical-class client (its API key's class) streams short chat
   completions alone, closed loop: its time to first token (TTFT), p50 and p99.
2. **Priority, loaded.** The same client while a batch-class flood arrives open loop (Poisson)
   at ``--flood`` times the replicas' capacity: the queue fills, the flood's newest requests
   are shed (429) and its oldest time out (its class deadline, 503), yet the critical client is
   served first. The ratio of its loaded to unloaded TTFT is the issue's target (≤ 2×).
3. **Fairness.** Two default-class tenants arrive open loop, one at ten times the other's rate,
   the smaller still asking more than half the capacity: both stay backlogged, and each must get
   at least 40% of the requests completed inside the window (round-robin across API keys).
4. **Chaos.** All of the above at once, plus clients that hang up at random (while queued, mid
   stream, or waiting for a whole answer), then every remaining client hangs up together. The
   gateway's queue gauges (``kvgate_queued_requests``, ``kvgate_waiting_requests``), in-flight
   per replica (``kvgate_endpoint_in_flight``) and active requests
   (``kubeai_inference_requests_active``), read from its metrics port, and the replicas' own
   running/waiting requests must all return to exactly zero.

The figures are medians over ``--rounds`` rounds (3); ``--quick`` is one short round.

    python -m bench flow [--rounds 3] [--quick] [--flood 3] [--capacity 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import (consecutive_free_ports, free_port, gateway_config, spawn, steal_seconds,
                         stop, wait_for_port)
from bench.results import check, save, table, targets_table
from lb.keys import hash_secret

HOST = "127.0.0.1"
MODEL = "m"
# tenant -> (API key secret, priority class): the class comes from the key
TENANTS = {"interactive": ("sk-flow-interactive", "critical"),
           "flood": ("sk-flow-flood", "batch"),
           "tenant-a": ("sk-flow-tenant-a", "default"),
           "tenant-b": ("sk-flow-tenant-b", "default")}
# The gauges that must read exactly zero after the chaos (any worker answers: all are shared).
GAUGES = ("kvgate_queued_requests", "kvgate_waiting_requests", "kvgate_endpoint_in_flight",
          "kubeai_inference_requests_active")
ENGINE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
TARGETS = {"ttft_ratio": 2.0, "min_share": 0.40}


@dataclass(frozen=True)
class Settings:
    """One run's knobs (seconds unless said)."""

    rounds: int
    replicas: int
    capacity: int  # replicaCapacity: requests in flight per replica
    flood: float  # the batch flood's rate, in multiples of the replicas' capacity
    ratio: float  # how much more the big tenant sends than the small one
    small_share: float  # the small tenant's rate, in multiples of its fair half of the capacity
    profile: str
    max_tokens: int  # mean output of flood and tenant requests: how long a slot stays taken
    probe_tokens: int  # output of the critical client's requests
    prompt_tokens: int  # prompt of flood and tenant requests
    probe_prompt_tokens: int  # prompt of the critical client's requests
    max_queued: int  # queue.maxQueuedPerModel (per worker)
    batch_share: float  # the batch class's capacityShare
    engine_priority: bool  # loadBalancing.priorityScheduling, the sim on vLLM's priority policy
    batch_timeout: float  # the batch class's deadline
    default_timeout: float  # the other classes' deadline
    unloaded: float
    warmup: float
    window: float
    chaos: float
    hangups: float  # hang-ups per second during the chaos
    probes: int  # concurrent critical streams
    seed: int
    quick: bool


# --- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench flow", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short round (< 1 min)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are their medians")
    p.add_argument("--replicas", type=int, default=2, help="simulated replicas")
    p.add_argument("--capacity", type=int, default=8, help="replicaCapacity of the Model")
    p.add_argument("--flood", type=float, default=3.0,
                   help="the batch flood's rate, in multiples of the replicas' capacity")
    p.add_argument("--ratio", type=float, default=10.0, help="big tenant's rate / small one's")
    p.add_argument("--small-share", type=float, default=1.25,
                   help="the small tenant's rate, in multiples of half the capacity")
    p.add_argument("--profile", default="cpu-scaled", help="the simulator's hardware profile")
    p.add_argument("--max-tokens", type=int, default=24,
                   help="mean output tokens of the load (each request: 0.5x to 1.5x)")
    p.add_argument("--probe-tokens", type=int, default=4,
                   help="output tokens of the critical client's requests")
    p.add_argument("--prompt-tokens", type=int, default=100, help="prompt tokens of the load")
    p.add_argument("--probe-prompt-tokens", type=int, default=200,
                   help="prompt tokens of the critical client's requests")
    p.add_argument("--max-queued", type=int, default=12,
                   help="queue.maxQueuedPerModel (per worker: small, so the flood is shed too)")
    p.add_argument("--batch-share", type=float, default=0.5,
                   help="the batch class's capacityShare (the default config's)")
    p.add_argument("--engine-priority", action=argparse.BooleanOptionalAction, default=True,
                   help="the Model's priorityScheduling: the replicas admit waiting requests by "
                   "their class (vLLM's --scheduling-policy priority)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        rounds=1 if quick else args.rounds, replicas=args.replicas, capacity=args.capacity,
        flood=args.flood, ratio=args.ratio, small_share=args.small_share, profile=args.profile,
        max_tokens=args.max_tokens, probe_tokens=args.probe_tokens,
        prompt_tokens=args.prompt_tokens, probe_prompt_tokens=args.probe_prompt_tokens,
        max_queued=args.max_queued, batch_share=args.batch_share,
        engine_priority=args.engine_priority,
        batch_timeout=3.0 if quick else 4.0, default_timeout=8.0 if quick else 15.0,
        unloaded=3.0 if quick else 8.0, warmup=1.0 if quick else 2.0,
        window=5.0 if quick else 12.0, chaos=3.0 if quick else 8.0, hangups=6.0, probes=2,
        seed=args.seed, quick=quick)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from(args)
    rounds = []
    for i in range(s.rounds):
        print(f"round {i + 1}/{s.rounds}", flush=True)
        rounds.append(run_round(s, s.seed + i))
        print(_round_line(rounds[-1]), flush=True)
    result = {"settings": vars(args) | {"out": str(args.out), "rounds": s.rounds,
                                        "cores": os.cpu_count(),
                                        "load_average_1m": os.getloadavg()[0]},
              "rounds": rounds, "median": _medians(rounds)}
    result["checks"] = _checks(result["median"], rounds)
    text = _markdown(result, s)
    print("\n" + text)
    written = save(args.out, "flow", result, text)
    print("wrote " + ", ".join(map(str, written)))
    return 0


# --- processes ------------------------------------------------------------------------------------

class Stack:
    """The simulator (all replicas in one process) and the gateway in front of it, fresh."""

    def __init__(self, s: Settings, tmp: Path) -> None:
        self.s = s
        self.sim_port = consecutive_free_ports(s.replicas)
        self.port, self.metrics_port = free_port(), free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.config = tmp / "gateway.yaml"
        keys = tmp / "keys.yaml"
        keys.write_text(yaml.safe_dump({"keys": [
            {"name": name, "hash": hash_secret(secret), "models": ["*"], "priority": cls}
            for name, (secret, cls) in TENANTS.items()]}, sort_keys=False))
        addresses = [f"{HOST}:{self.sim_port + i}" for i in range(s.replicas)]
        self.config.write_text(gateway_config(
            {MODEL: addresses}, self.port, metrics_port=self.metrics_port, strategy="LeastLoad",
            load_balancing={"replicaCapacity": s.capacity,
                            "priorityScheduling": s.engine_priority},
            settings={"apiKeys": {"enabled": True, "file": str(keys)}, "queue": {
                "maxQueuedPerModel": s.max_queued, "timeoutSeconds": s.default_timeout,
                "retryAfterSeconds": 1,
                "classes": [{"name": "critical", "priority": 200},
                            {"name": "default", "priority": 100},
                            {"name": "batch", "priority": 0, "timeoutSeconds": s.batch_timeout,
                             "capacityShare": s.batch_share}]}}))

    def __enter__(self) -> "Stack":
        self.procs.append(spawn([sys.executable, "-m", "kvgate_sim", "--port", str(self.sim_port),
                                 "--replicas", str(self.s.replicas), "--profile", self.s.profile,
                                 "--model-name", MODEL, "--scheduling-policy",
                                 "priority" if self.s.engine_priority else "fcfs"],
                                stderr=None))
        self.procs.append(spawn([sys.executable, "-m", "kvgate", "gateway", "-c",
                                 str(self.config), "--workers", "2"], stderr=None))
        try:
            for port in (*self.sim_ports, self.port, self.metrics_port):
                wait_for_port(port, timeout=60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_: Any) -> None:
        for proc in reversed(self.procs):
            stop(proc)

    @property
    def sim_ports(self) -> list[int]:
        return [self.sim_port + i for i in range(self.s.replicas)]


def run_round(s: Settings, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvgate-flow-") as tmp, Stack(s, Path(tmp)) as stack:
        return asyncio.run(Round(s, stack, seed).run())


# --- clients --------------------------------------------------------------------------------------

@dataclass(slots=True)
class Outcome:
    """One request as its client saw it (times from the loop's clock)."""

    tenant: str
    start: float
    ttft: float | None = None
    end: float | None = None
    status: int = 0
    code: str = ""


class Clients:
    """The benchmark's HTTP clients: streamed chat completions under each tenant's key, and raw
    connections that hang up."""

    def __init__(self, stack: Stack, s: Settings, rng: random.Random) -> None:
        self.stack, self.s, self.rng = stack, s, rng
        self.url = f"http://{HOST}:{stack.port}/v1/chat/completions"
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=120, sock_connect=10))
        self.serial = 0

    async def close(self) -> None:
        await self.http.close()

    def body(self, tenant: str, stream: bool = True) -> bytes:
        """A unique prompt (no prefix-cache hits across requests: the serial comes first) of the
        tenant's size. The load's outputs vary (0.5x to 1.5x the mean) as real ones do: equal
        lengths would keep a saturated replica's requests in lockstep, all slots freed at once."""
        self.serial += 1
        probe = tenant == "interactive"
        size = self.s.probe_prompt_tokens if probe else self.s.prompt_tokens
        text = f"request {self.serial}: ".ljust(size * 4, "x")  # ~4 characters per token
        mean = self.s.max_tokens
        tokens = self.s.probe_tokens if probe else self.rng.randint(mean // 2, mean * 3 // 2)
        return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}],
                             "max_tokens": tokens, "stream": stream})

    def headers(self, tenant: str) -> dict[str, str]:
        return {"authorization": f"Bearer {TENANTS[tenant][0]}",
                "content-type": "application/json"}

    async def stream(self, tenant: str, sink: list[Outcome]) -> Outcome:
        """One streamed chat completion; TTFT is the first non-empty content delta."""
        loop = asyncio.get_running_loop()
        out = Outcome(tenant, loop.time())
        sink.append(out)
        try:
            async with self.http.post(self.url, data=self.body(tenant),
                                      headers=self.headers(tenant)) as resp:
                out.status = resp.status
                if resp.status != 200:
                    out.code = _error_code(await resp.read())
                else:
                    async for line in resp.content:
                        if out.ttft is None and line.startswith(b"data: {") and \
                                _has_content(line):
                            out.ttft = loop.time() - out.start
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            out.code = type(exc).__name__
        except asyncio.CancelledError:
            out.code = "left"  # the client hung up (the phase ended)
            raise
        out.end = loop.time()
        return out

    async def hang_up(self, tenant: str, stream: bool, after: float, chunks: int) -> str:
        """A request on a connection of its own, dropped (TCP reset) ``after`` seconds, or after
        ``chunks`` streamed events: what the client had seen by then ("queued": no answer yet,
        "streaming", "answered", or the refusal's status)."""
        reader, writer = await asyncio.open_connection(HOST, self.stack.port)
        body = self.body(tenant, stream)
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers(tenant).items())
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n{head}"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        seen = b""
        try:
            async with asyncio.timeout(after):
                while seen.count(b"data: ") < chunks:
                    data = await reader.read(65536)
                    if not data:
                        break
                    seen += data
        except TimeoutError:
            pass
        finally:
            writer.transport.abort()
        if not seen:
            return "queued"
        status = seen[9:12].decode(errors="replace")
        if status != "200":
            return status
        return "streaming" if stream else "answered"


def _has_content(line: bytes) -> bool:
    try:
        choices = orjson.loads(line[6:]).get("choices") or ()
    except orjson.JSONDecodeError:
        return False
    return any((c.get("delta") or {}).get("content") for c in choices)


def _error_code(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["code"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unparsed"


async def open_loop(rate: float, seconds: float, rng: random.Random,
                    fire: Callable[[], Awaitable[Any]], tasks: list[asyncio.Task[Any]]) -> None:
    """Start ``fire()`` at Poisson arrivals of ``rate`` per second for ``seconds`` (open loop:
    whether earlier ones finished does not matter), adding each task to ``tasks``."""
    loop = asyncio.get_running_loop()
    due, end = loop.time(), loop.time() + seconds
    while True:
        due += rng.expovariate(rate)
        if due >= end:
            return
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(fire()))


async def finish(tasks: list[asyncio.Task[Any]], grace: float) -> int:
    """Let ``tasks`` end for ``grace`` seconds, then cancel the rest (their clients hang up);
    returns how many were cancelled."""
    pending = [t for t in tasks if not t.done()]
    if pending and grace:
        _, pending = await asyncio.wait(pending, timeout=grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return len(pending)


async def closed_loop(until: float, fire: Callable[[], Awaitable[Any]], pause: float) -> None:
    """``fire()`` again and again, ``pause`` seconds apart, until the loop's clock passes
    ``until``."""
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        await fire()
        await asyncio.sleep(pause)


# --- metrics --------------------------------------------------------------------------------------

async def scrape(http: aiohttp.ClientSession, port: int, names: tuple[str, ...]) -> dict[str, float]:
    """The sum of each named series (over its labels) on ``port``'s /metrics."""
    async with http.get(f"http://{HOST}:{port}/metrics") as resp:
        text = await resp.text()
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return totals


# --- one round ------------------------------------------------------------------------------------

class Round:
    """One round's phases on one fresh gateway and simulator."""

    def __init__(self, s: Settings, stack: Stack, seed: int) -> None:
        self.s, self.stack = s, stack
        self.rng = random.Random(seed)

    async def run(self) -> dict[str, Any]:
        self.clients = Clients(self.stack, self.s, self.rng)
        try:
            capacity = await self.calibrate()
            unloaded = await self.probes(self.s.unloaded)
            loaded, flood = await self.flooded(capacity)
            fairness = await self.fairness(capacity)
            chaos = await self.chaos(capacity)
        finally:
            await self.clients.close()
        return {"capacity": capacity, "priority": _priority(unloaded, loaded, flood),
                "fairness": fairness, "chaos": chaos}

    async def calibrate(self) -> dict[str, float]:
        """The replicas' capacity in requests/s: as many load requests as there are slots
        (``replicaCapacity`` x replicas), all at once, and how long they take on a full
        replica; and the warm-up a phase needs so its window sees requests that queued."""
        sink: list[Outcome] = []
        slots = self.s.capacity * self.s.replicas
        await asyncio.gather(*(self.clients.stream("tenant-a", sink) for _ in range(slots)))
        failed = [o for o in sink if o.status != 200]
        if failed:
            raise RuntimeError(f"calibration requests failed: {failed[:3]}")
        service = statistics.mean(o.end - o.start for o in sink if o.end is not None)
        return {"service_s": service, "slots": slots, "rps": slots / service,
                "warmup_s": max(self.s.warmup, 1.5 * service)}

    async def probes(self, seconds: float) -> list[Outcome]:
        """The critical client's streams, ``probes`` at a time, for ``seconds``."""
        sink: list[Outcome] = []
        until = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(closed_loop(until, lambda: self.clients.stream(
            "interactive", sink), 0.05) for _ in range(self.s.probes)))
        return sink

    async def flooded(self, capacity: dict[str, float]) -> tuple[list[Outcome], dict[str, Any]]:
        """The critical client's TTFT while a batch flood saturates the replicas."""
        s, sink, tasks = self.s, [], []
        rate, warmup = s.flood * capacity["rps"], capacity["warmup_s"]
        flood = asyncio.create_task(open_loop(
            rate, warmup + s.window, self.rng, lambda: self.clients.stream("flood", sink), tasks))
        sampler = Sampler(self.clients.http, self.stack.metrics_port)
        await asyncio.sleep(warmup)
        probes = await self.probes(s.window)
        await flood
        await finish(tasks, grace=1.0)
        peak = await sampler.stop()
        return probes, {"offered_rps": rate, **_tally(sink), "peak_queued": peak}

    async def fairness(self, capacity: dict[str, float]) -> dict[str, Any]:
        """Two default-class tenants, one sending ``ratio`` times more, both above their half;
        each one's share of the requests completed inside the window."""
        s, sink, tasks = self.s, [], []
        small = s.small_share * capacity["rps"] / 2
        rates = {"tenant-a": small * s.ratio, "tenant-b": small}
        loop = asyncio.get_running_loop()
        w0 = loop.time() + capacity["warmup_s"]
        w1 = w0 + s.window
        await asyncio.gather(*(open_loop(rate, w1 - loop.time(), self.rng,
                                         lambda t=tenant: self.clients.stream(t, sink), tasks)
                               for tenant, rate in rates.items()))
        await finish(tasks, grace=0.0)
        done = {t: sum(1 for o in sink if o.tenant == t and o.status == 200 and o.end is not None
                       and w0 <= o.end < w1) for t in rates}
        total = sum(done.values()) or 1
        per = {t: {"offered_rps": rates[t], "completed_rps": done[t] / s.window,
                   "share": done[t] / total, **_tally([o for o in sink if o.tenant == t])}
               for t in rates}
        return {"tenants": per, "min_share": min(p["share"] for p in per.values())}

    async def chaos(self, capacity: dict[str, float]) -> dict[str, Any]:
        """Everything at once plus random hang-ups; then everyone hangs up; then the gauges."""
        s, rng, sink, tasks, hung = self.s, self.rng, [], [], []
        loop = asyncio.get_running_loop()
        small = s.small_share * capacity["rps"] / 2
        generators = [
            open_loop(s.flood * capacity["rps"] / 2, s.chaos, rng,
                      lambda: self.clients.stream("flood", sink), tasks),
            open_loop(small * s.ratio / 2, s.chaos, rng,
                      lambda: self.clients.stream("tenant-a", sink), tasks),
            open_loop(small, s.chaos, rng, lambda: self.clients.stream("tenant-b", sink), tasks),
            open_loop(s.hangups, s.chaos, rng, lambda: self._random_hang_up(hung), tasks),
            closed_loop(loop.time() + s.chaos, lambda: self.clients.stream("interactive", sink),
                        0.05)]
        await asyncio.gather(*generators)
        cut = await finish(tasks, grace=0.0)  # every client still waiting hangs up at once
        await self.clients.http.close()  # closes every pooled connection too
        self.clients.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        settled, final = await self._settle()
        kinds = {k: hung.count(k) for k in sorted(set(hung))}
        return {"requests": len(sink) + len(hung), "hung_up": kinds, "cut_at_end": cut,
                "settle_s": settled, "final": final}

    async def _random_hang_up(self, record: list[str]) -> None:
        """A client that leaves: at a random moment, or a few chunks into its stream."""
        rng = self.rng
        tenant = rng.choice(("flood", "tenant-a", "tenant-b", "interactive"))
        stream = rng.random() < 0.7
        chunks = rng.randint(1, 6) if stream and rng.random() < 0.5 else 1 << 30
        record.append(await self.clients.hang_up(tenant, stream, rng.uniform(0.05, 2.5), chunks))

    async def _settle(self, deadline: float = 30.0) -> tuple[float | None, dict[str, float]]:
        """Seconds until every gauge reads zero in several scrapes in a row (any worker may
        answer each), and the last readings; None if they did not within ``deadline``."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        zeros = 0
        while True:
            final = await scrape(self.clients.http, self.stack.metrics_port, GAUGES)
            for port in self.stack.sim_ports:
                for name, value in (await scrape(self.clients.http, port, ENGINE_GAUGES)).items():
                    final[name] = final.get(name, 0.0) + value
            zeros = zeros + 1 if not any(final.values()) else 0
            if zeros >= 4:
                return loop.time() - start, final
            if loop.time() - start > deadline:
                return None, final
            await asyncio.sleep(0.1)


class Sampler:
    """The largest total of ``kvgate_queued_requests`` seen, scraped every 0.25 s."""

    def __init__(self, http: aiohttp.ClientSession, port: int) -> None:
        self.peak = 0.0
        self.task = asyncio.create_task(self._run(http, port))

    async def _run(self, http: aiohttp.ClientSession, port: int) -> None:
        while True:
            try:
                got = await scrape(http, port, ("kvgate_queued_requests",))
                self.peak = max(self.peak, got["kvgate_queued_requests"])
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)

    async def stop(self) -> float:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        return self.peak


# --- figures --------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _ttfts(outcomes: list[Outcome]) -> dict[str, Any]:
    values = [o.ttft for o in outcomes if o.ttft is not None and o.status == 200]
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return {"n": len(values), "failed": sum(1 for o in outcomes if o.status != 200),
            "p50_ms": p50 and p50 * 1000, "p99_ms": p99 and p99 * 1000}


def _priority(unloaded: list[Outcome], loaded: list[Outcome], flood: dict[str, Any]) -> dict[str, Any]:
    alone, busy = _ttfts(unloaded), _ttfts(loaded)
    return {"unloaded": alone, "loaded": busy, "flood": flood,
            "ratio_p50": _ratio(busy["p50_ms"], alone["p50_ms"]),
            "ratio_p99": _ratio(busy["p99_ms"], alone["p99_ms"])}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _tally(outcomes: list[Outcome]) -> dict[str, int]:
    """Requests sent, completed, shed or refused (429), timed out in the queue (503), left
    unanswered when the phase ended (their clients hung up), other."""
    completed = sum(1 for o in outcomes if o.status == 200 and o.code != "left")
    shed = sum(1 for o in outcomes if o.status == 429)
    timed_out = sum(1 for o in outcomes if o.status == 503 and o.code == "queue_timeout")
    left = sum(1 for o in outcomes if o.code == "left")
    return {"sent": len(outcomes), "completed": completed, "shed_429": shed,
            "timed_out_503": timed_out, "left": left,
            "other": len(outcomes) - completed - shed - timed_out - left}


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number over the rounds (a dict of the same shape)."""
    def walk(values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            keys = {k for v in values for k in v}
            return {k: walk([v.get(k) for v in values]) for k in sorted(keys)}
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return statistics.median(numbers) if numbers else None
    return walk(rounds)


def _checks(median: dict[str, Any], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pri, fair = median["priority"], median["fairness"]
    dirty = max(sum(r["chaos"]["final"].values()) for r in rounds)
    return [check("critical TTFT p50, loaded / unloaded", pri["ratio_p50"], TARGETS["ttft_ratio"]),
            check("critical TTFT p99, loaded / unloaded", pri["ratio_p99"], TARGETS["ttft_ratio"]),
            check("smaller share of two equal-class tenants (10x apart)", fair["min_share"],
                  TARGETS["min_share"], higher_is_better=True),
            check("queue, in-flight and active gauges after chaos (worst round)", dirty, 0)]


def _round_line(r: dict[str, Any]) -> str:
    pri, fl = r["priority"], r["priority"]["flood"]
    return (f"  capacity {r['capacity']['rps']:.1f} req/s; critical TTFT p50 "
            f"{_ms(pri['unloaded']['p50_ms'])} -> {_ms(pri['loaded']['p50_ms'])} ms "
            f"(x{_num(pri['ratio_p50'])}); flood {fl['completed']} done / {fl['shed_429']} shed / "
            f"{fl['timed_out_503']} timed out; shares min {r['fairness']['min_share']:.2f}; "
            f"chaos settled in {_num(r['chaos']['settle_s'])} s")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _markdown(result: dict[str, Any], s: Settings) -> str:
    m, rounds = result["median"], result["rounds"]
    pri, flood = m["priority"], m["priority"]["flood"]
    lines = [
        "# Flow control under saturation (`python -m bench flow`)", "",
        f"{s.replicas} simulated replicas (`{s.profile}`), `replicaCapacity: {s.capacity}` "
        f"({m['capacity']['slots']:.0f} slots; a load request takes "
        f"{m['capacity']['service_s']:.2f} s on a full replica: {m['capacity']['rps']:.1f} req/s), "
        f"the batch class's `capacityShare: {s.batch_share:g}`, "
        f"`priorityScheduling: {str(s.engine_priority).lower()}` (the replicas on vLLM's "
        f"{'priority' if s.engine_priority else 'FCFS'} policy), `kvgate gateway --workers 2`, API keys on; "
        f"medians of {len(rounds)} round(s). Load average at the end: "
        f"{result['settings']['load_average_1m']:.2f} on {os.cpu_count()} cores; steal so far "
        f"{steal_seconds():.0f} s.", "",
        "## Priority: the critical client's TTFT", "",
        table(("critical client", "requests", "TTFT p50 ms", "TTFT p99 ms"), [
            ("alone", pri["unloaded"]["n"], _ms(pri["unloaded"]["p50_ms"]),
             _ms(pri["unloaded"]["p99_ms"])),
            (f"batch flood at {s.flood:g}x capacity", pri["loaded"]["n"],
             _ms(pri["loaded"]["p50_ms"]), _ms(pri["loaded"]["p99_ms"])),
            ("ratio", "", _num(pri["ratio_p50"]), _num(pri["ratio_p99"]))]), "",
        table(("batch flood", "offered req/s", "sent", "completed", "shed (429)",
               "timed out (503)", "left at the end", "other", "peak queued"), [(
                   "median", _num(flood["offered_rps"], 1), flood["sent"], flood["completed"],
                   flood["shed_429"], flood["timed_out_503"], flood["left"], flood["other"],
                   _num(flood["peak_queued"], 0))]), "",
        "## Fairness: two tenants of one class, one sending 10x more", "",
        table(("tenant", "offered req/s", "completed req/s", "share", "shed (429)",
               "timed out (503)"), [
            (t, _num(v["offered_rps"], 1), _num(v["completed_rps"], 1), _num(v["share"]),
             v["shed_429"], v["timed_out_503"])
            for t, v in m["fairness"]["tenants"].items()]), "",
        "## Chaos: random hang-ups, then every client at once", "",
        table(("round", "requests", "hung up", "cut at the end", "settled in s",
               *GAUGES, *ENGINE_GAUGES), [
            (i + 1, r["chaos"]["requests"],
             ", ".join(f"{k} {n}" for k, n in r["chaos"]["hung_up"].items()),
             r["chaos"]["cut_at_end"], _num(r["chaos"]["settle_s"]),
             *(f"{r['chaos']['final'].get(g, 0):g}" for g in (*GAUGES, *ENGINE_GAUGES)))
            for i, r in enumerate(rounds)]), "",
        "## Checks", "",
        targets_table(result["checks"]), "",
        *(f"{'PASS' if c['met'] else 'FAIL'}: {c['target']}" for c in result["checks"]), ""]
    return "\n".join(lines)
