"""Disk-space pre-flight: will the run's checkpoints and final model fit under --output_dir?

Like the memory pre-flight, before anything is loaded. What a run writes, from the plan:
- a checkpoint: the trained weights (a LoRA adapter in fp32, or every weight in the model's dtype), AdamW's two
  moments for each of them (fp32 for adapters, the weights' dtype for full fine-tuning), and the tokenizer;
  an 8B full fine-tune in bf16 is ~48 GB, in fp32 ~96 GB;
- how many exist at once: up to --save_total_limit, plus the new one written before the oldest is removed;
- final/: the weights and the tokenizer once more, and as much again for best/ with --load_best_model_at_end;
- a strategy's export: the merged model (every weight, in its dtype) and the GGUF file (2 bytes a weight for
  f16/bf16, 34 bytes per 32 for q8_0).
A run whose final model does not fit is refused (--force trains anyway); one where only the final model fits
gets a warning, since its checkpoints will fail.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .errors import UserError
from .report import human_bytes

FP32 = 4
# A Llama 3 tokenizer as saved beside the weights (tokenizer.json, its config and chat template); used when the
# model is not a local directory whose tokenizer files can be measured.
TOKENIZER_BYTES = 17 * 1024**2
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "chat_template.jinja", "*.model")
SMALL_FILES_BYTES = 64 * 1024  # trainer_state.json, scheduler, RNG states, configs
MERGED_WIDTH = {"bfloat16": 2, "float16": 2, "float32": 4}
GGUF_WIDTH = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 weights and one fp16 scale per block


@dataclass
class DiskCheck:
    free: int
    checkpoint: int
    checkpoints: int  # how many may exist at once
    final: int
    already_used: int  # by this run's checkpoints, freed as new ones replace them
    after: int = 0  # best/ and the export, written beside final/

    @property
    def outputs(self) -> int:
        return self.final + self.after

    @property
    def needed(self) -> int:
        return max(self.checkpoint * self.checkpoints - self.already_used, 0) + self.outputs


def tokenizer_bytes(model_name: str) -> int:
    for directory in (Path(model_name).expanduser(), Path(model_name).expanduser() / "final"):
        if directory.is_dir():
            found = {p for pattern in TOKENIZER_FILES for p in directory.glob(pattern) if p.is_file()}
            if found:
                return sum(p.stat().st_size for p in found)
    return TOKENIZER_BYTES


def estimate(cfg: TrainConfig, plan: dict, width: int) -> tuple[int, int]:
    """(one checkpoint, final/) in bytes, for parameters stored `width` bytes wide."""
    total, trainable = plan["parameters"], plan["trainable_parameters"]
    tokenizer = tokenizer_bytes(cfg.model_name)
    if cfg.uses_lora:
        weights, moments = trainable * FP32, trainable * FP32 * 2
    else:
        weights, moments = total * width, trainable * width * 2
    return weights + moments + tokenizer + SMALL_FILES_BYTES, weights + tokenizer


def after_training(cfg: TrainConfig, plan: dict, final: int) -> int:
    """Bytes written beside final/: best/ (--load_best_model_at_end) and the strategy's export."""
    total, spec = plan["parameters"], cfg.export
    extra = final if cfg.load_best_model_at_end else 0
    if cfg.uses_lora and (spec.get("merge") or spec.get("gguf")):
        extra += total * MERGED_WIDTH[spec.get("dtype", "bfloat16")] + tokenizer_bytes(cfg.model_name)
    if spec.get("gguf"):
        extra += int(total * GGUF_WIDTH[spec["gguf"]])
    return extra


def _existing(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _free_under(path: Path) -> int:
    while not path.exists():  # the output directory may not exist yet: measure where it will be
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(cfg: TrainConfig, plan: dict, width: int, checkpoints_dir: Path) -> DiskCheck:
    checkpoint, final = estimate(cfg, plan, width)
    saves = plan["steps"] // cfg.save_steps + 1  # one more on an interruption
    at_once = min(cfg.save_total_limit + 1, saves)
    free = _free_under(Path(cfg.output_dir).expanduser())
    after = after_training(cfg, plan, final)
    return DiskCheck(free, checkpoint, at_once, final, _existing(checkpoints_dir), after)


def enforce_disk(check: DiskCheck, cfg: TrainConfig) -> None:
    """Refuse a run whose final model will not fit; warn when its checkpoints will not."""
    out = Path(cfg.output_dir).expanduser()
    written = (
        f"~{human_bytes(check.needed)} ({check.checkpoints} checkpoint(s) of ~{human_bytes(check.checkpoint)} "
        f"and final/ of ~{human_bytes(check.final)}"
        + (f", best/ and the export ~{human_bytes(check.after)}" if check.after else "")
        + ")"
    )
    if check.needed <= check.free:
        return
    if check.outputs <= check.free:
        print(
            f"warning: {human_bytes(check.free)} free under {out}, the run writes {written}: the final model "
            "fits but its checkpoints will not; free space, lower --save_total_limit or raise --save_steps",
            flush=True,
        )
        return
    if cfg.force:
        print(
            f"warning: --force given, training although {out} has {human_bytes(check.free)} free", flush=True
        )
        return
    raise UserError(
        f"not enough disk space under {out}: {human_bytes(check.free)} free, the run writes {written}; "
        "free space or choose another --output_dir; --force trains anyway"
    )
