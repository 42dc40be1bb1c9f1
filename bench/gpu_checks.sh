#!/usr/bin/env bash
# The GPU checks of the open issues, most important first, in one run on a CUDA machine without network
# (its own CUDA torch; the rest from bench/gpu_wheels.sh's .whl). Each step has a time limit, so a slow
# step cannot starve the next, and a step that would end past DEADLINE seconds (default 570, inside a 600 s
# command) is skipped and named, to run in the next call. The logs go to $OUT (default /tmp/gpu-checks), the
# models and runs to /tmp.
#   stack    the CUDA stack: torch sees the GPU, bitsandbytes loads its CUDA kernels; one QLoRA step at 8B width.
#   peers    8B LoRA at its true size, ours against LLaMA-Factory and NVIDIA's own script (bench/peers.py):
#            tokens/s, peak GPU memory, MFU.
#   sharded  the sharded path (--shard, FSDP2 over NCCL) on one GPU: llama3_70b_lora.py at 70B width, 2 layers.
#   steady   8B LoRA at its true size, ours against NVIDIA's approach and against ours with the fused layers and
#            chunked loss the playbooks use on the CPU only, one process each, warm-up steps left out (bench/run.py):
#            steady-state tokens/s, MFU and peak memory.
# On the device tool: carry [".whl"], command `bash bench/gpu_checks.sh [STEP...]` (default: all, in this
# order), timeout 600.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
DEADLINE=${DEADLINE:-570}
CACHE=/tmp/gpu-checks-cache RUNS=/tmp/gpu-checks-runs
mkdir -p "$OUT" "$CACHE" "$RUNS"
unpack_wheels() {  # unpack_wheels WHEELS_DIR TARGET: a wheel is a zip of its files
  compgen -G "$1/*.whl" >/dev/null || return 1
  for wheel in "$1"/*.whl; do python3 -m zipfile -e "$wheel" "$2"; done
}
unpack_wheels .whl /tmp/site && export PYTHONPATH=/tmp/site
unpack_wheels .whl/llama-factory /tmp/site-lf
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
fits() {  # fits SECONDS NAME: whether a step of at most SECONDS ends before DEADLINE; else it is named
  (($SECONDS + $1 <= DEADLINE)) && return
  echo "== $2: skipped, its ${1}s would end past the ${DEADLINE}s deadline; run \`bash $0 $2\` next"
  return 1
}
run_step() {  # run_step SECONDS NAME COMMAND...
  local limit=$1 name=$2
  shift 2
  echo "== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  echo "== $name: exit ${PIPESTATUS[0]}"
}
model() {  # model ARCHITECTURE LAYERS -> a random bf16 model at that width, built once
  timeout 120 python3 -c "import sys; sys.path[:0] = ['bench', 'scripts']; from pathlib import Path; import architectures; \
print(architectures.build_model(Path('$CACHE'), '$1', $2, 'bfloat16'))" | tail -n 1
}
report() {  # report RUN...: the figures of each run's metrics.json
  python3 - "$RUNS" "$@" <<'PY'
import json, sys
from pathlib import Path
for run in sys.argv[2:]:
    metrics = Path(sys.argv[1]) / run / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        print(run, f"{m['tokens_per_second']:.0f} tokens/s", f"peak {m['peak_memory_bytes'] / 2**30:.1f} GiB",
              f"loss {m['initial_train_loss']:.3f} -> {m['train_loss']:.3f}")
PY
}

stack() {
  fits 200 stack || return 0
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  run_step 60 stack python3 -c "
import torch, bitsandbytes, transformers, peft, trl
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('bitsandbytes', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)
w = torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16)
q, state = bitsandbytes.functional.quantize_4bit(w, quant_type='nf4')
err = (bitsandbytes.functional.dequantize_4bit(q, state) - w).abs().mean().item()
print('nf4 round trip on cuda: mean abs error', round(err, 4)); assert err < 0.1
"
  local qlora_model
  qlora_model=$(model llama-3.1-8b 2) || { echo "== qlora-8b-width: no model"; return 0; }
  run_step 120 qlora-8b-width python3 scripts/llama3_70b_qlora.py --model_name "$qlora_model" \
    --dataset tests/data/alpaca.jsonl --output_dir "$RUNS/qlora" --overwrite_output_dir --max_steps 3 \
    --seq_length 512 --batch_size 2 --force
  report qlora
}

peers() {
  fits 420 peers || return 0
  local nvidia=(--nvidia_script .whl/Llama3_8B_LoRA_finetuning.py)
  [ -f .whl/Llama3_8B_LoRA_finetuning.py ] || { echo "no .whl/Llama3_8B_LoRA_finetuning.py: NVIDIA's script left out"; nvidia=(--skip_nvidia); }
  run_step 420 peers python3 bench/peers.py run --device cuda --width 8b --layers 32 --rows 1024 --settings a \
    --llama_factory_site /tmp/site-lf "${nvidia[@]}" --nvidia_timeout 200 --out "$RUNS/peers"
  cp "$RUNS"/peers/peers-*.json "$OUT/" 2>/dev/null
}

sharded() {
  fits 270 sharded || return 0
  local shard_model
  shard_model=$(model llama-3.1-70b 2) || { echo "== sharded: no model"; return 0; }
  run_step 150 sharded torchrun --nproc_per_node 1 scripts/llama3_70b_lora.py --model_name "$shard_model" \
    --dataset tests/data/alpaca.jsonl --output_dir "$RUNS/sharded" --overwrite_output_dir --max_steps 4 \
    --seq_length 1024 --batch_size 2 --force
  report sharded
}

steady() {
  fits 400 steady || return 0
  run_step 400 steady python3 bench/run.py --configs 8b-lora --seq_length 2048 --batch_size 8 --steps 8 \
    --warmup_steps 2 --repeats 1 --impls ours,baseline,ours-fused --cache "$CACHE" --out "$RUNS/bench"
}

steps=("$@")
[ $# -gt 0 ] || steps=(stack peers sharded steady)
for name in "${steps[@]}"; do
  case $name in
    stack | peers | sharded | steady) ;;
    *) echo "error: no step $name (stack, peers, sharded, steady)" >&2; exit 2 ;;
  esac
done
for name in "${steps[@]}"; do "$name"; done
