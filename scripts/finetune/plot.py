"""The loss curve of a run, as a PNG beside its metrics.json.

Drawn from the trainer's log history: the loss of every optimizer step (kept by MeasuredTrainer, so a resumed
run's curve is whole), its moving average over --logging_steps, and the eval loss at every evaluation (see
evaluation.py) with the lowest one marked. DPO runs get a
second panel with the reward accuracy and margin TRL logs. Without matplotlib the plot is skipped with a note:
a run never fails for want of a picture.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

LOSS_PLOT = "loss.png"
STEP_LOSS = "step_loss"  # as in train.py


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], float(entry[key])) for entry in history if key in entry and "step" in entry]
    return [s for s, _ in points], [v for _, v in points]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_loss_plot(history: list[dict], out_dir: Path, *, window: int = 10, title: str = "") -> Path | None:
    """Write OUT_DIR/loss.png; return its path, or None (with a note on stderr) when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed, none opened
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; no {LOSS_PLOT} was drawn", file=sys.stderr)
        return None

    steps, losses = _series(history, STEP_LOSS)
    if not steps:
        steps, losses = _series(history, "loss")
    if not steps:
        return None
    eval_steps, eval_losses = _series(history, "eval_loss")
    reward_steps, accuracies = _series(history, "rewards/accuracies")
    _, margins = _series(history, "rewards/margins")

    target = Path(out_dir) / LOSS_PLOT
    panels = 2 if reward_steps else 1
    figure, axes = plt.subplots(panels, 1, figsize=(8, 3.2 * panels + 0.6), sharex=True, squeeze=False)
    try:
        ax = axes[0][0]
        smooth = window > 1 and len(steps) > window
        ax.plot(
            steps, losses, color="tab:blue", alpha=0.3 if smooth else 1.0, linewidth=1, label="loss per step"
        )
        if smooth:
            ax.plot(steps, _moving_average(losses, window), color="tab:blue", label=f"mean of {window} steps")
        if eval_steps:
            ax.plot(eval_steps, eval_losses, "o-", color="tab:orange", markersize=4, label="eval loss")
            best = min(range(len(eval_losses)), key=lambda i: (eval_losses[i], eval_steps[i]))
            if len(eval_steps) > 1:
                ax.plot(
                    eval_steps[best], eval_losses[best], "*", color="tab:red", markersize=12,
                    label=f"lowest eval loss ({eval_losses[best]:.4f}, step {eval_steps[best]})",
                )  # fmt: skip
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
        ax.set_title(title or str(Path(out_dir).name))
        if reward_steps:
            ax = axes[1][0]
            ax.plot(reward_steps, accuracies, color="tab:green", label="reward accuracy")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
            if margins:
                twin = ax.twinx()
                twin.plot(reward_steps, margins, color="tab:red", label="reward margin")
                twin.set_ylabel("margin")
                twin.legend(loc="lower right")
            ax.legend(loc="upper left")
        axes[-1][0].set_xlabel("optimizer step")
        figure.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=f".{LOSS_PLOT}.", suffix=".png", dir=target.parent)
        os.close(fd)
        try:
            figure.savefig(tmp, dpi=100)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except Exception as exc:  # a picture is never worth failing a finished run for
        print(f"note: could not draw {LOSS_PLOT} ({exc})", file=sys.stderr)
        return None
    finally:
        plt.close(figure)
    return target
