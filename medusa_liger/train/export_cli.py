"""``medusa-liger export``: the heads export (``heads/cli.py``) plus a joint run's trained backbone.

A training checkpoint (``RUN_DIR/checkpoints/step-N/``) of a joint run (Medusa-2) holds the heads in
``heads/`` and the backbone's trained tensors (all of them, or the LoRA adapters) in
``trainable.safetensors``, not a servable backbone: those heads were trained on that backbone and
are wrong on the base model. Here such a backbone is rebuilt the way the run built it (from the
run's ``config.yaml``: the base model, LoRA wrapping, patching), the checkpoint's tensors are loaded
into it, and it is exported beside the heads (LoRA merged), as the run's own final export does. The
heads module cannot do this itself: it knows heads and files, not training runs (heads <- train).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from medusa_liger.heads import cli as heads_cli
from medusa_liger.run_layout import CHECKPOINT_HEADS_DIR, CONFIG_FILE, user_path

TRAINABLE_FILE = "trainable.safetensors"  # written by train/checkpoint.py's save_checkpoint
BACKBONE_PREFIX = "backbone."  # MedusaModel.backbone: the prefix of the backbone's tensors in that file


def training_checkpoint_of(path: str | Path) -> Path | None:
    """The training checkpoint (``step-N/``) that ``path`` is, or whose ``heads/`` it is; else None."""
    path = Path(path)
    for candidate in (path, path.parent if path.name == CHECKPOINT_HEADS_DIR else None):
        if candidate is not None and (candidate / TRAINABLE_FILE).is_file():
            return candidate
    return None


def trained_backbone_tensors(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's tensors a training checkpoint holds (names relative to the backbone); empty
    when its run trained only the heads."""
    path = Path(checkpoint_dir) / TRAINABLE_FILE
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:  # e.g. a truncated copy: name the file
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    return {name.removeprefix(BACKBONE_PREFIX): t for name, t in tensors.items() if name.startswith(BACKBONE_PREFIX)}


def rebuild_backbone(checkpoint_dir: str | Path, tensors: dict[str, torch.Tensor]):
    """(backbone, tokenizer, cfg): the run's backbone as its config builds it, ``tensors`` loaded.

    Raises ValueError when the run's config.yaml is missing (the checkpoint was moved out of its run)
    or when ``tensors`` do not fit the backbone that config builds.
    """
    from medusa_liger.train.build import build_tokenizer_and_backbone
    from medusa_liger.train.checkpoint import copy_into
    from medusa_liger.train.config import load_config
    from medusa_liger.train.data import data_errors, load_examples

    checkpoint_dir = Path(checkpoint_dir)
    run_dir = checkpoint_dir.parent.parent  # RUN_DIR/checkpoints/step-N
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{checkpoint_dir} holds a trained backbone ({TRAINABLE_FILE}) but its run's {CONFIG_FILE} "
                         f"is not at {config_path}: export it from inside its run directory, or pass --backbone")
    # The run's directory wherever it is now (the tiny model's tokenizer is cached there).
    cfg = load_config(config_path, [f"output_dir={run_dir}"])
    # At the hub commit the checkpoint's heads record for the run's base model, not what the name or a
    # branch holds now: LoRA adapters and the frozen parts were trained on its weights, and every run's
    # config.json, buffers (e.g. rotary frequencies) and tokenizer, which no checkpoint holds, are its.
    commit = None
    heads_dir = checkpoint_dir / CHECKPOINT_HEADS_DIR
    if heads_dir.is_dir():
        from medusa_liger.heads.export import recorded_base

        name, revision = recorded_base(heads_dir)
        if name == cfg.model.name_or_path:
            commit = revision
    with data_errors():
        tokenizer, backbone = build_tokenizer_and_backbone(cfg, lambda: load_examples(cfg.data), commit=commit)
    copy_into(dict(backbone.named_parameters()), tensors,
              f"{checkpoint_dir}/{TRAINABLE_FILE} does not fit the backbone {config_path} builds",
              allow_missing=cfg.lora.enabled)  # LoRA trains only the adapters
    return backbone, tokenizer, cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    heads_cli.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Export; a joint run's training checkpoint brings its trained backbone. 0, or 2 on bad input."""
    from medusa_liger.heads.export import readable_by_others, write_backbone
    from medusa_liger.train.build import export_dtype
    from medusa_liger.train.data import DataError

    step_dir = training_checkpoint_of(user_path(args.checkpoint))
    try:
        if args.pt_file:  # before the backbone rebuild's wait
            heads_cli.check_pt_file(args.checkpoint, heads_cli.formats_of(args))
        tensors = trained_backbone_tensors(step_dir) if step_dir is not None else {}
    except (ValueError, OSError) as error:
        print(f"medusa-liger export: error: {error}", file=sys.stderr)
        return 2
    if not tensors:
        return heads_cli.run(args)
    if args.backbone is not None:
        print(f"warning: {args.checkpoint} trained the backbone too; --backbone {args.backbone} is used instead "
              f"of it, and its heads may not fit that model", file=sys.stderr)
        return heads_cli.run(args)
    try:
        heads_cli.check_output_dir(user_path(args.output), [step_dir, step_dir / CHECKPOINT_HEADS_DIR],
                                   args.overwrite)  # before the rebuild's wait
        backbone, tokenizer, cfg = rebuild_backbone(step_dir, tensors)
    except (ValueError, OSError, DataError) as error:
        print(f"medusa-liger export: error: {error}", file=sys.stderr)
        return 2
    # The rebuilt backbone goes through a saved copy, as a run's final/backbone does: the heads
    # export checks the heads against it and copies it (cast to --dtype if given) beside them.
    output = user_path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=heads_cli.scratch_prefix(output, "backbone")) as scratch:
        readable_by_others(Path(scratch))  # (0700, and copied with its mode beside the heads)
        write_backbone(backbone, scratch, export_dtype(cfg))
        tokenizer.save_pretrained(scratch)
        del backbone
        return heads_cli.run(args, saved_backbone=Path(scratch))
