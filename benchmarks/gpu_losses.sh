#!/usr/bin/env bash
# The loss terms' GPU figures (train.losses, docs/losses.md), as one script of under 400 s for
# a GPU machine (one H100/H200, no network), run after benchmarks/gpu_session.sh in the same
# session (it reuses the wheels that script installed into /tmp/site):
# - decode + backward through the released VAE architectures at 1024x1024, whole image vs the
#   identity term's face window (bench_decode.py);
# - s/step and peak memory of real-width training at 1024x1024 with the identity term off, on
#   with the face window, and on with the whole image (bench_train.py --terms): the goal is the
#   identity term at most +30% per step.
# Logs land in $OUT (or /tmp/gpu_session): decode.txt, terms_qwen.txt, terms_klein.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 100 python3 benchmarks/bench_decode.py --resolution 512,1024 --device cuda \
  --dtype bfloat16 --threads 8 --repeat 3 2>&1 | tee "$OUT/decode.txt"
BENCH=(python3 benchmarks/bench_train.py --width real --device cuda --dtype bfloat16
  --resolution 1024 --rank 64 --modes cached --pairs 2 --warmup 2 --steps 5 --threads 8
  --terms none,identity,identity-image)
timeout 150 "${BENCH[@]}" --family qwen_image_edit --blocks 2,4 2>&1 | tee "$OUT/terms_qwen.txt"
timeout 130 "${BENCH[@]}" --family flux2_klein --blocks 1,2 2>&1 | tee "$OUT/terms_klein.txt"
