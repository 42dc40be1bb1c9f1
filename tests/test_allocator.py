"""glibc's malloc gives freed tensors' memory back to the system once finetune.allocator has set it up."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCRIPTS

# Frees 64 blocks of 4 MiB while small tensors allocated between them stay alive, and prints how many MiB
# stay resident. With glibc's defaults the first large free raises the mmap threshold above 4 MiB, the blocks
# come from the heap and the small tensors pin it.
PROBE = """
import sys
sys.path.insert(0, sys.argv[2])
import torch
from finetune.allocator import return_freed_memory

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

if sys.argv[1] == "on":
    assert return_freed_memory()
first = torch.ones(8 << 20, dtype=torch.uint8)
del first
base = resident()
blocks, keep = [], []
for _ in range(64):
    blocks.append(torch.ones(4 << 20, dtype=torch.uint8))
    keep.append(torch.ones(16))
del blocks
print((resident() - base) >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc and /proc")
def test_freed_activations_leave_the_process():
    # glibc's thresholds alone: with huge-page alignment (test_large_tensors_get_huge_pages) glibc's defaults
    # happen to keep fewer of these blocks, and the control below would say nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["THP_MEM_ALLOC_ENABLE"] = "0"

    def retained(mode: str) -> int:
        result = subprocess.run(
            [sys.executable, "-c", PROBE, mode, str(SCRIPTS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.strip())

    on = retained("on")
    assert on < 32, f"{on} MiB of freed blocks stayed resident with return_freed_memory()"
    # The control: whether glibc's defaults keep them depends on how its thresholds adapted in that process.
    off = retained("off")
    if off < 128:
        pytest.skip(f"this glibc returned the blocks by itself ({off} MiB kept): nothing to compare against")
    assert on < off


def test_the_users_malloc_settings_win(monkeypatch):
    from finetune.allocator import return_freed_memory

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert return_freed_memory() is False


def _transparent_huge_pages() -> str:
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return setting.split("[")[1].split("]")[0] if "[" in setting else "unknown"


HUGE_PROBE = """
import re, sys
sys.path.insert(0, sys.argv[1])
import finetune
import torch
x = torch.ones(64 << 20, dtype=torch.uint8)
print(re.search(r"AnonHugePages:\\s+(\\d+)", open("/proc/self/smaps_rollup").read()).group(1))
"""


@pytest.mark.skipif(
    _transparent_huge_pages() not in ("always", "madvise"),
    reason="the kernel gives no transparent huge pages",
)
def test_large_tensors_get_huge_pages():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run(
        [sys.executable, "-c", HUGE_PROBE, str(SCRIPTS)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) >= 32 << 10, f"{result.stdout.strip()} KiB of a 64 MiB tensor in huge pages"
