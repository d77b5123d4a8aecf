"""Named parameter sets for the simulated engine.

A profile fixes capacity (KV blocks, batch limits) and a linear step-cost model:

    step_time = step_fixed_s
              + prefill_token_s  * (prompt tokens computed this step)
              + decode_seq_s     * (sequences decoding this step)
              + context_token_s  * (tokens already in KV that this step's attention reads)

multiplied by `time_scale` to turn "GPU seconds" into wall seconds. The first term is reading the
weights once per step (memory bound), the second the compute-bound prefill, the third per-sequence
sampling/bookkeeping, the fourth reading the KV cache during attention.

`l4-llama3.1-8b` approximates one NVIDIA L4 (24 GB GDDR6 at ~300 GB/s, ~242 dense FP8 TFLOPS)
serving Llama-3.1-8B-Instruct in FP8 under vLLM with prefix caching, the setup of KubeAI's study.
The numbers are derived, not measured here (no GPU on this machine):
- weights ~8.5 GB FP8 -> one pass over them at ~300 GB/s ~= 28 ms: `step_fixed_s` = 0.028;
- KV per token = 32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes = 128 KiB; with
  `--gpu-memory-utilization 0.9` about 10.7 GB is left for KV -> ~82k tokens = 5,120 blocks;
- reading 128 KiB of KV per context token at ~300 GB/s ~= 0.43 us: `context_token_s` = 4.3e-7;
- prefill at 2 x 8e9 FLOP/token on an effective ~160 TFLOPS -> ~10k tokens/s:
  `prefill_token_s` = 1.0e-4;
- sampling and scheduler overhead per running sequence ~40 us: `decode_seq_s` = 4e-5;
- vLLM v1 defaults for a <70 GB GPU behind the OpenAI server: `max_num_batched_tokens` 2048,
  `max_num_seqs` 256; `max_model_len` 16384 as in KubeAI's L4 catalog entry.
Single-stream decode then runs at ~35 tokens/s and a 1,000-token uncached prompt costs ~130 ms of
prefill, in line with published L4 figures for this model.

`scale_profile` shrinks a replica while keeping the ratios that decide the benchmark: multiply
capacity (KV blocks, batch slots, per-step token budget) by `capacity`, divide the per-token and
per-sequence costs by it. A replica serving `capacity` x the sequences then has the same step time,
the same prefill utilisation for `capacity` x the offered load, and the same working-set/KV ratio
for `capacity` x the threads. What does not scale: a single uncached prompt now needs 1/capacity
more steps, so absolute TTFT of cold prompts grows by about 1/capacity; compare strategies by ratio.
`time_scale` then stretches (>1) or compresses (<1) the wall clock uniformly, e.g. to keep the
number of SSE chunks per second within what two CPU cores can push through a Python gateway.

`fast` is for functional tests: near-zero latencies, generous capacity.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class Profile:
    """Capacity and cost parameters of one simulated vLLM replica."""

    name: str
    num_kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 16384
    step_fixed_s: float = 0.028
    prefill_token_s: float = 1.0e-4
    decode_seq_s: float = 4.0e-5
    context_token_s: float = 4.3e-7
    time_scale: float = 1.0
    enable_prefix_caching: bool = True
    max_loras: int = 4  # adapters usable in one batch (vLLM --max-loras)
    lora_load_s: float = 0.5  # load_lora_adapter latency (read weights from disk)
    lora_swap_s: float = 0.002  # extra step time when an adapter enters a GPU slot
    natural_output_tokens: int = 256  # length at which the "model" stops on its own (EOS)
    embedding_dim: int = 384
    # vLLM --scheduling-policy: "fcfs", or "priority" (waiting requests admitted by their
    # `priority`, lower first, then arrival; a preemption takes the lowest-priority request)
    scheduling_policy: str = "fcfs"

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    def step_time(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """Wall seconds one engine step takes for the given batch composition."""
        t = (self.step_fixed_s + self.prefill_token_s * prefill_tokens
             + self.decode_seq_s * decode_seqs + self.context_token_s * context_tokens)
        return t * self.time_scale

    def with_overrides(self, **overrides: Any) -> "Profile":
        """A copy with some fields replaced (unknown names raise TypeError)."""
        return dataclasses.replace(self, **overrides) if overrides else self

    def describe(self) -> dict:
        """Fields plus derived figures, for logs and result files."""
        d = dataclasses.asdict(self)
        d["kv_capacity_tokens"] = self.kv_capacity_tokens
        d["peak_prefill_tokens_per_s"] = round(
            self.max_num_batched_tokens / self.step_time(self.max_num_batched_tokens, 0, 0), 1)
        d["single_stream_decode_tokens_per_s"] = round(1.0 / self.step_time(0, 1, 0), 1)
        return d


def scale_profile(base: Profile, capacity: float, time_scale: float = 1.0,
                  name: Optional[str] = None) -> Profile:
    """Shrink a replica by `capacity` (0 < capacity <= 1) keeping load and working-set ratios.

    See the module docstring for what is and is not preserved.
    """
    if not 0 < capacity <= 1:
        raise ValueError("capacity must be in (0, 1]")
    blocks = max(16, round(base.num_kv_blocks * capacity))
    max_len = min(base.max_model_len, blocks * base.block_size)
    return dataclasses.replace(
        base,
        name=name or f"{base.name}@{capacity:g}",
        num_kv_blocks=blocks,
        max_num_seqs=max(4, round(base.max_num_seqs * capacity)),
        max_num_batched_tokens=max(64, round(base.max_num_batched_tokens * capacity)),
        max_model_len=max_len,
        prefill_token_s=base.prefill_token_s / capacity,
        decode_seq_s=base.decode_seq_s / capacity,
        context_token_s=base.context_token_s / capacity,
        time_scale=base.time_scale * time_scale,
    )


L4_LLAMA31_8B = Profile(name="l4-llama3.1-8b", num_kv_blocks=5120)

# One eighth of an L4 replica: 8 such replicas with 1/8 of KubeAI's thread counts keep the study's
# working-set/KV and load/prefill-rate ratios; the clock runs at half speed (time_scale 2) so the
# token rate stays well within two CPU cores.
CPU_SCALED = scale_profile(L4_LLAMA31_8B, capacity=1 / 8, time_scale=2.0, name="cpu-scaled")

# Llama-3.1-8B on one H200, from the step costs measured there (bf16, CUDA-graph decode; the
# project's reference notes): ~3.7x an L4's prefill rate, 4x its fixed step cost, a sixteenth of
# its per-token context cost. KV: ~106 GB free after weights at 128 KiB a token, ~50k blocks.
H200_LLAMA31_8B = Profile(name="h200-llama3.1-8b", num_kv_blocks=50_000, step_fixed_s=0.00728,
                          prefill_token_s=2.7e-5, decode_seq_s=1.68e-5, context_token_s=2.84e-8)

# One eighth of that replica, for the routing study's second hardware profile (its clock is
# set by the study so token rates stay within two cores, as for cpu-scaled).
CPU_SCALED_H200 = scale_profile(H200_LLAMA31_8B, capacity=1 / 8, name="cpu-scaled-h200")

FAST = Profile(
    name="fast",
    num_kv_blocks=8192,
    max_num_seqs=256,
    max_num_batched_tokens=8192,
    max_model_len=32768,
    step_fixed_s=0.0002,
    prefill_token_s=2.0e-7,
    decode_seq_s=1.0e-6,
    context_token_s=0.0,
    lora_load_s=0.01,
    lora_swap_s=0.0,
    natural_output_tokens=16,
)

PROFILES: dict[str, Profile] = {p.name: p for p in (L4_LLAMA31_8B, CPU_SCALED, H200_LLAMA31_8B,
                                                    CPU_SCALED_H200, FAST)}


def get_profile(name: str, **overrides: Any) -> Profile:
    """Look up a named profile, optionally overriding fields (e.g. num_kv_blocks=64)."""
    try:
        base = PROFILES[name]
    except KeyError:
        raise KeyError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
    return base.with_overrides(**overrides)
