"""Where a model comes from when it is not just a base model: a LoRA adapter, or a training run's output directory.

Every command that takes a trained model (DPO, export, evaluate) accepts any of:
    a hub id or a directory with config.json       full weights (a base model, or a merged / fully fine-tuned one)
    a directory with adapter_config.json           a LoRA adapter; its base comes from that file (or --base_model)
    a training run's --output_dir                  its final/ directory, whichever of the two it holds
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .model import _is_local, is_prequantized, load_model_config
from .outputs import FINAL, RUN_FILE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    spec: str  # as given on the command line
    base: str  # hub id or directory of the full weights
    adapter: Path | None  # LoRA adapter on top of `base`
    run_method: str | None  # lora / qlora / full, when it comes from a training run of these scripts
    tokenizer: str  # the adapter's or run's own tokenizer when it has one, else the base's

    @property
    def describe(self) -> str:
        return f"{self.base} + adapter {self.adapter}" if self.adapter else self.base


def _read_json(path: Path, flag: str, spec: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag} {spec}: cannot read {path.name} ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} {spec}: {path.name} is not a JSON object")
    return value


def with_flag(error: UserError, flag: str) -> UserError:
    """model.py's messages name --model_name; say which flag the user actually gave."""
    text = str(error)
    return UserError(text.replace("--model_name", flag, 1) if text.startswith("--model_name") else text)


def resolve(spec: str, *, flag: str, base_model: str = "", base_flag: str = "--base_model") -> ModelSource:
    """What `spec` is and what to load for it. Nothing heavy is read."""
    path = Path(spec).expanduser()
    run_method = None
    if path.is_dir() and (path / RUN_FILE).is_file():
        run_method = _read_json(path / RUN_FILE, flag, spec).get("method")
        if not (path / FINAL).is_dir():
            raise UserError(
                f"{flag} {spec}: this training run has not finished (it has no {FINAL}/); "
                "run the same training command again to resume it"
            )
        path = path / FINAL
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        recorded = _read_json(path / ADAPTER_CONFIG, flag, spec).get("base_model_name_or_path") or ""
        base = base_model or recorded
        if not base:
            raise UserError(
                f"{flag} {spec}: the adapter does not record its base model; pass it with {base_flag}"
            )
        if not base_model and _is_local(base) and not Path(base).expanduser().is_dir():
            raise UserError(
                f"{flag} {spec}: its base model {base} (from {ADAPTER_CONFIG}) is not on this machine; "
                f"pass its location (or hub id) with {base_flag}"
            )
        has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
        return ModelSource(spec, base, path, run_method, str(path) if has_tokenizer else base)
    if base_model:
        raise UserError(f"{base_flag} is only for LoRA adapters; {flag} {spec} is not one")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{flag} {spec}: not a model (no config.json), a LoRA adapter (no {ADAPTER_CONFIG}) "
                "or a training run's output directory"
            )
        return ModelSource(spec, str(path), None, run_method, str(path))
    if _is_local(spec):
        raise UserError(f"{flag} {spec}: no such directory")
    return ModelSource(spec, spec, None, None, spec)


def is_adapter(spec: str) -> bool:
    """Whether `spec` is a LoRA adapter directory, or a finished training run that left one."""
    path = Path(spec).expanduser()
    if (path / RUN_FILE).is_file():
        path = path / FINAL
    return (path / ADAPTER_CONFIG).is_file()


def with_adapter(model: str, adapter: str) -> ModelSource:
    """--model BASE plus --adapter DIR (which overrides the base its adapter_config.json names)."""
    if not Path(adapter).expanduser().is_dir():
        raise UserError(f"--adapter {adapter}: no such directory")
    if not is_adapter(adapter):
        raise UserError(f"--adapter {adapter}: not a LoRA adapter (no {ADAPTER_CONFIG})")
    base = resolve(model, flag="--model")
    if base.adapter is not None:
        raise UserError(f"--model {model}: is itself a LoRA adapter; pass its base model as --model")
    return resolve(adapter, flag="--adapter", base_model=base.base, base_flag="--model")


def base_config(source: ModelSource, flag: str, base_flag: str = "--base_model"):
    """The base model's config (validates the base: exists, reachable, not gated)."""
    try:
        return load_model_config(source.base)
    except UserError as exc:
        raise with_flag(exc, base_flag if source.adapter else flag) from None


def check_adapter_fits(source: ModelSource, model_config, flag: str, base_flag: str = "--base_model") -> None:
    """Refuse an adapter trained on another model, by its tensor shapes, before any weight is loaded."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    weights = source.adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (source.adapter / "adapter_model.bin").is_file():
            return  # an old-style adapter: PEFT checks it while loading
        raise UserError(f"{flag} {source.spec}: the adapter has no {ADAPTER_WEIGHTS}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    pattern = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = pattern.match(key)
            if not match:
                continue
            name, which = match.groups()
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise UserError(
                    f"{flag} {source.spec} does not fit {source.base}: the adapter has a layer {name} "
                    f"that this base model lacks; pass the model it was trained on with {base_flag}"
                ) from None
            shape = handle.get_slice(key).get_shape()
            expected = getattr(module, "in_features" if which == "A" else "out_features", None)
            got = shape[1] if which == "A" else shape[0]
            if expected is not None and got != expected:
                raise UserError(
                    f"{flag} {source.spec} does not fit {source.base}: layer {name} has "
                    f"{'inputs' if which == 'A' else 'outputs'} of size {expected} there but {got} in the adapter "
                    f"(it was trained on another model); pass the right one with {base_flag}"
                )


def unquantized_hint(name: str) -> str:
    """A likely unquantized original of a pre-quantized repository name (unsloth/...-bnb-4bit)."""
    stripped = re.sub(r"[-_](bnb[-_])?4bit$", "", name.rstrip("/"))
    return stripped if stripped != name.rstrip("/") else "the original model it was quantized from"


def refuse_prequantized(source: ModelSource, model_config, why: str) -> None:
    if is_prequantized(model_config):
        raise UserError(
            f"--base_model {source.base} holds 4-bit weights; {why}. Pass the unquantized model with "
            f"--base_model (e.g. {unquantized_hint(source.base)})"
        )


def inference_placement(dtype: str = "auto") -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        if dtype == "auto":
            return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", getattr(torch, dtype)
    return "cpu", torch.float32 if dtype == "auto" else getattr(torch, dtype)


def load_causal_lm(name: str, flag: str, **kwargs):
    from transformers import AutoModelForCausalLM

    from .model import hub_failure, keep_unpackable_4bit_layers_generic

    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), **kwargs)
    except (OSError, ValueError) as exc:  # offline, gated, missing: the same hints as the training scripts
        raise hub_failure(name, exc, flag) from None
    except ImportError as exc:
        raise UserError(
            f"{flag} {name}: cannot load the model ({str(exc).strip().splitlines()[0]})"
        ) from None
    keep_unpackable_4bit_layers_generic(model)
    return model


def load_tokenizer_for(source: ModelSource, flag: str):
    from .model import load_tokenizer

    try:
        return load_tokenizer(source.tokenizer)
    except UserError as exc:
        raise with_flag(exc, flag) from None
