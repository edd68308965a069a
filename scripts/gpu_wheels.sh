#!/usr/bin/env bash
# Download into .whl/ the wheels that a GPU machine without network lacks (one that has PyTorch,
# transformers and accelerate): the versions installed in this checkout's .venv, built for
# its Python 3.12 on x86-64. Then run benchmarks/gpu_session.sh there with .whl carried along.
# Its own transformers (5.17) and huggingface_hub (1.33) are kept: the tiny builders and
# training were checked with those versions (transformers' wheel would not fit the 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PACKAGES=(diffusers peft pydantic pydantic_core annotated-types typing-inspection prodigyopt
  bitsandbytes)
mapfile -t PINS < <("$PY" -c '
import importlib.metadata as m, sys
for name in sys.argv[1:]:
    print(f"{name}=={m.version(name)}")
' "${PACKAGES[@]}")
rm -rf .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${PINS[@]}"
du -sh .whl
