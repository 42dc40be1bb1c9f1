"""NeMo AutoModel's recipe parts on the CPU, offline: what can be checked without a GPU.

    python cpu_check.py --examples DIR --model DIR --work DIR

The full recipe cannot run on the CPU (its setup calls torch.cuda), so this takes it apart:
  1. imports the fine-tuning recipe;
  2. parses NVIDIA's three playbook commands (LoRA, QLoRA, full SFT) with their --key value overrides;
  3. writes a local SQuAD-shaped dataset (train.jsonl, validation.jsonl) and builds it through the LoRA
     recipe's own `dataset` section, pointed there by the same kind of override;
  4. loads the tiny Llama through the recipe's `model` section and applies its `peft` section's LoRA. The
     section's target, NeMoAutoModelForCausalLM.from_pretrained, asks torch.cuda for the device first, so
     here it is overridden to the transformers loader it wraps;
  5. takes two optimizer steps on one batch from the recipe's dataloader, loss and optimizer.
Prints one JSON line with what it found; exits non-zero with one line on the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# NVIDIA's "Fine-tune with NeMo" playbook commands: the LoRA one as written there; the QLoRA one (a 70B
# model, TransformerEngine's cross-entropy) and the full SFT one as that playbook describes them.
COMMANDS = {
    "lora": [
        "-c",
        "examples/llm_finetune/llama3_2/llama3_2_1b_squad_peft.yaml",
        "--model.pretrained_model_name_or_path",
        "meta-llama/Llama-3.1-8B",
        "--packed_sequence.packed_sequence_size",
        "1024",
        "--step_scheduler.max_steps",
        "20",
    ],
    "qlora": [
        "-c",
        "examples/llm_finetune/llama3_1/llama3_1_8b_squad_qlora.yaml",
        "--model.pretrained_model_name_or_path",
        "meta-llama/Llama-3.1-70B",
        "--loss_fn._target_",
        "nemo_automodel.components.loss.te_parallel_ce.TEParallelCrossEntropy",
    ],
    "full": ["-c", "examples/llm_finetune/qwen/qwen3_8b_squad_spark.yaml"],
}

# A few SQuAD-shaped rows (the columns rajpurkar/squad has), enough for a batch.
PASSAGE = "The Amazon rainforest covers much of the Amazon basin of South America, about seven million km2."
QUESTIONS = [
    ("Which basin does the rainforest cover?", "the Amazon basin"),
    ("On which continent is the Amazon basin?", "South America"),
    ("How large is the basin?", "about seven million km2"),
    ("What covers much of the basin?", "The Amazon rainforest"),
]


def fail(message: str) -> None:
    print(f"cpu_check: {message}", file=sys.stderr)
    raise SystemExit(1)


def write_squad(directory: Path, copies: int = 2) -> Path:
    """train.jsonl and validation.jsonl with SQuAD's columns: `load_dataset(directory)` finds both splits."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (question, answer) in enumerate(QUESTIONS * copies):
        start = PASSAGE.index(answer)
        rows.append(
            {
                "id": f"local-{i}",
                "title": "Amazon_rainforest",
                "context": PASSAGE,
                "question": question,
                "answers": {"text": [answer], "answer_start": [start]},
            }
        )
    for split in ("train", "validation"):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


def parse(examples: Path, argv: list[str]):
    from nemo_automodel.components.config._arg_parser import parse_args_and_load_config

    # NVIDIA's commands run from /opt/Automodel; the config path is relative to its examples/.
    argv = list(argv)
    argv[1] = str(examples.parent / argv[1])
    if not Path(argv[1]).is_file():
        fail(f"{argv[1]}: no such recipe in the examples directory")
    return parse_args_and_load_config(argv=argv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, required=True, help="Automodel's examples/ directory")
    parser.add_argument(
        "--model", type=Path, required=True, help="a tiny Llama (python -m finetune.tiny DIR)"
    )
    parser.add_argument("--work", type=Path, required=True, help="a scratch directory")
    args = parser.parse_args()

    import torch
    from nemo_automodel.recipes.llm.train_ft import TrainFinetuneRecipeForNextTokenPrediction  # noqa: F401
    from transformers import AutoTokenizer

    report: dict = {}

    # 2. NVIDIA's three commands, parsed as the recipe parses them.
    configs = {name: parse(args.examples, argv) for name, argv in COMMANDS.items()}
    report["parsed"] = {
        name: {
            "recipe": cfg.get("recipe", None),
            "model": cfg.get("model.pretrained_model_name_or_path", None),
            "max_steps": cfg.get("step_scheduler.max_steps", None),
            "packed_sequence_size": cfg.get("packed_sequence.packed_sequence_size", None),
            "loss_fn": cfg.get("loss_fn._target_", None),
            "peft": cfg.get("peft", None) is not None,
            "quantization": cfg.get("quantization", None) is not None,
            "dataset": cfg.get("dataset.dataset_name", None),
        }
        for name, cfg in configs.items()
    }

    # 3.-5. The LoRA command, pointed at local files with overrides a user would pass. use_triton: the
    # LoRA Triton kernel needs a GPU; lr: large enough that two steps on one batch show.
    squad = write_squad(args.work / "squad")
    local = COMMANDS["lora"] + [
        "--model._target_",
        "transformers.AutoModelForCausalLM.from_pretrained",
        "--model.pretrained_model_name_or_path",
        str(args.model),
        "--dataset.dataset_name",
        str(squad),
        "--validation_dataset.dataset_name",
        str(squad),
        "--peft.use_triton",
        "False",
        "--optimizer.lr",
        "0.01",
    ]
    cfg = parse(args.examples, local)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(cfg.get("model.pretrained_model_name_or_path"))
    dataset = cfg.dataset.instantiate(tokenizer=tokenizer)
    validation = cfg.validation_dataset.instantiate(tokenizer=tokenizer)
    report["dataset"] = {"train": len(dataset), "validation": len(validation)}
    first = dataset[0]
    supervised = sum(label != -100 for label in first["labels"])
    if not 0 < supervised < len(first["labels"]):
        fail(f"the SQuAD rows tokenised to {supervised} answer tokens of {len(first['labels'])}")

    model = cfg.model.instantiate(dtype=torch.float32)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    peft_config = cfg.peft.instantiate()
    from nemo_automodel.components._peft.lora import apply_lora_to_linear_modules

    patched = apply_lora_to_linear_modules(model, peft_config)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    report["lora"] = {"modules": patched, "trainable": sorted(trainable)[:2], "count": len(trainable)}
    if patched == 0 or not trainable or not all("lora" in name for name in trainable):
        fail(f"LoRA patched {patched} modules; trainable parameters: {sorted(trainable)[:4]}")

    loader = cfg.dataloader.instantiate(dataset=dataset, batch_size=4)
    batch = next(iter(loader))
    labels = batch.pop("labels")
    batch = {key: value for key, value in batch.items() if key in ("input_ids", "attention_mask")}
    loss_fn = cfg.loss_fn.instantiate()
    optimizer = cfg.optimizer.instantiate(params=list(trainable.values()))
    before = {name: p.detach().clone() for name, p in trainable.items()}

    def loss() -> torch.Tensor:
        logits = model(**batch).logits
        # MaskedCrossEntropy sums over the answer tokens; the recipe divides by their count.
        num = int((labels != -100).sum())
        return loss_fn(logits=logits, labels=labels, num_label_tokens=num)

    losses = []
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    with torch.no_grad():
        losses.append(float(loss()))
    report["losses"] = losses
    report["lora_changed"] = all(not torch.equal(before[n], p) for n, p in trainable.items())
    report["base_unchanged"] = all(
        torch.equal(base[n], p) for n, p in model.named_parameters() if n in base and not p.requires_grad
    )
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
