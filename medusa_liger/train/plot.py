"""A PNG of a run's curves: losses (left) and each Medusa head's top-1 accuracy (right) per step,
with the held-out evaluations along the way (``train.eval_every``) as markers.

Reads the records of ``metrics.jsonl`` (see ``logging.py``); uses matplotlib's non-interactive
``Agg`` backend, so it works on a machine without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (noisy per-step metrics read better smoothed)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


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
    steps = [r["step"] for r in records]
    window = max(1, len(records) // 50)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))

    for key, label in (("loss", "total loss"), ("lm_loss", "backbone LM loss")):
        if all(key in r and r[key] is not None for r in records):
            ax_loss.plot(steps, _smooth([r[key] for r in records], window), label=label)
    head_keys = sorted((k for k in records[-1] if k.startswith("loss/head")), key=lambda k: int(k.rsplit("head", 1)[1]))
    for key in head_keys:
        smoothed = _smooth([r[key] for r in records], window)
        line, = ax_loss.plot(steps, smoothed, label=key.replace("loss/", ""), alpha=0.7)
        _held_out(ax_loss, records, "eval/" + key, line.get_color())
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_title("loss")
    ax_loss.legend(fontsize=8)

    if all("acc/lm" in r for r in records):
        ax_acc.plot(steps, _smooth([r["acc/lm"] for r in records], window), label="backbone (t+1)", color="black")
    for key in sorted((k for k in records[-1] if k.startswith("acc/head")), key=lambda k: int(k.rsplit("head", 1)[1])):
        k = int(key.rsplit("head", 1)[1])
        line, = ax_acc.plot(steps, _smooth([r[key] for r in records], window), label=f"head {k} (t+{k + 2})")
        _held_out(ax_acc, records, "eval/" + key, line.get_color())
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
