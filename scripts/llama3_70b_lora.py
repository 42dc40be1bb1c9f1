#!/usr/bin/env python3
"""LoRA fine-tuning of Llama 3.1 70B Instruct in bf16, every weight sharded across the ranks (FSDP2).

torchrun --nproc_per_node 2 llama3_70b_lora.py --dataset data.jsonl --output_dir out/70b-lora   # two GPUs
torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
    llama3_70b_lora.py --dataset data.jsonl                                              # two DGX Sparks
"""

from finetune.playbook import main

# What differs from TrainConfig's defaults (see finetune/config.py): NVIDIA's Llama3_70B_LoRA_finetuning.py.
DEFAULTS = {
    "method": "lora",
    "model_name": "meta-llama/Llama-3.1-70B-Instruct",
    "shard": True,
    "gradient_checkpointing": True,
    "batch_size": 4,
    "dataset_size": 500,
    "output_dir": "outputs/llama3-70b-lora",
}

if __name__ == "__main__":
    main(prog="llama3_70b_lora.py", description=__doc__.splitlines()[0], defaults=DEFAULTS)
