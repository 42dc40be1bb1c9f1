"""Bad input: one line naming the culprit, a non-zero exit, no traceback, nothing lost."""

from __future__ import annotations

import json

import llama3_8b_lora
import llama3_70b_qlora
import pytest
from conftest import DATA, FAST
from finetune.playbook import main


def run_main(capsys, *argv, defaults=llama3_8b_lora.DEFAULTS) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv], prog="test", description="test", defaults=defaults)
    err = capsys.readouterr().err
    return exit_info.value.code, err


def assert_one_line_error(code: int, err: str, *expected: str) -> None:
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(("error:", "test: error:")), err
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"


@pytest.fixture
def base_args(tiny_model, tmp_path):
    return ["--model_name", tiny_model, "--output_dir", tmp_path / "out", "--max_steps", "2", *FAST]


def _write(path, text: str):
    path.write_text(text)
    return path


def test_missing_dataset_file(capsys, base_args, tmp_path):
    code, err = run_main(capsys, *base_args, "--dataset", tmp_path / "nope.jsonl")
    assert_one_line_error(code, err, "nope.jsonl", "no such file")


def test_malformed_json_line_names_file_and_line(capsys, base_args, tmp_path):
    good = (DATA / "alpaca.jsonl").read_text().splitlines()
    bad = _write(tmp_path / "bad.jsonl", "\n".join(good[:2] + ['{"instruction": "x", "output": '] + good[2:]))
    code, err = run_main(capsys, *base_args, "--dataset", bad)
    assert_one_line_error(code, err, "bad.jsonl:3", "malformed JSON")


def test_unknown_columns_are_listed(capsys, base_args, tmp_path):
    data = _write(tmp_path / "odd.jsonl", json.dumps({"question": "q", "answer": "a"}) + "\n")
    code, err = run_main(capsys, *base_args, "--dataset", data)
    assert_one_line_error(code, err, "answer, question", "instruction+output", "messages")


def test_forced_format_names_missing_and_found_columns(capsys, base_args):
    code, err = run_main(
        capsys, *base_args, "--dataset", DATA / "alpaca.jsonl", "--dataset_format", "messages"
    )
    assert_one_line_error(code, err, "needs column(s) messages", "found input, instruction, output")


def test_empty_dataset(capsys, base_args, tmp_path):
    code, err = run_main(capsys, *base_args, "--dataset", _write(tmp_path / "empty.jsonl", "\n"))
    assert_one_line_error(code, err, "empty.jsonl", "empty")


def test_dataset_size_zero(capsys, base_args):
    code, err = run_main(capsys, *base_args, "--dataset", DATA / "alpaca.jsonl", "--dataset_size", "0")
    assert_one_line_error(code, err, "--dataset_size 0")


def test_every_example_too_long(capsys, base_args):
    code, err = run_main(capsys, *base_args, "--dataset", DATA / "alpaca.jsonl", "--seq_length", "8")
    assert_one_line_error(code, err, "--seq_length 8", "no training example")


def test_missing_model_directory(capsys, tmp_path):
    code, err = run_main(capsys, "--model_name", tmp_path / "no-model", "--output_dir", tmp_path / "o")
    assert_one_line_error(code, err, "no-model", "no such directory")


def test_hub_model_while_offline_says_how_to_work_offline(capsys, tmp_path):
    code, err = run_main(
        capsys, "--model_name", "meta-llama/Llama-3.1-8B-Instruct", "--output_dir", tmp_path / "o"
    )
    assert_one_line_error(
        code, err, "meta-llama/Llama-3.1-8B-Instruct", "HF_HUB_OFFLINE=1", "local directory"
    )


def test_default_hub_dataset_while_offline_says_how_to_pass_a_file(capsys, tiny_model, tmp_path):
    code, err = run_main(capsys, "--model_name", tiny_model, "--output_dir", tmp_path / "o")
    assert_one_line_error(code, err, "tatsu-lab/alpaca", "--dataset")


def test_gated_model_says_how_to_log_in(capsys, monkeypatch, tmp_path):
    import httpx
    import transformers
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        response = httpx.Response(401, request=httpx.Request("GET", "https://huggingface.co/x"))
        try:
            raise GatedRepoError("Access to model is restricted.", response=response)
        except GatedRepoError as exc:
            raise OSError("You are trying to access a gated repo.") from exc

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", gated)
    code, err = run_main(
        capsys, "--model_name", "meta-llama/Llama-3.1-8B-Instruct", "--output_dir", tmp_path / "o"
    )
    assert_one_line_error(code, err, "gated", "hf auth login")


def test_qlora_without_working_bitsandbytes(capsys, monkeypatch, base_args):
    import bitsandbytes.functional

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", broken)
    code, err = run_main(
        capsys, *base_args, "--dataset", DATA / "alpaca.jsonl", defaults=llama3_70b_qlora.DEFAULTS
    )
    # Without a GPU (as here), the way out is a bitsandbytes with a CPU backend: the flake's CPU shell.
    assert_one_line_error(
        code, err, "QLoRA", "bitsandbytes", "no kernel for this device", "nix develop .#pytorch-fine-tune-cpu"
    )


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--learning_rate", "-1e-4", "--learning_rate -0.0001"),
        ("--lora_rank", "0", "--lora_rank 0"),
        ("--eval_split", "1.5", "--eval_split 1.5"),
        ("--eval_split", "-0.1", "--eval_split -0.1"),
        ("--batch_size", "0", "--batch_size 0"),
        ("--dtype", "float8", "--dtype 'float8'"),
        ("--max_steps", "0", "--max_steps 0"),
        ("--batch_tokens", "-1", "--batch_tokens -1"),
        ("--batch_tokens", "100", "must be at least --seq_length"),
    ],
)
def test_bad_flag_values(capsys, base_args, flag, value, expected):
    code, err = run_main(capsys, *base_args, "--dataset", DATA / "alpaca.jsonl", flag, value)
    assert_one_line_error(code, err, expected)


def test_batch_tokens_needs_packing(capsys, base_args):
    code, err = run_main(
        capsys, *base_args, "--dataset", DATA / "alpaca.jsonl", "--batch_tokens", "4096", "--no_packing"
    )
    assert_one_line_error(code, err, "--batch_tokens 4096", "--no_packing")


def test_malformed_flag_value_is_an_argparse_error(capsys, base_args):
    code, err = run_main(capsys, *base_args, "--batch_size", "eight")
    assert code == 2 and "--batch_size" in err and "Traceback" not in err


def test_unknown_yaml_key(capsys, base_args, tmp_path):
    config = _write(tmp_path / "run.yaml", "learning_rate: 1e-4\nlora_rnak: 16\n")
    code, err = run_main(capsys, *base_args, "--config", config)
    assert_one_line_error(code, err, "run.yaml", "lora_rnak")


def test_foreign_output_directory_is_left_alone(capsys, tiny_model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    code, err = run_main(
        capsys, "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out
    )
    assert_one_line_error(code, err, str(out), "--overwrite_output_dir")
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_different_run_is_refused_until_overwrite_is_given(capsys, base_args):
    args = [*base_args, "--dataset", DATA / "alpaca.jsonl", "--eval_split", "0"]
    main([str(a) for a in args], prog="test", description="test", defaults=llama3_8b_lora.DEFAULTS)
    out = base_args[base_args.index("--output_dir") + 1]
    adapter = (out / "final" / "adapter_model.safetensors").read_bytes()

    code, err = run_main(capsys, *args, "--learning_rate", "3e-4")
    assert_one_line_error(code, err, "different run", "learning_rate", "--overwrite_output_dir")
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == adapter

    args += ["--learning_rate", "3e-4", "--overwrite_output_dir"]
    main([str(a) for a in args], prog="test", description="test", defaults=llama3_8b_lora.DEFAULTS)
    assert json.loads((out / "metrics.json").read_text())["config"]["learning_rate"] == 3e-4


def test_a_crash_while_saving_keeps_the_previous_model(capsys, monkeypatch, base_args):
    from transformers import PreTrainedTokenizerBase

    args = [str(a) for a in [*base_args, "--dataset", DATA / "alpaca.jsonl", "--eval_split", "0"]]
    main(args, prog="test", description="test", defaults=llama3_8b_lora.DEFAULTS)
    out = base_args[base_args.index("--output_dir") + 1]
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}

    real = PreTrainedTokenizerBase.save_pretrained

    def disk_full(self, directory, *a, **k):
        if ".final" in str(directory):  # checkpoints fit, the final model does not
            raise OSError(28, "No space left on device")
        return real(self, directory, *a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    code, err = run_main(capsys, *args, "--max_steps", "3")
    assert_one_line_error(code, err, "disk full while saving final/", "checkpoint-3 is kept")
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before
