#!/usr/bin/env bash
# What bench/gpu_checks.sh needs on a GPU machine that has CUDA torch but no network, for CPython 3.12 on x86_64:
#   DIR/*.whl                 this project's pins (constraints.txt) of what such a machine lacks or has at
#                             another version; bitsandbytes keeps only its CUDA 13.0 and CPU libraries (59 MB ->
#                             ~6 MB);
#   DIR/llama-factory/*.whl   LLaMA-Factory's pins (playbooks/llama-factory/constraints.txt) of what its training
#                             path imports and the first set lacks or has at another version;
#   DIR/Llama3_8B_LoRA_finetuning.py   NVIDIA's script, when its git mirror is given (peers.py fetch-nvidia).
# The whole set stays well under a 64 MiB transfer.
#   bash bench/gpu_wheels.sh [DIR] [MIRROR.git]     # default DIR: .whl (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir/llama-factory"
pin() { grep -i "^$1==" "$2"; }
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
download() {  # download DIR SPEC...
  local into=$1
  shift
  PIP_CONSTRAINT= python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$into" "$@"
}
ours=constraints.txt
download "$dir" "$(pin transformers $ours)" "$(pin tokenizers $ours)" "$(pin huggingface-hub $ours)" \
  "$(pin peft $ours)" "$(pin trl $ours)" "$(pin accelerate $ours)" "$(pin datasets $ours)" \
  "$(pin bitsandbytes $ours)" "dill<0.4.2" "multiprocess<0.70.20"
for wheel in "$dir"/bitsandbytes-*.whl; do
  zip -q -d "$wheel" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' || true
done
# LLaMA-Factory's training path, as imported by `llamafactory-cli train` (transformers, tokenizers, the hub
# client, peft and bitsandbytes are at the same versions as ours; av and gradio are not imported there).
lf=playbooks/llama-factory/constraints.txt
for name in transformers tokenizers huggingface.hub peft bitsandbytes; do
  if [ "$(pin "$name" $ours | cut -d= -f3)" != "$(pin "$name" $lf | cut -d= -f3)" ]; then
    echo "error: $name differs between $ours and $lf: add LLaMA-Factory's to $dir/llama-factory" >&2
    exit 1
  fi
done
download "$dir/llama-factory" "$(pin llamafactory $lf)" "$(pin accelerate $lf)" "$(pin trl $lf)" \
  "$(pin datasets $lf)" "$(pin dill $lf)" "$(pin multiprocess $lf)" "$(pin fsspec $lf)" "$(pin omegaconf $lf)" \
  "$(pin opentelemetry-api $lf)" "$(pin torchdata $lf)" "$(pin brotli $lf)" "$(pin pytz $lf)"
if [ $# -ge 2 ]; then
  python3 bench/peers.py fetch-nvidia --mirror "$2" --out "$dir"
fi
du -sh "$dir"
