"""Sharded training (FSDP2: --shard, llama3_70b_lora.py) on the CPU with gloo, two ranks under torchrun.

Two ranks given batch 2 each train exactly like one process given batch 4 (the same global batch): the same loss
at every step and the same adapter. Each rank really holds half the weights (counted from its shards, since a
Trainer `fsdp=` option on the CPU silently replicates the model). SIGTERM saves a checkpoint and the same command
resumes to the same result; a rank that dies leaves no final/ behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import llama3_70b_lora
import pytest
import torch
from conftest import DATA, SCRIPTS, free_port, offline_env, read_metrics, train_in_process

STEPS = 10


def _args(tiny_model, out, batch_size: int, steps: int = STEPS) -> list[str]:
    return [str(a) for a in (
        "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out,
        "--max_steps", steps, "--batch_size", batch_size, "--seq_length", "256", "--logging_steps", "1",
        "--save_steps", "1000", "--learning_rate", "2e-2", "--eval_split", "0.2", "--dtype", "float32",
    )]  # fmt: skip


def _torchrun(args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(SCRIPTS / "llama3_70b_lora.py"), *args,
    ]  # fmt: skip


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=offline_env(cwd), cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_ranks(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks") / "run"
    result = _run(_torchrun(_args(tiny_model, out, 2)), out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "run"
    train_in_process(llama3_70b_lora, *_args(tiny_model, out, 4))
    return out


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "adapter_model.safetensors")


def test_two_ranks_train_like_one_process_on_the_same_global_batch(two_ranks, one_process):
    sharded, single = read_metrics(two_ranks), read_metrics(one_process)
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert sharded["train_samples"] == single["train_samples"] == STEPS * 4
    assert len(sharded["step_losses"]) == len(single["step_losses"]) == STEPS
    for step, (a, b) in enumerate(zip(sharded["step_losses"], single["step_losses"], strict=True), start=1):
        assert a == pytest.approx(b, abs=1e-3), f"step {step}"
    assert sharded["train_loss"] < sharded["initial_train_loss"] - 0.05, "it learned"
    assert sharded["eval_loss"] == pytest.approx(single["eval_loss"], abs=1e-3)
    # Both ranks' tokens count, and each rank's peak is reported.
    assert sharded["train_tokens"] == single["train_tokens"]
    assert len(sharded["peak_memory_bytes_per_rank"]) == 2 and min(sharded["peak_memory_bytes_per_rank"]) > 0

    gathered, reference = _adapter(two_ranks), _adapter(one_process)
    assert (
        gathered.keys() == reference.keys() and len(gathered) == 2 * 2 * 7
    )  # A and B, 7 projections, 2 layers
    for name, value in gathered.items():
        torch.testing.assert_close(value, reference[name], atol=1e-4, rtol=1e-3, msg=name)
    assert any(v.abs().max() > 0 for k, v in gathered.items() if "lora_B" in k), "the adapter trained"


def test_each_rank_holds_half_of_the_parameters(two_ranks):
    sharding = read_metrics(two_ranks)["sharding"]
    total, held = sharding["parameters"], sharding["parameters_per_rank"]
    assert sharding["strategy"] == "fsdp2" and sum(held) == total
    for rank_held in held:  # uneven row counts leave at most a row per tensor of difference
        assert abs(rank_held / total - 0.5) < 0.01, held


def test_gathered_adapter_loads_on_one_process_and_merges(two_ranks, tiny_model, tmp_path):
    from finetune import export
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, two_ranks / "final")(ids).logits
    assert not torch.allclose(before, tuned, atol=1e-4)
    report = export.merge(str(two_ranks), str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned, atol=1e-4, rtol=1e-4)
    assert report


def _popen(command: list[str], cwd: Path) -> subprocess.Popen:
    stderr = (cwd / "stderr.txt").open("w")  # a file, not a pipe: nothing can block on it
    return subprocess.Popen(
        command, env=offline_env(cwd), cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True
    )


def _wait_for_training(process: subprocess.Popen) -> None:
    for line in process.stdout:  # the first loss line means every rank is training
        if "'loss'" in line:
            return
    raise AssertionError("training never started")


def test_sigterm_saves_and_the_rerun_resumes_to_the_same_loss(two_ranks, tiny_model, tmp_path):
    out = tmp_path / "run"
    process = _popen(_torchrun(_args(tiny_model, out, 2)), tmp_path)
    _wait_for_training(process)
    process.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to every rank
    process.communicate(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode != 0
    assert "run the same command again to resume" in err, err[-3000:]
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (out / "final").exists() and not (out / "metrics.json").exists()
    assert 0 < int(checkpoints[0].name.split("-")[1]) < STEPS

    resumed = _run(_torchrun(_args(tiny_model, out, 2)), tmp_path)  # the same command (a free port aside)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoints[0]}" in resumed.stdout
    got, expected = read_metrics(out), read_metrics(two_ranks)
    assert got["global_step"] == STEPS and got["resumed_from"] == str(checkpoints[0])
    assert got["step_losses"] == pytest.approx(expected["step_losses"], abs=1e-4)
    assert got["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-4)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-4)


def _rank_pid(launcher: int, rank: int) -> int:
    """The worker process torchrun (`launcher`) started for `rank`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no process for rank {rank}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_crashing_rank_leaves_no_final_model(tiny_model, tmp_path):
    out = tmp_path / "run"
    process = _popen(_torchrun(_args(tiny_model, out, 2, steps=400)), tmp_path)
    _wait_for_training(process)
    os.kill(_rank_pid(process.pid, 1), signal.SIGKILL)
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert not (out / "final").exists() and not (out / "metrics.json").exists()
    assert not list(out.glob(".final*")), "half-written final model left behind"


def test_full_fine_tuning_shards_too_and_saves_a_loadable_model(tiny_model, tmp_path):
    import llama3_3b_full
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train_in_process(
        llama3_3b_full, *_args(tiny_model, out, 2, steps=2), "--shard", "--learning_rate", "1e-3"
    )
    metrics = read_metrics(out)
    assert metrics["sharding"]["strategy"] == "fsdp2" and metrics["global_step"] == 2
    base, tuned = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_model, out / "final"))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-4)


def test_qlora_is_not_sharded(tiny_model, tmp_path, capsys):
    import llama3_70b_qlora
    from finetune.playbook import main

    with pytest.raises(SystemExit) as exit_info:
        main(_args(tiny_model, tmp_path / "run", 2) + ["--shard"], prog="t", description="t",
             defaults=llama3_70b_qlora.DEFAULTS)  # fmt: skip
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.count("\n") == 1 and "--shard" in message


def test_dpo_refuses_shard():
    from finetune.cli import parse_config
    from finetune.dpo import DPOConfig
    from finetune.errors import UserError

    with pytest.raises(UserError, match="--shard"):
        parse_config(["--model_name", "m", "--output_dir", "o", "--shard"], prog="t", description="t",
                     defaults={}, config_class=DPOConfig)  # fmt: skip


def test_preflight_estimates_per_rank_and_names_how_many_ranks_fit(monkeypatch):
    """Llama 3.1 8B full fine-tuning in bf16 (real architecture, on the meta device) on 48 GiB GPUs."""
    import dataclasses

    from finetune import preflight
    from finetune.config import TrainConfig
    from finetune.data import DataStats
    from finetune.memory import GIB, decoder_layer_params, estimate_run
    from finetune.model import Placement, count_parameters
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    cfg = TrainConfig(
        model_name="x", output_dir="x", method="full", batch_size=2, gradient_checkpointing=True
    )
    stats = DataStats(format="alpaca", tokens=64 * 512, trainable_tokens=32 * 512, lengths=[512] * 64)
    place = Placement("cuda", torch.bfloat16, 0)
    total, trainable = count_parameters(cfg, config)
    whole = estimate_run(cfg, config, stats, place, total, trainable)
    sharded = dataclasses.replace(cfg, shard=True)
    quarter = estimate_run(sharded, config, stats, place, total, trainable, ranks=4)
    layer = decoder_layer_params(config) * 2
    assert quarter.weights == -(-whole.weights // 4) + 3 * layer  # a quarter, plus layers gathered whole
    assert quarter.trainable_state == -(-whole.trainable_state // 4)
    assert quarter.activations == whole.activations

    monkeypatch.setattr(
        preflight,
        "available_memory",
        lambda place: preflight.Available(48 * GIB, "free memory on cuda:0", False),
    )
    plan = {"parameters": total, "trainable_parameters": trainable, "model_config": config}
    plan |= {"steps": 16, "examples_per_step": 2, "memory_estimate": whole.as_dict()}
    check = preflight.check_memory(cfg, plan, stats, place)
    assert not check.fits
    ranks = preflight.ranks_to_fit(cfg, plan, stats, place, preflight.available_memory(place))
    assert ranks and f"--shard on {ranks} ranks" in check.remedy()

    def fits(n: int) -> bool:
        return (
            estimate_run(sharded, config, stats, place, total, trainable, 32, ranks=n).total <= 0.9 * 48 * GIB
        )

    assert fits(ranks) and not fits(ranks - 1)


def test_what_the_sharded_loop_lacks_is_refused_in_one_line():
    from finetune.cli import parse_config
    from finetune.errors import UserError

    with pytest.raises(UserError, match=r"--eval_steps, --batch_tokens: not available with --shard"):
        parse_config(
            ["--dataset", "x.jsonl", "--eval_steps", "5", "--batch_tokens", "4096"],
            prog="t", description="t", defaults=llama3_70b_lora.DEFAULTS,
        )  # fmt: skip
