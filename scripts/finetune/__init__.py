"""Shared library behind the playbook fine-tuning scripts in this directory."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"

# What every script imports first. Checked by name, without importing, so that a Python without them hears in one
# line how to get them instead of a ModuleNotFoundError traceback from deep inside a script.
_REQUIRED = ("torch", "transformers", "datasets", "peft", "trl", "accelerate", "safetensors", "yaml")
_missing = [name for name in _REQUIRED if _importlib_util.find_spec(name) is None]
if _missing:
    _sys.stderr.write(
        f"error: {', '.join(_missing)} not installed for {_sys.executable}; set up an environment with "
        "`python3 dev.py demo` (a local .venv; then use .venv/bin/python), `nix develop`, or "
        "`pip install torch==2.13.0 && pip install -c constraints.txt -e .`\n"
    )
    raise SystemExit(2)

# Before torch allocates anything (it reads the variable once): CPU tensors of 2 MiB and more get transparent huge
# pages, so the activations a step allocates afresh fault in 2 MiB at a time, not 4 KiB (finetune.allocator).
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
