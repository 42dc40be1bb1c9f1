#!/usr/bin/env python3
"""QLoRA fine-tuning of Llama 3.1 70B Instruct: 4-bit NF4 base, bf16 compute, LoRA on every linear layer.

python llama3_70b_qlora.py --dataset data.jsonl --output_dir out/70b-qlora
python llama3_70b_qlora.py --model_name unsloth/Meta-Llama-3.1-70B-Instruct-bnb-4bit   # pre-quantized
"""

from finetune.playbook import main

# What differs from TrainConfig's defaults, which are the DGX Spark playbook's (see finetune/config.py).
DEFAULTS = {
    "method": "qlora",
    "model_name": "meta-llama/Llama-3.1-70B-Instruct",
    "gradient_checkpointing": True,
    "output_dir": "outputs/llama3-70b-qlora",
}

if __name__ == "__main__":
    main(prog="llama3_70b_qlora.py", description=__doc__.splitlines()[0], defaults=DEFAULTS)
