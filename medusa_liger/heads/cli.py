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
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from medusa_liger.heads.export import (
    BACKBONE_SUBDIR,
    DTYPES,
    FORMATS,
    SHARED_MEDUSA_NOTE,
    BackboneLoadError,
    HeadsCheckpoint,
    HeadsVersionError,
    NotHeadsConfigError,
    check_backbone_matches,
    check_fasterdecoding_heads,
    check_format,
    commit_of,
    detect_format,
    lm_head_bias_of,
    load_backbone,
    names_a_hub_model,
    parse_dtype,
    read_heads,
    readable_by_others,
    recorded_revision,
    write_backbone,
    write_heads,
)
from medusa_liger.run_layout import CHECKPOINT_HEADS_DIR, FINAL_DIR, FINAL_HEADS_PREFIX, final_heads_dir, user_path

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
    if checkpoint_dir.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint_dir} is a file; pass the directory holding the heads "
                                f"({checkpoint_dir.parent})")
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    unreadable = []  # config.json files that could not be read (broken JSON): said if no heads turn up
    for sub in HEADS_SUBDIRS:
        candidate = checkpoint_dir / sub if sub else checkpoint_dir
        if (candidate / "config.json").is_file():
            try:
                detect_format(candidate)
                return candidate
            except HeadsVersionError:  # heads, of a version this one cannot read: said, not skipped
                raise
            except NotHeadsConfigError:  # a backbone's config.json: the next candidate
                continue
            except ValueError as error:
                unreadable.append(str(error))
    raise FileNotFoundError(
        f"{checkpoint_dir} holds no Medusa heads: expected config.json in the medusa or vllm format there or in "
        f"one of {[s for s in HEADS_SUBDIRS if s]}, found {sorted(p.name for p in checkpoint_dir.iterdir())}"
        + "".join(f"; {problem}" for problem in unreadable)
    )


def load_for_export(checkpoint_dir: str | Path, backbone: str | Path | None = None,
                    saved_backbone: Path | None = None, pt_file: bool = False) -> tuple[HeadsCheckpoint, Path | None]:
    """Heads to export, and the directory of a saved backbone to export with them (joint training).

    With ``backbone`` (a path or hub name), the heads are checked against it, its lm_head is
    attached (vLLM needs it in shared mode), and it is recorded as their base model
    (``recorded_base_model`` says when not); it is not re-exported. Without it, ``saved_backbone``
    (a joint run's checkpoint's backbone, rebuilt and saved by ``train/export_cli.py``), else a
    ``backbone/`` directory inside the heads directory or beside it (the training loop's final
    layout), is used for both and is exported too. ``pt_file``: the heads are checked for FasterDecoding's
    loader (``check_fasterdecoding_heads``) before any backbone loads.
    """
    heads_dir = find_heads_dir(checkpoint_dir)
    ckpt = read_heads(heads_dir)
    if pt_file:
        check_fasterdecoding_heads(ckpt, "medusa")
    saved = saved_backbone or paired_backbone(heads_dir, ckpt)
    source = backbone if backbone is not None else saved
    if source is not None:
        try:  # (the recorded hub name: at the commit the heads record)
            model = load_backbone(source, **recorded_revision(ckpt.base_model_name_or_path, ckpt.base_model_revision,
                                                              source))
        except BackboneLoadError as error:
            raise BackboneLoadError(f"--backbone: {error}" if backbone is not None else str(error)) from error
        check_backbone_matches(ckpt, model, heads_dir)
        if backbone is not None:  # what TGI and FasterDecoding load with the heads
            recorded = ckpt.base_model_name_or_path
            ckpt.base_model_name_or_path = recorded_base_model(recorded, backbone, ckpt.config.mode)
            if ckpt.base_model_name_or_path != recorded:  # another base: its commit, where it has one
                ckpt.base_model_revision = commit_of(model.config, ckpt.base_model_name_or_path)
        lm_head = model.get_output_embeddings()
        ckpt.lm_head_weight = lm_head.weight.detach()
        ckpt.lm_head_bias = lm_head_bias_of(lm_head)
        if ckpt.vocab_size is None:  # shared heads whose config does not say it: the lm_head does
            ckpt.vocab_size = ckpt.lm_head_weight.shape[0]
    return ckpt, (saved if backbone is None else None)


def paired_backbone(heads_dir: Path, ckpt: HeadsCheckpoint) -> Path | None:
    """The saved backbone that goes with the heads in ``heads_dir``: a ``backbone/`` inside it (what
    ``save_heads(save_backbone=True)`` writes), or one beside it when it is theirs: in a training run's
    ``final/``, for heads trained jointly with it, or recorded as their base model. A heads-only export
    beside an unrelated ``backbone/`` folder (say ``/models/backbone``) is exported alone."""
    inside = heads_dir / BACKBONE_SUBDIR
    if inside.is_dir():
        return inside
    resolved = heads_dir.resolve()  # `export --checkpoint heads_medusa` from inside final/, or a link to it
    beside = resolved.parent / BACKBONE_SUBDIR
    if not beside.is_dir():
        return None
    in_final = resolved.parent.name == FINAL_DIR and resolved.name.startswith(FINAL_HEADS_PREFIX)
    recorded = ckpt.base_model_name_or_path
    named = bool(recorded) and user_path(recorded).resolve() == beside.resolve()
    return beside if in_final or ckpt.config.mode == "joint" or named else None


# What an export directory holds (what --overwrite may replace): heads files, a backbone, per-format dirs.
EXPORT_ENTRIES = {"config.json", "medusa_lm_head.safetensors", "medusa_lm_head.pt", "model.safetensors",
                  BACKBONE_SUBDIR, *FORMATS}


def check_output_dir(output_dir: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse an output that is a file, is or holds a source being read, or (without ``overwrite``)
    is a non-empty directory; ``overwrite`` replaces only what an export writes."""
    output = output_dir.resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output {output_dir} is a file, not a directory")
    if output == Path.cwd().resolve() or output in Path.cwd().resolve().parents:  # it is moved into place
        raise ValueError(f"--output {output_dir} is the current directory or holds it: name a new directory")
    for source in sources:
        if output == source.resolve() or output in source.resolve().parents:
            raise ValueError(f"--output {output_dir} is or holds {source}, which this export reads: choose another directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        found = sorted(p.name for p in output_dir.iterdir())
        if not overwrite:
            raise ValueError(f"--output {output_dir} is not empty ({found[:6]}): pass --overwrite to replace the export "
                             f"there, or choose a new directory")
        if not set(found) <= EXPORT_ENTRIES:
            raise ValueError(f"--output {output_dir} holds files no export writes ({sorted(set(found) - EXPORT_ENTRIES)[:6]}); "
                             f"--overwrite replaces only an earlier export: choose a new directory")


def scratch_prefix(output_dir: Path, role: str) -> str:
    """The name prefix of an export's scratch directory beside ``output_dir`` (``role``: export, old,
    backbone), with this host and process, so a later export can tell a killed one's leftovers from a
    live one's."""
    return f".{output_dir.name}-{role}-{socket.gethostname()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (PermissionError: another user's live process)
        return True
    return True


def remove_killed_exports(output_dir: Path) -> None:
    """Delete the scratch directories beside ``output_dir`` left by exports to it that were killed (their
    process, on this host, is gone): never read, and each may hold a whole backbone. Another host's are
    left alone (its processes cannot be asked about)."""
    # The whole name, host and pid read from its end: mkdtemp's random suffix holds no "-", a host may
    # (another host "gpu-7" is not this host "gpu" with pid 7), and so may an output's name ("o-export-...").
    pattern = re.compile(rf"^\.{re.escape(output_dir.name)}-(?:export|old|backbone)-(.+)-(\d{{1,9}})-[a-z0-9_]+$")
    if not output_dir.parent.is_dir():
        return
    for path in output_dir.parent.iterdir():
        match = pattern.match(path.name)
        if match is None or match.group(1) != socket.gethostname():
            continue
        pid = int(match.group(2))
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _copy_backbone(backbone_dir: Path, target: Path, dtype: torch.dtype | None) -> None:
    """The saved backbone with its tokenizer files; cast (rewritten) when ``dtype`` is given."""
    if dtype is None:
        shutil.copytree(backbone_dir, target)
        return
    write_backbone(load_backbone(backbone_dir), target, dtype)
    written = {p.name for p in target.iterdir()}
    for path in backbone_dir.iterdir():  # the tokenizer and chat template: everything but the weights
        if path.is_file() and path.name not in written and not path.name.endswith((".safetensors", ".bin", ".index.json")):
            shutil.copy2(path, target / path.name)


def check_pt_formats(formats: list[str]) -> None:
    """ValueError unless ``formats`` include the one ``--pt-file`` writes a file of (medusa)."""
    if "medusa" not in formats:
        raise ValueError(f"--pt-file writes the medusa format's medusa_lm_head.pt: it needs --format medusa or both, "
                         f"got {formats}")


def check_pt_file(checkpoint_dir: str | Path, formats: list[str]) -> None:
    """ValueError unless the heads of ``checkpoint_dir`` can be written as FasterDecoding's
    ``medusa_lm_head.pt`` in ``formats`` (for a caller with work to do before ``export_checkpoint``,
    which checks this itself as it reads the heads)."""
    check_pt_formats(formats)
    check_fasterdecoding_heads(read_heads(find_heads_dir(user_path(checkpoint_dir))), "medusa")


def recorded_base_model(recorded: str | None, backbone: str | Path, mode: str = "heads") -> str:
    """The base model heads exported with ``--backbone`` record: ``backbone`` (a local directory as its
    absolute path), except where they name a hub model and ``backbone`` is a local directory: a local
    copy of that model, checked against, while the hub name stays portable. Heads of joint training
    (``mode``) record ``backbone`` always: they belong to the backbone that trained with them."""
    local = user_path(backbone)
    if recorded and names_a_hub_model(recorded) and local.is_dir() and mode != "joint":
        return recorded
    return str(local.resolve()) if local.is_dir() else str(backbone)


def export_checkpoint(checkpoint_dir: str | Path, output_dir: str | Path, formats: list[str],
                      dtype: torch.dtype | str | None = None, backbone: str | Path | None = None,
                      saved_backbone: Path | None = None, overwrite: bool = False, pt_file: bool = False) -> list[Path]:
    """Write the heads of ``checkpoint_dir`` in each of ``formats`` (one subdirectory per format when
    there are several) and copy a jointly trained backbone beside each (``load_for_export`` says
    which; the heads' ``base_model_name_or_path`` then names that copy; a ``backbone`` given is
    recorded there instead). ``pt_file``: the medusa format also as ``medusa_lm_head.pt`` (see
    ``write_heads``). Returns the written dirs.

    All or nothing: everything is written to a scratch directory beside ``output_dir``, which then
    takes its place (an earlier export there, with ``overwrite``, is removed only after that).
    """
    for format in formats:
        check_format(format)
    if pt_file:
        check_pt_formats(formats)
    dtype = parse_dtype(dtype)
    checkpoint_dir, output_dir = user_path(checkpoint_dir), user_path(output_dir)
    # Never write over what is read: the directory given, the heads found in it, a saved backbone.
    sources = [checkpoint_dir, find_heads_dir(checkpoint_dir), *([saved_backbone] if saved_backbone else [])]
    check_output_dir(output_dir, sources, overwrite)
    ckpt, backbone_dir = load_for_export(checkpoint_dir, backbone, saved_backbone, pt_file)
    if backbone_dir is not None:
        sources.append(backbone_dir)
        check_output_dir(output_dir, sources, overwrite)
    # Heads default to the serving dtype recorded when they were saved (a training checkpoint holds
    # fp32 master heads); files without it (other tools) keep their own dtype.
    heads_dtype = dtype if dtype is not None else ckpt.serving_dtype
    if dtype is not None and backbone_dir is not None:
        # The backbone copied beside them is cast too: the heads record its dtype, or an export of this
        # export without --dtype would cast them back to the old one.
        ckpt.serving_dtype = dtype
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if "medusa" in formats and "vllm" not in formats and ckpt.config.shared_lm_head:
        print(f"warning: {SHARED_MEDUSA_NOTE}", file=sys.stderr, flush=True)
    scratch = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=scratch_prefix(output_dir, "export")))
    try:
        readable_by_others(scratch)  # (mkdtemp's 0700: it becomes the export)
        written = []
        for format in formats:
            sub = Path(format) if len(formats) > 1 else Path()
            if backbone_dir is not None:
                _copy_backbone(backbone_dir, scratch / sub / BACKBONE_SUBDIR, dtype)
                ckpt.base_model_name_or_path = str((output_dir / sub / BACKBONE_SUBDIR).resolve())
                ckpt.base_model_revision = None  # (a local copy: the hub commit is no longer what they name)
            write_heads(ckpt, scratch / sub, format, heads_dtype, pt_file=pt_file and format == "medusa")
            written.append(output_dir / sub)
        check_output_dir(output_dir, sources, overwrite)  # again: another process may have written there meanwhile
        old = None
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=scratch_prefix(output_dir, "old")))
            old.rmdir()  # (a fresh name for the rename below)
            output_dir.rename(old)
        scratch.rename(output_dir)
        if old is not None:
            shutil.rmtree(old)
        remove_killed_exports(output_dir)  # (only now: a kill between the renames above left the old export there)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="heads directory (medusa or vllm format) or training checkpoint")
    parser.add_argument("--output", required=True, help="directory to write")
    parser.add_argument("--format", default="both", choices=EXPORT_FORMATS, help="layout to write (default: both)")
    parser.add_argument("--dtype", default=None, choices=EXPORT_DTYPES,
                        help="cast the weights (default: heads in the backbone's dtype recorded at save time, "
                             "else as saved; a saved backbone as saved)")
    parser.add_argument("--backbone", default=None,
                        help="base model path or name: the heads are checked against it and record it as their "
                             "base_model_name_or_path (what TGI and FasterDecoding load), unless it is a local copy "
                             "of the hub model they name")
    parser.add_argument("--pt-file", action="store_true",
                        help="also write the medusa format as medusa_lm_head.pt, the only file FasterDecoding's own "
                             "loader reads (needs one layer per head, or equal layers)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")


def formats_of(args: argparse.Namespace) -> list[str]:
    """The formats ``--format`` names."""
    return list(FORMATS) if args.format == "both" else [args.format]


def run(args: argparse.Namespace, saved_backbone: Path | None = None) -> int:
    """Export (with ``saved_backbone``, see ``load_for_export``); 0 on success, 2 with a one-line
    error on bad input (as every medusa-liger command)."""
    formats = formats_of(args)
    try:
        written = export_checkpoint(args.checkpoint, args.output, formats, dtype=args.dtype, backbone=args.backbone,
                                    saved_backbone=saved_backbone, overwrite=args.overwrite, pt_file=args.pt_file)
    except (ValueError, OSError, SafetensorError) as error:  # bad paths, files or arguments: said in one line
        print(f"medusa-liger export: error: {error}", file=sys.stderr)
        return 2
    for path, format in zip(written, formats, strict=True):
        with_backbone = " and the backbone" if (path / BACKBONE_SUBDIR).is_dir() else ""
        print(f"wrote {path}: heads in the {format} format{with_backbone}")
    return 0
