"""Training metrics: a tqdm progress bar, a JSON Lines file, and wandb (offline unless asked).

``MetricsLogger.log(step, metrics)`` appends one JSON object per optimizer step to
``{output_dir}/metrics.jsonl``, shows loss / per-head top-1 accuracy / tokens per second on the
progress bar, and forwards the record to wandb. wandb is the real library, imported only when
enabled: ``logging.wandb: offline`` (the default; no account or network, files under
``{output_dir}/wandb``), ``online``, or ``disabled``. If wandb is not installed, a warning says so
and training continues without it.

In a data-parallel run only rank 0 has a ``MetricsLogger``; the other ranks get a ``NullLogger``
(same interface, writes nothing), so a rank never needs to ask whether it may log.

On resume, ``metrics.jsonl`` is cut back to the records up to the checkpoint's step, so the file
always describes one consistent run.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medusa_liger.run_layout import METRICS_FILE, replace_text


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only the records of ``path`` with ``step <= last_step`` (for a resumed run).

    A line that is not a JSON record (a run killed mid-write leaves a torn last line) is dropped
    with a warning. The kept lines go to a temporary file renamed over ``path``, so a kill here
    leaves either the old file or the new one.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            torn += 1
            continue
        if step <= last_step:
            kept.append(line)
    if torn:
        warnings.warn(f"{path}: dropped {torn} unreadable line(s) (a run killed mid-write)", stacklevel=2)
    replace_text(path, "".join(line + "\n" for line in kept))


def highest_step(path: str | Path) -> int:
    """The highest step of a metrics file's records (0 for none, or no file; torn lines skipped)."""
    path = Path(path)
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, TypeError, KeyError):
            continue
    return max(steps)


WANDB_STEPS_FILE = ".wandb_steps.json"  # {wandb run id: the highest step it logged}, beside metrics.jsonl


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def init_wandb(mode: str, project: str, name: str, config: dict, directory: Path, resume_id: str | None):
    """A wandb run, or None when disabled or when wandb is not installed (with a warning)."""
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        warnings.warn("logging.wandb is enabled but wandb is not installed: logging to metrics.jsonl only",
                      stacklevel=2)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, name=name, config=config, mode=mode, dir=str(directory),
                      id=resume_id, resume="allow" if resume_id else None, reinit="finish_previous")


def head_keys(keys: Iterable[str], prefix: str) -> list[str]:
    """The keys ``prefix + k`` among ``keys`` (e.g. "acc/head3"), by head index k: by name,
    "acc/head10" would come before "acc/head2"."""
    return sorted({k for k in keys if k.startswith(prefix)}, key=lambda k: int(k.removeprefix(prefix)))


class MetricsLogger:
    """Writes per-step metrics to JSONL, a progress bar and wandb; a context manager."""

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int, *, wandb_mode: str,
                 wandb_project: str, run_name: str, config: dict, progress: bool, every: int,
                 wandb_id: str | None = None, rewound: bool = False) -> None:
        """``wandb_id``: the wandb run to continue (a resume); ``rewound``: the resume does not replay what
        was logged past ``start_step`` (other settings, or an older checkpoint than the newest)."""
        self.path = Path(output_dir) / METRICS_FILE
        if wandb_id is not None:
            # What each wandb run logged, kept beside the metrics before they are cut back (whether or not
            # this attempt logs to wandb): a rewound resume that died before its first step has cut
            # metrics.jsonl already, but the wandb run still holds the steps.
            known = _read_json(Path(output_dir) / WANDB_STEPS_FILE)
            recorded = int(known.get(wandb_id, 0))
            logged = max(highest_step(self.path), recorded)
            if logged > recorded:
                replace_text(Path(output_dir) / WANDB_STEPS_FILE, json.dumps(known | {wandb_id: logged}))
        truncate_metrics(self.path, start_step)
        if wandb_id is not None and wandb_mode != "disabled":
            if rewound and logged > start_step:
                # wandb drops what a resumed run logs at steps it already has: the abandoned steps' values
                # would stay in its history. A new wandb run shows this run's. (An exact resume replays them.)
                print(f"note: the wandb run {wandb_id} logged steps up to {logged}, past the resumed step "
                      f"{start_step}, which this resume trains anew: logging to a new wandb run",
                      file=sys.stderr, flush=True)
                wandb_id = None
        self.every = every
        self.total_steps = total_steps
        self.file = self.path.open("a", encoding="utf-8")
        self.wandb = init_wandb(wandb_mode, wandb_project, run_name, config, Path(output_dir), wandb_id)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb is None else self.wandb.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` of optimizer step ``step`` (1-based)."""
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every == 0 or step == self.total_steps:
            accs = [metrics[k] for k in head_keys(metrics, "acc/head")]
            line = (f"loss={metrics['loss']:.3f} acc=[{' '.join(f'{a:.2f}' for a in accs)}] "
                    f"tok/s={metrics.get('tokens_per_s', 0):.0f}"
                    + (f" mem={metrics['peak_memory_gib']:.1f}GiB" if "peak_memory_gib" in metrics else ""))
            if self.bar is not None:
                self.bar.set_postfix_str(line)
            else:  # (logging.progress=false, e.g. a batch job's log file): one line instead of the bar
                print(f"step {step}/{self.total_steps}: {line}", flush=True)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self, failed: bool = False) -> None:
        """Close the file, the bar and the wandb run (marked failed: a run that raised, or was interrupted)."""
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


class NullLogger:
    """A ``MetricsLogger`` stand-in for ranks other than 0 in a data-parallel run: records nothing."""

    path = None
    wandb_id = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
