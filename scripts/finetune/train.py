"""Training: the output directory's life cycle, the Trainer, signals, resume, and atomic final artefacts.

Layout of an output directory:
    run.json          the settings that identify the run (a different run is refused, the same one resumed)
    checkpoints/      checkpoint-N/ every --save_steps and on SIGINT/SIGTERM
    logs/             TensorBoard event files
    final/            the adapter or full model with its tokenizer, swapped in whole when training finishes
    metrics.json      loss, eval loss, perplexity, throughput, peak memory, configuration, versions
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .config import TrainConfig
from .data import Collator, PreparedData, real_tokens
from .errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted, UserError
from .model import Placement, load_model
from .report import peak_memory_bytes, perplexity, versions, write_json_atomic

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.json"
STEP_LOSS = "step_loss"  # per-step entries in the trainer's log history, which checkpoints keep


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# ---------------------------------------------------------------------------------------------------- output dir


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys[:4]) + (
        " …" if len(keys) > 4 else ""
    )


def prepare_output_dir(cfg: TrainConfig) -> str | None:
    """Refuse a directory that holds something else; return the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a directory")
    run_file = out / RUN_FILE
    occupied = out.is_dir() and any(out.iterdir())
    same_run = False
    if occupied and run_file.is_file():
        previous = json.loads(run_file.read_text())
        same_run = previous == cfg.identity()
        if not same_run and not cfg.overwrite_output_dir:
            raise UserError(
                f"--output_dir {out} holds a different run ({_describe_difference(previous, cfg.identity())}); "
                "choose another directory or pass --overwrite_output_dir to replace it"
            )
    elif occupied and not cfg.overwrite_output_dir:
        raise UserError(
            f"--output_dir {out} is not empty and holds no run of these scripts; "
            "choose another directory or pass --overwrite_output_dir"
        )

    if cfg.overwrite_output_dir and is_main_process():
        # Old checkpoints belong to another run (or the user asked to start over): never resume from them.
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        same_run = False

    if cfg.resume not in ("auto", "never"):
        checkpoint = Path(cfg.resume).expanduser()
        if not (checkpoint / "trainer_state.json").is_file():
            raise UserError(f"--resume {cfg.resume}: not a checkpoint directory (no trainer_state.json)")
        return str(checkpoint)
    if cfg.resume == "auto" and same_run and (out / CHECKPOINTS).is_dir():
        return get_last_checkpoint(str(out / CHECKPOINTS))
    return None


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete directory `tmp`; at no point is a partial model at `final`."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def save_final(model, tokenizer, out: Path) -> Path:
    final, tmp = out / FINAL, out / f".{FINAL}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # turned off for training; generation wants it back
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _swap_in(tmp, final)
    return final


# ---------------------------------------------------------------------------------------------------- trainer


class PlaybookTrainer(Trainer):
    """Trainer that counts real (non-padding) tokens and keeps each step's loss in the resumable log history."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = 0
        self.samples_seen = 0
        self._step_loss: dict[int, float] = {}

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens, samples = real_tokens(inputs)
        self.tokens_seen += tokens
        self.samples_seen += samples
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Micro-batch losses come back already scaled for accumulation, so their sum is the step's loss.
        step = self.state.global_step + 1
        self._step_loss[step] = self._step_loss.get(step, 0.0) + float(loss)
        return loss

    def record_step_loss(self, step: int) -> None:
        if step in self._step_loss:
            self.state.log_history.append({"step": step, STEP_LOSS: self._step_loss.pop(step)})

    def window_loss(self, window: int, last: bool = True) -> float | None:
        """Mean step loss over the first or last `window` steps of the run (resumed runs included)."""
        losses = [e[STEP_LOSS] for e in self.state.log_history if STEP_LOSS in e]
        losses = losses[-window:] if last else losses[:window]
        return sum(losses) / len(losses) if losses else None


class StepEndCallback(TrainerCallback):
    """Records step losses, logs the last step, and turns SIGINT/SIGTERM into save-and-stop."""

    def __init__(self, trainer: PlaybookTrainer, device: str):
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
        per_device_train_batch_size=cfg.batch_size,
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
        eval_strategy="no",  # evaluated once at the end
        seed=cfg.seed,
        data_seed=cfg.seed,
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


def train(
    cfg: TrainConfig, tokenizer, data: PreparedData, place: Placement, resume_from: str | None, plan: dict
):
    out = Path(cfg.output_dir).expanduser()
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, cfg.identity())

    if place.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load_model(cfg, plan["model_config"], place)
    trainer = PlaybookTrainer(
        model=model,
        args=training_arguments(cfg, place, out),
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        data_collator=Collator(tokenizer.pad_token_id, cfg.packing),
        processing_class=tokenizer,
    )
    step_end = StepEndCallback(trainer, place.device)
    trainer.add_callback(step_end)

    if resume_from and is_main_process():
        print(f"resuming from {resume_from}", flush=True)
    step_end.install()
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        step_end.uninstall()
    train_seconds = time.perf_counter() - started

    if step_end.signal_received is not None and trainer.state.global_step < trainer.state.max_steps:
        checkpoint = out / CHECKPOINTS / f"checkpoint-{trainer.state.global_step}"
        code = EXIT_SIGINT if step_end.signal_received == signal.SIGINT else EXIT_SIGTERM
        raise Interrupted(
            f"checkpoint saved at step {trainer.state.global_step} in {checkpoint}; "
            "run the same command again to resume",
            code,
        )

    eval_loss = trainer.evaluate()["eval_loss"] if data.eval else None
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
        "tokens_per_second": tokens / train_seconds if train_seconds > 0 else None,
        "samples_per_second": samples / train_seconds if train_seconds > 0 else None,
        "train_tokens": int(tokens),
        "train_samples": int(samples),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "cuda max allocated" if place.device == "cuda" else "process peak RSS",
        "estimated_peak_memory_bytes": plan["memory_estimate"]["total"],
        "wall_time_seconds": train_seconds,
        "global_step": trainer.state.global_step,
        "resumed_from": resume_from,
        "world_size": world_size(),
        "device": place.device,
        "dtype": str(place.dtype).removeprefix("torch."),
        "config": {k: v for k, v in vars(cfg).items()},
        "data": plan["data"],
        "versions": versions(),
    }
    if is_main_process():
        final = save_final(trainer.accelerator.unwrap_model(trainer.model), tokenizer, out)
        metrics["final_dir"] = str(final)
        metrics["metrics_file"] = str(out / METRICS)
        write_json_atomic(out / METRICS, metrics)
    if _distributed():
        torch.distributed.barrier()
    return metrics
