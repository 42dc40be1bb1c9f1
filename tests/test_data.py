"""Data formats, detection, rendering, response-only masking, loaders and padding-free packing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import DATA
from finetune.attention import PACKED_SDPA, flat_rows, segments
from finetune.config import TrainConfig
from finetune.data import (
    IGNORE_INDEX,
    Collator,
    build_examples,
    detect_format,
    load_rows,
    pack_rows,
    prepare_data,
    real_tokens,
    render,
    to_example,
    tokenize,
)
from finetune.model import load_tokenizer
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    """The same tokenizer without a chat template: conversations fall back to the Alpaca prompt."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{"model_name": "tiny", "output_dir": "unused", "seq_length": 512, **overrides})


def _loss_text(tokenizer, example: dict) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    )


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("alpaca.jsonl", "alpaca"),
        ("messages.jsonl", "messages"),
        ("sharegpt.jsonl", "sharegpt"),
        ("text.jsonl", "text"),
    ],
)
def test_formats_are_detected_from_columns(file, expected):
    rows = load_rows(str(DATA / file))
    assert detect_format(rows, "auto", file) == expected


def test_sharegpt_roles_become_chat_roles():
    rows = load_rows(str(DATA / "sharegpt.jsonl"))
    roles = {m["role"] for row in rows for m in to_example(row, "sharegpt")}
    assert roles <= {"system", "user", "assistant"} and "assistant" in roles


def test_chat_masking_keeps_only_assistant_turns(tokenizer):
    rows = load_rows(str(DATA / "messages.jsonl"))
    for row in rows:
        messages = to_example(row, "messages")
        example = tokenize(tokenizer, *render(tokenizer, messages), train_on_prompt=False)
        expected = "".join(m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant")
        assert _loss_text(tokenizer, example).replace(" ", "") == expected.replace(" ", ""), row.where


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    multi = next(
        r
        for r in load_rows(str(DATA / "messages.jsonl"))
        if sum(m["role"] == "assistant" for m in r.values["messages"]) > 1
    )
    messages = to_example(multi, "messages")
    text = _loss_text(tokenizer, tokenize(tokenizer, *render(tokenizer, messages), train_on_prompt=False))
    for m in messages:
        assert (m["content"].strip() in text) == (m["role"] == "assistant")


def test_alpaca_without_chat_template_uses_the_alpaca_prompt(plain_tokenizer):
    row = next(r for r in load_rows(str(DATA / "alpaca.jsonl")) if r.values["input"])
    text, spans = render(plain_tokenizer, to_example(row, "alpaca"))
    assert "### Instruction:\n" + row.values["instruction"] in text
    assert "### Input:\n" + row.values["input"] in text and "### Response:\n" in text
    example = tokenize(plain_tokenizer, text, spans, train_on_prompt=False)
    assert (
        _loss_text(plain_tokenizer, example).strip()
        == row.values["output"].strip() + plain_tokenizer.eos_token
    )


def test_train_on_prompt_and_text_rows_train_on_everything(tokenizer):
    rows = load_rows(str(DATA / "alpaca.jsonl"))[:4]
    examples, _ = build_examples(rows, "alpaca", tokenizer, _config(train_on_prompt=True))
    for example in examples:
        assert example["labels"][0] == IGNORE_INDEX and example["labels"][1:] == example["input_ids"][1:]
    text_rows = load_rows(str(DATA / "text.jsonl"))[:4]
    examples, _ = build_examples(text_rows, "text", tokenizer, _config())
    assert all(e["labels"][1:] == e["input_ids"][1:] for e in examples)


def test_long_examples_are_truncated_and_promptless_ones_dropped(tokenizer):
    rows = load_rows(str(DATA / "alpaca.jsonl"))
    lengths = [
        len(tokenize(tokenizer, *render(tokenizer, to_example(r, "alpaca")), False)["input_ids"])
        for r in rows
    ]
    limit = sorted(lengths)[len(lengths) // 2]
    examples, stats = build_examples(rows, "alpaca", tokenizer, _config(seq_length=limit))
    assert all(len(e["input_ids"]) <= limit for e in examples)
    assert stats.truncated == sum(n > limit for n in lengths)
    assert stats.dropped + len(examples) == len(rows)


def test_eval_split_is_held_out_and_reproducible(tokenizer):
    cfg = _config(dataset=str(DATA / "alpaca.jsonl"), eval_split=0.25)
    first, second = prepare_data(cfg, tokenizer), prepare_data(cfg, tokenizer)
    assert len(first.eval) == 12 and len(first.train) + len(first.eval) == 48
    assert [e["input_ids"] for e in first.eval] == [e["input_ids"] for e in second.eval]
    train_ids = {tuple(e["input_ids"]) for e in first.train}
    assert not any(tuple(e["input_ids"]) in train_ids for e in first.eval)


def test_json_csv_parquet_and_directories_load_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.values for r in load_rows(str(DATA / "alpaca.jsonl"))]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    import csv

    with (tmp_path / "rows.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in ("rows.json", "rows.parquet", "rows.csv"):
        assert [r.values for r in load_rows(str(tmp_path / name))] == rows, name
    assert len(load_rows(str(tmp_path))) == 3 * len(rows)


def test_packed_batches_restart_positions_and_mask_boundaries():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    packed = Collator(pad_token_id=0, packing=True)(features)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert packed["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert real_tokens(packed) == (5, 2)
    padded = Collator(pad_token_id=0, packing=False)(features)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert real_tokens(padded) == (5, 2)


def test_rows_are_packed_best_fit_decreasing_within_the_row_length():
    lengths = [5, 3, 4, 2, 6, 1, 9]
    rows = pack_rows(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10: no space left over
    assert pack_rows([12, 3], 10) == [[0], [1]]  # longer than a row: a row of its own


def test_packed_rows_pad_with_one_token_pieces():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9], "labels": [-100, 9]},
        {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]},
    ]
    rows = Collator(pad_token_id=0, packing=True, row_length=5)(features)
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4, 0], [5, 6, 7, 8, 9]]
    assert rows["labels"][0, -1] == IGNORE_INDEX
    assert real_tokens(rows) == (9, 3)
    assert segments(rows["position_ids"]) == [[(0, 4, False), (4, 5, True)], [(0, 3, False), (3, 5, False)]]
    flat = Collator(pad_token_id=0, packing=True, row_length=5, flat=True)(features)
    assert flat["input_ids"].shape == (1, 9) and real_tokens(flat) == (9, 3)


@pytest.mark.parametrize(
    ("attention", "row_length"), [("sdpa", None), ("eager", 128), (PACKED_SDPA, 96), (PACKED_SDPA, None)]
)
def test_packed_examples_do_not_attend_to_each_other(tiny_model, tokenizer, attention, row_length):
    """Packing is exact: each packed example gets the logits it gets on its own, and the loss is the padded
    batch's, whether the examples share one row or several rows of at most `row_length` tokens."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    rows = load_rows(str(DATA / "alpaca.jsonl"))[:6]
    examples, _ = build_examples(rows, "alpaca", tokenizer, _config())
    packed = Collator(tokenizer.pad_token_id, packing=True, row_length=row_length)(examples)
    padded = Collator(tokenizer.pad_token_id, packing=False)(examples)
    if row_length:
        assert packed["input_ids"].shape[0] > 1 and packed["input_ids"].shape[1] <= max(
            row_length, max(len(e["input_ids"]) for e in examples)
        )
    with torch.no_grad():  # use_cache=False as in training: with a KV cache transformers cannot unpack
        packed_out = model(**packed, use_cache=False)
        padded_out = model(**padded, use_cache=False)
        alone = {
            tuple(e["input_ids"]): model(torch.tensor([e["input_ids"]]), use_cache=False).logits[0]
            for e in examples
        }
    for row, positions, logits in zip(
        packed["input_ids"], packed["position_ids"], packed_out.logits, strict=True
    ):
        for start, end, single in segments(positions[None])[0]:
            if not single:
                torch.testing.assert_close(
                    logits[start:end], alone[tuple(row[start:end].tolist())], atol=1e-4, rtol=1e-4
                )
    torch.testing.assert_close(packed_out.loss, padded_out.loss, atol=1e-5, rtol=1e-5)


def test_packed_attention_gradients_are_each_example_s_own():
    """Backwards too, each packed example (one-token pieces included) gets the gradients it gets alone."""
    from finetune.attention import packed_sdpa_forward

    torch.manual_seed(0)
    lengths, heads, kv_heads, dim = [5, 1, 7, 3], 4, 2, 8
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    tokens = positions.shape[1]
    q = torch.randn(1, heads, tokens, dim, requires_grad=True)
    k, v = (torch.randn(1, kv_heads, tokens, dim, requires_grad=True) for _ in range(2))
    out, _ = packed_sdpa_forward(None, q, k, v, None, position_ids=positions)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    alone, start = [], 0
    for n in lengths:
        piece = slice(start, start + n)
        alone.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, piece], k[:, :, piece].repeat_interleave(2, 1), v[:, :, piece].repeat_interleave(2, 1),
                is_causal=True,
            )
        )  # fmt: skip
        start += n
    expected = torch.cat(alone, dim=2).transpose(1, 2)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    torch.testing.assert_close(out, expected)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_training_packs_a_micro_batch_into_one_row_unless_the_attention_builds_a_mask(tokenizer):
    """sdpa (run as packed_sdpa) and the flash kernels take one flat row, with no padding at all; eager, whose
    mask is quadratic in the row, takes rows of at most --seq_length."""
    examples, _ = build_examples(load_rows(str(DATA / "alpaca.jsonl")), "alpaca", tokenizer, _config())
    tokens = sum(len(e["input_ids"]) for e in examples)
    for attention in ("sdpa", PACKED_SDPA, "flash_attention_2", "eager"):
        batch = Collator(tokenizer.pad_token_id, True, 128, flat_rows(attention))(examples)
        if attention == "eager":
            longest = max(len(e["input_ids"]) for e in examples)
            assert batch["input_ids"].shape[0] > 1 and batch["input_ids"].shape[1] <= max(128, longest)
        else:
            assert tuple(batch["input_ids"].shape) == (1, tokens)


def test_packed_sdpa_materialises_no_mask(tiny_model, tokenizer, monkeypatch):
    """The packed attention builds no L x L mask (transformers' sdpa does, for packed rows) and hands padded
    batches to transformers' SDPA with their mask."""
    import transformers.masking_utils as masking

    built = []
    original = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **k: built.append(k) or original(*a, **k))
    import finetune.attention as attention

    monkeypatch.setattr(attention, "sdpa_mask", masking.sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=PACKED_SDPA).eval()
    examples, _ = build_examples(load_rows(str(DATA / "alpaca.jsonl"))[:4], "alpaca", tokenizer, _config())
    with torch.no_grad():
        model(**Collator(tokenizer.pad_token_id, packing=True, row_length=128)(examples), use_cache=False)
        assert built == []
        model(**Collator(tokenizer.pad_token_id, packing=False)(examples), use_cache=False)
    assert len(built) == 1 and built[0]["attention_mask"] is not None


def test_packed_attention_finds_the_examples_once_per_forward_pass(tiny_model, tokenizer, monkeypatch):
    """Every layer gets the same position ids: their examples are found once per pass (on CUDA each finding is a
    host sync), again for new position ids or ones changed in place, and the logits are those found afresh."""
    import finetune.attention as attention

    calls = []
    monkeypatch.setattr(attention, "segments", lambda ids: calls.append(ids) or segments(ids))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=PACKED_SDPA).eval()
    assert model.config.num_hidden_layers > 1
    examples, _ = build_examples(load_rows(str(DATA / "alpaca.jsonl"))[:4], "alpaca", tokenizer, _config())
    batch = Collator(tokenizer.pad_token_id, packing=True)(examples)
    with torch.no_grad():
        first = model(**batch, use_cache=False).logits
        assert len(calls) == 1
        model(**{**batch, "position_ids": batch["position_ids"].clone()}, use_cache=False)
        assert len(calls) == 2
        batch["position_ids"][:] = torch.arange(batch["position_ids"].shape[1])  # one example now
        whole = model(**batch, use_cache=False).logits
    assert len(calls) == 3
    assert segments(batch["position_ids"]) == [[(0, batch["position_ids"].shape[1], False)]]
    assert not torch.allclose(first, whole)


def test_separate_eval_dataset_replaces_the_split(tokenizer):
    cfg = _config(
        dataset=str(DATA / "alpaca.jsonl"), eval_dataset=str(DATA / "messages.jsonl"), eval_split=0.5
    )
    data = prepare_data(cfg, tokenizer)
    assert len(data.train) == 48 and len(data.eval) == 24
    assert data.eval_stats.format == "messages"
