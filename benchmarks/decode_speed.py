"""What a Medusa step costs against a plain decoding step, on an 8B-shaped backbone: the tokens per
step the heads must buy before Medusa decoding is faster (its break-even acceleration).

    python benchmarks/decode_speed.py            # Llama-3-8B shapes, bf16, random weights, one GPU
    python benchmarks/decode_speed.py --quick    # a small model (a smoke test, also on the CPU)

Random heads accept almost nothing, so every Medusa step emits about one token and its time is the
cost of a verification step: the backbone forward over the tree's nodes plus the decoder's own work
(candidates, masks, acceptance, the KV cache's gather). Per batch size B: milliseconds per step of
plain decoding (Medusa's decoder with the empty tree; at B = 1 also ``greedy_generate``, the plain HF
loop) and of Medusa decoding with trees of several sizes; break-even = Medusa step / plain step: the
acceleration (tokens per step, from ``medusa-liger eval``) above which the heads win at that batch
size. The backbone runs eagerly through Hugging Face (sdpa attention), as ``medusa-liger eval`` runs
it; a serving engine's graphs and kernels make both steps cheaper.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # see medusa_loss.py
sys.path.insert(0, str(_HERE.parent))

from benchmarks import common  # noqa: E402
from medusa_liger.heads import MedusaConfig, MedusaModel  # noqa: E402
from medusa_liger.inference import greedy_generate, medusa_generate_batch  # noqa: E402
from medusa_liger.inference.tree import default_tree  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)


def build(shape: dict, dtype: torch.dtype, device: torch.device, num_heads: int) -> MedusaModel:
    """A randomly initialized Llama of ``shape`` with ``num_heads`` randomly initialized Medusa heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.device(device):
        backbone = LlamaForCausalLM(config).to(dtype)
    model = MedusaModel.from_backbone(backbone, MedusaConfig(num_heads=num_heads))
    with torch.no_grad():  # move the zero-initialized blocks off the identity (their heads then disagree)
        for p in model.heads.parameters():
            p.normal_(0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def ms_per_step(results) -> float:
    """Milliseconds per decoding step of one batch's results (its wall time is shared)."""
    return results[0].stats.wall_time_s * 1e3 / max(r.stats.steps for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    args = parser.parse_args()
    device = torch.device("cuda" if common.CUDA else "cpu")
    dtype = torch.bfloat16 if common.CUDA else torch.float32
    shape, batches, tokens = (SMALL, (1, 4), 16) if args.quick else (LLAMA3_8B, (1, 4, 16), args.tokens)
    num_heads = 5 if not args.quick else 3
    model = build(shape, dtype, device, num_heads)
    trees = {f"{size} nodes": default_tree(num_heads, size) for size in (16, 63)}
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 256, (16,), generator=g).tolist()
    prompts = [torch.randint(0, shape["vocab_size"], (n,), generator=g) for n in lengths]

    rows = []
    for B in batches:
        batch = prompts[:B]
        medusa_generate_batch(model, batch, 8, trees["63 nodes"])  # warm-up: kernels, allocator
        medusa_generate_batch(model, batch, 8, [])
        plain = min(ms_per_step(medusa_generate_batch(model, batch, tokens, [])) for _ in range(3))
        row = [B, f"{plain:.1f}"]
        if B == 1:
            greedy_generate(model, batch[0][None], 8)
            hf = min(greedy_generate(model, batch[0][None], tokens).stats.wall_time_s * 1e3 / tokens for _ in range(3))
            row.append(f"{hf:.1f}")
        else:
            row.append("")
        for tree in trees.values():
            step = min(ms_per_step(medusa_generate_batch(model, batch, tokens, tree)) for _ in range(3))
            row += [f"{step:.1f}", f"{step / plain:.2f}"]
        rows.append(row)
    header = ["batch", "plain step ms (empty tree)", "greedy_generate step ms"]
    for name in trees:
        header += [f"Medusa step ms, {name}", f"break-even tokens/step, {name}"]
    layers = shape["num_hidden_layers"]
    notes = [f"Llama shape: hidden {shape['hidden_size']}, {layers} layers, vocab {shape['vocab_size']}; "
             f"{num_heads} random heads; {str(dtype).replace('torch.', '')}; prompts of 64-255 tokens, "
             f"{tokens} new tokens each; best of 3 runs.",
             "break-even: the Medusa step's time over the plain step's, the tokens per step (acceleration, "
             "from `medusa-liger eval`) above which Medusa decoding is faster at that batch size."]
    common.write_table("decode_speed" + ("_quick" if args.quick else "") + "_h100",
                       "Medusa decoding: the cost of a verification step", header, rows, notes)


if __name__ == "__main__":
    main()
