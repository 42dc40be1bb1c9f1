"""SwiGLU MLPs that keep less for the backward pass on the CPU: `silu(gate) * up` as one autograd function.

For `down_proj(act_fn(gate_proj(x)) * up_proj(x))` autograd keeps three tensors of the MLP's width per token:
gate (for SiLU's backward), silu(gate) and up (for the product's). `SiluMul` keeps gate and up and recomputes
silu(gate) in the backward pass, a few elementwise operations: one tensor of `intermediate_size` per token and
layer less, with the same results. CUDA runs get Liger's fused SwiGLU instead, where it is installed.
"""

from __future__ import annotations

import types

import torch
from transformers.activations import SiLUActivation


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad * silu
        # d silu / d gate = sig * (1 + gate * (1 - sig)) = sig + silu * (1 - sig)
        grad_gate = sig.neg().add_(1).mul_(silu).add_(sig).mul_(grad).mul_(up)
        return grad_gate, grad_up


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_swiglu(model: torch.nn.Module) -> int:
    """Route the SiLU-gated MLPs of `model` (Llama's, and those written the same way) through `SiluMul`; the
    number of MLPs routed."""
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
