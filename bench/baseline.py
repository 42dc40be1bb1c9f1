"""The baseline: the approach of NVIDIA's DGX Spark playbook scripts, rewritten for the benchmark.

A plain TRL `SFTTrainer` on Alpaca-prompt text, without packing, padded to the longest row of each batch
(dynamic padding), with the loss on every token of the sequence. What their scripts add on top (a
`torch.compile` of the model and a throw-away warm-up run) is left out: the benchmark skips warm-up steps
anyway, so the baseline is, if anything, favoured. The model, LoRA adapters, dtype, batch size, sequence length,
learning rate and data are the same as in our run: the model comes from the same loader.
"""

from __future__ import annotations

import dataclasses


def alpaca_texts(cfg, tokenizer) -> list[str]:
    """The rows ours trains on, rendered with the Alpaca prompt as the reference scripts format them (the
    tokenizer adds BOS, and TRL EOS when it is missing)."""
    from finetune.data import load_splits, render, to_example

    splits = load_splits(cfg)
    texts = [render(tokenizer, to_example(row, splits.format))[0] for row in splits.train]
    return [text.removeprefix(tokenizer.bos_token or "") for text in texts]


def sft_config(cfg, place, output_dir: str):
    """An SFTConfig built from the fields the installed TRL has (trl 0.25 and 1.x differ)."""
    from trl import SFTConfig

    wanted = {
        "output_dir": output_dir,
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "max_steps": cfg.max_steps,
        "num_train_epochs": cfg.num_epochs,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "no",
        "report_to": [],
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "bf16": place.mixed_precision == "bf16",
        "fp16": place.mixed_precision == "fp16",
        "use_cpu": place.device == "cpu",
        "gradient_checkpointing": False,  # set on the model by the shared loader when asked for
        "dataloader_num_workers": 0,
        "max_length": cfg.seq_length,
        "packing": False,
        "padding_free": False,
        "dataset_text_field": "text",
        "completion_only_loss": False,
        "assistant_only_loss": False,
        "use_liger_kernel": False,
        "disable_tqdm": True,
    }
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    return SFTConfig(**{k: v for k, v in wanted.items() if k in fields})


def baseline_trainer(trainer_mixins: tuple, cfg, model, tokenizer, place, output_dir: str):
    """The TRL trainer with the benchmark's measuring mixins in front of it."""
    from datasets import Dataset
    from trl import SFTTrainer

    trainer_class = type("BaselineTrainer", (*trainer_mixins, SFTTrainer), {})
    dataset = Dataset.from_list([{"text": t} for t in alpaca_texts(cfg, tokenizer)])
    return trainer_class(
        model=model,
        args=sft_config(cfg, place, output_dir),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
