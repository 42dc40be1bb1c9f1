"""Random-initialised Llama 3 models with the real architectures, built offline, and their FLOPs per step.

The configurations are those published with Meta's checkpoints (config.json of Llama-3.2-3B-Instruct,
Llama-3.1-8B-Instruct, Llama-3.1-70B-Instruct), written here so that nothing is downloaded. `layers` keeps the
true width (hidden size, heads, MLP, the 128,256-entry vocabulary) with fewer decoder layers.

The tokenizer is the test suite's tiny byte-level BPE (finetune.tiny), without its chat template, so that every
implementation renders the same Alpaca prompt. It only produces ids below 1,024, but the model's embedding and
lm_head keep the full vocabulary, so the lm_head's cost and the logits' memory are those of the real model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
COMMON = {
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
}
ARCHITECTURES = {
    "llama-3.2-3b": {
        **COMMON,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 8192},
    },
    "llama-3.1-8b": {
        **COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
    },
    "llama-3.1-70b": {
        **COMMON,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0, "original_max_position_embeddings": 8192},
    },
}
MARKER = ".bench-model.json"


def llama_config(name: str, layers: int | None, tokenizer):
    from transformers import LlamaConfig

    values = dict(ARCHITECTURES[name])
    if layers:
        values["num_hidden_layers"] = layers
    return LlamaConfig(
        **values,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )


def bench_tokenizer(tiny_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = None  # the Alpaca prompt, as NVIDIA's scripts use
    return tokenizer


def build_model(cache: Path, name: str, layers: int | None, dtype: str) -> Path:
    """A random model directory (weights saved in `dtype`), built once per (architecture, layers, dtype)."""
    import torch
    from finetune.tiny import build_tiny_model

    tiny = cache / "tiny"
    if not (tiny / "config.json").is_file():
        build_tiny_model(tiny)
    if name == "tiny":
        return tiny
    target = cache / f"{name}-L{layers or 'all'}-{dtype}"
    marker = {"architecture": name, "layers": layers, "dtype": dtype, "format": 1}
    try:
        if json.loads((target / MARKER).read_text()) == marker:
            return target
    except (OSError, ValueError):
        pass

    from transformers import LlamaForCausalLM

    tokenizer = bench_tokenizer(tiny)
    config = llama_config(name, layers, tokenizer)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            torch.set_default_dtype(getattr(torch, dtype))
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(torch.float32)
        model.save_pretrained(staging)
        del model
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(marker) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def config_only(cache: Path, name: str, layers: int | None) -> Path:
    """A model directory with the config and tokenizer but no weights: enough for a playbook's --dry_run."""
    tiny = build_model(cache, "tiny", None, "float32")
    if name == "tiny":
        return tiny
    target = cache / f"{name}-L{layers or 'all'}-config"
    tokenizer = bench_tokenizer(tiny)
    llama_config(name, layers, tokenizer).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


# ------------------------------------------------------------------------------------------------ FLOPs


def parameter_counts(config, lora_rank: int | None) -> dict:
    """Matmul parameters: decoder layers (`body`), lm_head (`head`), LoRA adapters on every linear layer."""
    d, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]  # q k v o gate up down: (in, out)
    layers = config.num_hidden_layers
    body = layers * sum(a * b for a, b in shapes)
    lora = layers * sum(lora_rank * (a + b) for a, b in shapes) if lora_rank else 0
    return {"body": body, "head": config.vocab_size * d, "lora": lora, "attention_width": q, "layers": layers}


def step_flops(counts: dict, method: str, tokens: int, logit_tokens: int, attention_pairs: int) -> float:
    """Model FLOPs of one optimizer step (recomputation by gradient checkpointing not counted).

    A matmul with N weights costs 2N FLOPs per token forward, 2N for the input gradient and 2N for the weight
    gradient. Full fine-tuning: 6N per token. LoRA and QLoRA: the frozen base needs no weight gradients, only the
    input gradients that carry the loss down to the adapters: 4N per token, plus 6 per adapter weight.
    The lm_head runs on the `logit_tokens` positions that need logits (ours: those with loss; a baseline with
    loss on every token: every real token). Attention: 4·width FLOPs per query-key pair and layer forward
    (scores and weighted sum), twice that backward: 12·width·layers per causal pair.
    """
    matmul = 6 if method == "full" else 4
    flops = matmul * (counts["body"] * tokens + counts["head"] * logit_tokens)
    if method != "full":
        flops += 6 * counts["lora"] * tokens
    flops += 12 * counts["attention_width"] * counts["layers"] * attention_pairs
    return float(flops)


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's datasheets; matched against the device name.
BF16_PEAK = {
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "L40S": 362e12,
    "RTX 4090": 165.2e12,
}


def bf16_peak(device_name: str) -> float | None:
    for key, value in BF16_PEAK.items():
        if key in device_name:
            return value
    return None
