"""Faults during training that stop a run with one line and keep what was finished: a non-finite loss and running
out of GPU memory."""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from .checkpoints import checkpoint_name, newest_good, problem
from .errors import EXIT_FAULT, UserError
from .preflight import MemoryCheck, _suggestions
from .report import human_bytes, peak_memory_bytes


def _any_rank(flag: bool, device: str) -> bool:
    """True on every rank when it is true on one: ranks must skip or stop at the same step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    where = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
    tensor = torch.tensor([int(flag)], device=where)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


class NonFiniteLossGuard(TrainerCallback):
    """Drops the update of a step whose loss is NaN or infinite, and stops training after `max_nan_steps` of them
    (at the first with the default 0) without saving: the last good checkpoint stays the newest."""

    def __init__(self, trainer, max_nan_steps: int, device: str):
        self.trainer = trainer
        self.max_nan_steps = max_nan_steps
        self.device = device
        self.bad_steps: list[int] = []
        self.stopped_at: int | None = None
        self.loss: float | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        loss = self.trainer._step_loss.get(step)  # summed over the step's micro-batches by MeasuredTrainer
        if _any_rank(loss is not None and not math.isfinite(loss), self.device):
            self.trainer.optimizer.zero_grad(
                set_to_none=True
            )  # AdamW leaves parameters without gradients alone
            self.bad_steps.append(step)
            self.loss = loss

    def on_step_end(self, args, state, control, **kwargs):
        if (
            self.bad_steps
            and self.bad_steps[-1] == state.global_step
            and len(self.bad_steps) > self.max_nan_steps
        ):
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = False
        return control

    def raise_if_stopped(self, cfg, place) -> None:
        if self.stopped_at is not None:
            checkpoint = newest_good(Path(self.trainer.args.output_dir))
            raise non_finite_loss_error(
                self.loss, self.stopped_at, len(self.bad_steps) - 1, cfg, place, checkpoint
            )


def non_finite_loss_error(
    loss: float | None, step: int, skipped: int, cfg, place, checkpoint: Path | None, rows: str = ""
) -> UserError:
    """One line: the step, the likely causes and what was kept. `rows` names the step's data rows, if known."""
    kept = (
        f"the last good checkpoint is kept: {checkpoint}"
        if checkpoint
        else "no checkpoint was saved before it"
    )
    earlier = f" ({skipped} earlier such step(s) skipped)" if skipped else ""
    fp16 = "fp16 overflow (try --dtype bfloat16)" if place.mixed_precision == "fp16" else "numeric overflow"
    bad_row = f"a bad row among {rows}" if rows else "a bad row in that step's batch"
    return UserError(
        f"training stopped: the loss is {loss} at step {step}{earlier}; likely causes: "
        f"--learning_rate {cfg.learning_rate:g} too high, {fp16}, or {bad_row}; {kept}; "
        f"--max_nan_steps N skips up to N such steps",
        EXIT_FAULT,
        every_rank=True,
    )


def close_progress_bar(trainer) -> None:
    """End the Trainer's progress bar (left open when training raises) so a one-line error starts its own line."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


# ------------------------------------------------------------------------------------------------ out of memory


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class OutOfMemoryMidRun(Exception):
    """Training ran out of memory at `step`; `saved` says what was kept. Carries the measured peak."""

    def __init__(self, step: int, saved: str, peak: int):
        super().__init__(f"out of memory at step {step}")
        self.step, self.saved, self.peak = step, saved, peak


def save_last_step(model, step: int, directory: Path, save: Callable[[], Path], distributed: bool) -> str:
    """After running out of memory mid-step: `save()` the last finished step, once the failed step's gradients
    and cached blocks are freed; says what was kept. With several ranks nothing is saved: the others are inside
    the failed step's collectives."""
    newest = newest_good(directory)
    if step == 0:
        return "no step had finished, nothing to save"
    if distributed:
        return f"not saved (the other ranks are mid-step); newest checkpoint: {newest or 'none'}"
    model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        return f"saved step {step} to {save()}"
    except Exception as exc:  # the out-of-memory line matters more than this one
        return f"saving step {step} failed ({str(exc).splitlines()[0][:120]}); newest checkpoint: {newest or 'none'}"


def save_after_oom(trainer) -> str:
    """`save_last_step` for the Trainer's loop, unless a checkpoint of that step is already there."""
    step, root = trainer.state.global_step, Path(trainer.args.output_dir)
    target = root / checkpoint_name(step)
    if step and target.is_dir() and problem(target) is None:
        return f"{target} holds step {step}"

    def save() -> Path:
        trainer._save_checkpoint(trainer.model, None)
        return target

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return save_last_step(trainer.model, step, root, save, distributed)


def train_or_save_on_oom(trainer, resume_from: str | None, device: str) -> None:
    """`trainer.train()`; on running out of memory, a checkpoint of the last finished step, then
    `OutOfMemoryMidRun`."""
    try:
        trainer.train(resume_from_checkpoint=resume_from)
        return
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
    # Outside the except block: the exception, and with it the failed step's tensors, are gone.
    step = trainer.state.global_step + 1
    peak = peak_memory_bytes(device)
    raise OutOfMemoryMidRun(step, save_after_oom(trainer), peak)


def out_of_memory_error(
    exc: OutOfMemoryMidRun, check: MemoryCheck, cfg, plan: dict, stats, place
) -> UserError:
    """One line: the memory figures, what was kept, and the flags under which the pre-flight's estimate, scaled
    by how far the run really went past it, would fit."""
    # The run needed more than it had although the estimate fitted: ask for estimates smaller by that margin.
    budget = min(check.available.bytes * min(1.0, check.needed / max(exc.peak, 1)), check.needed)
    scaled = dataclasses.replace(check.available, bytes=int(budget))
    suggestions = _suggestions(cfg, plan, stats, place, scaled)
    if suggestions:
        remedy = f"it would fit with {' or '.join(suggestions)}"
        if "--gradient_checkpointing" in suggestions:
            remedy += " (--gradient_checkpointing resumes this run; other changes start a new one)"
    else:
        remedy = "lower --batch_size or --seq_length, or use a larger device"
    return UserError(
        f"out of memory at step {exc.step}: peak {human_bytes(exc.peak)} "
        f"({'GPU allocator' if place.device == 'cuda' else 'process RSS'}), estimated {human_bytes(check.estimate)}, "
        f"{human_bytes(check.available.bytes)} available ({check.available.source}); {exc.saved}; {remedy}",
        EXIT_FAULT,
    )
