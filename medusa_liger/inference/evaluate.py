"""Head evaluation: accuracy table, tree search, and measured Medusa speedup (``medusa-liger eval``).

1. Accuracy. For each held-out prompt the backbone decodes greedily; with ``s`` the prompt plus its
   greedy continuation and ``h_t`` the backbone's last hidden state at position t, head k's top-R
   guesses at t are scored against ``s[t + k + 2]``, over every t from the last prompt token on
   whose target lies in the continuation. That gives per-rank accuracies ``p_k(r)`` (the guess of
   rank r is right) and the cumulative top-r table ``acc[k, r] = sum_{r' <= r} p_k(r')``.
2. Tree search (default 63 nodes): ``tree.conditional_tree_search`` on the heads' joint ranks at every
   scored position (the heads are right together more often than independent heads would be), or
   with ``tree_search="independent"`` the Medusa paper's ``tree.greedy_tree_search(p, size)`` with the
   expected acceleration ``1 + sum_nodes prod_j p_{j-1}(r_j)``; or a given tree (the ``medusa_choices``
   a serving engine will use) scored by the same estimate.
3. Measurement: Medusa decoding with that tree and plain greedy decoding of the same prompts;
   acceleration rate = new tokens / decoding steps, speedup = Medusa tokens/s / plain tokens/s (the
   wall-time ratio for greedy, whose two decodings emit the same tokens; sampled ones need not),
   and how many prompts decoded identically (greedy Medusa is lossless up to float rounding). The
   acceleration rate comes with a 95% interval over prompts (``ratio_interval``): a few prompts give
   a noisy number, and the interval says how noisy (its ends clamped to the 1 to depth + 1 tokens a
   step can emit; below ``ROUGH_INTERVAL_PROMPTS`` prompts it is rough). One prompt at a time (the
   single-stream speedup); with ``batch_size`` B > 1 also ``measured_batched``: both decodings over
   batches of B prompts (``medusa_generate_batch``; greedy as the empty tree; B at most the number
   of prompts: its ``batch_size`` is the one used), so the speedup at batch B, where the
   verification forward's extra tokens are no longer free. With ``acceptance="typical"`` both
   measurements sample at ``temperature`` instead: Medusa with typical acceptance against plain
   sampling (the empty tree), prompt i drawing from seed ``seed + i`` in every decoding (the tree
   still comes from the greedy accuracy table).

Outputs in ``output_dir``: ``report.json``, ``tree.json`` (the ``medusa_choices`` list) and
``head_accuracy.png`` (heatmap of the cumulative table).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medusa_liger.inference.batched import medusa_generate_batch
from medusa_liger.inference.generate import Acceptance, check_acceptance, greedy_generate, medusa_generate
from medusa_liger.inference.tree import (
    DEFAULT_PRIOR_STRENGTH,
    DEFAULT_TOP_K,
    DEFAULT_TREE_SIZE,
    TREE_SEARCHES,
    PathEstimate,
    check_prior_strength,
    check_ranks_fit,
    normalize_tree,
    rank_accuracy_of,
    rank_hits,
)
from medusa_liger.numeric import is_int
from medusa_liger.run_layout import EVAL_FILES

# Tree sizes whose searched tree's estimate the report lists beside the chosen size's.
CURVE_SIZES = (4, 8, 16, 32, 63, 128)
# Positions scored per head_logits call (bounds the [K, n, V] logits in memory for big vocabularies).
SCORE_CHUNK = 64
DEFAULT_NUM_PROMPTS = 16
DEFAULT_MAX_NEW_TOKENS = 128
# Sampling temperature of the typical-acceptance measurement (the Medusa paper's chat setting).
DEFAULT_TEMPERATURE = 0.7
# Below this many prompts the acceleration rate's interval is rough (the CLI says so).
ROUGH_INTERVAL_PROMPTS = 5
# The standard normal distribution's 97.5% quantile (a two-sided 95% interval).
Z_975 = 1.959964


def student_t_975(df: int) -> float:
    """97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95% intervals).

    Exact for 1 and 2 degrees of freedom; from 3 on, the Cornish-Fisher expansion in 1/df around
    the normal quantile (three terms: within 0.7% at df = 3, 0.01% from df = 30 on).
    """
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if df == 1:  # Cauchy: tan(pi (p - 1/2))
        return math.tan(math.pi * 0.475)
    if df == 2:  # closed form: (2p - 1) sqrt(2 / (4 p (1 - p)))
        return 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
    z = Z_975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, float] | None:
    """95% interval of ``R = sum(numerators) / sum(denominators)`` over independent items (here
    prompts: new tokens and decoding steps), or None for fewer than 2 items.

    R is a ratio estimator; to first order (the delta method) its variance is
    ``sum_i (t_i - R s_i)^2 / (n (n - 1) mean(s)^2)``, and the interval is ``R -/+ q sqrt(that)``
    with ``q`` Student's t quantile for n - 1 degrees of freedom (a handful of prompts gets a wider
    interval than the normal quantile would give). Long prompts weigh more, as they do in R itself.
    """
    if len(numerators) != len(denominators):
        raise ValueError(f"numerators and denominators must have the same length, got "
                         f"{len(numerators)} and {len(denominators)}")
    n = len(numerators)
    if n < 2:
        return None
    total = float(sum(denominators))
    if total <= 0:
        raise ValueError(f"denominators must sum to more than 0, got {total}")
    ratio = float(sum(numerators)) / total
    residuals = sum((float(t) - ratio * float(s)) ** 2 for t, s in zip(numerators, denominators))
    half_width = student_t_975(n - 1) * math.sqrt(residuals / (n * (n - 1))) / (total / n)
    return ratio - half_width, ratio + half_width


@torch.no_grad()
def head_ranks(model: nn.Module, sequence: torch.Tensor, prompt_length: int, top_k: int) -> torch.Tensor:
    """Every head's rank of the right token at every scored position of one greedy continuation.

    sequence [1, S]: prompt (``prompt_length`` tokens) + greedy continuation. Returns ``ranks``
    [P, K] int64 over the positions t from the last prompt token on whose head-0 target ``t + 2``
    lies in the sequence: the rank of ``sequence[t + k + 2]`` among head k's top ``top_k`` guesses
    at t, ``top_k`` where it is not among them, -1 where ``t + k + 2`` is past the end.
    """
    if not isinstance(sequence, torch.Tensor) or sequence.dim() != 2 or sequence.shape[0] != 1:
        got = list(sequence.shape) if isinstance(sequence, torch.Tensor) else type(sequence).__name__
        raise ValueError(f"sequence must be a [1, S] tensor of token ids, got {got}")
    S = sequence.shape[1]
    if not is_int(prompt_length) or not 1 <= prompt_length <= S:
        raise ValueError(f"prompt_length must be an integer in [1, {S}] (the sequence's length), got {prompt_length!r}")
    vocab = model.lm_head.weight.shape[0]
    if not is_int(top_k) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be an integer in [1, {vocab}] (the vocabulary size), got {top_k!r}")
    K = int(model.heads.num_heads)
    first = prompt_length - 1  # the last prompt token's hidden state guesses the continuation
    if S - first < 3:
        return torch.empty(0, K, dtype=torch.long)  # no position has a target two tokens ahead
    ranks = torch.full((S - 2 - first, K), -1, dtype=torch.long)
    hidden = model.hidden_states(sequence)  # [1, S, H]
    for start in range(first, S - 2, SCORE_CHUNK):
        stop = min(start + SCORE_CHUNK, S - 2)
        guesses = torch.topk(model.head_logits(hidden[:, start:stop]).float(), top_k, dim=-1).indices[:, 0]  # [K, n, R]
        for k in range(K):
            # Positions t in [start, stop) with a target t + k + 2 inside the sequence.
            n = max(0, min(stop, S - k - 2) - start)
            if n == 0:
                continue
            right = (guesses[k, :n] == sequence[0, start + k + 2 : start + k + 2 + n, None]).cpu()  # [n, R]
            rank = torch.where(right.any(1), right.int().argmax(1), top_k)
            ranks[start - first : start - first + n, k] = rank
    return ranks


def head_rank_hits(
    model: nn.Module, sequence: torch.Tensor, prompt_length: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``head_ranks`` counted per head: ``hits`` [K, top_k] (times head k's rank-r guess was the
    token k + 2 ahead) and ``counts`` [K] (scored positions of head k)."""
    return rank_hits(head_ranks(model, sequence, prompt_length, top_k), top_k)


def accuracy_heatmap(cumulative: torch.Tensor, path: str | Path) -> Path:
    """Write a PNG heatmap of the [K, R] cumulative top-r accuracy table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K, R = cumulative.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * R, 1.0 + 0.6 * K))
    image = ax.imshow(cumulative.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for k in range(K):
        for r in range(R):
            value = float(cumulative[k, r])
            ax.text(r, k, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 else "white")
    ax.set_xticks(range(R), [str(r + 1) for r in range(R)])
    ax.set_yticks(range(K), [f"head {k} (t+{k + 2})" for k in range(K)])
    ax.set_xlabel("top-k")
    ax.set_title("Medusa head accuracy (cumulative top-k)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120, format="png")  # (not from the suffix: a file written aside has another)
    plt.close(fig)
    return path


@torch.no_grad()
def evaluate_heads(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    output_dir: str | Path,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    tree_size: int = DEFAULT_TREE_SIZE,
    top_k: int = DEFAULT_TOP_K,
    eos_token_id: int | list[int] | None = None,
    warmup: bool = True,
    batch_size: int = 1,
    acceptance: Acceptance = "greedy",
    temperature: float = DEFAULT_TEMPERATURE,
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
    seed: int = 0,
    tree: Sequence[Sequence[int]] | None = None,
    tree_search: str = "conditional",
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracy table, tree search and measured speedup of ``model`` (a MedusaModel) on ``prompts``.

    prompts: token id lists. Writes report.json, tree.json and head_accuracy.png to ``output_dir``
    and returns the report dict (``metadata`` is merged into it). batch_size > 1 adds the
    ``measured_batched`` section. acceptance "typical" measures sampling at ``temperature`` (> 0)
    with typical acceptance (``posterior_threshold``, ``posterior_alpha``; see ``medusa_generate``)
    against plain sampling, prompt i from seed ``seed + i`` (see the module docstring). ``tree``: measure
    these ``medusa_choices`` paths instead of searching a tree of ``tree_size`` nodes (the accuracy
    table then reaches at least the tree's deepest rank, so its estimate covers every node).
    ``tree_search``: "conditional" (the heads' joint ranks, ``prior_strength`` pseudo-positions of the
    independent estimate behind each conditional one) or "independent" (the Medusa paper's product).
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    if not is_int(top_k) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not is_int(tree_size) or tree_size < 1:
        raise ValueError(f"tree_size must be an integer >= 1, got {tree_size!r}")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_acceptance(acceptance, temperature, posterior_threshold, posterior_alpha)
    # Plain floats: the report is JSON (numpy's float32 is not).
    temperature, posterior_threshold, posterior_alpha = map(float, (temperature, posterior_threshold, posterior_alpha))
    sampling = acceptance == "typical"
    if sampling and temperature == 0:
        raise ValueError("typical acceptance at temperature 0 is greedy acceptance: pass a temperature > 0 "
                         "or acceptance='greedy'")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if tree_search not in TREE_SEARCHES:
        raise ValueError(f"tree_search must be one of {TREE_SEARCHES}, got {tree_search!r}")
    check_prior_strength(prior_strength)  # before the decoding, which takes long
    K = int(model.heads.num_heads)
    vocab = model.lm_head.weight.shape[0]
    given = None if tree is None else [list(p) for p in normalize_tree(tree, K)]
    if given is not None:
        top_k = max(top_k, check_ranks_fit(given, vocab) + 1)
    top_k = min(top_k, vocab)
    device = model.lm_head.weight.device
    model.eval()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    inputs = [torch.tensor([list(p)], dtype=torch.long, device=device) for p in prompts]

    # 1. Greedy continuations, and every head's rank of the right token at every position of them.
    ranks = torch.cat([head_ranks(model, greedy_generate(model, ids, max_new_tokens, eos_token_id).sequences,
                                  ids.shape[1], top_k) for ids in inputs])
    counts = (ranks >= 0).sum(0)
    per_rank = rank_accuracy_of(ranks, top_k)
    cumulative = per_rank.cumsum(dim=1)

    # 2. The tree with the highest expected acceptance under the chosen estimate (or the given one,
    # scored by it); the independent product's estimate of the same tree beside it; and the searched
    # tree's estimate at other sizes (to weigh against a bigger tree's cost per step).
    independent = PathEstimate.independent(per_rank)
    estimate = PathEstimate.conditional(ranks, top_k, prior_strength) if tree_search == "conditional" else independent
    searched = estimate.search_sizes(sorted({*CURVE_SIZES, tree_size}))
    tree, estimated = searched[tree_size] if given is None else (given, estimate.value(given))

    # 3. Measured: Medusa with that tree vs plain greedy decoding (or, typical: plain sampling, the
    # empty tree), on the same prompts.
    options = dict(acceptance="typical", temperature=temperature, posterior_threshold=posterior_threshold,
                   posterior_alpha=posterior_alpha) if sampling else {}
    if warmup:  # first calls pay one-time costs (kernel loading, allocator growth)
        medusa_generate(model, inputs[0], min(8, max_new_tokens), tree, eos_token_id=eos_token_id,
                        compare_greedy=not sampling, seed=seed if sampling else None, **options)

    def decode(i: int, ids: torch.Tensor, t: list[list[int]]):
        return medusa_generate(model, ids, max_new_tokens, t, eos_token_id=eos_token_id, compare_greedy=not sampling,
                               seed=seed + i if sampling else None, **options)

    runs = [decode(i, ids, tree) for i, ids in enumerate(inputs)]
    baselines = [decode(i, ids, []) for i, ids in enumerate(inputs)] if sampling else [r.greedy for r in runs]
    measured = _comparison(runs, baselines, sum(r.stats.wall_time_s for r in runs),
                           sum(r.stats.wall_time_s for r in baselines), acceptance)
    interval = ratio_interval([r.stats.new_tokens for r in runs], [r.stats.steps for r in runs]) \
        if measured["medusa"]["steps"] else None
    # A step emits 1 to depth + 1 tokens: the normal approximation's ends can fall outside (few prompts).
    depth = max((len(p) for p in tree), default=0)
    measured["acceleration_rate_ci95"] = None if interval is None else \
        tuple(min(max(end, 1.0), depth + 1.0) for end in interval)
    measured["per_prompt_acceleration"] = [r.stats.acceleration_rate for r in runs]
    measured["tokens_per_step_histogram"] = tokens_per_step_histogram(runs)

    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": str(device),
        "dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
        "num_prompts": len(inputs),
        "max_new_tokens": max_new_tokens,
        "num_heads": K,
        "top_k": top_k,
        "head_accuracy": {
            "cumulative_top_k": cumulative.tolist(),
            "per_rank": per_rank.tolist(),
            "top1": cumulative[:, 0].tolist(),
            "scored_positions": counts.tolist(),
        },
        "tree": {"size": len(tree), "source": "search" if given is None else "given",
                 "requested_size": tree_size if given is None else None, "paths": tree,
                 "max_depth": depth, "estimated_acceleration": estimated,
                 "estimate": tree_search, "prior_strength": prior_strength if tree_search == "conditional" else None,
                 "estimated_acceleration_independent": independent.value(tree),
                 "estimated_acceleration_by_size": {str(n): a for n, (_, a) in searched.items()}},
        "decoding": dict(options, seed=seed) if sampling else {"acceptance": "greedy"},
        "measured": measured,
    }
    if batch_size > 1:  # batches of at most as many prompts as there are
        used = min(batch_size, len(inputs))
        report["measured_batched"] = measure_batched(model, [ids[0] for ids in inputs], max_new_tokens, tree,
                                                     used, eos_token_id, warmup, seed=seed, **options)
        report["measured_batched"]["requested_batch_size"] = batch_size
    if metadata:
        report.update(metadata)
    files = {role: output_dir / name for role, name in EVAL_FILES.items()}
    report["files"] = {name: str(p) for name, p in files.items()}
    # Written as a set: each file aside first, then moved into place with report.json last (an earlier
    # report deleted first), so an interrupted evaluation never leaves a report beside another's tree.
    aside = {role: p.with_name(f".{p.name}.tmp") for role, p in files.items()}
    try:
        aside["tree"].write_text(json.dumps(tree))
        accuracy_heatmap(cumulative.float(), aside["heatmap"])
        aside["report"].write_text(json.dumps(report, indent=2))
        files["report"].unlink(missing_ok=True)
        for role in ("tree", "heatmap", "report"):
            os.replace(aside[role], files[role])
    finally:
        for path in aside.values():
            path.unlink(missing_ok=True)
    return report


def tokens_per_step_histogram(results: Sequence) -> dict[str, int]:
    """{"n": how many decoding steps emitted n tokens} over ``results`` (n = 1 .. the tree's depth + 1;
    a step cut short by the token budget or EOS counts what it emitted): where the tree's length goes."""
    counts: dict[int, int] = {}
    for r in results:
        for n in r.stats.tokens_per_step:
            counts[n] = counts.get(n, 0) + 1
    return {str(n): counts[n] for n in sorted(counts)}


# The plain decoding each acceptance is measured against: its key in the report.
BASELINE = {"greedy": "greedy", "typical": "sampling"}


def _totals(results: Sequence, wall_time_s: float) -> dict[str, float]:
    """New tokens, decoding steps, the given wall time and throughput of some decodings."""
    tokens = sum(r.stats.new_tokens for r in results)
    return {"new_tokens": tokens, "steps": sum(r.stats.steps for r in results), "wall_time_s": wall_time_s,
            "tokens_per_s": tokens / max(wall_time_s, 1e-12)}


def _comparison(medusa: Sequence, plain: Sequence, medusa_wall_s: float, plain_wall_s: float,
                acceptance: str) -> dict[str, Any]:
    """Medusa decodings against the plain ones of the same prompts (in order): acceleration rate,
    speedup, each side's totals (the plain side under ``BASELINE[acceptance]``) and, greedy, the share
    of prompts whose two outputs are identical."""
    m, p = _totals(medusa, medusa_wall_s), _totals(plain, plain_wall_s)
    section: dict[str, Any] = {"acceleration_rate": m["new_tokens"] / max(m["steps"], 1),
                               # Throughputs, not wall times: sampled decodings may emit different counts.
                               "speedup": m["tokens_per_s"] / max(p["tokens_per_s"], 1e-12),
                               "medusa": m, BASELINE[acceptance]: p}
    if acceptance == "greedy":
        section["greedy_match_rate"] = sum(a.sequences.tolist() == b.sequences.tolist()
                                           for a, b in zip(medusa, plain, strict=True)) / len(medusa)
    return section


def measure_batched(model: nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                    tree: list[list[int]], batch_size: int, eos_token_id=None, warmup: bool = True, *,
                    seed: int = 0, **options) -> dict[str, Any]:
    """Medusa (``tree``) and plain (the empty tree) decoding over batches of ``batch_size`` prompts:
    tokens, steps, wall time and throughput of each, speedup = Medusa tokens/s / plain tokens/s, and (greedy)
    the share of prompts whose Medusa output equals the greedy one. ``options``: the acceptance
    options of ``medusa_generate_batch``; typical acceptance draws prompt i from seed ``seed + i``."""
    acceptance = options.get("acceptance", "greedy")
    starts = range(0, len(prompts), batch_size)

    def decode(start: int, t: list[list[int]], budget: int = max_new_tokens):
        batch = list(prompts[start:start + batch_size])
        return medusa_generate_batch(model, batch, budget, t, eos_token_id=eos_token_id,
                                     seed=seed + start if acceptance == "typical" else None, **options)

    if warmup:  # one-time costs (kernels, allocator growth) at this batch size
        for t in (tree, []):
            decode(0, t, min(8, max_new_tokens))
    medusa, plain = ([r for start in starts for r in decode(start, t)] for t in (tree, []))
    # A batch's wall time is shared by its prompts: count it once per batch.
    walls = (sum(results[i].stats.wall_time_s for i in starts) for results in (medusa, plain))
    return {"batch_size": batch_size, **_comparison(medusa, plain, *walls, acceptance)}
