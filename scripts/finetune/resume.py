"""Which run an output directory holds, and where a run resumes from.

A directory holding another run (by run.json's identifying settings) or files of something else is refused
unless --overwrite_output_dir; the same run resumes from its newest good checkpoint (checkpoints.py), and a
finished one is not trained again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import checkpoints
from .config import TrainConfig
from .errors import UserError
from .lock import LOCK_FILE
from .outputs import CHECKPOINTS, FINAL, METRICS, RUN_FILE, is_main_process


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in keys[:4]) + (
        " …" if len(keys) > 4 else ""
    )


def prepare_output_dir(cfg: TrainConfig) -> str | None:
    """Refuse a directory that holds something else; return the checkpoint to resume from, if any."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a directory")
    run_file = out / RUN_FILE
    # The lock and its passing temporaries (finetune.lock), which another rank may be writing right now.
    occupied = out.is_dir() and any(not p.name.startswith(LOCK_FILE) for p in out.iterdir())
    same_run = False
    if occupied and run_file.is_file():
        # Only the settings that identify a run today (a run.json may name ones that no longer do).
        previous = {k: v for k, v in json.loads(run_file.read_text()).items() if k in cfg.identity()}
        same_run = previous == cfg.identity()
        if not same_run and not cfg.overwrite_output_dir:
            raise UserError(
                f"--output_dir {out} holds a different run ({_describe_difference(previous, cfg.identity())}); "
                "choose another directory or pass --overwrite_output_dir to replace it"
            )
    elif occupied and not cfg.overwrite_output_dir:
        raise UserError(
            f"--output_dir {out} is not empty and holds no run of these scripts; "
            "choose another directory or pass --overwrite_output_dir"
        )

    if cfg.overwrite_output_dir and is_main_process():
        # Old checkpoints belong to another run (or the user asked to start over): never resume from them.
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        same_run = False

    if cfg.resume not in ("auto", "never"):
        checkpoint = Path(cfg.resume).expanduser()
        if not (checkpoint / "trainer_state.json").is_file():
            raise UserError(f"--resume {cfg.resume}: not a checkpoint directory (no trainer_state.json)")
        checkpoints.verify(checkpoint)
        return str(checkpoint)
    if cfg.resume == "auto" and same_run:
        return checkpoints.resume_point(out / CHECKPOINTS)
    return None


def finished_run(cfg: TrainConfig) -> str | None:
    """If `--output_dir` holds this very run, finished (final/ and metrics.json written for the same settings and
    number of steps), the line that says so; else None."""
    out = Path(cfg.output_dir).expanduser()
    if cfg.overwrite_output_dir or cfg.resume != "auto" or not (out / FINAL).is_dir():
        return None
    try:
        done = json.loads((out / METRICS).read_text())
        config = done["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = {**cfg.identity(), "max_steps": cfg.max_steps}
    if not isinstance(config, dict) or {k: config.get(k) for k in wanted} != wanted:
        return None
    return (
        f"{out} already holds this run, finished at step {done.get('global_step')}: the model is in {out / FINAL}, "
        f"the metrics in {out / METRICS}; nothing to do (--overwrite_output_dir trains it again)"
    )
