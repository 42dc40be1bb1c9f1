#!/usr/bin/env bash
# The wheels bench/gpu_checks.sh needs on a GPU machine that has CUDA torch but no network: this project's
# pins (constraints.txt) of what such a machine lacks or has at another version, for CPython 3.12 on
# x86_64. bitsandbytes keeps only its CUDA 13.0 and CPU libraries (59 MB -> ~6 MB), so the whole set stays
# well under a 64 MiB transfer.
#   bash bench/gpu_wheels.sh [DIR]      # default: .whl (git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir"
pin() { grep -i "^$1==" constraints.txt; }
specs=(
  "$(pin transformers)" "$(pin tokenizers)" "$(pin huggingface-hub)" "$(pin peft)" "$(pin trl)"
  "$(pin accelerate)" "$(pin datasets)" "$(pin bitsandbytes)" "dill<0.4.2" "multiprocess<0.70.20"
)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
PIP_CONSTRAINT= python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" "${specs[@]}"
for wheel in "$dir"/bitsandbytes-*.whl; do
  zip -q -d "$wheel" 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' || true
done
du -sh "$dir"
