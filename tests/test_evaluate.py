"""Evaluate: side-by-side generation before/after, loss and perplexity on data, the loss plot, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import evaluate as evaluate_cli
import pytest
from conftest import DATA, SCRIPTS, offline_env
from finetune import evaluate
from finetune.plot import write_loss_plot


def run_evaluate(capsys, *argv) -> tuple[int | None, str, str]:
    try:
        evaluate_cli.main([str(a) for a in argv])
    except SystemExit as exc:
        captured = capsys.readouterr()
        return exc.code, captured.out, captured.err
    captured = capsys.readouterr()
    return None, captured.out, captured.err


def test_side_by_side_keeps_the_end_of_long_column_names():
    base, adapter = "/a/long/directory/" * 8 + "tiny/model (base)", "+ /a/long/directory/" * 8 + "run/final"
    head, rule, *body = evaluate.side_by_side({base: "red", adapter: "blue"}, width=80).splitlines()
    left, right = (cell.strip() for cell in head.split(" | "))
    assert left.endswith("tiny/model (base)") and left.startswith("…") and right.endswith("run/final")
    assert max(map(len, (head, rule, *body))) <= 80 and body == ["red" + " " * 35 + " | blue"]


def test_generate_prints_base_and_adapter_side_by_side(capsys, lora_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a primary colour.\n\nWhat is 12 plus 7?\n")
    code, out, err = run_evaluate(
        capsys, "generate", "--model", lora_run, "--prompts", prompts, "--prompt", "Give three tips.",
        "--max_new_tokens", "6", "--output", tmp_path / "answers.jsonl",
    )  # fmt: skip
    assert code is None, err
    assert out.count("=== ") == 3 and "(base)" in out and " | " in out
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Give three tips.", "Name a primary colour.", "What is 12 plus 7?"]
    assert all(len(r["outputs"]) == 2 for r in rows)
    # The adapter changes the answers, and greedy decoding is deterministic.
    assert any(len(set(r["outputs"].values())) == 2 for r in rows)
    again = evaluate.generate(str(lora_run), prompts=["Give three tips."], max_new_tokens=6)
    assert again[0]["outputs"] == rows[0]["outputs"]


def test_generate_reads_prompts_from_any_dataset(lora_run, tiny_model):
    merged_vs_base = evaluate.generate(
        str(lora_run), baseline=str(tiny_model), prompts_file=str(DATA / "messages.jsonl"), max_new_tokens=2
    )
    assert merged_vs_base and all(r["messages"][-1]["role"] == "user" for r in merged_vs_base)
    pairs = evaluate.read_prompts([], str(DATA / "preference.jsonl"))
    assert len(pairs) == 24 and pairs[0] == [{"role": "user", "content": "What is the capital of France?"}]


def test_eval_reports_loss_and_perplexity_of_adapter_and_base(capsys, lora_run, tiny_model, tmp_path):
    code, out, err = run_evaluate(
        capsys, "eval", "--model", tiny_model, "--adapter", lora_run, "--dataset", DATA / "alpaca.jsonl",
        "--output", tmp_path / "eval.json",
    )  # fmt: skip
    assert code is None, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert json.loads(out) == result
    assert result["format"] == "alpaca" and result["examples"] == 48 and result["loss_tokens"] > 0
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # The adapter was trained on these rows: lower loss than the base on them.
    assert result["loss"] < result["base_loss"] - 0.1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["eval", "--dataset", DATA / "preference.jsonl"],
            ["preference.jsonl", "cannot tell the dataset format"],
        ),
        (["eval", "--dataset", DATA / "nope.jsonl"], ["nope.jsonl", "no such file"]),
        (["generate"], ["no prompts", "--prompt"]),
        (["generate", "--prompt", "hi", "--adapter", DATA], ["--adapter", "not a LoRA adapter"]),
    ],
)
def test_bad_input_is_one_line(capsys, tiny_model, argv, expected):
    command, *rest = argv
    code, _, err = run_evaluate(capsys, command, "--model", tiny_model, *rest)
    assert code not in (0, None) and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error:") and all(str(e) in line for e in expected), line


def test_adapter_for_another_base_is_refused(capsys, lora_run, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
        )
    ).save_pretrained(other)
    code, _, err = run_evaluate(capsys, "generate", "--model", other, "--adapter", lora_run, "--prompt", "hi")
    assert code == 2 and "does not fit" in err and "with --model" in err and "Traceback" not in err


def test_every_training_run_leaves_a_loss_plot(lora_run, tmp_path, monkeypatch, capsys):
    assert (lora_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = [{"step": s, "step_loss": 2.0 / s} for s in range(1, 6)] + [{"step": 5, "eval_loss": 0.5}]
    assert write_loss_plot(history, tmp_path) == tmp_path / "loss.png"

    # Without matplotlib: a note, no picture, no failure.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert write_loss_plot(history, tmp_path / "none") is None
    assert "matplotlib is not installed" in capsys.readouterr().err


@pytest.mark.smoke
def test_scripts_run_from_anywhere(lora_run, tmp_path):
    """evaluate.py and export.py as a user runs them: their own interpreter, another working directory."""
    for script, argv in (
        ("evaluate.py", ["generate", "--model", lora_run, "--prompt", "Hi", "--max_new_tokens", "3"]),
        ("export.py", ["merge", "--adapter", lora_run, "--output_dir", tmp_path / "merged"]),
    ):
        result = subprocess.run(
            [sys.executable, str(SCRIPTS / script), *map(str, argv)],
            cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
