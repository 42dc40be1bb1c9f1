"""Evaluation while training: the eval loss every --eval_steps (or epoch), the best model kept, early stopping,
and a one-line warning when the model starts to overfit.

The best model is the one with the lowest eval loss. With --load_best_model_at_end each new best is saved, as
final/ would hold it (adapter or weights and the tokenizer, no optimizer state), to OUTPUT_DIR/best/ — written
beside it and renamed into place, with best.json naming its step and loss — and at the end it becomes final/.
A resumed run reads best/best.json, so an interruption never loses the best so far. Patience and the overfitting
check count evaluations in the trainer's log history, which every checkpoint keeps.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from .config import TrainConfig, eval_strategy
from .outputs import FINAL, is_main_process, replace_dir, save_final
from .report import perplexity, write_json_atomic

BEST = "best"
BEST_FILE = "best.json"
STEP_LOSS = "step_loss"  # as in train.py
# Evaluations above the lowest eval loss that make the overfitting warning, unless --early_stopping_patience.
OVERFIT_EVALS = 3


def eval_arguments(cfg: TrainConfig) -> dict:
    """The TrainingArguments that say when to evaluate."""
    strategy = eval_strategy(cfg)
    return {"eval_strategy": strategy, **({"eval_steps": cfg.eval_steps} if strategy == "steps" else {})}


def describe(cfg: TrainConfig, eval_examples: int) -> str:
    """The plan's line about evaluation."""
    if not eval_examples:
        return "none (no eval data)"
    strategy = eval_strategy(cfg)
    when = {"steps": f"every {cfg.eval_steps} steps and at the end", "epoch": "every epoch and at the end"}
    parts = [f"{when.get(strategy, 'once, at the end')}, on {eval_examples} examples"]
    if cfg.load_best_model_at_end:
        parts.append("final/ = the lowest eval loss")
    if cfg.early_stopping_patience:
        parts.append(f"early stopping after {cfg.early_stopping_patience} evaluations without a lower loss")
    return "; ".join(parts)


@dataclass(frozen=True)
class EvalPoint:
    step: int
    loss: float


def eval_points(history: list[dict]) -> list[EvalPoint]:
    return [EvalPoint(e["step"], float(e["eval_loss"])) for e in history if "eval_loss" in e and "step" in e]


def lowest(points: list[EvalPoint]) -> EvalPoint | None:
    return min(points, key=lambda p: (p.loss, p.step), default=None)


def _mean_step_loss(history: list[dict], after: int, upto: int) -> float | None:
    losses = [e[STEP_LOSS] for e in history if STEP_LOSS in e and after < e["step"] <= upto]
    return sum(losses) / len(losses) if losses else None


def overfitting(history: list[dict], evals: int) -> str | None:
    """A one-line warning when the eval loss has stayed above its lowest for the last `evals` evaluations while
    the training loss (the mean step loss since the evaluation before) fell over the same span; else None."""
    points = eval_points(history)
    best = lowest(points)
    if best is None or sum(p.step > best.step for p in points) < evals:
        return None
    at = points.index(best)
    before = _mean_step_loss(history, points[at - 1].step if at else 0, best.step)
    now = _mean_step_loss(history, points[-2].step, points[-1].step)
    if before is None or now is None or now >= before:
        return None
    return (
        f"warning: overfitting: the eval loss rose from {best.loss:.4f} at step {best.step} to "
        f"{points[-1].loss:.4f} at step {points[-1].step} ({evals} evaluations without a lower one) while the "
        f"training loss fell ({before:.4f} → {now:.4f}); --load_best_model_at_end keeps the best model, "
        "--early_stopping_patience stops the run"
    )


class EvalTracker(TrainerCallback):
    """Follows the eval loss during training: keeps the best model, stops early, warns of overfitting, and at the
    end puts the best (or the last) model in final/ and reports both."""

    def __init__(self, trainer, cfg: TrainConfig, tokenizer, out: Path, resume_from: str | None):
        self.trainer, self.cfg, self.tokenizer, self.out = trainer, cfg, tokenizer, out
        self.best_dir = out / BEST
        self.saved: EvalPoint | None = None  # the model in best/
        self.in_training = False
        self.stopped_early_at: int | None = None
        self.warning: str | None = None
        self.final_model: str | None = None
        if resume_from is None:
            if is_main_process():  # left by an earlier start of this run that never reached a checkpoint
                shutil.rmtree(self.best_dir, ignore_errors=True)
        elif (self.best_dir / BEST_FILE).is_file():
            saved = json.loads((self.best_dir / BEST_FILE).read_text())
            self.saved = EvalPoint(saved["step"], saved["eval_loss"])

    @property
    def history(self) -> list[dict]:
        return self.trainer.state.log_history

    def best(self) -> EvalPoint | None:
        """The lowest eval loss so far: in the log history (the resumed checkpoint's included) or in best/."""
        return lowest(eval_points(self.history) + ([self.saved] if self.saved else []))

    def on_train_begin(self, args, state, control, **kwargs):
        self.in_training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.in_training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not self.in_training or not metrics or "eval_loss" not in metrics:
            return control  # the evaluation after training is the caller's (see final_evaluation)
        current = EvalPoint(state.global_step, float(metrics["eval_loss"]))
        if self.warning is None:
            self.warning = overfitting(self.history, self.cfg.early_stopping_patience or OVERFIT_EVALS)
            if self.warning and is_main_process():
                print(self.warning, flush=True)
        earlier = [p for p in eval_points(self.history) if p.step < current.step]
        previous = lowest(earlier + ([self.saved] if self.saved else []))
        if previous is None or current.loss < previous.loss:
            if self.cfg.load_best_model_at_end:
                self._save_best(current)
        elif self.cfg.early_stopping_patience:
            since = sum(p.step > previous.step for p in eval_points(self.history))
            if since >= self.cfg.early_stopping_patience:
                control.should_training_stop = True
                self.stopped_early_at = current.step
                if is_main_process():
                    print(
                        f"early stopping at step {current.step}: no lower eval loss in {since} evaluations "
                        f"since step {previous.step} ({previous.loss:.4f})",
                        flush=True,
                    )
        return control

    def _save_best(self, point: EvalPoint) -> None:
        self.saved = point
        if not is_main_process():
            return
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        tmp = self.out / f".{BEST}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        use_cache = model.config.use_cache
        model.config.use_cache = True  # as final/ is saved: generation wants the cache
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.config.use_cache = use_cache
        self.tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / BEST_FILE, {"step": point.step, "eval_loss": point.loss})
        replace_dir(tmp, self.best_dir)

    def final_evaluation(self) -> dict:
        """Eval metrics of the model training ended with: this step's evaluation if there was one, else a new one."""
        self.in_training = False
        if self.trainer.eval_dataset is None:
            return {}
        last = next((e for e in reversed(self.history) if "eval_loss" in e), None)
        if last is not None and last.get("step") == self.trainer.state.global_step:
            return {k: v for k, v in last.items() if k.startswith("eval_")}
        return self.trainer.evaluate()

    def save_final(self, model) -> Path:
        """final/: the best model when --load_best_model_at_end and it is not the last one, else the last."""
        best, step = self.best(), self.trainer.state.global_step
        use_best = (
            self.cfg.load_best_model_at_end
            and best is not None
            and best.step != step
            and self.saved == best
            and (self.best_dir / BEST_FILE).is_file()
        )
        if use_best:
            tmp = self.out / f".{FINAL}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            self.best_dir.rename(tmp)
            (tmp / BEST_FILE).unlink()
            replace_dir(tmp, self.out / FINAL)
            final = self.out / FINAL
        else:
            final = save_final(model, self.tokenizer, self.out)
        self.final_model = "best" if use_best else "last"
        shutil.rmtree(self.best_dir, ignore_errors=True)  # final/ holds what it was kept for
        return final

    def metrics(self) -> dict:
        """What metrics.json adds: every evaluation, the best one, and how the run ended."""
        best = self.best()
        return {
            "eval_history": [{"step": p.step, "eval_loss": p.loss} for p in eval_points(self.history)],
            "best_eval_loss": best.loss if best else None,
            "best_eval_perplexity": perplexity(best.loss) if best else None,
            "best_step": best.step if best else None,
            "final_model": self.final_model,
            "stopped_early_at_step": self.stopped_early_at,
            "overfitting_warning": self.warning,
        }
