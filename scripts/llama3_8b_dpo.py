#!/usr/bin/env python3
"""DPO preference tuning with LoRA on Llama 3.1 8B Instruct, or on the output of an SFT run.

python llama3_8b_dpo.py --dataset pairs.jsonl --output_dir out/8b-dpo
python llama3_8b_dpo.py --model_name out/8b-lora --dataset pairs.jsonl   # go on from an SFT run's adapter
"""

from finetune.dpo import DPOConfig, run
from finetune.playbook import main

# What differs from DPOConfig's defaults (TrainConfig's, which are the DGX Spark playbook's, plus beta).
DEFAULTS = {
    "model_name": "meta-llama/Llama-3.1-8B-Instruct",
    "learning_rate": 5e-5,
    # Each pair is two sequences (and a reference pass): half the SFT batch, accumulated to the same 8 pairs.
    "batch_size": 4,
    "gradient_accumulation_steps": 2,
    "output_dir": "outputs/llama3-8b-dpo",
}

if __name__ == "__main__":
    main(
        prog="llama3_8b_dpo.py",
        description=__doc__.splitlines()[0],
        defaults=DEFAULTS,
        config_class=DPOConfig,
        runner=run,
    )
