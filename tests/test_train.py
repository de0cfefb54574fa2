"""Training end to end on a shortened tiny config: outputs, loss, export, resume, accumulation, wandb."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medusa_liger.heads import MedusaModel
from medusa_liger.kernels import force_backend
from medusa_liger.train.build import GroupSchedule, heads_lambda, warmup_cosine
from medusa_liger.train.config import load_config
from medusa_liger.train.logging import read_metrics
from medusa_liger.train.loop import accumulate_gradients, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# The tiny config shrunk to seconds: a smaller model, fewer examples, short rows, no wandb.
SHORT = [
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.num_attention_heads=4",
    "model.tiny.num_key_value_heads=2", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=400",
    "data.seq_len=64", "data.max_examples=40", "data.eval_fraction=0.1", "train.micro_batch_size=4",
    "train.warmup_steps=2", "train.lr=3e-3", "train.heads_lr=3e-3", "logging.wandb=disabled",
    "logging.progress=false", "train.threads=2",
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


def test_tiny_run_end_to_end(tmp_path):
    cfg = short_config(tmp_path, "train.steps=20", "checkpoint.every=10", "checkpoint.keep=1")
    result = train(cfg)
    out = Path(cfg.output_dir)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    assert {"loss", "lm_loss", "acc/lm", "acc/head0", "acc/head2", "tokens_per_s", "lr/heads"} <= set(records[0])
    first, last = sum(losses(out)[:3]) / 3, sum(losses(out)[-3:]) / 3
    assert last < first - 1.0, (first, last)  # the loss falls
    for path in ("config.yaml", "plot.png", "final/backbone/config.json", "final/backbone/tokenizer.json",
                 "final/heads_medusa/medusa_lm_head.safetensors", "final/heads_vllm/model.safetensors",
                 "tokenizer/tokenizer.json"):
        assert (out / path).is_file(), path
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000020"]  # keep=1 pruned step 10
    assert load_config(out / "config.yaml") == cfg
    summary = result.summary
    assert summary["final_loss"] is not None and 0 < summary["most_common_token_frequency"] < 1
    assert "eval/acc/head0" in summary

    # Both exports load back onto the exported backbone and predict what the trained heads predict.
    from transformers import AutoModelForCausalLM

    backbone = AutoModelForCausalLM.from_pretrained(out / "final" / "backbone")
    ids = torch.randint(0, backbone.config.vocab_size, (1, 16))
    for fmt in ("medusa", "vllm"):
        loaded = MedusaModel.from_pretrained(out / "final" / f"heads_{fmt}", backbone=backbone)
        assert loaded.config.num_heads == cfg.heads.num_heads
        with torch.no_grad():
            hidden = loaded.hidden_states(ids)
            assert loaded.head_logits(hidden).shape == (3, 1, 16, backbone.config.vocab_size)
    # A training checkpoint carries its heads in the export format: `medusa-liger export` reads it.
    from medusa_liger.cli import main as medusa_liger_main
    from medusa_liger.heads.export import read_heads

    assert medusa_liger_main(["export", "--checkpoint", str(out / "checkpoints" / "step-000020"),
                              "--output", str(tmp_path / "exported"), "--format", "vllm"]) == 0
    final_heads = read_heads(out / "final" / "heads_medusa").tensors
    for name, tensor in read_heads(tmp_path / "exported").tensors.items():
        assert torch.equal(tensor, final_heads[name]), name
    config = json.loads((out / "final" / "heads_medusa" / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["base_model_name_or_path"].endswith("backbone")


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    extra = ["train.steps=8", "checkpoint.every=3", "train.grad_accum=2", "train.micro_batch_size=2",
             "train.heads_only_steps=2", "train.heads_lambda.schedule=linear", "train.heads_lambda.ramp_steps=4",
             "train.heads_lambda.value=0.5", "export.formats=[medusa]", "data.eval_fraction=0.0"]
    train(short_config(tmp_path / "straight", *extra))
    expected = losses(tmp_path / "straight")
    records = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert [r["stage"] for r in records[:3]] == ["heads_only", "heads_only", "joint"]
    assert records[0]["lr/backbone"] == 0.0 and records[3]["lr/backbone"] > 0

    # "Kill" the second run while it logs step 5 (after the step-3 checkpoint), then resume.
    from medusa_liger.train import logging as train_logging

    original_log = train_logging.MetricsLogger.log

    def dying_log(self, step, metrics):
        original_log(self, step, metrics)
        if step == 5:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train_logging.MetricsLogger, "log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        train(short_config(tmp_path / "killed", *extra))
    monkeypatch.setattr(train_logging.MetricsLogger, "log", original_log)
    assert len(losses(tmp_path / "killed")) == 5
    train(short_config(tmp_path / "killed", *extra, "train.resume=auto"))
    assert losses(tmp_path / "killed") == expected  # bit-exact, steps 1..8, no duplicates


def test_accumulation_is_normalized_by_target_tokens(tmp_path):
    """Two micro-batches with very different target counts give the gradient of one joint batch."""
    cfg = short_config(tmp_path, "train.steps=1", "logging.wandb=disabled")
    from medusa_liger.train.build import build_medusa, build_tokenizer_and_backbone
    from medusa_liger.train.data import load_examples

    tokenizer, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data))
    model = build_medusa(cfg, backbone)
    with torch.no_grad():  # move the zero-initialized heads off the identity
        for p in model.heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
    T = 24
    ids = torch.randint(0, len(tokenizer), (3, T))
    labels = ids.clone()
    labels[0, 4:] = -100  # row 0 has few targets, rows 1-2 many
    segments = torch.ones_like(ids)
    segments[2, T // 2:] = 2
    whole = {"input_ids": ids, "labels": labels, "segment_ids": segments}
    parts = [{k: v[:1] for k, v in whole.items()}, {k: v[1:] for k, v in whole.items()}]

    def grads(batches):
        model.zero_grad(set_to_none=True)
        metrics = accumulate_gradients(model, batches, torch.device("cpu"))
        return metrics, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    m_whole, g_whole = grads([whole])
    m_parts, g_parts = grads(parts)
    assert m_parts["loss"] == pytest.approx(m_whole["loss"], rel=1e-5)
    assert m_parts["acc/head0"] == pytest.approx(m_whole["acc/head0"], rel=1e-6)
    for a, b in zip(g_parts, g_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_medusa1_on_a_saved_backbone_leaves_it_untouched(tmp_path):
    first = short_config(tmp_path / "base", "train.steps=1", "export.formats=[medusa]")
    train(first)
    backbone_dir = tmp_path / "base" / "final" / "backbone"
    cfg = short_config(tmp_path / "m1", f"model.name_or_path={backbone_dir}", "train.mode=heads", "train.steps=3",
                       "checkpoint.every=0", "export.formats=[vllm]")
    result = train(cfg)
    assert not (tmp_path / "m1" / "final" / "backbone").exists()  # not trained, not re-exported
    assert (tmp_path / "m1" / "final" / "heads_vllm" / "model.safetensors").is_file()
    assert "lm_loss" not in read_metrics(tmp_path / "m1" / "metrics.jsonl")[0]
    from transformers import AutoModelForCausalLM

    backbone = AutoModelForCausalLM.from_pretrained(backbone_dir)
    loaded = MedusaModel.from_pretrained(result.final_dir / "heads_vllm", backbone=backbone)
    assert loaded.config.num_heads == 3


def test_lora_joint_run_exports_a_merged_backbone(tmp_path):
    pytest.importorskip("peft")
    cfg = short_config(tmp_path, "lora.enabled=true", "lora.r=4", "lora.alpha=8", "train.steps=3",
                       "checkpoint.every=0", "export.formats=[medusa]", "data.eval_fraction=0.0")
    train(cfg)
    merged = json.loads((tmp_path / "final" / "backbone" / "config.json").read_text())
    assert merged["model_type"] == "llama"
    assert not (tmp_path / "final" / "backbone" / "adapter_config.json").exists()


def test_wandb_offline_writes_its_files(tmp_path):
    pytest.importorskip("wandb")
    cfg = short_config(tmp_path, "logging.wandb=offline", "train.steps=2", "checkpoint.every=0",
                       "export.formats=[medusa]", "data.eval_fraction=0.0")
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_schedules():
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)
    cfg = load_config(TINY, ["train.mode=joint", "train.steps=20", "train.heads_only_steps=5", "train.warmup_steps=2",
                             "train.heads_lambda.schedule=sine", "train.heads_lambda.ramp_steps=10",
                             "train.heads_lambda.value=0.2"])
    backbone, heads = GroupSchedule("backbone", cfg), GroupSchedule("heads", cfg)
    assert backbone(4) == 0.0 and backbone(5) == pytest.approx(0.5) and heads(0) == pytest.approx(0.5)
    assert heads_lambda(cfg, 0) == 0.0 and heads_lambda(cfg, 10) == pytest.approx(0.2)
    assert heads_lambda(cfg, 5) == pytest.approx(0.2 * 2**-0.5)
    linear = load_config(TINY, ["train.heads_lambda.schedule=linear", "train.heads_lambda.ramp_steps=10",
                                "train.heads_lambda.value=0.2"])
    assert heads_lambda(linear, 5) == pytest.approx(0.1)
