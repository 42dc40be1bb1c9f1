"""NVIDIA's LoRA command (NeMo AutoModel) and this project's 8B LoRA script side by side on one GPU.

    python3 playbooks/nemo-fine-tune/gpu_check.py --nemo_python .venv-nemo/bin/python \\
        --ours_python .venv/bin/python --out results/

Offline: both train the same random-initialised Llama with a real architecture (bench/architectures.py;
llama-3.2-3b by default) on the same SQuAD-shaped rows (AutoModel reads them as a local SQuAD dataset, our
script as Alpaca rows with the same question, context and answer), 20 optimizer steps of the same size: the
recipe's 64 packs of 1024 tokens per step (8 per micro-batch, 8 accumulated on one GPU), ours 8 accumulated
micro-batches of up to 8192 real tokens. AutoModel runs NVIDIA's command as written plus local-path overrides
(model, dataset, no checkpoints) and as many epochs as 20 steps need (the recipe stops after one); tokens/s and
peak memory are the median of its logged `tps` (its packs' tokens, padding included) and the maximum of its
`mem` over the steps after the first; ours come from metrics.json (real tokens). Writes OUT/nemo-gpu-check.json and prints a table. Needs a CUDA GPU; stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from cpu_check import COMMANDS, PASSAGE, QUESTIONS, write_squad  # noqa: E402

STEPS = 20  # NVIDIA's --step_scheduler.max_steps
STEP_LINE = re.compile(r"step (\d+) \|.*\| mem ([\d.]+) GiB \| tps ([\d.]+)")


def build_model(python: str, cache: Path, architecture: str, layers: int | None) -> Path:
    code = (
        "import sys; sys.path[:0] = ['bench', 'scripts']; from pathlib import Path; import architectures; "
        f"print(architectures.build_model(Path({str(cache)!r}), {architecture!r}, {layers!r}, 'bfloat16'))"
    )
    done = subprocess.run([python, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return Path(done.stdout.strip().splitlines()[-1])


def write_alpaca(path: Path, copies: int) -> Path:
    rows = [
        {"instruction": question, "input": PASSAGE, "output": answer}
        for question, answer in QUESTIONS * copies
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(command: list[str], cwd: Path, log: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.monotonic()
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(f"gpu_check: {' '.join(command[:3])} failed ({log}):\n" + "\n".join(tail))
    return time.monotonic() - start


def automodel(args, model: Path, squad: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    link = work / "examples"
    if not link.exists():
        link.symlink_to(Path(args.examples).resolve())
    command = [args.nemo_python, "examples/llm_finetune/finetune.py", *COMMANDS["lora"][:]]
    command += ["--model.pretrained_model_name_or_path", str(model)]
    command += ["--dataset.dataset_name", str(squad), "--validation_dataset.dataset_name", str(squad)]
    command += ["--step_scheduler.ckpt_every_steps", "1000000", "--step_scheduler.val_every_steps", "1000000"]
    command += ["--step_scheduler.num_epochs", "1000"]  # NVIDIA's --step_scheduler.max_steps 20 ends it
    seconds = run(command, work, work / "automodel.log")
    steps = [tuple(map(float, m.groups())) for m in STEP_LINE.finditer((work / "automodel.log").read_text())]
    if len(steps) < STEPS:
        raise SystemExit(f"gpu_check: AutoModel logged {len(steps)} of {STEPS} steps ({work / 'automodel.log'})")
    timed = [s for s in steps if s[0] >= 1] or steps
    if not timed:
        raise SystemExit(f"gpu_check: no step lines in {work / 'automodel.log'}")
    return {
        "steps": len(steps),
        "tokens_per_second": statistics.median(s[2] for s in timed),
        "peak_memory_gib": max(s[1] for s in timed),
        "wall_seconds": seconds,
        "command": command,
    }


def ours(args, model: Path, data: Path, work: Path) -> dict:
    out = work / "ours"
    command = [args.ours_python, str(REPO / "scripts" / "llama3_8b_lora.py"), "--model_name", str(model)]
    command += ["--dataset", str(data), "--max_steps", str(STEPS), "--seq_length", "1024", "--packing"]
    command += ["--batch_tokens", "8192", "--gradient_accumulation_steps", "8"]  # the recipe's step size
    command += ["--output_dir", str(out), "--overwrite_output_dir", "--force"]
    seconds = run(command, work, work / "ours.log")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "tokens_per_second": metrics.get("tokens_per_second"),
        "peak_memory_gib": (metrics.get("peak_memory_bytes") or 0) / 1024**3,
        "wall_seconds": seconds,
        "command": command,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nemo_python", default=str(REPO / ".venv-nemo" / "bin" / "python"))
    parser.add_argument("--ours_python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--examples", default=os.environ.get("AUTOMODEL_EXAMPLES", str(HERE / "examples")))
    parser.add_argument("--architecture", default="llama-3.2-3b", help="bench/architectures.py name")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (default: all)")
    parser.add_argument("--copies", type=int, default=400, help="copies of the SQuAD-shaped rows (x4 rows)")
    parser.add_argument("--out", type=Path, default=Path("nemo-gpu-check"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.ours_python, args.out / "models", args.architecture, args.layers)
    squad = write_squad(args.out / "squad", copies=args.copies)
    alpaca = write_alpaca(args.out / "squad-alpaca.jsonl", copies=args.copies)
    result = {
        "model": {"architecture": args.architecture, "layers": args.layers, "path": str(model)},
        "automodel": automodel(args, model, squad, args.out / "automodel"),
        "ours": ours(args, model, alpaca, args.out),
    }
    (args.out / "nemo-gpu-check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'':<10} {'tokens/s':>12} {'peak GiB':>9} {'wall s':>8}")
    for name in ("automodel", "ours"):
        row = result[name]
        print(
            f"{name:<10} {row['tokens_per_second'] or 0:>12,.0f} {row['peak_memory_gib']:>9.2f} "
            f"{row['wall_seconds']:>8.0f}"
        )


if __name__ == "__main__":
    main()
