"""``medusa-liger export``: write trained heads in the formats serving engines read.

    medusa-liger export --checkpoint DIR --output DIR --format medusa|vllm|both \
        [--dtype bf16|fp16|fp32] [--backbone PATH]

Without ``--dtype`` the heads are written in the serving dtype recorded when they were saved (the
backbone's; a training checkpoint's heads are fp32 master weights), or as saved where none is recorded.

``--checkpoint`` is a heads directory in either format (what ``MedusaModel.save_heads`` writes), or
a directory holding one in ``heads/`` (a training checkpoint), ``heads_medusa/``/``heads_vllm/`` (the
training loop's final output) or ``final/heads_medusa/`` (a run's directory). A ``backbone/`` directory in or beside it (joint training) is exported with the heads. ``--backbone`` names the base model to check the heads against; it is
needed for the vllm format in shared mode, which stores the backbone's lm_head. With ``both``, the
formats go to ``OUTPUT/medusa`` and ``OUTPUT/vllm``. The command runs through ``train/export_cli.py``,
which also exports the trained backbone of a joint run's training checkpoint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from medusa_liger.heads.export import (
    BACKBONE_SUBDIR,
    DTYPES,
    FORMATS,
    HeadsCheckpoint,
    check_backbone_matches,
    check_format,
    detect_format,
    load_backbone,
    parse_dtype,
    read_heads,
    write_backbone,
    write_heads,
)
from medusa_liger.run_layout import CHECKPOINT_HEADS_DIR, FINAL_DIR, final_heads_dir

EXPORT_FORMATS = ("medusa", "vllm", "both")
EXPORT_DTYPES = tuple(DTYPES)  # bf16 / bfloat16, fp16 / float16, fp32 / float32 alike


# Where a heads directory may sit inside a run's directory: the directory itself, a checkpoint's
# ``heads/``, or the ``heads_<format>/`` directories the training loop writes in its final output
# (given that output, or the run's directory).
HEADS_SUBDIRS = ("", CHECKPOINT_HEADS_DIR, *(final_heads_dir(format) for format in FORMATS),
                 *(f"{FINAL_DIR}/{final_heads_dir(format)}" for format in FORMATS))


def find_heads_dir(checkpoint_dir: str | Path) -> Path:
    """The heads directory (config.json in either format) in or at ``checkpoint_dir``."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    for sub in HEADS_SUBDIRS:
        candidate = checkpoint_dir / sub if sub else checkpoint_dir
        if (candidate / "config.json").is_file():
            try:
                detect_format(candidate)
                return candidate
            except ValueError:
                continue
    raise FileNotFoundError(
        f"{checkpoint_dir} holds no Medusa heads: expected config.json in the medusa or vllm format there or in "
        f"one of {[s for s in HEADS_SUBDIRS if s]}, found {sorted(p.name for p in checkpoint_dir.iterdir())}"
    )


def load_for_export(checkpoint_dir: str | Path, backbone: str | Path | None = None,
                    saved_backbone: Path | None = None) -> tuple[HeadsCheckpoint, Path | None]:
    """Heads to export, and the directory of a saved backbone to export with them (joint training).

    With ``backbone`` (a path or hub name), the heads are checked against it and its lm_head is
    attached (vLLM needs it in shared mode); it is not re-exported. Without it, ``saved_backbone``
    (a joint run's checkpoint's backbone, rebuilt and saved by ``train/export_cli.py``), else a
    ``backbone/`` directory inside the heads directory or beside it (the training loop's final
    layout), is used for both and is exported too.
    """
    heads_dir = find_heads_dir(checkpoint_dir)
    ckpt = read_heads(heads_dir)
    beside = heads_dir.parent if heads_dir != Path(checkpoint_dir) else heads_dir  # the run's final/, a checkpoint
    saved = saved_backbone or next((d for d in (heads_dir / BACKBONE_SUBDIR, beside / BACKBONE_SUBDIR) if d.is_dir()), None)
    source = backbone if backbone is not None else saved
    if source is not None:
        model = load_backbone(source)
        check_backbone_matches(ckpt, model, heads_dir)
        ckpt.lm_head_weight = model.get_output_embeddings().weight.detach()
    return ckpt, (saved if backbone is None else None)


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path, formats: list[str],
                      dtype: torch.dtype | str | None = None, backbone: str | Path | None = None,
                      saved_backbone: Path | None = None) -> list[Path]:
    """Write the heads of ``checkpoint_dir`` in each of ``formats`` (one subdirectory per format when
    there are several) and copy a jointly trained backbone beside each (``load_for_export`` says
    which). Returns the written dirs."""
    for format in formats:
        check_format(format)
    dtype = parse_dtype(dtype)
    ckpt, backbone_dir = load_for_export(checkpoint_dir, backbone, saved_backbone)
    # Heads default to the serving dtype recorded when they were saved (a training checkpoint holds
    # fp32 master heads); files without it (other tools) keep their own dtype.
    heads_dtype = dtype if dtype is not None else ckpt.serving_dtype
    output_dir = Path(output_dir)
    written = []
    for format in formats:
        target = output_dir / format if len(formats) > 1 else output_dir
        write_heads(ckpt, target, format, heads_dtype)
        if backbone_dir is not None:
            if dtype is None:
                shutil.copytree(backbone_dir, target / BACKBONE_SUBDIR, dirs_exist_ok=True)
            else:
                write_backbone(load_backbone(backbone_dir), target / BACKBONE_SUBDIR, dtype)
        written.append(target)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="heads directory (medusa or vllm format) or training checkpoint")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--format", default="both", choices=EXPORT_FORMATS, help="layout to write (default: both)")
    parser.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                        help="cast the weights (default: heads in the backbone's dtype recorded at save time, "
                             "else as saved; a saved backbone as saved)")
    parser.add_argument("--backbone", default=None, help="base model path or name to check the heads against")


def run(args: argparse.Namespace, saved_backbone: Path | None = None) -> int:
    """Export (with ``saved_backbone``, see ``load_for_export``); 0 on success, 1 with a one-line
    error on bad input."""
    formats = ["medusa", "vllm"] if args.format == "both" else [args.format]
    try:
        written = export_checkpoint(args.checkpoint, args.output, formats, dtype=args.dtype, backbone=args.backbone,
                                    saved_backbone=saved_backbone)
    except (ValueError, FileNotFoundError) as error:
        print(f"medusa-liger export: error: {error}", file=sys.stderr)
        return 1
    for path, format in zip(written, formats, strict=True):
        with_backbone = " and the backbone" if (path / BACKBONE_SUBDIR).is_dir() else ""
        print(f"wrote {path}: heads in the {format} format{with_backbone}")
    return 0
