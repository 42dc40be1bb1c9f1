"""A peak-memory estimate from the model config alone, before any weight is loaded.

The peak of a training step on the largest micro-batch the run is expected to meet (`micro_batch_tokens`) is the
sum of:

- weights: every base parameter at its dtype, or 4-bit NF4 (plus block scales) for QLoRA's linear layers;
- trainable state: LoRA adapters in fp32 with their gradients and AdamW's two moments (16 bytes a parameter),
  or, for full fine-tuning, a gradient and two moments in the weights' dtype;
- activations kept for the backward pass: per token and layer, what a Llama decoder layer saves (below), or with
  gradient checkpointing one hidden state per layer plus one layer's worth recomputed; plus the attention mask;
- logits: the vocabulary-wide lm_head output for the positions that carry loss (the trainer computes logits only
  there), its fp32 copy, the log-softmax kept for the backward pass and its gradient;
- runtime: on CUDA the context, cuBLAS workspaces and allocator slack; on the CPU the process's resident
  memory when the plan is made (interpreter, libraries, tokenizer, data) plus what the trainer adds.

With --shard (FSDP2) the estimate is per rank (`per_rank`): weights and trainable state split N ways, plus the
decoder layers gathered whole while they run.

The test suite compares this estimate with measured peaks on the CPU (tests/test_memory.py): LoRA and full
fine-tuning come within ~10%. QLoRA on the CPU peaks higher than this, while loading: bitsandbytes' CPU backend
quantizes through transient full-precision copies that its CUDA kernels do not make.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .chunked_loss import CHUNK_BYTES, routes
from .config import TrainConfig
from .model import FUSED_DEVICES, Placement, liger_kernels

if TYPE_CHECKING:
    from .data import DataStats

GIB = 1024**3
MIB = 1024**2
# NF4 stores 4 bits per weight plus, with double quantization, ~0.127 bits of block scales.
NF4_BYTES_PER_PARAM = (4 + 0.127) / 8
CUDA_RUNTIME_BYTES = 1 * GIB  # context, cuBLAS workspaces, allocator slack
# What importing and starting the trainer (peft, accelerate, the optimizer, tensorboard) adds to a CPU
# process's resident memory after the plan is made; measured with torch 2.13 / transformers 5.5.
CPU_TRAINING_RUNTIME_BYTES = 64 * MIB
LORA_STATE_BYTES = 4 * 4  # fp32 adapter weight, gradient, and AdamW's two moments
SIMULATED_RUNS = 16


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


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def process_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux's VmHWM, which starts afresh in a new program; `ru_maxrss` (the fallback elsewhere) is carried across
    exec, so a process started by a large one (a test runner, a launcher) would report its parent's peak.
    """
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    """What this process holds in memory now."""
    current = _proc_status_bytes("VmRSS")
    return current if current is not None else process_rss_bytes()


def layer_activation_bytes(text_config, width: int, masked_attention: bool = True) -> int:
    """Bytes one decoder layer keeps for the backward pass, per token.

    In the compute dtype: the q/k/v input, rotated q and k, v, the attention output and the o_proj input, the MLP
    input, and the SwiGLU MLP's gate, up, activation and product (each intermediate-sized). With an attention mask
    (packed or padded batches) transformers repeats k and v to every query head, so they are hidden-sized. Both
    RMSNorms keep their input upcast to fp32.
    """
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv = head_dim * (getattr(text_config, "num_key_value_heads", None) or heads)
    intermediate = getattr(text_config, "intermediate_size", 4 * hidden)
    keys_values = 2 * heads * head_dim if masked_attention else 2 * kv
    per_token = 5 * hidden + keys_values + 4 * intermediate
    return width * per_token + 2 * 4 * hidden


def estimate_peak(
    cfg: TrainConfig,
    model_config,
    total_params: int,
    trainable_params: int,
    dtype: torch.dtype,
    device: str,
    micro_batch_tokens: int,
    loss_tokens: int | None = None,
    fused_cross_entropy: bool = False,
    chunked_cross_entropy: bool = False,
) -> MemoryEstimate:
    """The estimate for the largest micro-batch: `micro_batch_tokens` tokens (padding included), of which
    `loss_tokens` carry loss (default: all). `fused_cross_entropy`: Liger's chunked lm_head + loss, which never
    holds the whole logits tensor; `chunked_cross_entropy`: ours on the CPU (finetune/chunked_loss.py)."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = text_config.hidden_size
    layers = text_config.num_hidden_layers
    vocab = text_config.vocab_size
    width = _dtype_bytes(dtype)
    loss_tokens = micro_batch_tokens if loss_tokens is None else loss_tokens
    if cfg.packing:  # packed_sdpa and the flash kernels build no mask; eager one per row of <= --seq_length
        row_tokens = min(micro_batch_tokens, cfg.seq_length) if cfg.attn_implementation == "eager" else 0
    else:
        row_tokens = micro_batch_tokens // cfg.batch_size

    embeddings = vocab * hidden * (1 if getattr(text_config, "tie_word_embeddings", False) else 2)
    if cfg.method == "qlora" or getattr(model_config, "quantization_config", None) is not None:
        # Linear layers in NF4; embeddings, lm_head and norms stay in the compute dtype. One projection's weight
        # at a time is dequantized for its matmul.
        dequantized = hidden * getattr(text_config, "intermediate_size", 4 * hidden) * width
        weights = int((total_params - embeddings) * NF4_BYTES_PER_PARAM + embeddings * width) + dequantized
    else:
        weights = total_params * width

    # LoRA adapters train in fp32 (weights, gradients, AdamW's two moments); full fine-tuning keeps gradients
    # and moments in the weights' dtype (the weights themselves are counted above).
    trainable_state = trainable_params * (LORA_STATE_BYTES if cfg.uses_lora else width * 3)

    per_layer = layer_activation_bytes(text_config, width)
    if cfg.gradient_checkpointing:
        # Each layer's input hidden state, plus one layer's activations while it is recomputed.
        activations = micro_batch_tokens * (layers * hidden * width + per_layer)
    else:
        activations = micro_batch_tokens * layers * per_layer
    # The final norm (fp32) and the lm_head input; a boolean attention mask, one byte per query-key pair.
    activations += micro_batch_tokens * 2 * 4 * hidden + loss_tokens * hidden * width
    activations += micro_batch_tokens * row_tokens

    if fused_cross_entropy:
        # Liger computes the loss in chunks and never holds more than a chunk of logits.
        logits = min(loss_tokens, 4096) * vocab * 4
    elif chunked_cross_entropy:
        # One chunk of logits (and, below float32, its float32 copy); the hidden states' gradient, kept.
        logits = (
            min(CHUNK_BYTES, loss_tokens * vocab * 4) * (2 if width < 4 else 1) + loss_tokens * hidden * width
        )
    else:
        # Logits in the model dtype and (unless already fp32) their fp32 copy; the fp32 log-softmax kept for the
        # backward pass, its gradient and the gradient of the logits.
        logits = loss_tokens * vocab * ((width if width < 4 else 0) + 3 * 4)

    runtime = CUDA_RUNTIME_BYTES if device == "cuda" else resident_bytes() + CPU_TRAINING_RUNTIME_BYTES
    return MemoryEstimate(weights, trainable_state, int(activations), int(logits), runtime)


def micro_batch_tokens(
    lengths: list[int], batch_size: int, packing: bool, examples: int | None = None, batch_tokens: int = 0
) -> int:
    """Tokens (padding included) in the largest micro-batch the run will meet.

    With `batch_tokens` (--batch_tokens), the largest of the fixed micro-batches data.token_batches makes.

    With `examples`, the number of examples the run draws (in a random order, each epoch a new one, as the
    Trainer's sampler does), the largest micro-batch met in the worst of `SIMULATED_RUNS` simulated runs; the
    longest examples rarely all land in one batch. Without it, the longest examples together: the worst case.
    """
    if not lengths:
        return 0
    if batch_tokens:
        from .data import pack_rows

        return max(sum(lengths[i] for i in group) for group in pack_rows(lengths, batch_tokens))
    if examples is None:
        longest = sorted(lengths, reverse=True)[:batch_size]
        return sum(longest) if packing else max(longest) * batch_size
    values = torch.tensor(lengths)
    generator = torch.Generator().manual_seed(0)
    epochs = math.ceil(examples / len(values))
    worst = 0
    for _ in range(SIMULATED_RUNS):
        order = torch.cat([values[torch.randperm(len(values), generator=generator)] for _ in range(epochs)])
        order = torch.nn.functional.pad(order[:examples], (0, -examples % batch_size))
        batches = order.view(-1, batch_size)
        sizes = batches.sum(1) if packing else batches.amax(1) * batch_size
        worst = max(worst, int(sizes.max()))
    return worst


def decoder_layer_params(model_config) -> int:
    """Parameters of one Llama-style decoder layer: attention, SwiGLU MLP and two norms."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", 4 * hidden)
    return (
        2 * hidden * heads * head_dim
        + 2 * hidden * kv_heads * head_dim
        + 3 * hidden * intermediate
        + 2 * hidden
    )


def per_rank(estimate: MemoryEstimate, cfg: TrainConfig, model_config, dtype: torch.dtype, ranks: int):
    """The peak of one of `ranks` ranks when every weight is sharded (FSDP2, --shard): weights and trainable state
    are split N ways; while a decoder layer runs, its weights are gathered whole, and the next layer's are
    prefetched (two layers), plus for full fine-tuning one layer's unsharded gradient. Activations, logits and
    the runtime are each rank's own."""
    layer = decoder_layer_params(model_config) * _dtype_bytes(dtype)
    gathered = 2 * layer + (0 if cfg.uses_lora else layer)
    return MemoryEstimate(
        weights=math.ceil(estimate.weights / ranks) + (gathered if ranks > 1 else 0),
        trainable_state=math.ceil(estimate.trainable_state / ranks),
        activations=estimate.activations,
        logits=estimate.logits,
        runtime=estimate.runtime,
    )


def estimate_run(
    cfg: TrainConfig,
    model_config,
    stats: DataStats,
    place: Placement,
    total_params: int,
    trainable_params: int,
    examples: int | None = None,
    ranks: int | None = None,
) -> MemoryEstimate:
    """`estimate_peak` for the largest micro-batch of the prepared data (truncated at --seq_length) that a run
    drawing `examples` examples meets (see `micro_batch_tokens`); with --shard, for one of `ranks` ranks (default:
    this run's WORLD_SIZE)."""
    estimate = _estimate_run(cfg, model_config, stats, place, total_params, trainable_params, examples)
    if not cfg.shard:
        return estimate
    ranks = ranks or int(os.environ.get("WORLD_SIZE", "1"))
    return per_rank(estimate, cfg, model_config, place.dtype, ranks)


def _estimate_run(
    cfg, model_config, stats, place, total_params, trainable_params, examples
) -> MemoryEstimate:
    lengths = [min(n, cfg.seq_length) for n in stats.lengths]
    tokens = micro_batch_tokens(lengths, cfg.batch_size, cfg.packing, examples, cfg.batch_tokens)
    # Logits are computed only where loss is (see train.loss_positions_only); in a padded batch, at every
    # position where any row has loss, which is most of the batch.
    loss_share = stats.trainable_tokens / max(stats.tokens, 1) if cfg.packing else 1.0
    return estimate_peak(
        cfg,
        model_config,
        total_params,
        trainable_params,
        place.dtype,
        place.device,
        tokens,
        loss_tokens=math.ceil(tokens * loss_share),
        fused_cross_entropy=liger_kernels(place),
        chunked_cross_entropy=(
            place.device in FUSED_DEVICES
            and cfg.method != "full"
            and int(os.environ.get("WORLD_SIZE", "1")) == 1
            and routes(model_config)
        ),
    )
