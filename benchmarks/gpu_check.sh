#!/usr/bin/env bash
# The device check (issue 22): one call of at most ~8 minutes on an H100/H200, from the repository
# root; needs jax, flax, optax, numpy and yaml, no network, no grain or tensorboardX.
#   a. benchmarks/kernels.py --check: the compiled kernels (forward and every gradient) against the
#      XLA path and float64, then their timings, block-size sweep included  -> $OUT/kernels.json
#   b. benchmarks/train_step.py: a training step of the 4-layer gated_deltanet_1b_hybrid and
#      linear_llama3_1b_hybrid at seq 8192, batch 1, one device, kernel backends auto and xla,
#      tokens/s and MFU                                                      -> $OUT/train.json
#   c. benchmarks/gpu_report.py: both in the schema of issue 22             -> $OUT/kernels_gpu.json
#      (REPORT_COPY=benchmarks/results/kernels_gpu.json: a copy there too)
#   d. benchmarks/delta_stages.py: the delta rule's stages apart, the WY prepare's kernels beside
#      its XLA solve, and the whole op on backends gpu, auto and xla         -> $OUT/delta_stages.json
# Each stage is time-boxed with `timeout` and writes its JSON as it goes, so a slow compile still
# leaves output; a stage that fails or times out does not stop the next.
# SMALL=1 (or --small): toy sizes, on any machine (the CPU dry run of the whole script).
# Budgets in seconds: KERNELS_TIMEOUT (200; KERNELS_DEADLINE, default 50 less: no new timing
# starts after it), TRAIN_TIMEOUT (210 for both configs, of which TRAIN_RESERVE, 85, is kept for
# the second), DELTA_TIMEOUT (60). Other knobs: ITERS (10), TRAIN_STEPS (5), TRAIN_BACKENDS
# (auto,xla), KERNELS_ARGS, TRAIN_ARGS (extra flags). The H200 compiled the GDN hybrid's step in 48 s (2026-12-04).
set -uo pipefail
[ "${1:-}" = "--small" ] && SMALL=1
SMALL=${SMALL:-0}
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# One process holds the device at a time: let it have most of the memory (the train stage's
# 128K-vocabulary logits and their gradient are ~8 GB at once) but not every byte.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# A rerun on the same (still warm) machine skips the compiles of the first run.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/lasp_jax_compile_cache}

KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-${BENCH_TIMEOUT:-200}}
KERNELS_DEADLINE=${KERNELS_DEADLINE:-${DEADLINE:-$((KERNELS_TIMEOUT - 50))}}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-210}
TRAIN_RESERVE=${TRAIN_RESERVE:-85}
small_flag=""
[ "$SMALL" = 1 ] && small_flag=--small

stage_done() {  # name, exit status
  local note=""
  [ "$2" = 124 ] && note=" (timed out)"
  echo "== $1: exit status $2$note, ${SECONDS}s since the start" | tee -a "$OUT/status.txt"
}

: > "$OUT/status.txt"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used \
    --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
fi

echo "== a. kernels: check + timings (timeout ${KERNELS_TIMEOUT}s, deadline ${KERNELS_DEADLINE}s)"
rm -f "$OUT/kernels.json"
# shellcheck disable=SC2086  # small_flag, KERNELS_ARGS, BENCH_ARGS: word lists
timeout "$KERNELS_TIMEOUT" python3 benchmarks/kernels.py --check $small_flag \
  --deadline "$KERNELS_DEADLINE" --iters "${ITERS:-10}" ${KERNELS_ARGS:-${BENCH_ARGS:-}} \
  --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
stage_done "a. kernels" "${PIPESTATUS[0]}"

echo "== b. training step (timeout ${TRAIN_TIMEOUT}s for both configs)"
rm -f "$OUT/train.json"
train_start=$SECONDS
for config in gated_deltanet_1b_hybrid linear_llama3_1b_hybrid; do
  # The first config may not eat the second's reserve; the second gets what is left.
  if [ "$config" = gated_deltanet_1b_hybrid ]; then
    budget=$((TRAIN_TIMEOUT - TRAIN_RESERVE))
  else
    budget=$((TRAIN_TIMEOUT - (SECONDS - train_start)))
  fi
  if [ "$budget" -lt 20 ]; then
    echo "== b. train $config: skipped, ${budget}s left" | tee -a "$OUT/status.txt"
    continue
  fi
  # shellcheck disable=SC2086
  timeout "$budget" python3 benchmarks/train_step.py --config "configs/$config.yaml" \
    $small_flag --layers 4 --seq 8192 --batch 1 --backends "${TRAIN_BACKENDS:-auto,xla}" \
    --steps "${TRAIN_STEPS:-5}" ${TRAIN_ARGS:-} --out "$OUT/train.json" --append \
    2>&1 | tee -a "$OUT/train.log"
  stage_done "b. train $config (${budget}s)" "${PIPESTATUS[0]}"
done

echo "== c. report"
python3 benchmarks/gpu_report.py --kernels "$OUT/kernels.json" --train "$OUT/train.json" \
  --out "$OUT/kernels_gpu.json" ${REPORT_COPY:+--copy-to "$REPORT_COPY"} 2>&1 \
  | tee "$OUT/report.log"
stage_done "c. report" "${PIPESTATUS[0]}"

echo "== d. delta-rule stages (timeout ${DELTA_TIMEOUT:-60}s)"
# shellcheck disable=SC2086
timeout "${DELTA_TIMEOUT:-60}" python3 benchmarks/delta_stages.py $small_flag \
  --iters "${ITERS:-10}" --out "$OUT/delta_stages.json" 2>&1 | tee "$OUT/delta_stages.log"
stage_done "d. delta stages" "${PIPESTATUS[0]}"
