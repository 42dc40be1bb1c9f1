"""QLoRA on the CPU with a bitsandbytes that has no native CPU library.

nixpkgs' bitsandbytes built with CUDA ships only its CUDA library. On a machine without a GPU it finds
no library to load; bitsandbytes >= 0.48 then falls back to its pure-PyTorch CPU code. This test
rebuilds that situation from the installed bitsandbytes without its native libraries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SCRIPTS

PROBE = f"""
import sys
sys.path.insert(0, {str(SCRIPTS)!r})
import bitsandbytes.cextension
from finetune.model import check_bitsandbytes
print(type(bitsandbytes.cextension.lib).__name__)
check_bitsandbytes("cpu")
print("4-bit on the CPU works")
"""


def test_4bit_runs_on_the_cpu_without_a_native_library(tmp_path):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    package = Path(bitsandbytes.__file__).parent
    shutil.copytree(package, tmp_path / "bitsandbytes", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "ErrorHandlerMockBNBNativeLibrary", "bitsandbytes loaded a native library after all"
    assert lines[-1] == "4-bit on the CPU works"
