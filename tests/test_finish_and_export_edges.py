"""Edges of a run's end (summary numbers, final/ exports), of `medusa-liger export` from a checkpoint,
of the metrics logger (wandb ids and steps) and of the plot's curves."""

from __future__ import annotations

import json
import shutil
import sys
import time
import types
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


@pytest.mark.parametrize("interrupt_at", [5, 6])
def test_an_export_interrupted_after_placing_some_new_entries_leaves_the_earlier_one_whole(
        tmp_path, monkeypatch, interrupt_at):
    """Renames 1-3 set the earlier entries aside, 4-6 place the new ones: an interrupt after a new entry is
    placed must take it back out too (the earlier tests stop at the first placement)."""
    extra = ["train.steps=1", "checkpoint.every=0", "data.eval_fraction=0"]
    train(short_config(tmp_path, *extra))
    final = tmp_path / "final"
    before = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    rename, count = Path.rename, [0]

    def interrupted_rename(self, target):
        if ".export-" in f"{self}{target}":
            count[0] += 1
            if count[0] == interrupt_at:
                raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        train(short_config(tmp_path, *extra, "train.seed=5"))
    assert {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    assert not list(final.glob(".export-*"))


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


# The metrics logger
# ------------------


class _Run:
    def __init__(self, resume_id):
        self.id, self.logged, self.summary = resume_id or "new", [], {}

    def log(self, record, step):
        self.logged.append((step, record))

    def finish(self, exit_code=None):
        pass


def test_the_logger_sends_wandb_each_step_and_the_summary(tmp_path, monkeypatch):
    from medusa_liger.train import logging as train_logging

    monkeypatch.setattr(train_logging, "init_wandb", lambda *args: _Run(args[-1]))
    with train_logging.MetricsLogger(tmp_path, 5, 0, wandb_mode="offline", wandb_project="p", run_name="r",
                                     config={}, progress=False, every=1) as logger:
        logger.log(3, {"loss": 1.5, "acc/head0": 0.5})
        logger.summary({"final_loss": 1.5})
    assert logger.wandb.logged == [(3, {"step": 3, "loss": 1.5, "acc/head0": 0.5})]
    assert logger.wandb.summary == {"final_loss": 1.5}


def test_init_wandb_continues_the_run_it_is_given(tmp_path, monkeypatch):
    from medusa_liger.train.logging import init_wandb

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw) or "run"))
    assert init_wandb("offline", "p", "n", {}, tmp_path / "w", "abc") == "run"
    assert calls[-1]["id"] == "abc" and calls[-1]["resume"] == "allow" and calls[-1]["mode"] == "offline"
    assert calls[-1]["dir"] == str(tmp_path / "w") and (tmp_path / "w").is_dir()
    init_wandb("online", "p", "n", {}, tmp_path / "w", None)
    assert calls[-1]["id"] is None and calls[-1]["resume"] is None
    assert init_wandb("disabled", "p", "n", {}, tmp_path / "w", "abc") is None and len(calls) == 2


def test_the_wandb_step_record_keeps_every_run(tmp_path, monkeypatch):
    """A second wandb run's record must not drop the first's: a later resume from a checkpoint that names the
    first run (metrics.jsonl cut back below what it logged) would continue it and lose its new steps."""
    from medusa_liger.train import logging as train_logging

    monkeypatch.setattr(train_logging, "init_wandb", lambda *args: _Run(args[-1]))
    (tmp_path / ".wandb_steps.json").write_text(json.dumps({"old": 7}))
    _write_records(tmp_path / "metrics.jsonl", [{"step": s, "loss": 1.0} for s in (1, 2, 3)])
    train_logging.MetricsLogger(tmp_path, 10, 3, wandb_mode="offline", wandb_project="p", run_name="r", config={},
                                progress=False, every=1, wandb_id="abc", rewound=True).close()
    assert json.loads((tmp_path / ".wandb_steps.json").read_text()) == {"old": 7, "abc": 3}
    # The first run's record still says it logged step 7: a rewound resume to step 3 starts a new wandb run.
    with train_logging.MetricsLogger(tmp_path, 10, 3, wandb_mode="offline", wandb_project="p", run_name="r",
                                     config={}, progress=False, every=1, wandb_id="old", rewound=True) as logger:
        pass
    assert logger.wandb.id == "new"


def test_highest_step_of_an_empty_metrics_file_is_zero(tmp_path):
    from medusa_liger.train.logging import highest_step

    (tmp_path / "metrics.jsonl").write_text("")
    assert highest_step(tmp_path / "metrics.jsonl") == 0
    assert highest_step(tmp_path / "missing.jsonl") == 0


# The plot
# --------


def test_smoothing_is_a_trailing_mean_over_the_points_so_far():
    from medusa_liger.train.plot import _smooth

    assert _smooth([1.0, 2.0, 3.0, 4.0, 8.0], 2) == [1.0, 1.5, 2.5, 3.5, 6.0]
    assert _smooth([4.0, 2.0], 5) == [4.0, 3.0]


def _drawn(monkeypatch, path: Path, records, baseline=None):
    """[(label, xs, ys, marker)] of every Axes.plot call, and the y of every horizontal line."""
    import matplotlib.axes

    from medusa_liger.train.plot import plot_metrics

    calls, hlines = [], []
    plot, axhline = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.axhline

    def recording_plot(self, *args, **kwargs):
        calls.append((kwargs.get("label"), list(args[0]), list(args[1]), kwargs.get("marker")))
        return plot(self, *args, **kwargs)

    def recording_axhline(self, y=0, *args, **kwargs):
        hlines.append(y)
        return axhline(self, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", recording_axhline)
    plot_metrics(records, path, baseline=baseline)
    return calls, hlines


def test_the_plot_draws_smoothed_curves_held_out_markers_and_the_baseline(monkeypatch, tmp_path):
    from medusa_liger.train.plot import _smooth

    records = [{"step": s, "loss": float(s % 7), "acc/head0": 0.1, "loss/head0": 1.0} for s in range(1, 101)]
    records[49]["eval/acc/head0"] = 0.42  # a held-out evaluation at step 50
    records[49]["eval/loss/head0"] = 3.5
    calls, hlines = _drawn(monkeypatch, tmp_path / "one.png", records, baseline=0.3)
    total = next(c for c in calls if c[0] == "total loss")
    assert total[1] == list(range(1, 101)) and total[2] == _smooth([float(s % 7) for s in range(1, 101)], 2)
    unlabeled = [(xs, ys) for label, xs, ys, _ in calls if label is None]
    assert ([50], [0.42]) in unlabeled and ([50], [3.5]) in unlabeled
    assert hlines == [0.3]
    # Two points are drawn with markers too; heads in their order (head10 after head9).
    heads = {f"acc/head{k}": 0.5 for k in range(11)}
    two_points = [{"step": 1, "loss": 1.0, **heads}, {"step": 2, "loss": 1.0, **heads}]
    calls, _ = _drawn(monkeypatch, tmp_path / "two.png", two_points)
    labels = [label for label, *_ in calls if label and label.startswith("head ")]
    assert labels == [f"head {k} (t+{k + 2})" for k in range(11)]
    assert all(marker == "o" for label, _, _, marker in calls if label)
