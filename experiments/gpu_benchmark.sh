#!/bin/bash
# The benchmark on a GPU host in one command: the accelerator goals of BENCHMARKS.md (bf16
# train step of the standard config against the chip's bf16 peak, forecast latency at
# 120x144x120, float32 vs bfloat16 regional volumes) and the generator and forecast rows.
#
#   bash experiments/gpu_benchmark.sh [OUT_DIR]      # writes OUT_DIR/benchmark.{json,log}
#
# A GPU image with jax, flax, optax, orbax, pandas and scipy but without our other
# dependencies takes them as wheels in .whl/ (installed into /tmp/site when present). Made
# once, on a machine with the package index (cp312 image; ~56 MB, mostly SimpleITK):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
#     nibabel ml-collections tensorboardX SimpleITK
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
mkdir -p "$out"
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/benchmark.log" || true
python3 -m experiments.benchmark --accelerator --sizes=64 --devices=1 --standard_devices=1 \
  --forecast_sizes=120x144x120 --nopipeline --notorch --compilation_cache_dir= \
  --out="$out/benchmark.json" 2>&1 | tee -a "$out/benchmark.log"
