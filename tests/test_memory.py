"""The memory estimate against measured peaks, the pre-flight that refuses a run that will not fit, and the
speed switches that can be checked on the CPU.

What the estimate is compared with: a real run on the CPU writes both numbers to metrics.json, the estimate the
plan made before loading any weight and the process's measured peak resident memory. On the CPU the estimate's
runtime part is the resident memory of the process when the plan is made (interpreter, torch, transformers,
tokenizer, data) plus a fixed allowance, so for the tiny model (~0.2M parameters) the comparison mostly checks
that accounting. The reduced-depth model has Llama 3.2 1B's real width (hidden 2048, MLP 8192, 32 query and 8
key/value heads of 64) with 2 layers and a vocabulary cut from 128,256 to 32,768 entries to keep the test fast:
there weights (~0.7 GiB), activations (~0.5 GiB) and logits (~0.2 GiB) are most of the peak. QLoRA is not
compared: on the CPU bitsandbytes quantizes at load time with transient copies its CUDA kernels do not make.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import llama3_8b_lora
import pytest
import torch
from conftest import DATA, FAST, read_metrics
from finetune import preflight
from finetune.config import TrainConfig
from finetune.data import Collator, DataStats
from finetune.errors import UserError
from finetune.memory import GIB, estimate_run
from finetune.model import Placement, count_parameters, liger_kernels
from finetune.playbook import main
from finetune.train import loss_positions_only, training_arguments

TOLERANCE = 0.25


@pytest.fixture(scope="module")
def llama_1b_width(tiny_model, tmp_path_factory):
    """Llama 3.2 1B's width at 2 layers and a 32k vocabulary, random weights, with the tiny tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(
        vocab_size=32768, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="float32",
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama-1b-width") / "model"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("script", "model"),
    [("llama3_3b_full.py", "tiny_model"), ("llama3_8b_lora.py", "llama_1b_width")],
    ids=["tiny-full", "1b-width-lora"],
)
def test_estimate_is_within_25_percent_of_the_measured_peak(script, model, request, run_script, tmp_path):
    out = tmp_path / "run"
    result = run_script(
        script, "--model_name", request.getfixturevalue(model), "--dataset", DATA / "alpaca.jsonl",
        "--output_dir", out, "--max_steps", "3", "--eval_split", "0", *FAST, "--batch_size", "8", check=True,
    )  # fmt: skip
    metrics = read_metrics(out)
    measured, estimated = metrics["peak_memory_bytes"], metrics["estimated_peak_memory_bytes"]
    plan = next(line for line in result.stdout.splitlines() if line.startswith("peak memory "))
    assert abs(estimated / measured - 1) <= TOLERANCE, (measured, plan)


def _args(tiny_model, out, *extra):
    return [str(a) for a in ("--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out,
                             "--max_steps", "1", "--eval_split", "0", *FAST, *extra)]  # fmt: skip


def test_a_run_that_does_not_fit_is_refused_unless_forced(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "meminfo_available", lambda: 2**20)  # 1 MiB of system memory
    out = tmp_path / "out"

    def run(*extra):
        main(
            _args(tiny_model, out, *extra), prog="test", description="test", defaults=llama3_8b_lora.DEFAULTS
        )

    run("--dry_run")  # reports, does not refuse
    assert "memory check     does NOT fit" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("error: not enough memory"), message
    assert "1.0 MiB is available (system memory)" in message and "--force trains anyway" in message
    assert not out.exists(), "refused before anything was written"

    run("--force")
    assert "warning: --force" in capsys.readouterr().out
    assert read_metrics(out)["global_step"] == 1


def test_refusal_names_the_changes_that_would_fit(monkeypatch):
    """Llama 3.1 8B LoRA (the real architecture, counted on the meta device), 8 × 512 tokens, on a 48 GiB GPU."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    cfg = TrainConfig(model_name="x", output_dir="x", batch_size=8, seq_length=2048)
    stats = DataStats(format="alpaca", tokens=64 * 512, trainable_tokens=32 * 512, lengths=[512] * 64)
    place = Placement("cuda", torch.bfloat16, 0)
    total, trainable = count_parameters(cfg, config)
    estimate = estimate_run(cfg, config, stats, place, total, trainable)
    assert abs(estimate.weights / (2 * 8.03e9) - 1) < 0.01, "8.03B parameters in bf16"
    plan = {"parameters": total, "trainable_parameters": trainable, "model_config": config}
    plan |= {"steps": 8, "examples_per_step": 8}  # one epoch
    plan["memory_estimate"] = estimate.as_dict()
    monkeypatch.setattr(
        preflight,
        "available_memory",
        lambda place: preflight.Available(48 * GIB, "free memory on cuda:0", False),
    )

    check = preflight.check_memory(cfg, plan, stats, place)
    assert not check.fits
    assert "--gradient_checkpointing" in check.suggestions
    assert any(s.startswith("--batch_size ") for s in check.suggestions)
    assert any(s.startswith("QLoRA") for s in check.suggestions)
    with pytest.raises(UserError) as refused:
        preflight.enforce(check, cfg)
    assert "\n" not in str(refused.value) and "48.0 GiB is available" in str(refused.value)
    preflight.enforce(check, dataclasses.replace(cfg, force=True))  # --force: no error


def test_unified_memory_gpus_are_checked_against_system_memory(monkeypatch):
    gb10 = SimpleNamespace(name="NVIDIA GB10", is_integrated=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gb10)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: gb10.name)
    monkeypatch.setattr(preflight, "meminfo_available", lambda: 100 * GIB)
    available = preflight.available_memory(Placement("cuda", torch.bfloat16, 0))
    assert available.bytes == 100 * GIB and available.system_memory and "unified" in available.source


def test_liger_kernels_only_on_cuda(monkeypatch, tmp_path):
    cpu = Placement("cpu", torch.float32, 0)
    with monkeypatch.context() as patched:  # as if liger_kernel were installed
        patched.setattr(importlib.util, "find_spec", lambda name, *args: object())
        assert liger_kernels(Placement("cuda", torch.bfloat16, 0)) and not liger_kernels(cpu)
    cfg = TrainConfig(model_name="x", output_dir=str(tmp_path))
    assert training_arguments(cfg, cpu, tmp_path).use_liger_kernel is False


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_logits_only_where_loss_is_give_the_same_loss(tiny_model, packing):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    examples = [
        {"input_ids": [1019, 5, 6, 7, 8, 9], "labels": [-100, -100, -100, 7, 8, 9]},
        {"input_ids": [1019, 10, 11, 12], "labels": [-100, -100, 11, 12]},
    ]
    batch = Collator(pad_token_id=1023, packing=packing)(examples)
    kept = loss_positions_only(batch)
    with torch.no_grad():
        full, only = model(**batch), model(**kept)
    assert torch.allclose(full.loss, only.loss, atol=1e-6)
    assert only.logits.shape[1] == (5 if packing else 4) < full.logits.shape[1]
