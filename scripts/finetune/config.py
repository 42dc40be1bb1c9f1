"""`TrainConfig`: every setting of a run, its flags, its values read from YAML, and its validation.

Every field of `TrainConfig` is a flag (`--seq_length`, also `--seq-length`); booleans get a `--no_` twin.
A playbook script only changes defaults; cli.parse_config puts flags, YAML files and strategies together.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
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
EVAL_STRATEGIES = ("auto", "steps", "epoch", "no")
# Keys a YAML file may set that are not flags: the method (a playbook script's choice) and what to do after training.
YAML_ONLY_KEYS = ("method", "export")


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
        "padding-free packing: a micro-batch's examples share one row (rows of --seq_length with eager attention), positions restart per example",
        default=True,
    )
    train_on_prompt: bool = option(
        "compute the loss on prompt tokens too (default: responses only)", default=False
    )

    # Optimisation
    batch_size: int = option("examples per device per step", default=8)
    batch_tokens: int = option(
        "fill each micro-batch with up to this many real tokens instead of --batch_size examples; 0 = off",
        default=0,
    )
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

    # Evaluation during training (see evaluation.py)
    eval_strategy: str = option(
        "when to evaluate while training: steps (every --eval_steps), epoch, or no (once, at the end); "
        "auto = steps when --eval_steps is given, else no",
        default="auto",
    )
    eval_steps: int | None = option("evaluate every N optimizer steps", default=None)
    load_best_model_at_end: bool = option(
        "final/ holds the model with the lowest eval loss seen, not the last one", default=False
    )
    early_stopping_patience: int | None = option(
        "stop after K evaluations in a row without a lower eval loss", default=None
    )

    # Control
    config: str = option(
        "YAML file with any of these keys, or with named strategies (see --strategy); flags given on the command "
        "line win",
        default="",
    )
    strategy: str = option(
        "run the named strategy of --config (default file: the shipped strategies.yaml); flags given on the "
        "command line win",
        default="",
    )
    dry_run: bool = option(
        "load config, tokenizer and data, print the plan, and exit without training", default=False
    )
    force: bool = option(
        "train even when the memory or disk-space estimate says the run will not fit", default=False
    )
    max_nan_steps: int = option(
        "steps with a NaN/inf loss to skip (their update dropped) before stopping; 0 stops at the first",
        default=0,
    )

    # From a YAML file only: what to export after training ({merge, gguf, ollama, ...}; see strategies.py), and
    # the strategy that was read (name, file, description, hardware), for the plan and metrics.json.
    export: dict = field(default_factory=dict, metadata={"flag": False})
    strategy_info: dict = field(default_factory=dict, metadata={"flag": False})

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
            # Evaluating, keeping the best model and stopping early change what is reported and kept, not the
            # steps taken up to the point a resumed run continues from.
            "eval_strategy",
            "eval_steps",
            "load_best_model_at_end",
            "early_stopping_patience",
            "strategy",
            "export",
            "strategy_info",
            "max_nan_steps",
            "gradient_checkpointing",  # memory, not results: a run that ran out of memory resumes with it
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


def build_parser(prog: str, description: str, defaults: dict, config_class: type) -> argparse.ArgumentParser:
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


def load_yaml(path: str, flag: str = "--config") -> tuple[object, dict[tuple, int]]:
    """A YAML file's contents, and the line (1-based) of every mapping key by its path of keys, so that errors
    can say `FILE:LINE` (`("strategies", "quick-test", "batch_size") → 12`)."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{flag} {path}: no such file")
    text = file.read_text()
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None

    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines.setdefault((*path, key.value), key.start_mark.line + 1)
                    walk(value, (*path, key.value))

    walk(root, ())
    return data, lines


def where(path: str, lines: dict[tuple, int], *keys) -> str:
    """`FILE:LINE` of the innermost of `keys` the file spells out (a key merged from an anchor has no line)."""
    for end in range(len(keys), 0, -1):
        if tuple(map(str, keys[:end])) in lines:
            return f"{path}:{lines[tuple(map(str, keys[:end]))]}"
    return path


def yaml_values(data: dict, config_class: type, locate) -> dict:
    """A YAML mapping of option names → config values: every name known, every value of its field's type.
    `locate(key)` says where the key is (`FILE:LINE`) for the error message."""
    known = ({f.name for f in flag_fields(config_class)} - {"config", "strategy"}) | set(YAML_ONLY_KEYS)
    types_ = _field_types(config_class)
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    for raw in data:  # every name first: a misspelt key is the likelier mistake
        key = str(raw).replace("-", "_")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{locate(raw)}: unknown key {raw!r}{hint}; see --help for the valid names")
    values = {}
    for raw, value in data.items():
        key = str(raw).replace("-", "_")
        expected = types_[key]
        if expected is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        # `export` is checked by strategies.check_export, which knows its keys; None leaves an optional unset.
        if key == "export" or (value is None and defaults.get(key) is None):
            pass
        elif expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif expected is str and isinstance(value, list) and key == "target_modules":
            value = ",".join(map(str, value))
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise UserError(f"{locate(raw)}: {key} should be {expected.__name__}, got {value!r}")
        values[key] = value
    return values


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
    if cfg.max_nan_steps < 0:
        raise bad("max_nan_steps", "must not be negative")
    if cfg.batch_tokens < 0:
        raise bad("batch_tokens", "must not be negative (0 = --batch_size examples per micro-batch)")
    if cfg.batch_tokens and cfg.batch_tokens < cfg.seq_length:
        raise bad("batch_tokens", f"must be at least --seq_length {cfg.seq_length}, so a full row fits")
    if cfg.batch_tokens and not cfg.packing:
        raise bad("batch_tokens", "fills packed rows; it cannot be used with --no_packing")
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
    _validate_evaluation(cfg)
    if cfg.shard:
        # The sharded loop (sharding.py) has its own, simpler loop: it evaluates once, at the end.
        unsupported = [
            f"--{name}"
            for name, on in (
                ("eval_steps", cfg.eval_steps),
                ("eval_strategy", cfg.eval_strategy not in ("auto", "no")),
                ("load_best_model_at_end", cfg.load_best_model_at_end),
                ("early_stopping_patience", cfg.early_stopping_patience),
                ("batch_tokens", cfg.batch_tokens),
            )
            if on
        ]
        if unsupported:
            raise UserError(
                f"{', '.join(unsupported)}: not available with --shard yet (a sharded run evaluates once, at the "
                "end); drop them, or train without --shard where the model fits one device"
            )


def eval_strategy(cfg: TrainConfig) -> str:
    """steps, epoch or no: --eval_strategy with auto resolved."""
    if cfg.eval_strategy == "auto":
        return "steps" if cfg.eval_steps is not None else "no"
    return cfg.eval_strategy


def _validate_evaluation(cfg: TrainConfig) -> None:
    if cfg.eval_strategy not in EVAL_STRATEGIES:
        raise UserError(
            f"--eval_strategy {cfg.eval_strategy!r}: expected one of {', '.join(EVAL_STRATEGIES)}"
        )
    for name in ("eval_steps", "early_stopping_patience"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UserError(f"--{name} {getattr(cfg, name)!r}: must be at least 1")
    strategy = eval_strategy(cfg)
    if strategy == "steps" and cfg.eval_steps is None:
        raise UserError("--eval_strategy steps needs --eval_steps N (evaluate every N optimizer steps)")
    if strategy != "steps" and cfg.eval_steps is not None:
        raise UserError(f"--eval_steps {cfg.eval_steps} applies to --eval_strategy steps, not {strategy}")
    if strategy == "no":
        for name in ("load_best_model_at_end", "early_stopping_patience"):
            if getattr(cfg, name):
                raise UserError(
                    f"--{name} needs evaluation during training: add --eval_steps N (or --eval_strategy epoch)"
                )
    elif cfg.eval_split == 0 and not cfg.eval_dataset:
        asked = f"--eval_steps {cfg.eval_steps}" if strategy == "steps" else f"--eval_strategy {strategy}"
        raise UserError(
            f"{asked}: there is no eval data (--eval_split 0 and no --eval_dataset); hold out rows with "
            "--eval_split 0.1 or give --eval_dataset FILE"
        )


def target_modules(cfg: TrainConfig) -> str | list[str]:
    if cfg.target_modules.strip() == "all-linear":
        return "all-linear"
    return [m.strip() for m in cfg.target_modules.split(",") if m.strip()]
