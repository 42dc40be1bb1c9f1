"""Tests of the Nix layer: flake.nix, flake.lock, overlays/ and playbooks/.

Nix cannot build anything here (no binary cache, no nixpkgs download), so the flake is evaluated
with Nix >= 2.26 against the nixpkgs stand-in in tests/nix/nixpkgs-stub, which runs on nixpkgs'
real lib and models the checks nixpkgs makes (config defaults, meta, `disabled`, runtime
dependencies). tests/nix_eval.py finds or makes that Nix and finds the lib; without them these tests
are skipped with the reason. The lock file, constraints.txt and the host-driver shell snippet are
checked without Nix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from nix_eval import Nix, find_nix, find_nixpkgs_lib

REPO = Path(__file__).resolve().parent.parent
STUB = Path("tests/nix/nixpkgs-stub")
SYSTEMS = ("x86_64-linux", "aarch64-linux")
HOST_DRIVER = REPO / "playbooks" / "pytorch-fine-tune" / "host-driver.sh"
PLAYBOOK_README = REPO / "playbooks" / "pytorch-fine-tune" / "README.md"

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
    "llama3-70b-lora": ("llama3_70b_lora.py", "LLAMA3_70B_LORA_SCRIPT", TRAINED),
    "llama3-8b-dpo": ("llama3_8b_dpo.py", "LLAMA3_8B_DPO_SCRIPT", TRAINED),
    "export": ("export.py", "EXPORT_SCRIPT", ["merged/model.safetensors", "model.gguf", "Modelfile"]),
    "evaluate": ("evaluate.py", "EVALUATE_SCRIPT", ["eval.json"]),
    "demo": ("demo.py", "DEMO_SCRIPT", ["demo/llama3_8b_lora/final/adapter_model.safetensors"]),
}
# The demo builds its own tiny model, as a user's first command would.
BUILDS_ITS_OWN_MODEL = {"demo"}
# Shells of other playbooks, with Python sets of their own (their tests: tests/test_nemo_flake.py).
OTHER_PLAYBOOK_SHELLS = {"nemo-fine-tune"}
# What each smoke check must run, besides its script on the tiny model (the data it reads, the subcommands).
# nixpkgs' escapeShellArgs leaves words like these unquoted.
SMOKE_NEEDLES = {
    "llama3-8b-lora": ["tests/data/alpaca.jsonl", "--max_steps"],
    "llama3-3b-full": ["tests/data/alpaca.jsonl", "--max_steps"],
    "llama3-70b-qlora": ["tests/data/alpaca.jsonl", "--max_steps"],
    "llama3-70b-lora": ["tests/data/alpaca.jsonl", "--max_steps"],
    # DPO goes on from an SFT run's output directory.
    "llama3-8b-dpo": ["tests/data/alpaca.jsonl", "tests/data/preference.jsonl", "--model_name sft "],
    "export": ["merge --adapter sft ", " gguf ", " q8_0", " ollama "],
    "evaluate": [" generate ", " eval "],
    "demo": ["--workdir demo ", "--steps "],
}


def _repo_files() -> list[str]:
    """The files a fresh clone would have: tracked plus untracked-but-not-ignored ones."""
    if shutil.which("git") and (REPO / ".git").exists():
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
        return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]
    skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "result", ".nix-root"}
    return [
        str(p.relative_to(REPO))
        for p in REPO.rglob("*")
        if p.is_file()
        and not skip.intersection(p.relative_to(REPO).parts)
        and (REPO / STUB / "lib") not in p.parents
    ]


def _wheels(system: str) -> dict:
    """The CUDA wheel manifest's wheels for `system` (overlays/cuda-wheels/cp314-<system>.json)."""
    return json.loads((REPO / "overlays" / "cuda-wheels" / f"cp314-{system}.json").read_text())["wheels"]


def _constraint(name: str) -> str | None:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(rf"{re.escape(name)}==(\S+)", line.strip())
        if m:
            return m.group(1)
    return None


class Flake:
    """A git copy of the repository with nixpkgs' lib inside the stand-in and flake.lock pointing at
    the stand-in (flakes only see files git knows; pure evaluation only reads inside the flake)."""

    def __init__(self, nix: Nix, lib: Path):
        self.nix = nix
        self.scratch = nix.scratch()
        self.root = self.scratch / "repo"
        try:
            self._make(lib)
        except BaseException:
            self.close()
            raise

    def _make(self, lib: Path):
        for rel in _repo_files():
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest)
        shutil.copytree(lib, self.root / STUB / "lib")
        for args in (["git", "init", "-q"], ["git", "add", "-A"]):
            self.run(args, f"git {args[1]}")
        stub = self.nix.inside(self.root / STUB)
        self.run(
            ["nix", "flake", "lock", "--offline", "--override-input", "nixpkgs", f"path:{stub}"],
            "nix flake lock",
        )
        # Non-flake evaluations of the stand-in and the overlays, as `import nixpkgs { ... }` would.
        self.prelude = f"""
          let
            repo = {self.nix.inside(self.root)};
            stub = import (repo + "/tests/nix/nixpkgs-stub");
            cuda = import (repo + "/overlays/cuda.nix");
            ours = import (repo + "/overlays/default.nix");
            wheels = import (repo + "/overlays/cuda-wheels.nix");
            pkgsFor = {{ system, variant ? {{ }}, overlays ? [ ours ] }}:
              stub {{ inherit system overlays; config = cuda.nixpkgsConfig variant; }};
          in
        """

    def run(self, args: list[str], what: str, check: bool = True, timeout: int = 300):
        proc = self.nix.run(args, self.root, timeout=timeout)
        if check and proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-40:])
            pytest.fail(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(args)}\n{tail}", pytrace=False)
        return proc

    def eval(self, attr: str, apply: str | None = None):
        args = ["nix", "eval", "--json", "--offline", f".#{attr}"]
        if apply:
            args += ["--apply", apply]
        return json.loads(self.run(args, f"nix eval .#{attr}").stdout)

    def eval_expr(self, body: str, check: bool = True):
        """`body` evaluated after the prelude (pkgsFor, ours, stub ...); JSON, or the failed process."""
        args = ["nix", "eval", "--json", "--impure", "--offline", "--expr", self.prelude + body]
        proc = self.run(args, "nix eval --expr", check=check)
        return json.loads(proc.stdout) if check else proc

    def close(self):
        shutil.rmtree(self.scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def flake():
    nix, lib = find_nix(), find_nixpkgs_lib()
    if isinstance(nix, str):
        pytest.skip(nix)
    if isinstance(lib, str):
        pytest.skip(lib)
    made = Flake(nix, lib)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def shells(flake) -> dict:
    # Every string attribute of every devShell (the exported variables, shellHook, name); not `type`
    # or `outPath`, which would make `nix eval --json` print the set as a store path.
    return flake.eval(
        "devShells",
        "ds: builtins.mapAttrs (_: shells: builtins.mapAttrs (_: s:"
        ' builtins.listToAttrs (builtins.concatMap (n: if !(builtins.elem n [ "type" "outPath" ]) && builtins.isString (s.${n} or null)'
        " then [ { name = n; value = s.${n}; } ] else [ ]) (builtins.attrNames s))) shells) ds",
    )


@pytest.fixture(scope="module")
def outputs(flake) -> dict:
    return {
        "packages": flake.eval(
            "packages", "ps: builtins.mapAttrs (_: p: builtins.mapAttrs (_: d: d.outPath) p) ps"
        ),
        "checks": flake.eval(
            "checks", "cs: builtins.mapAttrs (_: c: builtins.mapAttrs (_: d: d.buildCommand) c) cs"
        ),
        "apps": flake.eval("apps"),
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
    script = (
        f'set -euo pipefail; source "{HOST_DRIVER}"; '
        'printf "%s\\n" "${LD_LIBRARY_PATH:-}" "${TRITON_LIBCUDA_PATH:-}"'
    )
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
    # Triton finds libcuda.so.1 there too (it would ask /sbin/ldconfig otherwise).
    assert proc.stdout.splitlines() == [f"{links}:/existing", str(links)]
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
    # NixOS has no /sbin/ldconfig for Triton to ask.
    assert on_nixos.stdout.splitlines() == ["/existing", str(nixos)]

    no_driver = _source_host_driver(
        tmp_path,
        {
            "LLM_FINETUNE_NIXOS_DRIVER_DIR": str(tmp_path / "none"),
            "LLM_FINETUNE_DRIVER_SEARCH_PATH": str(tmp_path / "none"),
        },
    )
    assert no_driver.returncode == 0, no_driver.stderr
    assert no_driver.stdout.splitlines() == ["", ""]
    assert "no NVIDIA driver found" in no_driver.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_host_driver_links_wsl_dxcore(tmp_path):
    # WSL: libcuda in /usr/lib/wsl/lib reaches the Windows driver through libdxcore.
    wsl = tmp_path / "wsl-lib"
    wsl.mkdir()
    for name in (
        "libcuda.so",
        "libcuda.so.1",
        "libcuda.so.1.1",
        "libdxcore.so",
        "libnvidia-ml.so.1",
        "libd3d12.so",
    ):
        (wsl / name).write_text("")
    links = tmp_path / "links"
    proc = _source_host_driver(
        tmp_path,
        {
            "LLM_FINETUNE_NIXOS_DRIVER_DIR": str(tmp_path / "none"),
            "LLM_FINETUNE_DRIVER_SEARCH_PATH": str(wsl),
            "LLM_FINETUNE_DRIVER_LINK_DIR": str(links),
        },
    )
    assert proc.returncode == 0, proc.stderr
    linked = sorted(p.name for p in links.iterdir())
    assert linked == ["libcuda.so", "libcuda.so.1", "libcuda.so.1.1", "libdxcore.so", "libnvidia-ml.so.1"], (
        linked
    )


def test_constraints_pin_the_tools_the_flake_uses():
    # The flake's lint check runs nixpkgs' ruff; pip installs must format the same way.
    assert _constraint("ruff"), (
        "constraints.txt must pin ruff (at nixpkgs' version, see tests/nix/nixpkgs-stub)"
    )
    # huggingface-hub 1.31 needs hf-xet >= 1.5.2.
    hf_xet = _constraint("hf-xet")
    assert hf_xet and tuple(int(x) for x in hf_xet.split(".")[:3]) >= (1, 5, 2), hf_xet


# --- with Nix ----------------------------------------------------------------------------------


def test_every_nix_file_parses(flake):
    files = sorted(
        p
        for p in flake.root.rglob("*.nix")
        if ".git" not in p.parts and (flake.root / STUB / "lib") not in p.parents
    )
    assert len(files) > 5, files
    for path in files:
        flake.run(
            ["nix-instantiate", "--parse", flake.nix.inside(path)], f"parsing {path.relative_to(flake.root)}"
        )


def test_flake_check_passes_without_warnings(flake):
    # What `nix flake check` says to a user with Nix >= 2.26 (e.g. apps without meta.description).
    proc = flake.run(["nix", "flake", "check", "--no-build", "--all-systems", "--offline"], "nix flake check")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert not warnings, "\n".join(warnings)
    for output in ("packages", "devShells", "apps", "checks", "formatter"):
        systems = flake.eval(output, "builtins.attrNames")
        assert sorted(systems) == sorted(SYSTEMS), f"{output} covers {systems}"


def test_evaluations_leave_nothing_mounted(flake):
    # Nix in a chroot needs a /proc; one left mounted under the checkout (or the root) would make the directory
    # impossible to remove after the tests, so each command's /proc must end with it.
    flake.run(["nix", "--version"], "nix --version")
    roots = [REPO.resolve()] + ([flake.nix.root.resolve()] if flake.nix.root else [])
    mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    left = [m for m in mounts if any(Path(m) == r or r in Path(m).parents for r in roots)]
    assert not left, f"still mounted after the evaluations: {left}"


def test_devshells_export_the_playbook_scripts(shells, outputs):
    for system in SYSTEMS:
        scripts_out = outputs["packages"][system]["scripts"]
        expected = {"pytorch-fine-tune", "pytorch-fine-tune-cpu", "default"}
        assert expected <= set(shells[system]), f"{system} devShells: {sorted(shells[system])}"
        for shell_name, env in shells[system].items():
            if shell_name.startswith("llama-factory") or shell_name in OTHER_PLAYBOOK_SHELLS:
                continue  # test_llama_factory_shells, tests/test_nemo_flake.py
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
            # nixpkgs' triton finds its own CUDA toolkit's ptxas (test_cuda_python_set below).
            assert not any(k.startswith("TRITON_PTXAS") for k in env), (
                f"{system}.{shell_name} overrides ptxas"
            )
            if shell_name.endswith("-cpu"):
                assert "llm_finetune_host_driver" not in hook and "NVIDIA driver" not in hook
            else:
                assert "llm_finetune_host_driver" in hook, (
                    "CUDA shells must link the host driver on non-NixOS"
                )
                assert "Needs an NVIDIA driver >= " in hook, f"{system}.{shell_name} does not name the driver"
        # The default shell is the wheels' (CUDA 13).
        assert "Needs an NVIDIA driver >= 580 (CUDA 13.0)" in shells[system]["default"]["shellHook"]
    assert "pytorch-fine-tune-spark" in shells["aarch64-linux"]
    assert "pytorch-fine-tune-cuda12" in shells["x86_64-linux"]


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
            # (nixpkgs' escapeShellArg leaves store paths unquoted.)
            assert f"python {env[var]} " in command, f"smoke-{name} does not run ${var}"
            on_tiny_model = [] if name in BUILDS_ITS_OWN_MODEL else [f"--model_name {tiny_model}"]
            for needle in (*on_tiny_model, *SMOKE_NEEDLES[name]):
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
            assert app["meta"]["description"], f"apps.{system}.{name} has no meta.description"


def test_lint_check_runs_the_ruff_constraints_pin(flake):
    tools = flake.eval(
        "checks",
        "cs: builtins.mapAttrs (_: c: map (d: { inherit (d) pname version; }) c.lint.nativeBuildInputs) cs",
    )
    for system in SYSTEMS:
        ruff = [t["version"] for t in tools[system] if t["pname"] == "ruff"]
        assert ruff == [_constraint("ruff")], (
            f"{system}: the lint check runs ruff {ruff}, constraints.txt pins {_constraint('ruff')}"
        )


def test_python_set_fixes_and_cuda_presets(flake):
    summary = flake.eval(
        "devShells",
        "ds: builtins.mapAttrs (_: shells: builtins.mapAttrs (_: s: let env = builtins.head s.packages; ps = env.pkgs; in {"
        " packages = env.packageNames; hub = ps.huggingface-hub.version; trl = ps.trl.version;"
        " deps = map (d: d.pname) ps.llm-finetune.dependencies;"
        " relaxed = ps.transformers.pythonRelaxDeps or [ ]; cuda = ps.torch.cudaSupport;"
        " wheel = ps.torch.src.url or null;"
        " capabilities = ps.torch.cudaCapabilities or null; bnb = ps.bitsandbytes.cmakeFlags or null; })"
        ' (builtins.removeAttrs shells [ "llama-factory" "llama-factory-cpu" ])) ds',
    )
    for system in SYSTEMS:
        for name, shell in summary[system].items():
            if name in OTHER_PLAYBOOK_SHELLS:
                continue
            assert "llm-finetune" in shell["packages"] and "pytest" in shell["packages"], name
            assert shell["hub"] == "1.31.0", f"{name}: datasets 5.1.0 needs huggingface-hub >= 1.31"
            assert shell["trl"] == "0.29.1", f"{name}: DPOTrainer needs trl >= 0.29 with transformers 5.5"
            assert {"trl", "gguf", "matplotlib"} <= set(shell["deps"]), name
            assert "tokenizers" in shell["relaxed"], name
        shells = summary[system]
        assert shells["pytorch-fine-tune-cpu"]["cuda"] is False
        # The default CUDA shell: torch from the wheel manifest, no nixpkgs CUDA build.
        for name in ("pytorch-fine-tune", "default"):
            assert shells[name]["cuda"] is True, (system, name)
            assert shells[name]["wheel"] == _wheels(system)["torch"]["url"], (system, name)
            assert shells[name]["capabilities"] is None and shells[name]["bnb"] is None, (system, name)
        assert shells["pytorch-fine-tune-h100"]["capabilities"] == ["9.0"]
    nixpkgs_cuda = summary["x86_64-linux"]["pytorch-fine-tune-cuda12"]
    assert nixpkgs_cuda["cuda"] is True and nixpkgs_cuda["wheel"] is None
    assert {"9.0", "12.0", "12.1"} <= set(nixpkgs_cuda["capabilities"])
    # The default preset leaves bitsandbytes as nixpkgs builds it (binary cache).
    assert not any("COMPUTE_CAPABILITY" in f for f in nixpkgs_cuda["bnb"])
    spark = summary["aarch64-linux"]["pytorch-fine-tune-spark"]
    assert spark["capabilities"] == ["12.1"]
    assert "-DCOMPUTE_CAPABILITY:STRING=121" in spark["bnb"]


# What each variant builds on the user's machine: the Python packages of llm-finetune's closure whose
# derivation differs from nixpkgs' own (so no binary cache has them), and whether that build would
# run a test suite.
LOCAL_BUILDS = """
  let
    closure = pkg: builtins.genericClosure {
      startSet = [ { key = pkg.pname; inherit pkg; } ];
      operator = item: map (d: { key = d.pname or d.name; pkg = d; }) (item.pkg.dependencies or [ ]);
    };
    localBuilds = system: variant:
      let
        overlays = [ ours ] ++ (if variant.wheels or false then [ wheels ] else [ ]);
        ours' = (pkgsFor { inherit system variant overlays; }).python3.pkgs;
        plain = (pkgsFor { inherit system variant; overlays = [ ]; }).python3.pkgs;
        # nixpkgs' own drvPath; a package that does not evaluate there is not cached either.
        cached = name: drv:
          plain ? ${name} && (let p = builtins.tryEval plain.${name}.drvPath; in p.success && p.value == drv.drvPath);
      in
      builtins.listToAttrs (builtins.concatMap (item:
        if cached item.key item.pkg then [ ] else [ { name = item.key; value = item.pkg.runsTests or false; } ]
      ) (closure ours'.llm-finetune));
  in
  builtins.listToAttrs (map (system: {
    name = system;
    value = {
      cuda = localBuilds system { };
      cpu = localBuilds system { cudaSupport = false; };
      spark = localBuilds system { preset = "spark"; };
      wheels = localBuilds system { wheels = true; };
    };
  }) [ "x86_64-linux" "aarch64-linux" ])
"""

# The huggingface-hub override and what depends on it, hf-xet (where nixpkgs' is older than the hub
# needs), trl 0.29 and this project's package.
EXPECTED_LOCAL = {
    "huggingface-hub",
    "hf-xet",
    "tokenizers",
    "transformers",
    "datasets",
    "accelerate",
    "peft",
    "trl",
    "llm-finetune",
}


@pytest.fixture(scope="module")
def local_builds(flake) -> dict:
    return flake.eval_expr(LOCAL_BUILDS)


def test_shells_build_only_what_no_cache_can_hold(local_builds):
    for system in SYSTEMS:
        # nixpkgs' CUDA (-cuda12) and the CPU shell: torch and bitsandbytes (CUDA builds take
        # hours) come from nixpkgs as they are.
        for variant in ("cuda", "cpu"):
            local = local_builds[system][variant]
            assert set(local) == EXPECTED_LOCAL, f"{system} {variant} builds locally: {sorted(local)}"
        # A narrowed preset rebuilds bitsandbytes for its one capability (and torch, in nixpkgs).
        assert "bitsandbytes" in local_builds[system]["spark"], sorted(local_builds[system]["spark"])
        # The wheels: every wheel of the manifest is fetched and patched (no compiler); the rest of
        # the CUDA shell is what the CPU shell builds.
        wheels = local_builds[system]["wheels"]
        assert set(wheels) == EXPECTED_LOCAL | set(_wheels(system)), (
            f"{system} wheels builds locally: {sorted(set(wheels) ^ (EXPECTED_LOCAL | set(_wheels(system))))}"
        )


def test_local_builds_skip_test_suites(local_builds):
    # The hub override rebuilds its dependents on the user's machine; none of those builds may run
    # the package's test suite (nixpkgs' accelerate runs its whole `tests` directory).
    for system in SYSTEMS:
        for variant, local in local_builds[system].items():
            running = sorted(name for name, runs in local.items() if runs)
            assert not running, f"{system} {variant}: local builds would run the test suites of {running}"


def test_overlay_accepts_pythonRelaxDeps_true(flake):
    # nixpkgs allows `pythonRelaxDeps = true` (relax every bound); the overlay must keep working
    # where nixpkgs sets it on a package the overlay changes.
    result = flake.eval_expr("""
      let
        relaxAll = final: prev: {
          pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
            (pf: pp: builtins.listToAttrs (map (name: {
              inherit name;
              value = pp.${name}.overridePythonAttrs { pythonRelaxDeps = true; };
            }) [ "huggingface-hub" "transformers" "trl" ]))
          ];
        };
        pkgs = pkgsFor { system = "x86_64-linux"; overlays = [ relaxAll ours ]; };
        ps = pkgs.python3.pkgs;
      in {
        env = builtins.isString pkgs.llm-finetune-python.drvPath;
        relaxed = map (n: ps.${n}.pythonRelaxDeps) [ "huggingface-hub" "transformers" "trl" ];
      }
    """)
    assert result == {"env": True, "relaxed": [True, True, True]}, result


def test_hub_gets_the_hf_xet_it_requires(flake):
    # huggingface-hub >= 1.29 requires hf-xet >= 1.5.2 (Xet downloads: Llama and most models); the
    # bound must be met, not relaxed away. Where nixpkgs' hf-xet is new enough it is used as it is.
    result = flake.eval_expr("""
      let
        report = system: hfXet:
          let
            bump = final: prev: {
              pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
                (pf: pp: { hf-xet = pp.hf-xet.overridePythonAttrs { version = hfXet; }; })
              ];
            };
            base = if hfXet == null then [ ] else [ bump ];
            ps = (pkgsFor { inherit system; overlays = base ++ [ ours ]; }).python3.pkgs;
            plain = (pkgsFor { inherit system; overlays = base; }).python3.pkgs;
          in {
            hub = builtins.isString ps.huggingface-hub.drvPath;
            relaxed = ps.huggingface-hub.pythonRelaxDeps or [ ];
            version = ps.hf-xet.version;
            url = ps.hf-xet.src.url or null;
            nixpkgs = ps.hf-xet.drvPath == plain.hf-xet.drvPath;
          };
      in {
        x86_64-linux = report "x86_64-linux" null;
        aarch64-linux = report "aarch64-linux" null;
        newer = report "aarch64-linux" "1.7.0";
      }
    """)
    for system, machine in (("x86_64-linux", "x86_64"), ("aarch64-linux", "aarch64")):
        r = result[system]
        assert r["hub"] is True
        assert r["relaxed"] is not True and "hf-xet" not in r["relaxed"], r["relaxed"]
        assert r["version"] == _constraint("hf-xet"), r
        assert r["url"].startswith("https://files.pythonhosted.org/") and r["url"].endswith(
            f"_{machine}.whl"
        ), r
        assert r["nixpkgs"] is False
    assert result["newer"]["version"] == "1.7.0" and result["newer"]["nixpkgs"] is True, result["newer"]


def test_cuda_python_set_uses_tritons_own_ptxas(flake):
    # nixpkgs' triton is patched to use its CUDA toolkit's ptxas, so the shells set no TRITON_PTXAS_*.
    # (The wheel triton bundles its own: ptxas 12.8 and, for Blackwell, ptxas-blackwell 13.1.)
    result = flake.eval(
        "devShells",
        "ds: builtins.mapAttrs (system: s: let"
        ' shell = if system == "x86_64-linux" then s.pytorch-fine-tune-cuda12 else s.pytorch-fine-tune-spark;'
        " ps = (builtins.head shell.packages).pkgs; in {"
        " torch = map (d: d.pname) ps.torch.dependencies; paths = ps.triton.nixpkgsExtraBinaryPaths or null;"
        ' ptxas = "${ps.torch.cudaPackages.cuda_nvcc.bin}/bin/ptxas"; }) ds',
    )
    for system in SYSTEMS:
        r = result[system]
        assert "triton" in r["torch"], r
        assert r["paths"] == r["ptxas"], (
            f"{system}: triton looks for ptxas at {r['paths']}, the CUDA is {r['ptxas']}"
        )


# --- the CUDA wheels (overlays/cuda-wheels.nix) ------------------------------------------------


def _closure(flake, *installables: str) -> dict:
    """Every derivation the installables need, by .drv path (`nix derivation show -r`)."""
    args = ["nix", "derivation", "show", "-r", "--offline", *installables]
    return json.loads(flake.run(args, f"nix derivation show -r {' '.join(installables)}").stdout)


def _nvcc_in(closure: dict) -> list[str]:
    """The derivations that are nvcc (cuda_nvcc) or take it as an input: what would run nvcc."""
    nvcc = {path for path in closure if "nvcc" in path.rsplit("/", 1)[-1]}
    users = {path for path, drv in closure.items() if nvcc & set(drv.get("inputDrvs", {}))}
    return sorted(path.rsplit("/", 1)[-1] for path in nvcc | users)


def _urls(closure: dict) -> set[str]:
    return {drv["env"]["url"] for drv in closure.values() if "url" in drv.get("env", {})}


def test_cuda_shells_never_run_nvcc(flake):
    for system in SYSTEMS:
        closure = _closure(flake, f".#devShells.{system}.pytorch-fine-tune")
        assert not _nvcc_in(closure), f"{system}: the CUDA shell would run nvcc: {_nvcc_in(closure)}"
        # ... and it does hold the CUDA stack: every wheel of the manifest is fetched.
        missing = {w["url"] for w in _wheels(system).values()} - _urls(closure)
        assert not missing, f"{system}: the CUDA shell does not fetch {sorted(missing)}"
    # The walk finds nvcc where nixpkgs compiles CUDA (torch, bitsandbytes): the check can fail.
    built = _nvcc_in(_closure(flake, ".#devShells.x86_64-linux.pytorch-fine-tune-cuda12"))
    assert any("torch" in name for name in built) and any("bitsandbytes" in name for name in built), built


def test_checks_and_cpu_shell_keep_nixpkgs_cpu_builds(flake):
    for system in SYSTEMS:
        checks = flake.eval(f"checks.{system}", "builtins.attrNames")
        closure = _closure(
            flake,
            f".#devShells.{system}.pytorch-fine-tune-cpu",
            f".#packages.{system}.llm-finetune-cpu",
            *(f".#checks.{system}.{name}" for name in checks),
        )
        wheels = {w["url"] for w in _wheels(system).values()} & _urls(closure)
        assert not wheels, f"{system}: the checks or the CPU shell fetch CUDA wheels: {sorted(wheels)}"
        cuda = sorted(
            name
            for name in (path.rsplit("/", 1)[-1] for path in closure)
            if re.search(r"cuda|nvidia|nvcc|triton", name)
        )
        assert not cuda, f"{system}: CUDA in the checks or the CPU shell: {cuda}"
        # The same walk finds the wheels where they are: the CUDA package.
        cuda_package = _urls(_closure(flake, f".#packages.{system}.llm-finetune"))
        assert {w["url"] for w in _wheels(system).values()} <= cuda_package, system
        # nixpkgs' CPU torch (cache.nixos.org) is there.
        assert any(
            re.fullmatch(r"[a-z0-9]{32}-python3\.14-torch-2\.13\.0\.drv", p.rsplit("/", 1)[-1])
            for p in closure
        )


WHEEL_PACKAGES = """
  let
    report = system:
      let
        ps = (pkgsFor { inherit system; variant = { wheels = true; }; overlays = [ ours wheels ]; }).python3.pkgs;
        manifest = builtins.fromJSON (builtins.readFile (repo + "/overlays/cuda-wheels/cp314-${system}.json"));
      in
      builtins.mapAttrs (name: _: let p = ps.${name}; in {
        inherit (p) version format postFixup appendRunpaths autoPatchelfIgnoreMissingDeps;
        url = p.src.url;
        hash = p.src.outputHash;
        dependencies = map (d: d.pname) p.dependencies;
        hooks = map (d: d.pname or d.name) p.nativeBuildInputs;
        postInstall = p.postInstall or "";
        # Instantiating runs the stand-in's checks, the Requires-Dist check among them.
        instantiates = builtins.isString p.drvPath;
        site = "${p}/lib/python3.14/site-packages";
      }) manifest.wheels;
  in
  { x86_64-linux = report "x86_64-linux"; aarch64-linux = report "aarch64-linux"; }
"""


def test_wheel_packages_follow_the_manifest(flake):
    result = flake.eval_expr(WHEEL_PACKAGES)
    for system in SYSTEMS:
        wheels, packages = _wheels(system), result[system]
        assert set(packages) == set(wheels)
        for name, wheel in wheels.items():
            p = packages[name]
            assert (p["url"], p["hash"], p["version"]) == (wheel["url"], wheel["hash"], wheel["version"]), (
                name
            )
            assert p["format"] == "wheel" and "auto-patchelf-hook" in p["hooks"], name
            assert sorted(p["dependencies"]) == sorted(wheel["dependencies"]), name
            assert p["instantiates"] is True, name
            # libcuda.so.1 is the driver: NixOS's, or the host's through the shell's link.
            assert p["appendRunpaths"] == ["/run/opengl-driver/lib"], name
            assert "libcuda.so.1" in p["autoPatchelfIgnoreMissingDeps"], name
        # torch links to the libraries of every NVIDIA wheel it needs, in their own store paths.
        for name in set(wheels) - {"torch", "bitsandbytes"}:
            assert (
                f'addAutoPatchelfSearchPath "{packages[name]["site"]}"' in packages["torch"]["postFixup"]
            ), name
        assert "libbitsandbytes_cuda13" in packages["bitsandbytes"]["postInstall"]


def test_wheel_torch_requires_its_nvidia_libraries(flake):
    # torch's Requires-Dist names nvidia-nccl-cu13==2.29.7: without it the build-time check fails.
    proc = flake.eval_expr(
        """
      let
        dropNccl = final: prev: {
          pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
            (pf: pp: { torch = pp.torch.overridePythonAttrs (old: {
              dependencies = builtins.filter (d: d.pname != "nvidia-nccl-cu13") old.dependencies;
            }); })
          ];
        };
        pkgs = pkgsFor { system = "aarch64-linux"; variant = { wheels = true; }; overlays = [ ours wheels dropNccl ]; };
      in pkgs.python3.pkgs.torch.drvPath
    """,
        check=False,
    )
    assert proc.returncode != 0 and "nvidia-nccl-cu13 not installed" in proc.stderr, proc.stderr[-2000:]


def test_other_python_sets_get_the_wheel_torch(flake):
    # Another playbook's Python set (python3 or python314, any withPackages) gets the same wheels by
    # the same overlay.
    result = flake.eval_expr("""
      let
        pkgs = pkgsFor { system = "aarch64-linux"; variant = { wheels = true; }; overlays = [ ours wheels ]; };
        env = pkgs.python314.withPackages (ps: [ ps.torch ps.bitsandbytes ]);
      in {
        urls = map (p: p.src.url) env.packages;
        cuda = pkgs.llm-finetune-cuda;
      }
    """)
    wheels = _wheels("aarch64-linux")
    assert result["urls"] == [wheels["torch"]["url"], wheels["bitsandbytes"]["url"]]
    assert result["cuda"]["minimumDriver"] == "580" and result["cuda"]["cudaVersion"] == "13.0"
    assert result["cuda"]["downloadBytes"] == sum(w["size"] for w in wheels.values())


# --- the LLaMA-Factory playbook (playbooks/llama-factory) ----------------------------------------

LLAMA_FACTORY_SETS = """
  builtins.mapAttrs (system: ds:
    let
      report = shell:
        let ps = (builtins.head shell.packages).pkgs; in {
          torch = ps.torch.drvPath;
          bnb = ps.bitsandbytes.drvPath;
          wheel = ps.torch.src.url or null;
        };
      lf = shell:
        let ps = (builtins.head shell.packages).pkgs; lf = ps.llamafactory; in report shell // {
          versions = builtins.listToAttrs (map (n: { name = n; value = ps.${n}.version; })
            [ "trl" "datasets" "accelerate" "gradio" "gradio-client" "tyro" "transformers" "peft" "huggingface-hub" ]);
          deps = map (d: d.pname) lf.dependencies;
          removed = lf.pythonRemoveDeps or [ ];
          postPatch = lf.postPatch or "";
          src = lf.src.rev;
          # Instantiating runs the stand-in's build-time checks (Requires-Dist among them).
          instantiates = builtins.isString lf.drvPath;
        };
    in {
      cuda = lf ds.llama-factory;
      cpu = lf ds.llama-factory-cpu;
      ours = report ds.pytorch-fine-tune;
      ours-cpu = report ds.pytorch-fine-tune-cpu;
    })
"""


@pytest.fixture(scope="module")
def llama_factory_sets(flake) -> dict:
    return flake.eval("devShells", LLAMA_FACTORY_SETS)


def test_llama_factory_reuses_the_torch_of_pytorch_fine_tune(llama_factory_sets):
    for system in SYSTEMS:
        sets = llama_factory_sets[system]
        for lf, ours in (("cuda", "ours"), ("cpu", "ours-cpu")):
            assert (sets[lf]["torch"], sets[lf]["bnb"]) == (sets[ours]["torch"], sets[ours]["bnb"]), (
                f"{system} {lf}: LLaMA-Factory's torch/bitsandbytes differ from pytorch-fine-tune's (a rebuild)"
            )
        assert sets["cuda"]["wheel"] == _wheels(system)["torch"]["url"], system
        assert sets["cpu"]["wheel"] is None, f"{system}: the CPU shell must keep nixpkgs' CPU torch"
        for flavour in ("cuda", "cpu"):
            lf = sets[flavour]
            assert lf["instantiates"] is True
            assert lf["versions"] == {
                "trl": "0.24.0", "datasets": "4.0.0", "accelerate": "1.11.0", "gradio": "5.50.0",
                "gradio-client": "1.14.0", "tyro": "0.8.14", "transformers": "5.5.4", "peft": "0.18.0",
                "huggingface-hub": "1.31.0",
            }, lf["versions"]  # fmt: skip
            assert {"torch", "gradio", "trl", "datasets"} <= set(lf["deps"])
            assert lf["src"] == "refs/tags/v0.9.5"
        # nixpkgs' torchvision/torchaudio would compile CUDA code against the wheel torch: left out,
        # with torchaudio's module-level import answered by a placeholder.
        cuda, cpu = sets["cuda"], sets["cpu"]
        assert not {"torchvision", "torchaudio"} & set(cuda["deps"]), cuda["deps"]
        assert set(cuda["removed"]) == {"torchvision", "torchaudio"}
        assert "from . import no_torchaudio as torchaudio" in cuda["postPatch"]
        assert (
            {"torchvision", "torchaudio"} <= set(cpu["deps"]) and not cpu["removed"] and not cpu["postPatch"]
        )


def test_llama_factory_shells_compile_no_cuda(flake):
    for system in SYSTEMS:
        wheels = {w["url"] for w in _wheels(system).values()}
        closure = _closure(flake, f".#devShells.{system}.llama-factory")
        assert not _nvcc_in(closure), f"{system}: the llama-factory shell would run nvcc: {_nvcc_in(closure)}"
        assert wheels <= _urls(closure), system
        cpu = _closure(flake, f".#devShells.{system}.llama-factory-cpu")
        assert not (wheels & _urls(cpu)) and not _nvcc_in(cpu), (
            f"{system}: CUDA in the llama-factory-cpu shell"
        )


def test_llama_factory_needs_its_pins(flake):
    # LLaMA-Factory's Requires-Dist caps trl at 0.24.0: on this project's trl the build-time check fails.
    proc = flake.eval_expr(
        """
      let
        pkgs = pkgsFor { system = "x86_64-linux"; variant = { cudaSupport = false; }; };
        lf = (pkgs.callPackage (repo + "/playbooks/llama-factory/python.nix") { }).llamafactory;
        newer = lf.overridePythonAttrs (old: {
          dependencies = map (d: if d.pname == "trl" then pkgs.python3.pkgs.trl else d) old.dependencies;
        });
      in newer.drvPath
    """,
        check=False,
    )
    assert proc.returncode != 0 and "trl<=0.24.0,>=0.18.0 not satisfied" in proc.stderr, proc.stderr[-2000:]


def test_llama_factory_shells(shells, outputs):
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
            cuda = name == "llama-factory"
            assert ("llm_finetune_host_driver" in hook) == cuda
            assert ("Needs an NVIDIA driver >= 580 (CUDA 13.0)" in hook) == cuda
            assert ("Without torchvision and torchaudio" in hook) == cuda
            assert not any(k.startswith("TRITON_PTXAS") for k in env), f"{system}.{name} overrides ptxas"

        checks = outputs["checks"][system]
        tiny_model = outputs["packages"][system]["tiny-model"]
        cli, webui = checks["smoke-llama-factory-cli"], checks["smoke-llama-factory-webui"]
        # nixpkgs' escapeShellArg quotes words with `=` and leaves paths bare: compare unquoted.
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


# --- the stand-in models what nixpkgs does -----------------------------------------------------


def test_stand_in_has_nixpkgs_config_defaults(flake):
    config = flake.eval_expr("""
      let c = (stub { system = "x86_64-linux"; }).config; in {
        inherit (c) cudaSupport cudaCapabilities cudaForwardCompat allowUnfree allowBroken;
      }
    """)
    assert config == {
        "cudaSupport": False,
        "cudaCapabilities": [],
        "cudaForwardCompat": True,
        "allowUnfree": False,
        "allowBroken": False,
    }
    wrong = flake.eval_expr(
        '(stub { system = "x86_64-linux"; config.cudaCapabilities = "8.9"; }).config.cudaCapabilities',
        check=False,
    )
    assert wrong.returncode != 0 and "cudaCapabilities" in wrong.stderr, wrong.stderr[-2000:]


@pytest.mark.parametrize(
    ("change", "config", "expected"),
    [
        ("{ meta.broken = true; }", "{ }", "is marked as broken"),
        (
            '{ meta.platforms = [ "aarch64-linux" ]; }',
            "{ }",
            "is not available on the requested hostPlatform",
        ),
        ("{ meta.license = final.lib.licenses.nvidiaCudaRedist; }", "{ }", "unfree license"),
        ('{ disabled = pf.pythonAtLeast "3.14"; }', "{ }", "not supported for interpreter python3.14"),
        ("{ dependencies = [ ]; }", "{ }", "huggingface-hub not installed"),
        (
            '{ dependencies = [ (pf.huggingface-hub.overridePythonAttrs { version = "2.0.1"; }) ]; }',
            "{ }",
            "huggingface-hub<2.0,>=0.16.4 not satisfied by version 2.0.1",
        ),
        ("{ meta.broken = true; }", "{ allowBroken = true; }", None),
    ],
    ids=["broken", "platforms", "unfree", "disabled", "missing-dependency", "unmet-bound", "allow-broken"],
)
def test_stand_in_refuses_what_nixpkgs_refuses(flake, change, config, expected):
    # Each change is made to nixpkgs' tokenizers (which requires huggingface-hub >=0.16.4,<2.0).
    proc = flake.eval_expr(
        f"""
      let
        pkgs = stub {{
          system = "x86_64-linux";
          config = {config};
          overlays = [ (final: prev: {{
            pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
              (pf: pp: {{ tokenizers = pp.tokenizers.overridePythonAttrs ({change}); }})
            ];
          }}) ];
        }};
      in
      builtins.isString (pkgs.python3.withPackages (ps: [ ps.tokenizers ])).drvPath
    """,
        check=False,
    )
    if expected is None:
        assert proc.returncode == 0, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-2000:]


def test_stand_in_rejects_unknown_python_packages(flake):
    proc = flake.eval_expr(
        '(stub { system = "x86_64-linux"; }).python3.withPackages (ps: [ ps.torhc ])', check=False
    )
    assert proc.returncode != 0 and "torhc" in proc.stderr, proc.stderr


def test_stand_in_runs_the_runtime_dependency_check_on_nixpkgs_own_set(flake):
    # nixpkgs' datasets 5.1.0 requires huggingface-hub >= 1.31 and nixpkgs has 1.28: the reason for
    # the overlay's hub update, found by the same check nixpkgs runs at build time.
    proc = flake.eval_expr(
        '(pkgsFor { system = "x86_64-linux"; overlays = [ ]; }).python3.pkgs.datasets.drvPath', check=False
    )
    assert proc.returncode != 0, proc.stdout
    assert "huggingface-hub<3.0,>=1.31.0 not satisfied by version 1.28.0" in proc.stderr, proc.stderr[-2000:]


# --- the README --------------------------------------------------------------------------------


def test_readme_says_per_system_and_shell_what_is_cached(flake):
    shells = flake.eval("devShells", "builtins.mapAttrs (_: builtins.attrNames)")
    table = {}
    for line in PLAYBOOK_README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`.#pytorch-fine-tune"):
            table[(cells[0].strip("`").removeprefix(".#"), cells[1])] = (cells[2], cells[3])
    documented = {(shell, system) for shell, system in table}
    expected = {
        (shell, system)
        for system in SYSTEMS
        for shell in shells[system]
        if shell.startswith("pytorch-fine-tune")
    }
    assert documented == expected, (
        f"missing: {sorted(expected - documented)}, extra: {sorted(documented - expected)}"
    )
    for (shell, system), (cached, built) in table.items():
        if shell == "pytorch-fine-tune":
            # The wheels: their size from the manifest, nothing compiled with nvcc.
            assert f"PyPI wheels ({_gigabytes(system)} GB" in cached, (shell, system, cached)
            assert "nothing compiled with nvcc" in built, (shell, system, built)
        elif system == "aarch64-linux" and not shell.endswith("-cpu"):
            # The nix-community CUDA cache builds x86_64-linux only: on aarch64-linux, nixpkgs' CUDA
            # torch is built locally.
            assert "cache.nixos-cuda.org" not in cached and "torch" in built, (shell, system, cached, built)


def _gigabytes(system: str) -> str:
    """What the CUDA wheels of `system` weigh, in GB (10^9 bytes), as the READMEs print it."""
    return f"{sum(w['size'] for w in _wheels(system).values()) / 1e9:.1f}"


def test_readmes_say_what_the_cuda_shell_downloads_and_the_driver_it_needs():
    playbook = PLAYBOOK_README.read_text()
    for system in SYSTEMS:
        row = next(line for line in playbook.splitlines() if line.startswith(f"| {system}"))
        assert f"| {len(_wheels(system))} | {_gigabytes(system)} GB |" in row, row
    assert "estimate from the size" in playbook and "NVIDIA driver >= 580" in playbook
    top = (REPO / "README.md").read_text()
    assert f"{_gigabytes('aarch64-linux')} GB" in top and "580" in top
