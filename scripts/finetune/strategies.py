"""Named strategies: several complete runs in one YAML file, one of them picked with `--strategy NAME`.

    defaults:              # optional: under every strategy
      eval_steps: 10
    strategies:
      spark-8b-lora:
        description: ...   # shown in the plan
        hardware: dgx-spark  # what it is sized for (see HARDWARE)
        model_name: meta-llama/Llama-3.1-8B-Instruct
        method: lora       # lora, qlora or full; otherwise the playbook script's
        batch_size: 4      # ... any flag, spelled as on the command line without the dashes
        export: {merge: true, gguf: q8_0, ollama: llama3-8b-alpaca}

Precedence: the playbook script's defaults < `defaults:` < the strategy < flags on the command line. Without
--config, --strategy reads the shipped file, assets/strategies.yaml. `export:` runs after training, through the
functions behind scripts/export.py: merge a LoRA adapter into its base (OUTPUT_DIR/merged), convert to GGUF
(OUTPUT_DIR/model-TYPE.gguf), write an Ollama Modelfile (OUTPUT_DIR/Modelfile).

The shipped presets take their batch size, sequence length and gradient checkpointing from the memory estimator
(memory.py): `python -m finetune.strategies` prints what it chooses for each preset on its hardware (`size`
below), and the test suite checks the shipped values are those.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig, load_yaml, where, yaml_values
from .errors import UserError, run_cli

SHIPPED = Path(__file__).resolve().parent / "assets" / "strategies.yaml"
INFO_KEYS = ("description", "hardware")  # a strategy's own keys, beside the flags
# export: key → (type, what it means)
EXPORT_KEYS = {
    "merge": (bool, "merge the LoRA adapter into its base (implied by gguf for a LoRA run)"),
    "dtype": (str, "dtype of the merged weights (default bfloat16)"),
    "gguf": (str, "convert to GGUF with this tensor type"),
    "ollama": (str, "write an Ollama Modelfile for the GGUF file; the name to `ollama create`"),
    "system": (str, "a system prompt built into the Modelfile"),
}
MERGED = "merged"
MODELFILE = "Modelfile"


# ---------------------------------------------------------------------------------------------------- reading


def _mapping(value, locate, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{locate()}: {what} should be a mapping of names to values, got {value!r}")
    return value


def check_export(spec, locate) -> dict:
    """An `export:` block, checked: known keys, their types, a GGUF type the converter writes."""
    from .export import GGUF_TYPES, MERGE_DTYPES

    spec = _mapping(spec, lambda: locate(None), "export")
    for key, value in spec.items():
        if key not in EXPORT_KEYS:
            close = difflib.get_close_matches(str(key), EXPORT_KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"{locate(key)}: unknown export key {key!r}{hint}; expected {', '.join(EXPORT_KEYS)}"
            )
        expected = EXPORT_KEYS[key][0]
        if not isinstance(value, expected):
            raise UserError(f"{locate(key)}: export.{key} should be {expected.__name__}, got {value!r}")
    choices = {"gguf": GGUF_TYPES, "dtype": MERGE_DTYPES}
    for key, allowed in choices.items():
        if key in spec and spec[key] not in allowed:
            raise UserError(
                f"{locate(key)}: export.{key} {spec[key]!r}: expected one of {', '.join(allowed)}"
            )
    if spec.get("ollama") and not spec.get("gguf"):
        raise UserError(
            f"{locate('ollama')}: export.ollama needs export.gguf (the file the Modelfile points to), "
            f"e.g. gguf: q8_0"
        )
    return spec


def read_strategy(path: str, name: str, config_class: type = TrainConfig) -> dict:
    """The config values of strategy `name` in `path` (default: the shipped file), `defaults:` under them."""
    path = path or str(SHIPPED)
    data, lines = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("strategies"), dict):
        raise UserError(
            f"{path}: holds no `strategies:` mapping of named strategies; a file of plain options is read "
            "with --config alone"
        )
    for key in data:
        if key not in ("defaults", "strategies"):
            raise UserError(
                f"{where(path, lines, key)}: unknown top-level key {key!r}; expected defaults and strategies"
            )
    strategies = data["strategies"]
    if name not in strategies:
        raise UserError(f"{path}: no strategy {name!r}; known: {', '.join(map(str, strategies))}")

    values, info = {}, {"name": name, "file": path}
    for keys in (("defaults",), ("strategies", name)):
        block = data.get(keys[0]) if len(keys) == 1 else strategies[name]
        block = dict(_mapping(block, lambda keys=keys: where(path, lines, *keys), " ".join(keys)))
        for key in INFO_KEYS:
            if key in block:
                info[key] = str(block.pop(key))
        values.update(yaml_values(block, config_class, lambda key, keys=keys: where(path, lines, *keys, key)))
        if "export" in block:
            values["export"] = check_export(
                block["export"],
                lambda key, keys=keys: where(path, lines, *keys, "export", *([key] if key else [])),
            )
    values["strategy_info"] = info
    return values


# ---------------------------------------------------------------------------------------------------- export


def export_paths(cfg: TrainConfig) -> dict[str, Path]:
    out = Path(cfg.output_dir).expanduser()
    spec = cfg.export
    paths = {}
    if cfg.uses_lora and (spec.get("merge") or spec.get("gguf")):
        paths["merged"] = out / MERGED
    if spec.get("gguf"):
        paths["gguf"] = out / f"model-{spec['gguf']}.gguf"
    if spec.get("ollama"):
        paths["modelfile"] = out / MODELFILE
    return paths


def describe_strategy(cfg: TrainConfig) -> str | None:
    """The plan's line naming the strategy, when one was read."""
    info = cfg.strategy_info
    if not info:
        return None
    hardware = info.get("hardware")
    sized = (
        f"; sized for {HARDWARE[hardware].description if hardware in HARDWARE else hardware}"
        if hardware
        else ""
    )
    about = f": {info['description']}" if info.get("description") else ""
    return f"{info['name']} ({info['file']}){about}{sized}"


def describe_export(cfg: TrainConfig) -> str:
    """The plan's line about what happens after training."""
    paths = export_paths(cfg)
    steps = []
    if "merged" in paths:
        steps.append(f"merge → {paths['merged']}")
    if "gguf" in paths:
        steps.append(f"GGUF {cfg.export['gguf']} → {paths['gguf']}")
    if "modelfile" in paths:
        steps.append(f"Modelfile → {paths['modelfile']} (then: ollama create {cfg.export['ollama']})")
    return ", ".join(steps) or "nothing to do (a full fine-tune has no adapter to merge)"


def run_export(cfg: TrainConfig) -> dict[str, Path]:
    """After training: merge, convert, write the Modelfile, as the strategy's `export:` asks."""
    import torch

    from . import export
    from .outputs import FINAL

    gc.collect()  # the trained model is no longer needed: make room for the merge
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out = Path(cfg.output_dir).expanduser()
    paths, spec = export_paths(cfg), cfg.export
    model_dir = out / FINAL
    try:
        if "merged" in paths:
            export.merge(str(out), str(paths["merged"]), dtype=spec.get("dtype", "bfloat16"), overwrite=True)
            model_dir = paths["merged"]
        if "gguf" in paths:
            export.to_gguf(str(model_dir), str(paths["gguf"]), outtype=spec["gguf"], overwrite=True)
        if "modelfile" in paths:
            export.write_modelfile(
                str(paths["gguf"]), str(model_dir), str(paths["modelfile"]), system=spec.get("system", ""),
                overwrite=True,
            )  # fmt: skip
    except UserError as exc:
        raise UserError(
            f"training finished (its model is in {out / FINAL}), but the export failed: {exc}"
        ) from None
    if "modelfile" in paths:
        print(
            f"export done; serve it with: ollama create {spec['ollama']} -f {paths['modelfile']}", flush=True
        )
    return paths


# ---------------------------------------------------------------------------------------------------- sizing


@dataclass(frozen=True)
class Hardware:
    description: str
    device: str  # cuda or cpu
    available: int  # bytes a run may have, before preflight.USABLE_FRACTION


GIB = 1024**3
HARDWARE = {
    # 128 GB of unified memory = 119.2 GiB; the OS and the desktop keep some (assumed, not measured here).
    "dgx-spark": Hardware(
        "DGX Spark (GB10, 128 GB unified memory; ~110 GiB assumed free)", "cuda", 110 * GIB
    ),
    "h100": Hardware("H100 80 GB (79 GiB free after the CUDA context)", "cuda", 79 * GIB),
    "gpu-24gb": Hardware("a 24 GB GPU (RTX 3090/4090, L4, A10; 23 GiB free)", "cuda", 23 * GIB),
    "cpu": Hardware("a CPU with 8 GiB of memory free", "cpu", 8 * GIB),
}
# The published config.json of each model a shipped preset uses, so that sizing needs no download.
_LLAMA3 = {"vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0}
ARCHITECTURES = {
    "meta-llama/Llama-3.2-1B-Instruct": {
        **_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.1-8B-Instruct": {
        **_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.1-70B-Instruct": {
        **_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
    },
}  # fmt: skip
BATCH_SIZES = (8, 4, 2, 1)
MIN_SEQ_LENGTH = 128
CPU_RUNTIME_BYTES = 1 * GIB  # a fresh process with torch and transformers loaded, and the trainer


def model_config_for(name: str):
    """A preset model's configuration: from ARCHITECTURES, or a local model directory."""
    from transformers import AutoConfig, LlamaConfig

    if name in ARCHITECTURES:
        return LlamaConfig(**ARCHITECTURES[name])
    if Path(name).expanduser().is_dir():
        return AutoConfig.from_pretrained(name)
    raise UserError(f"{name}: no such model directory, and not one of {', '.join(ARCHITECTURES)}")


@dataclass
class Sizing:
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    seq_length: int
    estimate: int
    usable: int

    @property
    def fits(self) -> bool:
        return self.estimate <= self.usable


def estimate(
    cfg: TrainConfig, model_config, hardware: Hardware, parameters: tuple[int, int] | None = None
) -> int:
    """The estimator's peak for `cfg` on `hardware` when every example fills --seq_length and carries loss.
    `parameters`: (total, trainable), counted once by the caller (it takes a while for a 70B model)."""
    import torch

    from .memory import estimate_peak
    from .model import count_parameters

    total, trainable = parameters or count_parameters(cfg, model_config)
    dtype = torch.bfloat16 if hardware.device == "cuda" else torch.float32
    tokens = cfg.batch_size * cfg.seq_length
    peak = estimate_peak(cfg, model_config, total, trainable, dtype, hardware.device, tokens)
    if hardware.device == "cpu":  # not this process's memory, which the estimator reads on the CPU
        peak = dataclasses.replace(peak, runtime=CPU_RUNTIME_BYTES)
    return peak.total


def size(
    cfg: TrainConfig,
    model_config,
    hardware: Hardware,
    examples_per_step: int = 8,
    parameters: tuple[int, int] | None = None,
) -> Sizing:
    """What the estimator chooses: the playbook's `examples_per_step` per optimizer step at the longest
    --seq_length that fits, without gradient checkpointing if any micro-batch fits without it (it costs a third
    more compute), in the largest micro-batch that fits."""
    from .model import count_parameters
    from .preflight import USABLE_FRACTION

    usable = int(hardware.available * USABLE_FRACTION)
    parameters = parameters or count_parameters(cfg, model_config)
    seq = cfg.seq_length
    while True:
        for checkpointing in (False, True):
            for batch in (b for b in BATCH_SIZES if b <= examples_per_step):
                trial = dataclasses.replace(
                    cfg, batch_size=batch, seq_length=seq, gradient_checkpointing=checkpointing
                )
                peak = estimate(trial, model_config, hardware, parameters)
                if peak <= usable or (seq // 2 < MIN_SEQ_LENGTH and batch == 1 and checkpointing):
                    return Sizing(batch, examples_per_step // batch, checkpointing, seq, peak, usable)
        seq //= 2


def preset_configs(path: str = "") -> dict[str, TrainConfig]:
    """Every strategy of a file (default: the shipped one) as a config, on the LoRA script's defaults."""
    data, _ = load_yaml(path or str(SHIPPED))
    configs = {}
    for name in data["strategies"]:
        values = read_strategy(path, name)
        values.setdefault("output_dir", f"outputs/{name}")
        configs[name] = TrainConfig(**values)
    return configs


def sizing_line(name: str, cfg: TrainConfig) -> str:
    """One strategy's values beside the estimator's choice for its hardware."""
    from .model import count_parameters
    from .report import human_bytes

    hardware = HARDWARE.get(cfg.strategy_info.get("hardware", ""))
    if hardware is None:
        return f"{name}: skipped (hardware is none of {', '.join(HARDWARE)})"
    try:
        model_config = model_config_for(cfg.model_name)
    except UserError as exc:
        return f"{name}: skipped ({exc})"
    parameters = count_parameters(cfg, model_config)
    chosen = size(cfg, model_config, hardware, cfg.batch_size * cfg.gradient_accumulation_steps, parameters)
    given = estimate(cfg, model_config, hardware, parameters)

    def values(sizing) -> str:
        checkpointing = "on" if sizing.gradient_checkpointing else "off"
        return (
            f"batch {sizing.batch_size} x {sizing.gradient_accumulation_steps}, seq {sizing.seq_length}, "
            f"checkpointing {checkpointing}"
        )

    return (
        f"{name} on {cfg.strategy_info['hardware']}: the file has {values(cfg)} (~{human_bytes(given)} of "
        f"{human_bytes(chosen.usable)} usable); the estimator chooses {values(chosen)} "
        f"(~{human_bytes(chosen.estimate)})"
    )


def main(argv: list[str] | None = None) -> None:
    """python -m finetune.strategies [FILE]: each strategy's sizing beside the memory estimator's choice."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m finetune.strategies", description=main.__doc__)
    parser.add_argument("file", nargs="?", default="", help=f"strategies file (default: {SHIPPED})")
    args = parser.parse_args(argv)

    def show() -> None:
        for name, cfg in preset_configs(args.file).items():
            print(sizing_line(name, cfg), flush=True)

    run_cli(show)


if __name__ == "__main__":
    main()
