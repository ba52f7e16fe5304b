#!/usr/bin/env bash
# One device call (run from the repo root; imports only jax and numpy):
#   1. compiled (not interpret) GPU kernels: forward + all gradients vs the XLA path and float64,
#   2. the kernel benchmark (Pallas variants vs XLA), JSON into $OUT.
# Each stage is time-boxed so that a slow compile still leaves a table behind.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv \
  2>&1 | tee "$OUT/nvidia_smi.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/kernels.py --check \
  --deadline "${DEADLINE:-240}" --iters "${ITERS:-10}" ${BENCH_ARGS:-} \
  --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log"
echo "exit status: $?"
