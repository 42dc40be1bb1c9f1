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
from conftest import DATA, SCRIPTS, offline_env, read_metrics, train_in_process

STEPS = 10
PORTS = iter(range(29641, 29700))


def _args(tiny_model, out, batch_size: int, steps: int = STEPS) -> list[str]:
    return [str(a) for a in (
        "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out,
        "--max_steps", steps, "--batch_size", batch_size, "--seq_length", "256", "--logging_steps", "1",
        "--save_steps", "1000", "--learning_rate", "2e-2", "--eval_split", "0.2", "--dtype", "float32",
    )]  # fmt: skip


def _torchrun(args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(next(PORTS)),
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
