#!/usr/bin/env bash
# The GPU checks, as one script for a GPU machine (one H100/H200, no network; the parts'
# timeouts add up to 530 s, inside one 600 s call):
# the CUDA-only tests (nf4/int8/fp8 bases, bf16) and the real-width training benchmark at
# 1024x1024 (bf16, rank 64, gradient checkpointing), whose figures go in benchmarks/README.md.
#
# First, on a machine with network: scripts/gpu_wheels.sh (fills .whl/). Then, on the GPU
# machine with .whl/ copied along: bash benchmarks/gpu_session.sh
# Logs land in $OUT (or /tmp/gpu_session): tests.txt, qwen.txt, klein.txt, klein_fp8.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch, diffusers, peft; print(torch.__version__, diffusers.__version__, peft.__version__)'

# CUDA-only tests (they skip on the CPU CI machines)
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_base_precision.py 2>&1 | tee "$OUT/tests.txt"

BENCH=(python3 benchmarks/bench_train.py --width real --device cuda --dtype bfloat16
  --resolution 1024 --rank 64 --modes cached --pairs 2 --warmup 2 --steps 5 --threads 8)
timeout 160 "${BENCH[@]}" --family qwen_image_edit --blocks 2,4 2>&1 | tee "$OUT/qwen.txt"
timeout 140 "${BENCH[@]}" --family flux2_klein --blocks 1,2 2>&1 | tee "$OUT/klein.txt"
timeout 110 "${BENCH[@]}" --family flux2_klein --blocks 1,2 --quantize fp8 2>&1 |
  tee "$OUT/klein_fp8.txt"
