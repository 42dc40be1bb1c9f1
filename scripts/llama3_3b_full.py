#!/usr/bin/env python3
"""Full fine-tuning of Llama 3.2 3B Instruct (the DGX Spark playbook's defaults).

python llama3_3b_full.py --dataset data.jsonl --output_dir out/3b-full
"""

from finetune.playbook import main

# What differs from TrainConfig's defaults, which are the DGX Spark playbook's (see finetune/config.py).
DEFAULTS = {
    "method": "full",
    "model_name": "meta-llama/Llama-3.2-3B-Instruct",
    "learning_rate": 5e-5,
    "output_dir": "outputs/llama3-3b-full",
}

if __name__ == "__main__":
    main(prog="llama3_3b_full.py", description=__doc__.splitlines()[0], defaults=DEFAULTS)
