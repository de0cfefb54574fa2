"""Shared helpers of the training tests: the shortened tiny config, the PyTorch-path fixture,
killed runs, metrics and in-process model building."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medusa_liger.kernels import force_backend
from medusa_liger.train.config import load_config
from medusa_liger.train.logging import read_metrics
from medusa_liger.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# The tiny config shrunk to seconds: a smaller model, fewer examples, short rows, no wandb.
SHORT = [
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_attention_heads=4",
    "model.tiny.num_key_value_heads=2", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=400",
    "data.seq_len=64", "data.max_examples=40", "data.eval_fraction=0.1", "train.micro_batch_size=4",
    "train.warmup_steps=2", "train.lr=3e-3", "train.heads_lr=3e-3", "logging.wandb=disabled",
    "logging.progress=false",
    # The threads conftest gave this worker (its share of the cores): more would oversubscribe them
    # beside the other workers, where intra-op threads spin waiting for each other.
    f"train.threads={torch.get_num_threads()}",
]


@pytest.fixture(autouse=True)
def _torch_kernels():
    """Run the model-level training through the kernels' PyTorch path: the Triton interpreter
    (which the kernel tests exercise) would make every step take seconds."""
    with force_backend("torch"):
        yield


def short_config(tmp_path: Path, *extra: str):
    return load_config(TINY, [*SHORT, f"output_dir={tmp_path}", *extra])


def losses(path: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(path / "metrics.jsonl")]


def train_killed_at(step: int, cfg, monkeypatch) -> None:
    """Run ``cfg`` and "kill" it (KeyboardInterrupt) right after it logs ``step``."""
    from medusa_liger.train import logging as train_logging

    original_log = train_logging.MetricsLogger.log

    def dying_log(self, logged_step, metrics):
        original_log(self, logged_step, metrics)
        if logged_step == step:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train_logging.MetricsLogger, "log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_logging.MetricsLogger, "log", original_log)


def build_in_process(cfg, device: torch.device):
    """(model, loader, optimizer, scheduler) as ``train`` builds them, without its logging/export."""
    from medusa_liger.train.build import (
        build_medusa,
        build_optimizer,
        build_scheduler,
        build_tokenizer_and_backbone,
    )
    from medusa_liger.train.data import load_examples
    from medusa_liger.train.packing import PackedLoader, build_packed_data

    tokenizer, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    model = build_medusa(cfg, backbone).to(device)
    loader = PackedLoader(build_packed_data(cfg.data, tokenizer, None), cfg.train.micro_batch_size, cfg.train.seed)
    optimizer = build_optimizer(cfg, model)
    return model, loader, optimizer, build_scheduler(cfg, optimizer)
