"""One run per output directory: a lock file naming the holder (pid, host, start time), taken atomically.

Two runs writing checkpoints, final/ and metrics.json into one directory at once would mix their outputs; the
second is refused with one line that names the first. A lock whose process is gone (dead on this host, or its pid
now belongs to a process started after the lock was taken) is stale: it is taken over with a note.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".run.lock"


def _holder() -> dict:
    now = time.time()
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "started_epoch": now,
    }


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, counted after the command name
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _is_stale(holder: dict) -> bool:
    """True when the holder is known to be gone: a dead pid on this host, or a pid reused by a newer process."""
    if holder.get("host") != socket.gethostname():
        return False  # no way to tell whether a process on another machine is alive
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    except (OSError, OverflowError, ValueError):
        return True
    started = _process_start(pid)
    # /proc's start time is rounded to clock ticks and btime to seconds: allow a little slack.
    return started is not None and started > float(holder.get("started_epoch", 0)) + 2


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: written by something else, or damaged
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _try_link(content: str, lock: Path) -> bool:
    """Create `lock` holding `content`, or return False if it exists. The file is written in full under another
    name and hard-linked into place, so a reader never sees it half written."""
    tmp = lock.with_name(f"{lock.name}.{os.getpid()}.tmp")
    tmp.write_text(content)
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def acquire(out: Path) -> Path:
    """Take the lock of output directory `out` (created if needed) or raise a `UserError` naming its holder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--output_dir {out}: cannot create it ({exc.strerror})") from None
    lock = out / LOCK_FILE
    mine = _holder()
    content = json.dumps(mine, indent=1)
    for _ in range(3):
        if _try_link(content, lock):
            return lock
        holder = _read(lock)
        if holder is None:
            continue  # released meanwhile
        if not holder or not _is_stale(holder):
            who = _describe(holder) if holder else "an unreadable lock"
            gone = (
                ""
                if holder.get("host", socket.gethostname()) == socket.gethostname()
                else "; if it is gone, delete the lock"
            )
            raise UserError(
                f"--output_dir {out} is in use by another run ({who}; {lock}); "
                f"wait for it to finish or choose another --output_dir{gone}"
            )
        # Move the stale lock aside under a name only this process uses; if another process took it over first,
        # what was moved is that process's live lock, which goes back.
        aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
        try:
            lock.rename(aside)
        except FileNotFoundError:
            continue
        if _read(aside) != holder:
            with contextlib.suppress(OSError):
                os.link(aside, lock)
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        print(f"note: taking over the lock of a run that is gone ({_describe(holder)})", flush=True)
    raise UserError(f"--output_dir {out}: could not take the lock {lock}; another run keeps taking it")


def release(lock: Path) -> None:
    """Remove the lock if it is still this process's."""
    holder = _read(lock)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold the lock of `out` for the duration; an output directory this created and left empty is removed."""
    created = not out.exists()
    lock = acquire(out)
    try:
        yield lock
    finally:
        release(lock)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: a run refused before writing anything leaves nothing behind
