#!/usr/bin/env python3
"""LoRA fine-tuning of Llama 3.1 8B Instruct (the DGX Spark playbook's defaults).

python llama3_8b_lora.py --dataset data.jsonl --output_dir out/8b-lora
python llama3_8b_lora.py --model_name /models/Llama-3.1-8B-Instruct --dataset data.jsonl   # offline
"""

from finetune.playbook import main

# What differs from TrainConfig's defaults, which are the DGX Spark playbook's (see finetune/config.py).
DEFAULTS = {
    "method": "lora",
    "model_name": "meta-llama/Llama-3.1-8B-Instruct",
    "output_dir": "outputs/llama3-8b-lora",
}

if __name__ == "__main__":
    main(prog="llama3_8b_lora.py", description=__doc__.splitlines()[0], defaults=DEFAULTS)
