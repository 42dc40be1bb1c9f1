#!/usr/bin/env python3
"""PEFT's LoRA forward against finetune.lora_fused, alternating in one process on the CPU.

    python bench/lora_fused.py [--out bench/results/peers] [--tokens 4096] [--repeats 3]

One packed micro-batch of bench/peers.py's data on its 63M-parameter model (LoRA r 8 on every linear layer):
forward and backward, timed with PEFT's layers and with the fused ones in turn; prints each time and the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "scripts")]

import peers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "peers")
    parser.add_argument("--tokens", type=int, default=4096, help="the micro-batch's token budget")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from finetune.attention import PACKED_SDPA, flat_rows
    from finetune.data import Collator, build_examples, load_rows, token_batches
    from finetune.lora_fused import fuse_lora_layers
    from finetune.train import loss_positions_only
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data, _ = peers.prepare(args.out.resolve())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = SimpleNamespace(seq_length=peers.SEQ_LENGTH, train_on_prompt=False)
    examples, _ = build_examples(load_rows(str(data / "alpaca.jsonl")), "alpaca", tokenizer, settings)
    collate = Collator(tokenizer.eos_token_id, True, peers.SEQ_LENGTH, flat_rows(PACKED_SDPA))  # as training
    batch = loss_positions_only(collate(token_batches(examples, args.tokens)[0]))
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=PACKED_SDPA
    )
    model.config.use_cache = False
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(model, config)

    def peft_layers():
        for module in model.modules():
            if type(module) is Linear:
                module.__dict__.pop("forward", None)  # back to the class's (PEFT's) forward

    def step() -> float:
        started = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step()  # warm-up
    times = {"peft": [], "fused": []}
    for _ in range(args.repeats):
        peft_layers()
        times["peft"].append(step())
        fuse_lora_layers(model)
        times["fused"].append(step())
    tokens = int(batch["input_ids"].numel())
    for name, values in times.items():
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:5}  {runs} s  median {statistics.median(values):.2f} s  ({tokens} tokens a pass)")


if __name__ == "__main__":
    main()
