"""A peak-memory estimate from the model config alone, before any weight is loaded.

Sum of: weights (at their dtype, or 4-bit NF4 for QLoRA linear layers), gradients and AdamW states of the
trainable parameters, activations kept for the backward pass (per token and layer, less with gradient
checkpointing), the logits and their fp32 loss copies, and the runtime's own footprint.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from .config import TrainConfig

GIB = 1024**3
# NF4 stores 4 bits per weight plus, with double quantization, ~0.127 bits of block scales.
NF4_BYTES_PER_PARAM = (4 + 0.127) / 8
CUDA_RUNTIME_BYTES = 1 * GIB  # context, cuBLAS workspaces, allocator slack


@dataclass
class MemoryEstimate:
    weights: int
    trainable_state: int
    activations: int
    logits: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations + self.logits + self.runtime

    def as_dict(self) -> dict:
        return {**self.__dict__, "total": self.total}


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def process_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def estimate_peak(
    cfg: TrainConfig,
    model_config,
    total_params: int,
    trainable_params: int,
    dtype: torch.dtype,
    device: str,
    micro_batch_tokens: int,
) -> MemoryEstimate:
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = text_config.hidden_size
    layers = text_config.num_hidden_layers
    vocab = text_config.vocab_size
    intermediate = getattr(text_config, "intermediate_size", 4 * hidden)
    heads = text_config.num_attention_heads
    kv = hidden // heads * getattr(text_config, "num_key_value_heads", heads)
    width = _dtype_bytes(dtype)

    embeddings = vocab * hidden * (1 if getattr(text_config, "tie_word_embeddings", False) else 2)
    if cfg.method == "qlora":
        # Linear layers in NF4; embeddings, lm_head and norms stay in the compute dtype.
        weights = int((total_params - embeddings) * NF4_BYTES_PER_PARAM + embeddings * width)
    else:
        weights = total_params * width

    # LoRA adapters train in fp32 (weights, gradients, AdamW's two moments); full fine-tuning keeps gradients
    # and moments in the weights' dtype (the weights themselves are counted above).
    trainable_state = trainable_params * (4 * 4 if cfg.uses_lora else width * 3)

    # Saved activations per token and layer: norms (with fp32 upcasts), q/k/v, rotated q/k, attention output,
    # residuals, and the SwiGLU MLP's four intermediate-sized tensors (memory-efficient attention: no s² term).
    per_token_layer = width * (8 * hidden + 4 * kv + 4 * intermediate) + 4 * 4 * hidden
    if cfg.gradient_checkpointing:
        activations = micro_batch_tokens * (layers * hidden * width + per_token_layer)
    else:
        activations = micro_batch_tokens * layers * per_token_layer
    # Logits in the model dtype, their fp32 copy for the loss, log-softmax, and the gradient.
    logits = micro_batch_tokens * vocab * (width + 3 * 4)

    runtime = CUDA_RUNTIME_BYTES if device == "cuda" else process_rss_bytes()
    return MemoryEstimate(weights, trainable_state, activations, logits, runtime)


def micro_batch_tokens(lengths: list[int], batch_size: int, packing: bool) -> int:
    """Tokens in the largest micro-batch: the longest examples together."""
    longest = sorted(lengths, reverse=True)[:batch_size]
    return sum(longest) if packing else max(longest, default=0) * batch_size
