"""The embedded default end to end: train the tiny config, then evaluate its heads with Medusa decoding.

This is the README's first command (with fewer steps so CI stays quick) followed by
``medusa-liger eval``: the heads it trains must buy more than one token per backbone step, and greedy
Medusa decoding must reproduce plain greedy decoding exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medusa_liger.inference import evaluate_run
from medusa_liger.kernels import force_backend
from medusa_liger.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_default_heads_accelerate_decoding(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"output_dir={tmp_path}", "train.steps=150", "logging.wandb=disabled", "logging.progress=false",
         "checkpoint.every=1000", f"train.threads={torch.get_num_threads()}"],  # this worker's share (conftest)
    )
    with force_backend("torch"):  # model-level run: the kernel tests cover the Triton path
        train(cfg)
        report = evaluate_run(tmp_path, num_prompts=4, max_new_tokens=48, tree_size=24, device="cpu")
    measured = report["measured"]
    assert measured["greedy_match_rate"] == 1.0  # greedy acceptance is lossless
    assert measured["acceleration_rate"] > 1.0, measured
    top1 = report["head_accuracy"]["top1"]
    assert len(top1) == 3 and top1[0] > 0.0
    for name in report["files"].values():
        assert Path(name).is_file(), name
