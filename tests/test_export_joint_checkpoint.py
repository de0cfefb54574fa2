"""``medusa-liger export`` of a joint run's training checkpoint: the trained backbone goes out too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medusa_liger.cli import main as medusa_liger_main
from medusa_liger.train.loop import train
from tests.train_helpers import _torch_kernels, short_config  # noqa: F401  (autouse fixture)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _train_joint(tmp_path: Path, *extra: str) -> Path:
    cfg = short_config(tmp_path / "run", "train.mode=joint", "train.steps=3", "checkpoint.every=3",
                       "export.formats=[medusa]", "data.eval_fraction=0.0", *extra)
    train(cfg)
    return Path(cfg.output_dir)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_joint_checkpoint_exports_the_backbone_it_trained(tmp_path, lora, capsys):
    if lora:
        pytest.importorskip("peft")
    run = _train_joint(tmp_path, *(["lora.enabled=true", "lora.r=4", "lora.alpha=8"] if lora else []))
    step = run / "checkpoints" / "step-000003"  # the last step: the run's final export is the same model
    assert medusa_liger_main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "out"),
                              "--format", "medusa"]) == 0
    assert "and the backbone" in capsys.readouterr().out
    exported, final = _weights(tmp_path / "out" / "backbone"), _weights(run / "final" / "backbone")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert (tmp_path / "out" / "backbone" / "tokenizer.json").is_file()
    heads = _weights(tmp_path / "out")
    assert all(torch.equal(heads[k], v) for k, v in _weights(run / "final" / "heads_medusa").items())
    # The checkpoint's heads/ directory names the same checkpoint.
    assert medusa_liger_main(["export", "--checkpoint", str(step / "heads"), "--output", str(tmp_path / "out2"),
                              "--format", "medusa"]) == 0
    exported = _weights(tmp_path / "out2" / "backbone")
    assert all(torch.equal(exported[k], final[k]) for k in final)
    assert not list(tmp_path.glob(".out-backbone-*"))  # the scratch copy is gone


def test_joint_checkpoint_moved_out_of_its_run_is_a_clear_error(tmp_path, capsys):
    run = _train_joint(tmp_path)
    moved = tmp_path / "elsewhere" / "step-000003"
    shutil.copytree(run / "checkpoints" / "step-000003", moved)
    assert medusa_liger_main(["export", "--checkpoint", str(moved), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "trained backbone" in err and "config.yaml" in err and "--backbone" in err
    # Naming the backbone instead exports the heads against it, with a warning.
    assert medusa_liger_main(["export", "--checkpoint", str(moved), "--output", str(tmp_path / "out"),
                              "--format", "medusa", "--backbone", str(run / "final" / "backbone")]) == 0
    assert "trained the backbone too" in capsys.readouterr().err
    assert not (tmp_path / "out" / "backbone").exists()


def test_joint_checkpoint_errors_are_one_line(tmp_path, capsys):
    run = _train_joint(tmp_path)
    step = run / "checkpoints" / "step-000003"
    assert medusa_liger_main(["export", "--checkpoint", str(step), "--output", str(step / "heads"), "--overwrite"]) == 2
    assert "which this export reads" in capsys.readouterr().err
    trainable = step / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:1000])  # a truncated copy
    assert medusa_liger_main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "o")]) == 2
    assert "trainable.safetensors is not a readable safetensors file" in capsys.readouterr().err
