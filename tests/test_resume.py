"""Interrupt and resume: SIGTERM saves a checkpoint and exits non-zero; rerunning finishes the same run."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import DATA, SCRIPTS, offline_env, read_metrics

STEPS = 60


def _command(tiny_model, out):
    return [
        sys.executable, str(SCRIPTS / "llama3_8b_lora.py"), "--model_name", str(tiny_model),
        "--dataset", str(DATA / "alpaca.jsonl"), "--output_dir", str(out), "--max_steps", str(STEPS),
        "--batch_size", "2", "--logging_steps", "1", "--save_steps", "1000", "--learning_rate", "1e-2",
        "--eval_split", "0.1", "--seed", "7",
    ]  # fmt: skip


def _run(command, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=offline_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert _run(_command(tiny_model, out), out.parent).returncode == 0
    return read_metrics(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_result(tiny_model, reference, tmp_path, sig):
    out = tmp_path / "interrupted"
    with (tmp_path / "stderr.txt").open("w") as stderr:  # a file, not a pipe: progress bars could fill a pipe
        process = subprocess.Popen(
            _command(tiny_model, out),
            env=offline_env(tmp_path),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        for line in process.stdout:  # the first loss line means training is under way
            if "'loss'" in line:
                process.send_signal(sig)
                break
        process.communicate(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    assert "run the same command again to resume" in err.strip().splitlines()[-1]
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (out / "final").exists() and not (out / "metrics.json").exists()
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 0 < stopped_at < STEPS

    resumed = _run(_command(tiny_model, out), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {checkpoints[0]}" in resumed.stdout
    expected, got = reference, read_metrics(out)
    assert got["global_step"] == STEPS and got["resumed_from"] == str(checkpoints[0])
    assert got["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-4)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-4)
