#!/usr/bin/env bash
# The GPU checks of the open issues, most important first, in one run on a CUDA machine without network
# (its own CUDA torch; the rest from bench/gpu_wheels.sh's .whl). Each step has a time limit, so a slow
# step cannot starve the next; everything is logged under $OUT (default /tmp/gpu-checks).
#   1. The CUDA stack: torch sees the GPU, bitsandbytes loads its CUDA kernels, one QLoRA step at 8B width.
#   2. 8B LoRA at its true size, ours against NVIDIA's approach (bench/run.py): tokens/s, MFU, peak memory.
#   3. The sharded path (--shard, FSDP2 over NCCL) on one GPU: llama3_70b_lora.py at 70B width, 2 layers.
# On the device tool: carry [".whl"], command `bash bench/gpu_checks.sh`, timeout 600.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  for wheel in .whl/*.whl; do python3 -m zipfile -e "$wheel" /tmp/site; done  # a wheel is a zip of its files
  export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
CACHE=$OUT/cache
step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  echo "== $name: exit ${PIPESTATUS[0]}"
}
model() {  # model ARCHITECTURE LAYERS -> a random bf16 model at that width, built once
  python3 -c "import sys; sys.path[:0] = ['bench', 'scripts']; from pathlib import Path; import architectures; \
print(architectures.build_model(Path('$CACHE'), '$1', $2, 'bfloat16'))" | tail -n 1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
step 60 stack python3 -c "
import torch, bitsandbytes, transformers, peft, trl
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('bitsandbytes', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)
w = torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16)
q, state = bitsandbytes.functional.quantize_4bit(w, quant_type='nf4')
err = (bitsandbytes.functional.dequantize_4bit(q, state) - w).abs().mean().item()
print('nf4 round trip on cuda: mean abs error', round(err, 4)); assert err < 0.1
"
QLORA_MODEL=$(model llama-3.1-8b 2)
step 150 qlora-8b-width python3 scripts/llama3_70b_qlora.py --model_name "$QLORA_MODEL" --dataset tests/data/alpaca.jsonl \
  --output_dir "$OUT/qlora" --overwrite_output_dir --max_steps 3 --seq_length 512 --batch_size 2 --force
step 330 lora-8b-true-size python3 bench/run.py --configs 8b-lora --seq_length 2048 --batch_size 8 --steps 8 \
  --warmup_steps 2 --repeats 1 --impls ours,baseline --cache "$CACHE" --out "$OUT/bench"
SHARD_MODEL=$(model llama-3.1-70b 2)
step 150 sharded-70b-width torchrun --nproc_per_node 1 scripts/llama3_70b_lora.py --model_name "$SHARD_MODEL" \
  --dataset tests/data/alpaca.jsonl --output_dir "$OUT/sharded" --overwrite_output_dir --max_steps 4 \
  --seq_length 1024 --batch_size 2 --force
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for run in ("qlora", "sharded"):
    metrics = out / run / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        print(run, f"{m['tokens_per_second']:.0f} tokens/s", f"peak {m['peak_memory_bytes'] / 2**30:.1f} GiB",
              f"loss {m['initial_train_loss']:.3f} -> {m['train_loss']:.3f}")
PY
