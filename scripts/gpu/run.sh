#!/usr/bin/env bash
# The GPU check, the last call of scripts/gpu/prepare.sh's sequence: `bash scripts/gpu/run.sh .gpuN`
# on a lent GPU machine (Python 3.12 with torch CUDA, CPU-only onnxruntime). Joins the parts that
# the earlier calls left in /tmp/parts, installs onnxruntime-gpu and the small wheels into
# /tmp/site, and runs
#   1. scripts/gpu/cuda_parity.py: CUDA vs CPU provider (activations, gradients, every method)
#      and GradCAM ms/image at batch 1-64 with a plain forward beside it;
#   2. scripts/bench_compat.py --device cuda: pgc on torch CUDA vs camexport.compat on ORT CUDA.
# Writes JSON and logs under ${OUT:-results/gpu}. Measured: about 250 s of a warm machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT" /tmp/parts /tmp/whl
cp -r "$1"/. /tmp/parts/
cat /tmp/parts/onnxruntime_gpu.part* > "/tmp/whl/$(cat /tmp/parts/name)"
cp /tmp/parts/small/*.whl /tmp/whl/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${PARITY_S:-190}" python3 scripts/gpu/cuda_parity.py --json "$OUT/cuda_parity.json" 2>&1 \
    | grep -v "onnxruntime:" | tee "$OUT/parity.log"
timeout "${COMPAT_S:-100}" python3 scripts/bench_compat.py --device cuda --scorecam-images 8 \
    --json "$OUT/bench_compat_cuda.json" 2>&1 | grep -v "it/s" | tee "$OUT/bench_compat.log"
