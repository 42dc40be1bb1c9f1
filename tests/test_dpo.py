"""DPO: preference formats, the script end to end (reward accuracy rises), going on from an SFT run, bad input."""

from __future__ import annotations

import json

import llama3_8b_dpo
import pytest
from conftest import DATA, FAST, read_metrics
from finetune.data import Row
from finetune.dpo import build_pairs, detect_preference_format, to_pair
from finetune.errors import UserError
from finetune.model import load_tokenizer
from finetune.playbook import main


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def run_dpo(capsys, *argv) -> tuple[int | None, str]:
    try:
        main(
            [str(a) for a in argv],
            prog="test",
            description="test",
            defaults=llama3_8b_dpo.DEFAULTS,
            config_class=llama3_8b_dpo.DPOConfig,
            runner=llama3_8b_dpo.run,
        )
    except SystemExit as exc:
        return exc.code, capsys.readouterr().err
    return None, capsys.readouterr().err


USER = {"role": "user", "content": "Name a primary colour."}
GOOD = {"role": "assistant", "content": "Red."}
BAD = {"role": "assistant", "content": "Green."}


@pytest.mark.parametrize(
    "values",
    [
        {"prompt": "Name a primary colour.", "chosen": "Red.", "rejected": "Green."},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},  # the prompt is what the two share
        {"prompt": [USER], "chosen": [USER, GOOD], "rejected": [USER, BAD]},  # prompt repeated in the answers
        {
            "conversations": [{"from": "human", "value": "Name a primary colour."}],
            "chosen": {"from": "gpt", "value": "Red."},
            "rejected": {"from": "gpt", "value": "Green."},
        },
    ],
)
def test_every_preference_layout_gives_the_same_pair(tokenizer, values):
    row = Row(values, "data.jsonl:1")
    fmt = detect_preference_format([row], "auto", "data.jsonl")
    assert fmt == ("sharegpt" if "conversations" in values else "preference")
    assert to_pair(row, fmt) == ([USER], [GOOD], [BAD])

    (pair,), stats = build_pairs([row], fmt, tokenizer, seq_length=256)
    # The prompt is rendered by the chat template up to the assistant header; the answers follow it.
    assert tokenizer.decode(pair["prompt_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode(pair["chosen_ids"]) == "Red.<|eot_id|>"
    assert tokenizer.decode(pair["rejected_ids"]) == "Green.<|eot_id|>"
    assert stats.trainable_tokens == len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def test_long_pairs_are_truncated_and_identical_answers_dropped(tokenizer):
    rows = [
        Row({"prompt": "Why?", "chosen": "Because " * 50, "rejected": "No."}, "d:1"),
        Row({"prompt": "Why?", "chosen": "Same.", "rejected": "Same."}, "d:2"),
    ]
    pairs, stats = build_pairs(rows, "preference", tokenizer, seq_length=32)
    assert (len(pairs), stats.truncated, stats.dropped) == (1, 1, 1)
    assert len(pairs[0]["prompt_ids"]) + len(pairs[0]["chosen_ids"]) == 32


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"instruction": "x", "output": "y"}, "not preference data (columns: instruction, output)"),
        ({"prompt": "x", "chosen": 3, "rejected": "y"}, "data.jsonl:1: column 'chosen' should be a string"),
        (
            {"chosen": [USER, GOOD], "rejected": [BAD]},
            "must be conversations that start with the same prompt",
        ),
        ({"prompt": [USER, GOOD], "chosen": "a", "rejected": "b"}, "should end with a user message"),
    ],
)
def test_bad_preference_rows_name_the_problem(values, expected):
    row = Row(values, "data.jsonl:1")
    with pytest.raises(UserError, match=None) as error:
        to_pair(row, detect_preference_format([row], "auto", "data.jsonl"))
    assert expected in str(error.value)


@pytest.mark.smoke
def test_dpo_script_raises_reward_accuracy_on_the_shipped_pairs(tiny_model, run_script, tmp_path):
    out = tmp_path / "dpo"
    result = run_script(
        "llama3_8b_dpo.py", "--model_name", tiny_model, "--dataset", DATA / "preference.jsonl",
        # Scored on the shipped pairs themselves: a random tiny model cannot generalise to unseen facts.
        "--eval_dataset", DATA / "preference.jsonl", "--output_dir", out, "--max_steps", "20",
        "--gradient_accumulation_steps", "1", "--learning_rate", "5e-3", *FAST,
        check=True,
    )  # fmt: skip
    metrics = read_metrics(out)
    # Before training the policy is the reference, so every reward is 0: accuracy 0, margin 0, loss ln 2.
    assert metrics["initial_train_loss"] == pytest.approx(0.693, abs=0.01)
    assert metrics["train_loss"] < metrics["initial_train_loss"] - 0.05
    assert metrics["eval_rewards/accuracies"] >= 0.9 and metrics["eval_rewards/margins"] > 0.1, metrics
    assert metrics["eval_perplexity"] is None and metrics["global_step"] == 20
    assert metrics["tokens_per_second"] > 0 and metrics["train_samples"] == 80  # pairs, not rows
    assert "reward accuracy" in result.stdout and str(out / "final") in result.stdout
    assert (out / "final" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert json.loads((out / "run.json").read_text())["beta"] == 0.1


def test_dpo_goes_on_from_an_sft_run(capsys, lora_run, tiny_model, tmp_path):
    out = tmp_path / "dpo"
    args = ["--model_name", lora_run, "--dataset", DATA / "preference.jsonl", "--output_dir", out]
    code, err = run_dpo(capsys, *args, "--max_steps", "2", "--eval_split", "0", *FAST)
    assert code is None, err
    final = out / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    # The SFT adapter itself went on training: same base, same rank; TRL's reference copy is not saved.
    assert config["base_model_name_or_path"] == str(tiny_model) and config["r"] == 8
    assert not (final / "ref").exists() and not list(out.glob("checkpoints/*/ref"))
    trained = (final / "adapter_model.safetensors").read_bytes()
    assert trained != (lora_run / "final" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--dataset", DATA / "alpaca.jsonl"], ["alpaca.jsonl", "not preference data"]),
        (["--dataset", DATA / "preference.jsonl", "--beta", "0"], ["--beta 0.0"]),
        (
            ["--dataset", DATA / "preference.jsonl", "--dataset_format", "alpaca"],
            ["--dataset_format", "sharegpt"],
        ),
    ],
)
def test_dpo_bad_input_is_one_line(capsys, tiny_model, tmp_path, extra, expected):
    code, err = run_dpo(capsys, "--model_name", tiny_model, "--output_dir", tmp_path / "o", *extra)
    assert code not in (0, None) and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(("error:", "test: error:")) and all(str(e) in line for e in expected), line


def test_dpo_refuses_an_unfinished_run(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"method": "lora"}))
    code, err = run_dpo(capsys, "--model_name", run, "--output_dir", tmp_path / "o")
    assert code == 2 and "has not finished" in err and "Traceback" not in err
