"""One training step of a patched Llama-3-8B-shaped decoder: HF vs liger-kernel vs medusa-liger.

The model is Llama-3-8B's shape cut to 4 decoder layers (hidden 4096, intermediate 14336, 32 query
heads, 8 kv heads, vocab 128256), random init from the config (no hub), bf16 weights, sdpa
attention, one row of 8192 tokens with labels. One step = forward with labels (the causal-LM loss)
+ backward, gradients set to None before each step so their allocation is part of the step, no
optimizer. Reported per variant: median ms, tokens/s, peak memory allocated during the step above
what was allocated before it (activations, logits, gradients; not the weights), the first loss.

Variants, each built and measured in its own process, so a variant's module-level patches (liger's
``apply_liger_kernel_to_llama`` replaces modeling_llama's classes and LlamaForCausalLM.forward) can
never leak into another's model:

* ``hf``: transformers as installed;
* ``liger``: liger-kernel's ``apply_liger_kernel_to_llama()`` (RoPE, RMSNorm, SwiGLU, fused linear
  cross-entropy) before the build; skipped with a note when liger-kernel is not importable;
* ``ours``: ``medusa_liger.patch("llama")`` before the build (the same four pieces).

    python benchmarks/patching.py            # the table (about 2-3 minutes on an H100)
    python benchmarks/patching.py --quick    # tiny model, a smoke run of the same code (CPU too)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Python puts this script's folder first on sys.path, where benchmarks/kernels.py would shadow HF's
# optional `kernels` package (transformers probes it): import our helpers from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402

VARIANTS = {
    "hf": "HF transformers (unpatched)",
    "liger": "liger-kernel apply_liger_kernel_to_llama",
    "ours": 'medusa_liger.patch("llama")',
}
FULL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=128256, num_hidden_layers=4, seq_len=8192, rope_theta=500000.0)
QUICK = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=4099, num_hidden_layers=2, seq_len=512, rope_theta=500000.0)


def apply_variant(variant: str) -> None:
    """Patch the llama modeling module the way ``variant`` does (before the model is built)."""
    if variant == "liger":
        liger = common.optional_import("liger_kernel.transformers")
        if liger is None:
            raise RuntimeError("liger-kernel is not importable")
        liger.apply_liger_kernel_to_llama()
    elif variant == "ours":
        import medusa_liger

        medusa_liger.patch("llama")
    elif variant != "hf":
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """Random-init LlamaForCausalLM of ``shape`` straight on ``device`` in ``dtype`` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
        vocab_size=shape["vocab_size"], num_hidden_layers=shape["num_hidden_layers"],
        max_position_embeddings=max(8192, shape["seq_len"]), rope_theta=shape["rope_theta"],
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.train()


def measure(variant: str, quick: bool) -> dict:
    """Build ``variant``'s model in this process and time one training step."""
    shape = QUICK if quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    apply_variant(variant)
    model = build_model(shape, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(0, shape["vocab_size"], (1, shape["seq_len"]), generator=g).to(device)

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        return loss

    first_loss = float(step().detach())  # also compiles / autotunes every kernel once
    model.zero_grad(set_to_none=True)  # so the peak below counts the gradients the step allocates
    peak = common.peak_extra_memory_gib(step)
    ms = common.bench(step, warmup=200, rep=1500) if device.type == "cuda" else common.bench(step)
    return {"ms": ms, "tokens_per_s": shape["seq_len"] / (ms * 1e-3), "peak_gib": peak, "loss": first_loss}


def run_child(variant: str, quick: bool) -> dict:
    """``measure`` in a fresh interpreter; its JSON result, or {"error": ...}."""
    cmd = [sys.executable, __file__, "--child", variant] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"[bench] {variant} failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
        return {"error": tail[0][:160]}
    return json.loads(lines[-1])


def _ratio(result: dict, base: dict, key: str) -> str:
    """``result[key] / base[key]`` as "1.23x", or "-" when either is missing (failed run, CPU memory)."""
    value = result.get(key, float("nan")) / base.get(key, float("nan"))
    return "-" if value != value else f"{value:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke run")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.quick)), flush=True)
        return

    results = {}
    for variant in VARIANTS:
        results[variant] = run_child(variant, args.quick)
        print(f"[bench] {variant}: {results[variant]}", flush=True)

    base = results["hf"]
    rows = []
    for variant, label in VARIANTS.items():
        r = results[variant]
        if "error" in r:
            rows.append([label, "-", "-", "-", "-", "-", "-", f"failed: {r['error']}"])
            continue
        rows.append([label, r["ms"], f"{r['tokens_per_s']:.0f}", r["peak_gib"], r["loss"],
                     _ratio(r, base, "tokens_per_s"), _ratio(r, base, "peak_gib"), ""])
    shape = QUICK if args.quick else FULL
    name = "patching_quick" if args.quick else "patching_h100"
    common.write_table(
        name,
        "One training step (forward + backward, bf16) of a Llama-3-8B-shaped decoder cut to "
        f"{shape['num_hidden_layers']} layers",
        ["variant", "step ms", "tokens/s", "peak extra GiB", "loss", "speed vs HF", "memory vs HF", "note"],
        rows,
        notes=[
            f"Shape: hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
            f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} kv heads, vocab "
            f"{shape['vocab_size']}, {shape['num_hidden_layers']} layers; batch 1 x {shape['seq_len']} "
            "tokens with labels; random init from the config, bf16 weights, sdpa attention.",
            "One step = forward with labels + backward (gradients set to None first; no optimizer). "
            "Median of CUDA-event timings (triton.testing.do_bench). Peak extra = peak allocated during "
            "the step minus allocated before it (activations, logits, gradients; not the weights).",
            "Each variant is built and measured in its own process (module-level patches cannot leak); "
            "the loss column checks that all variants compute the same loss on the same init.",
        ],
    )


if __name__ == "__main__":
    main()
