"""The fused LoRA layers (finetune.lora_fused) give PEFT's outputs and gradients, and step aside where they must."""

from __future__ import annotations

import pytest
import torch
from conftest import peft_lora_model
from finetune.lora_fused import LoRALinear, fuse_lora_layers
from transformers import AutoModelForCausalLM


def _fused_calls(model, batch) -> int:
    """How many times a forward pass of `model` on `batch` went through LoRALinear."""
    calls = []
    original = LoRALinear.apply
    LoRALinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        LoRALinear.apply = original
    return len(calls)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def test_fused_layers_match_peft_in_loss_and_every_gradient(tiny_model, batch):
    reference, fused = peft_lora_model(tiny_model), peft_lora_model(tiny_model)
    routed = fuse_lora_layers(fused)
    assert routed == sum(1 for n, _ in fused.named_modules() if n.endswith("lora_A")) > 0
    assert _fused_calls(fused, batch) == routed
    loss_ref, grads_ref = _loss_and_grads(reference, batch)
    loss, grads = _loss_and_grads(fused, batch)
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # The adapter still saves as PEFT's own weights, under PEFT's names.
    assert set(fused.state_dict()) == set(reference.state_dict())


def test_switched_off_adapters_and_dropout_run_peft_s_own_forward(tiny_model, batch):
    fused = peft_lora_model(tiny_model)
    fuse_lora_layers(fused)
    with fused.disable_adapter():
        off = fused(**batch).loss.item()
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert off == pytest.approx(base(**batch).loss.item(), rel=1e-6)

    with_dropout = peft_lora_model(tiny_model, lora_dropout=0.1)
    fuse_lora_layers(with_dropout)
    assert _fused_calls(with_dropout, batch) == 0, "dropout on the LoRA input must take PEFT's path"


def test_a_linear_with_bias_matches_its_unfused_self():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    weight, bias = torch.randn(12, 16), torch.randn(12)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    out = LoRALinear.apply(x, weight, bias, a, b, 0.5)
    expected = torch.nn.functional.linear(x, weight, bias) + (x @ a.t() @ b.t()) * 0.5
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, a, b))
    grads_expected = torch.autograd.grad(expected.square().sum(), (x, a, b))
    for got, want in zip(grads, grads_expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
