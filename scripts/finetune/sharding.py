"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`): each rank holds 1/N of every weight.

The model is built on the meta device, wrapped with LoRA, and sharded per decoder layer; only then does each rank
read its own rows of every weight from the safetensors files, so no rank ever holds the whole model. A decoder
layer's weights are gathered for its forward and backward pass and freed again.

Why a loop of its own rather than the Trainer: the Trainer's `fsdp=` option silently runs plain DDP on the CPU
(every rank holds the whole model), so the sharded path could not be tested without a GPU. The loop reuses the
shared pieces: the prepared data and its `Collator`, logits only where loss is (`loss_positions_only`), the
signal handling (`StepEndCallback`), the output directory's life cycle and the report. What it does the same way
as the Trainer-based scripts: flags, data, outputs (`final/`, `checkpoints/checkpoint-N/`, `metrics.json`),
SIGINT/SIGTERM save a checkpoint and the same command resumes, metrics (tokens/s summed over ranks).

The batches: every optimizer step draws `batch_size × gradient_accumulation_steps × ranks` examples from a seeded
stream of epochs; rank r takes its slice. The loss is normalised by the loss tokens of the whole step on every
rank, so N ranks follow the same trajectory as one process given the same global batch.

Checkpoints and the final model are gathered to rank 0 and written by it alone: they need no shared filesystem
(two machines each with their own disk) and reload on any number of ranks. Rank 0 broadcasts a checkpoint's state
to the others when resuming.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoints
from .config import TrainConfig
from .data import IGNORE_INDEX, Collator, PreparedData, real_tokens
from .errors import EXIT_FAULT, EXIT_SIGINT, EXIT_SIGTERM, Interrupted, UserError
from .guards import OutOfMemoryMidRun, is_out_of_memory, non_finite_loss_error, save_last_step
from .model import Placement, hub_failure, lora_config
from .outputs import CHECKPOINTS, FINAL, METRICS, RUN_FILE, is_main_process, replace_dir
from .plot import write_loss_plot
from .report import peak_memory_bytes, perplexity, run_metrics, write_json_atomic
from .train import STEP_LOSS, StepEndCallback, loss_positions_only

STRATEGY = "fsdp2"
STATE_FILE = "trainer_state.json"  # the name resume.prepare_output_dir looks for in a checkpoint
WEIGHTS_FILE = "training_state.pt"  # trainable weights and optimizer state, gathered (rank-independent)
MAX_GRAD_NORM = 1.0  # the Trainer's default, which the other scripts use


# ---------------------------------------------------------------------------------------------------- processes


@contextlib.contextmanager
def process_group(place: Placement):
    """(rank, world size) of a process group: torchrun's, or a group of one for `python script.py`. A group
    started here is ended here, so a caller (a test, a notebook) can train again in the same process."""
    if place.device == "cuda":
        torch.cuda.set_device(place.local_rank)
    started = not dist.is_initialized()
    if started:
        backend = "nccl" if place.device == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if started:
            dist.destroy_process_group()


def _device(place: Placement) -> torch.device:
    return torch.device(f"cuda:{place.local_rank}" if place.device == "cuda" else "cpu")


def all_sum(value: float, device: torch.device) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def all_gather_ints(value: int, device: torch.device) -> list[int]:
    tensor = torch.tensor([int(value)], dtype=torch.int64, device=device)
    out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor)
    return [int(t.item()) for t in out]


def broadcast_state(payload):
    """Rank 0's nested dict of tensors (and plain values) on every rank, one tensor at a time: the layout goes as
    one pickled object, the tensors through the process group (NCCL or gloo), not through pickle."""
    tensors = []

    def strip(value):
        if torch.is_tensor(value):
            tensors.append(value)
            return ("__tensor__", len(tensors) - 1, tuple(value.shape), value.dtype)
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(strip(v) for v in value)
        return value

    layout = [strip(payload) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(layout, src=0)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None

    def fill(value):
        if isinstance(value, tuple) and len(value) == 4 and value[0] == "__tensor__":
            _, index, shape, dtype = value
            tensor = tensors[index] if dist.get_rank() == 0 else torch.empty(shape, dtype=dtype)
            moved = tensor.to(device) if device is not None else tensor.contiguous()
            dist.broadcast(moved, src=0)
            return moved.cpu()
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(fill(v) for v in value)
        return value

    return fill(layout[0])


# ---------------------------------------------------------------------------------------------------- model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: transformers' `_no_split_modules` classes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"--shard: cannot find the decoder layers of {type(base).__name__} to shard")
    return layers


def checkpoint_key(name: str) -> str:
    """The safetensors key of a parameter of the (possibly LoRA-wrapped) model."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def safetensors_files(name: str) -> dict[str, Path]:
    """Each weight's file: from a local directory, or the hub's cache (downloading the safetensors only)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
        except Exception as exc:
            raise hub_failure(name, exc) from None
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"--model_name {name}: --shard reads safetensors weights and {path} has none")
    where = {}
    for file in files:
        with safe_open(file, "pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    return where


def _rows(param) -> tuple[torch.Tensor, int]:
    """The local tensor of a parameter sharded on dim 0 (FSDP2's layout) and the first global row it holds."""
    local = param.to_local()
    global_rows = param.shape[0] if param.dim() else 1
    chunk = math.ceil(global_rows / dist.get_world_size())
    return local, min(dist.get_rank() * chunk, global_rows)


def load_own_shards(model, model_name: str, seed: int) -> None:
    """Fill each rank's shards: base weights from the safetensors files (only the rows this rank holds are read),
    new LoRA weights initialised as peft does (A Kaiming-uniform, B zero) from a seed, identically for any N."""
    from safetensors import safe_open

    files = safetensors_files(model_name)
    handles = {}
    try:
        for index, (name, param) in enumerate(model.named_parameters()):
            local, start = _rows(param)
            rows = slice(start, start + (local.shape[0] if local.dim() else 1))
            if "lora_" in name:
                full = torch.zeros(param.shape, dtype=torch.float32)
                if ".lora_A." in name:
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
                    torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
                local.copy_(full[rows])
                continue
            key = checkpoint_key(name)
            if key not in files:
                raise UserError(f"--model_name {model_name}: the weights have no {key}")
            file = files[key]
            if file not in handles:
                handles[file] = safe_open(file, "pt")
            piece = handles[file].get_slice(key)
            local.copy_(piece[rows] if local.dim() else piece[:])
    finally:
        handles.clear()


def build_sharded_model(cfg: TrainConfig, model_config, place: Placement, device: torch.device):
    """The model ready to train, sharded per decoder layer, each rank holding only its own shards."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    # Parameters on the meta device (no memory); buffers computed at construction (rotary frequencies, not in
    # the weights files) real, and kept aside while `to_empty` allocates the shards.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            model_config, dtype=place.dtype, attn_implementation=cfg.attn_implementation
        )
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.uses_lora:
            from peft import get_peft_model

            try:
                model = get_peft_model(model, lora_config(cfg))
            except ValueError as exc:
                raise UserError(
                    f"--target_modules {cfg.target_modules}: {str(exc).splitlines()[0]}"
                ) from None
    model.config.use_cache = False
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device=device)
    for name, value in buffers.items():
        module_name, _, buffer_name = name.rpartition(".")
        model.get_submodule(module_name)._buffers[buffer_name] = value.to(device)
    with torch.no_grad():
        load_own_shards(model, cfg.model_name, cfg.seed)
    return model


def local_parameter_counts(model) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model), read from the shards themselves."""
    held = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return held, total


# ---------------------------------------------------------------------------------------------------- batches


def step_examples(step: int, per_step: int, examples: int, seed: int) -> list[int]:
    """The indices of the examples of optimizer step `step` (0-based): a seeded permutation per epoch, epochs
    back to back, so the same step draws the same examples whatever the number of ranks or a resume."""
    start, out = step * per_step, []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), examples)
        order = torch.randperm(examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.extend(order[offset : offset + per_step - len(out)])
    return out


def loss_token_count(batch: dict) -> int:
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def summed_loss(model, batch: dict, device: torch.device) -> torch.Tensor:
    """The summed cross-entropy of a batch's loss tokens (logits computed only where loss is)."""
    inputs = {k: v.to(device) for k, v in loss_positions_only(batch).items() if torch.is_tensor(v)}
    labels = inputs.pop("labels")
    targets = inputs.pop("shift_labels", None)
    if targets is None:
        targets = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    logits = model(**inputs, use_cache=False).logits.float()
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


# ---------------------------------------------------------------------------------------------------- state


@dataclass
class LoopState:
    global_step: int = 0
    log_history: list[dict] = field(default_factory=list)

    def window_loss(self, window: int, last: bool = True) -> float | None:
        losses = [e[STEP_LOSS] for e in self.log_history if STEP_LOSS in e]
        losses = losses[-window:] if last else losses[:window]
        return sum(losses) / len(losses) if losses else None


def _options(cfg: TrainConfig, **kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=cfg.uses_lora, **kwargs)


def rank_zero_writes(what: str, out: Path, partial: Path, device, write: Callable[[], None]) -> None:
    """`write()` on rank 0, the only writer. A full disk there removes its `partial` output and becomes one line
    on every rank (the others learn of it through a collective, so no rank waits forever)."""
    message = None
    if is_main_process():
        try:
            write()
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if not checkpoints.disk_full_at(exc, out):
                raise
            kept = checkpoints.kept_checkpoint(out / CHECKPOINTS)
            message = checkpoints.disk_full_message(what, out, kept)
    if all_sum(float(message is not None), device):
        raise UserError(message or f"disk full on rank 0 while saving {what}", EXIT_FAULT, every_rank=True)


def save_checkpoint(
    model, optimizer, scheduler, state: LoopState, cfg: TrainConfig, out: Path, device
) -> Path:
    """checkpoints/checkpoint-N: gathered to rank 0 and written by it, swapped in whole; the oldest beyond
    --save_total_limit removed."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(cfg, cpu_offload=True))
    target = out / CHECKPOINTS / f"checkpoint-{state.global_step}"
    partial = target.with_name(f".{target.name}.partial")

    def write() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        torch.save({"model": model_state, "optimizer": optimizer_state}, partial / WEIGHTS_FILE)
        write_json_atomic(
            partial / STATE_FILE,
            {
                "global_step": state.global_step,
                "log_history": state.log_history,
                "scheduler": scheduler.state_dict(),
                "world_size": dist.get_world_size(),
                "sharding": STRATEGY,
            },
        )
        checkpoints.seal(partial, state.global_step)  # the marker resume looks for: a complete checkpoint
        replace_dir(partial, target)
        done = sorted(target.parent.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in done[: -cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    rank_zero_writes(target.name, out, partial, device, write)
    return target


def load_checkpoint(model, optimizer, scheduler, cfg: TrainConfig, checkpoint: Path) -> LoopState:
    """Rank 0 reads the checkpoint and broadcasts it; every rank keeps its own shards of it."""
    import json

    from torch.distributed.checkpoint.state_dict import set_state_dict

    if not (checkpoint / WEIGHTS_FILE).is_file():
        raise UserError(
            f"--resume {checkpoint}: not a checkpoint of a sharded run (no {WEIGHTS_FILE}); "
            "resume it without --shard, or pass --resume never"
        )
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    payload = None
    if is_main_process():
        payload = torch.load(checkpoint / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    payload = broadcast_state(payload)  # only rank 0 needs the file: no shared filesystem
    set_state_dict(
        model,
        optimizer,
        model_state_dict=payload["model"],
        optim_state_dict=payload["optimizer"],
        options=_options(cfg, strict=not cfg.uses_lora),
    )
    scheduler.load_state_dict(saved["scheduler"])
    return LoopState(saved["global_step"], saved["log_history"])


def save_final_sharded(model, tokenizer, cfg: TrainConfig, out: Path, device) -> Path:
    """final/: the adapter (or full model) gathered once and written by rank 0 in its usual format, swapped in
    whole; a crash on any rank before the swap leaves no final/ (and no half of one)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cfg, cpu_offload=True))
    final, partial = out / FINAL, out / f".{FINAL}.partial"

    def write() -> None:
        shutil.rmtree(partial, ignore_errors=True)
        model.config.use_cache = True
        if cfg.uses_lora:
            model.save_pretrained(partial, state_dict=state, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            partial.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in state.items()}, partial / "model.safetensors",
                      metadata={"format": "pt"})  # fmt: skip
            model.config.save_pretrained(partial)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        replace_dir(partial, final)

    rank_zero_writes(f"{FINAL}/", out, partial, device, write)
    return final


# ---------------------------------------------------------------------------------------------------- loop


def _scheduler(cfg: TrainConfig, optimizer, steps: int):
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * steps)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def evaluate_sharded(
    model, examples: list[dict], collate: Collator, cfg: TrainConfig, device
) -> float | None:
    """Token-weighted eval loss; every rank runs the same number of forward passes (they hold collectives)."""
    if not examples:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    per_round = cfg.batch_size * world
    total, count = torch.zeros((), dtype=torch.float64), 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), per_round):
            mine = examples[start + rank * cfg.batch_size : start + (rank + 1) * cfg.batch_size]
            batch = collate(mine or examples[:1])  # an idle rank still takes part, its result unused
            loss = summed_loss(model, batch, device)
            if mine:
                total += loss.double().cpu()
                count += loss_token_count(batch)
    model.train()
    tokens = all_sum(count, device)
    return all_sum(float(total), device) / tokens if tokens else None


def train_sharded(
    cfg: TrainConfig, tokenizer, data: PreparedData, place: Placement, resume_from: str | None, plan: dict
) -> dict:
    """Train with every weight sharded across the ranks; the same outputs and metrics as `train.run_training`."""
    with process_group(place) as (rank, world):
        return _train(cfg, tokenizer, data, place, resume_from, plan, rank, world)


def _train(cfg, tokenizer, data, place, resume_from, plan, rank: int, world: int) -> dict:
    device = _device(place)
    out = Path(cfg.output_dir).expanduser()
    if place.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.seed)  # dropout; the new adapters are seeded on their own
    model = build_sharded_model(cfg, plan["model_config"], place, device)
    held, total_params = local_parameter_counts(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps = plan["steps"]
    scheduler = _scheduler(cfg, optimizer, steps)
    state = LoopState()
    if resume_from:
        state = load_checkpoint(model, optimizer, scheduler, cfg, Path(resume_from))
        if is_main_process():
            print(f"resuming from {resume_from}", flush=True)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, cfg.identity())

    collate = Collator(tokenizer.pad_token_id, cfg.packing)
    per_rank = cfg.batch_size * cfg.gradient_accumulation_steps
    signals = StepEndCallback(None, place.device)  # its save-and-stop signal handling, agreed by every rank
    tokens_seen = samples_seen = 0
    bad_steps: list[int] = []  # steps whose loss was NaN or infinite

    def save() -> Path:
        return save_checkpoint(model, optimizer, scheduler, state, cfg, out, device)

    model.train()
    signals.install()
    started = time.perf_counter()
    try:
        while state.global_step < steps:
            chosen = step_examples(state.global_step, per_rank * world, len(data.train), cfg.seed)
            mine = chosen[rank * per_rank : (rank + 1) * per_rank]
            batches = [
                collate([data.train[i] for i in mine[m * cfg.batch_size : (m + 1) * cfg.batch_size]])
                for m in range(cfg.gradient_accumulation_steps)
            ]
            step_tokens = max(all_sum(sum(map(loss_token_count, batches)), device), 1.0)
            step_loss = torch.zeros((), dtype=torch.float64)
            out_of_memory = False
            try:
                for batch in batches:
                    tokens, samples = real_tokens(batch)
                    tokens_seen, samples_seen = tokens_seen + tokens, samples_seen + samples
                    loss = summed_loss(model, batch, device)
                    # FSDP averages gradients over the ranks; the loss is the mean over the step's tokens.
                    (loss * (world / step_tokens)).backward()
                    step_loss += loss.detach().double().cpu()
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc):
                    raise
                out_of_memory = True
            if (
                out_of_memory
            ):  # outside the except block: the failed step's tensors are freed with the exception
                peak = peak_memory_bytes(place.device)
                kept = save_last_step(model, state.global_step, out / CHECKPOINTS, save, world > 1)
                raise OutOfMemoryMidRun(state.global_step + 1, kept, peak)
            loss_value = all_sum(float(step_loss), device) / step_tokens  # the same on every rank
            if math.isfinite(loss_value):
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                optimizer.step()
            else:  # the update is dropped; the run stops after --max_nan_steps such steps
                bad_steps.append(state.global_step + 1)
                if len(bad_steps) > cfg.max_nan_steps:
                    newest = checkpoints.newest_good(out / CHECKPOINTS)
                    rows = f"training examples {', '.join(map(str, sorted(chosen)))} (0-based, after the eval split)"
                    raise non_finite_loss_error(
                        loss_value, bad_steps[-1], len(bad_steps) - 1, cfg, place, newest, rows
                    )
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.log_history.append({"step": state.global_step, STEP_LOSS: loss_value})
            if state.global_step % cfg.logging_steps == 0 or state.global_step == steps:
                entry = {
                    "loss": round(state.window_loss(cfg.logging_steps), 6),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "step": state.global_step,
                }
                state.log_history.append(entry)
                if is_main_process():
                    print(entry, flush=True)
            stop = signals._stop_requested()
            if stop or (state.global_step % cfg.save_steps == 0 and state.global_step < steps):
                checkpoint = save()
            if stop and state.global_step < steps:
                code = EXIT_SIGINT if signals.signal_received == signal.SIGINT else EXIT_SIGTERM
                raise Interrupted(
                    f"checkpoint saved at step {state.global_step} in {checkpoint}; "
                    "run the same command again to resume",
                    code,
                )
    finally:
        signals.uninstall()
    train_seconds = time.perf_counter() - started

    eval_loss = evaluate_sharded(model, data.eval, collate, cfg, device)
    tokens, samples = all_sum(tokens_seen, device), all_sum(samples_seen, device)
    peaks = all_gather_ints(peak_memory_bytes(place.device), device)
    held_per_rank = all_gather_ints(held, device)
    metrics = {
        "train_loss": state.window_loss(cfg.logging_steps),
        "initial_train_loss": state.window_loss(cfg.logging_steps, last=False),
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss),
        **run_metrics(
            cfg, place, plan, tokens=tokens, samples=samples, seconds=train_seconds, peak=max(peaks)
        ),
        "peak_memory_bytes_per_rank": peaks,
        "global_step": state.global_step,
        "resumed_from": resume_from,
        "world_size": world,
        "sharding": {"strategy": STRATEGY, "parameters": total_params, "parameters_per_rank": held_per_rank},
        "step_losses": [e[STEP_LOSS] for e in state.log_history if STEP_LOSS in e],
    }
    final = save_final_sharded(model, tokenizer, cfg, out, device)
    if is_main_process():
        metrics["final_dir"] = str(final)
        metrics["metrics_file"] = str(out / METRICS)
        if eval_loss is not None:
            state.log_history.append({"step": state.global_step, "eval_loss": eval_loss})
        write_json_atomic(out / METRICS, metrics)
        write_loss_plot(state.log_history, out, window=cfg.logging_steps)
    dist.barrier()
    return metrics
