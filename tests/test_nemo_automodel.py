"""NeMo AutoModel 0.7.0 (playbooks/nemo-fine-tune) on the CPU: NVIDIA's three recipes parse with their
overrides, a local SQuAD-shaped dataset builds through the LoRA recipe, LoRA applies to the tiny model and two
optimizer steps train it (playbooks/nemo-fine-tune/cpu_check.py).

AutoModel needs its own package versions (transformers 5.18.0 ...), so the check runs in another Python:
$NEMO_PYTHON (the flake's check sets it), or this interpreter if it has nemo_automodel, or a git-ignored
.venv-nemo made here (torch==2.13.0 first, then playbooks/nemo-fine-tune/constraints.txt; reused while the
pins are unchanged). Where none can be had (no PyPI), the test is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "playbooks" / "nemo-fine-tune"
CONSTRAINTS = PLAYBOOK / "constraints.txt"
ENV = REPO / ".venv-nemo"
STAMP = ENV / "llm-finetune-nemo-pins.sha256"

pytestmark = pytest.mark.nemo


def pinned(name: str) -> str:
    for line in CONSTRAINTS.read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.strip()
    raise AssertionError(f"{CONSTRAINTS} pins no {name}")


def venv_python() -> Path:
    """.venv-nemo's Python, made or updated first when the pins changed; skips when pip cannot install."""
    python = ENV / "bin" / "python"
    wanted = hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()
    if python.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return python
    if not python.exists():
        venv.create(ENV, with_pip=True)
    STAMP.unlink(missing_ok=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    for args in ([pinned("torch")], ["-c", str(CONSTRAINTS), pinned("torch"), "nemo-automodel", "pytest"]):
        done = subprocess.run(pip + args, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            pytest.skip(
                f"cannot install NeMo AutoModel into {ENV.name} (pip install {' '.join(args)}): {last}"
            )
    STAMP.write_text(wanted)
    return python


@pytest.fixture(scope="module")
def nemo_python() -> str:
    if os.environ.get("NEMO_PYTHON"):
        return os.environ["NEMO_PYTHON"]
    if importlib.util.find_spec("nemo_automodel") is not None:
        return sys.executable
    return str(venv_python())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The project's tiny Llama: the flake's (its check sets $LLM_FINETUNE_TINY_MODEL), or built by this
    Python, which has the project's packages (AutoModel's Python lacks peft and trl)."""
    if os.environ.get("LLM_FINETUNE_TINY_MODEL"):
        return Path(os.environ["LLM_FINETUNE_TINY_MODEL"])
    out = tmp_path_factory.mktemp("nemo") / "tiny"
    subprocess.run([sys.executable, "-m", "finetune.tiny", str(out)], cwd=REPO / "scripts", check=True)
    return out


@pytest.fixture(scope="module")
def report(nemo_python, tiny_model, tmp_path_factory) -> dict:
    # The pinned Automodel source's examples in the flake's check; their copies here otherwise.
    examples = os.environ.get("AUTOMODEL_EXAMPLES", str(PLAYBOOK / "examples"))
    work = tmp_path_factory.mktemp("nemo-work")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [
        nemo_python,
        str(PLAYBOOK / "cpu_check.py"),
        "--examples",
        examples,
        "--model",
        str(tiny_model),
    ]
    done = subprocess.run(command + ["--work", str(work)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_nvidias_three_commands_parse_with_their_overrides(report):
    parsed = report["parsed"]
    assert parsed["lora"]["model"] == "meta-llama/Llama-3.1-8B"
    assert parsed["lora"]["packed_sequence_size"] == 1024
    assert parsed["lora"]["max_steps"] == 20
    assert parsed["lora"]["peft"] and not parsed["lora"]["quantization"]
    assert parsed["qlora"]["model"] == "meta-llama/Llama-3.1-70B"
    assert parsed["qlora"]["peft"] and parsed["qlora"]["quantization"]
    assert "TEParallelCrossEntropy" in parsed["qlora"]["loss_fn"]
    assert parsed["full"]["model"] == "Qwen/Qwen3-8B"
    assert not parsed["full"]["peft"]
    assert {cfg["recipe"] for cfg in parsed.values()} == {"TrainFinetuneRecipeForNextTokenPrediction"}
    assert {cfg["dataset"] for cfg in parsed.values()} == {"rajpurkar/squad"}


def test_local_squad_builds_through_the_recipes_dataset_section(report):
    assert report["dataset"] == {"train": 8, "validation": 8}


def test_lora_trains_only_the_adapters_and_lowers_the_loss(report):
    assert report["lora"]["modules"] > 0
    assert all("lora" in name for name in report["lora"]["trainable"])
    assert report["lora_changed"] and report["base_unchanged"]
    first, second, after = report["losses"]
    assert all(loss == loss and loss > 0 for loss in report["losses"])  # finite, not NaN
    assert after < first
