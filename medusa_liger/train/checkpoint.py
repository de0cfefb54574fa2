"""Training checkpoints: written atomically, the last M kept, enough state to resume bit-exactly.

Layout of ``{output_dir}/checkpoints/step-000123/``:

* ``trainable.safetensors``: the parameters the optimizer updates that the caller passes, by name
  (the loop passes the backbone's or its LoRA adapters' when it trains);
* ``heads/``: the Medusa heads in the ``medusa`` export format (written by the loop's
  ``write_extra``), which ``medusa-liger export`` reads directly;
* ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``s;
* ``rng.pt``: Python, torch CPU and CUDA generator states (of rank 0 in a data-parallel run; rank
  r > 0 has its own in ``rng-rank<r>.pt``; in a run resumed with more ranks than the checkpoint had,
  the extra ranks keep the streams the loop seeded them with: rank 0's would repeat its dropout masks);
* ``trainer_state.json``: step, data-loader position and anything else the loop needs; written
  last, so a directory without it is incomplete.

Atomic: everything is written to ``checkpoints/.tmp-step-000123-<pid>/`` and then renamed into
place with ``os.replace`` (one filesystem operation), so a run killed mid-save never leaves a
checkpoint that looks complete but is not; leftover ``.tmp-*`` directories of killed saves are
removed by the next save. Replacing an existing step renames the old one aside first, so some
complete copy of that step exists at every moment. The files and directories are fsynced before
and after the rename, so a host that crashes or loses power keeps complete checkpoints too. A
checkpoint is deleted the same way: renamed to ``.tmp-*`` first, so a kill mid-delete never leaves
a half-deleted directory that looks complete. A save that fails (a full disk) removes what it
wrote and raises ``CheckpointError`` naming the directory and the free space.

Pruning: saving step s first deletes checkpoints with a step above s (the abandoned branch of a run
resumed from an older checkpoint, which ``train.resume=auto`` must never pick; the loop already
deletes them when it resumes from one of its own older checkpoints, so a kill before the first
save cannot bring them back), then keeps the newest ``keep``, so the checkpoint just written always
survives.

Data parallel: only rank 0 calls ``save_checkpoint`` (the replicas are identical; the loop gathers
every rank's RNG states and passes them in), and every rank calls ``load_checkpoint`` with its rank.
Sharded runs (ZeRO-1, FSDP) write the same files: the loop gathers whole tensors on rank 0 first,
and ``load_checkpoint`` hands each rank its shard, so checkpoints move freely between the modes.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medusa_liger.heads.export import readable_by_others
from medusa_liger.numeric import is_int
from medusa_liger.run_layout import EVAL_DIR, EVAL_FILES, EVAL_PROMPTS_FILE, RUN_LOCK_FILE
from medusa_liger.train import distributed, fsdp
from medusa_liger.train.config import ConfigError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from (dropout, LoRA dropout, shuffling)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        if distributed.is_distributed():  # a rank owns one GPU: never touch (and init) the others
            state["cuda_current"] = torch.cuda.get_rng_state()
        else:
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda" in state:  # one process's states of every GPU it saw
        states = state["cuda"]
        if distributed.is_distributed():  # a rank owns one GPU: never touch (and init) the others
            index = torch.cuda.current_device()
            torch.cuda.set_rng_state(states[index] if index < len(states) else states[0])
        else:  # (a host with fewer GPUs than the one that saved them: those it has)
            for index, device_state in enumerate(states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(device_state, index)
    if "cuda_current" in state:
        torch.cuda.set_rng_state(state["cuda_current"])


def rng_file(rank: int) -> str:
    """Name of the file holding ``rank``'s RNG states in a checkpoint (``rng.pt`` for rank 0)."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    root: str | Path,
    step: int,
    named_params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int,
    write_extra: Callable[[Path], Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and prune to the newest ``keep``.

    ``write_extra(directory)`` may add files (the loop writes the heads in the ``medusa`` format
    to ``heads/``, so ``medusa-liger export`` reads any checkpoint) before the rename.
    ``rng_states``: every rank's ``rng_state()`` in rank order (default: this process's only).
    ``optimizer``: the optimizer, or its state dict (already gathered whole when it was sharded).
    """
    if not is_int(keep) or keep < 1:  # ([:-0] would keep them all)
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Only rank 0 saves, one save at a time: any temporary directory left now is from a killed save.
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    tmp.mkdir()
    try:
        # safetensors refuses shared or non-contiguous storage: store detached contiguous copies.
        save_file({name: p.detach().contiguous().cpu() for name, p in named_params.items()},
                  str(tmp / "trainable.safetensors"))
        readable_by_others(tmp / "trainable.safetensors")  # 0600 from safetensors; the .pt files follow the umask
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for r, state in enumerate(rng_states or [rng_state()]):
            torch.save(state, tmp / rng_file(r))
        if write_extra is not None:
            write_extra(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
        fsync_tree(tmp)  # on disk before the rename makes it a checkpoint (a host crash keeps it whole)
    except Exception as error:  # torch's and safetensors' messages name neither the directory nor the cause
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = shutil.disk_usage(root).free / 2**30
            where = f"{free:.1f} GiB free on its disk; the earlier checkpoints are intact"
        except OSError:  # the directory itself is gone (deleted by another process meanwhile): nothing is intact
            where = f"{str(root)!r} no longer exists: deleted by another process?"
        raise CheckpointError(f"saving checkpoint {str(final)!r} failed ({where}): "
                              f"{type(error).__name__}: {error}") from error
    # A previous attempt at the same step (e.g. a rerun): move it aside (named .tmp-*, so a kill
    # before the delete below leaves it to the next save's cleanup), put the new one in place, then
    # delete the old one. Only a kill between the two renames loses that step (the earlier
    # checkpoints stay whole); deleting the old one first would widen that window to the delete.
    old = None
    if final.exists():
        old = root / f".tmp-old-step-{step:06d}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_directory(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    drop_later_checkpoints(root, step)
    delete_checkpoints(list_checkpoints(root)[:-keep])
    return final


class CheckpointError(OSError):
    """A checkpoint could not be written (a full disk, a quota, a read-only directory)."""


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # (Windows cannot open a directory)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file under ``directory`` and the directories themselves to disk."""
    for parent, _, files in os.walk(directory):
        for name in files:
            # (Windows flushes only handles open for writing; a fresh checkpoint's files are writable.)
            with open(os.path.join(parent, name), "rb+" if os.name == "nt" else "rb") as file:
                os.fsync(file.fileno())
        fsync_directory(Path(parent))


def delete_checkpoints(paths: list[Path]) -> None:
    """Delete checkpoint directories: each renamed to ``.tmp-*`` first (one operation each, newest first,
    all before any slow delete), so a kill mid-delete leaves the next save's cleanup leftovers, never a
    half-deleted step that still looks complete, nor (but for a kill within those renames) a later step
    that ``train.resume=auto`` would take."""
    asides = []
    for path in sorted(paths, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True):
        aside = path.with_name(f".tmp-deleted-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(path, aside)
        asides.append(aside)
    for aside in asides:
        shutil.rmtree(aside, ignore_errors=True)


def drop_later_checkpoints(root: str | Path, step: int) -> list[str]:
    """Delete the checkpoints under ``root`` with a step above ``step``: the abandoned branch of a run
    resumed from an older checkpoint, which ``train.resume=auto`` must never pick. Returns their names."""
    later = [path for path in list_checkpoints(root) if int(STEP_DIR.match(path.name).group(1)) > step]
    delete_checkpoints(later)
    return [path.name for path in later]


def remove_killed_saves(root: str | Path, keep: int, resumed: str | Path | None = None) -> None:
    """At a resume: what a save killed after its rename left under ``root`` (its pruning's ``.tmp-*``
    directories, whole checkpoints, and the steps past ``keep`` it had not pruned yet), which only the next
    save removes, and a run resumed from its last checkpoint saves none."""
    resumed = Path(resumed).resolve() if resumed is not None else None
    for stale in Path(root).glob(".tmp-*"):
        if stale.resolve() != resumed:  # (train.resume may name a moved-aside .tmp-old-step-*: never the source)
            shutil.rmtree(stale, ignore_errors=True)
    delete_checkpoints(list_checkpoints(root)[:-keep])


class ResumeError(ValueError):
    """A checkpoint this run cannot continue from (other heads, other trainable parameters)."""


class RunDirBusyError(ConfigError):
    """Another training run holds the run directory (``run_dir_lock``); every rank raises it."""


# The heads settings that shape the trainable tensors, by their config key: a resume must keep them.
_HEADS_SHAPE_KEYS = {"num_heads": "heads.num_heads", "num_layers": "heads.num_layers",
                     "shared_lm_head": "heads.shared_lm_head"}


def check_resume_heads(saved: Any, current: Any, directory: str | Path,
                       saved_sizes: tuple[int, int] | None = None, sizes: tuple[int, int] | None = None) -> None:
    """Raise ResumeError unless the checkpoint's heads (``saved``, a MedusaConfig) have the shape of
    this run's (``current``): the same number of heads, blocks per head and projection sharing, and
    (``saved_sizes``, ``sizes``: (hidden size, vocabulary size)) the same backbone widths they read and write."""
    changed = [f"{key}={getattr(saved, field)} there, {getattr(current, field)} now"
               for field, key in _HEADS_SHAPE_KEYS.items() if getattr(saved, field) != getattr(current, field)]
    if saved_sizes is not None and sizes is not None:
        changed += [f"the backbone's {what} {was} there, {now} now"
                    for what, was, now in zip(("hidden size", "vocabulary size"), saved_sizes, sizes) if was != now]
    if changed:
        raise ResumeError(f"train.resume: checkpoint {str(directory)!r} was trained with other heads "
                          f"({'; '.join(changed)}); keep those settings to resume, or start another run "
                          "(another name=..., or train.resume=none to start this one afresh)")


def copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str, *,
              allow_missing: bool = False, error: type[ValueError] = ValueError) -> None:
    """Copy each of ``tensors`` into the parameter of its name (under FSDP, this rank's shard of it).

    Every name and shape is checked before anything is copied: ``error`` starting with ``what`` when a
    parameter has no tensor (unless ``allow_missing``: a LoRA run's checkpoint holds only the
    adapters), a tensor has no parameter, or shapes differ.
    """
    missing = [] if allow_missing else sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise error(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise error(f"{what}: {name} has shape {list(tensor.shape)}, the model's is {list(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            fsdp.copy_full_(params[name], tensor)


def load_checkpoint(
    directory: str | Path,
    named_params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler and RNG (``rank``'s) from ``directory``; return its trainer state."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise ResumeError(f"train.resume: {str(directory)!r} is not a complete checkpoint (no {STATE_FILE})")
    tensors = read_checkpoint_file(directory / "trainable.safetensors", lambda path: load_file(str(path)))
    copy_into(named_params, tensors, f"train.resume: checkpoint {str(directory)!r} does not match this model (was it "
              "trained with other train.mode or lora settings?)", error=ResumeError)
    # Memory-mapped: every rank reads the file (twice the trainable parameters in fp32), and each keeps
    # only its shard (FSDP) or moves it to its GPU; read whole, 8 ranks of an 8B run held 8 copies.
    # (The safetensors file above is memory-mapped by load_file already.)
    # weights_only: tensors and plain containers, all a checkpoint holds; a file that pickled anything
    # else (code run on load) is refused rather than executed.
    optimizer_state = read_checkpoint_file(directory / "optimizer.pt",
                                           lambda path: torch.load(path, weights_only=True, mmap=True))
    try:
        optimizer.load_state_dict(fsdp.shard_optimizer_state(optimizer_state, optimizer))
    except ValueError as error:  # torch's message names parameter groups, not settings
        raise ResumeError(f"train.resume: the optimizer state of {str(directory)!r} does not fit this run's "
                          f"parameters (other heads, mode or lora settings?): {error}") from error
    scheduler.load_state_dict(read_checkpoint_file(directory / "scheduler.pt",
                                                   lambda path: torch.load(path, weights_only=True)))
    rng_path = directory / rng_file(rank)
    if rng_path.is_file() or rank == 0:
        set_rng_state(read_checkpoint_file(rng_path, lambda path: torch.load(path, weights_only=True)))
    return read_checkpoint_file(directory / STATE_FILE, lambda path: json.loads(path.read_text()))


def read_checkpoint_file(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, or a ResumeError naming the file and the earlier checkpoints to resume from instead:
    torch's error for a truncated file names neither (a full disk once, a copy cut short)."""
    try:
        return read(path)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as error:
        # (torch reports a truncated file as RuntimeError, but also a CUDA tensor on a host without CUDA:
        # the message says what failed, and what to do if the file is damaged.)
        directory = path.parent
        step = STEP_DIR.match(directory.name)
        earlier = [p.name for p in list_checkpoints(directory.parent)
                   if step and int(STEP_DIR.match(p.name).group(1)) < int(step.group(1))]
        instead = (f"resume from an earlier checkpoint (train.resume={directory.parent / earlier[-1]}; "
                   f"there: {', '.join(earlier)})" if earlier else "no earlier checkpoint is there")
        raise ResumeError(f"train.resume: {str(path)!r} cannot be read ({type(error).__name__}: {str(error)[:200]}); "
                          f"if checkpoint {directory.name} is damaged (a full disk, a copy cut short), {instead}"
                          ) from error


def find_resume_checkpoint(resume: str, root: str | Path) -> Path | None:
    """The checkpoint to resume from: None for ``none``, the newest for ``auto``, else the given path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"train.resume: {resume!r} is not a checkpoint directory (expected {STATE_FILE} in it)")
    return path


def delete_earlier_evaluation(run_dir: str | Path, *, prompts: bool = True,
                              what: str = "the evaluation of an earlier run") -> None:
    """Delete what describes an earlier run in ``run_dir`` at a fresh start (or a resume from another
    run's checkpoint): the files of its ``eval/`` report (with a warning naming ``what`` they are: they
    described heads this run replaces; the directory goes too when nothing else is in it) and, with
    ``prompts``, its held-out prompts (this run writes its own at its end; an earlier run's held-out
    documents may be in this run's training data, which made ``medusa-liger eval RUN_DIR`` optimistic).
    A resume calls it before its final export, without ``prompts``: the report measured the heads that
    export replaces (the checkpoint's may be others, even with nothing left to train)."""
    run_dir = Path(run_dir)
    report = run_dir / EVAL_DIR
    # Only an evaluation's own files (eval/ may hold others); any of them, as an evaluation killed before
    # its report.json leaves its tree.json.
    if any((report / name).is_file() for name in EVAL_FILES.values()):
        print(f"warning: deleting {what} in {report} ({', '.join(EVAL_FILES.values())}; "
              f"run `medusa-liger eval {run_dir}` again when this one ends)", file=sys.stderr, flush=True)
        for name in EVAL_FILES.values():
            (report / name).unlink(missing_ok=True)
        if not report.is_symlink() and not any(report.iterdir()):
            report.rmdir()
    if prompts:
        (run_dir / EVAL_PROMPTS_FILE).unlink(missing_ok=True)


def delete_old_checkpoints(ckpt_root: str | Path, why: str = "train.resume=none starts a fresh run",
                           hint: str = " (pass train.resume=auto to continue from the newest)") -> None:
    """Delete ``ckpt_root`` at a fresh start, saying which steps go (on stderr).

    Older checkpoints belong to another run: they must not outlive this run's (via keep-pruning by
    step) nor be resumed in place of this one's, so they go; the warning names them, so a user who
    meant to continue that run knows what happened and what to pass next time.
    """
    ckpt_root = Path(ckpt_root)
    checkpoints = list_checkpoints(ckpt_root)
    if checkpoints:  # (with train.resume=auto a fresh start means there was no complete checkpoint)
        print(f"warning: {why}: deleting the old checkpoints {', '.join(p.name for p in checkpoints)} in "
              f"{ckpt_root}{hint}", file=sys.stderr, flush=True)
    delete_checkpoints(checkpoints)  # each whole or gone, should the deletion be cut short
    shutil.rmtree(ckpt_root)


@contextmanager
def run_dir_lock(out: Path) -> Iterator[None]:
    """One training run at a time in ``out``: rank 0 holds an advisory lock on ``out/.lock`` (with its
    pid) for the run, and every rank stops with a RunDirBusyError naming the holder when another launch
    holds it: a second run there deleted this one's checkpoints (and its save in progress) and replaced
    its metrics while it trained. Released when the run ends or its process dies."""
    file, busy = None, None
    if distributed.is_main():
        try:
            import fcntl
        except ImportError:  # (no advisory locks on this platform: no check)
            fcntl = None
        if fcntl is not None:
            out.mkdir(parents=True, exist_ok=True)
            file = open(out / RUN_LOCK_FILE, "a+")
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # (EWOULDBLOCK: another process holds it)
                file.seek(0)
                holder = file.read().strip()
                file.close()
                file = None
                busy = (f"output_dir {str(out)!r} is in use by another training run"
                        f"{f' (pid {holder})' if holder else ''}: wait for it to end, or give this run its own name=")
            except OSError as error:  # no locks on this filesystem (NFS without lockd: ENOLCK; Lustre noflock: ENOSYS)
                file.close()
                file = None
                print(f"warning: output_dir {str(out)!r}: its filesystem takes no lock ({error.strerror or error}): "
                      "another training run started there meanwhile would not be refused", file=sys.stderr, flush=True)
            else:
                file.seek(0)
                file.truncate()
                file.write(f"{os.getpid()}\n")
                file.flush()
    busy = distributed.all_gather_objects(busy)[0]  # every rank stops, not only rank 0
    try:
        if busy is not None:
            raise RunDirBusyError(busy)
        yield
    finally:
        if file is not None:
            file.close()  # (releases the lock)
