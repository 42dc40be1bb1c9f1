"""Synthetic Alpaca-style rows with Alpaca's shape of lengths, generated offline and deterministically.

Lengths (in Llama 3 tokens) are drawn from log-normal distributions shaped like tatsu-lab/alpaca's: short
instructions (median ~15 tokens), an input in ~40% of rows (median ~20), and responses with a median of ~45
tokens and a long tail (a few percent past 300, clipped at 1,500). With the Alpaca prompt around them, most rows
are 60-200 tokens and a few are ten times that, which is what makes padding to the longest row expensive.
The words are consecutive runs of the project's bundled English corpus. `describe` reports the distribution
actually produced by the benchmark's tokenizer.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

CORPUS = Path(__file__).resolve().parent.parent / "scripts" / "finetune" / "assets" / "tiny_corpus.txt"
# (median tokens, sigma of the log, share of rows that have the field)
INSTRUCTION = (15, 0.5, 1.0)
INPUT = (20, 0.9, 0.4)
OUTPUT = (45, 1.0, 1.0)
MAX_FIELD_TOKENS = 1500


def _tokens(rng: random.Random, median: float, sigma: float) -> int:
    return max(1, min(MAX_FIELD_TOKENS, round(rng.lognormvariate(math.log(median), sigma))))


def generate(rows: int, seed: int = 0, tokens_per_word: float = 1.3) -> list[dict]:
    """`rows` Alpaca rows; `tokens_per_word` converts token targets into words for the tokenizer in use."""
    words = CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(seed)

    def text(median: float, sigma: float) -> str:
        count = max(1, round(_tokens(rng, median, sigma) / tokens_per_word))
        start = rng.randrange(len(words))
        return " ".join(words[(start + k) % len(words)] for k in range(count))

    out = []
    for _ in range(rows):
        row = {"instruction": text(*INSTRUCTION[:2])}
        row["input"] = text(*INPUT[:2]) if rng.random() < INPUT[2] else ""
        row["output"] = text(*OUTPUT[:2])
        out.append(row)
    return out


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def describe(lengths: list[int]) -> dict:
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "rows": len(ordered),
        "mean": round(statistics.fmean(ordered), 1),
        "median": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
    }
