"""The flow every playbook script shares: flags → config → tokenizer and data → plan → train → report."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from .allocator import return_freed_memory
from .cli import parse_config
from .config import TrainConfig
from .data import PreparedData, pack_rows, prepare_data
from .diskspace import check_disk, enforce_disk
from .errors import run_cli
from .evaluation import describe as describe_evaluation
from .guards import OutOfMemoryMidRun, out_of_memory_error
from .lock import run_lock
from .memory import estimate_run, micro_batch_tokens
from .model import Placement, check_trainable, count_parameters, load_model_config, load_tokenizer, placement
from .outputs import CHECKPOINTS, is_main_process
from .preflight import check_memory, enforce
from .report import plan_text, summary_table
from .resume import finished_run, prepare_output_dir
from .sharding import train_sharded
from .strategies import describe_export, describe_strategy, export_paths, run_export
from .train import train, world_size


def optimizer_steps(cfg: TrainConfig, train_examples: int, micro_batches: int = 0) -> int:
    """The number of optimizer steps the Trainer will take, computed the way it does. `micro_batches`: how many
    --batch_tokens micro-batches the data makes (the Trainer draws them one at a time)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    if micro_batches:
        batches = math.ceil(micro_batches / world_size())
    else:
        batches = math.ceil(train_examples / (cfg.batch_size * world_size()))
    per_epoch = max(batches // cfg.gradient_accumulation_steps, 1)
    return math.ceil(cfg.num_epochs * per_epoch)


def make_plan(cfg: TrainConfig, model_config, data: PreparedData, place: Placement) -> dict:
    total, trainable = count_parameters(cfg, model_config)
    lengths = data.train_stats.lengths
    micro_batches = len(pack_rows(lengths, cfg.batch_tokens)) if cfg.batch_tokens else 0
    steps = optimizer_steps(cfg, len(data.train), micro_batches)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world_size()
    if micro_batches:  # on average: the examples are fixed, their grouping into micro-batches too
        per_step = round(len(data.train) / micro_batches * cfg.gradient_accumulation_steps * world_size(), 1)
    examples = steps * per_step  # the examples the run draws; its largest micro-batch is among them
    batch_tokens = micro_batch_tokens(lengths, cfg.batch_size, cfg.packing, examples, cfg.batch_tokens)
    estimate = estimate_run(cfg, model_config, data.train_stats, place, total, trainable, examples)
    stats = data.train_stats
    return {
        "model_name": cfg.model_name,
        "model_config": model_config,
        "method": cfg.method,
        "dtype": str(place.dtype).removeprefix("torch."),
        "device": place.device,
        "parameters": total,
        "trainable_parameters": trainable,
        "dataset": data.source,
        "dataset_format": stats.format,
        "train_examples": len(data.train),
        "train_tokens": stats.tokens,
        "trainable_tokens": stats.trainable_tokens,
        "eval_examples": len(data.eval),
        "dropped": stats.dropped + (data.eval_stats.dropped if data.eval_stats else 0),
        "truncated": stats.truncated + (data.eval_stats.truncated if data.eval_stats else 0),
        "seq_length": cfg.seq_length,
        "steps": steps,
        "examples_per_step": per_step,
        "packing": cfg.packing,
        "batch_tokens": cfg.batch_tokens,
        "micro_batch_tokens": batch_tokens,
        "memory_estimate": estimate.as_dict(),
        "output_dir": cfg.output_dir,
        "evaluation": describe_evaluation(cfg, len(data.eval)),
        "strategy": describe_strategy(cfg),
        "export": describe_export(cfg) if cfg.export else None,
        "data": {
            "source": data.source,
            "format": stats.format,
            "train_examples": len(data.train),
            "eval_examples": len(data.eval),
            "train_tokens": stats.tokens,
            "trainable_tokens": stats.trainable_tokens,
            "truncated": stats.truncated,
            "dropped": stats.dropped,
        },
    }


def plan_then_train(cfg: TrainConfig, model_config, data: PreparedData, train_run, notes=None) -> dict | None:
    """The steps every recipe shares once its data is ready: plan, memory check, and (unless --dry_run)
    the output directory and `train_run(place, resume_from, plan) -> metrics`. `notes(plan_or_metrics)`
    adds recipe-specific lines to the printed plan and summary."""
    place = placement(cfg)
    plan = make_plan(cfg, model_config, data, place)
    memory = check_memory(cfg, plan, data.train_stats, place)
    plan["memory_check"] = memory.verdict()
    extra = notes or (lambda _: "")
    if is_main_process():
        print("\n".join(filter(None, [plan_text(plan), extra(None)])), flush=True)
    if cfg.dry_run:
        return None
    enforce(memory, cfg)  # before anything is written or loaded
    out = Path(cfg.output_dir).expanduser()
    with run_lock(out) if is_main_process() else contextlib.nullcontext():  # one run per directory
        resume_from = prepare_output_dir(cfg)
        enforce_disk(check_disk(cfg, plan, place.dtype.itemsize, out / CHECKPOINTS), cfg)
        if place.device == "cpu":
            return_freed_memory()
        try:
            metrics = train_run(place, resume_from, plan)
        except OutOfMemoryMidRun as exc:
            raise out_of_memory_error(exc, memory, cfg, plan, data.train_stats, place) from None
    if is_main_process():
        print("\n".join(filter(None, [summary_table(metrics), extra(metrics)])), flush=True)
    return metrics


def run(cfg: TrainConfig) -> dict | None:
    model_config = load_model_config(cfg.model_name)
    check_trainable(cfg, model_config)
    tokenizer = load_tokenizer(cfg.model_name)
    data = prepare_data(cfg, tokenizer)
    return plan_then_train(
        cfg,
        model_config,
        data,
        lambda place, resume_from, plan: (train_sharded if cfg.shard else train)(
            cfg, tokenizer, data, place, resume_from, plan
        ),
    )


def main(
    argv: list[str] | None = None,
    *,
    prog: str,
    description: str,
    defaults: dict,
    config_class: type = TrainConfig,
    runner=None,
) -> None:
    """Entry point of a playbook script: its defaults, then the shared flow (or `runner`), errors as one line."""

    def go():
        cfg = parse_config(
            argv, prog=prog, description=description, defaults=defaults, config_class=config_class
        )
        finished = None if cfg.dry_run else finished_run(cfg)
        if finished:  # before anything is loaded: nothing is recomputed
            print(finished, flush=True)
            missing = [str(p) for p in export_paths(cfg).values() if not p.exists()]
            if missing and is_main_process():  # the export failed or was stopped: only it runs again
                print(f"its export is missing ({', '.join(missing)}): exporting", flush=True)
                run_export(cfg)
            return
        metrics = (runner or run)(cfg)
        if metrics is not None and cfg.export and is_main_process():
            run_export(cfg)

    run_cli(go)
