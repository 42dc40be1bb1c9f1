"""Faults without loss: damaged checkpoints, a full disk, two runs on one directory, a finished run rerun, a NaN
loss, out of memory mid-run. Each ends with one line, the right exit code, no traceback, nothing finished lost."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import llama3_8b_lora
import pytest
import torch
from conftest import DATA, FAST, SCRIPTS, offline_env
from finetune import checkpoints, diskspace
from finetune.config import TrainConfig
from finetune.errors import EXIT_FAULT, EXIT_USER_ERROR, UserError
from finetune.lock import LOCK_FILE
from finetune.playbook import main
from safetensors.torch import load_file


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """A playbook script's main() in this process: (exit code, stdout, stderr); 0 when it returned."""
    code = 0
    try:
        main([str(a) for a in argv], prog="test", description="test", defaults=llama3_8b_lora.DEFAULTS)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(code: int, err: str, expected_code: int, *expected: str) -> str:
    assert code == expected_code, err[-3000:]
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error:"), err
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def args(tiny_model, out, *extra) -> list:
    # A constant learning rate: a run resumed with a larger --max_steps follows the uninterrupted one exactly.
    return [
        "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out, "--eval_split", "0",
        "--lr_scheduler_type", "constant", "--learning_rate", "1e-2", *FAST, "--save_steps", "2",
        "--save_total_limit", "3", *extra,
    ]  # fmt: skip


def adapter(path: Path) -> dict:
    return load_file(path / "adapter_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def snapshot(directory: Path) -> dict:
    """Every file under `directory` with its bytes (the lock file aside)."""
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def four_steps(tiny_model, tmp_path_factory):
    """A finished 4-step run with complete checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("four") / "run"
    main(
        [str(a) for a in args(tiny_model, out, "--max_steps", "4")],
        prog="t",
        description="t",
        defaults=llama3_8b_lora.DEFAULTS,
    )
    return out


@pytest.fixture(scope="module")
def six_steps(tiny_model, tmp_path_factory):
    """The same run taken to step 6 without interruption: what a resumed run must end with."""
    out = tmp_path_factory.mktemp("six") / "run"
    main(
        [str(a) for a in args(tiny_model, out, "--max_steps", "6")],
        prog="t",
        description="t",
        defaults=llama3_8b_lora.DEFAULTS,
    )
    return adapter(out / "final")


def copy_run(run: Path, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ------------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_sealed_and_the_estimate_matches_their_size(four_steps, tiny_model):
    ckpts = four_steps / "checkpoints"
    assert [p.name for p in checkpoints.checkpoints_in(ckpts)] == ["checkpoint-4", "checkpoint-2"]
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # no staging left over
    for checkpoint in checkpoints.checkpoints_in(ckpts):
        assert checkpoints.problem(checkpoint) is None
        record = json.loads((checkpoint / checkpoints.MARKER).read_text())
        assert record["step"] == int(checkpoint.name.split("-")[1])
        assert "adapter_model.safetensors" in record["files"] and "optimizer.pt" in record["files"]
    assert not (four_steps / LOCK_FILE).exists()

    # The disk pre-flight's estimate, against what the run wrote.
    metrics = json.loads((four_steps / "metrics.json").read_text())
    trainable = sum(t.numel() for t in adapter(four_steps / "final").values())
    cfg = llama3_8b_lora.DEFAULTS | {"model_name": str(tiny_model)}
    estimated_checkpoint, estimated_final = diskspace.estimate(
        TrainConfig(**{**cfg, "output_dir": "x"}), {"parameters": 0, "trainable_parameters": trainable}, 4
    )
    written = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert estimated_checkpoint == pytest.approx(
        written(four_steps / "checkpoints" / "checkpoint-2"), rel=0.15
    )
    assert estimated_final == pytest.approx(written(four_steps / "final"), rel=0.15)
    assert metrics["global_step"] == 4


def _truncate(checkpoint: Path) -> str:
    path = checkpoint / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # as a crash mid-write leaves it
    return "adapter_model.safetensors is"


def _missing_optimizer(checkpoint: Path) -> str:
    (checkpoint / "optimizer.pt").unlink()
    return "optimizer.pt is missing"


def _no_marker(checkpoint: Path) -> str:
    (checkpoint / checkpoints.MARKER).unlink()  # a save that never finished, or a plain Trainer's checkpoint
    return "incomplete"


def _bad_header(checkpoint: Path) -> str:
    path = checkpoint / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\x00\x00\x00"  # same size, a broken header
    path.write_bytes(bytes(data))
    return "header does not parse"


def _bad_trainer_state(checkpoint: Path) -> str:
    path = checkpoint / "trainer_state.json"
    path.write_bytes(b"{" + b"x" * (path.stat().st_size - 1))  # same size, not JSON
    return "trainer_state.json does not parse"


@pytest.mark.parametrize(
    "damage", [_truncate, _missing_optimizer, _no_marker, _bad_header, _bad_trainer_state]
)
def test_a_bad_newest_checkpoint_falls_back_to_the_newest_good_one(
    capsys, four_steps, six_steps, tiny_model, tmp_path, damage
):
    out = copy_run(four_steps, tmp_path)
    reason = damage(out / "checkpoints" / "checkpoint-4")

    code, stdout, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6"))
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    warning = next(line for line in stdout.splitlines() if "unusable" in line)
    assert (
        "checkpoint-4 is unusable" in warning
        and reason in warning
        and "resuming from checkpoint-2" in warning
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["resumed_from"] == str(out / "checkpoints" / "checkpoint-2") and metrics["global_step"] == 6
    )
    assert_same_weights(adapter(out / "final"), six_steps)  # nothing of the good checkpoint was lost


def test_no_good_checkpoint_says_how_to_start_over(capsys, four_steps, six_steps, tiny_model, tmp_path):
    out = copy_run(four_steps, tmp_path)
    _truncate(out / "checkpoints" / "checkpoint-4")
    _missing_optimizer(out / "checkpoints" / "checkpoint-2")
    before = snapshot(out)

    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6"))
    assert_one_line(
        code, err, EXIT_USER_ERROR, "no usable checkpoint", "checkpoint-4", "checkpoint-2", "--resume never"
    )
    assert snapshot(out) == before

    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--resume", "never"))
    assert code == 0, err[-3000:]
    assert_same_weights(adapter(out / "final"), six_steps)
    for checkpoint in checkpoints.checkpoints_in(out / "checkpoints"):  # the bad ones were replaced
        assert checkpoints.problem(checkpoint) is None


def test_a_named_bad_checkpoint_is_refused(capsys, four_steps, tiny_model, tmp_path):
    out = copy_run(four_steps, tmp_path)
    named = out / "checkpoints" / "checkpoint-4"
    _truncate(named)
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--resume", named))
    assert_one_line(code, err, EXIT_USER_ERROR, f"--resume {named}", "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------- finished


def test_a_finished_run_rerun_says_so_and_computes_nothing(
    capsys, monkeypatch, four_steps, tiny_model, tmp_path
):
    import finetune.playbook

    out = copy_run(four_steps, tmp_path)
    before = snapshot(out)

    def must_not_run(cfg):
        raise AssertionError("a finished run was loaded again")

    monkeypatch.setattr(finetune.playbook, "run", must_not_run)
    code, stdout, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "4"))
    assert code == 0 and "Traceback" not in err, err
    line = stdout.strip().splitlines()[-1]
    assert "finished at step 4" in line and str(out / "final") in line and "--overwrite_output_dir" in line
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------- disk space


def _disk_full_in_checkpoint(step: int):
    real_save = torch.save

    def save(obj, f, *a, **k):
        if f"checkpoint-{step}" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    return save


def test_a_disk_that_fills_during_a_save_keeps_the_last_checkpoint(capsys, monkeypatch, tiny_model, tmp_path):
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _disk_full_in_checkpoint(4))
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6"))
    line = assert_one_line(
        code, err, EXIT_FAULT, "disk full while saving checkpoint-4", "free", "checkpoint-2 is kept"
    )
    assert str(out / "checkpoints") in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint-2"
    ]  # no partial, no staging
    assert checkpoints.problem(out / "checkpoints" / "checkpoint-2") is None
    assert (
        not (out / "final").exists()
        and not (out / "metrics.json").exists()
        and not (out / LOCK_FILE).exists()
    )

    monkeypatch.undo()
    code, stdout, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6"))
    assert code == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in stdout


def test_a_disk_that_fills_while_saving_the_final_model_keeps_the_previous_one(
    capsys, monkeypatch, four_steps, tiny_model, tmp_path
):
    from transformers import PreTrainedTokenizerBase

    out = copy_run(four_steps, tmp_path)
    before = snapshot(out / "final"), (out / "metrics.json").read_bytes()

    real = PreTrainedTokenizerBase.save_pretrained

    def save_pretrained(self, directory, *a, **k):
        if ".final" in str(directory):  # the checkpoints, written first, still fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory, *a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", save_pretrained)
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--save_steps", "1000"))
    assert_one_line(code, err, EXIT_FAULT, "disk full while saving final/", "checkpoint-6 is kept")
    assert (snapshot(out / "final"), (out / "metrics.json").read_bytes()) == before
    assert not list(out.glob(".final*"))


def _free(monkeypatch, free: int) -> None:
    real = shutil.disk_usage

    def usage(path):
        return real(path)._replace(free=free)

    monkeypatch.setattr(diskspace.shutil, "disk_usage", usage)


def test_not_enough_disk_space_is_refused_before_training(capsys, monkeypatch, tiny_model, tmp_path):
    out = tmp_path / "run"
    _free(monkeypatch, 10_000)
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "4"))
    assert_one_line(code, err, EXIT_USER_ERROR, "not enough disk space", str(out), "9.8 KiB free", "--force")
    assert not out.exists()  # refused before anything was written


def test_when_only_the_final_model_fits_the_run_warns(capsys, monkeypatch, tiny_model, tmp_path):
    _free(monkeypatch, 400_000)  # the final model (~145 kB) fits, three checkpoints (~340 kB each) do not
    code, stdout, err = run_main(capsys, *args(tiny_model, tmp_path / "run", "--max_steps", "4"))
    assert code == 0, err[-3000:]
    assert "the final model fits but its checkpoints will not" in stdout


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        )
    except OSError:
        return False
    return done.returncode == 0


def test_a_real_full_disk(tiny_model, tmp_path):
    """On a 640 kB tmpfs the first checkpoint (~340 kB) fits and the second does not."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "640k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = disk / "run"
        command = [sys.executable, SCRIPTS / "llama3_8b_lora.py", *args(tiny_model, out, "--max_steps", "6")]
        done = subprocess.run(
            list(map(str, command)), env=offline_env(tmp_path), capture_output=True, text=True, timeout=300
        )
        assert_one_line(
            done.returncode, done.stderr, EXIT_FAULT, "disk full while saving checkpoint-", "is kept"
        )
        kept = checkpoints.checkpoints_in(out / "checkpoints")
        assert [p.name for p in kept] == ["checkpoint-2"] and checkpoints.problem(kept[0]) is None
        assert not (out / "checkpoints" / checkpoints.STAGING).exists() and not (out / "final").exists()
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)  # even while a file is still open there


# ------------------------------------------------------------------------------------------------- the lock


def _write_lock(out: Path, **holder) -> None:
    out.mkdir(parents=True)
    (out / LOCK_FILE).write_text(
        json.dumps({"started": "2026-01-01T00:00:00+00:00", "started_epoch": 0, **holder})
    )


def test_a_stale_lock_is_taken_over_with_a_note(capsys, tiny_model, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    _write_lock(out, pid=dead.pid, host=socket.gethostname())
    code, stdout, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "2"))
    assert code == 0, err[-3000:]
    assert (
        f"note: taking over the lock of a run that is gone (pid {dead.pid} on {socket.gethostname()}"
        in stdout
    )
    assert (out / "final").is_dir() and not (out / LOCK_FILE).exists()


def test_a_lock_held_on_another_host_is_respected(capsys, tiny_model, tmp_path):
    out = tmp_path / "run"
    _write_lock(out, pid=1, host="other-node")
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "2"))
    assert_one_line(
        code, err, EXIT_USER_ERROR, "in use by another run", "pid 1 on other-node", "delete the lock"
    )
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_two_runs_on_one_directory(capsys, tiny_model, tmp_path):
    out = tmp_path / "run"
    argv = args(tiny_model, out, "--max_steps", "100000", "--logging_steps", "1", "--save_steps", "100000")
    command = list(map(str, [sys.executable, SCRIPTS / "llama3_8b_lora.py", *argv]))
    with (tmp_path / "first.err").open("w") as stderr:
        first = subprocess.Popen(
            command, env=offline_env(tmp_path), stdout=subprocess.PIPE, stderr=stderr, text=True
        )
        try:
            for line in first.stdout:  # training is under way
                if "'loss'" in line:
                    break
            code, _, err = run_main(capsys, *argv)  # the same command, while the first one trains
            assert_one_line(code, err, EXIT_USER_ERROR, "in use by another run", f"pid {first.pid} on")
        finally:
            first.terminate()  # SIGTERM: the first run saves a checkpoint and stops
            first.communicate(timeout=120)
    assert first.returncode == 143, (tmp_path / "first.err").read_text()[-2000:]
    (checkpoint,) = checkpoints.checkpoints_in(out / "checkpoints")
    assert checkpoints.problem(checkpoint) is None and not (out / LOCK_FILE).exists()


def test_the_lock_being_taken_does_not_make_the_directory_occupied(tmp_path):
    """With --shard every rank checks the directory while rank 0 takes the lock, whose file it writes under a
    temporary name first: that name (or a stale lock moved aside) is not somebody else's data."""
    from finetune.resume import prepare_output_dir

    out = tmp_path / "run"
    out.mkdir()
    cfg = TrainConfig(method="lora", model_name="m", dataset="d", output_dir=str(out))
    for name in (f"{LOCK_FILE}.4242.tmp", f"{LOCK_FILE}.stale.4242", LOCK_FILE):
        (out / name).write_text("{}")
        assert prepare_output_dir(cfg) is None
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no run of these scripts"):
        prepare_output_dir(cfg)


# ------------------------------------------------------------------------------------------------- NaN, OOM


def _inject_at_step(monkeypatch, step: int, fault):
    """Call `fault(loss)` in place of the loss of every micro-batch of optimizer step `step`."""
    from finetune.train import SFTPlaybookTrainer

    real = SFTPlaybookTrainer.compute_loss

    def compute_loss(self, model, inputs, *a, **k):
        result = real(self, model, inputs, *a, **k)
        return fault(result) if self.state.global_step + 1 == step else result

    monkeypatch.setattr(SFTPlaybookTrainer, "compute_loss", compute_loss)


def test_a_nan_loss_stops_with_the_last_good_checkpoint(capsys, monkeypatch, tiny_model, tmp_path):
    out = tmp_path / "run"
    _inject_at_step(monkeypatch, 3, lambda loss: loss * float("nan"))
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6"))
    assert_one_line(
        code, err, EXIT_FAULT, "loss is nan at step 3", "--learning_rate 0.01", "bad row", "checkpoint-2",
        "--max_nan_steps",
    )  # fmt: skip
    assert [p.name for p in checkpoints.checkpoints_in(out / "checkpoints")] == ["checkpoint-2"]
    assert not (out / "final").exists() and not (out / "metrics.json").exists()
    for tensor in adapter(out / "checkpoints" / "checkpoint-2").values():
        assert torch.isfinite(tensor).all()


def test_max_nan_steps_skips_a_bad_step(capsys, monkeypatch, tiny_model, tmp_path):
    out = tmp_path / "run"
    _inject_at_step(monkeypatch, 3, lambda loss: loss * float("inf"))
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "4", "--max_nan_steps", "1"))
    assert code == 0, err[-3000:]
    assert all(torch.isfinite(t).all() for t in adapter(out / "final").values())  # the bad update was dropped


def test_out_of_memory_mid_run_saves_the_last_finished_step(capsys, monkeypatch, tiny_model, tmp_path):
    from finetune.train import MeasuredTrainer

    real = MeasuredTrainer.training_step

    def training_step(self, *a, **k):
        if self.state.global_step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, *a, **k)

    monkeypatch.setattr(MeasuredTrainer, "training_step", training_step)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--save_steps", "1000"))
    line = assert_one_line(code, err, EXIT_FAULT, "out of memory at step 4", "peak", "estimated", "available")
    assert f"saved step 3 to {out / 'checkpoints' / 'checkpoint-3'}" in line
    assert "would fit with" in line or "lower --batch_size" in line
    assert checkpoints.problem(out / "checkpoints" / "checkpoint-3") is None
    assert not (out / "final").exists() and not (out / LOCK_FILE).exists()

    monkeypatch.undo()
    code, stdout, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--save_steps", "1000"))
    assert code == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-3'}" in stdout


# ------------------------------------------------------------------------------------------------- DPO


def test_dpo_gets_the_same_protection(capsys, monkeypatch, tiny_model, tmp_path):
    """DPO shares the loop: a NaN loss stops it with its last good checkpoint, which a rerun resumes from; a
    finished DPO run rerun does nothing."""
    import llama3_8b_dpo
    from finetune.dpo import trainer_class

    def run_dpo(*extra) -> tuple[int, str, str]:
        argv = [
            "--model_name", tiny_model, "--dataset", DATA / "preference.jsonl", "--output_dir", tmp_path / "dpo",
            "--eval_split", "0", "--max_steps", "4", "--save_steps", "2", *FAST[:-2], *extra,
        ]  # fmt: skip
        code = 0
        try:
            main(
                [str(a) for a in argv], prog="test", description="test", defaults=llama3_8b_dpo.DEFAULTS,
                config_class=llama3_8b_dpo.DPOConfig, runner=llama3_8b_dpo.run,
            )  # fmt: skip
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    trainer = trainer_class()
    real = trainer.compute_loss

    def compute_loss(self, model, inputs, *a, **k):
        result = real(self, model, inputs, *a, **k)
        return result * float("nan") if self.state.global_step + 1 == 3 else result

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)
    code, _, err = run_dpo()
    assert_one_line(code, err, EXIT_FAULT, "loss is nan at step 3", "checkpoint-2")
    out = tmp_path / "dpo"
    assert [p.name for p in checkpoints.checkpoints_in(out / "checkpoints")] == ["checkpoint-2"]
    assert checkpoints.problem(out / "checkpoints" / "checkpoint-2") is None and not (out / "final").exists()

    monkeypatch.undo()
    code, stdout, err = run_dpo()
    assert code == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in stdout

    code, stdout, err = run_dpo()
    assert code == 0 and "finished at step 4" in stdout, err[-3000:]


# ------------------------------------------------------------------------------------------------- at true size


def _llama_8b():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip


def test_disk_estimate_for_an_8b_full_fine_tune():
    from finetune.model import count_parameters

    cfg = TrainConfig(model_name="meta-llama/Llama-3.2-3B-Instruct", output_dir="x", method="full")
    total, trainable = count_parameters(cfg, _llama_8b())
    plan = {"parameters": total, "trainable_parameters": trainable}
    checkpoint, final = diskspace.estimate(cfg, plan, torch.bfloat16.itemsize)
    # bf16 weights, then AdamW's two moments in bf16: 3 × 2 bytes × 8.03B; the final model is the weights alone.
    assert checkpoint == pytest.approx(48.2e9, rel=0.01) and final == pytest.approx(16.1e9, rel=0.01)
    check = diskspace.DiskCheck(
        free=60 * 10**9, checkpoint=checkpoint, checkpoints=3, final=final, already_used=0
    )
    diskspace.enforce_disk(check, dataclasses.replace(cfg, output_dir="/x"))  # only the final fits: a warning
    check.free = 10 * 10**9
    with pytest.raises(UserError) as refused:
        diskspace.enforce_disk(check, dataclasses.replace(cfg, output_dir="/x"))
    assert "9.3 GiB free" in str(refused.value) and "3 checkpoint(s) of ~44.9 GiB" in str(refused.value)


def test_disk_estimate_counts_the_best_model_and_the_export():
    """8B LoRA keeping its best model, merged to bf16 and converted to q8_0: the adapter is small, the export
    is not (16 GB merged + 8.5 GB GGUF), and a disk that holds the adapter but not the export is refused."""
    from finetune.model import count_parameters

    cfg = TrainConfig(
        model_name="meta-llama/Llama-3.1-8B-Instruct", output_dir="/x", load_best_model_at_end=True,
        export={"merge": True, "gguf": "q8_0"},
    )  # fmt: skip
    total, trainable = count_parameters(cfg, _llama_8b())
    plan = {"parameters": total, "trainable_parameters": trainable, "steps": 100}
    _, final = diskspace.estimate(cfg, plan, torch.bfloat16.itemsize)
    after = diskspace.after_training(cfg, plan, final)
    assert after == pytest.approx(final + 2 * 8.03e9 + 8.03e9 * 34 / 32, rel=0.01)
    check = diskspace.DiskCheck(free=20 * 10**9, checkpoint=final, checkpoints=2, final=final, already_used=0)
    diskspace.enforce_disk(check, cfg)  # without the export, it fits
    check.after = after
    with pytest.raises(UserError) as refused:
        diskspace.enforce_disk(check, cfg)
    assert "best/ and the export ~23.0 GiB" in str(refused.value) and "--force" in str(refused.value)


def test_out_of_memory_names_the_flags_that_would_fit():
    """8B LoRA, 8 × 2048 tokens, on an 80 GiB GPU: the pre-flight let it through, and it ran out at 79 GiB."""
    from finetune import preflight
    from finetune.data import DataStats
    from finetune.guards import OutOfMemoryMidRun, out_of_memory_error
    from finetune.memory import estimate_run
    from finetune.model import Placement, count_parameters

    config = _llama_8b()
    cfg = TrainConfig(model_name="x", output_dir="x", batch_size=8, seq_length=2048)
    stats = DataStats(format="alpaca", tokens=64 * 2048, trainable_tokens=32 * 2048, lengths=[2048] * 64)
    place = Placement("cuda", torch.bfloat16, 0)
    total, trainable = count_parameters(cfg, config)
    estimate = estimate_run(cfg, config, stats, place, total, trainable)
    plan = {"parameters": total, "trainable_parameters": trainable, "model_config": config, "steps": 8}
    plan |= {"examples_per_step": 8, "memory_estimate": estimate.as_dict()}
    available = preflight.Available(80 * 1024**3, "free memory on cuda:0, NVIDIA H100", False)
    check = preflight.MemoryCheck(estimate.total, estimate.total, available, True, [])
    error = out_of_memory_error(
        OutOfMemoryMidRun(5, "saved step 4 to c/checkpoint-4", 79 * 1024**3), check, cfg, plan, stats, place
    )
    line = str(error)
    assert error.exit_code == EXIT_FAULT and "\n" not in line
    assert (
        line.startswith("out of memory at step 5: peak 79.0 GiB (GPU allocator)") and "saved step 4" in line
    )
    assert "it would fit with --gradient_checkpointing" in line and "--batch_size " in line
    assert "--gradient_checkpointing resumes this run" in line


# ------------------------------------------------------------------------------------------------- sharded loop


def _sharded_call(monkeypatch, call: int, fault):
    """In the sharded loop (--shard), `fault(loss)` in place of the `call`-th micro-batch's loss."""
    from finetune import sharding

    real, calls = sharding.summed_loss, []

    def summed_loss(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return fault(loss) if len(calls) == call else loss

    monkeypatch.setattr(sharding, "summed_loss", summed_loss)


def test_sharded_nan_loss_stops_with_the_last_good_checkpoint(capsys, monkeypatch, tiny_model, tmp_path):
    out = tmp_path / "run"
    _sharded_call(monkeypatch, 3, lambda loss: loss * float("nan"))
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--shard"))
    line = assert_one_line(code, err, EXIT_FAULT, "loss is nan at step 3", "bad row among training examples")
    assert "after the eval split" in line and "checkpoint-2" in line and "--max_nan_steps" in line
    assert [p.name for p in checkpoints.checkpoints_in(out / "checkpoints")] == ["checkpoint-2"]
    assert not (out / "final").exists() and not (out / "metrics.json").exists()


def test_sharded_max_nan_steps_drops_the_bad_update(capsys, monkeypatch, tiny_model, tmp_path):
    out = tmp_path / "run"
    _sharded_call(monkeypatch, 3, lambda loss: loss * float("inf"))
    code, _, err = run_main(
        capsys, *args(tiny_model, out, "--max_steps", "4", "--shard", "--max_nan_steps", "1")
    )
    assert code == 0, err[-3000:]
    assert all(torch.isfinite(t).all() for t in adapter(out / "final").values())


def test_sharded_disk_full_during_a_checkpoint_keeps_the_last_one(capsys, monkeypatch, tiny_model, tmp_path):
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _disk_full_in_checkpoint(4))
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--shard"))
    assert_one_line(
        code, err, EXIT_FAULT, "disk full while saving checkpoint-4", "free", "checkpoint-2 is kept"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # no .partial left
    assert not (out / "final").exists() and not (out / LOCK_FILE).exists()

    monkeypatch.undo()
    code, stdout, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--shard"))
    assert code == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-2'}" in stdout


def test_sharded_out_of_memory_mid_run_is_one_line(capsys, monkeypatch, tiny_model, tmp_path):
    def oom(loss):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    out = tmp_path / "run"
    _sharded_call(monkeypatch, 4, oom)
    code, _, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--shard"))
    line = assert_one_line(code, err, EXIT_FAULT, "out of memory at step 4", "peak", "estimated", "available")
    assert f"saved step 3 to {out / 'checkpoints' / 'checkpoint-3'}" in line  # one process: it can save
    assert checkpoints.problem(out / "checkpoints" / "checkpoint-3") is None
    assert not (out / "final").exists() and not (out / LOCK_FILE).exists()

    monkeypatch.undo()
    code, stdout, err = run_main(capsys, *args(tiny_model, out, "--max_steps", "6", "--shard"))
    assert code == 0, err[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'checkpoint-3'}" in stdout
