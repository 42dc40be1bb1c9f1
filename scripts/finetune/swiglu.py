"""SwiGLU MLPs that keep less for the backward pass on the CPU.

For `down_proj(act_fn(gate_proj(x)) * up_proj(x))` autograd keeps three tensors of the MLP's width per token
besides the input: gate (for SiLU's backward), silu(gate) and up (for the product's). Two tensors carry all of
it: `SiluMul` keeps gate and up and recomputes silu(gate) in the backward pass; where down_proj is a fusable LoRA
layer (finetune.lora_fused), `SwiGLULoRADown` also recomputes down_proj's input, silu(gate) * up, which its
adapter's gradient needs. That is one MLP-wide tensor per token and layer less, or two with LoRA on down_proj
(64 MiB per layer for a 4,096-token micro-batch of bench/peers.py's model), for a few elementwise operations and
the same results. CUDA runs get Liger's fused SwiGLU instead, where it is installed.
"""

from __future__ import annotations

import types

import torch
from transformers.activations import SiLUActivation

from .lora_fused import lora_backward, lora_forward, lora_parts


def silu_mul_backward(grad, gate, up, grad_is_scratch: bool = False):
    """(grad gate, grad up) of silu(gate) * up. With `grad_is_scratch` grad gate is written into `grad`."""
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_up = grad * silu
    # d silu / d gate = sig * (1 + gate * (1 - sig)), computed in silu's buffer
    dsilu = silu.copy_(sig).neg_().add_(1).mul_(gate).add_(1).mul_(sig)
    del sig
    grad_gate = (grad.mul_(dsilu) if grad_is_scratch else grad * dsilu).mul_(up)
    return grad_gate, grad_up


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return silu_mul_backward(grad, gate, up)


class SwiGLULoRADown(torch.autograd.Function):
    """down(silu(gate) * up) with down a frozen linear layer plus a LoRA adapter, saving gate, up and the
    adapter's rank-r activation only."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling: float):
        hidden = torch.nn.functional.silu(gate).mul_(up)
        flat = hidden.reshape(-1, hidden.shape[-1])
        out, low = lora_forward(flat, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(gate, up, low, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        gate, up, low, weight, lora_a, lora_b = ctx.saved_tensors
        hidden = torch.nn.functional.silu(gate).mul_(up)
        needs = ctx.needs_input_grad
        grad_hidden, grad_a, grad_b = lora_backward(
            grad.reshape(-1, grad.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), low, weight, lora_a, lora_b,
            ctx.scaling, (needs[0] or needs[1], needs[4], needs[5]),
        )  # fmt: skip
        del hidden
        grad_gate = grad_up = None
        if grad_hidden is not None:
            grad_gate, grad_up = silu_mul_backward(
                grad_hidden.view(gate.shape), gate, up, grad_is_scratch=True
            )
        return grad_gate, grad_up, None, None, grad_a, grad_b, None


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = lora_parts(self.down_proj, gate)
    if down is not None:
        return SwiGLULoRADown.apply(gate, up, *down)
    return self.down_proj(SiluMul.apply(gate, up))


def fuse_swiglu(model: torch.nn.Module) -> int:
    """Route the SiLU-gated MLPs of `model` (Llama's, and those written the same way) through `SiluMul`, or
    `SwiGLULoRADown` where down_proj carries a plain LoRA adapter; the number of MLPs routed."""
    count = 0
    for module in model.modules():
        if (
            type(module).__name__.endswith("MLP")
            and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)) in (SiLUActivation, torch.nn.SiLU)
        ):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
