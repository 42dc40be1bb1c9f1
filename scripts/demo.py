#!/usr/bin/env python3
"""A one-minute, offline proof that this environment can fine-tune: no download, no GPU needed.

Builds the tiny model, runs each playbook script on it with the shipped Alpaca sample for a few steps,
and prints each run's summary.

    python scripts/demo.py [--workdir DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune.errors import UserError, run_cli
from finetune.report import summary_table

HERE = Path(__file__).resolve().parent
PLAYBOOKS = ("llama3_8b_lora.py", "llama3_3b_full.py", "llama3_70b_qlora.py")
SAMPLE = HERE.parent / "tests" / "data" / "alpaca.jsonl"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, help="keep the model and runs here (default: a temporary directory)"
    )
    parser.add_argument("--dataset", type=Path, default=SAMPLE, help="training data (default: %(default)s)")
    parser.add_argument(
        "--steps", type=int, default=10, help="training steps per playbook (default: %(default)s)"
    )
    return parser.parse_args(argv)


def run_demo(args: argparse.Namespace) -> None:
    from finetune.tiny import build_tiny_model

    if not args.dataset.is_file():
        raise UserError(f"--dataset {args.dataset}: no such file")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="finetune-demo-"))
    model = build_tiny_model(workdir / "tiny-model")
    print(f"tiny model: {model}\n", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    results = {}
    for script in PLAYBOOKS:
        out = workdir / Path(script).stem
        command = [
            sys.executable, str(HERE / script), "--model_name", str(model), "--dataset", str(args.dataset),
            "--output_dir", str(out), "--overwrite_output_dir", "--max_steps", str(args.steps),
            "--batch_size", "4", "--seq_length", "256", "--learning_rate", "1e-3", "--logging_steps", "5",
        ]  # fmt: skip
        print(f"== {script}", flush=True)
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0:
            sys.stderr.write(completed.stderr[-4000:])
            raise UserError(f"{script} failed with exit code {completed.returncode}; its output is above")
        results[script] = json.loads((out / "metrics.json").read_text())
        print(summary_table(results[script]) + "\n", flush=True)
    print(f"all {len(results)} playbooks trained and saved their outputs under {workdir}")


def main(argv=None) -> None:
    run_cli(lambda: run_demo(parse_args(argv)))


if __name__ == "__main__":
    main()
