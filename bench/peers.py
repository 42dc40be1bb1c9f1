#!/usr/bin/env python3
"""Ours against the real peers: LLaMA-Factory and NVIDIA's own Llama3_8B_LoRA_finetuning.py.

    python bench/peers.py fetch-nvidia --mirror DIR.git --out bench/results/peers
    python bench/peers.py run --out bench/results/peers
    python bench/peers.py run --device cuda --width 8b --layers 32 --rows 1024 --settings a  # 8B, true size

`run` builds a ~63M-parameter Llama (1024 wide, 4 layers, the tiny tokenizer with its Llama 3 chat
template) and 128 Alpaca-shaped rows, then trains one epoch of LoRA r 8 on every linear layer, seq 512, with
each implementation in its own process, interleaved, in two settings: (a) the same flags (batch 8) and (b) the
same tokens per optimizer step (8 rows of 512: ours --batch_tokens 4096, LLaMA-Factory's packed rows, NVIDIA's
script with as many padded examples as hold that many real tokens). On the CPU in float32, peak memory being the
process's peak RSS; with --device cuda in bfloat16, peak memory being torch.cuda.max_memory_allocated() in each
process, with model TFLOP/s and MFU. LLaMA-Factory runs from its own venv, or, on a machine without network, from
--llama_factory_site: a folder of its pinned packages that goes in front of this Python's own (bench/gpu_wheels.sh).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

# The peers run in the environment this process was given: importing finetune sets THP_MEM_ALLOC_ENABLE (huge
# pages for large CPU tensors, finetune/allocator.py), ours alone, which LLaMA-Factory must not inherit.
PEER_ENV = dict(os.environ)
BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO / "scripts"), str(REPO)]

import synthetic  # noqa: E402

import dev  # noqa: E402

# NVIDIA's script, at the newest commit of github.com/NVIDIA/dgx-spark-playbooks that changed it.
# Recompute the hash with: git --git-dir MIRROR show COMMIT:PATH | sha256sum
NVIDIA_COMMIT = "ba13d4dcc2ace88f356258177fe1123adafc9787"
NVIDIA_PATH = "nvidia/pytorch-fine-tune/assets/Llama3_8B_LoRA_finetuning.py"
NVIDIA_SHA256 = "b77f75dccdb2076785bf357e0927a469960341bcde2221d5387e8927de77dab2"
NVIDIA_SCRIPT = "Llama3_8B_LoRA_finetuning.py"

ROWS, SEQ_LENGTH, BATCH, ROWS_PER_STEP, LORA_RANK = 128, 512, 8, 8, 8
MODEL = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip() or "(no output)").splitlines()[-1]
        sys.exit(f"{' '.join(map(str, command[:4]))} ... failed: {tail}")
    return result


# ------------------------------------------------------------------------------------------------ setup


def fetch_nvidia(mirror: Path, out: Path) -> Path:
    """NVIDIA's script at NVIDIA_COMMIT from a local git mirror of NVIDIA/dgx-spark-playbooks, hash-checked."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / NVIDIA_SCRIPT
    text = check(["git", "--git-dir", mirror, "show", f"{NVIDIA_COMMIT}:{NVIDIA_PATH}"]).stdout
    script.write_text(text)
    if sha256(script) != NVIDIA_SHA256:
        script.unlink()
        sys.exit(f"{mirror}: {NVIDIA_PATH} at {NVIDIA_COMMIT} is not the file this benchmark was written for")
    print(f"NVIDIA's script in {script}")
    return script


# ------------------------------------------------------------------------------------------------ model, data


def model_shape(width: str, layers: int) -> dict:
    """The benchmark's ~63M model, or Llama 3.1 8B's true width (its 128,256-entry vocabulary included) with
    `layers` decoder layers."""
    if width == "bench":
        return MODEL
    import architectures

    shape = dict(architectures.ARCHITECTURES["llama-3.1-8b"], num_hidden_layers=layers)
    shape["tie_word_embeddings"] = False
    return shape


def prepare(
    out: Path, width: str = "bench", layers: int = 4, rows_count: int = ROWS, device: str = "cpu"
) -> tuple[Path, Path, dict]:
    """The model (float32 for the CPU, bfloat16 built on the GPU for CUDA), the rows (Alpaca jsonl and
    LLaMA-Factory's dataset_info.json) and, for each prompt format, what the model FLOPs are counted from."""
    import torch
    from finetune.tiny import build_tiny_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = out / ("model" if width == "bench" else f"model-{width}-L{layers}")
    model_dir = model_dir.with_name(model_dir.name + ("-bf16" if device == "cuda" else ""))
    data = out / ("data" if rows_count == ROWS else f"data-{rows_count}")
    if not (model_dir / "config.json").is_file():
        tiny = build_tiny_model(out / "tiny")
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        config = LlamaConfig.from_pretrained(tiny)
        shape = model_shape(width, layers)
        for key, value in shape.items():
            setattr(config, key, value)
        config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with torch.random.fork_rng(devices=[]), torch.device(device):  # 8B in seconds on a GPU
            torch.manual_seed(0)
            torch.set_default_dtype(dtype)
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(torch.float32)
        model.save_pretrained(model_dir)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()  # the runs need the GPU's memory, not this process
        tokenizer.save_pretrained(model_dir)
    data.mkdir(parents=True, exist_ok=True)
    rows = synthetic.generate(rows_count, seed=0)
    synthetic.write(data / "alpaca.jsonl", rows)
    (data / "alpaca.json").write_text(json.dumps(rows))
    info = {"bench_alpaca": {"file_name": "alpaca.json"}}  # LLaMA-Factory's alpaca columns are the default
    (data / "dataset_info.json").write_text(json.dumps(info))

    from types import SimpleNamespace

    from finetune.data import build_examples, load_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = SimpleNamespace(seq_length=SEQ_LENGTH, train_on_prompt=False)
    examples, stats = build_examples(load_rows(str(data / "alpaca.jsonl")), "alpaca", tokenizer, settings)
    nvidia_texts = [nvidia_text(r, tokenizer.eos_token) for r in rows]
    nvidia_lengths = [min(len(tokenizer(t)["input_ids"]), SEQ_LENGTH) for t in nvidia_texts]
    # The work each format asks for: the chat format's loss is on responses only, NVIDIA's on every token.
    work = {
        "chat": {"tokens": stats.tokens, "loss_tokens": stats.trainable_tokens, "lengths": stats.lengths},
        "nvidia": {
            "tokens": sum(nvidia_lengths),
            "loss_tokens": sum(nvidia_lengths),
            "lengths": nvidia_lengths,
        },
    }
    for counted in work.values():
        counted["attention_pairs"] = sum(n * (n + 1) // 2 for n in counted.pop("lengths"))
    return model_dir, data, work


def nvidia_text(row: dict, eos: str) -> str:
    """NVIDIA's script's own prompt (ALPACA_PROMPT_TEMPLATE), to count the tokens it trains on."""
    return (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        f"Write a response that appropriately completes the request.\n### Instruction: {row['instruction']}\n\n"
        f"### Input: {row['input']}\n\n### Response: {row['output']}{eos}"
    )


# ------------------------------------------------------------------------------------------------ runs


# With --device cuda every process reports its own peak GPU memory on the way out: this folder goes first on
# PYTHONPATH, so its sitecustomize is imported at start-up; it then runs the one it shadows, if the Python has
# one. A process that never used CUDA, like the one that waits for the run, prints nothing.
CUDA_PEAK_PROBE = """
import atexit, importlib.util, os, sys

def report_cuda_peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        print("PEAK_CUDA_BYTES", torch.cuda.max_memory_allocated(), file=sys.stderr, flush=True)

atexit.register(report_cuda_peak)
here = os.path.dirname(os.path.abspath(__file__))
for entry in sys.path:
    shadowed = os.path.join(entry or os.getcwd(), "sitecustomize.py")
    if os.path.abspath(entry or os.getcwd()) != here and os.path.isfile(shadowed):
        spec = importlib.util.spec_from_file_location("shadowed_sitecustomize", shadowed)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        break
"""


def with_path(env: dict, *folders: Path) -> dict:
    """`env` with `folders` in front of its PYTHONPATH."""
    paths = [str(f) for f in folders] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def measured(
    command: list, cwd: Path, env: dict | None = None, timeout: float | None = None
) -> tuple[str, int]:
    """Run `command` in a fresh process under this one; (its output, its peak memory in bytes: the GPU's where
    it reported one, else its peak RSS). Past `timeout` seconds its whole process group is killed and
    TimeoutError raised."""
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(r.returncode)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", probe, *map(str, command)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise TimeoutError(f"{command[0]} ... did not finish within {timeout:.0f} s") from None
    if process.returncode != 0:
        sys.exit(f"{command[0]} ... failed:\n{stderr[-3000:]}")
    cuda = [int(n) for n in re.findall(r"PEAK_CUDA_BYTES (\d+)", stderr)]
    peak = max(cuda) if cuda else int(re.search(r"PEAK_RSS_KB (\d+)", stderr).group(1)) * 1024
    return stdout + stderr, peak


class Runner:
    """How each implementation is started on this machine: the device, its dtype, the environments."""

    def __init__(self, out: Path, device: str, llama_factory_python: Path, llama_factory_site: Path | None):
        self.out = out
        self.dtype = "bfloat16" if device == "cuda" else "float32"
        self.llama_factory_python, self.llama_factory_site = llama_factory_python, llama_factory_site
        self.probe = None
        if device == "cuda":
            self.probe = out / "cuda-peak-probe"
            self.probe.mkdir(exist_ok=True)
            (self.probe / "sitecustomize.py").write_text(CUDA_PEAK_PROBE)

    def env(self, base: dict, *folders: Path | None) -> dict:
        return with_path(base, *(f for f in (*folders, self.probe) if f))

    def ours(self, model: Path, data: Path, extra: list) -> dict:
        target = self.out / "ours"
        command = [sys.executable, REPO / "scripts" / "llama3_8b_lora.py", "--model_name", model]
        command += ["--dataset", data / "alpaca.jsonl", "--output_dir", target, "--overwrite_output_dir"]
        command += ["--dtype", self.dtype, "--seq_length", SEQ_LENGTH, "--num_epochs", 1, "--eval_split", 0]
        command += ["--lora_rank", LORA_RANK, "--save_steps", 100000, "--logging_steps", 1, *extra]
        _, peak = measured(command, self.out, self.env(dict(os.environ)))  # with what finetune set
        metrics = json.loads((target / "metrics.json").read_text())
        return {"seconds": metrics["wall_time_seconds"], "tokens": metrics["train_tokens"], "peak": peak,
                "loss": metrics["train_loss"]}  # fmt: skip

    def llama_factory(self, model: Path, data: Path, tokens: int, checkpointing: bool = True) -> dict:
        target = self.out / "llama-factory"
        settings = {
            "model_name_or_path": str(model), "trust_remote_code": False, "stage": "sft", "do_train": True,
            "finetuning_type": "lora", "lora_rank": LORA_RANK, "lora_target": "all", "dataset": "bench_alpaca",
            "dataset_dir": str(data), "template": "llama3", "cutoff_len": SEQ_LENGTH, "packing": True,
            "neat_packing": True, "overwrite_cache": True, "preprocessing_num_workers": 1,
            "dataloader_num_workers": 0, "output_dir": str(target), "overwrite_output_dir": True,
            "logging_steps": 1, "save_strategy": "no", "per_device_train_batch_size": BATCH,
            "gradient_accumulation_steps": 1, "learning_rate": 1.0e-4, "num_train_epochs": 1.0,
            "lr_scheduler_type": "linear", "bf16": self.dtype == "bfloat16", "report_to": "none", "seed": 42,
            "disable_gradient_checkpointing": not checkpointing,  # on by default: less memory, ~1/3 more compute
        }  # fmt: skip
        import yaml

        config = self.out / "llama-factory.yaml"  # llamafactory-cli reads .json configs wrongly in 0.9.5
        config.write_text(yaml.safe_dump(settings))
        command = [self.llama_factory_python, "-c", LLAMA_FACTORY_CLI, "train", config]
        env = {**PEER_ENV, "DISABLE_VERSION_CHECK": "1", "HF_HUB_OFFLINE": "1"}
        _, peak = measured(command, self.out, self.env(env, self.llama_factory_site))
        result = json.loads((target / "train_results.json").read_text())
        return {"seconds": result["train_runtime"], "tokens": tokens, "peak": peak,
                "loss": result["train_loss"]}  # fmt: skip

    def nvidia(self, script: Path, data: Path, model: Path, batch: int, tokens: int, rows: int, timeout):
        command = [sys.executable, "-c", NVIDIA_RUNNER, data / "alpaca.jsonl", script, "--model_name", model]
        command += ["--dtype", self.dtype, "--batch_size", batch, "--seq_length", SEQ_LENGTH]
        command += ["--num_epochs", 1, "--dataset_size", rows, "--lora_rank", LORA_RANK]
        command += ["--log_dir", self.out / "nvidia-logs"]
        # Its torch.compile recompiles for every new padded length; on the CPU that is slow.
        try:
            output, peak = measured(command, self.out, self.env(PEER_ENV), timeout=timeout)
        except TimeoutError:
            return {"timeout": timeout}
        seconds = float(re.search(r"Training runtime: ([\d.]+)", output).group(1))
        loss = float(re.search(r"Train loss: ([\d.]+)", output).group(1))
        return {"seconds": seconds, "tokens": tokens, "peak": peak, "loss": loss}


# llamafactory-cli, started from a given Python: its venv's, or this one with --llama_factory_site in front.
LLAMA_FACTORY_CLI = (
    "import sys; from llamafactory.cli import main; sys.argv[0] = 'llamafactory-cli'; sys.exit(main())"
)

# Runs NVIDIA's script unchanged, with load_dataset("tatsu-lab/alpaca") answered from the local rows and, without
# a GPU, SFTConfig told to use the CPU in float32 (TRL's configs default to bf16 and refuse the CPU otherwise).
NVIDIA_RUNNER = """
import runpy, sys, datasets, torch, trl
if not torch.cuda.is_available():
    class CPUConfig(trl.SFTConfig):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{"use_cpu": True, "bf16": False, **kwargs})
    trl.SFTConfig = CPUConfig
rows = sys.argv.pop(1)
load = datasets.load_dataset
datasets.load_dataset = lambda name, *a, **k: (
    datasets.Dataset.from_json(rows) if name == "tatsu-lab/alpaca" else load(name, *a, **k))
sys.argv[0] = sys.argv[1]; del sys.argv[1]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def row(name: str, result: dict, flops: float | None = None, peak_flops: float | None = None) -> str:
    """A table row; with `flops` (the run's model FLOPs), its model TFLOP/s, and with `peak_flops`, its MFU."""
    if "timeout" in result:
        cells = f"did not finish within {result['timeout']:.0f} s (compile, warm-up and epoch) | | |"
        return f"| {name} | {cells}{' | |' if flops else ''} |"
    cells = [
        name,
        f"{result['seconds']:.0f} s",
        f"{result['tokens'] / result['seconds']:.0f}",
        f"{result['peak'] / 2**30:.2f} GiB",
        f"{result['loss']:.3f}",
    ]
    if flops:
        tflops = flops / result["seconds"] / 1e12
        cells += [f"{tflops:.0f}", f"{100 * tflops * 1e12 / peak_flops:.1f}%" if peak_flops else "–"]
    return "| " + " | ".join(cells) + " |"


def median_result(results: list[dict]) -> dict:
    """Each figure's median over repeated runs (a run that timed out stands for all)."""
    timed_out = [r for r in results if "timeout" in r]
    if timed_out:
        return timed_out[0]
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def cuda_flops(model: Path, work: dict) -> tuple[dict, float | None]:
    """The model FLOPs of each prompt format's work (architectures.step_flops), and this GPU's bf16 peak."""
    import architectures
    import torch
    from transformers import AutoConfig

    counts = architectures.parameter_counts(AutoConfig.from_pretrained(model), LORA_RANK)
    flops = {name: architectures.step_flops(counts, "lora", **counted) for name, counted in work.items()}
    return flops, architectures.bf16_peak(torch.cuda.get_device_name())


def table(
    settings: dict, result: dict, memory: str, flops: dict | None, peak_flops, nvidia: bool
) -> list[str]:
    """The markdown table: a section per setting; with `flops`, model TFLOP/s and MFU columns."""
    extra = (" model TFLOP/s | MFU |", " ---: | ---: |", " | |") if flops else ("", "", "")
    lines = [
        f"| run | time for the epoch | real tokens/s | {memory} | final train loss |{extra[0]}",
        f"| --- | ---: | ---: | ---: | ---: |{extra[1]}",
    ]
    chat, nvidia_flops = (flops["chat"], flops["nvidia"]) if flops else (None, None)
    for key, (title, ours_flags, nvidia_batch) in settings.items():
        lines.append(f"| **({key}) {title}** | | | | |{extra[2]}")
        lines.append(row(f"ours `{' '.join(map(str, ours_flags))}`", result[key, "ours"], chat, peak_flops))
        lf = "`packing` + `neat_packing`, batch 8" + (
            ", `disable_gradient_checkpointing`" if key == "b" else ""
        )
        lines.append(row(f"LLaMA-Factory 0.9.5, {lf}", result[key, "llama-factory"], chat, peak_flops))
        if nvidia:
            name = f"NVIDIA's script, `--batch_size {nvidia_batch}`"
            lines.append(row(name, result[key, "nvidia"], nvidia_flops, peak_flops))
    return lines


def run(args) -> None:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.llama_factory_site:
        lf_python, lf_site = Path(sys.executable), args.llama_factory_site.resolve()
        if not (lf_site / "llamafactory").is_dir():
            sys.exit(
                f"--llama_factory_site {lf_site}: no llamafactory package in it (see bench/gpu_wheels.sh)"
            )
    else:
        lf_python, lf_site = dev.llama_factory_env(args.venv.resolve()), None
    script = (args.nvidia_script or out / NVIDIA_SCRIPT).resolve()
    nvidia = not args.skip_nvidia and script.is_file()
    if nvidia and sha256(script) != NVIDIA_SHA256:
        sys.exit(f"{script}: not {NVIDIA_PATH} at {NVIDIA_COMMIT} (its sha256 differs); see fetch-nvidia")
    runner = Runner(out, args.device, lf_python, lf_site)
    model, data, work = prepare(out, args.width, args.layers, args.rows, args.device)
    chat_tokens, nvidia_tokens = work["chat"]["tokens"], work["nvidia"]["tokens"]
    nvidia_same_tokens = round(ROWS_PER_STEP * SEQ_LENGTH / (nvidia_tokens / args.rows))
    settings = {
        "a": ("same flags (batch 8)", ["--batch_size", BATCH], BATCH),
        "b": (
            f"same tokens per step ({ROWS_PER_STEP} x {SEQ_LENGTH})",
            ["--batch_tokens", ROWS_PER_STEP * SEQ_LENGTH],
            nvidia_same_tokens,
        ),
    }
    settings = {key: value for key, value in settings.items() if key in args.settings}
    runs: dict[tuple[str, str], list[dict]] = {}

    def record(key: str, name: str, result: dict) -> None:
        runs.setdefault((key, name), []).append(result)
        print(f"({key}) {name}: {json.dumps(result)}", flush=True)  # in the log even if the table never comes

    for _ in range(args.repeats):  # interleaved: ours, LLaMA-Factory, NVIDIA, in each setting
        for key, (_, ours_flags, nvidia_batch) in settings.items():
            record(key, "ours", runner.ours(model, data, ours_flags))
            # Its packed rows of 512, 8 per step, are both settings at once: its default (gradient
            # checkpointing on) runs in (a), without checkpointing, its fastest, in (b).
            record(
                key, "llama-factory", runner.llama_factory(model, data, chat_tokens, checkpointing=key == "a")
            )
            if nvidia:
                nvidia_run = runner.nvidia(
                    script, data, model, nvidia_batch, nvidia_tokens, args.rows, args.nvidia_timeout
                )
                record(key, "nvidia", nvidia_run)
    result = {name: median_result(values) for name, values in runs.items()}

    flops, peak_flops = cuda_flops(model, work) if args.device == "cuda" else (None, None)
    lines = table(settings, result, "peak GPU memory" if flops else "peak RSS", flops, peak_flops, nvidia)
    name = "peers" if args.width == "bench" else f"peers-{args.width}-L{args.layers}"
    name += "-cuda" if args.device == "cuda" else ""
    (out / f"{name}.json").write_text(json.dumps({"/".join(k): v for k, v in runs.items()}, indent=2))
    repeats = f", medians of {args.repeats} interleaved runs each" if args.repeats > 1 else ""
    print(f"{model.name}: {args.rows} rows, {chat_tokens:,} tokens in the chat format{repeats}")
    print("\n".join(lines))


def setting_list(text: str) -> list[str]:
    settings = text.split(",")
    if not settings or not set(settings) <= {"a", "b"}:
        raise argparse.ArgumentTypeError(f"{text!r}: give a, b or a,b")
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch-nvidia", help="copy NVIDIA's script from a git mirror, hash-checked")
    fetch.add_argument(
        "--mirror", type=Path, required=True, help="git directory of NVIDIA/dgx-spark-playbooks"
    )
    fetch.add_argument("--out", type=Path, default=BENCH / "results" / "peers")
    bench = commands.add_parser("run", help="the table: ours, LLaMA-Factory and NVIDIA's script, interleaved")
    bench.add_argument(
        "--venv",
        type=Path,
        default=dev.LLAMA_FACTORY_ENV,
        help="LLaMA-Factory's environment, made (or reused) as dev.py makes it (default: %(default)s)",
    )
    bench.add_argument("--out", type=Path, default=BENCH / "results" / "peers")
    bench.add_argument(
        "--width",
        choices=("bench", "8b"),
        default="bench",
        help="the ~63M model, or Llama 3.1 8B's true width",
    )
    bench.add_argument("--layers", type=int, default=1, help="decoder layers at --width 8b")
    bench.add_argument("--rows", type=int, default=ROWS, help="Alpaca-shaped rows: one epoch of them")
    bench.add_argument("--skip_nvidia", action="store_true", help="leave NVIDIA's script out")
    bench.add_argument(
        "--nvidia_script", type=Path, default=None, help=f"NVIDIA's script (default: OUT/{NVIDIA_SCRIPT})"
    )
    bench.add_argument("--repeats", type=int, default=1, help="rounds of the interleaved runs; medians")
    bench.add_argument(
        "--nvidia_timeout",
        type=float,
        default=1800,
        help="seconds NVIDIA's script may take, compile included",
    )
    bench.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cpu: float32; cuda: bfloat16, with MFU"
    )
    bench.add_argument(
        "--settings",
        type=setting_list,
        default=["a", "b"],
        help="a (same flags), b (same tokens per step), or a,b (default)",
    )
    bench.add_argument(
        "--llama_factory_site",
        type=Path,
        default=None,
        help="a folder of LLaMA-Factory's packages to put in front of this Python's, instead of --venv",
    )
    args = parser.parse_args(argv)
    if args.command == "fetch-nvidia":
        fetch_nvidia(args.mirror, args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
