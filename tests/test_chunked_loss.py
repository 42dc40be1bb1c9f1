"""The chunked lm_head + cross-entropy: transformers' loss and gradients, without the whole logits tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import peft_lora_model
from finetune import chunked_loss
from finetune.chunked_loss import LinearCrossEntropy, applies, causal_lm_loss, routes
from finetune.data import IGNORE_INDEX
from finetune.train import loss_positions_only
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen3Config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_cross_entropy_across_chunks(monkeypatch, dtype):
    vocab, hidden_size, positions = 300, 16, 50
    monkeypatch.setattr(
        chunked_loss, "CHUNK_BYTES", 7 * vocab * 4
    )  # 7 positions a chunk: 8 chunks, the last short
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=generator).to(dtype)
    targets = torch.randint(0, vocab, (positions,), generator=generator)
    targets[::4] = IGNORE_INDEX
    divisor = 123.0  # as the Trainer's count over accumulated micro-batches

    expected = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum") / divisor
    (expected * 3).backward()
    expected_grad, hidden.grad = hidden.grad, None
    loss = LinearCrossEntropy.apply(hidden, weight, targets, divisor)
    (loss * 3).backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # bfloat16: both round d loss / d logits to bfloat16 before the product with the weight, at other scales.
    largest = expected_grad.abs().max().item()
    tolerance = (
        {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2 * largest}
    )
    torch.testing.assert_close(hidden.grad, expected_grad, **tolerance)
    assert hidden.grad[::4].abs().sum() == 0 and hidden.grad[1::4].abs().sum() > 0


def test_a_lora_model_s_loss_and_adapter_gradients_are_transformers(tiny_model, monkeypatch):
    monkeypatch.setattr(
        chunked_loss, "CHUNK_BYTES", 5 * 4 * 1024
    )  # a few positions a chunk at this vocabulary
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (1, 40), generator=generator)
    labels = ids.clone()
    labels[:, :15] = IGNORE_INDEX  # a prompt without loss
    batch = loss_positions_only({"input_ids": ids, "labels": labels, "position_ids": torch.arange(40)[None]})
    reference, ours = peft_lora_model(tiny_model), peft_lora_model(tiny_model)
    base = ours.get_base_model()
    assert applies(base)

    expected = reference(**batch).loss
    expected.backward()
    loss = causal_lm_loss(base, batch)
    loss.backward()

    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    for (name, p), q in zip(trained, [q for q in reference.parameters() if q.requires_grad], strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_routed_only_where_the_head_is_llama_s_and_frozen(tiny_model):
    assert routes(LlamaConfig()) and routes(Qwen3Config())
    assert not routes(Gemma2Config()), "Gemma 2 soft-caps its logits"
    full = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not applies(full), "full fine-tuning trains lm_head: transformers' loss"
