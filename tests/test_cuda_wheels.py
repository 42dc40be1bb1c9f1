"""The CUDA wheel manifests (overlays/cuda-wheels/cp314-<system>.json, made by update.py there)
against constraints.txt and the wheels' own requirements: torch at the pinned version, and every
CUDA library its Requires-Dist asks for (through cuda-toolkit's extras) at a version it allows."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / "overlays" / "cuda-wheels"
SYSTEMS = {"x86_64-linux": "x86_64", "aarch64-linux": "aarch64"}
CUDA_NAME = re.compile(r"^(torch|triton|bitsandbytes|cuda-.*|nvidia-.*)$")


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _manifest(system: str) -> dict:
    return json.loads((WHEELS / f"cp314-{system}.json").read_text())


def _update_script():
    spec = importlib.util.spec_from_file_location("cuda_wheels_update", WHEELS / "update.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# PEP 508 marker values for CPython 3.14 on Linux: the very ones the manifests were resolved with.
_environment = _update_script().environment


def test_one_manifest_per_system():
    assert sorted(p.name for p in WHEELS.glob("*.json")) == sorted(f"cp314-{s}.json" for s in SYSTEMS)


@pytest.mark.parametrize("system", SYSTEMS)
def test_manifest_pins_registry_wheels_at_the_constraints(system):
    manifest = _manifest(system)
    assert (manifest["system"], manifest["python"]) == (system, "3.14")
    pins = _constraints()
    for name in ("torch", "bitsandbytes"):
        assert manifest["wheels"][name]["version"] == pins[name], (
            f"{system}: {name} differs from constraints.txt"
        )
    for name, wheel in manifest["wheels"].items():
        filename = wheel["url"].rsplit("/", 1)[-1]
        assert wheel["url"].startswith("https://files.pythonhosted.org/packages/"), wheel["url"]
        assert filename.endswith(".whl") and canonicalize_name(filename.split("-")[0]) == name, filename
        assert f"-{wheel['version']}-" in filename, filename
        # CPython 3.14 (or any Python 3 / the stable ABI), Linux on this machine or pure Python.
        tags = filename[: -len(".whl")].split("-")[-3:]
        assert tags[0] in ("cp314", "py3", "py2.py3") or tags[1] == "abi3", filename
        assert tags[2] == "any" or tags[2].endswith(SYSTEMS[system]), filename
        assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", wheel["hash"]), wheel["hash"]


@pytest.mark.parametrize("system", SYSTEMS)
def test_manifest_holds_every_cuda_requirement_at_an_allowed_version(system):
    wheels = _manifest(system)["wheels"]
    machine = SYSTEMS[system]
    needed: dict[str, set[str]] = {"torch": set(), "bitsandbytes": set()}  # name -> requested extras
    queue = list(needed)
    while queue:
        name = queue.pop()
        assert name in wheels, f"{system}: the manifest lacks {name}"
        for line in wheels[name]["requires_dist"]:
            req = Requirement(line)
            dep = canonicalize_name(req.name)
            extras = needed[name] | {""}
            if req.marker is not None and not any(
                req.marker.evaluate(_environment(machine, e)) for e in extras
            ):
                continue
            if not CUDA_NAME.match(dep):
                continue  # pure Python: nixpkgs' package
            assert dep in wheels, f"{system}: {name} requires {line!r}, which the manifest lacks"
            assert req.specifier.contains(wheels[dep]["version"], prereleases=True), (
                f"{system}: {name} requires {line!r}, the manifest has {dep} {wheels[dep]['version']}"
            )
            new = set(req.extras) - needed.get(dep, set())
            if dep not in needed or new:
                needed[dep] = needed.get(dep, set()) | set(req.extras)
                queue.append(dep)
    # Nothing in the manifest that no one requires.
    assert set(wheels) == set(needed), (
        f"{system}: not required by torch or bitsandbytes: {set(wheels) - set(needed)}"
    )
    # torch's CUDA stack, as its wheel declares it.
    assert {"triton", "cuda-toolkit", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cublas"} <= set(needed)
    # `dependencies`, which overlays/cuda-wheels.nix makes each package's dependencies: exactly the
    # requirements that hold on this system with the extras asked of the wheel.
    for name, extras in needed.items():
        holding = {
            canonicalize_name(req.name)
            for req in map(Requirement, wheels[name]["requires_dist"])
            if req.marker is None or any(req.marker.evaluate(_environment(machine, e)) for e in extras | {""})
        }
        assert sorted(holding) == wheels[name]["dependencies"], f"{system}: {name}'s dependencies"
        assert isinstance(wheels[name]["size"], int) and wheels[name]["size"] > 0, f"{system}: {name}'s size"
