"""The linters, as part of the suite: `python3 dev.py test` is the one command that checks everything."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PATHS = ["dev.py", "scripts", "tests", "bench"]


def ruff() -> list[str]:
    # The ruff of this interpreter's environment first: the pinned one, not whatever is on PATH.
    beside = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if beside is None:
        pytest.skip("ruff is not installed here (it comes with the test extra: pip install -e '.[test]')")
    return [beside]


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(check):
    result = subprocess.run([*ruff(), *check, *PATHS], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_script_without_its_packages_names_the_setup_command():
    # -S: no site-packages, as on a fresh machine with nothing installed.
    result = subprocess.run(
        [sys.executable, "-S", str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "python3 dev.py demo" in result.stderr, result.stderr
