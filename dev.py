#!/usr/bin/env python3
"""Set up a local environment and run the demo, the tests or the canary, without Nix. Needs only Python >= 3.11.

    python3 dev.py demo [ARGS]        # .venv at constraints.txt, then scripts/demo.py (the tiny model, offline)
    python3 dev.py test [ARGS]        # the same .venv, then python -m pytest ARGS
    python3 dev.py test --pins latest [ARGS]
                                      # .venv-latest at constraints-latest.txt (the newest releases tested)
    python3 dev.py canary [ARGS]      # the newest releases, unpinned: smoke tests, one verdict line, never fails
    python3 dev.py bump-latest        # re-resolve the newest releases into constraints-latest.txt, on purpose
    python3 dev.py envs [NAME ...]    # make (or reuse) environments side by side: flake, latest, llama-factory

Each environment is a git-ignored virtual environment in this directory. torch is installed first, at the pinned
version, so that no other package pulls in a different build; running a command again reuses the environment and
installs only when a pin changed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import venv
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PINS = {"flake": ROOT / "constraints.txt", "latest": ROOT / "constraints-latest.txt"}
ENVS = {"flake": ROOT / ".venv", "latest": ROOT / ".venv-latest"}
CANARY_ENV = ROOT / ".venv-canary"
STAMP = "llm-finetune-pins.json"
LAST_REPORT = "pytest-last.xml"  # the outcome of the newest `dev.py test` in that environment (JUnit XML)
# The packages whose versions a canary verdict names: the stack the scripts are written against.
STACK = (
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "huggingface-hub",
    "tokenizers", "safetensors",
)  # fmt: skip
# Not pinned: the installer's own tools and this project.
UNPINNED = {"pip", "setuptools", "wheel", "llm-finetune"}

# LLaMA-Factory pins older datasets/accelerate/trl than this project, so its playbook without Nix runs from an
# environment of its own, at exactly the versions in its constraints file, with its release's data/ and examples/.
LLAMA_FACTORY = ROOT / "playbooks" / "llama-factory"
LLAMA_FACTORY_ENV = ROOT / ".venv-llama-factory"
LLAMA_FACTORY_VERSION = "0.9.5"
# sha256 of llamafactory-0.9.5.tar.gz as published on PyPI (`pip download --no-deps --no-binary :all:
# llamafactory==0.9.5`, then `sha256sum`). Its data/ and examples/ equal those of the v0.9.5 tag the Nix
# shells use (diff -r of the sdist against `git archive v0.9.5`).
LLAMA_FACTORY_SDIST_SHA256 = "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f"
# Bump when llama_factory_env changes what it makes, so that existing environments are made again.
LLAMA_FACTORY_LAYOUT = 1


def say(line: str) -> None:
    """One line of progress, written whole: `envs` makes environments from several threads at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def fail(message: str) -> None:
    """Stop with one line: Python prints it and exits 1, and a caller that goes on reads it from `.code`."""
    raise SystemExit(f"error: {message}")


def pinned_versions(constraints: Path) -> dict[str, str]:
    """{normalised name: version} for every `name==version` line of a constraints file."""
    versions = {}
    for line in constraints.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            versions[normalise(match[1])] = match[2]
    return versions


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(python: Path, *args: str) -> None:
    # --no-compile: modules are byte-compiled when first imported, not all of them at install (half its time).
    options = ["--disable-pip-version-check", "--no-compile", "-q"]
    command = [str(python), "-m", "pip", "install", *options, *args]
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        fail(f"`{' '.join(command[3:])}` failed (see pip's message above); nothing else was changed")


def env_python(env: Path) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin") / "python"


def ensure_env(env: Path, constraints: Path | None, extras: str, fresh: bool = False) -> Path:
    """A virtual environment with torch first, then this project's dependencies (and `extras`) under
    `constraints`, or their newest releases when `constraints` is None. Reused while its inputs are unchanged."""
    wanted = {
        "constraints": constraints.read_text() if constraints else None,
        "pyproject": hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest(),
        "extras": extras,
        "python": sys.version.split()[0],
    }
    python = env_python(env)
    stamp = env / STAMP
    if not fresh and python.exists() and stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return python
    if fresh or not python.exists():
        new_venv(env)
    stamp.unlink(missing_ok=True)  # an interrupted install must not pass for a finished one
    (env / LAST_REPORT).unlink(missing_ok=True)  # nor a test outcome at other versions for one at these
    pins = pinned_versions(constraints or PINS["flake"])
    torch = f"torch=={pins['torch']}"
    rest = f"the pins in {constraints.name}" if constraints else "the newest releases"
    say(f"== installing {torch}, then {rest}")
    pip(python, torch)
    # Editable: the scripts and the environment's `finetune` package are the same files.
    target = ["-e", f"{ROOT}[{extras}]" if extras else str(ROOT)]
    pip(python, *(["-c", str(constraints)] if constraints else []), torch, *target)
    stamp.write_text(json.dumps(wanted, indent=1) + "\n")
    return python


def new_venv(env: Path) -> None:
    shutil.rmtree(env, ignore_errors=True)
    say(f"== creating {env.name} (Python {sys.version.split()[0]})")
    try:
        venv.create(env, with_pip=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(env, ignore_errors=True)
        fail(f"cannot create {env}: {exc} (on Debian and Ubuntu, `apt install python3-venv` provides it)")


def llama_factory_env(env: Path = LLAMA_FACTORY_ENV) -> Path:
    """LLaMA-Factory's environment: torch first, then exactly the versions in its constraints file (no resolver:
    torchaudio and torchvision stay out, see that file), and the release's data/ and examples/ in
    share/llama-factory, from its sha256-checked sdist. Reused while the pins are unchanged (a comment edit keeps
    it); the torchaudio stand-in is written every time, as the file may change while the environment stays."""
    constraints = LLAMA_FACTORY / "constraints.txt"
    pins = pinned_versions(constraints)
    digest = hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()
    stamp = f"{digest} {LLAMA_FACTORY_SDIST_SHA256} {LLAMA_FACTORY_LAYOUT}\n"
    stamp_file, python = env / "constraints.sha256", env_python(env)
    if not (stamp_file.is_file() and stamp_file.read_text() == stamp):
        new_venv(env)
        say(f"== installing torch=={pins['torch']}, then the pins in {constraints.relative_to(ROOT)}")
        pip(python, f"torch=={pins['torch']}")  # first, as for ours, so that nothing pulls a CUDA build
        pip(python, "--no-deps", "-r", str(constraints))
        unpack_llama_factory_release(python, env / "share" / "llama-factory")
        stamp_file.write_text(stamp)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    placeholder = Path(purelib) / "torchaudio" / "__init__.py"
    placeholder.parent.mkdir(exist_ok=True)
    shutil.copyfile(LLAMA_FACTORY / "no_torchaudio.py", placeholder)
    return python


def unpack_llama_factory_release(python: Path, share: Path) -> None:
    """data/ and examples/ of LLaMA-Factory's published sdist, which NVIDIA's commands name, into `share`."""
    name = f"llamafactory-{LLAMA_FACTORY_VERSION}"
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(python), "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                   "--no-binary", ":all:", "-d", tmp, f"llamafactory=={LLAMA_FACTORY_VERSION}"]  # fmt: skip
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            fail(f"cannot download the {name} sdist (see pip's message above)")
        sdist = Path(tmp) / f"{name}.tar.gz"
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != LLAMA_FACTORY_SDIST_SHA256:
            fail(f"{sdist.name} is not the published {name} sdist (its sha256 differs)")
        with tarfile.open(sdist) as archive:
            members = [
                m for m in archive.getmembers() if m.name.startswith((f"{name}/data/", f"{name}/examples/"))
            ]
            for member in members:
                member.name = member.name[len(name) + 1 :]
            archive.extractall(share, members=members, filter="data")


def env_with_bytecode(**extra: str) -> dict[str, str]:
    """The environment for the tests, the demo and the scripts they start. pip installs with --no-compile, so modules
    are byte-compiled on first import and cached in the venv, unless PYTHONDONTWRITEBYTECODE forbids it: then every
    process compiles torch, transformers and datasets again (~22 s per import here instead of ~8 s)."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, **extra}


def run(python: Path, *args: str, env: dict[str, str] | None = None) -> int:
    return subprocess.run([str(python), *args], cwd=ROOT, env=env or env_with_bytecode()).returncode


def parallel(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """pytest arguments and environment for one worker per core (pytest-xdist), unless the arguments choose
    (`-n 0` runs in one process). A worker takes whole files, so a module's fixtures (the flake copy, LLaMA-Factory's
    venv and its trained adapter) are made once, and runs torch on one thread: most tests are bound by one core's
    Python and imports, and two workers of two threads each on two cores were slower than one process."""
    workers = min(os.cpu_count() or 1, 8)
    chosen = "no:xdist" in args or any(
        a == "--numprocesses" or a.startswith(("-n", "--numprocesses=")) for a in args
    )
    if workers < 2 or chosen:
        return args, env_with_bytecode()
    threads = {name: os.environ.get(name, "1") for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return ["-n", str(workers), "--dist", "loadfile", *args], env_with_bytecode(**threads)


def pins_flag(args: list[str]) -> tuple[str, list[str]]:
    if args[:1] == ["--pins"] and len(args) > 1:
        return args[1], args[2:]
    if args[:1] and args[0].startswith("--pins="):
        return args[0].split("=", 1)[1], args[1:]
    return "flake", args


def demo(args: list[str]) -> int:
    # With the test tools too: one .venv serves `demo` and `test` without reinstalling between them.
    python = pinned_env("flake")
    return run(python, "scripts/demo.py", *args)


def pinned_env(pins: str) -> Path:
    return ensure_env(ENVS[pins], PINS[pins], extras="test")


def test(args: list[str]) -> int:
    pins, args = pins_flag(args)
    if pins not in PINS:
        fail(f"--pins {pins}: choose one of {', '.join(PINS)}")
    python = pinned_env(pins)
    print(f"== python -m pytest {' '.join(args)} (pins: {PINS[pins].name})", flush=True)
    (ENVS[pins] / LAST_REPORT).unlink(missing_ok=True)
    args, env = parallel(args)
    return run(python, "-m", "pytest", f"--junitxml={ENVS[pins] / LAST_REPORT}", *args, env=env)


def installed_versions(python: Path) -> dict[str, str]:
    listing = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {normalise(p["name"]): p["version"] for p in json.loads(listing)}


def junit_outcome(report: Path) -> tuple[int, list[str]]:
    """(passed, failed test ids) from a pytest JUnit XML report."""
    passed, failed = 0, []
    for case in ET.parse(report).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}")
        elif case.find("skipped") is None:
            passed += 1
    return passed, failed


def resolve_newest(*args: str) -> dict[str, str]:
    """{name: version} of this project's dependencies and test tools at their newest releases, torch at its pin:
    what pip would install into an empty environment today. Installs nothing."""
    torch = f"torch=={pinned_versions(PINS['flake'])['torch']}"
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip(
            Path(sys.executable), "--dry-run", "--ignore-installed", "--report", str(report),
            torch, f"{ROOT}[test]", *args,
        )  # fmt: skip
        resolved = json.loads(report.read_text())["install"]
    versions = {normalise(i["metadata"]["name"]): i["metadata"]["version"].split("+")[0] for i in resolved}
    return {n: v for n, v in sorted(versions.items()) if n not in UNPINNED}


def smoke_verdict(python: Path, env: Path, args: list[str]) -> tuple[int, list[str], Path]:
    """Run the smoke tests with pytest's output in a log: the verdict line is what the canary says, so that a
    failure here can never read as the run's failure."""
    report, log = env / "canary.xml", env / "canary.log"
    with log.open("w") as out:
        args, child_env = parallel(args)
        command = [str(python), "-m", "pytest", "-m", "smoke", "-rf", f"--junitxml={report}", *args]
        subprocess.run(command, cwd=ROOT, env=child_env, stdout=out, stderr=subprocess.STDOUT)
    passed, failed = junit_outcome(report) if report.exists() else (0, [f"pytest (no report; see {log})"])
    return passed, failed, log


def canary(args: list[str]) -> int:
    """The smoke tests against whatever PyPI serves today. Prints one verdict line and exits 0 whatever it finds,
    so that a new upstream release cannot fail CI: it warns, and `bump-latest` moves the pins on purpose."""
    try:
        newest = resolve_newest()
    except SystemExit as exc:
        print(f"canary: could not resolve the newest releases ({exc.code})")
        return 0
    latest = pinned_versions(PINS["latest"])
    moved = [f"{n} {v}" for n, v in newest.items() if latest.get(n) != v]
    if not moved:
        # Today's newest releases are constraints-latest.txt's: its pass is the canary's, when it has run.
        last = ENVS["latest"] / LAST_REPORT
        passed, failed = junit_outcome(last) if last.exists() else (0, [str(last)])
        if not failed:
            print(f"canary: {passed} passed (today's newest releases are {PINS['latest'].name}'s)")
            return 0
        env, python = ENVS["latest"], pinned_env("latest")
    else:
        try:
            env, python = CANARY_ENV, ensure_env(CANARY_ENV, None, extras="test", fresh=True)
        except SystemExit as exc:
            print(f"canary: could not install the newest releases ({exc.code})")
            return 0
    passed, failed, log = smoke_verdict(python, env, args)
    newer = f" (newer than {PINS['latest'].name}: {', '.join(moved)})" if moved else ""
    if failed:
        versions = installed_versions(python)
        stack = ", ".join(f"{n} {versions[n]}" for n in STACK if n in versions)
        more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        errors = [line for line in log.read_text().splitlines() if line.startswith("E ")]
        print("\n".join(errors[-15:]) + f"\n(the whole output: {log})")
        print(f"canary: FAILED {failed[0]}{more} with {stack}{newer}")
    else:
        print(f"canary: {passed} passed{newer}")
    return 0


def bump_latest(args: list[str]) -> int:
    """Resolve this project's dependencies and test tools at their newest releases (torch stays at its pin) and
    write every resolved version to constraints-latest.txt, with the changes since the last bump at its top."""
    resolved = resolve_newest(*args)
    before = pinned_versions(PINS["latest"]) if PINS["latest"].exists() else {}
    changes = [f"{n} {before.get(n, '(new)')} -> {v}" for n, v in resolved.items() if before.get(n) != v]
    changes += [f"{n} {v} -> (dropped)" for n, v in before.items() if n not in resolved]
    today = datetime.date.today().isoformat()
    lines = [
        "# The newest releases this project is tested with: CI's second pinned pass (`python3 dev.py test --pins",
        "# latest`). Written by `python3 dev.py bump-latest`, never by hand; constraints.txt stays the flake's set.",
        f"# Bumped {today}; changes since the previous bump:" + ("" if changes else " none"),
        *(f"#   {change}" for change in changes),
        *(f"{n}=={v}" for n, v in resolved.items()),
    ]
    PINS["latest"].write_text("\n".join(lines) + "\n")
    print(f"{PINS['latest'].name}: {len(resolved)} pins, {len(changes)} changed")
    for change in changes:
        print(f"  {change}")
    return 0


MAKERS = {
    "flake": lambda: pinned_env("flake"),
    "latest": lambda: pinned_env("latest"),
    "llama-factory": llama_factory_env,
}


def envs(args: list[str]) -> int:
    """Make (or reuse) the named environments, all of them by default, side by side: each install is mostly one
    core unpacking and writing files (all three took 90 s at once here, 160 s one after the other)."""
    names = args or list(MAKERS)
    unknown = [name for name in names if name not in MAKERS]
    if unknown:
        fail(f"{', '.join(unknown)}: choose among {', '.join(MAKERS)}")
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {name: pool.submit(MAKERS[name]) for name in names}
    failures = []
    for name, future in futures.items():
        try:
            future.result()
        except SystemExit as exc:
            failures.append(f"{name}: {str(exc.code).removeprefix('error: ')}")
    if failures:
        fail("; ".join(failures))
    return 0


COMMANDS = {"demo": demo, "test": test, "canary": canary, "bump-latest": bump_latest, "envs": envs}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py runs on whatever python3 the user has)
        fail(f"Python >= 3.11 is needed; this is {sys.version.split()[0]}")
    if sys.prefix != sys.base_prefix:
        print(f"note: {sys.prefix} is active; dev.py uses its own environments in {ROOT} all the same")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
