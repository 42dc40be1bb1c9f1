"""Tests of the Nix layer: flake.nix, flake.lock, overlays/ and playbooks/.

Nix cannot build anything here (no binary cache, no nixpkgs download), so the flake is evaluated
against the nixpkgs stand-in in tests/nix/nixpkgs-stub with `--override-input`. These tests need
`nix` (Debian's nix-bin, 2.8 or newer) and `git`; without them they are skipped. The lock file and
the host-driver shell snippet are checked without Nix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STUB = Path("tests/nix/nixpkgs-stub")
SYSTEMS = ("x86_64-linux", "aarch64-linux")
HOST_DRIVER = REPO / "playbooks" / "pytorch-fine-tune" / "host-driver.sh"

# Mirrors playbooks/pytorch-fine-tune/scripts.nix: app name -> (script, variable, expected outputs).
TRAINED = ["run/final/adapter_model.safetensors", "run/metrics.json"]
PLAYBOOKS = {
    "llama3-8b-lora": ("llama3_8b_lora.py", "LLAMA3_8B_LORA_SCRIPT", TRAINED),
    "llama3-3b-full": (
        "llama3_3b_full.py",
        "LLAMA3_3B_FULL_SCRIPT",
        ["run/final/model.safetensors", "run/metrics.json"],
    ),
    "llama3-70b-qlora": ("llama3_70b_qlora.py", "LLAMA3_70B_QLORA_SCRIPT", TRAINED),
    "llama3-8b-dpo": ("llama3_8b_dpo.py", "LLAMA3_8B_DPO_SCRIPT", TRAINED),
    "export": ("export.py", "EXPORT_SCRIPT", ["merged/model.safetensors", "model.gguf", "Modelfile"]),
    "evaluate": ("evaluate.py", "EVALUATE_SCRIPT", ["eval.json"]),
}
# What each smoke check must run, besides its script on the tiny model (the data it reads, the subcommands).
SMOKE_NEEDLES = {
    "llama3-8b-lora": ["tests/data/alpaca.jsonl", "--max_steps"],
    "llama3-3b-full": ["tests/data/alpaca.jsonl", "--max_steps"],
    "llama3-70b-qlora": ["tests/data/alpaca.jsonl", "--max_steps"],
    # DPO goes on from an SFT run's output directory.
    "llama3-8b-dpo": ["tests/data/alpaca.jsonl", "tests/data/preference.jsonl", "'--model_name' 'sft'"],
    "export": ["'merge' '--adapter' 'sft'", "'gguf'", "'q8_0'", "'ollama'"],
    "evaluate": ["'generate'", "'eval'"],
}

NIX = shutil.which("nix")
NIX_INSTANTIATE = shutil.which("nix-instantiate")
GIT = shutil.which("git")

needs_nix = pytest.mark.skipif(
    not (NIX and NIX_INSTANTIATE and GIT),
    reason="nix and git are needed to evaluate the flake (Debian/Ubuntu: apt-get install -y nix-bin git)",
)


def _store_args(tmp: Path) -> list[str]:
    # Evaluation copies sources into a store. Root uses /nix/store; anyone else without write access
    # to /nix gets a store of their own under the temporary directory.
    if os.geteuid() != 0 and not os.access("/nix", os.W_OK):
        return ["--store", str(tmp / "store")]
    return []


def _run(cmd: list[str], cwd: Path, what: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, NIX_CONFIG="warn-dirty = false\naccept-flake-config = false\n")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-40:])
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{tail}", pytrace=False)
    return proc


def _repo_files() -> list[str]:
    """The files a fresh clone would have: tracked plus untracked-but-not-ignored ones."""
    if GIT and (REPO / ".git").exists():
        out = subprocess.run(
            [GIT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
        return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]
    skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "result"}
    return [
        str(p.relative_to(REPO))
        for p in REPO.rglob("*")
        if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)
    ]


@pytest.fixture(scope="module")
def flake(tmp_path_factory) -> dict:
    """A git copy of the repository (flakes only see files git knows) and helpers to evaluate it."""
    tmp = tmp_path_factory.mktemp("flake")
    root = tmp / "repo"
    for rel in _repo_files():
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    subprocess.run([GIT, "init", "-q"], cwd=root, check=True)
    subprocess.run([GIT, "add", "-A"], cwd=root, check=True)
    stub = root / STUB
    common = [
        "--extra-experimental-features",
        "nix-command flakes",
        *_store_args(tmp),
        "--offline",
        "--no-write-lock-file",
        "--override-input",
        "nixpkgs",
        f"path:{stub}",
    ]

    def evaluate(attr: str, apply: str | None = None):
        cmd = [NIX, "eval", "--json", *common, f"{root}#{attr}"]
        if apply:
            cmd += ["--apply", apply]
        return json.loads(_run(cmd, root, f"nix eval .#{attr}").stdout)

    return {"root": root, "tmp": tmp, "common": common, "eval": evaluate}


@pytest.fixture(scope="module")
def shells(flake) -> dict:
    # Every string attribute of every devShell (the exported variables, shellHook, name); not `type`
    # or `outPath`, which would make `nix eval --json` print the set as a store path.
    return flake["eval"](
        "devShells",
        "ds: builtins.mapAttrs (_: shells: builtins.mapAttrs (_: s:"
        ' builtins.listToAttrs (builtins.concatMap (n: if !(builtins.elem n [ "type" "outPath" ]) && builtins.isString (s.${n} or null)'
        " then [ { name = n; value = s.${n}; } ] else [ ]) (builtins.attrNames s))) shells) ds",
    )


@pytest.fixture(scope="module")
def outputs(flake) -> dict:
    return {
        "packages": flake["eval"](
            "packages", "ps: builtins.mapAttrs (_: p: builtins.mapAttrs (_: d: d.outPath) p) ps"
        ),
        "checks": flake["eval"](
            "checks", "cs: builtins.mapAttrs (_: c: builtins.mapAttrs (_: d: d.buildCommand) c) cs"
        ),
        "apps": flake["eval"]("apps"),
    }


# --- without Nix -------------------------------------------------------------------------------


def test_flake_lock_pins_a_complete_nixpkgs():
    lock = json.loads((REPO / "flake.lock").read_text())
    assert lock["version"] == 7
    root = lock["nodes"][lock["root"]]
    assert root["inputs"] == {"nixpkgs": "nixpkgs"}, "the flake must have exactly one input, nixpkgs"
    assert set(lock["nodes"]) == {"root", "nixpkgs"}, f"unexpected lock nodes: {sorted(lock['nodes'])}"
    node = lock["nodes"]["nixpkgs"]
    locked = node["locked"]
    missing = {"type", "owner", "repo", "rev", "narHash", "lastModified"} - set(locked)
    assert not missing, f"flake.lock nixpkgs.locked lacks {sorted(missing)}"
    assert (locked["type"], locked["owner"], locked["repo"]) == ("github", "NixOS", "nixpkgs")
    assert len(locked["rev"]) == 40 and all(c in "0123456789abcdef" for c in locked["rev"])
    assert locked["narHash"].startswith("sha256-") and len(locked["narHash"]) == 51
    assert isinstance(locked["lastModified"], int) and locked["lastModified"] > 1_700_000_000
    assert node["original"] == {
        "type": "github",
        "owner": "NixOS",
        "repo": "nixpkgs",
        "ref": "nixos-unstable",
    }


def _source_host_driver(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # The same shell options writeShellApplication uses for the `nix run` apps.
    script = f'set -euo pipefail; source "{HOST_DRIVER}"; printf "%s\\n" "${{LD_LIBRARY_PATH:-}}"'
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    return subprocess.run(["bash", "-c", script], env=full_env, capture_output=True, text=True, timeout=30)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_host_driver_links_only_driver_libraries(tmp_path):
    host = tmp_path / "usr-lib"
    host.mkdir()
    for name in ("libcuda.so.1", "libcuda.so.580.95.05", "libnvidia-ml.so.1", "libc.so.6", "libstdc++.so.6"):
        (host / name).write_text("")
    links = tmp_path / "links"
    proc = _source_host_driver(
        tmp_path,
        {
            "LLM_FINETUNE_NIXOS_DRIVER_DIR": str(tmp_path / "no-such-dir"),
            "LLM_FINETUNE_DRIVER_SEARCH_PATH": f"{tmp_path / 'empty'}:{host}",
            "LLM_FINETUNE_DRIVER_LINK_DIR": str(links),
            "LD_LIBRARY_PATH": "/existing",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{links}:/existing"
    linked = sorted(p.name for p in links.iterdir())
    assert linked == ["libcuda.so.1", "libcuda.so.580.95.05", "libnvidia-ml.so.1"], linked
    assert all((links / n).resolve() == host / n for n in linked)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_host_driver_leaves_nixos_and_driverless_hosts_alone(tmp_path):
    nixos = tmp_path / "opengl-driver-lib"
    nixos.mkdir()
    (nixos / "libcuda.so.1").write_text("")
    on_nixos = _source_host_driver(
        tmp_path, {"LLM_FINETUNE_NIXOS_DRIVER_DIR": str(nixos), "LD_LIBRARY_PATH": "/existing"}
    )
    assert on_nixos.returncode == 0, on_nixos.stderr
    assert on_nixos.stdout.strip() == "/existing"

    no_driver = _source_host_driver(
        tmp_path,
        {
            "LLM_FINETUNE_NIXOS_DRIVER_DIR": str(tmp_path / "none"),
            "LLM_FINETUNE_DRIVER_SEARCH_PATH": str(tmp_path / "none"),
        },
    )
    assert no_driver.returncode == 0, no_driver.stderr
    assert no_driver.stdout.strip() == ""
    assert "no NVIDIA driver found" in no_driver.stderr


# --- with Nix ----------------------------------------------------------------------------------


@needs_nix
def test_every_nix_file_parses(flake):
    files = sorted(p for p in flake["root"].rglob("*.nix") if ".git" not in p.parts)
    assert files, "no .nix files found"
    for path in files:
        _run(
            [NIX_INSTANTIATE, "--parse", str(path)],
            flake["root"],
            f"parsing {path.relative_to(flake['root'])}",
        )


@needs_nix
def test_flake_check_evaluates_both_systems(flake):
    # Nix evaluates every system in `flake check`; --no-build because the stand-in cannot build.
    _run(
        [NIX, "flake", "check", "--no-build", *flake["common"], str(flake["root"])],
        flake["root"],
        "nix flake check",
    )
    for output in ("packages", "devShells", "apps", "checks", "formatter"):
        systems = flake["eval"](output, "builtins.attrNames")
        assert sorted(systems) == sorted(SYSTEMS), f"{output} covers {systems}"


@needs_nix
def test_devshells_export_the_playbook_scripts(shells, outputs):
    for system in SYSTEMS:
        scripts_out = outputs["packages"][system]["scripts"]
        expected = {"pytorch-fine-tune", "pytorch-fine-tune-cpu", "default"}
        assert expected <= set(shells[system]), f"{system} devShells: {sorted(shells[system])}"
        for shell_name, env in shells[system].items():
            if shell_name.startswith("llama-factory"):
                continue  # test_llama_factory_shells_and_checks
            exported = {k: v for k, v in env.items() if k.endswith("_SCRIPT")}
            assert set(exported) == {var for _, var, _ in PLAYBOOKS.values()}, (
                f"{system}.{shell_name}: {exported}"
            )
            for script, var, _ in PLAYBOOKS.values():
                assert exported[var] == f"{scripts_out}/scripts/{script}", f"{system}.{shell_name}.{var}"
                assert (REPO / "scripts" / script).is_file(), (
                    f"{var} names scripts/{script}, which does not exist"
                )
            hook = env["shellHook"]
            for var in exported:
                assert f"${var}" in hook, f"the help of {system}.{shell_name} does not mention ${var}"
            assert "hf auth login" in hook and "HF_HUB_OFFLINE=1" in hook
            if shell_name.endswith("-cpu"):
                assert "TRITON_PTXAS_PATH" not in env and "llm_finetune_host_driver" not in hook
            else:
                assert env["TRITON_PTXAS_PATH"].endswith("/bin/ptxas"), env.get("TRITON_PTXAS_PATH")
                assert "llm_finetune_host_driver" in hook, (
                    "CUDA shells must link the host driver on non-NixOS"
                )
    assert "pytorch-fine-tune-spark" in shells["aarch64-linux"]


@needs_nix
def test_checks_run_each_playbook_script(shells, outputs):
    for system in SYSTEMS:
        checks = outputs["checks"][system]
        tiny_model = outputs["packages"][system]["tiny-model"]
        env = shells[system]["pytorch-fine-tune"]
        assert {"pytest", "lint"} <= set(checks), sorted(checks)
        for name, (_, var, expects) in PLAYBOOKS.items():
            command = checks.get(f"smoke-{name}")
            assert command is not None, f"checks.{system}.smoke-{name} is missing"
            # The very path the devShell exports, on the tiny model, offline, with a HOME of its own.
            assert f"python '{env[var]}' " in command, f"smoke-{name} does not run ${var}"
            for needle in (f"'--model_name' '{tiny_model}'", *SMOKE_NEEDLES[name]):
                assert needle in command, f"smoke-{name} lacks {needle!r}"
            for expected in expects:
                assert expected in command, f"smoke-{name} does not check for {expected}"
            assert "HF_HUB_OFFLINE=1" in command and 'HOME="$TMPDIR"' in command
        assert "pytest tests" in checks["pytest"] and "HF_HUB_OFFLINE=1" in checks["pytest"]
        for needle in ("ruff check", "ruff format", "--check", "nixfmt"):
            assert needle in checks["lint"], f"the lint check lacks {needle!r}"
        apps = outputs["apps"][system]
        assert set(apps) == set(PLAYBOOKS), sorted(apps)
        for name, app in apps.items():
            assert app["type"] == "app" and app["program"].endswith(f"/bin/{name}")


@needs_nix
def test_python_set_fixes_and_cuda_presets(flake):
    summary = flake["eval"](
        "devShells.aarch64-linux",
        "ds: builtins.mapAttrs (_: s: let env = builtins.head s.packages; ps = env.pkgs; in {"
        " packages = env.packageNames; hub = ps.huggingface-hub.version; trl = ps.trl.version;"
        " deps = map (d: d.pname) ps.llm-finetune.dependencies;"
        " relaxed = ps.transformers.pythonRelaxDeps or [ ]; cuda = ps.torch.cudaSupport;"
        " capabilities = ps.torch.cudaCapabilities; bnb = ps.bitsandbytes.cmakeFlags; })"
        ' (builtins.removeAttrs ds [ "llama-factory" "llama-factory-cpu" ])',
    )
    for name, shell in summary.items():
        assert "llm-finetune" in shell["packages"] and "pytest" in shell["packages"], name
        assert shell["hub"] == "1.31.0", f"{name}: datasets 5.1.0 needs huggingface-hub >= 1.31"
        assert shell["trl"] == "0.29.1", f"{name}: DPOTrainer needs trl >= 0.29 with transformers 5.5"
        assert {"trl", "gguf", "matplotlib"} <= set(shell["deps"]), name
        assert "tokenizers" in shell["relaxed"], name
    assert summary["pytorch-fine-tune-cpu"]["cuda"] is False
    assert summary["pytorch-fine-tune"]["cuda"] is True
    assert {"9.0", "12.0", "12.1"} <= set(summary["pytorch-fine-tune"]["capabilities"])
    assert summary["pytorch-fine-tune-spark"]["capabilities"] == ["12.1"]
    assert "-DCOMPUTE_CAPABILITY:STRING=121" in summary["pytorch-fine-tune-spark"]["bnb"]
    assert summary["pytorch-fine-tune-h100"]["capabilities"] == ["9.0"]
    # The default preset leaves bitsandbytes as nixpkgs builds it (binary cache).
    assert not any("COMPUTE_CAPABILITY" in f for f in summary["pytorch-fine-tune"]["bnb"])


@needs_nix
def test_llama_factory_shells_and_checks(flake, shells, outputs):
    # Its own Python set at LLaMA-Factory's pins, on the very torch and bitsandbytes of pytorch-fine-tune.
    sets = flake["eval"](
        "devShells.x86_64-linux",
        "ds: builtins.mapAttrs (_: s: let ps = (builtins.head s.packages).pkgs; in {"
        " torch = ps.torch.drvPath; bnb = ps.bitsandbytes.drvPath;"
        " versions = builtins.listToAttrs (map (n: { name = n; value = ps.${n}.version; })"
        ' [ "trl" "datasets" "accelerate" "gradio" "tyro" "transformers" "peft" "huggingface-hub" ]);'
        " lf = map (d: d.pname) (ps.llamafactory.dependencies or [ ]); src = ps.llamafactory.src.rev or null; })"
        " (builtins.intersectAttrs { llama-factory = 0; llama-factory-cpu = 0; pytorch-fine-tune = 0;"
        " pytorch-fine-tune-cpu = 0; } ds)",
    )
    for flavour in ("", "-cpu"):
        lf, ours = sets[f"llama-factory{flavour}"], sets[f"pytorch-fine-tune{flavour}"]
        assert (lf["torch"], lf["bnb"]) == (ours["torch"], ours["bnb"]), "torch/bitsandbytes must not rebuild"
        assert lf["versions"] == {
            "trl": "0.24.0", "datasets": "4.0.0", "accelerate": "1.11.0", "gradio": "5.50.0", "tyro": "0.8.14",
            "transformers": "5.5.4", "peft": "0.18.0", "huggingface-hub": "1.31.0",
        }, lf["versions"]  # fmt: skip
        assert {"torchvision", "torchaudio", "gradio", "trl"} <= set(lf["lf"])
        assert lf["src"] == "refs/tags/v0.9.5"

    for system in SYSTEMS:
        for name in ("llama-factory", "llama-factory-cpu"):
            env = shells[system][name]
            assert env["LLAMA_FACTORY_DATA"].endswith("-source/data"), env["LLAMA_FACTORY_DATA"]
            assert env["LLAMA_FACTORY_EXAMPLES"].endswith("-source/examples")
            hook = env["shellHook"]
            assert 'GRADIO_SERVER_NAME="${GRADIO_SERVER_NAME:-127.0.0.1}"' in hook
            for command in (
                "llamafactory-init",
                "llamafactory-cli train examples/train_lora/qwen3_lora_sft.yaml",
                "llamafactory-cli chat examples/inference/qwen3_lora_sft.yaml",
                "llamafactory-cli export examples/merge_lora/qwen3_lora_sft.yaml",
                "llamafactory-cli webui",
            ):
                assert command in hook, f"the help of {system}.{name} lacks {command!r}"
            assert ("llm_finetune_host_driver" in hook) == (name == "llama-factory")
            assert ("TRITON_PTXAS_PATH" in env) == (name == "llama-factory")

        checks = outputs["checks"][system]
        tiny_model = outputs["packages"][system]["tiny-model"]
        cli, webui = checks["smoke-llama-factory-cli"], checks["smoke-llama-factory-webui"]
        # nixpkgs' escapeShellArg leaves safe words unquoted and the stand-in quotes every word: compare unquoted.
        words = cli.replace("'", "")
        for command in ("train", "chat", "export"):
            yaml = {"train": "train_lora", "chat": "inference", "export": "merge_lora"}[command]
            assert f"llamafactory-cli {command} examples/{yaml}/qwen3_lora_sft.yaml " in words, command
        assert f"model_name_or_path={tiny_model} template=llama3" in words and " max_steps=16 " in words
        assert "saves/qwen3-4b/lora/sft/adapter_model.safetensors" in cli and "Modelfile" in cli
        for text in ("llamafactory-init", "HF_HUB_OFFLINE=1", 'HOME="$TMPDIR"'):
            assert text in cli and text in webui, text
        assert "GRADIO_SERVER_NAME=127.0.0.1" in webui and "llamafactory-cli webui" in webui
        assert 'kill "$pid"' in webui and "did not stop" in webui


@needs_nix
def test_stand_in_rejects_unknown_python_packages(flake):
    expr = (
        f'(import {flake["root"] / STUB} {{ system = "x86_64-linux"; }})'
        ".python3.withPackages (ps: [ ps.torhc ])"
    )
    cmd = [NIX_INSTANTIATE, *_store_args(flake["tmp"]), "--eval", "--expr", f"({expr}).drvPath"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "torhc" in proc.stderr, proc.stderr
