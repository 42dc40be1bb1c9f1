"""Shared fixtures: the tiny model (built once), the shipped data, and a runner for the playbook scripts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never reach the hub; huggingface_hub reads these once, at import, so set them before any import.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_name] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(SCRIPTS))

PLAYBOOKS = {
    # script → the file that proves the trained weights were saved
    "llama3_8b_lora.py": "adapter_model.safetensors",
    "llama3_3b_full.py": "model.safetensors",
    "llama3_70b_qlora.py": "adapter_model.safetensors",
}

# Small, fast settings for the tiny model; each test adds what it is about.
FAST = ["--batch_size", "4", "--seq_length", "256", "--logging_steps", "2", "--save_steps", "1000"]


def offline_env(home: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(home / "hf"),
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from finetune.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def odd_width_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's tokenizer on a Llama whose MLP is 176 wide: shapes that kernels built around blocks of
    32 (bitsandbytes' packed CPU path, GGUF's q8_0) cannot take whole."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("odd") / "model"
    config = AutoConfig.from_pretrained(tiny_model)
    config.intermediate_size = 176
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    for file in tiny_model.glob("*token*"):
        shutil.copy(file, out)
    return out


@pytest.fixture(scope="session")
def run_script(tmp_path_factory):
    """Run a playbook script as a user would: `python scripts/<name>.py ...`, offline, from another directory."""
    home = tmp_path_factory.mktemp("home")

    def run(script: str, *args: str, check: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, str(SCRIPTS / script), *map(str, args)],
            cwd=home,
            env=offline_env(home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{script} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    return run


def free_port() -> int:
    """A TCP port nothing listens on now, for torchrun's rendezvous: a fixed one collides with a concurrent run."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peft_lora_model(path, seed: int = 0, **lora):
    """The tiny model in float32 with PEFT LoRA (r 4 on every linear layer, no dropout, unless `lora` says
    otherwise), its B matrices moved off zero (PEFT's start) so that the adapters matter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0, **lora}
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def train_in_process(script_module, *args) -> None:
    """Run a playbook script's main() in this process (no interpreter start-up), as a user would call it."""
    from finetune.playbook import main

    main([str(a) for a in args], prog="test", description="test", defaults=script_module.DEFAULTS)


@pytest.fixture(scope="session")
def lora_run(tiny_model, tmp_path_factory) -> Path:
    """A finished LoRA run of the 8B script on the tiny model, trained hard enough to move the logits."""
    import llama3_8b_lora

    out = tmp_path_factory.mktemp("lora-run") / "run"
    train_in_process(
        llama3_8b_lora, "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out,
        "--max_steps", "12", "--eval_split", "0", "--learning_rate", "2e-2", *FAST,
    )  # fmt: skip
    return out
