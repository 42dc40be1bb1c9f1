"""Nix >= 2.26 and nixpkgs' real lib for the flake tests (tests/test_flake.py).

Nix, in this order:
  1. `nix` on PATH, when it is 2.26 or newer;
  2. $NIX_ROOT: a root file system made by tests/nix/nix-root.sh (Debian trixie's nix-bin 2.26),
     used with chroot inside a mount namespace of its own (`unshare --mount-proc`): its /proc lives as
     long as the command, so nothing stays mounted under the repository when the tests end;
  3. .nix-root/ in the repository (git-ignored), made by tests/nix/nix-root.sh the first time the
     tests run as root on a machine with mmdebstrap (a minute or two, ~290 MB).
nixpkgs' lib: $NIXPKGS_LIB, else shared/nixpkgs-lib/lib beside the repository or its parent.
Where either is missing, the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
CHROOT = shutil.which("chroot", path=_SBIN)
UNSHARE = shutil.which("unshare", path=_SBIN)
NIX_ROOT_SCRIPT = REPO / "tests" / "nix" / "nix-root.sh"
MINIMUM = (2, 26)

# Settings for every command: flakes on; no warning about the uncommitted test copy; the flake's
# binary cache accepted (nothing is fetched: evaluation only, offline).
NIX_CONFIG = "experimental-features = nix-command flakes\nwarn-dirty = false\naccept-flake-config = true\n"


def _version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Nix:
    """Runs nix (and git) either on the host or inside a chroot `root`."""

    root: Path | None
    version: str

    def scratch(self) -> Path:
        """A fresh host directory that this Nix sees too (under the root's /tmp for a chroot)."""
        base = self.root / "tmp" if self.root else None
        return Path(tempfile.mkdtemp(prefix="llm-finetune-flake-", dir=base))

    def inside(self, path: Path) -> str:
        """`path` (on the host) as this Nix sees it."""
        if self.root is None:
            return str(path)
        return "/" + str(path.resolve().relative_to(self.root.resolve()))

    def run(self, args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
        """`args` (nix, nix-instantiate, git ...) in `cwd`; never raises on a non-zero exit."""
        if self.root is None:
            env = dict(os.environ, NIX_CONFIG=NIX_CONFIG)
            if args[0] != "git" and os.geteuid() != 0 and not os.access("/nix", os.W_OK):
                # No write access to /nix/store: a store of its own, beside the work.
                args = [args[0], "--store", str(cwd.parent / "store"), *args[1:]]
            return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        # Debian's nix-bin names a build group the root does not have; evaluation builds nothing.
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/root",
            "NIX_CONFIG": NIX_CONFIG + "build-users-group =\n",
        }
        command = [*in_root(self.root), "sh", "-c", 'cd "$0" && exec "$@"', self.inside(cwd), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def in_root(root: Path) -> list[str]:
    """The command prefix that runs a program in `root` with a /proc of its own that is unmounted when it exits
    (a private mount namespace), so no mount outlives the tests: a mount left under a checkout breaks its removal."""
    return [UNSHARE, "--mount", "--fork", f"--mount-proc={root / 'proc'}", CHROOT, str(root)]


def _host_nix() -> Nix | None:
    if not shutil.which("nix"):
        return None
    out = subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout
    version = _version(out)
    if version is None or version < MINIMUM or not shutil.which("git"):
        return None
    return Nix(None, out.strip())


def _chroot_nix(root: Path) -> Nix | str:
    """Nix in `root`, making the root with nix-root.sh where needed."""
    if not (root / "usr" / "bin" / "nix").exists():
        if os.geteuid() != 0:
            return f"{root} needs making as root: sudo {NIX_ROOT_SCRIPT.relative_to(REPO)} {root}"
        if not shutil.which("mmdebstrap"):
            return "no Nix >= 2.26: install Nix, or mmdebstrap to make a root with it (apt-get install mmdebstrap)"
        # Test workers (pytest-xdist) may get here together: one makes the root, the others wait for it.
        with open(root.parent / f"{root.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / "usr" / "bin" / "nix").exists():
                made = subprocess.run(
                    ["sh", str(NIX_ROOT_SCRIPT), str(root)], capture_output=True, text=True, timeout=1200
                )
                if made.returncode != 0:
                    last = (made.stderr.strip().splitlines() or ["(no output)"])[-1]
                    return f"{NIX_ROOT_SCRIPT.relative_to(REPO)} {root} failed: {last}"
    if os.geteuid() != 0 or CHROOT is None or UNSHARE is None:
        return f"running Nix in {root} needs root, chroot and unshare"
    out = subprocess.run([*in_root(root), "nix", "--version"], capture_output=True, text=True)
    version = _version(out.stdout)
    if out.returncode != 0 or version is None or version < MINIMUM:
        return f"{root} has no working Nix >= 2.26 ({(out.stdout or out.stderr).strip()})"
    return Nix(root, out.stdout.strip())


@functools.cache
def find_nix() -> Nix | str:
    """A Nix >= 2.26, or the reason there is none."""
    if os.environ.get("NIX_ROOT"):
        return _chroot_nix(Path(os.environ["NIX_ROOT"]))
    host = _host_nix()
    if host is not None:
        return host
    return _chroot_nix(REPO / ".nix-root")


def find_nixpkgs_lib() -> Path | str:
    """nixpkgs' lib/ directory, or the reason there is none."""
    candidates = [Path(os.environ["NIXPKGS_LIB"])] if os.environ.get("NIXPKGS_LIB") else []
    candidates += [base / "shared" / "nixpkgs-lib" / "lib" for base in (REPO.parent, REPO.parent.parent)]
    for path in candidates:
        if (path / "default.nix").is_file() and (path / "fixed-points.nix").is_file():
            return path
    return "nixpkgs' lib is not here: set NIXPKGS_LIB to a nixpkgs checkout's lib/ directory"
