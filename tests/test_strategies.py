"""Named strategies: one read from a file of several, an export run after training, the shipped presets sized by
the memory estimator, the plan of a dry run, and bad input."""

from __future__ import annotations

import llama3_3b_full
import llama3_8b_lora
import pytest
from conftest import DATA, read_metrics
from finetune import strategies
from finetune.cli import parse_config
from finetune.playbook import main


def run(*argv, defaults=llama3_8b_lora.DEFAULTS) -> None:
    main([str(a) for a in argv], prog="test", description="test", defaults=defaults)


def run_main(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code, err: str, *expected: str) -> None:
    assert code not in (0, None) and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert all(text in lines[0] for text in expected), lines[0]


def cpu_tiny(tiny_model, out) -> list:
    """The shipped cpu-tiny strategy, on the test suite's tiny model and data (its paths are the repo root's)."""
    return ["--strategy", "cpu-tiny", "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl",
            "--output_dir", out]  # fmt: skip


STRATEGIES = """\
defaults:
  eval_split: 0.2
strategies:
  small:
    description: a small one
    hardware: cpu
    method: full
    batch_size: 2
    learning_rate: 3e-4  # a string to YAML 1.1, read as the float it means
  large:
    batch_size: 8
    eval_steps: 5
"""


def test_a_strategy_is_read_under_its_defaults_and_flags_win(tmp_path):
    path = tmp_path / "strategies.yaml"
    path.write_text(STRATEGIES)

    def parse(*argv):
        argv = ["--config", path, "--model_name", "m", "--output_dir", "o", *argv]
        return parse_config(
            [str(a) for a in argv], prog="t", description="t", defaults=llama3_8b_lora.DEFAULTS
        )

    small = parse("--strategy", "small")
    assert (small.method, small.batch_size, small.learning_rate, small.eval_split) == ("full", 2, 3e-4, 0.2)
    assert small.strategy_info == {
        "name": "small",
        "file": str(path),
        "description": "a small one",
        "hardware": "cpu",
    }
    assert parse("--strategy", "small", "--batch_size", "4").batch_size == 4
    large = parse("--strategy", "large")
    assert (large.method, large.batch_size, large.eval_steps) == ("lora", 8, 5)


def test_a_strategy_with_an_export_leaves_a_gguf_and_a_modelfile(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    run(*cpu_tiny(tiny_model, out), "--max_steps", "4")
    printed = capsys.readouterr().out
    assert read_metrics(out)["global_step"] == 4
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors").is_file(), "the LoRA adapter was merged for the conversion"
    gguf = out / "model-f16.gguf"
    assert gguf.read_bytes()[:4] == b"GGUF"
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\n") and "<|eot_id|>" in modelfile
    assert f"ollama create tiny-llama -f {out / 'Modelfile'}" in printed

    # An export that failed after training runs alone when the command is run again: nothing is retrained.
    final = {p.name: p.read_bytes() for p in (out / "final").iterdir() if p.is_file()}
    gguf.unlink()
    (out / "Modelfile").unlink()
    run(*cpu_tiny(tiny_model, out), "--max_steps", "4")
    printed = capsys.readouterr().out
    assert "already holds this run" in printed and "its export is missing" in printed
    assert gguf.read_bytes()[:4] == b"GGUF" and (out / "Modelfile").read_text() == modelfile
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir() if p.is_file()} == final


def test_a_full_fine_tune_is_converted_without_a_merge(tiny_model, tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text("strategies:\n  full:\n    method: full\n    export: {gguf: f16}\n")
    out = tmp_path / "run"
    run("--config", config, "--strategy", "full", "--model_name", tiny_model, "--dataset", DATA / "alpaca.jsonl",
        "--output_dir", out, "--max_steps", "2", "--batch_size", "4", "--seq_length", "128", "--eval_split", "0",
        defaults=llama3_3b_full.DEFAULTS)  # fmt: skip
    assert (out / "model-f16.gguf").read_bytes()[:4] == b"GGUF" and not (out / "merged").exists()


def test_dry_run_of_a_strategy_prints_the_plan(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    run(*cpu_tiny(tiny_model, out), "--dry_run")
    plan = capsys.readouterr().out
    for text in (
        f"strategy         cpu-tiny ({strategies.SHIPPED})",
        "sized for a CPU with 8 GiB",
        "evaluation       every 2 steps and at the end, on 12 examples; final/ = the lowest eval loss",
        f"export           merge → {out / 'merged'}, GGUF f16 → {out / 'model-f16.gguf'}",
        "optimizer steps of 8 examples",
    ):
        assert text in plan, text
    assert not out.exists()


def test_shipped_presets_fit_their_hardware_per_the_memory_estimator(tiny_model):
    """Each preset's batch, sequence length and gradient checkpointing are what the estimator chooses for its
    hardware (strategies.size), and that estimate fits."""
    presets = strategies.preset_configs()
    assert set(presets) == {"quick-test", "spark-8b-lora", "spark-70b-qlora", "h100-8b-lora", "cpu-tiny"}
    for name, cfg in presets.items():
        hardware = strategies.HARDWARE[cfg.strategy_info["hardware"]]
        model = tiny_model if name == "cpu-tiny" else cfg.model_name
        model_config = strategies.model_config_for(str(model))
        chosen = strategies.size(
            cfg, model_config, hardware, cfg.batch_size * cfg.gradient_accumulation_steps
        )
        shipped = (
            cfg.batch_size,
            cfg.gradient_accumulation_steps,
            cfg.gradient_checkpointing,
            cfg.seq_length,
        )
        assert shipped == (
            chosen.batch_size, chosen.gradient_accumulation_steps, chosen.gradient_checkpointing, chosen.seq_length
        ), name  # fmt: skip
        assert chosen.fits and strategies.estimate(cfg, model_config, hardware) <= chosen.usable, name
        assert cfg.load_best_model_at_end and cfg.eval_steps, name


def test_sizing_turns_to_checkpointing_and_smaller_batches_when_memory_is_short():
    """The 8B LoRA at 2048 tokens: an H100 runs it without gradient checkpointing, a 24 GB GPU only with it."""
    from finetune.config import TrainConfig

    cfg = TrainConfig(model_name="meta-llama/Llama-3.1-8B-Instruct", output_dir="o")
    config = strategies.model_config_for(cfg.model_name)
    roomy = strategies.size(cfg, config, strategies.HARDWARE["h100"])
    tight = strategies.size(cfg, config, strategies.HARDWARE["gpu-24gb"])
    assert not roomy.gradient_checkpointing and roomy.batch_size * roomy.gradient_accumulation_steps == 8
    assert tight.gradient_checkpointing or tight.seq_length < cfg.seq_length
    assert tight.estimate <= tight.usable and roomy.estimate <= roomy.usable


def test_sizing_command_compares_each_strategy_with_the_estimator(tiny_model, tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(
        f"strategies:\n  tiny:\n    hardware: cpu\n    model_name: {tiny_model}\n    batch_size: 2\n"
        "    gradient_accumulation_steps: 4\n    seq_length: 256\n"
        "  elsewhere:\n    hardware: laptop\n    model_name: x\n"
    )
    strategies.main([str(path)])
    tiny, elsewhere = capsys.readouterr().out.strip().splitlines()
    assert tiny.startswith("tiny on cpu: the file has batch 2 x 4, seq 256, checkpointing off")
    assert tiny.endswith(")") and "the estimator chooses batch 8 x 1, seq 256, checkpointing off" in tiny
    assert elsewhere.startswith("elsewhere: skipped (hardware is none of dgx-spark, h100")


@pytest.mark.parametrize(
    ("text", "argv", "expected"),
    [
        ("strategies:\n  a: {}\n  b: {}\n", ["--strategy", "c"], ["no strategy 'c'", "known: a, b"]),
        ("strategies:\n  a:\n    batch_size: 2\n    batchsize: 4\n", ["--strategy", "a"],
         ["s.yaml:4:", "unknown key 'batchsize'", "did you mean batch_size?"]),
        ("defaults:\n  lora_rnak: 4\nstrategies:\n  a: {}\n", ["--strategy", "a"], ["s.yaml:2:", "'lora_rnak'"]),
        ("strategies:\n  a:\n    export:\n      gguf: q8_0\n      olama: x\n", ["--strategy", "a"],
         ["s.yaml:5:", "unknown export key 'olama'", "did you mean ollama?"]),
        ("strategies:\n  a:\n    export: {ollama: x}\n", ["--strategy", "a"], ["s.yaml:3:", "needs export.gguf"]),
        ("strategies:\n  a:\n    export: {gguf: q4}\n", ["--strategy", "a"], ["s.yaml:3:", "'q4'", "q8_0"]),
        ("strategies:\n  a:\n    batch_size: many\n", ["--strategy", "a"], ["s.yaml:3:", "batch_size should be int"]),
        ("stratgies:\n  a: {}\n", ["--strategy", "a"], ["s.yaml", "no `strategies:` mapping"]),
        ("strategies:\n  a: {}\nextra: 1\n", ["--strategy", "a"], ["s.yaml:3:", "unknown top-level key 'extra'"]),
        ("strategies:\n  a: {}\n", [], ["s.yaml:1:", "named strategies", "--strategy NAME"]),
        ("learning_rate: 1.0e-4\nlora_rnak: 16\n", [], ["s.yaml:2:", "unknown key 'lora_rnak'", "lora_rank"]),
        ("strategies:\n  a:\n    eval_steps: 5\n    eval_split: 0\n", ["--strategy", "a"],
         ["--eval_steps 5", "no eval data"]),
    ],
    ids=["unknown-strategy", "unknown-key", "unknown-default", "unknown-export-key", "ollama-without-gguf",
         "bad-gguf-type", "bad-type", "no-strategies", "unknown-top-level", "strategies-without-flag",
         "plain-config-line", "eval-without-data"],
)  # fmt: skip
def test_bad_strategy_files(capsys, tiny_model, tmp_path, text, argv, expected):
    config = tmp_path / "s.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    code, err = run_main(capsys, "--config", config, *argv, "--model_name", tiny_model, "--output_dir", out)
    assert_one_line_error(code, err, *expected)
    assert not out.exists()


def test_unknown_shipped_strategy_lists_the_presets(capsys, tiny_model, tmp_path):
    code, err = run_main(
        capsys, "--strategy", "spark-8b", "--model_name", tiny_model, "--output_dir", tmp_path
    )
    assert_one_line_error(code, err, "no strategy 'spark-8b'", "spark-8b-lora", "cpu-tiny", "quick-test")
