"""Export: merging LoRA and QLoRA adapters (logits checked), GGUF written and read back, the Ollama Modelfile."""

from __future__ import annotations

import shutil

import export as export_cli
import llama3_70b_qlora
import pytest
import torch
from conftest import DATA, FAST, train_in_process
from finetune import export
from transformers import AutoModelForCausalLM, AutoTokenizer


def run_export(capsys, *argv) -> tuple[int | None, str, str]:
    try:
        export_cli.main([str(a) for a in argv])
    except SystemExit as exc:
        captured = capsys.readouterr()
        return exc.code, captured.out, captured.err
    captured = capsys.readouterr()
    return None, captured.out, captured.err


def assert_one_line_error(code, err: str, *expected: str) -> None:
    assert code not in (0, None) and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error:") and all(e in line for e in expected), line


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    report = export.merge(str(lora_run), str(out), dtype="float32")
    return out, report


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(export.check_ids(tokenizer)).logits


def test_merged_lora_matches_base_plus_adapter(merged, lora_run, tiny_model):
    from peft import PeftModel

    out, report = merged
    assert (
        report["max_logit_diff"] <= report["tolerance"]
        and report["adapter_effect"] > 100 * report["max_logit_diff"]
    )
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    # Independently of the merge's own check: reload both from disk and compare.
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, lora_run / "final")
    expected = _logits(with_adapter, tokenizer)
    got = _logits(AutoModelForCausalLM.from_pretrained(out), tokenizer)
    assert (got - expected).abs().max() < 1e-4
    assert (expected - _logits(AutoModelForCausalLM.from_pretrained(tiny_model), tokenizer)).abs().max() > 0.1


def test_merged_qlora_adapter_matches_on_the_unquantized_base(capsys, tiny_model, tmp_path):
    run = tmp_path / "qlora"
    train_in_process(
        llama3_70b_qlora, "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", run,
        "--max_steps", "4", "--eval_split", "0", "--learning_rate", "2e-2", *FAST,
    )  # fmt: skip
    capsys.readouterr()
    report = export.merge(str(run), str(tmp_path / "merged"))  # bfloat16, the default
    assert "QLoRA adapter: merging onto the unquantized base in bfloat16" in capsys.readouterr().out
    assert (
        report["max_logit_diff"] <= report["tolerance"]
        and report["adapter_effect"] > 3 * report["max_logit_diff"]
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    assert not any("lora" in n or "absmax" in n for n in merged.state_dict())


def test_merge_refuses_a_prequantized_base_and_names_the_fix(capsys, lora_run, tiny_model, tmp_path):
    from transformers import BitsAndBytesConfig

    quantized = tmp_path / "tiny-bnb-4bit"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    AutoModelForCausalLM.from_pretrained(
        tiny_model, quantization_config=config, device_map="cpu"
    ).save_pretrained(quantized)
    code, _, err = run_export(
        capsys, "merge", "--adapter", lora_run, "--base_model", quantized, "--output_dir", tmp_path / "m"
    )
    assert_one_line_error(code, err, "4-bit", "--base_model", f"(e.g. {tmp_path / 'tiny'})")
    assert not (tmp_path / "m").exists()


def test_merge_bad_input(capsys, lora_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    code, _, err = run_export(capsys, "merge", "--adapter", tmp_path / "nope", "--output_dir", tmp_path / "m")
    assert_one_line_error(code, err, "nope", "no such directory")

    other = tmp_path / "other-base"  # same family, another width: the adapter cannot fit
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
    ).save_pretrained(other)
    code, _, err = run_export(
        capsys, "merge", "--adapter", lora_run, "--base_model", other, "--output_dir", tmp_path / "m"
    )
    assert_one_line_error(code, err, "does not fit", str(other), "--base_model")

    (tmp_path / "full").mkdir()
    code, _, err = run_export(capsys, "merge", "--adapter", lora_run / "final", "--output_dir", tmp_path)
    assert_one_line_error(code, err, "is not empty", "--overwrite")


@pytest.mark.parametrize("outtype", export.GGUF_TYPES)
def test_gguf_is_written_and_reads_back(merged, tmp_path, outtype):
    import gguf

    model_dir, _ = merged
    target = tmp_path / f"model-{outtype}.gguf"
    report = export.to_gguf(str(model_dir), str(target), outtype=outtype)
    assert report["max_logit_diff"] is not None and report["tensors"] == 2 + 2 * 9 + 1
    assert not list(tmp_path.glob(".*partial"))

    reader = gguf.GGUFReader(str(target))
    field = {k: f.contents() for k, f in reader.fields.items()}
    assert field["general.architecture"] == "llama" and field["llama.block_count"] == 2
    assert len(field["tokenizer.ggml.tokens"]) == 1024 and field["tokenizer.ggml.model"] == "gpt2"
    assert field["tokenizer.ggml.eos_token_id"] == field["tokenizer.ggml.eot_token_id"] == 1023
    assert "<|start_header_id|>" in field["tokenizer.chat_template"]
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    expected = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert types["blk.0.attn_q.weight"] == expected
    assert types["blk.0.ffn_down.weight"] == expected


def test_gguf_q8_0_keeps_rows_that_are_not_whole_blocks_in_f16(odd_width_model, tmp_path):
    import gguf

    target = tmp_path / "odd.gguf"
    export.to_gguf(str(odd_width_model), str(target), outtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(target)).tensors}
    # ffn_down's rows are 176 wide, not whole 32-value blocks: q8_0 keeps them in f16, as llama.cpp does.
    assert types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == "Q8_0"


def test_gguf_refuses_an_adapter_and_an_existing_file(capsys, lora_run, merged, tmp_path):
    code, _, err = run_export(capsys, "gguf", "--model", lora_run, "--outfile", tmp_path / "x.gguf")
    assert_one_line_error(code, err, "LoRA adapter", "export.py merge")
    (tmp_path / "x.gguf").write_text("keep")
    code, _, err = run_export(capsys, "gguf", "--model", merged[0], "--outfile", tmp_path / "x.gguf")
    assert_one_line_error(code, err, "x.gguf", "--overwrite")
    assert (tmp_path / "x.gguf").read_text() == "keep"


def test_gguf_check_catches_unpermuted_attention(merged, tmp_path, monkeypatch):
    """The read-back compares every weight through transformers' own GGUF reader: a layout bug cannot pass."""
    from finetune.errors import UserError

    monkeypatch.setattr(export, "_permute_rows", lambda weight, heads: weight)
    with pytest.raises(UserError, match="weights differ"):
        export.to_gguf(str(merged[0]), str(tmp_path / "bad.gguf"), outtype="f16")
    assert not (tmp_path / "bad.gguf").exists()


def test_modelfile_translates_the_llama3_template(capsys, merged, tmp_path):
    model_dir, _ = merged
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(16))
    code, out, err = run_export(
        capsys, "ollama", "--gguf", gguf_file, "--model", model_dir, "--outfile", tmp_path / "Modelfile",
        "--system", "Answer in one word.",
    )  # fmt: skip
    assert code is None, err
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert (
        'TEMPLATE """{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>'
        in text
    )
    assert "{{- range .Messages }}" in text and "{{ .Content }}<|eot_id|>" in text
    assert text.count('PARAMETER stop "<|eot_id|>"') == 1 and 'PARAMETER stop "<|start_header_id|>"' in text
    assert 'SYSTEM """Answer in one word."""' in text and "ollama create" in out


def test_modelfile_without_a_llama3_template(capsys, merged, tmp_path):
    model_dir, _ = merged
    gguf_file = tmp_path / "elsewhere" / "model.gguf"
    gguf_file.parent.mkdir()
    gguf_file.write_bytes(b"GGUF" + bytes(16))
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink()  # no chat template: the SFT scripts used the Alpaca prompt
    code, _, err = run_export(
        capsys, "ollama", "--gguf", gguf_file, "--model", plain, "--outfile", plain / "Modelfile"
    )
    assert code is None, err
    text = (plain / "Modelfile").read_text()
    assert f"FROM {gguf_file}" in text and "### Instruction:\n{{ .Prompt }}\n\n### Response:\n" in text
    assert 'PARAMETER stop "### Instruction:"' in text

    (plain / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"
    )
    code, _, err = run_export(
        capsys, "ollama", "--gguf", gguf_file, "--model", plain, "--outfile", plain / "M2"
    )
    assert code is None and "generic TEMPLATE" in err
    assert "{{ .Role }}: {{ .Content }}" in (plain / "M2").read_text()

    code, _, err = run_export(capsys, "ollama", "--gguf", plain / "config.json", "--model", plain)
    assert_one_line_error(code, err, "config.json", "not a GGUF file")
