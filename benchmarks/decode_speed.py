"""What a Medusa step costs against a plain decoding step, on an 8B-shaped backbone: the tokens per
step the heads must buy before Medusa decoding is faster (its break-even acceleration).

    python benchmarks/decode_speed.py            # Llama-3-8B shapes, bf16, random weights, one GPU
    python benchmarks/decode_speed.py --quick    # a small model (a smoke test, also on the CPU)

Random heads accept almost nothing, so every Medusa step emits about one token and its time is the
cost of a verification step: the backbone forward over the tree's nodes plus the decoder's own work
(candidates, masks, acceptance, the KV cache's gather). Per batch size B: milliseconds per step of
plain decoding (Medusa's decoder with the empty tree; at B = 1 also ``greedy_generate``, the plain
loop over the HF backbone) and of Medusa decoding with trees of several sizes, in interleaved
rounds; break-even = Medusa step / plain step: the acceleration (tokens per step, from
``medusa-liger eval``) above which the heads win at that batch size. The backbone runs eagerly
through Hugging Face (sdpa attention), as ``medusa-liger eval`` runs it; a serving engine's graphs
and kernels make both steps cheaper.
"""

from __future__ import annotations

import argparse
import statistics
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
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size (median)")
    args = parser.parse_args()
    device = torch.device("cuda" if common.CUDA else "cpu")
    dtype = torch.bfloat16 if common.CUDA else torch.float32
    shape, batches, tokens = (SMALL, (1, 4), 16) if args.quick else (LLAMA3_8B, (1, 4, 16), args.tokens)
    num_heads = 5 if not args.quick else 3
    model = build(shape, dtype, device, num_heads)
    trees = {f"{size} nodes": default_tree(num_heads, size) for size in (16, 63)}
    g = torch.Generator().manual_seed(0)

    def fresh_prompts(B: int) -> list[torch.Tensor]:
        """B new prompts of 64-255 tokens: every call decodes at key lengths it has not seen in that
        order, as real decoding does (per-length caches, such as cuDNN attention's plans, cannot help)."""
        return [torch.randint(0, shape["vocab_size"], (int(n),), generator=g)
                for n in torch.randint(64, 256, (B,), generator=g)]

    rows = []
    for B in batches:
        # Every way of decoding a batch of B prompts, timed in interleaved rounds (the card's and host's
        # drift hits them alike) after a warm-up call each (kernels, allocator); medians.
        cases = {"plain": lambda B=B: ms_per_step(medusa_generate_batch(model, fresh_prompts(B), tokens, []))}
        if B == 1:
            cases["greedy_generate"] = lambda: (greedy_generate(model, fresh_prompts(1)[0][None], tokens)
                                                .stats.wall_time_s * 1e3 / tokens)
        for name, tree in trees.items():
            cases[name] = lambda B=B, t=tree: ms_per_step(medusa_generate_batch(model, fresh_prompts(B), tokens, t))
        for case in cases.values():
            case()
        times = common.interleaved_rounds(cases, args.rounds, timer=lambda case: case())
        median = {name: statistics.median(t) for name, t in times.items()}
        row = [B, f"{median['plain']:.1f}", f"{median['greedy_generate']:.1f}" if B == 1 else ""]
        for name in trees:
            row += [f"{median[name]:.1f}", f"{median[name] / median['plain']:.2f}"]
        rows.append(row)
    header = ["batch", "plain step ms (empty tree)", "greedy_generate step ms"]
    for name in trees:
        header += [f"Medusa step ms, {name}", f"break-even tokens/step, {name}"]
    layers = shape["num_hidden_layers"]
    notes = [f"Llama shape: hidden {shape['hidden_size']}, {layers} layers, vocab {shape['vocab_size']}; "
             f"{num_heads} random heads; {str(dtype).replace('torch.', '')}; new prompts of 64-255 tokens at "
             f"every call, {tokens} new tokens each; median of {args.rounds} interleaved rounds.",
             "break-even: the Medusa step's time over the plain step's, the tokens per step (acceleration, "
             "from `medusa-liger eval`) above which Medusa decoding is faster at that batch size."]
    common.write_table("decode_speed" + ("_quick" if args.quick else "") + "_h100",
                       "Medusa decoding: the cost of a verification step", header, rows, notes)


if __name__ == "__main__":
    main()
