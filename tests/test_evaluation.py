"""Evaluation while training: early stopping on a run that overfits, the best model in final/, the best so far
kept across an interruption, the overfitting warning, eval points in the loss plot, and bad input."""

from __future__ import annotations

import os
import signal

import llama3_3b_full
import llama3_8b_lora
import pytest
from conftest import DATA, read_metrics
from finetune.evaluate import evaluate
from finetune.playbook import main
from finetune.train import MeasuredTrainer

MAX_STEPS = 60
PATIENCE = 3


@pytest.fixture(scope="module")
def split_data(tmp_path_factory):
    """The Alpaca sample as 44 training rows and a small eval set of 4 (one eval batch, so the trainer's eval
    loss is the token mean that evaluate.py computes too)."""
    rows = (DATA / "alpaca.jsonl").read_text().splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("split")
    (folder / "train.jsonl").write_text("".join(rows[:44]))
    (folder / "eval.jsonl").write_text("".join(rows[44:]))
    return folder / "train.jsonl", folder / "eval.jsonl"


def overfitting_run(tiny_model, split_data, out) -> list[str]:
    """Full fine-tuning at a high learning rate: the eval loss falls for a few steps, then rises."""
    train, held_out = split_data
    return [str(a) for a in (
        "--model_name", tiny_model, "--dataset", train, "--eval_dataset", held_out, "--output_dir", out,
        "--batch_size", "4", "--seq_length", "256", "--logging_steps", "2", "--save_steps", "1000",
        "--learning_rate", "1e-2", "--max_steps", MAX_STEPS, "--eval_steps", "2",
        "--load_best_model_at_end", "--early_stopping_patience", PATIENCE,
    )]  # fmt: skip


def train(argv) -> None:
    main(argv, prog="test", description="test", defaults=llama3_3b_full.DEFAULTS)


def run_main(capsys, *argv, defaults=llama3_8b_lora.DEFAULTS) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv], prog="test", description="test", defaults=defaults)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code, err: str, *expected: str) -> None:
    assert code not in (0, None) and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) == 1 and line.startswith("error:"), err
    assert all(text in line for text in expected), line


@pytest.fixture(scope="module")
def stopped_run(tiny_model, split_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit") / "run"
    train(overfitting_run(tiny_model, split_data, out))
    return out


def independent_eval_loss(model_dir, eval_file) -> float:
    return evaluate(str(model_dir), str(eval_file), seq_length=256, batch_size=4, dtype="float32")["loss"]


def test_early_stopping_stops_a_run_whose_eval_loss_rises(stopped_run):
    metrics = read_metrics(stopped_run)
    history = metrics["eval_history"]
    assert metrics["stopped_early_at_step"] == metrics["global_step"] < MAX_STEPS
    best = metrics["best_step"]
    after = [e["eval_loss"] for e in history if e["step"] > best]
    assert len(after) == PATIENCE and all(loss > metrics["best_eval_loss"] for loss in after)
    falling = [e["eval_loss"] for e in history if e["step"] <= best]
    assert falling[0] > falling[-1], "the eval loss fell before it rose"
    assert metrics["overfitting_warning"].startswith("warning: overfitting: the eval loss rose")
    assert "\n" not in metrics["overfitting_warning"]


def test_final_holds_the_best_model_and_its_loss_is_the_minimum_of_the_history(stopped_run, split_data):
    metrics = read_metrics(stopped_run)
    losses = [e["eval_loss"] for e in metrics["eval_history"]]
    assert metrics["best_eval_loss"] == min(losses) and metrics["eval_loss"] == losses[-1] > min(losses)
    assert metrics["final_model"] == "best" and metrics["best_step"] < metrics["global_step"]
    # Evaluated afresh from disk, final/ is the model of the best step, not the last one.
    assert independent_eval_loss(stopped_run / "final", split_data[1]) == pytest.approx(min(losses), abs=1e-4)
    assert not (stopped_run / "best").exists(), "best/ became final/"


def test_a_resumed_run_keeps_the_best_so_far(stopped_run, tiny_model, split_data, tmp_path, monkeypatch):
    reference = read_metrics(stopped_run)
    interrupt_at = reference["best_step"] + 2  # after the best evaluation, before early stopping
    assert interrupt_at < reference["global_step"]
    out = tmp_path / "run"
    argv = overfitting_run(tiny_model, split_data, out)

    record = MeasuredTrainer.record_step_loss

    def record_then_interrupt(self, step):
        record(self, step)
        if step == interrupt_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler's time limit would

    with monkeypatch.context() as patched:
        patched.setattr(MeasuredTrainer, "record_step_loss", record_then_interrupt)
        with pytest.raises(SystemExit) as stopped:
            train(argv)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert (out / "best" / "best.json").is_file() and not (out / "final").exists()

    train(argv)  # the same command again: resumes
    metrics = read_metrics(out)
    assert metrics["resumed_from"].endswith(f"checkpoint-{interrupt_at}")
    assert (metrics["best_step"], metrics["final_model"]) == (reference["best_step"], "best")
    assert metrics["best_eval_loss"] == pytest.approx(reference["best_eval_loss"], abs=1e-5)
    assert metrics["stopped_early_at_step"] == reference["stopped_early_at_step"]
    assert [e["step"] for e in metrics["eval_history"]] == [e["step"] for e in reference["eval_history"]]
    assert independent_eval_loss(out / "final", split_data[1]) == pytest.approx(
        reference["best_eval_loss"], abs=1e-4
    )


def test_loss_plot_shows_the_eval_points(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from finetune import plot
    from matplotlib.figure import Figure

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: drawn.append(figure))
    history = [{"step": s, "step_loss": 5.0 - 0.1 * s} for s in range(1, 9)]
    history += [{"step": s, "eval_loss": loss} for s, loss in ((2, 5.0), (4, 4.5), (6, 4.7), (8, 4.9))]
    plot.write_loss_plot(history, tmp_path, window=2)
    lines = {line.get_label(): line for line in drawn[0].axes[0].get_lines()}
    assert list(lines["eval loss"].get_xdata()) == [2, 4, 6, 8]
    best = next(line for label, line in lines.items() if label.startswith("lowest eval loss"))
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([4], [4.5])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--eval_steps", "5", "--eval_split", "0"], ["--eval_steps 5", "no eval data", "--eval_split"]),
        (["--eval_strategy", "epoch", "--eval_split", "0"], ["--eval_strategy epoch", "no eval data"]),
        (["--load_best_model_at_end"], ["--load_best_model_at_end", "--eval_steps N"]),
        (["--early_stopping_patience", "2"], ["--early_stopping_patience", "evaluation during training"]),
        (["--eval_strategy", "steps"], ["--eval_strategy steps needs --eval_steps"]),
        (["--eval_strategy", "epoch", "--eval_steps", "3"], ["--eval_steps 3", "not epoch"]),
        (["--eval_strategy", "often"], ["--eval_strategy 'often'", "steps"]),
        (["--eval_steps", "0"], ["--eval_steps 0", "at least 1"]),
    ],
)
def test_bad_evaluation_flags(capsys, tiny_model, tmp_path, extra, expected):
    out = tmp_path / "out"
    code, err = run_main(
        capsys, "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl", "--output_dir", out, *extra
    )  # fmt: skip
    assert_one_line_error(code, err, *expected)
    assert not out.exists()
