#!/usr/bin/env python3
"""LoRA fine-tuning of Llama 3.1 8B Instruct (the DGX Spark playbook's defaults).

python llama3_8b_lora.py --dataset data.jsonl --output_dir out/8b-lora
python llama3_8b_lora.py --model_name /models/Llama-3.1-8B-Instruct --dataset data.jsonl   # offline
"""

from finetune.playbook import main

DEFAULTS = {
    "method": "lora",
    "model_name": "meta-llama/Llama-3.1-8B-Instruct",
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,
    "target_modules": "all-linear",
    "learning_rate": 1e-4,
    "batch_size": 8,
    "seq_length": 2048,
    "num_epochs": 1.0,
    "gradient_checkpointing": False,
    "output_dir": "outputs/llama3-8b-lora",
}

if __name__ == "__main__":
    main(prog="llama3_8b_lora.py", description=__doc__.splitlines()[0], defaults=DEFAULTS)
