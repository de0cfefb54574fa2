"""Mixed-precision training: a bf16 backbone with fp32 master heads (and LoRA adapters) under bf16
autocast, on CPU and CUDA; checkpoints in the master dtype, exports in the export dtype."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medusa_liger.kernels import force_backend
from medusa_liger.train.config import load_config
from medusa_liger.train.loop import train
from tests.train_helpers import (
    TINY,
    _torch_kernels,  # noqa: F401  (autouse fixture)
    build_in_process,
    losses,
    short_config,
    train_killed_at,
)

# ----------------------------------------------------------------------------------------------
# Mixed precision: a bf16 backbone with fp32 master heads (and LoRA adapters) under bf16 autocast
# ----------------------------------------------------------------------------------------------

# CPU pinned (also on a GPU machine): CPU bf16 autocast, and bit-exact resume needs deterministic kernels.
BF16 = ["model.dtype=bfloat16", "train.precision=bf16", "train.device=cpu", "checkpoint.every=0",
        "data.eval_fraction=0.0"]


def run_steps(cfg, model, loader, optimizer, scheduler, device, steps: int) -> list[dict]:
    from medusa_liger.train.build import autocast_dtype, trainable_parameters
    from medusa_liger.train.loop import _set_stage, _train_step

    params = list(trainable_parameters(model).values())
    amp = autocast_dtype(cfg, device)
    records = []
    for step in range(steps):
        _set_stage(model, cfg, step)
        batches = [loader.next_batch() for _ in range(cfg.train.grad_accum)]
        records.append(_train_step(model, batches, optimizer, scheduler, params, cfg, device, amp))
    return records


def dtypes_by_role(model) -> dict[str, set]:
    """Parameter dtypes of the heads, the LoRA adapters and the rest of the backbone."""
    roles: dict[str, set] = {"heads": set(), "lora": set(), "backbone": set()}
    for name, p in model.named_parameters():
        role = "heads" if name.startswith("heads.") else "lora" if ".lora_" in name else "backbone"
        roles[role].add(p.dtype)
    return roles


@pytest.mark.parametrize("extra, expected", [
    (["train.mode=heads"], {"heads": {torch.float32}, "lora": set(), "backbone": {torch.bfloat16}}),
    (["lora.enabled=true", "lora.r=4"], {"heads": {torch.float32}, "lora": {torch.float32}, "backbone": {torch.bfloat16}}),
    (["lora.enabled=true", "lora.r=4", "train.master_dtype=auto"],
     {"heads": {torch.bfloat16}, "lora": {torch.bfloat16}, "backbone": {torch.bfloat16}}),
])
def test_bf16_backbone_keeps_master_dtype_heads_and_lora(tmp_path, extra, expected):
    cfg = short_config(tmp_path, *BF16, *extra)
    if cfg.lora.enabled:
        pytest.importorskip("peft")
    model, loader, optimizer, scheduler = build_in_process(cfg, torch.device("cpu"))
    assert dtypes_by_role(model) == expected
    # Per-head projections start as exact copies of the bf16 lm_head (the bf16 -> fp32 cast is exact).
    for head in model.heads.lm_heads:
        assert torch.equal(head.weight.to(torch.bfloat16), model.lm_head.weight)
    records = run_steps(cfg, model, loader, optimizer, scheduler, torch.device("cpu"), 2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert dtypes_by_role(model) == expected  # AdamW kept every dtype
    for group in optimizer.param_groups:  # the optimizer state lives in the master dtype too
        for p in group["params"]:
            assert optimizer.state[p]["exp_avg"].dtype == p.dtype


def test_autocast_gradients_of_fp32_heads_match_fp32_compute(tmp_path):
    """bf16 hidden states + fp32 head weights: under CPU bf16 autocast the fused loss computes in bf16
    and hands back fp32 gradients that agree with the same loss computed in fp32."""
    cfg = short_config(tmp_path, *BF16, "train.mode=heads")
    model, loader, _, _ = build_in_process(cfg, torch.device("cpu"))
    with torch.no_grad():  # move the zero-initialized blocks off the identity
        for p in model.heads.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = loader.next_batch()

    def grads(amp: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(batch["input_ids"], labels=batch["labels"], segment_ids=batch["segment_ids"])
        out.loss.backward()
        return out.loss.detach(), {n: p.grad for n, p in model.heads.named_parameters()}

    loss_amp, g_amp = grads(True)
    loss_fp32, g_fp32 = grads(False)
    assert torch.isfinite(loss_amp) and loss_amp.dtype == torch.float32
    torch.testing.assert_close(loss_amp, loss_fp32, rtol=2e-2, atol=0)
    for name, g in g_amp.items():
        assert g is not None and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        rel = (g - g_fp32[name]).norm() / g_fp32[name].norm()
        assert 0 < rel < 2e-2, (name, float(rel))  # bf16 rounding, no more


def test_fp32_master_heads_keep_updates_that_bf16_rounds_away(tmp_path):
    """An AdamW step moves each weight by about lr; at lr = 1e-5 that is below half a bf16 ulp of most
    lm_head entries, so bf16 heads stay put while fp32 master heads move."""
    small = ["train.mode=heads", "train.heads_lr=1e-5", "train.warmup_steps=0", "train.min_lr_ratio=1.0"]
    moved = {}
    for master in ("float32", "bfloat16"):
        cfg = short_config(tmp_path / master, *BF16, *small, f"train.master_dtype={master}")
        model, loader, optimizer, scheduler = build_in_process(cfg, torch.device("cpu"))
        before = [h.weight.detach().clone() for h in model.heads.lm_heads]
        run_steps(cfg, model, loader, optimizer, scheduler, torch.device("cpu"), 2)
        changed = [(h.weight != b).float().mean() for h, b in zip(model.heads.lm_heads, before)]
        moved[master] = float(torch.stack(changed).mean())
    assert moved["float32"] > 0.9, moved
    assert moved["bfloat16"] < 0.5 * moved["float32"], moved


def test_bf16_run_checkpoints_master_weights_exports_export_dtype_and_resumes_exactly(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from medusa_liger.heads.export import read_heads

    extra = [*BF16, "lora.enabled=true", "lora.r=4", "train.steps=4", "checkpoint.every=2",
             "export.formats=[medusa, vllm]", "train.heads_only_steps=1"]
    straight = tmp_path / "straight"
    train(short_config(straight, *extra))
    expected = losses(straight)
    ckpt = straight / "checkpoints" / "step-000004"
    assert {t.dtype for t in read_heads(ckpt / "heads").tensors.values()} == {torch.float32}
    lora = load_file(str(ckpt / "trainable.safetensors"))
    assert lora and {t.dtype for t in lora.values()} == {torch.float32}
    for fmt in ("medusa", "vllm"):  # export.dtype auto: the backbone's dtype, not the master one
        assert {t.dtype for t in read_heads(straight / "final" / f"heads_{fmt}").tensors.values()} == {torch.bfloat16}
    backbone_config = json.loads((straight / "final" / "backbone" / "config.json").read_text())
    assert backbone_config.get("dtype", backbone_config.get("torch_dtype")) == "bfloat16"

    train_killed_at(3, short_config(tmp_path / "killed", *extra), monkeypatch)
    train(short_config(tmp_path / "killed", *extra, "train.resume=auto", "export.dtype=float32",
                       "export.formats=[medusa]"))
    assert losses(tmp_path / "killed") == expected  # bit-exact through the fp32 master checkpoint
    final = read_heads(tmp_path / "killed" / "final" / "heads_medusa").tensors
    assert {t.dtype for t in final.values()} == {torch.float32}  # an explicit export.dtype wins
    for name, tensor in read_heads(ckpt / "heads").tensors.items():
        assert torch.equal(final[name], tensor), name


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["train.mode=heads"], ["lora.enabled=true", "lora.r=4", "model.patch=true",
                                                           "train.heads_only_steps=1"]],
                         ids=["heads", "joint-lora-patched"])
def test_cuda_bf16_backbone_fp32_heads_under_autocast(tmp_path, extra):
    """Three steps on CUDA as the 8B configs run: bf16 backbone, fp32 master heads (and LoRA), bf16
    autocast from ``train.precision: auto``, the Triton kernels (no forced backend)."""
    if "lora.enabled=true" in extra:
        pytest.importorskip("peft")
    from medusa_liger.train.build import autocast_dtype

    device = torch.device("cuda")
    cfg = short_config(tmp_path, "model.dtype=bfloat16", "train.precision=auto", "train.device=cuda",
                       "data.eval_fraction=0.0", "train.warmup_steps=0", *extra)
    assert autocast_dtype(cfg, device) == torch.bfloat16
    with force_backend(None):  # undo the file's torch fixture: CUDA takes the Triton path
        model, loader, optimizer, scheduler = build_in_process(cfg, device)
        roles = dtypes_by_role(model)
        assert roles["heads"] == {torch.float32} and roles["backbone"] == {torch.bfloat16}
        assert roles["lora"] == ({torch.float32} if cfg.lora.enabled else set())
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        records = run_steps(cfg, model, loader, optimizer, scheduler, device, 3)
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in records), records
    assert dtypes_by_role(model) == roles
    for name, p in model.named_parameters():
        if name in trained and (name.startswith("heads.") or "lora_B" in name or "lora_A" in name):
            assert p.device.type == "cuda" and not torch.equal(p, trained[name]), name


def test_master_dtype_key_is_typed():
    assert load_config(TINY).train.master_dtype == "float32"
    assert load_config(TINY, ["train.master_dtype=auto"]).train.master_dtype == "auto"
    with pytest.raises(ValueError, match="train.master_dtype must be one of 'auto', 'float32'"):
        load_config(TINY, ["train.master_dtype=float64"])


@pytest.mark.parametrize("overrides, key", [
    (["train.master_dtype=float16"], "train.master_dtype"),
    (["model.dtype=float16", "train.master_dtype=auto"], "train.master_dtype"),
    (["model.dtype=float16", "train.mode=joint"], "model.dtype"),
])
def test_float16_trained_weights_are_refused(overrides, key):
    """AdamW's eps (1e-8) is 0 in float16: every weight turned NaN from step 2, and the run exported them."""
    with pytest.raises(ValueError, match=f"{key} must be .*float16 weights do not train without loss scaling"):
        load_config(TINY, overrides)
    # A float16 backbone that stays frozen, or that trains through float32 LoRA adapters, is fine.
    load_config(TINY, ["model.dtype=float16", "train.mode=heads"])
    load_config(TINY, ["model.dtype=float16", "train.mode=joint", "lora.enabled=true"])


def test_a_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch, capsys):
    """A NaN step used to update every weight to NaN; the run went on and exported them (exit 0)."""
    from medusa_liger.cli import main
    from medusa_liger.train import loop

    original = loop.accumulate_gradients
    calls = []

    def nan_at_step_3(*args, **kwargs):
        metrics = original(*args, **kwargs)
        calls.append(1)
        return {**metrics, "loss": float("nan")} if len(calls) == 3 else metrics

    monkeypatch.setattr(loop, "accumulate_gradients", nan_at_step_3)
    cfg = short_config(tmp_path, "train.steps=4", "checkpoint.every=2")
    with pytest.raises(loop.DivergedError, match="step 3: the loss is nan and the gradient norm .*: stopped before"):
        train(cfg)
    assert not (tmp_path / "final").exists()
    heads = load_file(tmp_path / "checkpoints" / "step-000002" / "heads" / "medusa_lm_head.safetensors")
    assert all(torch.isfinite(t).all() for t in heads.values())
    calls.clear()  # the command says it in one line, with exit status 1
    assert main(["train", str(tmp_path / "config.yaml")]) == 1
    assert "medusa-liger train: error: step 3: the loss is nan" in capsys.readouterr().err
