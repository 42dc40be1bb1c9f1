"""dev.py, the runner without Nix: how it starts pytest and makes its environments."""

from __future__ import annotations

import importlib.util
import threading

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
dev = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dev)


def test_tests_run_one_worker_per_core_on_one_thread_each(monkeypatch):
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    args, env = dev.parallel(["-p", "no:cacheprovider", "-k", "export"])
    assert args == ["-n", "2", "--dist", "loadfile", "-p", "no:cacheprovider", "-k", "export"]
    assert env["OMP_NUM_THREADS"] == "1" and "PYTHONDONTWRITEBYTECODE" not in env


def test_a_worker_count_or_no_xdist_given_by_the_user_wins(monkeypatch):
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    for given in (["-n", "0"], ["-n4"], ["--numprocesses=3"], ["-p", "no:xdist"]):
        args, env = dev.parallel(given)
        assert args == given and env["OMP_NUM_THREADS"] == "4"
    monkeypatch.setattr(dev.os, "cpu_count", lambda: 1)
    assert dev.parallel(["-x"])[0] == ["-x"]


def test_envs_makes_them_side_by_side_and_names_each_failure(monkeypatch):
    both = threading.Barrier(2, timeout=30)  # passed only when the two run at once

    def fails():
        both.wait()
        dev.fail("`install torch` failed (see pip's message above)")

    monkeypatch.setattr(dev, "MAKERS", {"ours": both.wait, "theirs": fails})
    with pytest.raises(SystemExit) as exit_info:
        dev.envs([])
    assert exit_info.value.code == "error: theirs: `install torch` failed (see pip's message above)"

    with pytest.raises(SystemExit) as exit_info:
        dev.envs(["ours", "nightly"])
    assert exit_info.value.code == "error: nightly: choose among ours, theirs"
