"""Edges of a run's end (summary numbers, final/ exports) and of `medusa-liger export` from a checkpoint.
(The metrics logger's and the plot's are in test_train.py, beside their fakes.)"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medusa_liger.cli import main as medusa_liger_main
from medusa_liger.train.loop import train
from tests.train_helpers import _torch_kernels, short_config  # noqa: F401  (autouse fixture)


class _RecordingLogger:
    def __init__(self, path: Path):
        self.path, self.summaries = path, []

    def summary(self, values):
        self.summaries.append(dict(values))


def _write_records(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# The summary and the report
# --------------------------


def test_the_summary_averages_the_last_steps_and_reports_the_first_and_the_time(tmp_path, monkeypatch):
    from medusa_liger.train import finish, plot
    from medusa_liger.train.packing import PackedData, most_common_target_frequency

    # 30 steps: the mean of the last 3 (a tenth), with a head whose value is missing in some records.
    records = [{"step": s, "loss": float(s), "lm_loss": 100.0 + s, "acc/lm": s / 100,
                "acc/head0": s / 1000, "acc/head1": None if s == 30 else 0.5} for s in range(1, 31)]
    _write_records(tmp_path / "metrics.jsonl", records)
    cfg = short_config(tmp_path, "heads.num_heads=2", "train.steps=30")
    monkeypatch.setattr(finish, "export_final", lambda *args: {})
    plotted = {}
    monkeypatch.setattr(plot, "plot_metrics", lambda recs, path, **kw: plotted.update(kw, n=len(recs)) or path)
    # Held-out rows where the most common target two tokens on (head0's) differs from the next token's.
    ids = torch.tensor([[5, 6, 7, 7, 7, 8, 9, 9]])
    data = PackedData(ids, ids.clone(), torch.ones_like(ids))
    assert most_common_target_frequency(data, 2)[1] != most_common_target_frequency(data, 1)[1]
    logger = _RecordingLogger(tmp_path / "metrics.jsonl")
    started = time.perf_counter()
    summary, paths = finish.finish_run(cfg, None, None, logger, data, eval_metrics={"eval/acc/head0": 0.25},
                                       baseline=0.125, final=tmp_path / "final", started=started)
    assert summary["first_loss"] == 1.0
    assert summary["final_loss"] == pytest.approx(29.0)  # steps 28-30
    assert summary["final_lm_loss"] == pytest.approx(129.0)
    assert summary["final_acc/head0"] == pytest.approx(0.029)
    assert summary["final_acc/head1"] == pytest.approx(0.5)  # the missing value is left out, not a zero
    assert summary["most_common_token_frequency"] == 0.125 and summary["eval/acc/head0"] == 0.25
    assert summary["eval/most_common_token_frequency"] == most_common_target_frequency(data, 2)[1]
    assert 0 <= summary["seconds"] < time.perf_counter() - started + 1e-6
    assert logger.summaries == [summary]  # wandb gets the summary
    assert plotted == {"baseline": 0.125, "title": cfg.name, "n": 30}
    assert paths["metrics"] == tmp_path / "metrics.jsonl"


def test_the_report_compares_held_out_accuracy_with_the_held_out_baseline():
    from medusa_liger.train.finish import format_summary

    summary = {"steps": 3, "seconds": 1.0, "first_loss": 2.0, "final_loss": 1.0, "final_lm_loss": None,
               "final_acc/head0": 0.5, "final_acc/head1": None, "most_common_token_frequency": 0.111,
               "eval/acc/head0": 0.4, "eval/acc/head1": 0.3, "eval/most_common_token_frequency": 0.222}
    lines = format_summary(summary, {"plot": Path("p.png")}, 2).splitlines()
    held_out = next(line for line in lines if line.startswith("held-out top-1 accuracy"))
    assert "head0 0.4000, head1 0.3000" in held_out and "0.2220" in held_out and "0.1110" not in held_out
    assert "head1 (t+3) n/a" in "\n".join(lines) and "plot: p.png" in lines


# final/
# ------


def test_a_run_removes_a_killed_exports_scratch_and_returns_every_export(tmp_path):
    leftover = tmp_path / "final" / ".export-killed"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"x" * 100)
    cfg = short_config(tmp_path, "train.steps=1", "checkpoint.every=0", "export.formats=[medusa]",
                       "data.eval_fraction=0")
    result = train(cfg)
    final = tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["backbone", "heads_medusa"]
    assert result.paths["backbone"] == final / "backbone" and result.paths["heads_medusa"] == final / "heads_medusa"


def test_a_joint_run_on_a_saved_backbone_exports_the_backbone_it_trained(tmp_path, capsys):
    train(short_config(tmp_path / "base", "train.steps=1", "checkpoint.every=0", "export.formats=[medusa]",
                       "data.eval_fraction=0"))
    base = tmp_path / "base" / "final" / "backbone"
    result = train(short_config(tmp_path / "joint", f"model.name_or_path={base}", "train.mode=joint",
                                "train.steps=1", "checkpoint.every=0", "export.formats=[medusa]",
                                "data.eval_fraction=0"))
    backbone = tmp_path / "joint" / "final" / "backbone"
    assert result.paths["backbone"] == backbone and (backbone / "config.json").is_file()
    config = json.loads((tmp_path / "joint" / "final" / "heads_medusa" / "config.json").read_text())
    assert config["base_model_name_or_path"] == str(backbone.resolve())
    assert "export.backbone=never" not in capsys.readouterr().err


def test_no_new_entry_goes_into_final_before_every_earlier_one_is_aside(tmp_path, monkeypatch):
    """A hard kill (no rollback) between the renames must never leave new heads beside an old backbone."""
    extra = ["train.steps=1", "checkpoint.every=0", "data.eval_fraction=0"]
    train(short_config(tmp_path, *extra))
    final = tmp_path / "final"
    rename, seen = Path.rename, []

    def recording_rename(self, target):
        if ".export-" in str(self) and Path(target).parent == final:  # a new entry placed
            seen.append(sorted(p.name for p in final.iterdir() if not p.name.startswith(".")))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", recording_rename)
    train(short_config(tmp_path, *extra, "train.seed=5"))
    assert seen[0] == [] and len(seen) == 3


def test_the_exported_backbone_is_cast_to_export_dtype(tmp_path):
    train(short_config(tmp_path, "train.steps=1", "checkpoint.every=0", "export.formats=[medusa]",
                       "data.eval_fraction=0", "export.dtype=float16"))
    backbone = load_file(str(tmp_path / "final" / "backbone" / "model.safetensors"))
    assert {t.dtype for t in backbone.values()} == {torch.float16}
    heads = load_file(str(tmp_path / "final" / "heads_medusa" / "medusa_lm_head.safetensors"))
    assert {t.dtype for t in heads.values()} == {torch.float16}


# medusa-liger export of a training checkpoint
# --------------------------------------------


def _train_joint(run: Path, *extra: str) -> Path:
    train(short_config(run, "train.mode=joint", "train.steps=2", "checkpoint.every=2", "export.formats=[medusa]",
                       "data.eval_fraction=0.0", *extra))
    return run / "checkpoints" / "step-000002"


def test_a_moved_run_exports_from_where_it_is_now(tmp_path):
    """The run's config.yaml names its old output_dir: the rebuild must not write (or read) there."""
    _train_joint(tmp_path / "run")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    step = tmp_path / "moved" / "checkpoints" / "step-000002"
    assert medusa_liger_main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "out"),
                              "--format", "medusa"]) == 0
    assert not (tmp_path / "run").exists()
    final = tmp_path / "moved" / "final" / "backbone"
    exported = load_file(str(tmp_path / "out" / "backbone" / "model.safetensors"))
    assert all(torch.equal(t, load_file(str(final / "model.safetensors"))[k]) for k, t in exported.items())


def test_a_bf16_joint_checkpoint_exports_its_backbone_in_the_serving_dtype(tmp_path):
    step = _train_joint(tmp_path / "run", "model.dtype=bfloat16", "train.precision=bf16", "train.device=cpu")
    assert medusa_liger_main(["export", "--checkpoint", str(step), "--output", str(tmp_path / "out"),
                              "--format", "medusa"]) == 0
    backbone = tmp_path / "out" / "backbone"
    assert {t.dtype for t in load_file(str(backbone / "model.safetensors")).values()} == {torch.bfloat16}
    config = json.loads((backbone / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
