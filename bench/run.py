#!/usr/bin/env python3
"""Training throughput and peak memory: this project's playbooks against NVIDIA's reference approach.

    python bench/run.py --configs 8b-lora --layers 1 --seq_length 1024 --batch_size 4 --steps 5 --repeats 3

Each (configuration, implementation, repeat) trains in its own process for --steps optimizer steps on the same
model, data, batch size and sequence length; the first --warmup_steps are not timed. Reported: real
(non-padding) tokens/s, samples/s, peak memory (CUDA: allocator peak; CPU: process peak RSS), model TFLOP/s and,
on a GPU with a known bf16 peak, MFU; medians over the repeats, and each as a ratio ours/baseline. Writes
results.json and results.png (when matplotlib is installed) to --out. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = BENCH.parent / "scripts"
sys.path[:0] = [str(BENCH), str(SCRIPTS)]

import architectures  # noqa: E402
import synthetic  # noqa: E402

# configuration → (architecture, playbook script whose defaults are used)
CONFIGS = {
    "tiny-lora": ("tiny", "llama3_8b_lora"),
    "3b-full": ("llama-3.2-3b", "llama3_3b_full"),
    "8b-lora": ("llama-3.1-8b", "llama3_8b_lora"),
    "70b-qlora": ("llama-3.1-70b", "llama3_70b_qlora"),
}
IMPLEMENTATIONS = ("ours", "baseline")
# Our playbook with one speed choice changed, to measure what each is worth (--impls ours-padded,...).
ABLATIONS = {
    "ours-padded": "without packing: rows padded to the longest in the batch",
    "ours-all-logits": "logits (and the lm_head) for every position, not only those with loss",
    "ours-checkpointed": "with gradient checkpointing (what the 70B QLoRA playbook turns on)",
    "ours-fused": "with the fused LoRA, SwiGLU and RMSNorm layers and the chunked loss on any device (the "
    "playbooks: the CPU only)",
}
ALL_IMPLEMENTATIONS = (*IMPLEMENTATIONS, *ABLATIONS)
RESULT_PREFIX = "BENCH_RESULT "
IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------ worker


def batch_counts(inputs: dict) -> dict:
    """Real tokens, samples, tokens with loss and causal attention pairs of one collated micro-batch."""
    if "attention_mask" in inputs:
        lengths = inputs["attention_mask"].sum(-1).tolist()
    else:  # packed rows: each example's positions start at 0; padding is one-token pieces
        from finetune.attention import segments

        pieces = segments(inputs["position_ids"])
        lengths = [end - start for row in pieces for start, end, single in row if not single]
    return {
        "tokens": int(sum(lengths)),
        "samples": len(lengths),
        "loss_tokens": int((inputs["labels"][..., 1:] != IGNORE_INDEX).sum()),
        "attention_pairs": int(sum(n * (n + 1) // 2 for n in lengths)),
    }


class StepTimer:
    """Trainer mixin: the start time and the counts of every micro-batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bench_steps: list[dict] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.bench_steps.append({"start": time.perf_counter(), **batch_counts(inputs)})
        return super().training_step(model, inputs, num_items_in_batch)


def worker(spec: dict) -> dict:
    import torch
    from finetune.cli import parse_config
    from finetune.data import Collator, prepare_data
    from finetune.memory import process_rss_bytes
    from finetune.model import FUSED_DEVICES, load_model, load_model_config, load_tokenizer, placement
    from finetune.playbook import make_plan
    from finetune.train import MeasuredTrainer, SFTPlaybookTrainer, training_arguments
    from transformers import Trainer, set_seed
    from transformers.utils import logging

    logging.set_verbosity_error()
    out = Path(tempfile.mkdtemp(prefix="bench-run-"))
    defaults = importlib.import_module(spec["script"]).DEFAULTS
    argv = [
        "--model_name", spec["model_dir"], "--dataset", spec["dataset"], "--output_dir", str(out),
        "--batch_size", spec["batch_size"], "--seq_length", spec["seq_length"], "--max_steps", spec["steps"],
        "--eval_split", "0", "--logging_steps", "1000", "--save_steps", "100000", "--dtype", spec["dtype"],
    ]  # fmt: skip
    if spec["impl"] == "ours-padded":
        argv.append("--no_packing")
    if spec["impl"] == "ours-checkpointed":
        argv.append("--gradient_checkpointing")
    elif spec["gradient_checkpointing"] is not None:
        argv.append(
            "--gradient_checkpointing" if spec["gradient_checkpointing"] else "--no_gradient_checkpointing"
        )
    cfg = parse_config([str(a) for a in argv], prog="bench", description="", defaults=defaults)
    tokenizer = load_tokenizer(cfg.model_name)
    data = prepare_data(cfg, tokenizer)
    place = placement(cfg)
    model_config = load_model_config(cfg.model_name)
    plan = make_plan(cfg, model_config, data, place)
    set_seed(cfg.seed)
    if spec["impl"] == "ours-fused":
        FUSED_DEVICES.add(place.device)
    model = load_model(cfg, model_config, place)
    if spec["impl"].startswith("ours"):
        # ours-all-logits: the same trainer without SFTPlaybookTrainer.compute_loss (loss_positions_only).
        base = MeasuredTrainer if spec["impl"] == "ours-all-logits" else SFTPlaybookTrainer
        trainer_class = type("OursTrainer", (StepTimer, base, Trainer), {})
        trainer = trainer_class(
            model=model,
            args=training_arguments(cfg, place, out),
            train_dataset=data.train,
            data_collator=Collator(tokenizer.pad_token_id, cfg.packing),
            processing_class=tokenizer,
        )
    else:
        from baseline import baseline_trainer

        trainer = baseline_trainer((StepTimer, MeasuredTrainer), cfg, model, tokenizer, place, str(out))
    trainer.train()

    steps = trainer.bench_steps[spec["warmup_steps"] :]
    if len(steps) < 2:
        raise SystemExit("--steps must exceed --warmup_steps by at least 2")
    timed = steps[:-1]  # each from its start to the next one's
    seconds = steps[-1]["start"] - steps[0]["start"]
    totals = {
        key: sum(s[key] for s in timed) for key in ("tokens", "samples", "loss_tokens", "attention_pairs")
    }
    counts = architectures.parameter_counts(model_config, cfg.lora_rank if cfg.uses_lora else None)
    flops = architectures.step_flops(
        counts, cfg.method, totals["tokens"], totals["loss_tokens"], totals["attention_pairs"]
    )
    if place.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        device_name = torch.cuda.get_device_name()
    else:
        peak = process_rss_bytes()  # the playbooks' measure: the peak resident memory of this process
        device_name = "cpu"
    peak_flops = spec["peak_tflops"] * 1e12 if spec["peak_tflops"] else architectures.bf16_peak(device_name)
    tflops = flops / seconds / 1e12
    return {
        **{k: spec[k] for k in ("config", "impl", "repeat")},
        "device": device_name,
        "dtype": str(place.dtype).removeprefix("torch."),
        "timed_steps": len(timed),
        "seconds": seconds,
        **totals,
        "tokens_per_second": totals["tokens"] / seconds,
        "samples_per_second": totals["samples"] / seconds,
        "peak_memory_bytes": int(peak),
        "estimated_peak_memory_bytes": plan["memory_estimate"]["total"],
        "model_tflops": tflops,
        "mfu": tflops * 1e12 / peak_flops if peak_flops and place.device == "cuda" else None,
        "final_loss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
    }


# ------------------------------------------------------------------------------------------------ driver


def run_one(spec: dict) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(
            f"{spec['config']} {spec['impl']} failed ({done.returncode}):\n{done.stderr[-4000:]}"
        )
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def row_lengths(model_dir: str, rows: list[dict]) -> list[int]:
    """Tokens of each row rendered with the Alpaca prompt (what both implementations train on)."""
    from finetune.data import Row, render, to_example
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = None
    texts = [render(tokenizer, to_example(Row(r, ""), "alpaca"))[0] for r in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for config in dict.fromkeys(r["config"] for r in runs):
        row = {"config": config}
        for impl in ALL_IMPLEMENTATIONS:
            mine = [r for r in runs if r["config"] == config and r["impl"] == impl]
            if not mine:
                continue
            for key in (
                "tokens_per_second",
                "samples_per_second",
                "peak_memory_bytes",
                "model_tflops",
                "mfu",
            ):
                values = [r[key] for r in mine if r[key] is not None]
                row[f"{impl}_{key}"] = statistics.median(values) if values else None
            row[f"{impl}_runs"] = len(mine)
        for key in ("tokens_per_second", "samples_per_second", "peak_memory_bytes"):
            ours, base = row.get(f"ours_{key}"), row.get(f"baseline_{key}")
            row[f"ratio_{key}"] = ours / base if ours and base else None
        rows.append(row)
    return rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    gib = 1024**3
    header = (
        f"{'config':<12} {'impl':<16} {'tokens/s':>10} {'samples/s':>10} {'peak GiB':>9} {'TFLOP/s':>8} "
        f"{'MFU':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        for impl in ALL_IMPLEMENTATIONS:
            if f"{impl}_runs" not in row:
                continue
            peak = row[f"{impl}_peak_memory_bytes"]
            mfu = row[f"{impl}_mfu"]
            lines.append(
                f"{row['config']:<12} {impl:<16} {_fmt(row[f'{impl}_tokens_per_second'], ',.1f'):>10} "
                f"{_fmt(row[f'{impl}_samples_per_second'], ',.3f'):>10} {_fmt(peak and peak / gib, '.2f'):>9} "
                f"{_fmt(row[f'{impl}_model_tflops'], '.3f'):>8} {_fmt(mfu and 100 * mfu, '.1f'):>6}"
            )
        if row.get("ratio_tokens_per_second"):
            lines.append(
                f"{row['config']:<12} {'ours/baseline':<16} {row['ratio_tokens_per_second']:>9.2f}x "
                f"{row['ratio_samples_per_second']:>9.2f}x {row['ratio_peak_memory_bytes']:>8.2f}x"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    configs = [r["config"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, scale in (
        (axes[0], "tokens_per_second", "real tokens/s (median)", 1),
        (axes[1], "peak_memory_bytes", "peak memory, GiB (median)", 1024**3),
    ):
        impls = [i for i in ALL_IMPLEMENTATIONS if any(f"{i}_runs" in r for r in rows)]
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            values = [(r.get(f"{impl}_{key}") or 0) / scale for r in rows]
            offset = (k - (len(impls) - 1) / 2) * width
            ax.bar([i + offset for i in range(len(rows))], values, width, label=impl)
        ax.set_xticks(range(len(rows)), configs)
        ax.set_title(label)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="8b-lora", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real depth)")
    parser.add_argument("--seq_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup_steps", type=int, default=1, help="first steps left out of the timing")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each implementation; medians reported"
    )
    parser.add_argument("--rows", type=int, default=512, help="rows of synthetic Alpaca-like data")
    parser.add_argument(
        "--impls",
        default=",".join(IMPLEMENTATIONS),
        help=f"comma-separated, of {', '.join(ALL_IMPLEMENTATIONS)} (the last ones: ours with one choice undone)",
    )
    parser.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument(
        "--gradient_checkpointing",
        default=None,
        choices=("on", "off"),
        help="override the playbook's default (on for 70B QLoRA, off otherwise)",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="no training: each playbook's --dry_run (plan, memory estimate, fit) at these settings, without weights",
    )
    parser.add_argument("--model_dir", default=None, help="a real checkpoint instead of a random model")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device bf16 peak, for MFU")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "llm-finetune-bench"))
    parser.add_argument("--out", default=str(BENCH / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if set(impls) - set(ALL_IMPLEMENTATIONS):
        raise SystemExit(f"--impls: choose from {', '.join(ALL_IMPLEMENTATIONS)}")
    cache, out = Path(args.cache).expanduser(), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    # The benchmark tokenizer (tiny BPE) makes ~2 tokens of an English word, Llama 3's ~1.3.
    tokens_per_word = 1.3 if args.model_dir else 2.0
    rows = synthetic.generate(args.rows, tokens_per_word=tokens_per_word)
    dataset = synthetic.write(out / "alpaca-like.jsonl", rows)
    if args.plan:
        for config in configs:
            architecture, script = CONFIGS[config]
            model_dir = args.model_dir or architectures.config_only(cache, architecture, args.layers)
            command = [
                sys.executable, str(SCRIPTS / f"{script}.py"), "--model_name", str(model_dir), "--dataset",
                str(dataset), "--output_dir", str(out / "plan"), "--seq_length", str(args.seq_length),
                "--batch_size", str(args.batch_size), "--dtype", "bfloat16" if args.dtype == "auto" else dtype,
                "--dry_run",
            ]  # fmt: skip
            if args.gradient_checkpointing:
                command.append(
                    f"--{'' if args.gradient_checkpointing == 'on' else 'no_'}gradient_checkpointing"
                )
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            print(f"== {config} ({script}.py)\n{done.stdout.strip()}{done.stderr.strip()}\n", flush=True)
        return

    runs = []
    for config in configs:
        architecture, script = CONFIGS[config]
        model_dir = args.model_dir or str(architectures.build_model(cache, architecture, args.layers, dtype))
        print(f"{config}: {model_dir}; tokens per row {synthetic.describe(row_lengths(model_dir, rows))}")
        for repeat in range(args.repeats):
            for impl in impls:
                spec = {
                    "config": config, "impl": impl, "repeat": repeat, "script": script, "model_dir": model_dir,
                    "dataset": str(dataset), "batch_size": args.batch_size, "seq_length": args.seq_length,
                    "steps": args.steps, "warmup_steps": args.warmup_steps, "dtype": dtype,
                    "gradient_checkpointing": None if args.gradient_checkpointing is None
                    else args.gradient_checkpointing == "on",
                    "peak_tflops": args.peak_tflops,
                }  # fmt: skip
                result = run_one(spec)
                runs.append(result)
                print(
                    f"  {impl:<16} repeat {repeat}: {result['tokens_per_second']:,.1f} tokens/s, "
                    f"{result['samples_per_second']:.3f} samples/s, peak {result['peak_memory_bytes'] / 1024**3:.2f} GiB",
                    flush=True,
                )
    summary = summarize(runs)
    settings = {k: v for k, v in vars(args).items() if k != "worker"} | {"dtype": dtype}
    (out / "results.json").write_text(
        json.dumps({"settings": settings, "summary": summary, "runs": runs}, indent=2) + "\n"
    )
    print()
    print(table(summary))
    image = plot(summary, out / "results.png")
    print(f"\n{out / 'results.json'}" + (f", {image}" if image else " (install matplotlib for the plot)"))


if __name__ == "__main__":
    main()
