"""Training: the Trainer with throughput and per-step loss, save-and-stop on signals, metrics at the end."""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from . import checkpoints, chunked_loss
from .attention import flat_rows
from .config import TrainConfig
from .data import IGNORE_INDEX, Collator, PreparedData, real_tokens, token_batches
from .errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted
from .evaluation import EvalTracker, eval_arguments
from .guards import NonFiniteLossGuard, close_progress_bar, train_or_save_on_oom
from .model import Placement, liger_kernels, load_model
from .outputs import CHECKPOINTS, METRICS, RUN_FILE, is_main_process
from .plot import write_loss_plot
from .report import peak_memory_bytes, perplexity, run_metrics, write_json_atomic

STEP_LOSS = "step_loss"  # per-step entries in the trainer's log history, which checkpoints keep


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------------- trainer


class MeasuredTrainer:
    """Mixin for a transformers Trainer (or a TRL trainer): counts real (non-padding) tokens and samples, and
    keeps each step's loss in the log history, which checkpoints save, so a resumed run reports the same loss.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self.samples_seen = 0
        self._step_loss: dict[int, float] = {}

    def count_tokens(self, inputs: dict) -> tuple[int, int]:
        """(real tokens, samples) in one micro-batch."""
        return real_tokens(inputs)

    def extra_eval_metrics(self, eval_metrics: dict) -> dict:
        """Metrics beyond eval loss that a trainer adds to metrics.json."""
        return {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens, samples = self.count_tokens(inputs)
        self.tokens_seen += tokens
        self.samples_seen += samples
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Micro-batch losses come back already scaled for accumulation, so their sum is the step's loss.
        step = self.state.global_step + 1
        self._step_loss[step] = self._step_loss.get(step, 0.0) + float(loss)
        return loss

    def _save_checkpoint(self, model, trial):
        # Written aside, sealed with a completion marker and renamed into place: never half a checkpoint.
        checkpoints.save_atomically(self, super()._save_checkpoint, model, trial)

    def record_step_loss(self, step: int) -> None:
        if step in self._step_loss:
            self.state.log_history.append({"step": step, STEP_LOSS: self._step_loss.pop(step)})

    def window_loss(self, window: int, last: bool = True) -> float | None:
        """Mean step loss over the first or last `window` steps of the run (resumed runs included)."""
        losses = [e[STEP_LOSS] for e in self.state.log_history if STEP_LOSS in e]
        losses = losses[-window:] if last else losses[:window]
        return sum(losses) / len(losses) if losses else None


def loss_positions_only(inputs: dict) -> dict:
    """Ask the model for logits only at positions whose next token carries loss.

    The lm_head is a vocabulary-wide matmul (128k columns for Llama 3) whose output is upcast to fp32 for the loss:
    with loss on responses only, computing it for prompt tokens is wasted time and memory. The model gets the kept
    positions (`logits_to_keep`) and their targets (`shift_labels`), which its loss (and Liger's fused one) use
    instead of shifting `labels` itself; the loss is the same.
    """
    labels = inputs.get("labels")
    if labels is None or "logits_to_keep" in inputs:
        return inputs
    shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    if keep.numel() == 0:
        return inputs
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[:, keep]}


class SFTPlaybookTrainer(MeasuredTrainer, Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = loss_positions_only(inputs)
        # The lm_head and loss in chunks (finetune/chunked_loss.py), in a single process only: under DDP the model
        # is wrapped, and going around the wrapper's forward would skip its gradient synchronisation.
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        if (
            self.accelerator.num_processes == 1
            and model.training
            and not return_outputs
            and "shift_labels" in inputs
            and self.compute_loss_func is None
            and self.label_smoother is None
            and chunked_loss.applies(causal_lm)
        ):
            # transformers divides by num_items_in_batch when the model takes loss kwargs, as here.
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None
            return chunked_loss.causal_lm_loss(causal_lm, inputs, count)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class StepEndCallback(TrainerCallback):
    """Records step losses, logs the last step, and turns SIGINT/SIGTERM into save-and-stop."""

    def __init__(self, trainer: MeasuredTrainer, device: str):
        self.trainer = trainer
        self.device = device
        self.signal_received: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if (
            self.signal_received is not None
        ):  # a second Ctrl-C: stop now, the checkpoint is not worth waiting for
            raise KeyboardInterrupt
        self.signal_received = signum
        if is_main_process():
            print(
                f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step", flush=True
            )

    def _stop_requested(self) -> bool:
        flag = self.signal_received is not None
        if _distributed():  # every rank must stop at the same step or the next collective hangs
            device = f"cuda:{torch.cuda.current_device()}" if self.device == "cuda" else "cpu"
            tensor = torch.tensor([int(flag)], device=device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.record_step_loss(state.global_step)
        if state.global_step >= state.max_steps:
            control.should_log = True
        if self._stop_requested():
            control.should_save = True
            control.should_training_stop = True
        return control


def _tensorboard_available() -> bool:
    return (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    )


def training_arguments(cfg: TrainConfig, place: Placement, out: Path) -> TrainingArguments:
    report_to = ["tensorboard"] if _tensorboard_available() else []
    if report_to:
        # The one spelling both transformers 5.5 and 5.23 accept (the logging_dir argument is gone in 5.23).
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.log_dir or out / "logs").expanduser())
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=1 if cfg.batch_tokens else cfg.batch_size,  # token_batches: one each
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # a fraction below 1 means a ratio of the total steps
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        **eval_arguments(cfg),  # and once more at the end (run_training)
        seed=cfg.seed,
        data_seed=cfg.seed,
        # Fused kernels and a chunked cross-entropy on CUDA when liger_kernel is installed (see model.liger_kernels).
        use_liger_kernel=liger_kernels(place),
        bf16=place.mixed_precision == "bf16",
        fp16=place.mixed_precision == "fp16",
        use_cpu=place.device == "cpu",
        report_to=report_to,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=not is_main_process(),
    )


def _reduce_sum(value: float, device: str) -> float:
    if not _distributed():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if device == "cuda" else "cpu")
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


def _reduce_mean(value: float | None, device: str) -> float | None:
    return None if value is None else _reduce_sum(value, device) / world_size()


def run_training(
    trainer, cfg: TrainConfig, tokenizer, place: Placement, resume_from: str | None, plan: dict
) -> dict:
    """Train with `trainer` (a `MeasuredTrainer`), stop cleanly on signals, evaluate, save, and report."""
    out = Path(cfg.output_dir).expanduser()
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, cfg.identity())
    step_end = StepEndCallback(trainer, place.device)
    trainer.add_callback(step_end)
    tracker = EvalTracker(trainer, cfg, tokenizer, out, resume_from)
    trainer.add_callback(tracker)
    nan_guard = NonFiniteLossGuard(trainer, cfg.max_nan_steps, place.device)
    trainer.add_callback(nan_guard)

    if resume_from and is_main_process():
        print(f"resuming from {resume_from}", flush=True)
    step_end.install()
    started = time.perf_counter()
    try:
        train_or_save_on_oom(trainer, resume_from, place.device)
    finally:
        step_end.uninstall()
        close_progress_bar(trainer)
    train_seconds = time.perf_counter() - started
    nan_guard.raise_if_stopped(cfg, place)

    if step_end.signal_received is not None and trainer.state.global_step < trainer.state.max_steps:
        checkpoint = out / CHECKPOINTS / f"checkpoint-{trainer.state.global_step}"
        code = EXIT_SIGINT if step_end.signal_received == signal.SIGINT else EXIT_SIGTERM
        raise Interrupted(
            f"checkpoint saved at step {trainer.state.global_step} in {checkpoint}; "
            "run the same command again to resume",
            code,
        )

    eval_metrics = tracker.final_evaluation()
    eval_loss = eval_metrics.get("eval_loss")
    tokens = _reduce_sum(trainer.tokens_seen, place.device)
    samples = _reduce_sum(trainer.samples_seen, place.device)
    train_loss, first_loss = (
        _reduce_mean(trainer.window_loss(cfg.logging_steps, last), place.device) for last in (True, False)
    )
    peak = _reduce_mean(peak_memory_bytes(place.device), place.device)

    metrics = {
        "train_loss": train_loss,
        "initial_train_loss": first_loss,
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss),
        **trainer.extra_eval_metrics(eval_metrics),
        **run_metrics(cfg, place, plan, tokens=tokens, samples=samples, seconds=train_seconds, peak=peak),
        "global_step": trainer.state.global_step,
        "resumed_from": resume_from,
        "world_size": world_size(),
    }
    if is_main_process():
        with checkpoints.disk_full_is_one_line("final/ and metrics.json", out):
            final = tracker.save_final(trainer.accelerator.unwrap_model(trainer.model))
            metrics.update(tracker.metrics())
            metrics["final_dir"] = str(final)
            metrics["metrics_file"] = str(out / METRICS)
            write_json_atomic(out / METRICS, metrics)
        # loss.png beside it (skipped, with a note, when matplotlib is missing)
        write_loss_plot(trainer.state.log_history, out, window=cfg.logging_steps)
    if _distributed():
        torch.distributed.barrier()
    return metrics


def train(
    cfg: TrainConfig, tokenizer, data: PreparedData, place: Placement, resume_from: str | None, plan: dict
):
    """Supervised fine-tuning (LoRA, QLoRA or full) on the prepared examples."""
    if place.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    set_seed(cfg.seed)  # before the adapters are created: their initial weights come from the global RNG
    model = load_model(cfg, plan["model_config"], place)
    trainer = SFTPlaybookTrainer(
        model=model,
        args=training_arguments(cfg, place, Path(cfg.output_dir).expanduser()),
        train_dataset=token_batches(data.train, cfg.batch_tokens) if cfg.batch_tokens else data.train,
        eval_dataset=data.eval or None,
        data_collator=Collator(
            tokenizer.pad_token_id, cfg.packing, cfg.seq_length, flat_rows(cfg.attn_implementation)
        ),
        processing_class=tokenizer,
    )
    return run_training(trainer, cfg, tokenizer, place, resume_from, plan)
