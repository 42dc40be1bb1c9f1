"""Tests for the tiny offline model builder and for the small datasets under tests/data."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune.errors import UserError
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DATA = Path(__file__).resolve().parent / "data"

EXPECTED_DATA = {
    "alpaca.jsonl": (48, {"instruction", "input", "output"}),
    "messages.jsonl": (24, {"messages"}),
    "sharegpt.jsonl": (16, {"conversations"}),
    "text.jsonl": (16, {"text"}),
    "preference.jsonl": (24, {"prompt", "chosen", "rejected"}),
}


def _cli(*args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "finetune.tiny", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run_cli(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
    proc = _cli(*args)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.fixture(scope="module")
def tiny():
    return importlib.import_module("finetune.tiny")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    # Two independent processes, run concurrently to save time.
    base = tmp_path_factory.mktemp("tiny")
    dirs = [base / "a", base / "b"]
    procs = [_cli(d) for d in dirs]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "parameters" in out
    return dirs[0], dirs[1]


@pytest.fixture(scope="module")
def tokenizer(built):
    return AutoTokenizer.from_pretrained(built[0])


def test_builds_are_byte_identical(built):
    a, b = built
    snap_a, snap_b = _snapshot(a), _snapshot(b)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(snap_a)
    assert snap_a.keys() == snap_b.keys()
    for name in snap_a:
        assert snap_a[name] == snap_b[name], f"{name} differs between builds"


def test_rebuild_in_process_replaces_own_output(built, tiny):
    a, b = built
    assert tiny.build_tiny_model(a) == a
    assert _snapshot(a) == _snapshot(b)
    # Nothing left behind from the staging and swap directories.
    assert sorted(p.name for p in a.parent.iterdir()) == ["a", "b"]


def test_model_loads_and_generates(built, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(built[0])
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert 100_000 <= model.num_parameters() <= 1_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id is None
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    inputs = tokenizer("What is the capital of France?", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[0] == 1
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 5


def test_tokenizer_special_tokens(tokenizer, tiny):
    assert tokenizer.eos_token == "<|eot_id|>"
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.pad_token is None
    assert tokenizer.pad_token_id is None
    for token in tiny.SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert 900 <= len(tokenizer) <= 1100


def test_tokenizer_round_trips_test_data(tokenizer):
    texts = [s for name in EXPECTED_DATA for row in _rows(name) for s in _strings(row)]
    texts.append("Unicode survives: café, naïve, 東京, 😀 and  double  spaces\ttabs\n\nnewlines.")
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_prefix_property(tokenizer):
    assert tokenizer.chat_template
    checked = 0
    for row in _rows("messages.jsonl"):
        messages = row["messages"]
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            assert full.startswith(prompt)
            assert full[len(prompt) :] == message["content"].strip() + "<|eot_id|>"
            # Also holds at token level, so assistant spans can be found on ids as well as on text.
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids
            assert full_ids[0] == tokenizer.bos_token_id
            assert full_ids[1] != tokenizer.bos_token_id
            assert full_ids[-1] == tokenizer.eos_token_id
            checked += 1
    assert checked >= 24


def test_cli_refuses_foreign_directory(tmp_path, tiny):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me\n", encoding="utf-8")
    code, out, err = _run_cli(foreign)
    assert code != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert str(foreign) in err
    assert out == ""
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    a_file = tmp_path / "file.txt"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(UserError):
        tiny.build_tiny_model(a_file)


@pytest.mark.parametrize("name", sorted(EXPECTED_DATA))
def test_data_files_are_well_formed(name):
    raw = (DATA / name).read_bytes()
    text = raw.decode("utf-8")
    assert text.endswith("\n")
    assert not text.endswith("\n\n")
    assert "\r" not in text
    count, keys = EXPECTED_DATA[name]
    rows = _rows(name)
    assert len(rows) == count
    for row in rows:
        assert set(row) == keys
        assert all(isinstance(s, str) for s in _strings(row))
        if name == "messages.jsonl":
            roles = [m["role"] for m in row["messages"]]
            assert all(set(m) == {"role", "content"} and m["content"].strip() for m in row["messages"])
            assert set(roles) <= {"system", "user", "assistant"}
            assert roles[-1] == "assistant"
            assert roles.count("system") <= 1
            assert roles[0] in {"system", "user"}
        elif name == "sharegpt.jsonl":
            turns = row["conversations"]
            assert all(set(t) == {"from", "value"} and t["value"].strip() for t in turns)
            assert {t["from"] for t in turns} <= {"system", "human", "gpt"}
            assert turns[-1]["from"] == "gpt"
        elif name == "alpaca.jsonl":
            assert row["instruction"].strip()
            assert row["output"].strip()
        elif name == "preference.jsonl":
            assert row["chosen"] != row["rejected"]
        else:
            assert row["text"].strip()
