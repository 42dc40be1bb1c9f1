"""The output directory's layout, and its final artefacts written whole or not at all (resume.py decides which
run a directory holds and where a run resumes from).

Layout of an output directory:
    run.json          the settings that identify the run (a different run is refused, the same one resumed)
    checkpoints/      checkpoint-N/ every --save_steps and on SIGINT/SIGTERM
    logs/             TensorBoard event files
    final/            the adapter or full model with its tokenizer, swapped in whole when training finishes
    metrics.json      loss, eval loss, perplexity, throughput, peak memory, configuration, versions
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.json"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`, replacing what was there.

    Two renames (a non-empty directory cannot be replaced in one): the old directory goes aside first and
    comes back if the second rename fails, so `target` never holds a partial result.
    """
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        if old.exists():
            old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_final(model, tokenizer, out: Path) -> Path:
    final, tmp = out / FINAL, out / f".{FINAL}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.use_cache = True  # turned off for training; generation wants it back
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial model takes space and is of no use
        raise
    return final
