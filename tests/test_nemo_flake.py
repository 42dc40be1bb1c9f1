"""The nemo-fine-tune devShell and check (playbooks/nemo-fine-tune), evaluated with Nix >= 2.26 against the
nixpkgs stand-in, as tests/test_flake.py does for pytorch-fine-tune."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_flake import SYSTEMS, flake, shells  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "playbooks" / "nemo-fine-tune"
RECIPES = (
    "llama3_2/llama3_2_1b_squad_peft.yaml",
    "llama3_1/llama3_1_8b_squad_qlora.yaml",
    "qwen/qwen3_8b_squad_spark.yaml",
)

# Per system: every wheel package of the set, the torch it depends on, the pinned Automodel source.
NEMO_SET = """
  ds: builtins.mapAttrs (system: shells:
    let
      shell = shells.nemo-fine-tune;
      torchOf = pkgs: builtins.head (builtins.filter (d: d.pname == "torch") pkgs);
    in {
      wheels = builtins.mapAttrs (name: p: {
        inherit (p) version format pythonRelaxDeps autoPatchelfIgnoreMissingDeps;
        url = p.src.url;
        hash = p.src.outputHash;
        dependencies = map (d: d.pname) p.dependencies;
        instantiates = builtins.isString p.drvPath;
      }) shell.wheels;
      torch = (torchOf shell.wheels.nemo-automodel.dependencies).drvPath;
      python = builtins.isString shell.python.drvPath;
      bitsandbytes = map (p: p.src.url) (builtins.filter (p: p.pname == "bitsandbytes") shell.python.packages);
      source = { inherit (shell.automodel-source) url outputHash; };
      examples = shell.examples;
    }) ds
"""


def manifest(system: str) -> dict:
    return json.loads((PLAYBOOK / "wheels" / f"cp314-{system}.json").read_text())["wheels"]


def test_nemo_shell_for_both_systems_with_nvidias_commands(shells):  # noqa: F811
    for system in SYSTEMS:
        env = shells[system]["nemo-fine-tune"]
        assert env["AUTOMODEL_EXAMPLES"].endswith("-source/examples"), env["AUTOMODEL_EXAMPLES"]
        hook = env["shellHook"]
        assert "llm_finetune_host_driver" in hook and "Needs an NVIDIA driver >= 580 (CUDA 13.0)" in hook
        assert 'ln -sfn "$AUTOMODEL_EXAMPLES" examples' in hook
        for recipe in RECIPES:
            assert f"examples/llm_finetune/{recipe}" in hook, recipe
            assert (PLAYBOOK / "examples" / "llm_finetune" / recipe).is_file(), recipe


# The CUDA set's torch: the one packages.llm-finetune (the pytorch-fine-tune shell's) depends on.
CUDA_TORCH = """
  ps: builtins.mapAttrs (_: p:
    (builtins.head (builtins.filter (d: d.pname == "torch") p.llm-finetune.dependencies)).drvPath) ps
"""


def test_nemo_set_is_the_manifests_wheels_over_the_cuda_sets_torch(flake):  # noqa: F811
    result = flake.eval("devShells", NEMO_SET)
    cuda_torch = flake.eval("packages", CUDA_TORCH)
    for system in SYSTEMS:
        wheels, got = manifest(system), result[system]
        assert set(got["wheels"]) == set(wheels)
        for name, wheel in wheels.items():
            p = got["wheels"][name]
            assert (p["url"], p["hash"], p["version"]) == (wheel["url"], wheel["hash"], wheel["version"]), (
                name
            )
            assert p["format"] == "wheel" and p["instantiates"], name
            assert sorted(p["dependencies"]) == sorted(wheel["dependencies"]), name
            # Only what the CUDA set provides is relaxed: the set's own pins are checked at build time.
            assert set(p["pythonRelaxDeps"]) == set(wheel["dependencies"]) - set(wheels), name
            assert "libcuda.so.1" in p["autoPatchelfIgnoreMissingDeps"], name
        # NVIDIA's QLoRA recipe needs bitsandbytes: the CUDA set's wheel.
        cuda_wheels = json.loads((REPO / "overlays" / "cuda-wheels" / f"cp314-{system}.json").read_text())
        assert got["bitsandbytes"] == [cuda_wheels["wheels"]["bitsandbytes"]["url"]]
        assert wheels["nemo-automodel"]["version"] == "0.7.0"
        assert wheels["transformers"]["version"] == "5.18.0"
        assert "torch" not in wheels and "triton" not in wheels, "torch and triton are the CUDA set's"
        assert got["python"] is True
        assert got["torch"] == cuda_torch[system], "AutoModel must run on the CUDA set's torch"
        assert got["source"]["outputHash"] == "sha256-LGbebeefNrpDMfTyAw6Jm8rkvOChnHiGmNSlt+XJ7dM="
        assert (
            "NVIDIA-NeMo/Automodel/archive/94387e4318bfd04cb21ff57782061864e0c7bcec" in got["source"]["url"]
        )


def test_nemo_check_runs_the_cpu_test_with_the_shells_python(flake):  # noqa: F811
    checks = flake.eval(
        "checks", "cs: builtins.mapAttrs (_: c: builtins.mapAttrs (_: d: d.buildCommand) c) cs"
    )
    for system in SYSTEMS:
        command = checks[system]["nemo-fine-tune"]
        assert "pytest tests/test_nemo_automodel.py" in command and "HF_HUB_OFFLINE=1" in command
        assert 'NEMO_PYTHON="$(command -v python)"' in command
        assert 'and not nemo"' in checks[system]["pytest"]  # the pytest check leaves it to this one
        # pyproject's addopts deselect the nemo marker: the check's own arguments must select its tests.
        line = next(x for x in command.splitlines() if "python -m pytest" in x).split("#")[0].split()
        collected = subprocess.run(
            [sys.executable, *line[1:], "--collect-only", "-q", "-p", "no:xdist"],
            cwd=REPO, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert collected.returncode == 0 and "test_nemo_automodel.py::" in collected.stdout, collected.stdout


def test_nemo_manifests_are_verified_and_follow_the_constraints():
    pins = {}
    for line in (PLAYBOOK / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[name.strip().lower().replace("_", "-").replace(".", "-")] = version.strip()
    for system in SYSTEMS:
        data = json.loads((PLAYBOOK / "wheels" / f"cp314-{system}.json").read_text())
        assert data["verified"] is True, f"{system}: run update.py --set nemo --verify"
        for name, wheel in data["wheels"].items():
            assert wheel["version"] == pins[name], (system, name, wheel["version"], pins.get(name))
            assert wheel["hash"].startswith("sha256-") and wheel["size"] > 0, (system, name)
            assert name not in wheel["dependencies"], f"{name} depends on itself: Nix would recurse forever"
