#!/usr/bin/env python3
"""The per-rank memory table of the sharding docs, from the same estimate the pre-flight check makes.

python bench/memory_table.py     # prints the Markdown table in playbooks/pytorch-fine-tune/README.md

Real Llama 3 architectures (bench/architectures.py), counted on the meta device; bf16 on CUDA; every micro-batch
a packed row of batch_size × seq_length tokens (the worst case the scripts plan for), half of them with loss. One
rank per GPU or per DGX Spark.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from architectures import ARCHITECTURES
from finetune.config import TrainConfig
from finetune.memory import GIB, estimate_peak, per_rank
from finetune.model import count_parameters

RANKS = (1, 2, 4)
# (row label, architecture, settings): each playbook script's defaults, gradient checkpointing on.
RUNS = (
    ("70B LoRA, bf16 (`llama3_70b_lora.py`)", "llama-3.1-70b",
     {"method": "lora", "batch_size": 4, "shard": True}),
    ("70B QLoRA, 4-bit (`llama3_70b_qlora.py`, not sharded)", "llama-3.1-70b",
     {"method": "qlora", "batch_size": 8, "shard": False}),
    ("8B full, bf16 (`llama3_3b_full.py --model_name …8B… --shard`)", "llama-3.1-8b",
     {"method": "full", "batch_size": 8, "shard": True}),
)  # fmt: skip


def per_rank_gib(architecture: str, settings: dict, ranks: int) -> float:
    from transformers import LlamaConfig

    config = LlamaConfig(**ARCHITECTURES[architecture])
    cfg = TrainConfig(
        model_name="x", output_dir="x", seq_length=2048, gradient_checkpointing=True, **settings
    )
    total, trainable = _parameters(architecture, cfg.method)
    tokens = cfg.batch_size * cfg.seq_length
    estimate = estimate_peak(
        cfg, config, total, trainable, torch.bfloat16, "cuda", tokens, loss_tokens=tokens // 2
    )
    if cfg.shard:
        estimate = per_rank(estimate, cfg, config, torch.bfloat16, ranks)
    return estimate.total / GIB


@functools.cache
def _parameters(architecture: str, method: str) -> tuple[int, int]:
    from transformers import LlamaConfig

    cfg = TrainConfig(model_name="x", output_dir="x", method=method)
    return count_parameters(cfg, LlamaConfig(**ARCHITECTURES[architecture]))


def table() -> str:
    lines = [
        "| per rank (GiB) | " + " | ".join(f"{n} rank{'s' if n > 1 else ''}" for n in RANKS) + " |",
        "| --- | " + " | ".join("---:" for _ in RANKS) + " |",
    ]
    for label, architecture, settings in RUNS:
        cells = [f"{per_rank_gib(architecture, settings, n):.0f}" for n in RANKS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
