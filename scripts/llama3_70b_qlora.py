#!/usr/bin/env python3
"""QLoRA fine-tuning of Llama 3.1 70B Instruct: 4-bit NF4 base, bf16 compute, LoRA on every linear layer.

python llama3_70b_qlora.py --dataset data.jsonl --output_dir out/70b-qlora
python llama3_70b_qlora.py --model_name unsloth/Meta-Llama-3.1-70B-Instruct-bnb-4bit   # pre-quantized
"""

from finetune.playbook import main

DEFAULTS = {
    "method": "qlora",
    "model_name": "meta-llama/Llama-3.1-70B-Instruct",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
    "learning_rate": 1e-4,
    "batch_size": 8,
    "seq_length": 2048,
    "num_epochs": 1.0,
    "gradient_checkpointing": True,
    "output_dir": "outputs/llama3-70b-qlora",
}

if __name__ == "__main__":
    main(prog="llama3_70b_qlora.py", description=__doc__.splitlines()[0], defaults=DEFAULTS)
