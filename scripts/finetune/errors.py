"""User-facing failures: one exception type, one place that prints it.

Anything the user can fix (a flag, a file, a login) is raised as `UserError` with a one-line message.
Only the entry point (`run_cli`) prints it, so library code never calls `sys.exit` itself.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

# Exit codes: argparse already uses 2 for bad flags; the signal ones follow the shell's 128 + N.
EXIT_FAULT = 1  # the run failed on its way (NaN loss, out of memory, a full disk); what it finished is kept
EXIT_USER_ERROR = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class UserError(Exception):
    """A problem with the input that the user can act on. The message is shown as is, without a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR, every_rank: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.every_rank = every_rank  # raised alike on every rank of a torchrun job: only rank 0 prints it


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC as Python raises it, or as safetensors' writer words it."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return any(text in str(exc) for text in ("No space left on device", "os error 28"))


def _out_of_memory_message(exc: BaseException) -> str | None:
    text = str(exc)
    if "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return (
            "out of memory: lower --batch_size or --seq_length, turn on --gradient_checkpointing, "
            "or use the QLoRA playbook for large models"
        )
    return None


def quiet_libraries() -> None:
    """Library chatter (deprecations, advice) would bury the plan, the summary and our one-line errors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()


def run_cli(main: Callable[[], object]) -> None:
    """Run `main` with quiet libraries, turning user errors and interrupts into a message and an exit code."""
    prog = "error"
    try:
        quiet_libraries()
        main()
    except UserError as exc:
        if not exc.every_rank or os.environ.get("RANK", "0") == "0":
            print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted before training started; nothing was written", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
    except (RuntimeError, MemoryError) as exc:
        message = _out_of_memory_message(exc)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_FAULT)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{prog}: disk full{where}; free some space and run the same command again", file=sys.stderr)
        sys.exit(EXIT_FAULT)
