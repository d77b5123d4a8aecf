"""Command line for the simulator: `python -m kvgate_sim ...` (and `kvgate sim ...` via `main`).

Accepts the common vLLM flag names as aliases (`--served-model-name`, `--max-num-seqs`, ...) so a
launcher that builds a vLLM command line can point at the simulator with few changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cluster import SimCluster
from .errors import SimError
from .faults import Faults
from .kv_events import KVEventsConfig
from .oracle import Oracle
from .profiles import PROFILES, Profile, get_profile, scale_profile


def _prog() -> str:
    """`kvgate sim` when run through the kvgate command (its console script or `python -m
    kvgate`), else the simulator's own `python -m kvgate_sim`."""
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    if path.name == "kvgate" or (path.name == "__main__.py" and path.parent.name == "kvgate"):
        return "kvgate sim"
    return "python -m kvgate_sim"


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or _prog(),
        description="Simulated vLLM replicas (OpenAI API, prefix cache, LoRA, vLLM metrics). "
                    "Common vLLM flag names are accepted as aliases.")
    p.add_argument("--host", default="127.0.0.1", help="address every replica listens on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000,
                   help="port of replica 0, replica i uses +i; 0: any free ports "
                        "(default: %(default)s)")
    p.add_argument("--replicas", type=int, default=1, help="replicas to start (default: %(default)s)")
    p.add_argument("--profile", default="fast", choices=sorted(PROFILES),
                   help="engine profile: KV cache, batch limits, step timings "
                        "(--list-profiles shows them; default: %(default)s)")
    p.add_argument("--list-profiles", action="store_true", help="print profiles as JSON and exit")
    p.add_argument("--model-name", "--served-model-name", dest="model_name", default="sim-model",
                   help="the model name served, which requests name in `model` "
                        "(default: %(default)s)")
    p.add_argument("--model", dest="model_path", default=None,
                   help="model path shown as `root` in /v1/models (default: --model-name)")
    p.add_argument("--oracle-port", type=int, default=None,
                   help="also serve the oracle router on this port (0: any free port): a "
                        "benchmark-only front that routes each request to the replica with the "
                        "lowest true estimated TTFT (sim/oracle.py)")
    p.add_argument("--startup-delay", type=float, default=0.0,
                   help="seconds of 503 on /health (and inference) after start")
    eng = p.add_argument_group("engine overrides (default: the profile's value)")
    eng.add_argument("--capacity", type=float,
                     help="shrink the profile by this factor first (scale_profile: keeps the "
                          "load and working-set ratios)")
    eng.add_argument("--time-scale", type=float,
                     help="wall seconds per modelled GPU second (>1 slower, <1 faster)")
    eng.add_argument("--kv-blocks", "--num-gpu-blocks-override", dest="kv_blocks", type=int,
                     help="KV cache size in blocks")
    eng.add_argument("--max-num-seqs", type=int, help="sequences running in one batch at most")
    eng.add_argument("--max-num-batched-tokens", type=int,
                     help="tokens scheduled in one engine step at most")
    eng.add_argument("--max-model-len", type=int,
                     help="longest prompt plus output, in tokens")
    eng.add_argument("--max-loras", type=int, help="LoRA adapters usable in one batch")
    eng.add_argument("--lora-load-latency", type=float,
                     help="seconds to load a LoRA adapter (load_lora_adapter)")
    eng.add_argument("--natural-output-tokens", type=int,
                     help="output length at which a generation ends on its own (EOS), "
                          "if max_tokens does not stop it first")
    eng.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="no_prefix",
                     action="store_true", help="disable the prefix (KV block) cache")
    eng.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH",
                     help="LoRA adapters loaded at start, each served as model NAME")
    eng.add_argument("--enable-lora", action="store_true",
                     help="accepted for vLLM parity (LoRA is always enabled)")
    eng.add_argument("--scheduling-policy", choices=("fcfs", "priority"),
                     help="vLLM's: priority admits waiting requests by their `priority` field")
    eng.add_argument("--kv-events-config", dest="kv_events_config", metavar="JSON",
                     help='publish KV-cache events like vLLM, e.g. \'{"enable_kv_cache_events": '
                          'true, "publisher": "zmq", "endpoint": "tcp://*:5557", '
                          '"replay_endpoint": "tcp://*:5558", "topic": "kv-events"}\' '
                          "(replica i adds i to both ports)")
    flt = p.add_argument_group("failure injection (changeable at runtime: POST /sim/faults)")
    flt.add_argument("--error-rate", type=float, default=0.0,
                     help="fraction (0..1) of inference requests answered with --error-status")
    flt.add_argument("--error-status", type=int, default=500,
                     help="HTTP status of an injected error (default: %(default)s)")
    flt.add_argument("--reset-after-chunks", type=int,
                     help="cut every stream with a TCP reset after this many SSE events")
    flt.add_argument("--extra-latency", type=float, default=0.0,
                     help="seconds every request waits before it reaches the engine "
                          "(default: %(default)s)")
    flt.add_argument("--slowdown", type=float, default=1.0,
                     help="factor (>= 1) on every engine step's time: a slow replica "
                          "(default: %(default)s)")
    flt.add_argument("--seed", type=int, default=0,
                     help="seed of the injected errors' randomness (replica i uses seed + i)")
    return p


def _overrides(args: argparse.Namespace) -> dict:
    mapping = {
        "time_scale": args.time_scale, "num_kv_blocks": args.kv_blocks,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len, "max_loras": args.max_loras,
        "lora_load_s": args.lora_load_latency,
        "natural_output_tokens": args.natural_output_tokens,
        "scheduling_policy": args.scheduling_policy,
    }
    out = {k: v for k, v in mapping.items() if v is not None}
    if args.no_prefix:
        out["enable_prefix_caching"] = False
    return out


def _profile(args: argparse.Namespace) -> Profile:
    """The named profile, shrunk by --capacity if given, then with the explicit overrides."""
    base = get_profile(args.profile)
    if args.capacity is not None:
        base = scale_profile(base, args.capacity)
    return base.with_overrides(**_overrides(args))


def _kv_events(args: argparse.Namespace) -> Optional[KVEventsConfig]:
    if not args.kv_events_config:
        return None
    return KVEventsConfig.from_json(args.kv_events_config)


def _lora_modules(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--lora-modules expects NAME=PATH, got {item!r}")
        out[name] = path
    return out


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(args: argparse.Namespace) -> None:
    profile = _profile(args)
    lora = _lora_modules(args.lora_modules)
    faults = {"error_rate": args.error_rate, "error_status": args.error_status,
              "reset_after_chunks": args.reset_after_chunks,
              "extra_latency_s": args.extra_latency, "slowdown": args.slowdown}
    kv_events = _kv_events(args)
    cluster = SimCluster(args.replicas, profile, args.model_name, host=args.host,
                         base_port=args.port, seed=args.seed, model_path=args.model_path,
                         lora_modules=lora, startup_delay_s=args.startup_delay, faults=faults,
                         kv_events=kv_events)
    await cluster.start()
    for i, r in enumerate(cluster.replicas):
        events = r.server.kv_events if r.server is not None else None
        extra = (f" kv-events={events.endpoint} replay={events.replay_endpoint}"
                 if events is not None else "")
        print(f"sim replica {i}: {r.url} model={args.model_name} profile={profile.name}{extra}",
              flush=True)
    oracle = None
    if args.oracle_port is not None:
        oracle = await Oracle(cluster).start(args.host, args.oracle_port)
        print(f"sim oracle: http://{args.host}:{oracle.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        if oracle is not None:
            await oracle.stop()
        await cluster.stop()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_profiles:
        print(json.dumps({n: p.describe() for n, p in PROFILES.items()}, indent=2))
        return 0
    if args.replicas < 1:
        print("--replicas must be at least 1", file=sys.stderr)
        return 2
    try:
        Faults().update({"error_rate": args.error_rate, "error_status": args.error_status,
                         "slowdown": args.slowdown})
        _profile(args)
        _kv_events(args)
    except (SimError, TypeError, ValueError) as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    _install_uvloop()
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0
