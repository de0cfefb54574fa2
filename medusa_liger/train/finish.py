"""The end of a training run on rank 0: the summary numbers, the final exports and the plot.

``finish_run`` reads the run's metrics back, averages the last steps, adds the held-out numbers,
exports the heads in every format (and the backbone when it trained or was built here) in the
serving dtype, plots the curves and logs the summary; ``format_summary`` is the report printed
last.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from medusa_liger.heads.export import BACKBONE_SUBDIR, FORMATS, ServingFormatWarning, write_backbone
from medusa_liger.run_layout import (
    CONFIG_FILE,
    EVAL_PROMPTS_FILE,
    PLOT_FILE,
    final_heads_dir,
)
from medusa_liger.train.build import export_dtype
from medusa_liger.train.config import Config
from medusa_liger.train.data import IGNORE_INDEX
from medusa_liger.train.logging import read_metrics
from medusa_liger.train.packing import PackedData, most_common_target_frequency


def export_final(model, tokenizer, cfg: Config, final: Path) -> dict[str, Path]:
    """Heads in every export format, plus the backbone (LoRA merged) when it trained or was built here.

    Each is written in a scratch directory inside ``final``, then every earlier entry goes aside and the
    new ones take their places (undone when interrupted, so final/ holds one run's export), and an earlier
    run's export that this run does not write (a format, or a backbone) is deleted with a warning:
    ``eval``/``generate``/``export`` pair whatever heads and backbone they find in ``final/``, so an old
    backbone beside new heads was measured as this run's. Other files in ``final/`` are left alone.
    """
    dtype = export_dtype(cfg)  # not the heads' master dtype: auto is the backbone's (serving) dtype
    built_here = cfg.model.name_or_path == "tiny"
    save_backbone = cfg.export.backbone == "always" or (
        cfg.export.backbone == "auto" and (built_here or cfg.train.mode == "joint"))
    backbone_dir = final / BACKBONE_SUBDIR
    base_name = str(backbone_dir.resolve()) if save_backbone else cfg.model.name_or_path
    if not save_backbone and (built_here or cfg.train.mode == "joint"):
        print(f"warning: export.backbone=never: the backbone this run {'built' if built_here else 'trained'} is not "
              f"exported, so the heads name {cfg.model.name_or_path} as their base model, not the weights they were "
              "trained with; export it from a checkpoint (medusa-liger export --checkpoint RUN/checkpoints/step-N)",
              file=sys.stderr, flush=True)
    final.mkdir(parents=True, exist_ok=True)
    for leftover in final.glob(".export-*"):  # of an export that was killed: never read, maybe large
        shutil.rmtree(leftover, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(dir=final, prefix=".export-"))
    try:
        with warnings.catch_warnings():
            if "vllm" in cfg.export.formats:  # the servable copy is written beside the medusa one
                warnings.simplefilter("ignore", ServingFormatWarning)
            for fmt in cfg.export.formats:
                model.save_heads(scratch / final_heads_dir(fmt), format=fmt, dtype=dtype, save_backbone=False,
                                 base_model_name_or_path=base_name, serving_dtype=dtype)
        if save_backbone:
            write_backbone(model.backbone, scratch / BACKBONE_SUBDIR, dtype)
            tokenizer.save_pretrained(str(scratch / BACKBONE_SUBDIR))
        written = {final_heads_dir(fmt) for fmt in cfg.export.formats} | ({BACKBONE_SUBDIR} if save_backbone else set())
        names = (*(final_heads_dir(fmt) for fmt in FORMATS), BACKBONE_SUBDIR)
        # Every earlier entry goes aside before any new one goes in, and an interrupted swap is undone:
        # final/ holds one export or the other, never new heads beside an old backbone.
        moved_aside, placed = [], []
        try:
            for name in names:
                target = final / name
                if target.exists() or target.is_symlink():
                    if name not in written:
                        print(f"warning: deleting {target}, an earlier run's export that this run does not write "
                              f"(it would be taken for this run's)", file=sys.stderr, flush=True)
                    target.rename(scratch / f"old-{name}")  # (a link: the link goes, not what it points to)
                    moved_aside.append(name)
            for name in names:
                if name in written:
                    (scratch / name).rename(final / name)
                    placed.append(name)
        except BaseException:
            for name in placed:
                (final / name).rename(scratch / name)
            for name in moved_aside:
                (scratch / f"old-{name}").rename(final / name)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    paths = {final_heads_dir(fmt): final / final_heads_dir(fmt) for fmt in cfg.export.formats}
    if save_backbone:
        paths["backbone"] = backbone_dir
    return paths


def _mean_of_last(records: list[dict], key: str, count: int) -> float | None:
    values = [r[key] for r in records[-count:] if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def write_eval_prompts(data: PackedData, path: Path) -> Path | None:
    """The prompts of the held-out documents, as token ids, one JSON record per line.

    Each segment of a held-out row is a document the heads never trained on. Its prompt is every
    token before its first target (the context a served model would get before it answers). Segments
    that start with a target have no prompt and are left out, as are later pieces of a split
    document (``data.continued``): they start mid-document, mid-turn, which no served prompt does.
    Without any prompt (text data, ``loss_on=all``) no file is written (an older one is removed), so
    ``medusa-liger eval`` falls back to its shipped prompts; returns the path written, or None.
    """
    lines = []
    continued = data.continued if data.continued is not None else torch.zeros_like(data.segment_ids, dtype=torch.bool)
    for ids, labels, segments, later in zip(data.input_ids, data.labels, data.segment_ids, continued):
        for segment in segments.unique().tolist():
            if segment == 0:  # padding
                continue
            where = (segments == segment).nonzero().squeeze(1)
            if later[where[0]]:
                continue
            targets = (labels[where] != IGNORE_INDEX).nonzero()
            start = int(targets[0]) if len(targets) else len(where)
            if start >= 2:
                lines.append(json.dumps({"input_ids": ids[where[:start]].tolist()}))
    if not lines:
        path.unlink(missing_ok=True)
        return None
    path.write_text("".join(line + "\n" for line in lines))
    return path


def finish_run(cfg: Config, model, tokenizer, logger, eval_data, *, eval_metrics: dict, baseline: float,
               final: Path, started: float) -> tuple[dict[str, Any], dict[str, Path]]:
    """Rank 0's end of the run: the summary, the exports, the plot; returns (summary, paths)."""
    out = Path(cfg.output_dir)
    records = read_metrics(logger.path)
    last = max(1, min(20, len(records) // 10))
    summary: dict[str, Any] = {"steps": cfg.train.steps, "most_common_token_frequency": baseline}
    summary["first_loss"] = records[0]["loss"] if records else None
    for key in ["loss", "lm_loss", "acc/lm"] + [f"acc/head{k}" for k in range(cfg.heads.num_heads)]:
        summary[f"final_{key}"] = _mean_of_last(records, key, last)
    paths = {}
    if eval_data is not None:
        summary.update(eval_metrics)
        summary["eval/most_common_token_frequency"] = most_common_target_frequency(eval_data, 2)[1]
        prompts = write_eval_prompts(eval_data, out / EVAL_PROMPTS_FILE)
        if prompts is not None:
            paths["eval_prompts"] = prompts

    paths.update(export_final(model, tokenizer, cfg, final))
    if records:
        from medusa_liger.train.plot import plot_metrics
        paths["plot"] = plot_metrics(records, out / PLOT_FILE, baseline=baseline, title=cfg.name)
    else:  # a resume with nothing left to train and no steps of its own logged (another run's last checkpoint)
        (out / PLOT_FILE).unlink(missing_ok=True)  # (an older run's plot is not this run's)
    paths["metrics"] = logger.path
    paths["config"] = out / CONFIG_FILE
    summary["seconds"] = time.perf_counter() - started
    logger.summary(summary)
    return summary, paths


def format_summary(summary: dict[str, Any], paths: dict[str, Path], num_heads: int) -> str:
    """The human-readable end-of-run report."""
    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = ["", "=== medusa-liger training summary ==="]
    lines.append(f"steps: {summary['steps']}   time: {summary['seconds']:.1f}s")
    lines.append(f"loss: first step {fmt(summary['first_loss'])} -> last steps {fmt(summary['final_loss'])}")
    if summary.get("final_lm_loss") is not None:
        lines.append(f"backbone: lm loss {fmt(summary['final_lm_loss'])}, top-1 acc {fmt(summary['final_acc/lm'])}")
    accs = ", ".join(f"head{k} (t+{k + 2}) {fmt(summary[f'final_acc/head{k}'])}" for k in range(num_heads))
    lines.append(f"train top-1 accuracy (mean of last steps): {accs}")
    if "eval/acc/head0" in summary:
        accs = ", ".join(f"head{k} {fmt(summary[f'eval/acc/head{k}'])}" for k in range(num_heads))
        lines.append(f"held-out top-1 accuracy: {accs} "
                     f"(head0 always predicting the most common token there: "
                     f"{fmt(summary['eval/most_common_token_frequency'])})")
    lines.append(f"baseline on the training rows, head0 always predicting the most common token: "
                 f"{fmt(summary['most_common_token_frequency'])}")
    lines.extend(f"{name}: {path}" for name, path in paths.items())
    return "\n".join(lines)
