"""LoRA linear layers as one autograd function on the CPU: the same weights, outputs and gradients as PEFT's.

PEFT computes `base(x) + lora_B(lora_A(x)) * scaling`: a full-width product, a full-width multiply and a full-width
add per layer, and autograd takes lora_B's weight gradient as `grad_out.T @ (x A^T)`, a product whose transposed
operand MKL runs ~9x slower than the same product taken the other way round (measured here, 4608 tokens x 4096
outputs x rank 8: 455 ms against 52 ms). `LoRALinear` scales the rank-r tensor instead, adds the adapter into the
base output in place (addmm_), and takes every gradient in the fast orientation. On bench/peers.py's 63M model, a
forward and backward pass over one 4608-token micro-batch took 21.4 s instead of PEFT's 25.7 s on 2 CPU cores
(medians of 3, alternating in one process: bench/lora_fused.py).

Only plain LoRA on an unquantized, frozen nn.Linear goes this way, one adapter active and no dropout; anything
else (DoRA, 4-bit bases, several adapters, adapters switched off, merged weights) runs PEFT's own forward.
"""

from __future__ import annotations

import types

import torch


def lora_forward(flat, weight, bias, lora_a, lora_b, scaling: float):
    """(x W^T + b + s (x A^T) B^T, x A^T) for a 2-D `flat` input."""
    low = flat @ lora_a.t()  # tokens x r
    out = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
    out.addmm_(low, lora_b.t(), alpha=scaling)
    return out, low


def lora_backward(grad, flat, low, weight, lora_a, lora_b, scaling: float, needs: tuple[bool, bool, bool]):
    """(grad x, grad A, grad B) of `lora_forward` for a 2-D `grad`; each None unless `needs` (x, A, B) asks."""
    grad_low = grad @ lora_b  # tokens x r
    grad_x = grad_a = grad_b = None
    if needs[1]:
        grad_a = (grad_low.t() @ flat).mul_(scaling)
    if needs[2]:
        grad_b = (low.t() @ grad).t().mul_(scaling)  # (r x tokens) @ (tokens x out), not grad.T @ low
    if needs[0]:
        grad_x = (grad @ weight).addmm_(grad_low, lora_a, alpha=scaling)
    return grad_x, grad_a, grad_b


class LoRALinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T, with W and b frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        flat = x.reshape(-1, x.shape[-1])
        out, low = lora_forward(flat, weight, bias, lora_a, lora_b, scaling)
        ctx.save_for_backward(flat, low, weight, lora_a, lora_b)
        ctx.scaling, ctx.shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat, low, weight, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x, grad_a, grad_b = lora_backward(
            grad.reshape(-1, grad.shape[-1]), flat, low, weight, lora_a, lora_b, ctx.scaling,
            (needs[0], needs[3], needs[4]),
        )  # fmt: skip
        return None if grad_x is None else grad_x.view(ctx.shape), None, None, grad_a, grad_b, None


def _plain_adapter(layer, x: torch.Tensor) -> str | None:
    """The one active adapter when `layer` can take the fused path for input `x`, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    base, lora_a = layer.base_layer, layer.lora_A[name]
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) or type(base) is not torch.nn.Linear:
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if x.dtype != lora_a.weight.dtype or x.dtype != base.weight.dtype:
        return None
    return name


def lora_parts(layer, x: torch.Tensor) -> tuple | None:
    """(weight, bias, A, B, scaling) of `layer` when it is a PEFT LoRA linear layer that can take the fused path
    for input `x`, else None."""
    from peft.tuners.lora.layer import Linear

    if type(layer) is not Linear or getattr(layer, "fan_in_fan_out", False):
        return None
    name = _plain_adapter(layer, x)
    if name is None:
        return None
    base = layer.base_layer
    return (
        base.weight,
        base.bias,
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        float(layer.scaling[name]),
    )


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    parts = None if args or kwargs else lora_parts(self, x)
    if parts is None:
        return type(self).forward(self, x, *args, **kwargs)
    return LoRALinear.apply(x, *parts)


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route PEFT's LoRA linear layers in `model` through `LoRALinear`; the number of layers routed."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear and not getattr(module, "fan_in_fan_out", False):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
