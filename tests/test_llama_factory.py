"""The LLaMA-Factory playbook without Nix: NVIDIA's train/chat/export commands, the web UI (served, then opened
in headless Chromium), and a LLaMA-Factory adapter going through our export.py and evaluate.py.

LLaMA-Factory 0.9.5 pins older datasets/accelerate/trl than this project, so it runs from an environment of its
own, `.venv-llama-factory` (git-ignored), which `dev.llama_factory_env` makes on first use (or `python3 dev.py envs
llama-factory` beforehand) and reuses while its pins are unchanged. Without network access to make it, the tests
skip with one line (LLM_FINETUNE_REQUIRE_LLAMA_FACTORY=1 makes that a failure, for CI). Our own scripts run in the
interpreter running the tests.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, offline_env

pytestmark = pytest.mark.llama_factory

PLAYBOOK = ROOT / "playbooks" / "llama-factory"
VENV = ROOT / ".venv-llama-factory"

# NVIDIA's DGX Spark playbook commands, as written, and the key=value overrides that put them on the tiny
# model on the CPU: the same file the flake's smoke checks read.
SMOKE = json.loads((PLAYBOOK / "smoke.json").read_text())


def on_tiny_model(model: Path) -> list[str]:
    return [arg.replace("{model}", str(model)) for arg in SMOKE["model"]]


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


def _load_dev():
    """The repository's dev.py (it is no package), which makes LLaMA-Factory's environment."""
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def lf_venv() -> Path:
    dev = _load_dev()
    started = time.monotonic()
    try:
        dev.llama_factory_env(VENV)
    except SystemExit as exc:
        message = f"{VENV.name}: {exc.code}"
        if os.environ.get("LLM_FINETUNE_REQUIRE_LLAMA_FACTORY"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    print(f"\n{VENV.name} ready in {time.monotonic() - started:.0f} s")
    return VENV


@pytest.fixture(scope="session")
def lf_home(tmp_path_factory, lf_venv) -> dict:
    """A working directory with LLaMA-Factory's data/ and examples/, as `llamafactory-init` leaves it."""
    work = tmp_path_factory.mktemp("llama-factory")
    for name in ("data", "examples"):
        shutil.copytree(lf_venv / "share" / "llama-factory" / name, work / name)
    env = offline_env(work)
    env.update(
        PATH=f"{lf_venv / 'bin'}{os.pathsep}{env['PATH']}",
        GRADIO_ANALYTICS_ENABLED="False",
        # The web UI calls webbrowser.open on start; `true` makes that a no-op.
        BROWSER="true",
    )
    env.pop("DISABLE_VERSION_CHECK", None)  # its pins are met, so its start-up check must pass
    return {"dir": work, "env": env, "cli": str(lf_venv / "bin" / "llamafactory-cli")}


def llamafactory(lf_home: dict, *args, stdin: str | None = None, timeout: int = 600):
    result = _run(
        [lf_home["cli"], *args], cwd=lf_home["dir"], env=lf_home["env"], input=stdin, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(
            f"llamafactory-cli {args[0]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="session")
def lf_adapter(lf_home, tiny_model) -> Path:
    """NVIDIA's `llamafactory-cli train examples/train_lora/qwen3_lora_sft.yaml`, on the tiny model."""
    llamafactory(lf_home, "train", *SMOKE["train"], *SMOKE["trainOverrides"], *on_tiny_model(tiny_model))
    return lf_home["dir"] / SMOKE["adapter"]


def test_train_command_trains_a_lora_adapter(lf_adapter, tiny_model):
    assert (lf_adapter / "adapter_model.safetensors").is_file()
    config = json.loads((lf_adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model) and config["r"] == 8
    logged = [json.loads(line) for line in (lf_adapter / "trainer_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == 16, logged  # max_steps=16, logging_steps=1
    assert sum(losses[-4:]) / 4 < losses[0] - 0.1, losses


def test_chat_command_answers_with_the_adapter(lf_home, lf_adapter, tiny_model):
    result = llamafactory(
        lf_home, "chat", *SMOKE["chat"], *SMOKE["chatOverrides"], *on_tiny_model(tiny_model),
        stdin="Who are you?\nexit\n",
    )  # fmt: skip
    assert "Welcome to the CLI application" in result.stdout
    answer = result.stdout.split("Assistant:", 1)[1].split("User:", 1)[0]
    assert answer.strip(), result.stdout


def test_export_command_merges_the_adapter(lf_home, lf_adapter, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llamafactory(lf_home, "export", *SMOKE["export"], *on_tiny_model(tiny_model))
    merged_dir = lf_home["dir"] / SMOKE["merged"]
    assert (merged_dir / "Modelfile").is_file() and (merged_dir / "tokenizer.json").is_file()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), lf_adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = adapted(ids).logits
        assert not torch.allclose(base(ids).logits, expected, atol=1e-4), "the adapter changed nothing"
        # export_dir is bf16 by default in LLaMA-Factory (the base's dtype is float32 here, so it stays so).
        assert torch.allclose(merged(ids).logits, expected, atol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui(lf_home):
    """`llamafactory-cli webui` on 127.0.0.1 and a free port, shared by the tests below (the last one stops it
    by its PID); stopped afterwards in any case."""
    port = _free_port()
    env = dict(lf_home["env"], GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
    log = (lf_home["dir"] / f"webui-{port}.log").open("w")
    process = subprocess.Popen(
        [lf_home["cli"], "webui"], cwd=lf_home["dir"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    page = None
    deadline = time.monotonic() + 180
    while page is None and process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                page = (response.status, response.read().decode())
        except OSError:
            time.sleep(1)
    try:
        if page is None:
            log.flush()
            tail = (lf_home["dir"] / f"webui-{port}.log").read_text()[-3000:]
            pytest.fail(f"the web UI did not serve {url} (exit {process.poll()}):\n{tail}", pytrace=False)
        yield {"url": url, "page": page, "pid": process.pid, "process": process}
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def _webdriver(base: str, path: str, payload: dict | None = None, method: str = "POST"):
    """One W3C WebDriver command to chromedriver (its HTTP API; no Selenium needed)."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(
        base + path, data=data, method=method if payload is not None else "GET",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["value"]


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium session driven through chromedriver; yields a function running WebDriver commands."""
    port = _free_port()
    driver = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _webdriver(base, "/status")["ready"]:
                    break
            except OSError:
                if time.monotonic() > deadline or driver.poll() is not None:
                    pytest.fail(f"chromedriver did not start on port {port}", pytrace=False)
                time.sleep(0.2)
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1440,2000",
        ]  # fmt: skip
        options = {"binary": CHROMIUM, "args": flags}
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        session = _webdriver(base, "/session", {"capabilities": capabilities})["sessionId"]
        try:
            yield lambda path, payload=None: _webdriver(base, f"/session/{session}{path}", payload)
        finally:
            _webdriver(base, f"/session/{session}", {}, method="DELETE")
    finally:
        driver.terminate()
        driver.wait(timeout=30)


@pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver (Debian/Ubuntu: apt-get install -y chromium chromium-driver)",
)
def test_webui_shows_the_training_controls_in_a_browser(webui, browser, tmp_path):
    browser("/url", {"url": webui["url"]})
    # The served HTML is an empty shell; the page's JavaScript builds the controls from the server's config.
    script = {
        "script": "return [document.body.innerText,"
        " [...document.querySelectorAll('button')].map(b => b.innerText.trim())]",
        "args": [],
    }
    text, buttons = "", []
    deadline = time.monotonic() + 120
    while "Learning rate" not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        text, buttons = browser("/execute/sync", script)
    for control in ("Learning rate", "Epochs", "Max samples", "Output dir", "Train", "Export"):
        assert control in text, f"the page lacks {control!r}; it shows:\n{text[:2000]}"
    assert {"Preview command", "Start", "Abort"} <= set(buttons), buttons

    screenshot = tmp_path / "llama-factory-webui.png"
    screenshot.write_bytes(base64.b64decode(browser("/screenshot")))
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nscreenshot of the web UI: {screenshot}")


def test_webui_serves_its_page_and_stops_by_pid(webui):
    status, html = webui["page"]
    assert status == 200 and "gradio" in html.lower()
    os.kill(webui["pid"], signal.SIGTERM)
    assert webui["process"].wait(timeout=30) is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(webui["url"], timeout=5)


def _main(cli, capsys, *argv) -> str:
    """One of our entry points in this process (as the project's own tests call them); its stdout."""
    try:
        cli.main([str(a) for a in argv])
    except SystemExit as exc:
        captured = capsys.readouterr()
        raise AssertionError(f"{argv[0]} exited {exc.code}: {captured.err[-2000:]}") from None
    return capsys.readouterr().out


def test_llama_factory_adapter_goes_through_our_export_and_evaluate(
    lf_home, lf_adapter, tiny_model, tmp_path, capsys
):
    """An adapter trained by `llamafactory-cli train` is a PEFT adapter our export.py and evaluate.py take as it is,
    in the project's own environment."""
    import evaluate as evaluate_cli
    import export as export_cli

    merged, gguf, modelfile = tmp_path / "merged", tmp_path / "model.gguf", tmp_path / "Modelfile"
    # merge finds the base in adapter_config.json, and checks the merged logits against base + adapter.
    _main(export_cli, capsys, "merge", "--adapter", lf_adapter, "--output_dir", merged)
    assert (merged / "model.safetensors").is_file()
    _main(export_cli, capsys, "gguf", "--model", merged, "--outfile", gguf, "--outtype", "f16")
    assert gguf.read_bytes()[:4] == b"GGUF"
    _main(export_cli, capsys, "ollama", "--gguf", gguf, "--model", merged, "--outfile", modelfile)
    assert modelfile.read_text().startswith("FROM ./model.gguf\n") and "<|eot_id|>" in modelfile.read_text()

    answers = _main(
        evaluate_cli, capsys, "generate", "--model", lf_adapter, "--prompt", "Name a primary colour.",
        "--max_new_tokens", "8",
    )  # fmt: skip
    assert "(base)" in answers and "Name a primary colour." in answers
    # On rows LLaMA-Factory trained on (its alpaca_en_demo, first max_samples rows), our evaluation sees the
    # adapter beat its base.
    report = tmp_path / "eval.json"
    _main(
        evaluate_cli, capsys, "eval", "--model", lf_adapter, "--dataset", lf_home["dir"] / "data" / "alpaca_en_demo.json",
        "--dataset_size", "32", "--seq_length", "128", "--output", report,
    )  # fmt: skip
    metrics = json.loads(report.read_text())
    assert metrics["model"] == str(tiny_model) and metrics["examples"] == 32, metrics
    assert metrics["loss"] < metrics["base_loss"] - 0.05, metrics
