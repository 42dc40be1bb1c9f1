"""Model side: where the weights come from, tokenizer, dtype and device, 4-bit loading, LoRA."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import TrainConfig, target_modules
from .errors import UserError

LOGIN_HINT = "accept its license on huggingface.co, then log in with `hf auth login` (or set HF_TOKEN)"
OFFLINE_HINT = (
    "to run offline, pass a local directory (--model_name /path/to/model) or download the model once with "
    "`hf download {name}` and set HF_HUB_OFFLINE=1"
)


# ---------------------------------------------------------------------------------------------------- source


def _is_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def hub_failure(name: str, exc: BaseException, flag: str = "--model_name") -> UserError:
    """Turn the hub's exception chain into one actionable line."""
    from huggingface_hub import errors as hub_errors

    chain, cause = [], exc
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    kinds = tuple(type(c) for c in chain)
    if any(issubclass(k, hub_errors.GatedRepoError) for k in kinds) or "gated repo" in str(exc):
        return UserError(f"{flag} {name} is a gated model: {LOGIN_HINT}")
    if any(
        issubclass(k, hub_errors.RepositoryNotFoundError) for k in kinds
    ) or "not a valid model identifier" in str(exc):
        return UserError(
            f"{flag} {name}: no such local directory or hub model (a private model needs `hf auth login`)"
        )
    if any(
        issubclass(k, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled)) for k in kinds
    ):
        return UserError(
            f"{flag} {name} is not in the local Hugging Face cache and the hub cannot be reached; "
            + OFFLINE_HINT.format(name=name)
        )
    return UserError(f"{flag} {name}: cannot load it ({str(exc).splitlines()[0]})")


def load_model_config(name: str):
    """The model's config; the first thing loaded, so it also validates --model_name."""
    from transformers import AutoConfig

    if _is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(f"--model_name {name}: no such directory")
        if not (path / "config.json").is_file():
            raise UserError(
                f"--model_name {name}: the directory has no config.json (is it a model directory?)"
            )
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as exc:
        raise hub_failure(name, exc) from None


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(name))
    except (OSError, ValueError) as exc:
        raise hub_failure(name, exc) from None
    if not tokenizer.is_fast:
        raise UserError(
            f"--model_name {name}: needs a fast (tokenizer.json) tokenizer for response-only masking"
        )
    if tokenizer.pad_token is None:
        # Llama 3 has no pad token. Padding positions are masked out of attention and loss, so any id works.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------- device


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    dtype: torch.dtype
    local_rank: int

    @property
    def mixed_precision(self) -> str | None:
        """Trainer's bf16/fp16 switch: autocast only on GPUs (bf16 autocast on CPU is slower than fp32)."""
        if self.device != "cuda":
            return None
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype)


def liger_kernels(place: Placement) -> bool:
    """Whether to use Liger's Triton kernels: fused RMSNorm, RoPE and SwiGLU, and a chunked lm_head + cross-entropy
    that never holds the whole logits tensor. They need CUDA (on the CPU liger_kernel imports, but every kernel
    fails), so they are used only there, and only when liger_kernel is installed."""
    return place.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def placement(cfg: TrainConfig) -> Placement:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if cfg.dtype == "auto":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = getattr(torch, cfg.dtype)
        return Placement("cuda", dtype, local_rank)
    return Placement("cpu", torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype), local_rank)


# ---------------------------------------------------------------------------------------------------- loading


def is_prequantized(model_config) -> bool:
    quant = getattr(model_config, "quantization_config", None)
    return quant is not None


def check_trainable(cfg: TrainConfig, model_config) -> None:
    """Full fine-tuning needs real weights; a pre-quantized checkpoint only takes adapters."""
    if is_prequantized(model_config) and not cfg.uses_lora:
        raise UserError(
            f"--model_name {cfg.model_name} is quantized, and quantized weights cannot be trained directly; "
            "use the QLoRA playbook, or the unquantized model"
        )


# Where 4-bit fails without a GPU: a bitsandbytes built for CUDA only (the flake's CUDA shell) may have no
# CPU path, the CPU shell's does.
CPU_QLORA_HINT = (
    "without a GPU, use a bitsandbytes with its CPU backend: `nix develop .#pytorch-fine-tune-cpu` "
    "with Nix, `pip install bitsandbytes` otherwise"
)


def check_bitsandbytes(device: str) -> None:
    """QLoRA needs bitsandbytes' 4-bit kernels on this device; find out before loading gigabytes."""
    hint = CPU_QLORA_HINT if device == "cpu" else "use a newer bitsandbytes, or the LoRA playbook"
    try:
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # ImportError, or a RuntimeError from a broken native library
        raise UserError(f"QLoRA needs bitsandbytes, which cannot be imported here ({exc}); {hint}") from None
    try:
        probe = torch.randn(64, 64, device=device)
        packed, state = bnbf.quantize_4bit(probe, quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"QLoRA: bitsandbytes cannot run 4-bit quantization on {device} ({first_line}); {hint}"
        ) from None


# bitsandbytes >= 0.49, on a CPU with AVX512-BF16, repacks a 4-bit weight for its fast kernel the first time the
# layer runs in inference mode. The repacking needs out_features in whole blocks of 32 rows and in_features in whole
# quantization blocks (64 values), and fails otherwise. Real Llama shapes always fit; a layer that does not keeps
# the generic CPU kernel, which computes the same result.
BNB_CPU_ROW_BLOCK = 32


def keep_unpackable_4bit_layers_generic(model) -> list[str]:
    """Route 4-bit layers whose shape bitsandbytes' packed CPU kernel cannot take to its generic kernel; return
    their names. A no-op on bitsandbytes releases without that kernel."""
    names = []
    for name, module in model.named_modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
        if module.out_features % BNB_CPU_ROW_BLOCK or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
            names.append(name)
    return names


def _quantization_config(cfg: TrainConfig, model_config, place: Placement):
    if cfg.method != "qlora" or is_prequantized(model_config):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=place.dtype,
        bnb_4bit_quant_storage=place.dtype,  # lets FSDP shard the 4-bit weights alongside the others
    )


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _wrap_lora(model, cfg: TrainConfig):
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(cfg))
    except ValueError as exc:  # e.g. a target module name that the model does not have
        raise UserError(f"--target_modules {cfg.target_modules}: {str(exc).splitlines()[0]}") from None


def load_base(cfg: TrainConfig, model_config, place: Placement, name: str = "", flag: str = "--model_name"):
    """The base model as training needs it: at the run's dtype, or 4-bit (QLoRA or a pre-quantized checkpoint)
    and prepared for k-bit training; gradient checkpointing set up. `name` defaults to --model_name."""
    from transformers import AutoModelForCausalLM

    name = name or cfg.model_name
    from .attention import training_attention

    kwargs = {
        "dtype": place.dtype,
        "attn_implementation": training_attention(cfg.attn_implementation, cfg.packing),
    }
    four_bit = cfg.method == "qlora" or is_prequantized(model_config)
    if four_bit:
        check_bitsandbytes(place.device)
        # 4-bit weights are created on the device at load time; the Trainer cannot move them afterwards.
        kwargs["device_map"] = {"": f"cuda:{place.local_rank}" if place.device == "cuda" else "cpu"}
        quantization = _quantization_config(cfg, model_config, place)
        if quantization is not None:
            kwargs["quantization_config"] = quantization
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), **kwargs)
    except (OSError, ValueError) as exc:
        raise hub_failure(name, exc, flag) from None
    except ImportError as exc:
        raise UserError(f"{flag} {name}: {str(exc).splitlines()[0]}") from None

    if four_bit:
        from peft import prepare_model_for_kbit_training

        keep_unpackable_4bit_layers_generic(model)

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.uses_lora:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad input
    return model


# Where the fused layers (fuse_layers) and the chunked loss (chunked_loss.py) are used: where they were measured.
# On CUDA, Liger's kernels do the same where liger-kernel is installed; bench/run.py --impls ours-fused adds a
# GPU to measure them there.
FUSED_DEVICES = {"cpu"}


def load_model(cfg: TrainConfig, model_config, place: Placement):
    """The model ready to train: full weights, LoRA on top, or LoRA on a 4-bit base."""
    model = load_base(cfg, model_config, place)
    if cfg.uses_lora:
        model = _wrap_lora(model, cfg)
    if place.device in FUSED_DEVICES:
        fuse_layers(model)
    model.config.use_cache = False  # the KV cache only costs memory in training
    return model


def fuse_layers(model) -> None:
    """LoRA linear layers, SwiGLU MLPs and RMSNorms as single autograd functions that keep less for the backward
    pass (lora_fused.py, swiglu.py, rmsnorm.py): the same results."""
    from .lora_fused import fuse_lora_layers
    from .rmsnorm import fuse_rms_norms
    from .swiglu import fuse_swiglu

    fuse_lora_layers(model)  # no LoRA layers in a full fine-tune: nothing to route
    fuse_swiglu(model)
    fuse_rms_norms(model)


def count_parameters(cfg: TrainConfig, model_config) -> tuple[int, int]:
    """(total, trainable) parameters, counted on the meta device: no weights are read or allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total = sum(p.numel() for p in model.parameters())
    if not cfg.uses_lora:
        return total, total
    model = _wrap_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
