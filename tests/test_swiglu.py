"""The SwiGLU MLPs (finetune.swiglu) give the same loss and gradients, and keep one MLP-wide tensor per token
and layer less for the backward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import peft_lora_model
from finetune.swiglu import fuse_swiglu
from transformers import AutoModelForCausalLM


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def _saved_bytes(model, batch) -> tuple[float, int]:
    """(the loss, the bytes of the tensors autograd keeps for the backward pass, the weights left out)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    return loss, sum(storages.values())


def test_fused_mlps_match_in_loss_and_every_gradient_and_keep_less(tiny_model, batch):
    reference, fused = _model(tiny_model), _model(tiny_model)
    layers = fused.config.num_hidden_layers
    assert fuse_swiglu(fused) == layers
    loss_ref, kept_ref = _saved_bytes(reference, batch)
    loss, kept = _saved_bytes(fused, batch)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    loss_ref.backward()
    loss.backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    tokens, width = batch["input_ids"].numel(), fused.config.intermediate_size
    assert kept_ref - kept == layers * tokens * width * 4  # silu(gate), float32, in each layer


def test_only_silu_gated_mlps_are_routed(tiny_model):
    model = _model(tiny_model)
    model.config.hidden_act = "gelu"
    from transformers.activations import ACT2FN

    for layer in model.model.layers:
        layer.mlp.act_fn = ACT2FN["gelu"]
    assert fuse_swiglu(model) == 0


def test_lora_mlps_recompute_the_down_projection_input_and_match_peft(tiny_model, batch):
    """With LoRA on every projection, the MLP keeps gate and up only: down_proj's input, which its adapter's
    gradient needs, is recomputed. Loss and every adapter gradient are PEFT's."""
    from finetune.lora_fused import fuse_lora_layers

    reference, fused = peft_lora_model(tiny_model), peft_lora_model(tiny_model)
    fuse_lora_layers(fused)
    layers = fuse_swiglu(fused)
    loss_ref, kept_ref = _saved_bytes(reference, batch)
    loss, kept = _saved_bytes(fused, batch)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    loss_ref.backward()
    loss.backward()
    trained = [(n, p) for n, p in fused.named_parameters() if p.requires_grad]
    assert any("down_proj.lora_A" in n for n, _ in trained)
    for (name, p), q in zip(trained, [q for q in reference.parameters() if q.requires_grad], strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    tokens, width = batch["input_ids"].numel(), fused.config.intermediate_size
    assert kept_ref - kept >= layers * tokens * width * 4 * 2  # silu(gate) and silu(gate) * up, float32
