"""Medusa decoding and head evaluation.

    from medusa_liger.inference import medusa_generate, greedy_generate, evaluate_run
    out = medusa_generate(model, input_ids, max_new_tokens=128, compare_greedy=True)
    out.stats.acceleration_rate, out.speedup, out.matches_greedy
    report = evaluate_run("runs/tiny", max_new_tokens=64)   # what `medusa-liger eval runs/tiny` does

``tree``: candidate trees (``medusa_choices``) and tree search; ``generate``: tree decoding of one
sequence; ``batched``: of several at once (``medusa_generate_batch``); ``prompts``: prompt files and
datasets as token ids; ``evaluate``: the head accuracy table, tree search and measured speedup; ``cli``: loading a run and ``medusa-liger eval``;
``distill``: self-distillation data (``medusa-liger distill``).
"""

from medusa_liger.inference.batched import BatchedMedusaDecoder, medusa_generate_batch
from medusa_liger.inference.cli import evaluate_run, load_causal_lm, load_medusa
from medusa_liger.inference.distill import DistillSettings, DistillSummary, self_distill
from medusa_liger.inference.evaluate import evaluate_heads, head_rank_hits, head_ranks
from medusa_liger.inference.generate import (
    DecodeStats,
    GenerationResult,
    MedusaDecoder,
    MedusaGenerateOutput,
    greedy_generate,
    medusa_generate,
)
from medusa_liger.inference.prompts import load_prompts
from medusa_liger.inference.tree import (
    PathEstimate,
    TreeBuffers,
    acceleration_by_size,
    build_tree_buffers,
    conditional_expected_acceleration,
    conditional_tree_search,
    default_tree,
    expected_acceleration,
    greedy_tree_search,
)

__all__ = [
    "BatchedMedusaDecoder",
    "DecodeStats",
    "DistillSettings",
    "DistillSummary",
    "GenerationResult",
    "MedusaDecoder",
    "MedusaGenerateOutput",
    "PathEstimate",
    "TreeBuffers",
    "acceleration_by_size",
    "build_tree_buffers",
    "conditional_expected_acceleration",
    "conditional_tree_search",
    "default_tree",
    "evaluate_heads",
    "evaluate_run",
    "expected_acceleration",
    "greedy_generate",
    "greedy_tree_search",
    "head_rank_hits",
    "head_ranks",
    "load_causal_lm",
    "load_medusa",
    "load_prompts",
    "medusa_generate",
    "medusa_generate_batch",
    "self_distill",
]
