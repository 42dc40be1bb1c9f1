"""Command line and YAML → one validated `TrainConfig`.

Every field of `TrainConfig` is a flag (`--seq_length`, also `--seq-length`); booleans get a `--no_` twin.
A playbook script only changes defaults. Precedence: playbook defaults < `--config FILE.yaml` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

DEFAULT_DATASET = "tatsu-lab/alpaca"
DEFAULT_DATASET_ROWS = 512
DATASET_FORMATS = ("auto", "alpaca", "sharegpt", "messages", "text")
DTYPES = ("auto", "bfloat16", "float16", "float32")
METHODS = ("lora", "qlora", "full")


def option(help: str, **kwargs):
    return field(metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    """One run's settings. The defaults are the NVIDIA DGX Spark playbook's (LoRA r 8, alpha 16, dropout 0 on
    all linear layers, lr 1e-4, batch 8, 2048 tokens, one epoch), so its documented commands keep working;
    each playbook script overrides only what differs (model, method, ...)."""

    # Set by the playbook script, not a flag: which weights are trained and how the base is loaded.
    method: str = field(default="lora", metadata={"flag": False})

    # Model
    model_name: str = option("hub id or local directory of the base model", default="")
    dtype: str = option(
        "weights and compute dtype; auto = bfloat16 on GPUs that support it, float32 on CPU",
        default="auto",
    )
    attn_implementation: str = option("attention kernel: sdpa, eager, flash_attention_2, ...", default="sdpa")
    gradient_checkpointing: bool = option(
        "recompute activations in the backward pass to save memory", default=False
    )
    shard: bool = option(
        "shard every weight across the ranks with FSDP2 (torchrun across GPUs or machines); "
        "off: each rank holds the whole model (DDP)",
        default=False,
    )

    # LoRA (ignored by full fine-tuning)
    lora_rank: int = option("LoRA rank r", default=8)
    lora_alpha: int = option("LoRA scaling alpha", default=16)
    lora_dropout: float = option("dropout on the LoRA input", default=0.0)
    target_modules: str = option(
        "modules that get adapters: all-linear, or a comma-separated list like q_proj,v_proj",
        default="all-linear",
    )

    # Data
    dataset: str = option(
        f"hub dataset id, or a local .jsonl/.json/.parquet/.csv file or directory of them "
        f"(default: the first {DEFAULT_DATASET_ROWS} rows of {DEFAULT_DATASET})",
        default="",
    )
    dataset_format: str = option(
        f"one of {', '.join(DATASET_FORMATS)}; auto detects it from the columns", default="auto"
    )
    dataset_size: int | None = option("use only the first N rows (default: all)", default=None)
    eval_split: float = option("fraction of rows held out for evaluation; 0 = no evaluation", default=0.05)
    eval_dataset: str = option(
        "separate evaluation dataset (same forms as --dataset); replaces --eval_split", default=""
    )
    seq_length: int = option("maximum tokens per example; longer examples are truncated", default=2048)
    packing: bool = option(
        "padding-free packing: each batch is one sequence with per-example positions", default=True
    )
    train_on_prompt: bool = option(
        "compute the loss on prompt tokens too (default: responses only)", default=False
    )

    # Optimisation
    batch_size: int = option("examples per device per step", default=8)
    gradient_accumulation_steps: int = option("micro-batches accumulated into one optimizer step", default=1)
    learning_rate: float = option("peak learning rate", default=1e-4)
    lr_scheduler_type: str = option("learning-rate schedule (transformers' names)", default="linear")
    warmup_ratio: float = option("fraction of steps spent warming up the learning rate", default=0.0)
    weight_decay: float = option("AdamW weight decay", default=0.0)
    num_epochs: float = option("epochs over the training data (fractions allowed)", default=1.0)
    max_steps: int = option("stop after this many optimizer steps; -1 = run --num_epochs", default=-1)
    seed: int = option("seed for weights of new adapters, data order and the eval split", default=42)

    # Outputs
    output_dir: str = option("where the model, checkpoints, logs and metrics.json go", default="")
    overwrite_output_dir: bool = option("reuse an output directory that holds a different run", default=False)
    save_steps: int = option("write a checkpoint every N steps", default=200)
    save_total_limit: int = option("keep at most N checkpoints", default=2)
    resume: str = option(
        "auto = continue from the newest checkpoint of this run if there is one; never; or a checkpoint path",
        default="auto",
    )
    logging_steps: int = option("log the training loss every N steps", default=10)
    log_dir: str = option("TensorBoard directory (default: OUTPUT_DIR/logs)", default="")

    # Control
    config: str = option("YAML file with any of these keys; flags given on the command line win", default="")
    dry_run: bool = option(
        "load config, tokenizer and data, print the plan, and exit without training", default=False
    )
    force: bool = option(
        "train even when the memory estimate says the run will not fit in the available memory", default=False
    )

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    @property
    def uses_default_dataset(self) -> bool:
        return not self.dataset

    def validate(self) -> None:
        """Checks a subclass adds to `validate` below (which every config gets)."""

    def identity(self) -> dict:
        """The settings that make two invocations the same run (for resuming and for refusing a foreign output)."""
        skip = {
            "output_dir",
            "overwrite_output_dir",
            "resume",
            "logging_steps",
            "log_dir",
            "config",
            "dry_run",
            "force",
            "save_steps",
            "save_total_limit",
            "max_steps",
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def flag_fields(config_class: type = TrainConfig) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_class) if f.metadata.get("flag", True)]


def _field_types(config_class: type) -> dict[str, type]:
    """Each field's type, `int | None` read as int (the dataclasses use `from __future__ import annotations`)."""

    def base(hint) -> type:
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            return next(a for a in typing.get_args(hint) if a is not type(None))
        return hint

    return {name: base(hint) for name, hint in typing.get_type_hints(config_class).items()}


def _spellings(name: str, prefix: str = "") -> list[str]:
    """`--seq_length` and `--seq-length` (and `--no_packing`, `--no-packing`)."""
    snake = f"--{prefix and prefix + '_'}{name}"
    dashed = f"--{prefix and prefix + '-'}{name.replace('_', '-')}"
    return list(dict.fromkeys([snake, dashed]))


def _build_parser(prog: str, description: str, defaults: dict, config_class: type) -> argparse.ArgumentParser:
    # SUPPRESS as every flag's default tells given flags apart from defaults, which YAML precedence needs.
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    # Let `--learning_rate -1e-4` reach validation (a clear message) instead of argparse's "expected one argument".
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    types_ = _field_types(config_class)
    for f in flag_fields(config_class):
        default = defaults.get(f.name, f.default)
        if types_[f.name] is bool:
            state = "on" if default else "off"
            help_text = f"{f.metadata['help']} (default: {state}; --no_{f.name} turns it off)"
            parser.add_argument(*_spellings(f.name), dest=f.name, action="store_true", help=help_text)
            parser.add_argument(
                *_spellings(f.name, "no"), dest=f.name, action="store_false", help=argparse.SUPPRESS
            )
        else:
            shown = "none" if default in ("", None) else default
            help_text = f"{f.metadata['help']} (default: {shown})"
            parser.add_argument(
                *_spellings(f.name), dest=f.name, type=types_[f.name], metavar=f.name.upper(), help=help_text
            )
    return parser


def _read_yaml(path: str, config_class: type) -> dict:
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values")
    known = {f.name for f in flag_fields(config_class)} - {"config"}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown)}; see --help for the valid names")
    types_ = _field_types(config_class)
    for key, value in data.items():
        expected = types_[key]
        if value is None and key in ("dataset_size",):
            continue
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            data[key] = float(value)
        elif expected is str and isinstance(value, list) and key == "target_modules":
            data[key] = ",".join(map(str, value))
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UserError(f"{path}: {key} should be {expected.__name__}, got {value!r}")
    return data


def parse_config(
    argv: list[str] | None, *, prog: str, description: str, defaults: dict, config_class: type = TrainConfig
):
    """Parse flags (and an optional YAML file) on top of a playbook's defaults, then validate.

    `config_class` is TrainConfig or a subclass adding fields (and checks, in its `validate` method).
    """
    parser = _build_parser(prog, description, defaults, config_class)
    given = vars(parser.parse_args(argv))
    values = dict(defaults)
    if given.get("config"):
        values.update(_read_yaml(given["config"], config_class))
    values.update(given)
    cfg = config_class(**values)
    validate(cfg)
    cfg.validate()
    return cfg


def validate(cfg: TrainConfig) -> None:
    def bad(flag: str, why: str) -> UserError:
        return UserError(f"--{flag} {getattr(cfg, flag)!r}: {why}")

    if not cfg.model_name:
        raise UserError("--model_name is required")
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; expected one of {', '.join(METHODS)}")
    if cfg.dtype not in DTYPES:
        raise bad("dtype", f"expected one of {', '.join(DTYPES)}")
    formats = getattr(cfg, "dataset_formats", DATASET_FORMATS)  # a subclass may read other formats
    if cfg.dataset_format not in formats:
        raise bad("dataset_format", f"expected one of {', '.join(formats)}")
    for name in ("batch_size", "gradient_accumulation_steps", "seq_length", "save_steps", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise bad(name, "must be at least 1")
    if cfg.save_total_limit < 1:
        raise bad("save_total_limit", "must be at least 1")
    if not (cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate)):
        raise bad("learning_rate", "must be a positive number")
    if not (cfg.num_epochs > 0 and math.isfinite(cfg.num_epochs)):
        raise bad("num_epochs", "must be a positive number")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise bad("max_steps", "must be a positive number of steps, or -1 to use --num_epochs")
    if cfg.dataset_size is not None and cfg.dataset_size < 1:
        raise bad("dataset_size", "must be at least 1 row (leave it out to use every row)")
    if not 0 <= cfg.eval_split < 1:
        raise bad("eval_split", "must be a fraction in (0, 1), or 0 for no evaluation")
    if not 0 <= cfg.warmup_ratio < 1:
        raise bad("warmup_ratio", "must be a fraction in [0, 1)")
    if cfg.weight_decay < 0:
        raise bad("weight_decay", "must not be negative")
    if cfg.uses_lora:
        if cfg.lora_rank < 1:
            raise bad("lora_rank", "must be at least 1")
        if cfg.lora_alpha <= 0:
            raise bad("lora_alpha", "must be positive")
        if not 0 <= cfg.lora_dropout < 1:
            raise bad("lora_dropout", "must be in [0, 1)")
        if not target_modules(cfg):
            raise bad("target_modules", "name at least one module, or all-linear")
    if cfg.shard and cfg.method == "qlora":
        raise UserError(
            "--shard: 4-bit QLoRA weights are not sharded; use --shard with LoRA on the bf16 model "
            "(llama3_70b_lora.py), or QLoRA without --shard (each rank holds the whole 4-bit model)"
        )
    if not cfg.output_dir:
        raise UserError("--output_dir is required")


def target_modules(cfg: TrainConfig) -> str | list[str]:
    if cfg.target_modules.strip() == "all-linear":
        return "all-linear"
    return [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
