"""Before and after: the same prompts through two models side by side, and a model's loss on held-out data.

generate  prompts (from the command line or a file) through the base and the fine-tuned model: with --adapter
          the base is the same weights with the adapter switched off, with --baseline another model (the base
          of a merged one, say). Greedy by default, so two runs print the same text.
eval      loss and perplexity on a dataset in any format the SFT scripts read, tokenized and masked the same way
          (responses only), written as JSON; with an adapter, the base's numbers too.
"""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from .data import IGNORE_INDEX, Collator, build_examples, detect_format, load_rows, render, to_example
from .errors import UserError
from .model import is_prequantized
from .report import write_json_atomic
from .sources import (
    ModelSource,
    base_config,
    check_adapter_fits,
    inference_placement,
    load_causal_lm,
    load_tokenizer_for,
    resolve,
    with_adapter,
)


def model_source(model: str, adapter: str = "") -> ModelSource:
    return with_adapter(model, adapter) if adapter else resolve(model, flag="--model")


def load(source: ModelSource, dtype: str = "auto", adapter_flag: str = "--adapter"):
    """The model on the best device with its adapter attached (not merged, so it can be switched off)."""
    device, torch_dtype = inference_placement(dtype)
    config = base_config(source, "--model", "--model")
    kwargs = {"dtype": torch_dtype}
    if is_prequantized(config):
        kwargs["device_map"] = {"": device}
    model = load_causal_lm(source.base, "--model", **kwargs)
    if not is_prequantized(config):
        model.to(device)
    if source.adapter is not None:
        from peft import PeftModel

        check_adapter_fits(source, config, adapter_flag, "--model")
        model = PeftModel.from_pretrained(model, str(source.adapter))
    model.eval()
    return model


def _adapter_off(model, off: bool):
    return model.disable_adapter() if off else nullcontext()


# ---------------------------------------------------------------------------------------------------- generate


def read_prompts(prompts: list[str], prompts_file: str) -> list[list[dict]]:
    """Each prompt as a conversation that ends with the user's turn."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if path.suffix == ".txt":
            if not path.is_file():
                raise UserError(f"--prompts {prompts_file}: no such file")
            lines = path.read_text(encoding="utf-8").splitlines()
            conversations += [[{"role": "user", "content": line.strip()}] for line in lines if line.strip()]
        else:
            rows = load_rows(prompts_file, flag="--prompts")
            fmt = None if rows and "prompt" in rows[0].values else detect_format(rows, "auto", prompts_file)
            for row in rows:
                prompt = row.values.get("prompt")
                if fmt is None:  # preference pairs, or any {"prompt": ...} rows
                    if not isinstance(prompt, str):
                        raise UserError(f"{row.where}: 'prompt' should be a string")
                    conversations.append([{"role": "user", "content": prompt}])
                    continue
                example = to_example(row, fmt)
                if isinstance(example, str):
                    conversations.append([{"role": "user", "content": example}])
                    continue
                last = max(i for i, m in enumerate(example) if m["role"] == "assistant")
                conversations.append(example[:last])
    if not conversations:
        raise UserError("no prompts: pass --prompt TEXT or --prompts FILE")
    return conversations


def prompt_text(tokenizer, conversation: list[dict]) -> str:
    """The conversation rendered as training rendered it, up to where the assistant's answer begins."""
    text, spans = render(tokenizer, [*conversation, {"role": "assistant", "content": ""}])
    return text[: spans[-1][0]] if spans else text


def _stop_ids(model, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    return list(dict.fromkeys([*ids, tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids))


@torch.no_grad()
def generate_one(model, tokenizer, text: str, *, max_new_tokens: int, temperature: float, seed: int) -> str:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=None,
        top_k=None,
        eos_token_id=_stop_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    if temperature > 0:
        torch.manual_seed(seed)
    output = model.generate(**inputs, generation_config=config)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def side_by_side(texts: dict[str, str], width: int) -> str:
    """Columns, one per model, wrapped to the terminal's width."""
    names = list(texts)
    column = max(20, (width - 3 * (len(names) - 1)) // len(names))
    wrapped = {
        n: [
            line
            for paragraph in (texts[n] or "(nothing)").splitlines()
            for line in textwrap.wrap(paragraph, column) or [""]
        ]
        for n in names
    }
    # A long name keeps its end (the run's own directory, "(base)"), not the start every column shares.
    heads = [n if len(n) <= column else "…" + n[-(column - 1) :] for n in names]
    rows = [" | ".join(f"{h:<{column}}" for h in heads), "-+-".join("-" * column for _ in names)]
    for i in range(max(len(lines) for lines in wrapped.values())):
        rows.append(" | ".join(f"{(wrapped[n][i] if i < len(wrapped[n]) else ''):<{column}}" for n in names))
    return "\n".join(line.rstrip() for line in rows)


def generate(
    model: str,
    *,
    adapter: str = "",
    baseline: str = "",
    prompts: list[str] = (),
    prompts_file: str = "",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    dtype: str = "auto",
    output: str = "",
) -> list[dict]:
    if adapter and baseline:
        raise UserError("--adapter and --baseline both name what to compare with; give one of them")
    conversations = read_prompts(list(prompts), prompts_file)
    source = model_source(model, adapter)
    flag = "--adapter" if adapter else "--model"
    tokenizer = load_tokenizer_for(source, flag)
    main = load(source, dtype, flag)
    # (column name, model, whether the adapter is switched off)
    columns = (
        [(f"{source.base} (base)", main, True), (f"+ {source.adapter}", main, False)]
        if source.adapter
        else []
    )
    if baseline:
        other = resolve(baseline, flag="--baseline")
        columns = [(baseline, load(other, dtype, "--baseline"), False), (model, main, False)]
    if not columns:
        columns = [(source.describe, main, False)]

    width = shutil.get_terminal_size(fallback=(120, 24)).columns
    results = []
    for number, conversation in enumerate(conversations, start=1):
        text = prompt_text(tokenizer, conversation)
        outputs = {}
        for name, lm, off in columns:
            with _adapter_off(lm, off):
                outputs[name] = generate_one(
                    lm, tokenizer, text, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
                )
        results.append({"prompt": conversation[-1]["content"], "messages": conversation, "outputs": outputs})
        print(f"=== {number}/{len(conversations)}: {conversation[-1]['content']}", flush=True)
        print(side_by_side(outputs, width) + "\n", flush=True)
    if output:
        target = Path(output).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8"
        )
        print(f"written to {target}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- eval


@torch.no_grad()
def _mean_loss(model, batches: list[dict], adapter_off: bool) -> tuple[float, int]:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with _adapter_off(model, adapter_off):
        for batch in batches:
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.float()
            labels = batch["labels"].to(device)[:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            count += int((labels != IGNORE_INDEX).sum())
    return total / count, count


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def evaluate(
    model: str,
    dataset: str,
    *,
    adapter: str = "",
    dataset_format: str = "auto",
    dataset_size: int | None = None,
    seq_length: int = 2048,
    batch_size: int = 8,
    train_on_prompt: bool = False,
    dtype: str = "auto",
    output: str = "",
) -> dict:
    if seq_length < 2 or batch_size < 1:
        raise UserError("--seq_length must be at least 2 and --batch_size at least 1")
    source = model_source(model, adapter)
    flag = "--adapter" if adapter else "--model"
    tokenizer = load_tokenizer_for(source, flag)
    rows = load_rows(dataset, limit=dataset_size)
    fmt = detect_format(rows, dataset_format, dataset)
    settings = SimpleNamespace(seq_length=seq_length, train_on_prompt=train_on_prompt)
    examples, stats = build_examples(rows, fmt, tokenizer, settings)
    if not examples:
        raise UserError(f"{dataset}: no example has a response token within --seq_length {seq_length}")
    collate = Collator(tokenizer.pad_token_id, packing=False)
    batches = [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    lm = load(source, dtype, flag)
    loss, tokens = _mean_loss(lm, batches, adapter_off=False)
    result = {
        "model": source.base,
        "adapter": str(source.adapter) if source.adapter else None,
        "dataset": dataset,
        "format": fmt,
        "examples": len(examples),
        "loss_tokens": tokens,
        "loss": loss,
        "perplexity": _perplexity(loss),
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "seq_length": seq_length,
        "train_on_prompt": train_on_prompt,
        "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
    }
    if source.adapter is not None:
        base_loss, _ = _mean_loss(lm, batches, adapter_off=True)
        result.update(base_loss=base_loss, base_perplexity=_perplexity(base_loss))
    if output:
        write_json_atomic(Path(output).expanduser(), result)
    print(json.dumps(result, indent=2), flush=True)
    return result
