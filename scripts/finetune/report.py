"""What a run reports: metrics.json, the summary table, the dry-run plan, and atomic file writes."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import tempfile
from pathlib import Path

import torch

from .memory import process_rss_bytes

VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "huggingface-hub",
)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def peak_memory_bytes(device: str) -> int:
    """GPU allocator peak on CUDA; the process's peak resident memory on CPU."""
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return process_rss_bytes()


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return str(value)


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_metrics(
    cfg, place, plan: dict, *, tokens: float, samples: float, seconds: float, peak: float
) -> dict:
    """The metrics.json entries every training loop reports alike: throughput, memory, device and provenance."""

    def rate(count: float) -> float | None:
        return count / seconds if seconds > 0 else None

    return {
        "tokens_per_second": rate(tokens),
        "samples_per_second": rate(samples),
        "train_tokens": int(tokens),
        "train_samples": int(samples),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": "cuda max allocated" if place.device == "cuda" else "process peak RSS",
        "estimated_peak_memory_bytes": plan["memory_estimate"]["total"],
        "wall_time_seconds": seconds,
        "device": place.device,
        "dtype": str(place.dtype).removeprefix("torch."),
        "config": dict(vars(cfg)),
        "data": plan["data"],
        "versions": versions(),
    }


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _best_row(metrics: dict) -> list[tuple[str, str]]:
    """The lowest eval loss, when there was more than one evaluation, and whether final/ holds that model."""
    if len(metrics.get("eval_history") or []) < 2 or metrics.get("best_eval_loss") is None:
        return []
    kept = " (in final/)" if metrics.get("final_model") == "best" else ""
    stopped = metrics.get("stopped_early_at_step")
    early = f"; stopped early at step {stopped}" if stopped else ""
    return [
        ("best eval loss", f"{metrics['best_eval_loss']:.4f} at step {metrics['best_step']}{kept}{early}")
    ]


def summary_table(metrics: dict) -> str:
    rows = [
        ("train loss", _fmt(metrics.get("train_loss"), ".4f")),
        ("eval loss", _fmt(metrics.get("eval_loss"), ".4f")),
        *_best_row(metrics),
        ("perplexity", _fmt(metrics.get("eval_perplexity"), ".2f")),
        ("tokens/s", _fmt(metrics.get("tokens_per_second"), ",.1f")),
        ("samples/s", _fmt(metrics.get("samples_per_second"), ",.2f")),
        (
            "peak memory",
            human_bytes(metrics.get("peak_memory_bytes")) + f" ({metrics.get('peak_memory_kind')})",
        ),
        ("steps", str(metrics.get("global_step"))),
        ("wall time", _fmt(metrics.get("wall_time_seconds"), ".1f") + " s"),
        ("model", str(metrics.get("final_dir"))),
        ("metrics", str(metrics.get("metrics_file"))),
    ]
    width = max(len(name) for name, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    body = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    return f"{line}\n{body}\n{line}"


def plan_text(plan: dict) -> str:
    estimate = plan["memory_estimate"]
    lines = [
        f"model            {plan['model_name']} ({plan['method']}, {plan['dtype']} on {plan['device']})",
        f"parameters       {plan['parameters']:,} total, {plan['trainable_parameters']:,} trainable "
        f"({100 * plan['trainable_parameters'] / max(plan['parameters'], 1):.3f}%)",
        f"data             {plan['dataset']} ({plan['dataset_format']}): {plan['train_examples']} training examples, "
        f"{plan['train_tokens']:,} tokens ({plan['trainable_tokens']:,} with loss), "
        f"{plan['eval_examples']} eval examples",
        f"dropped/truncated {plan['dropped']} / {plan['truncated']} examples at --seq_length {plan['seq_length']}",
        f"steps            {plan['steps']} optimizer steps of {'~' if plan.get('batch_tokens') else ''}"
        f"{plan['examples_per_step']} examples ({'packed' if plan['packing'] else 'padded'}, "
        + (f"micro-batches of up to {plan['batch_tokens']:,} tokens, " if plan.get("batch_tokens") else "")
        + f"largest micro-batch {plan['micro_batch_tokens']:,} tokens)",
        f"peak memory      ~{human_bytes(estimate['total'])} estimated (weights {human_bytes(estimate['weights'])}, "
        f"optimizer+grads {human_bytes(estimate['trainable_state'])}, activations "
        f"{human_bytes(estimate['activations'])}, logits {human_bytes(estimate['logits'])}, "
        f"runtime {human_bytes(estimate['runtime'])})",
        *([f"memory check     {plan['memory_check']}"] if plan.get("memory_check") else []),
        *([f"evaluation       {plan['evaluation']}"] if plan.get("evaluation") else []),
        *([f"strategy         {plan['strategy']}"] if plan.get("strategy") else []),
        f"output           {plan['output_dir']}",
        *([f"export           {plan['export']}"] if plan.get("export") else []),
    ]
    return "\n".join(lines)
