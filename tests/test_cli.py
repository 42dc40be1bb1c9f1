"""The command line: flags and their spellings, YAML precedence, --help, --dry_run, torchrun, the demo."""

from __future__ import annotations

import subprocess
import sys

import llama3_3b_full
import llama3_8b_lora
import llama3_70b_qlora
import pytest
from conftest import DATA, FAST, SCRIPTS, free_port, offline_env, read_metrics
from finetune.cli import parse_config
from finetune.config import flag_fields
from finetune.playbook import main

PLAYBOOK_DEFAULTS = [llama3_8b_lora.DEFAULTS, llama3_3b_full.DEFAULTS, llama3_70b_qlora.DEFAULTS]


def parse(*argv, defaults=llama3_8b_lora.DEFAULTS):
    return parse_config([str(a) for a in argv], prog="test", description="test", defaults=defaults)


def test_playbook_defaults_match_the_dgx_spark_playbook():
    lora, full, qlora = (parse(defaults=d) for d in PLAYBOOK_DEFAULTS)
    assert (lora.model_name, lora.method) == ("meta-llama/Llama-3.1-8B-Instruct", "lora")
    assert (lora.lora_rank, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (
        8,
        16,
        0.0,
        "all-linear",
    )
    assert (lora.learning_rate, lora.batch_size, lora.seq_length, lora.num_epochs) == (1e-4, 8, 2048, 1.0)
    assert (full.model_name, full.method, full.learning_rate) == (
        "meta-llama/Llama-3.2-3B-Instruct",
        "full",
        5e-5,
    )
    assert (qlora.model_name, qlora.method) == ("meta-llama/Llama-3.1-70B-Instruct", "qlora")
    assert qlora.gradient_checkpointing and qlora.lora_rank == 8 and qlora.learning_rate == 1e-4
    assert all(c.dataset == "" and c.dtype == "auto" for c in (lora, full, qlora))


def test_snake_and_dashed_spellings_are_the_same_flag():
    assert parse("--seq_length", "512").seq_length == parse("--seq-length", "512").seq_length == 512
    assert parse("--no_packing").packing is False and parse("--no-packing").packing is False
    assert parse("--gradient-checkpointing").gradient_checkpointing is True
    assert parse("--num_epochs", "0.5").num_epochs == 0.5


def test_yaml_config_fills_in_and_flags_win(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "learning_rate: 3.0e-4\nlora_rank: 16\npacking: false\ntarget_modules: [q_proj, v_proj]\n"
    )
    cfg = parse("--config", config, "--lora_rank", "32")
    assert (cfg.learning_rate, cfg.lora_rank, cfg.packing, cfg.target_modules) == (
        3e-4,
        32,
        False,
        "q_proj,v_proj",
    )


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--help")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in flag_fields():
        assert f"--{field.name}" in text, field.name
    assert "(default: meta-llama/Llama-3.1-8B-Instruct)" in text and "(default: on; --no_packing" in text


def test_dry_run_prints_the_plan_and_writes_nothing(capsys, tiny_model, tmp_path):
    out = tmp_path / "out"
    main(
        [str(a) for a in ("--model_name", tiny_model, "--dataset", DATA / "messages.jsonl", "--output_dir", out, "--dry_run")],
        prog="test", description="test", defaults=llama3_70b_qlora.DEFAULTS,
    )  # fmt: skip
    plan = capsys.readouterr().out
    for text in (
        "557,696 total",
        "trainable",
        "training examples",
        "optimizer steps",
        "peak memory",
        "qlora",
    ):
        assert text in plan, text
    assert not out.exists()


def test_batch_tokens_fills_micro_batches_with_tokens(capsys, tiny_model, tmp_path):
    """--batch_tokens: every example once per epoch, in micro-batches of at most that many real tokens, and the
    plan's step count is the one the Trainer takes."""
    import finetune.train

    budgets = []
    count = finetune.train.MeasuredTrainer.count_tokens
    out = tmp_path / "out"
    args = ["--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out, *FAST]
    args += ["--batch_tokens", "512", "--eval_split", "0", "--num_epochs", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            finetune.train.MeasuredTrainer,
            "count_tokens",
            lambda self, inputs: budgets.append(count(self, inputs)) or budgets[-1],
        )
        main([str(a) for a in args], prog="test", description="test", defaults=llama3_8b_lora.DEFAULTS)
    plan = capsys.readouterr().out
    metrics = read_metrics(out)
    assert "micro-batches of up to 512 tokens" in plan
    assert f"{metrics['global_step']} optimizer steps" in plan and metrics["global_step"] == len(budgets)
    assert all(tokens <= 512 for tokens, _ in budgets) and sum(n for _, n in budgets) == 48
    assert len(budgets) < 48 / 4, "fewer, fuller micro-batches than --batch_size 4 makes"


def test_torchrun_two_processes_on_cpu(tiny_model, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(SCRIPTS / "llama3_8b_lora.py"), "--model_name", str(tiny_model), "--dataset", str(DATA / "alpaca.jsonl"),
            "--output_dir", str(out), "--max_steps", "4", "--eval_split", "0.2", *FAST,
        ],
        env=offline_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(out)
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4
    assert metrics["train_samples"] == 4 * 2 * 4, "both ranks' samples are counted"
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_demo_runs_every_playbook_offline(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "demo.py"), "--workdir", str(tmp_path), "--steps", "3"],
        env=offline_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tokens/s") == 3 and "all 3 playbooks trained" in result.stdout
    for name in ("llama3_8b_lora", "llama3_3b_full", "llama3_70b_qlora"):
        assert (tmp_path / name / "metrics.json").is_file()


def test_training_works_without_tensorboard(monkeypatch, tiny_model, tmp_path):
    import finetune.train

    out = tmp_path / "out"
    args = [
        "--model_name",
        tiny_model,
        "--dataset",
        DATA / "text.jsonl",
        "--output_dir",
        out,
        "--max_steps",
        "2",
    ]
    monkeypatch.setattr(finetune.train, "_tensorboard_available", lambda: False)
    main([str(a) for a in [*args, *FAST]], prog="test", description="test", defaults=llama3_3b_full.DEFAULTS)
    assert (out / "final" / "model.safetensors").is_file() and not (out / "logs").exists()

    monkeypatch.undo()
    main(
        [str(a) for a in [*args, *FAST, "--overwrite_output_dir"]],
        prog="t",
        description="t",
        defaults=llama3_3b_full.DEFAULTS,
    )
    assert list((out / "logs").rglob("events.out.tfevents.*")), (
        "TensorBoard logs are written when it is installed"
    )
