"""A PNG of a run's curves: losses (left) and each Medusa head's top-1 accuracy (right) per step,
with the held-out evaluations along the way (``train.eval_every``) as markers.

Reads the records of ``metrics.jsonl`` (see ``logging.py``); uses matplotlib's non-interactive
``Agg`` backend, so it works on a machine without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medusa_liger.train.logging import head_keys


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (noisy per-step metrics read better smoothed)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _curve(ax, records: list[dict[str, Any]], key: str, window: int, **style):
    """The smoothed training curve of ``key`` over the records that have it (a joint run's LM loss starts
    after its heads-only stage); markers too where there are few points (one is otherwise invisible).
    Returns the line, or None when no record has the key."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if not points:
        return None
    steps, values = zip(*points)
    line, = ax.plot(steps, _smooth(list(values), window), marker="o" if len(points) <= 2 else None, **style)
    return line


def _held_out(ax, records: list[dict[str, Any]], key: str, color: str) -> None:
    """The held-out values of ``key`` (``train.eval_every``) as markers in the training curve's color."""
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
        ax.plot(*zip(*points), linestyle="none", marker="o", markersize=4, color=color)


def plot_metrics(records: list[dict[str, Any]], path: str | Path, baseline: float | None = None,
                 title: str = "") -> Path:
    """Write the loss/accuracy figure of ``records`` to ``path``.

    baseline: accuracy of always predicting the most common token, drawn as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        raise ValueError("records must hold at least one metrics record to plot")
    window = max(1, len(records) // 50)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))

    keys = {k for r in records for k in r}
    _curve(ax_loss, records, "loss", window, label="total loss")
    line = _curve(ax_loss, records, "lm_loss", window, label="backbone LM loss")
    _held_out(ax_loss, records, "eval/lm_loss", line.get_color() if line else None)
    for key in head_keys(keys, "loss/head"):
        line = _curve(ax_loss, records, key, window, label=key.replace("loss/", ""), alpha=0.7)
        _held_out(ax_loss, records, "eval/" + key, line.get_color() if line else None)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)

    _curve(ax_acc, records, "acc/lm", window, label="backbone (t+1)", color="black")
    _held_out(ax_acc, records, "eval/acc/lm", "black")
    for key in head_keys(keys, "acc/head"):
        k = int(key.removeprefix("acc/head"))
        line = _curve(ax_acc, records, key, window, label=f"head {k} (t+{k + 2})")
        _held_out(ax_acc, records, "eval/" + key, line.get_color() if line else None)
    if baseline is not None:
        ax_acc.axhline(baseline, linestyle="--", color="gray", label="most common token")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("top-1 accuracy")
    ax_acc.set_title("top-1 accuracy")
    ax_acc.legend(fontsize=8)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
