"""Regenerate the CUDA wheel manifests beside this file (and the NeMo AutoModel set's) from PyPI.

    python overlays/cuda-wheels/update.py            # resolve; URLs and sha256 as PyPI publishes them
    python overlays/cuda-wheels/update.py --verify   # also download every wheel and recompute its hash
    python overlays/cuda-wheels/update.py --set nemo [--verify]
                                                     # playbooks/nemo-fine-tune/wheels/cp314-<system>.json

For each system, pip resolves torch and bitsandbytes at the versions in constraints.txt for CPython
3.14 on that platform, with torch's own requirements (triton and the NVIDIA CUDA 13 libraries).
The manifest keeps the wheels that carry CUDA (torch, triton, bitsandbytes, cuda-*, nvidia-*), each
with its URL, hash (SRI), size in bytes (what `nix develop` downloads), Requires-Dist, and
`dependencies`: the names it needs on that system (markers evaluated, with the extras the others ask
of it), which overlays/cuda-wheels.nix turns into the package's dependencies. The pure-Python rest
(numpy, sympy, ...) comes from nixpkgs. Needs pip and packaging (network access to PyPI); --verify
downloads every wheel to recompute its hash: 2.8 GB for x86_64-linux, 2.9 GB for aarch64-linux.

`--set nemo`: nemo-automodel at playbooks/nemo-fine-tune/constraints.txt (the versions its CPU venv is tested
with) resolved the same way, keeping every wheel that the CUDA set's resolution (torch, bitsandbytes and their
requirements) does not already bring: transformers, huggingface-hub, tokenizers, megatron-fsdp, quack-kernels,
nvidia-cutlass-dsl, ... which playbooks/nemo-fine-tune/python.nix installs as wheels beside the CUDA set's torch.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PYTHON = "3.14"
SYSTEMS = {"x86_64-linux": "x86_64", "aarch64-linux": "aarch64"}
PINNED = ("torch", "bitsandbytes")  # from constraints.txt; the rest follows from torch's requirements
CUDA_NAME = re.compile(r"^(torch|triton|bitsandbytes|cuda-.*|nvidia-.*)$")


NEMO = REPO / "playbooks" / "nemo-fine-tune"


def manifest_path(system: str, wheel_set: str = "cuda") -> Path:
    directory = HERE if wheel_set == "cuda" else NEMO / "wheels"
    return directory / f"cp{PYTHON.replace('.', '')}-{system}.json"


def pins(constraints: Path) -> dict[str, str]:
    found = {}
    for line in constraints.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        if m:
            found[canonicalize_name(m.group(1))] = m.group(2)
    return found


def pinned_requirements() -> list[str]:
    found = pins(REPO / "constraints.txt")
    return [f"{name}=={found[name]}" for name in PINNED]


def nemo_requirements() -> list[str]:
    """nemo-automodel and every version its CPU venv was tested with, as requirements (pip's -c cannot be
    combined with --dry-run --target on every pip; exact pins say the same)."""
    found = pins(NEMO / "constraints.txt")
    return [f"{name}=={version}" for name, version in found.items()]


def resolve(machine: str, requirements: list[str] | None = None) -> list[dict]:
    """pip's installation report for the pinned packages on manylinux `machine`, CPython 3.14."""
    # pip takes --platform tags literally: list every manylinux level a wheel may carry.
    platforms = [f"manylinux2014_{machine}"] + [f"manylinux_2_{minor}_{machine}" for minor in range(17, 40)]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        # --isolated: PyPI itself, whatever mirrors, find-links or constraints this machine's pip config names.
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--isolated",
            "--index-url",
            "https://pypi.org/simple",
        ]
        command += ["--quiet", "--disable-pip-version-check", "--dry-run", "--ignore-installed"]
        command += ["--report", str(report), "--target", str(Path(tmp) / "target"), "--only-binary=:all:"]
        command += ["--python-version", PYTHON, "--implementation", "cp"]
        command += [arg for platform in platforms for arg in ("--platform", platform)]
        subprocess.run(command + (requirements or pinned_requirements()), check=True)
        return json.loads(report.read_text())["install"]


def environment(machine: str, extra: str) -> dict[str, str]:
    """PEP 508 marker values for CPython 3.14 on Linux `machine`, with `extra` requested."""
    return {
        "python_version": PYTHON,
        "python_full_version": f"{PYTHON}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": machine,
        "extra": extra,
    }


def dependencies(items: dict[str, dict], machine: str) -> dict[str, list[str]]:
    """name -> the names it requires on `machine`, with the extras the resolved set asks of it."""
    extras: dict[str, set[str]] = {name: set() for name in items}
    changed = True
    while changed:  # extras ask for more extras (cuda-toolkit[cublas] -> ...): to a fixed point
        changed = False
        for name, meta in items.items():
            for line in meta.get("requires_dist") or []:
                req = Requirement(line)
                dep = canonicalize_name(req.name)
                wanted = extras[name] | {""}
                holds = req.marker is None or any(
                    req.marker.evaluate(environment(machine, e)) for e in wanted
                )
                if holds and dep in extras and not set(req.extras) <= extras[dep]:
                    extras[dep] |= set(req.extras)
                    changed = True
    needs = {}
    for name, meta in items.items():
        wanted = extras[name] | {""}
        needs[name] = sorted(
            {
                canonicalize_name(req.name)
                for req in map(Requirement, meta.get("requires_dist") or [])
                if req.marker is None or any(req.marker.evaluate(environment(machine, e)) for e in wanted)
            }
            # An extra asking for other extras of the same package (mistral-common[audio] ->
            # mistral-common[soundfile]) is no dependency.
            - {name}
        )
    return needs


def sri(hex_digest: str) -> str:
    return "sha256-" + base64.b64encode(bytes.fromhex(hex_digest)).decode()


def download_sha256(url: str) -> tuple[str, int]:
    """The sha256 and size of the file at `url`, computed from its bytes."""
    digest = hashlib.sha256()
    size = 0
    with urllib.request.urlopen(url) as response:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def published_size(url: str) -> int:
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as response:
        return int(response.headers["Content-Length"])


def manifest(system: str, verify: bool, wheel_set: str = "cuda") -> dict:
    wheels = {}
    machine = SYSTEMS[system]
    if wheel_set == "cuda":
        resolved = {canonicalize_name(item["metadata"]["name"]): item for item in resolve(machine)}
        keep = {name for name in resolved if CUDA_NAME.match(name)}
    else:
        resolved = {
            canonicalize_name(item["metadata"]["name"]): item
            for item in resolve(machine, nemo_requirements())
        }
        # The CUDA set's packages and the nixpkgs ones it uses (numpy, sympy, ...) stay theirs: one of each
        # in the shell's Python.
        cuda_set = {canonicalize_name(item["metadata"]["name"]) for item in resolve(machine)}
        keep = set(resolved) - cuda_set
    needs = dependencies({name: item["metadata"] for name, item in resolved.items()}, machine)
    for name, item in resolved.items():
        meta = item["metadata"]
        if name not in keep:
            continue
        url = item["download_info"]["url"]
        sha256 = item["download_info"]["archive_info"]["hashes"]["sha256"]
        if verify:
            computed, size = download_sha256(url)
            if computed != sha256:
                raise SystemExit(f"{url}: PyPI says sha256 {sha256}, the file has {computed}")
        else:
            size = published_size(url)
        wheels[name] = {
            "version": meta["version"],
            "url": url,
            "hash": sri(sha256),
            "size": size,
            "requires_dist": meta.get("requires_dist") or [],
            "dependencies": needs[name],
        }
    return {
        "python": PYTHON,
        "system": system,
        "verified": verify,
        "wheels": dict(sorted(wheels.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="download every wheel and recompute its sha256")
    parser.add_argument(
        "--set", dest="wheel_set", choices=("cuda", "nemo"), default="cuda", help="which manifests"
    )
    args = parser.parse_args()
    for system in SYSTEMS:
        path = manifest_path(system, args.wheel_set)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest(system, args.verify, args.wheel_set), indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
