"""glibc's malloc on the CPU: give the memory of freed tensors back to the system.

By default glibc raises its mmap threshold each time a large block is freed (up to 32 MiB on 64-bit); from
then on activations and gradients up to that size come from the heap, which is returned to the system only
from its top. A step's freed activations stay resident and fragment the heap, and the next step adds to them.
Measured on bench/peers.py's 63M-parameter model (LoRA, batch 8, seq 512, CPU, the same 4 steps): peak RSS
2.19 GiB with glibc's defaults, 1.60 GiB with fixed 256 KiB mmap and trim thresholds and 2 arenas, and the
resident memory between steps 1.88 against 0.77 GiB. Setting a threshold with mallopt also stops glibc's
adjusting it. MALLOC_* variables the user set win.

Every large tensor is then mapped afresh, and the kernel faults its pages in as they are first written: with
4 KiB pages that cost ~10% of a step on that model. `finetune/__init__.py` therefore sets PyTorch's
THP_MEM_ALLOC_ENABLE (unless the user did), which aligns CPU tensors of 2 MiB and more to 2 MiB and asks for
transparent huge pages (madvise), where the kernel allows them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
THRESHOLD_BYTES = 256 * 1024
ARENAS = 2


def return_freed_memory() -> bool:
    """Fixed mmap and trim thresholds and at most ARENAS arenas; False where the C library is not glibc or
    the user set MALLOC_* variables."""
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    settings = (
        (M_MMAP_THRESHOLD, THRESHOLD_BYTES),
        (M_TRIM_THRESHOLD, THRESHOLD_BYTES),
        (M_ARENA_MAX, ARENAS),
    )
    return all(mallopt(option, value) == 1 for option, value in settings)
