"""Reproduce KubeAI's prefix-hash study on this machine: strategies x concurrency, one command.

    python -m bench routing [--quick] [--workload multi-turn|shared-prefix|system-prompt|documents|
                                                  agentic|unique]
                            [--concurrency 40,80,160,200] [--replicas 8]
                            [--strategies Random,LeastLoad,PrefixHash|all] [--out bench/results]
                            [--endpoints host:port,...]

For every (concurrency, strategy) pair it starts fresh simulated vLLM replicas (one
`python -m kvgate_sim --replicas N` process: cold KV caches every run), the real gateway in
static-endpoints mode with that strategy, and drives them with the closed-loop load generator
(`bench.loadgen`, in this process). Replica counters (vLLM's /metrics) are scraped at the edges of
the measurement window, so warm-up traffic is excluded everywhere. Results go to
`<out>/<workload>.json`, `.md` and two PNG charts; one progress line is printed per run.
`--redraw RESULTS.json` rebuilds the markdown and charts of a saved run.

With `--endpoints` the study skips the simulator and measures real model servers (e.g. vLLM on
GPUs); it cannot restart them, so it asks each for `POST /reset_prefix_cache` between runs.

Why the load generator lives in this process: it is the cheapest option on two cores (no IPC,
one interpreter), and its CPU is still measured on its own (this process does nothing else
during the window) and reported next to the gateway's and the simulator's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Optional

import aiohttp

from bench import report
from bench.loadgen import LoadConfig, LoadGenerator, LoadResult, ThreadPool
from bench.procs import (consecutive_free_ports, cpu_seconds, free_port, gateway_config, spawn,
                         stop)
from kvgate_sim.metrics import parse_metrics
from kvgate_sim.profiles import get_profile, scale_profile

REPO = Path(__file__).resolve().parents[2]
ORACLE = "Oracle"
# What `--strategies` accepts: a name for each gateway setting under test, with the Model's
# `spec.loadBalancing` it runs (strategy, then the settings added to it).
VARIANTS: dict[str, tuple[str, dict]] = {
    "Random": ("Random", {}),
    "LeastLoad": ("LeastLoad", {}),
    "PrefixHash": ("PrefixHash", {}),  # KubeAI's key: the first user message's 100 characters
    # The key is the conversation from its start; 2,000 characters lie inside any system
    # prompt of the system-prompt workload, so its requests key on their application.
    "PrefixHash+Conversation": ("PrefixHash", {"prefixHash": {"prefixFrom": "Conversation",
                                                              "prefixCharLength": 2000}}),
    "PrefixHash+Tokens": ("PrefixHash", {"loadUnit": "Tokens"}),
    "LeastQueue": ("LeastQueue", {}),
    # Scheduler II: the gateway's own prefix index (approximate) ...
    "CacheAware": ("CacheAware", {}),
    # ... and the replicas' KV events on top (precise; ports are chosen per run).
    "CacheAware+KVEvents": ("CacheAware", {"cacheAware": {"kvEvents": {}}}),
    # CacheAware's earlier scoring, a weighted sum of normalised scores (for comparison).
    "CacheAware+Weights": ("CacheAware", {"cacheAware": {"scoring": "Weights"}}),
    # The limit, not a gateway: the simulator's own router (sim/oracle.py), which reads every
    # replica's true cache and queue at pick time. Simulated replicas only.
    "Oracle": (ORACLE, {}),
}
STRATEGIES = ("Random", "LeastLoad", "PrefixHash")  # the default: KubeAI's comparison
PRESETS = {"kubeai": list(STRATEGIES), "all": list(VARIANTS),
           # what Scheduler II is judged on: CacheAware against KubeAI's PrefixHash (LeastLoad
           # on the control), each as a ratio to the oracle
           "cache-aware": ["LeastLoad", "PrefixHash", "CacheAware", "CacheAware+KVEvents",
                           ORACLE]}
# LeastQueue reads the replicas' queues from their /metrics; every 0.5 s rather than the
# default 2 s, so a queue that forms is seen within a few steps.
GATEWAY_SETTINGS = {"engineMetrics": {"intervalSeconds": 0.5}}
WORKLOADS = {"multi-turn": "multi-turn", "shared-prefix": "shared-prefix",
             "system-prompt": "system-prompt", "documents": "documents", "agentic": "agentic",
             "unique": "unique-prompts", "unique-prompts": "unique-prompts"}
# The sweeps go through the knee of PrefixHash's load curve (bench.report.knee), where the
# replicas saturate and CacheAware is judged: at 160 threads each replica's share of the
# conversations still fits its cache, at 200 queues form (multi-turn and agentic, cpu-scaled).
DEFAULTS = {  # (concurrency, warm-up s, window s, drain cap s, simulator clock)
    "full": ([40, 80, 160, 200], 20.0, 40.0, 30.0, 1.0),
    "quick": ([160, 200], 8.0, 15.0, 10.0, 0.5),
}
# The cpu-scaled replica (one eighth of an L4) with twice its KV blocks: our threads carry
# longer contexts than KubeAI's, and at the top concurrency each replica's share of the threads
# must fit its cache under PrefixHash while all threads together are ~6x one cache (see
# bench/README.md). Clock at L4 speed: the token rate stays far below what two cores can carry.
# The control's prompts carry as much new text as a multi-turn turn adds (its user message plus
# the previous reply, ~250 characters): the same uncached work per request as multi-turn under
# ideal routing, with nothing to reuse. Prompts the size of whole late conversations saturate
# the replicas at these concurrencies, and then balance, not prefixes, decides (bench/README.md).
WORKLOAD_PARAMS: dict[str, dict] = {"unique-prompts": {"prompt_chars": (100, 400)}}
# The control sweeps below saturation. With only 20 threads per replica at 160, Random's
# imbalance (relative spread ~1/sqrt(threads per replica), ~22% here against ~8% at KubeAI's
# 150 per replica) queues requests on the busiest replicas, and balance rather than prefixes
# decides TTFT (bench/README.md). The control asks whether prefix routing costs anything when
# nothing is shared, so it runs where queueing does not dominate.
WORKLOAD_CONCURRENCY = {"unique-prompts": [20, 40, 80], "system-prompt": [20, 40]}
# The system-prompt comparison runs five or six strategies: shorter runs keep it near ten
# minutes. 15 s of warm-up covers the cold prefill of each replica's share of the system
# prompts (~3 prompts of ~2,500 tokens at ~1.1k tokens/s). (warm-up s, window s)
WORKLOAD_TIMING = {"system-prompt": (15.0, 30.0)}
# Threads made before the runs (generating text mid-run would stall the load generator's loop):
# one question per thread, so a run uses about one thread per request.
WORKLOAD_POOL = {"system-prompt": 3000}
# The H200 profile keeps the same KV blocks per replica (the workloads are sized to them), so the
# two profiles differ in what the hardware measured: the costs of a step, prefill and context.
SIM_DEFAULTS = {"cpu-scaled": {"num_kv_blocks": 1280}, "cpu-scaled-h200": {"num_kv_blocks": 1280}}
# The clock per profile, times the run's (1 full, 0.5 quick): an H200 step is ~4x faster than
# an L4's, so its simulated clock runs 4x slower to keep the token rate within two cores. TTFT
# ratios between strategies do not depend on the clock; absolute times scale with it.
CLOCK_FACTOR = {"cpu-scaled": 1.0, "cpu-scaled-h200": 4.0}
# Above these a component may be distorting the numbers instead of routing (cores, 0..1 busy).
CPU_LIMITS = {"gateway": 0.8, "loadgen": 0.8, "simulator": 0.9, "machine": 0.92, "other": 0.3}


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench routing", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="160 and 200 threads, short runs")
    p.add_argument("--workload", default="multi-turn", choices=sorted(WORKLOADS))
    p.add_argument("--concurrency", type=_int_list, help="comma-separated thread counts")
    p.add_argument("--strategies", type=_str_list, default=list(STRATEGIES),
                   help=f"comma-separated, of {', '.join(VARIANTS)}; or a preset: "
                        f"{', '.join(PRESETS)} (default: {','.join(STRATEGIES)})")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--warmup", type=float, help="seconds excluded before each window")
    p.add_argument("--duration", type=float, help="seconds of each measurement window")
    p.add_argument("--drain", type=float, help="cap on waiting for window requests to end")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole sweep this many times; the tables and checks use the "
                        "median of each figure over the rounds (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="sim-llama", help="served model name")
    p.add_argument("--load-factor", type=int, default=125, help="PrefixHash meanLoadFactor")
    p.add_argument("--conversation-chars", type=int, default=2000, metavar="N",
                   help="prefixCharLength of PrefixHash+Conversation (default 2000)")
    p.add_argument("--pin", choices=("none", "split"), default="none",
                   help="split: simulator on CPU 0, gateway and load generator on CPU 1")
    p.add_argument("--prompt-chars", type=_int_list, metavar="LO,HI",
                   help="unique workload: characters per prompt (default 100,400)")
    p.add_argument("--system-prompts", type=int, metavar="N",
                   help="system-prompt workload: distinct applications (default 24)")
    p.add_argument("--ramp", type=float, default=5.0,
                   help="seconds over which the threads start (desynchronizes them)")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--tag", default="", help="suffix for result file names")
    p.add_argument("--redraw", type=Path, nargs="+", metavar="RESULTS.json",
                   help="rebuild the markdown and charts of saved runs, and run nothing")
    sim = p.add_argument_group("simulated replicas (ignored with --endpoints)")
    sim.add_argument("--profile", default="cpu-scaled")
    sim.add_argument("--capacity", type=float,
                     help="shrink --profile by this factor (see sim/profiles.py)")
    sim.add_argument("--time-scale", type=float)
    sim.add_argument("--kv-blocks", type=int)
    sim.add_argument("--max-num-seqs", type=int)
    sim.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--endpoints", type=_str_list,
                   help="host:port,... of running OpenAI-compatible replicas (skip the simulator)")
    return p


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass
class Settings:
    workload: str
    concurrency: list[int]
    strategies: list[str]
    replicas: int
    warmup_s: float
    duration_s: float
    drain_s: float
    seed: int
    model: str
    load_factor: int
    pin: str
    profile: str
    sim_overrides: dict = field(default_factory=dict)
    endpoints: Optional[list[str]] = None
    workload_params: dict = field(default_factory=dict)
    ramp_s: float = 5.0
    capacity: Optional[float] = None
    conversation_chars: int = 2000
    rounds: int = 1

    def load_balancing(self, variant: str) -> tuple[str, dict]:
        """The strategy and extra `spec.loadBalancing` settings of a variant in this run."""
        strategy, extra = VARIANTS[variant]
        if "prefixHash" in extra and extra["prefixHash"].get("prefixFrom") == "Conversation":
            extra = {**extra, "prefixHash": {**extra["prefixHash"],
                                             "prefixCharLength": self.conversation_chars}}
        return strategy, extra

    def sim_profile(self) -> dict:
        """The replicas' effective parameters, as the simulator will build them."""
        base = get_profile(self.profile)
        if self.capacity is not None:
            base = scale_profile(base, self.capacity)
        return base.with_overrides(**self.sim_overrides).describe()

    @property
    def control(self) -> bool:
        return self.workload == "unique-prompts"


def settings_from_args(args: argparse.Namespace) -> Settings:
    conc, warmup, duration, drain, clock = DEFAULTS["quick" if args.quick else "full"]
    if not args.quick:
        warmup, duration = WORKLOAD_TIMING.get(WORKLOADS[args.workload], (warmup, duration))
    strategies = expand_strategies(args.strategies)
    if args.endpoints and ORACLE in strategies:
        raise SystemExit("the Oracle reads the simulated replicas' state: not with --endpoints")
    overrides = {**SIM_DEFAULTS.get(args.profile, {})}
    if args.profile in CLOCK_FACTOR:
        overrides["time_scale"] = clock * CLOCK_FACTOR[args.profile]
    overrides.update({k: v for k, v in (("time_scale", args.time_scale),
                                   ("num_kv_blocks", args.kv_blocks),
                                   ("max_num_seqs", args.max_num_seqs),
                                   ("max_num_batched_tokens", args.max_num_batched_tokens))
                      if v is not None})
    return Settings(
        workload=WORKLOADS[args.workload],
        concurrency=args.concurrency or _default_concurrency(WORKLOADS[args.workload], conc,
                                                             args.quick),
        strategies=strategies, replicas=len(args.endpoints) if args.endpoints
        else args.replicas, warmup_s=_pick(args.warmup, warmup),
        duration_s=_pick(args.duration, duration), drain_s=_pick(args.drain, drain),
        seed=args.seed, model=args.model, load_factor=args.load_factor, pin=args.pin,
        profile=args.profile, sim_overrides=overrides, endpoints=args.endpoints,
        workload_params=_workload_params(WORKLOADS[args.workload], args.prompt_chars,
                                         args.system_prompts),
        ramp_s=args.ramp, capacity=args.capacity, conversation_chars=args.conversation_chars,
        rounds=max(1, args.rounds))


def expand_strategies(names: list[str]) -> list[str]:
    """Variant names with presets expanded, in the given order, each once."""
    out: list[str] = []
    for name in names:
        for variant in PRESETS.get(name, [name]):
            if variant not in VARIANTS:
                raise SystemExit(f"unknown strategy {variant!r}; known: {', '.join(VARIANTS)} "
                                 f"or a preset ({', '.join(PRESETS)})")
            if variant not in out:
                out.append(variant)
    return out


def _default_concurrency(workload: str, sweep: list[int], quick: bool) -> list[int]:
    control = WORKLOAD_CONCURRENCY.get(workload)
    if control is None:
        return sweep
    return control[-1:] if quick else control


def _workload_params(workload: str, prompt_chars: Optional[list[int]],
                     system_prompts: Optional[int] = None) -> dict:
    params = dict(WORKLOAD_PARAMS.get(workload, {}))
    if system_prompts is not None:
        if workload != "system-prompt" or system_prompts < 1:
            raise SystemExit("--system-prompts N (>= 1) applies to --workload system-prompt only")
        params["prompts"] = system_prompts
    if prompt_chars:
        if workload != "unique-prompts" or len(prompt_chars) != 2:
            raise SystemExit("--prompt-chars LO,HI applies to --workload unique only")
        params["prompt_chars"] = tuple(prompt_chars)
    return params


def _pick(value: Optional[float], default: float) -> float:
    return default if value is None else value


# --- processes -----------------------------------------------------------------------------------

def launch(cmd: list[str], log: Path, cpu: Optional[int] = None) -> subprocess.Popen[bytes]:
    """Start a child from the repo root, output to a log file (a pipe nobody reads could fill
    and stall it mid-run), optionally pinned to one CPU."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log, "ab") as fh:
        return spawn(cmd, cpu, stdout=fh, stderr=subprocess.STDOUT, env=env)


class Stack:
    """Simulator + gateway for one run; `async with Stack(...)` starts and stops both."""

    def __init__(self, s: Settings, strategy: str, workdir: Path, sim_port: int) -> None:
        self.s = s
        self.strategy = strategy
        self.workdir = workdir
        self.sim_port = sim_port
        self.gateway_port = free_port()
        self.sim: Optional[subprocess.Popen[bytes]] = None
        self.gateway: Optional[subprocess.Popen[bytes]] = None
        self.addresses = s.endpoints or [f"127.0.0.1:{sim_port + i}" for i in range(s.replicas)]
        self.kv_port = 0  # the first KV-event port, when the variant follows KV events
        # The oracle replaces the gateway: the simulator serves it, on its own port.
        self.oracle_port = free_port() if strategy == ORACLE else 0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.oracle_port or self.gateway_port}/v1"

    def _cpus(self) -> tuple[Optional[int], Optional[int]]:
        return (0, 1) if self.s.pin == "split" else (None, None)

    def _sim_cmd(self) -> list[str]:
        s = self.s
        cmd = [sys.executable, "-m", "kvgate_sim", "--port", str(self.sim_port), "--replicas",
               str(s.replicas), "--profile", s.profile, "--model-name", s.model,
               "--seed", str(s.seed)]
        flags = {"time_scale": "--time-scale", "num_kv_blocks": "--kv-blocks",
                 "max_num_seqs": "--max-num-seqs",
                 "max_num_batched_tokens": "--max-num-batched-tokens"}
        for key, value in s.sim_overrides.items():
            cmd += [flags[key], str(value)]
        if s.capacity is not None:
            cmd += ["--capacity", str(s.capacity)]
        if self.oracle_port:
            cmd += ["--oracle-port", str(self.oracle_port)]
        if self.kv_port:  # replica i publishes on port + i and replays on port + n + i
            cmd += ["--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv",
                "endpoint": f"tcp://*:{self.kv_port}",
                "replay_endpoint": f"tcp://*:{self.kv_port + s.replicas}"})]
        return cmd

    def _follows_kv_events(self, balancing: dict) -> dict:
        """For a KV-events variant on the simulator: ports for this run, in the Model."""
        if "kvEvents" not in balancing.get("cacheAware", {}) or self.s.endpoints:
            return balancing
        self.kv_port = consecutive_free_ports(2 * self.s.replicas)
        events = {"port": self.kv_port, "replayPort": self.kv_port + self.s.replicas,
                  "topic": "kv"}
        return {**balancing, "cacheAware": {**balancing["cacheAware"], "kvEvents": events}}

    async def __aenter__(self) -> "Stack":
        sim_cpu, gw_cpu = self._cpus()
        if self.oracle_port:
            try:
                self.sim = launch(self._sim_cmd(), self.workdir / "sim.log", sim_cpu)
                await self._ready()
            except BaseException:
                await self.__aexit__()
                raise
            return self
        config = self.workdir / f"gateway-{self.strategy}.yaml"
        strategy, balancing = self.s.load_balancing(self.strategy)
        balancing = self._follows_kv_events(balancing)
        config.write_text(gateway_config({self.s.model: self.addresses}, self.gateway_port,
                                         strategy=strategy, load_factor=self.s.load_factor,
                                         load_balancing=balancing, settings=GATEWAY_SETTINGS,
                                         engine="Sim" if self.kv_port else "VLLM",
                                         kv_port_offsets=bool(self.kv_port)))
        try:
            if not self.s.endpoints:
                self.sim = launch(self._sim_cmd(), self.workdir / "sim.log", sim_cpu)
            self.gateway = launch([sys.executable, "-m", "kvgate", "gateway", "-c", str(config)],
                                  self.workdir / "gateway.log", gw_cpu)
            await self._ready()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _ready(self) -> None:
        front = self.oracle_port or self.gateway_port
        ports = [front] + [int(a.rsplit(":", 1)[1]) for a in self.addresses]
        hosts = ["127.0.0.1"] + [a.rsplit(":", 1)[0] for a in self.addresses]
        for host, port in zip(hosts, ports):
            await _wait_port(host, port, 60.0)
        for proc, name in ((self.sim, "simulator"), (self.gateway, "gateway")):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the {name} exited at start; see {self.workdir}")
        async with aiohttp.ClientSession() as http:
            for a in self.addresses:
                await _wait_http_ok(http, f"http://{a}/health")
            await _wait_http_ok(http, f"http://127.0.0.1:{self.oracle_port}/health"
                                if self.oracle_port else
                                f"http://127.0.0.1:{self.gateway_port}/readyz")
            if self.s.endpoints:
                await reset_prefix_caches(http, self.addresses)

    async def __aexit__(self, *_exc: object) -> None:
        procs = [p for p in (self.gateway, self.sim) if p is not None]
        await asyncio.gather(*(asyncio.to_thread(stop, p, 5.0) for p in procs))

    def pids(self) -> dict[str, int]:
        out = {"loadgen": os.getpid()}
        if self.gateway is not None:
            out["gateway"] = self.gateway.pid
        if self.sim is not None:
            out["simulator"] = self.sim.pid
        return out


async def _wait_port(host: str, port: int, timeout: float) -> None:
    """Wait until something accepts connections on host:port. On the event loop, not in a
    thread, so a cancelled run (SIGTERM) is not kept waiting for a port that will never open."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s")
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return


async def _wait_http_ok(http: aiohttp.ClientSession, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout:g}s")
        await asyncio.sleep(0.1)


async def reset_prefix_caches(http: aiohttp.ClientSession, addresses: list[str]) -> None:
    """External replicas cannot be restarted: ask them to drop their prefix caches instead
    (vLLM serves this only with VLLM_SERVER_DEV_MODE=1; we warn when it is refused)."""
    for a in addresses:
        try:
            async with http.post(f"http://{a}/reset_prefix_cache") as resp:
                if resp.status != 200:
                    print(f"  warning: {a} refused /reset_prefix_cache ({resp.status}); "
                          "its cache stays warm", flush=True)
        except aiohttp.ClientError as exc:
            print(f"  warning: {a}: /reset_prefix_cache failed: {exc}", flush=True)


# --- measuring -----------------------------------------------------------------------------------

_COUNTERS = {
    "hits": "vllm:prefix_cache_hits_total", "queries": "vllm:prefix_cache_queries_total",
    "requests": "vllm:request_success_total", "preemptions": "vllm:num_preemptions_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "ttft_sum": "vllm:time_to_first_token_seconds_sum",
    "ttft_count": "vllm:time_to_first_token_seconds_count",
}


async def scrape(http: aiohttp.ClientSession, addresses: list[str]) -> list[dict]:
    """vLLM counters of every replica (summed over label sets), e.g. {"hits": 1200.0, ...}."""
    async def one(a: str) -> dict:
        async with http.get(f"http://{a}/metrics") as resp:
            samples = parse_metrics(await resp.text())
        return {k: sum(v for _, v in samples.get(name, ())) for k, name in _COUNTERS.items()}
    return list(await asyncio.gather(*(one(a) for a in addresses)))


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Window:
    """CPU and replica counters sampled at the measurement window's edges."""

    def __init__(self, http: aiohttp.ClientSession, stack: Stack) -> None:
        self.http = http
        self.stack = stack
        self.before: list[dict] = []
        self.after: list[dict] = []
        self.cpu: dict[str, float] = {}
        self._t = 0.0
        self._proc: dict[str, float] = {}
        self._machine = (0.0, 0.0)

    def _proc_cpu(self) -> dict[str, float]:
        out = {}
        for name, pid in self.stack.pids().items():
            out[name] = time.process_time() if name == "loadgen" else cpu_seconds(pid)
        return out

    async def start(self) -> None:
        self._t, self._proc, self._machine = time.monotonic(), self._proc_cpu(), machine_busy()
        self.before = await scrape(self.http, self.stack.addresses)

    async def end(self) -> None:
        self.after = await scrape(self.http, self.stack.addresses)
        wall = time.monotonic() - self._t
        now = self._proc_cpu()
        self.cpu = {k: round((now[k] - self._proc[k]) / wall, 3) for k in now}
        busy, total = machine_busy()
        self.cpu["machine"] = round((busy - self._machine[0]) / max(total - self._machine[1], 1),
                                    3)
        ours = sum(v for k, v in self.cpu.items() if k != "machine")
        # Cores used by processes outside the benchmark (a shared machine skews every number).
        self.cpu["other"] = round(max(0.0, self.cpu["machine"] * (os.cpu_count() or 1) - ours), 3)


def warnings_for(cpu: dict[str, float], client: dict) -> list[str]:
    out = [f"{name} used {cpu[name]:.2f} {'of all CPU' if name == 'machine' else 'cores'} "
           f"(limit {limit}): "
           + ("other processes competed for the CPU" if name == "other" else
              "it may be a bottleneck")
           for name, limit in CPU_LIMITS.items() if name in cpu and cpu[name] > limit]
    if client["failed"]:
        out.append(f"{client['failed']} failed requests, e.g. {client['errors'][:2]}")
    if client["unfinished"]:
        out.append(f"{client['unfinished']} requests still open at the drain cap "
                   "(TTFT counted as a lower bound)")
    return out


async def run_one(s: Settings, pool: ThreadPool, strategy: str, concurrency: int,
                  workdir: Path, sim_port: int) -> dict:
    """One (strategy, concurrency) measurement on freshly started replicas and gateway."""
    t0 = time.monotonic()
    async with Stack(s, strategy, workdir, sim_port) as stack:
        async with aiohttp.ClientSession() as http:
            window = Window(http, stack)
            cfg = LoadConfig(stack.api_url, s.model, concurrency, s.warmup_s, s.duration_s,
                             s.drain_s, s.seed, ramp_s=s.ramp_s)
            result: LoadResult = await LoadGenerator(cfg, pool).run(window.start, window.end)
    result.meta["drain_s"] = s.drain_s
    client = report.client_stats(result)
    return {"strategy": strategy, "concurrency": concurrency, "client": client,
            "replicas": report.replica_stats(window.before, window.after), "cpu": window.cpu,
            "threads_started": result.threads_started, "run_s": round(time.monotonic() - t0, 1),
            "warnings": warnings_for(window.cpu, client)}


def progress_line(run: dict) -> str:
    c, r, cpu = run["client"], run["replicas"], run["cpu"]
    return (f"{run['strategy']:>23} c={run['concurrency']:<4} TTFT mean {c['ttft_mean_ms']:8.0f} ms"
            f" p90 {c['ttft_p90_ms']:8.0f} | {c['total_tokens_per_s']:7.0f} tok/s "
            f"({c['output_tokens_per_s']:5.0f} out) {c['requests_per_s']:5.1f} req/s | "
            f"hit {r['hit_rate']:4.0%} | req/replica {r['requests_min']}-{r['requests_max']} | "
            f"fail {c['failed'] + c['unfinished']} | CPU gw {cpu.get('gateway', 0):.2f} "
            f"lg {cpu.get('loadgen', 0):.2f} sim {cpu.get('simulator', 0):.2f} "
            f"other {cpu.get('other', 0):.2f} | {run['run_s']:.0f} s")


# --- main ----------------------------------------------------------------------------------------

def meta_for(s: Settings, argv: list[str], pool: ThreadPool) -> dict:
    profile = {} if s.endpoints else s.sim_profile()
    return {
        "workload": s.workload, "control": s.control, "replicas": s.replicas,
        "strategies": s.strategies, "concurrency": s.concurrency, "warmup_s": s.warmup_s,
        "duration_s": s.duration_s, "drain_s": s.drain_s, "seed": s.seed, "model": s.model,
        "load_factor": s.load_factor, "conversation_chars": s.conversation_chars, "pin": s.pin, "profile": profile,
        "profile_name": s.profile if not s.endpoints else "external",
        "endpoints": s.endpoints, "command": "python -m bench routing " + shlex.join(argv),
        "workload_params": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in s.workload_params.items()},
        "ramp_s": s.ramp_s, "workload_summary": pool.summary(), "cores": os.cpu_count(),
        "rounds": s.rounds,
    }


async def run_all(s: Settings, argv: list[str], out: Path, tag: str, with_charts: bool) -> dict:
    started = time.monotonic()
    pool = ThreadPool(s.workload, s.seed, **s.workload_params)
    pool.ensure(max(max(s.concurrency) * 3, WORKLOAD_POOL.get(s.workload, 0)))
    doc = {"meta": meta_for(s, argv, pool), "runs": []}
    rounds: list[list[dict]] = []
    if tag:
        doc["meta"]["workload"] = f"{s.workload}-{tag}"
    if s.pin == "split":
        os.sched_setaffinity(0, {1})
    print(f"{s.workload}: {s.replicas} replicas, strategies {', '.join(s.strategies)}, "
          f"concurrency {s.concurrency}, warm-up {s.warmup_s:g} s + window {s.duration_s:g} s"
          + (f", {s.rounds} rounds (medians)" if s.rounds > 1 else ""), flush=True)
    sim_port = 0 if s.endpoints else consecutive_free_ports(s.replicas)
    with tempfile.TemporaryDirectory(prefix="kvgate-routing-") as tmp:
        for _ in range(s.rounds):
            rounds.append([])
            for conc in s.concurrency:
                for strategy in s.strategies:
                    run = await run_one(s, pool, strategy, conc, Path(tmp), sim_port)
                    rounds[-1].append(run)
                    doc["runs"] = report.median_runs(rounds) if s.rounds > 1 else rounds[0]
                    if s.rounds > 1:
                        doc["round_runs"] = rounds
                    print(progress_line(run), flush=True)
                    for w in run["warnings"]:
                        print(f"  warning: {w}", flush=True)
                    doc["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
                    report.write_all(doc, out, with_charts=False)
    doc["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    paths = report.write_all(doc, out, with_charts=with_charts)
    print("\n" + report.summary_table(doc["runs"]) + "\n")
    for line in report.verdicts(report.acceptance(doc["runs"], s.control, s.workload)):
        print(line)
    print(f"done in {doc['meta']['elapsed_s']:.0f} s; wrote " + ", ".join(paths.values()))
    return doc


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.redraw:
        return report.redraw(args.redraw)
    s = settings_from_args(args)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    try:
        asyncio.run(_cancel_on_sigterm(run_all(s, argv, args.out, args.tag,
                                               not args.no_charts)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; the replicas and the gateway were stopped", file=sys.stderr)
        return 130
    return 0


async def _cancel_on_sigterm(run: Awaitable[dict]) -> dict:
    """Run the study; SIGTERM cancels it like Ctrl-C, so each Stack's exit stops the simulator
    and the gateway, which run in their own sessions and would outlive the study."""
    task = asyncio.ensure_future(run)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await task


if __name__ == "__main__":
    sys.exit(main())
