"""Which tree search buys more tokens per step: the Medusa paper's product of per-head accuracies
(``greedy_tree_search``) or the heads' joint ranks (``conditional_tree_search``), measured on prompts
the search did not see.

    python benchmarks/tree_search_compare.py runs/tiny [runs/tiny5 ...] [--prompts 70 --tree-sizes 16 63]

For each trained run: the held-out prompts (``eval_prompts.jsonl``) plus the first ``--prompts`` of the
shipped conversations, each decoded greedily and ranked by every head (``head_ranks``); two folds
(even and odd prompts): a tree is searched on one fold's ranks with each estimate and measured on
the other fold with Medusa decoding (tokens per step, greedy acceptance). Cross-fitting keeps a tree
from being scored on the positions it was chosen for; the table reports both folds and their mean.
CPU is fine (tokens per step do not depend on speed).
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
from medusa_liger.inference.cli import load_medusa, resolve_paths  # noqa: E402
from medusa_liger.inference.evaluate import head_ranks  # noqa: E402
from medusa_liger.inference.generate import greedy_generate, medusa_generate  # noqa: E402
from medusa_liger.inference.prompts import default_prompts_file, load_prompts  # noqa: E402
from medusa_liger.inference.tree import conditional_tree_search, greedy_tree_search, rank_accuracy_of  # noqa: E402


def tokens_per_step(model, inputs: list[torch.Tensor], tree, max_new_tokens: int) -> float:
    """Medusa decoding's new tokens over its steps, summed over ``inputs``."""
    tokens = steps = 0
    for ids in inputs:
        stats = medusa_generate(model, ids, max_new_tokens, tree).stats
        tokens, steps = tokens + stats.new_tokens, steps + stats.steps
    return tokens / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="training run directories (final/backbone, final/heads_*)")
    parser.add_argument("--prompts", type=int, default=70, help="shipped conversations added to the held-out prompts")
    parser.add_argument("--tree-sizes", type=int, nargs="+", default=[16, 63])
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prior-strengths", type=float, nargs="+", default=[5.0, 20.0, 50.0])
    args = parser.parse_args()
    device = "cuda" if common.CUDA else "cpu"
    rows, notes = [], []
    for run in args.runs:
        model, tokenizer = load_medusa(*resolve_paths(run, None, None), device=device)
        model.eval()
        held_out = Path(run) / "eval_prompts.jsonl"
        prompts = (load_prompts(held_out, tokenizer) if held_out.is_file() else []) + load_prompts(
            default_prompts_file(), tokenizer, args.prompts)
        inputs = [torch.tensor([p], device=device) for p in prompts]
        ranks = [head_ranks(model, greedy_generate(model, ids, args.max_new_tokens).sequences, ids.shape[1],
                            args.top_k) for ids in inputs]
        folds = [list(range(0, len(inputs), 2)), list(range(1, len(inputs), 2))]
        searches = {"independent (product)":
                    lambda r, n: greedy_tree_search(rank_accuracy_of(r, args.top_k), n)}
        for a in args.prior_strengths:
            searches[f"conditional, a = {a:g}"] = lambda r, n, a=a: conditional_tree_search(r, n, args.top_k, a)
        for size in args.tree_sizes:
            for name, search in searches.items():
                cells = []
                for f, test in ((0, folds[1]), (1, folds[0])):
                    tree, estimate = search(torch.cat([ranks[i] for i in folds[f]]), size)
                    measured = tokens_per_step(model, [inputs[i] for i in test], tree, args.max_new_tokens)
                    cells.append((estimate, measured, max(map(len, tree))))
                rows.append([run, model.heads.num_heads, size, name,
                             *[f"{e:.3f} / **{m:.3f}** (depth {d})" for e, m, d in cells],
                             f"{sum(m for _, m, _ in cells) / 2:.3f}"])
        notes.append(f"{run}: {len(inputs)} prompts ({sum(len(r) for r in ranks)} scored positions), "
                     f"{args.max_new_tokens} new tokens each")
    notes.append(f"Cells: the searched tree's estimated / **measured** tokens per step on the other fold "
                 f"(top {args.top_k} ranks per head); a: the conditional "
                 "search's prior strength (pseudo-positions of the product behind each conditional estimate).")
    common.write_table("tree_search_compare_cpu", "Tree search: independent heads vs joint ranks (cross-fitted)",
                       ["run", "heads", "nodes", "search", "fold 0 -> 1", "fold 1 -> 0", "mean measured"], rows, notes)


if __name__ == "__main__":
    main()
