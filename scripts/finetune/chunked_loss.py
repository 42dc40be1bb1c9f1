"""The lm_head and its cross-entropy in chunks of positions on the CPU: never the whole logits tensor.

A causal LM's logits are vocabulary-wide (128,256 columns for Llama 3) and upcast to float32 for the loss, which
keeps them, their log-softmax and both gradients for the backward pass: ~12 bytes per vocabulary entry and
position with loss, more than the decoder layers' activations at 8B width. `LinearCrossEntropy` computes the
logits of a few hundred positions at a time and, for the hidden states, their gradient at once, so it keeps one
chunk of logits and one hidden-wide gradient per position. This is what Liger's fused loss does on CUDA
(model.liger_kernels); here in PyTorch, for the CPU, where Liger's kernels do not run.

Routed (`applies`): single-process training of models whose forward after the decoder is LlamaForCausalLM's word
for word (Llama, Mistral, Qwen 2 and 3 copy it: lm_head, then transformers' causal-LM loss), with a frozen,
bias-free lm_head (LoRA and QLoRA). Full fine-tuning, which trains lm_head, keeps transformers' loss.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from .data import IGNORE_INDEX
from .model import FUSED_DEVICES

CHUNK_BYTES = 1 << 28  # float32 logits of one chunk: 256 MiB


class LinearCrossEntropy(torch.autograd.Function):
    """sum over positions with a target of cross_entropy(hidden @ weight.T, target) / divisor, as transformers'
    causal-LM loss computes it (logits in hidden's dtype, upcast to float32), for a frozen `weight`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, divisor: float):
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            chunk, target = hidden[start : start + rows], targets[start : start + rows]
            logits = (chunk @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = target != IGNORE_INDEX
            index = target.clamp_min(0).unsqueeze(1)
            total += ((lse - logits.gather(1, index).squeeze(1)) * valid).sum()
            if grad_hidden is not None:
                # d loss / d logits = (softmax - one_hot(target)) / divisor, zero where there is no target.
                grad = logits.sub_(lse.unsqueeze(1)).exp_()
                grad.scatter_add_(1, index, -valid.float().unsqueeze(1)).mul_(valid.unsqueeze(1) / divisor)
                grad_hidden[start : start + rows] = grad.to(hidden.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return (
            (None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)),
            None,
            None,
            None,
        )


@functools.cache
def _head_source(model_class: type) -> str:
    """The part of a causal LM's forward after its decoder: the lm_head and the loss."""
    source = inspect.getsource(model_class.forward)
    return source[source.index("outputs") :]


def routes(model_config) -> bool:
    """Whether the causal LM class for `model_config` computes its head and loss as Llama's does."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(model_config), None)
    return model_class is not None and _head_source(model_class) == _head_source(LlamaForCausalLM)


def applies(causal_lm) -> bool:
    """Whether `causal_lm` (a PEFT model's base included, in a single process) trains with the chunked loss."""
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and head.weight.device.type in FUSED_DEVICES
        and _head_source(type(causal_lm)) == _head_source(LlamaForCausalLM)
    )


def causal_lm_loss(causal_lm, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """The loss `causal_lm(**inputs).loss` would be for train.loss_positions_only's `inputs`, through the decoder
    and LinearCrossEntropy. Divided by `num_items_in_batch` when given (the Trainer's count over the accumulated
    micro-batches), else by this micro-batch's positions with a target, as transformers does."""
    skip = {"labels", "logits_to_keep", "shift_labels", "num_items_in_batch"}
    hidden = causal_lm.model(**{k: v for k, v in inputs.items() if k not in skip}, use_cache=False)
    hidden = hidden.last_hidden_state[:, inputs["logits_to_keep"]]
    targets = inputs["shift_labels"].reshape(-1)
    if num_items_in_batch is None:
        divisor = float((targets != IGNORE_INDEX).sum())
    else:
        divisor = float(num_items_in_batch)
    weight = causal_lm.get_output_embeddings().weight
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, divisor)
