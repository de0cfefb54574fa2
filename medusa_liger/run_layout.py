"""Names inside a training run's directory, shared by the trainer that writes them and by the
evaluator and exporter that read them (so neither side imports the other):

    RUN_DIR/config.yaml                   the resolved config
    RUN_DIR/metrics.jsonl                 one record per logged step
    RUN_DIR/.lock                         held by the training run writing the directory
    RUN_DIR/plot.png                      loss and accuracy curves
    RUN_DIR/eval_prompts.jsonl            prompts of the held-out documents (``medusa-liger eval`` reads them)
    RUN_DIR/eval/                         ``medusa-liger eval RUN_DIR``'s report (its default output)
    RUN_DIR/checkpoints/step-N/           resumable checkpoints, the heads in step-N/heads/
    RUN_DIR/final/heads_<format>/         exported heads, one directory per format
    RUN_DIR/final/backbone/               the backbone, when exported (``heads.export.BACKBONE_SUBDIR``,
                                          the name it has beside any saved heads)
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RUN_LOCK_FILE = ".lock"  # held by the training run writing the directory (train.checkpoint.run_dir_lock)
PLOT_FILE = "plot.png"
EVAL_PROMPTS_FILE = "eval_prompts.jsonl"
EVAL_DIR = "eval"
# What an evaluation writes in its output directory, by role.
EVAL_FILES = {"report": "report.json", "tree": "tree.json", "heatmap": "head_accuracy.png"}
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_HEADS_DIR = "heads"  # in each checkpoint, in the medusa format (``medusa-liger export`` reads it)
FINAL_DIR = "final"
FINAL_HEADS_PREFIX = "heads_"  # + format: final/heads_medusa, final/heads_vllm


def final_heads_dir(format: str) -> str:
    """Name of the final export's heads directory for ``format`` ("medusa" or "vllm")."""
    return FINAL_HEADS_PREFIX + format


def user_path(path: str | os.PathLike) -> Path:
    """``path`` as the user typed it, ``~`` and ``~user`` expanded. An unknown ``~user`` is left as
    is, so it fails later as a missing file; ``Path.expanduser`` raises RuntimeError instead."""
    return Path(os.path.expanduser(path))


def local_or_hub(path: str | os.PathLike) -> str:
    """What to pass ``from_pretrained``: a local directory with ``~`` expanded, else the hub name."""
    directory = user_path(path)
    return str(directory) if directory.is_dir() else str(path)


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file renamed over ``path``: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
