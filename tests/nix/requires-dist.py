"""Regenerate tests/nix/nixpkgs-stub/requires-dist.json from PyPI.

The nixpkgs stand-in checks every Python package's `Requires-Dist` the way nixpkgs'
pythonRuntimeDepsCheckHook does at build time. This script records those requirements for the
versions the stand-in and the overlay use, from each release's published metadata:

    python tests/nix/requires-dist.py            # needs pip and packaging, and PyPI

Extras are dropped; environment markers are evaluated for CPython 3.14 on Linux, and a requirement
is kept when its marker holds on x86_64 or on aarch64 (the flake's two systems).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

OUT = Path(__file__).resolve().parent / "nixpkgs-stub" / "requires-dist.json"

# name -> versions: nixpkgs' version of each package the stand-in models, plus those the overlay moves to.
RELEASES = {
    "accelerate": ["1.11.0", "1.12.0"],
    "bitsandbytes": ["0.48.2"],
    # The CUDA wheels of overlays/cuda-wheels (their Requires-Dist that names other packages).
    "cuda-bindings": ["13.5.0"],
    "nvidia-cudnn-cu13": ["9.20.0.48"],
    "nvidia-cusolver": ["12.0.4.66"],
    "torch": ["2.13.0"],
    "triton": ["3.7.1"],
    "datasets": ["4.0.0", "5.1.0"],
    "hf-xet": ["1.8.0"],
    "huggingface-hub": ["1.28.0", "1.31.0"],
    "peft": ["0.18.0"],
    "safetensors": ["0.8.0"],
    "tokenizers": ["0.23.2"],
    "transformers": ["5.5.4"],
    "trl": ["0.24.0", "0.25.1", "0.29.1"],
    # playbooks/llama-factory: LLaMA-Factory and the releases its Python set moves to.
    "gradio": ["5.50.0"],
    "gradio-client": ["1.14.0"],
    "llamafactory": ["0.9.5"],
    "tyro": ["0.8.14"],
}

ENVIRONMENTS = [
    {
        "python_version": "3.14",
        "python_full_version": "3.14.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_system": "Linux",
        "platform_machine": machine,
        "extra": "",
    }
    for machine in ("x86_64", "aarch64")
]


def metadata(name: str, version: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        # --isolated: PyPI itself, whatever mirrors or constraints this machine's pip config names.
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--isolated",
            "--index-url",
            "https://pypi.org/simple",
        ]
        command += ["--quiet", "--disable-pip-version-check", "--dry-run", "--no-deps", "--ignore-installed"]
        subprocess.run(
            [*command, "--report", str(report), f"{name}=={version}"],
            check=True,
        )
        (item,) = json.loads(report.read_text())["install"]
        return item["metadata"]


def requirements(meta: dict) -> list[list[str]]:
    kept = []
    for line in meta.get("requires_dist") or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate(env) for env in ENVIRONMENTS):
            continue
        kept.append([canonicalize_name(req.name), str(req.specifier)])
    return sorted(kept)


def main() -> None:
    table = {
        name: {version: requirements(metadata(name, version)) for version in versions}
        for name, versions in sorted(RELEASES.items())
    }
    OUT.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
