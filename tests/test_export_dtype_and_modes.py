"""Exports of a run whose backbone trains in float32 but exports in bfloat16 (the medusa2-full
config), and exports a serving engine running as another user can open."""

from __future__ import annotations

import json
import os
import stat

import torch
from safetensors.torch import load_file

from medusa_liger.cli import main as medusa_liger_main
from medusa_liger.train.loop import train
from tests.test_export import make_model, run_cli
from tests.train_helpers import _torch_kernels, short_config  # noqa: F401  (autouse fixture)


def test_an_fp32_joint_run_exports_its_checkpoint_and_final_heads_in_its_export_dtype(tmp_path):
    run = tmp_path / "run"
    train(short_config(run, "train.mode=joint", "train.steps=2", "checkpoint.every=2", "export.formats=[medusa]",
                       "data.eval_fraction=0.0", "model.dtype=float32", "export.dtype=bfloat16"))
    step = run / "checkpoints" / "step-000002"
    for source, out in ((step, tmp_path / "from_ckpt"), (run / "final" / "heads_medusa", tmp_path / "from_final")):
        umask = os.umask(0o022)
        try:
            assert medusa_liger_main(["export", "--checkpoint", str(source), "--output", str(out), "--format", "medusa"]) == 0
        finally:
            os.umask(umask)
        heads = load_file(str(out / "medusa_lm_head.safetensors"))
        backbone = load_file(str(out / "backbone" / "model.safetensors"))
        assert {t.dtype for t in backbone.values()} == {torch.bfloat16}
        assert {t.dtype for t in heads.values()} == {torch.bfloat16}, source  # as the backbone beside them
        assert json.loads((out / "config.json").read_text())["medusa_liger"]["serving_dtype"] == "bfloat16"
        for path in (out, out / "backbone"):  # a serving engine running as another user opens them
            assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


def test_cli_exports_are_listable_by_a_serving_user(tmp_path):
    umask = os.umask(0o022)
    try:
        make_model(shared=False).save_heads(tmp_path / "heads", format="medusa")
        assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "out"), "--format", "vllm") == 0
        assert run_cli("--checkpoint", str(tmp_path / "heads"), "--output", str(tmp_path / "both")) == 0
    finally:
        os.umask(umask)
    for path in (tmp_path / "out", tmp_path / "both", tmp_path / "both" / "vllm"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


def test_an_export_cast_with_dtype_records_the_cast_backbone_dtype_for_a_re_export(tmp_path):
    """`export --dtype bf16` casts the backbone beside the heads: their recorded serving dtype must say
    bf16, or re-exporting that export without --dtype writes fp32 heads beside the bf16 backbone."""
    run = tmp_path / "run"
    train(short_config(run, "train.mode=joint", "train.steps=2", "checkpoint.every=2", "export.formats=[medusa]",
                       "data.eval_fraction=0.0", "model.dtype=float32"))
    first, second = tmp_path / "first", tmp_path / "second"
    assert medusa_liger_main(["export", "--checkpoint", str(run), "--output", str(first), "--format", "medusa",
                              "--dtype", "bf16"]) == 0
    assert json.loads((first / "config.json").read_text())["medusa_liger"]["serving_dtype"] == "bfloat16"
    assert medusa_liger_main(["export", "--checkpoint", str(first), "--output", str(second), "--format", "medusa"]) == 0
    heads = load_file(str(second / "medusa_lm_head.safetensors"))
    backbone = load_file(str(second / "backbone" / "model.safetensors"))
    assert {t.dtype for t in backbone.values()} == {torch.bfloat16}
    assert {t.dtype for t in heads.values()} == {torch.bfloat16}  # as the backbone beside them
