"""Checkpoints that are either complete or absent, and verified before a run resumes from one.

The Trainer writes each checkpoint into `checkpoints/.staging/checkpoint-N/`; the files are fsynced, a marker
(`checkpoint_complete.json`, listing every file and its size) is written last, and the directory is renamed to
`checkpoints/checkpoint-N/`. A crash or a full disk during a save leaves at most the staging directory, which is
removed and never resumed from: a checkpoint without the marker does not count.

Before resuming, the newest checkpoint is checked (the marker, every file's size, the safetensors headers,
`trainer_state.json`); a bad one is named in one line and the newest good one is used instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from .errors import EXIT_FAULT, UserError, is_disk_full
from .outputs import CHECKPOINTS, is_main_process, replace_dir
from .report import human_bytes

MARKER = "checkpoint_complete.json"
STAGING = ".staging"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(directory: Path, step: int) -> None:
    """Flush every file of a written checkpoint to disk, then add the marker that says it is complete."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            _fsync(path)
            files[path.relative_to(directory).as_posix()] = path.stat().st_size
    for path in [p for p in directory.rglob("*") if p.is_dir()] + [directory]:
        _fsync(path)
    marker = directory / MARKER
    tmp = directory / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1, sort_keys=True))
    _fsync(tmp)
    tmp.rename(marker)
    _fsync(directory)


# ------------------------------------------------------------------------------------------------- verifying


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes, which must end
    exactly where the file does."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return "its header runs past the end of the file"
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, OSError):
        return "its header does not parse"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + length + max(ends, default=0) != size:
        return "its tensors do not fill the file"
    return None


def problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete and intact."""
    try:
        record = json.loads((checkpoint / MARKER).read_text())
        files, step = dict(record["files"]), int(record["step"])
    except FileNotFoundError:
        return "incomplete (no completion marker: the save was cut short, or not written by these scripts)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER} is unreadable"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written"
        if name.endswith(".safetensors") and (why := _safetensors_problem(path)):
            return f"{name}: {why}"
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        saved_step = state["global_step"]
    except FileNotFoundError:
        return f"{TRAINER_STATE} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} does not parse"
    if saved_step != step:
        return f"{TRAINER_STATE} says step {saved_step}, the marker step {step}"
    return None


def checkpoints_in(directory: Path) -> list[Path]:
    """checkpoint-N directories, newest (highest step) first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _describe(bad: list[tuple[Path, str]]) -> str:
    return "; ".join(f"{path.name} is unusable: {why}" for path, why in bad)


def resume_point(directory: Path) -> str | None:
    """The newest good checkpoint under `directory` (None if there are none at all).

    Bad ones newer than it are named in one line; if every checkpoint is bad, a `UserError` says how to start over.
    """
    candidates = checkpoints_in(directory)
    bad = []
    for checkpoint in candidates:
        why = problem(checkpoint)
        if why is None:
            if bad and is_main_process():
                print(f"warning: {_describe(bad)}; resuming from {checkpoint.name} instead", flush=True)
            return str(checkpoint)
        bad.append((checkpoint, why))
    if bad:
        raise UserError(
            f"no usable checkpoint in {directory}: {_describe(bad)}; "
            "--resume never starts the run over (the bad checkpoints are replaced as it saves)"
        )
    return None


def verify(checkpoint: Path, flag: str = "--resume") -> None:
    """For a checkpoint the user named: refuse a bad one, with the reason."""
    why = problem(checkpoint)
    if why is not None:
        raise UserError(f"{flag} {checkpoint}: {why}")


# ------------------------------------------------------------------------------------------------- saving


def _rotate(directory: Path, keep: int | None, protect: str | None) -> None:
    """Keep the newest `keep` complete checkpoints (and the best one, which the Trainer may still load)."""
    if not keep:
        return
    complete = [p for p in checkpoints_in(directory) if (p / MARKER).is_file()]
    for old in complete[keep:]:
        if protect is None or Path(protect).name != old.name:
            shutil.rmtree(old, ignore_errors=True)


def newest_good(directory: Path) -> Path | None:
    """The newest checkpoint under `directory` that passes `problem`'s checks."""
    return next((p for p in checkpoints_in(directory) if problem(p) is None), None)


def kept_checkpoint(directory: Path) -> str:
    good = newest_good(directory)
    return f"{good} is kept" if good else "no checkpoint was kept (the run would start over)"


def disk_full_message(what: str, path: Path, kept: str) -> str:
    free = human_bytes(shutil.disk_usage(path).free) if path.exists() else "?"
    return (
        f"disk full while saving {what} under {path} ({free} free); {kept}; free some space "
        "(or lower --save_total_limit) and run the same command again"
    )


def save_atomically(trainer, save, model, trial) -> None:
    """Run the Trainer's own `_save_checkpoint` (`save`) into a staging directory, then seal it and rename it into
    place. `trainer` is the Trainer whose output directory is redirected for the duration."""
    root = Path(trainer.args.output_dir)
    step = trainer.state.global_step
    staging_root = root / STAGING
    staging, target = staging_root / checkpoint_name(step), root / checkpoint_name(step)
    main = trainer.args.should_save
    try:
        if main:
            # Whatever is there was left by a run that died mid-save (this run holds the directory's lock).
            shutil.rmtree(staging_root, ignore_errors=True)
            staging_root.mkdir(parents=True)
        _barrier()
        trainer._get_output_dir = lambda trial=None: str(
            staging_root
        )  # an instance attribute shadows the method
        try:
            save(model, trial)
        finally:
            trainer.__dict__.pop("_get_output_dir", None)
        _barrier()  # every rank has written its RNG state
        if main:
            _point_at_published(trainer.state, step, staging_root, root, staging)
            seal(staging, step)
            replace_dir(staging, target)
            with contextlib.suppress(OSError):
                staging_root.rmdir()  # only if empty
            _fsync(root)
            _rotate(root, trainer.args.save_total_limit, trainer.state.best_model_checkpoint)
    except Exception as exc:
        full = disk_full_at(exc, root)
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                staging_root.rmdir()
        if full:
            message = disk_full_message(checkpoint_name(step), root, kept_checkpoint(root))
            raise UserError(message, EXIT_FAULT) from None
        raise
    _barrier()


# torch.save on a full disk fails with a RuntimeError that does not say why ("unexpected pos ..."): a failed write
# with (almost) nothing left free on that filesystem is taken to be a full disk.
NEARLY_FULL_BYTES = 16 * 1024**2


def disk_full_at(exc: BaseException, path: Path) -> bool:
    if is_disk_full(exc):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(path).free < NEARLY_FULL_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_is_one_line(what: str, out: Path):
    """A full disk while writing `what` under `out` becomes one line naming what was kept."""
    try:
        yield
    except Exception as exc:
        if not disk_full_at(exc, out):
            raise
        kept = f"the previous {what} (if any) and the checkpoints are unchanged; {kept_checkpoint(out / CHECKPOINTS)}"
        raise UserError(disk_full_message(what, out, kept), EXIT_FAULT) from None


def _point_at_published(state, step: int, staging_root: Path, root: Path, staging: Path) -> None:
    """The Trainer recorded the best checkpoint relative to where it was writing: point it at `root` instead,
    and save the state again so the checkpoint carries the right path."""
    best = state.best_model_checkpoint
    if best and Path(best).parent == staging_root:
        state.best_model_checkpoint = str(root / Path(best).name)
    best_step = getattr(state, "best_global_step", None)
    if best_step and (best_step == step or (root / checkpoint_name(best_step)).is_dir()):
        state.best_model_checkpoint = str(root / checkpoint_name(best_step))
    if (staging / TRAINER_STATE).is_file():
        state.save_to_json(str(staging / TRAINER_STATE))
