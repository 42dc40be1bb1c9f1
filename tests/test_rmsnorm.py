"""The fused RMSNorm (finetune.rmsnorm) gives LlamaRMSNorm's outputs and gradients, and routes only its copies."""

from __future__ import annotations

import pytest
import torch
from finetune.rmsnorm import RMSNorm, fuse_rms_norms
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_llama_s_norm_with_a_trained_weight(dtype, tolerance):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 64, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 7, 64, dtype=dtype)
    expected = norm(x)
    want = torch.autograd.grad(expected, (x, norm.weight), grad)
    out = RMSNorm.apply(x, norm.weight, 1e-5)
    got = torch.autograd.grad(out, (x, norm.weight), grad)
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=tolerance, rtol=tolerance)


def test_a_routed_model_trains_as_before(tiny_model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 24), generator=generator)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    fused = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    # Two per decoder layer and the final one.
    assert fuse_rms_norms(fused) == 2 * fused.config.num_hidden_layers + 1
    losses = []
    for model in (reference, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, p), q in zip(fused.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_norms_written_differently_keep_their_own_forward():
    class ScaledNorm(LlamaRMSNorm):
        def forward(self, hidden_states):  # Gemma's: (1 + weight)
            return super().forward(hidden_states) + hidden_states * 0

    model = torch.nn.Sequential(ScaledNorm(8), LlamaRMSNorm(8))
    assert fuse_rms_norms(model) == 1
    assert "forward" not in vars(model[0]) and "forward" in vars(model[1])
