"""Direct Preference Optimization: LoRA trained on pairs of answers, the preferred one first.

The starting point is an instruct model, or what a run of the SFT scripts produced (see sources.py): its LoRA
adapter goes on training, or a merged / fully fine-tuned model gets a new one. The reference model DPO measures
the policy against is that starting point, frozen: the base with the new adapter switched off, or a copy of the
SFT adapter (TRL keeps it as a second adapter, so no second model is loaded).

Rows, detected from the columns:
    {"prompt": "...", "chosen": "...", "rejected": "..."}          strings, or lists of role/content messages
    {"chosen": [messages], "rejected": [messages]}                  conversations whose common start is the prompt
    {"conversations": [{"from": "human", "value": "..."}], "chosen": ..., "rejected": ...}      sharegpt style

Pairs are rendered with the chat template exactly like the SFT data (data.render), tokenized here, and handed to
TRL's DPOTrainer already tokenized; the trainer's loop is the shared one (train.run_training).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import set_seed

from .config import DEFAULT_DATASET_ROWS, TrainConfig, option
from .data import SHAREGPT_ROLES, DataStats, PreparedData, Row, detect_format, prepare_data, render
from .errors import UserError
from .model import Placement, is_prequantized, load_base, load_model
from .playbook import plan_then_train
from .sources import ModelSource, base_config, check_adapter_fits, load_tokenizer_for, resolve
from .train import MeasuredTrainer, run_training, training_arguments

DEFAULT_PREFERENCE_DATASET = "trl-lib/ultrafeedback_binarized"
PREFERENCE_FORMATS = ("auto", "preference", "sharegpt")
# Columns that identify each format, in detection order ("prompt" is optional in the preference format).
FORMAT_COLUMNS = {"sharegpt": ("conversations", "chosen", "rejected"), "preference": ("chosen", "rejected")}
REWARD_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of an adapter it goes on training


@dataclass
class DPOConfig(TrainConfig):
    dataset_formats = PREFERENCE_FORMATS  # not a field: what config.validate accepts for --dataset_format

    model_name: str = option(
        "where DPO starts: hub id or directory of an instruct (or merged) model, a LoRA adapter, or an SFT "
        "run's --output_dir",
        default="",
    )
    dataset: str = option(
        "hub dataset id, or a local .jsonl/.json/.parquet/.csv file or directory of preference pairs "
        f"(default: the first {DEFAULT_DATASET_ROWS} rows of {DEFAULT_PREFERENCE_DATASET})",
        default="",
    )
    dataset_format: str = option(
        "preference (prompt/chosen/rejected, or chosen/rejected conversations) or sharegpt "
        "(conversations/chosen/rejected); auto detects it from the columns",
        default="auto",
    )
    # A pair is two sequences with a common prompt, and only the answers are scored: no packing, no prompt loss.
    packing: bool = field(default=False, metadata={"flag": False})
    batch_tokens: int = field(default=0, metadata={"flag": False})
    train_on_prompt: bool = field(default=False, metadata={"flag": False})

    beta: float = option(
        "DPO's beta: how strongly the policy is held to the reference model (higher = closer)", default=0.1
    )
    base_model: str = option(
        "base model of a LoRA adapter given as --model_name (default: the one in its adapter_config.json)",
        default="",
    )

    def validate(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise UserError(f"--beta {self.beta!r}: must be a positive number")
        if not self.uses_lora:
            raise UserError(f"DPO trains a LoRA adapter; method {self.method!r} is not lora or qlora")
        if self.shard:
            raise UserError("--shard: DPO runs data-parallel (each rank holds the whole model); drop --shard")


# ---------------------------------------------------------------------------------------------------- data


detect_preference_format = functools.partial(
    detect_format,
    formats=FORMAT_COLUMNS,
    unknown="not preference data (columns: {found}); DPO needs prompt/chosen/rejected (strings or message lists), "
    "chosen/rejected conversations, or sharegpt-style conversations/chosen/rejected",
)


def _messages(row: Row, key: str, role: str) -> list[dict]:
    """A column as messages: a string is one message from `role`; role/content and sharegpt turns both work."""
    value = row.values.get(key)
    if value is None:
        raise UserError(f"{row.where}: missing column {key!r}")
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(f"{row.where}: column {key!r} should be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
            out.append({"role": m["role"], "content": m["content"]})
        elif isinstance(m, dict) and m.get("from") in SHAREGPT_ROLES and isinstance(m.get("value"), str):
            out.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        else:
            raise UserError(
                f"{row.where}: {key!r} message {i} needs string 'role' and 'content' (or sharegpt 'from' and 'value')"
            )
    return out


def to_pair(row: Row, fmt: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) as messages."""
    chosen, rejected = _messages(row, "chosen", "assistant"), _messages(row, "rejected", "assistant")
    if fmt == "sharegpt":
        prompt = _messages(row, "conversations", "user")
    elif row.values.get("prompt") is not None:
        prompt = _messages(row, "prompt", "user")
        # Some datasets repeat the prompt at the start of each answer.
        chosen, rejected = (a[len(prompt) :] if a[: len(prompt)] == prompt else a for a in (chosen, rejected))
    else:  # two whole conversations: the prompt is what they share
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise UserError(
                f"{row.where}: without a 'prompt' column, 'chosen' and 'rejected' must be conversations "
                "that start with the same prompt"
            )
    if prompt[-1]["role"] == "assistant":
        raise UserError(f"{row.where}: the prompt should end with a user message, not the assistant's")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer and answer[0]["role"] != "assistant":
            raise UserError(f"{row.where}: {name!r} should be the assistant's answer")
    return prompt, chosen, rejected


def _encode(tokenizer, prompt: list[dict], answer: list[dict], where: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt and of the answer that follows it."""
    text, spans = render(tokenizer, prompt + answer)
    before = sum(m["role"] == "assistant" for m in prompt)
    if spans is None or len(spans) <= before:
        raise UserError(f"{where}: cannot find the answer in the chat template's output")
    start = spans[before][0]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    cut = next((i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > start), len(ids))
    return ids[:cut], ids[cut:]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def build_pairs(rows: list[Row], fmt: str, tokenizer, seq_length: int) -> tuple[list[dict], DataStats]:
    stats = DataStats(format=fmt, rows=len(rows))
    pairs = []
    for row in rows:
        prompt, chosen, rejected = to_pair(row, fmt)
        if chosen == rejected or not chosen or not rejected:
            stats.dropped += 1  # nothing to prefer
            continue
        prompt_c, chosen_ids = _encode(tokenizer, prompt, chosen, row.where)
        prompt_r, rejected_ids = _encode(tokenizer, prompt, rejected, row.where)
        # A token straddling the prompt's end can differ between the two: it belongs to the answers then.
        n = _common_prefix(prompt_c, prompt_r)
        prompt_ids, chosen_ids, rejected_ids = (
            prompt_c[:n],
            prompt_c[n:] + chosen_ids,
            prompt_r[n:] + rejected_ids,
        )
        if len(prompt_ids) >= seq_length:
            stats.dropped += 1
            continue
        room = seq_length - len(prompt_ids)
        if len(chosen_ids) > room or len(rejected_ids) > room:
            stats.truncated += 1
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        pairs.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
        stats.tokens += 2 * len(prompt_ids) + len(chosen_ids) + len(rejected_ids)
        stats.trainable_tokens += len(chosen_ids) + len(rejected_ids)
        # A batch holds each pair as two rows padded to the longer one: the plan's memory estimate counts that.
        stats.lengths.append(2 * (len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))))
    return pairs, stats


def _pairs_or_error(rows, fmt, tokenizer, cfg, source, what):
    pairs, stats = build_pairs(rows, fmt, tokenizer, cfg.seq_length)
    if not pairs:
        raise UserError(
            f"{source}: no {what} pair is left ({stats.rows} rows; {stats.dropped} have identical answers or a "
            f"prompt longer than --seq_length {cfg.seq_length})"
        )
    return pairs, stats


def prepare_preferences(cfg: DPOConfig, tokenizer) -> PreparedData:
    return prepare_data(
        cfg,
        tokenizer,
        default_dataset=DEFAULT_PREFERENCE_DATASET,
        detect=detect_preference_format,
        build=_pairs_or_error,
    )


# ---------------------------------------------------------------------------------------------------- model


def load_policy(cfg: DPOConfig, source: ModelSource, model_config, place: Placement):
    """The model DPO trains: a new LoRA adapter on the base, or the given adapter, trainable."""
    base_cfg = dataclasses.replace(cfg, model_name=source.base)
    if source.adapter is None:
        return load_model(base_cfg, model_config, place)

    from peft import PeftModel

    model = load_base(cfg, model_config, place, source.base, "--base_model")
    model = PeftModel.from_pretrained(model, str(source.adapter), is_trainable=True)
    model.config.use_cache = False
    return model


def _save_trained_adapter_only(model) -> None:
    """Checkpoints and final/ hold the adapter being trained, not TRL's frozen reference copy of it."""
    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        return
    model.save_pretrained = functools.partial(
        type(model).save_pretrained, model, selected_adapters=["default"]
    )


# ---------------------------------------------------------------------------------------------------- training


def dpo_arguments(cfg: DPOConfig, place: Placement, out: Path):
    """TRL's DPOConfig: the shared TrainingArguments plus DPO's settings, only those the installed TRL has."""
    import trl

    base = training_arguments(cfg, place, out)
    accepted = {f.name for f in dataclasses.fields(trl.DPOConfig) if f.init}
    values = {
        f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init and f.name in accepted
    }
    dpo = {
        "beta": cfg.beta,
        "loss_type": ["sigmoid"],
        "max_length": cfg.seq_length,
        "truncation_mode": "keep_start",
        "precompute_ref_log_probs": False,
        "padding_free": False,
        "dataset_num_proc": None,
        # Evaluation needs the loss and TRL's reward statistics, not the logits of every eval batch.
        "prediction_loss_only": True,
        # TRL's Liger DPO loss refuses PEFT models (trl 0.29) and is deprecated (trl 1.x).
        "use_liger_kernel": False,
    }
    values.update({k: v for k, v in dpo.items() if k in accepted})
    return trl.DPOConfig(**values)


def _last_logged(history: list[dict], key: str) -> dict:
    return next((entry for entry in reversed(history) if key in entry), {})


@functools.cache
def trainer_class() -> type:
    import trl

    class DPOPlaybookTrainer(MeasuredTrainer, trl.DPOTrainer):
        def count_tokens(self, inputs: dict) -> tuple[int, int]:
            mask = inputs["attention_mask"]  # chosen rows, then rejected rows
            return int(mask.sum()), int(mask.shape[0]) // 2

        def extra_eval_metrics(self, eval_metrics: dict) -> dict:
            # TRL logs its reward statistics rather than returning them (trl 0.29 does not return them at all).
            logged = {**_last_logged(self.state.log_history, "eval_rewards/accuracies"), **eval_metrics}
            trained = _last_logged(self.state.log_history, "rewards/accuracies")
            extra = {"eval_perplexity": None}  # exp(DPO loss) is no perplexity
            for key in REWARD_METRICS:
                if f"eval_{key}" in logged:
                    extra[f"eval_{key}"] = logged[f"eval_{key}"]
                if key in trained:
                    extra[f"train_{key}"] = trained[key]
            return extra

        def _prepare_dataset(self, dataset, *args, **kwargs):
            # The pairs arrive tokenized (build_pairs renders them like the SFT data); TRL would tokenize again.
            if "prompt_ids" in (dataset.column_names or ()):
                return dataset
            return super()._prepare_dataset(dataset, *args, **kwargs)

    return DPOPlaybookTrainer


def train(
    cfg: DPOConfig, source: ModelSource, tokenizer, data: PreparedData, place, resume_from, plan
) -> dict:
    from datasets import Dataset

    if place.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    set_seed(cfg.seed)  # before the adapter is created: its initial weights come from the global RNG
    model = load_policy(cfg, source, plan["model_config"], place)
    trainer = trainer_class()(
        model=model,
        args=dpo_arguments(cfg, place, Path(cfg.output_dir).expanduser()),
        train_dataset=Dataset.from_list(data.train),
        eval_dataset=Dataset.from_list(data.eval) if data.eval else None,
        processing_class=tokenizer,
    )
    _save_trained_adapter_only(trainer.accelerator.unwrap_model(trainer.model))
    return run_training(trainer, cfg, tokenizer, place, resume_from, plan)


def _plan_lines(cfg: DPOConfig, source: ModelSource) -> str:
    if source.adapter is None:
        policy = f"a new LoRA adapter on {source.base}"
        reference = "the same model with the adapter switched off"
    else:
        policy = f"the adapter {source.adapter} (its own rank and targets; --lora_* do not apply), on {source.base}"
        reference = "a frozen copy of that adapter"
    return f"policy           {policy}\nreference        {reference}\nbeta             {cfg.beta}"


def _reward_lines(metrics: dict) -> str:
    def fmt(key):
        value = metrics.get(key)
        return "-" if value is None else f"{value:.4f}"

    return (
        f"reward accuracy  {fmt('eval_rewards/accuracies')} eval, {fmt('train_rewards/accuracies')} train (last steps)\n"
        f"reward margin    {fmt('eval_rewards/margins')} eval, {fmt('train_rewards/margins')} train (last steps)"
    )


def run(cfg: DPOConfig) -> dict | None:
    source = resolve(cfg.model_name, flag="--model_name", base_model=cfg.base_model)
    model_config = base_config(source, "--model_name")
    if source.adapter is not None:
        check_adapter_fits(source, model_config, "--model_name")
    if source.run_method == "qlora" or is_prequantized(model_config):
        cfg.method = "qlora"  # train on a 4-bit base, like the adapter was
    tokenizer = load_tokenizer_for(source, "--model_name")
    data = prepare_preferences(cfg, tokenizer)

    def notes(metrics: dict | None) -> str:
        return _plan_lines(cfg, source) if metrics is None else _reward_lines(metrics)

    return plan_then_train(
        cfg,
        model_config,
        data,
        lambda place, resume_from, plan: train(cfg, source, tokenizer, data, place, resume_from, plan),
        notes,
    )
