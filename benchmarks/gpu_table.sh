#!/usr/bin/env bash
# The figures of the README's speed table, one `speed.py` run each (our code and the authors'
# PyTorch baseline in the same process), on whatever device JAX and PyTorch see.
#
#   benchmarks/gpu_table.sh OUT [RUN ...]     RUN: teacher student uncached xla cold warm (default: all, in order)
#
#   teacher  teacher training step and inference (the config's defaults: bfloat16, fused attention,
#            cached VAE posteriors)
#   student  U-Net alone, student distillation step and student inference
#   uncached teacher training step with the VAE's forward pass in the step (no cached posteriors)
#   xla      teacher training step with XLA's attention instead of the fused kernel
#   cold     ours alone, teacher training step, into an emptied compilation cache (OUT/jax_cache)
#   warm     the same again, reading that cache: its "compile s" is what a warm cache leaves of
#            the step's startup (trace, lowering, loading the executable)
#
# Each run writes OUT/RUN.json (speed.py's results) and OUT/RUN.log, and stops after $LIMIT seconds
# (default 420) so that a run that hangs leaves time for the next. $SPEED_ARGS goes to every run,
# e.g. the CPU check of this script:
#   SPEED_ARGS="--tiny --batch 4 --steps 2 --warmup 1" benchmarks/gpu_table.sh /tmp/table teacher
set -uo pipefail
out=${1:?usage: benchmarks/gpu_table.sh OUT [teacher student uncached xla cold warm]}
shift
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(teacher student uncached xla cold warm)
speed=$(dirname "$0")/speed.py
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # dpiqa_jax from this checkout, installed or not
read -r -a extra <<< "${SPEED_ARGS:-}"
mkdir -p "$out"
status=0
cache=(JAX_COMPILATION_CACHE_DIR="$out/jax_cache")
for run in "${runs[@]}"; do
  env=()
  case $run in
    teacher) args=(--jobs teacher_train teacher_infer) ;;
    student) args=(--jobs unet student_distill student_infer) ;;
    uncached) args=(--jobs teacher_train --cache-posteriors off) ;;
    xla) args=(--jobs teacher_train --attention xla) ;;
    cold) rm -rf "$out/jax_cache"; env=("${cache[@]}"); args=(--jobs teacher_train --no-baseline) ;;
    warm) env=("${cache[@]}"); args=(--jobs teacher_train --no-baseline) ;;
    *) echo "gpu_table.sh: unknown run '$run' (teacher, student, uncached, xla, cold, warm)" >&2; exit 2 ;;
  esac
  start=$SECONDS
  env PYTHONUNBUFFERED=1 "${env[@]}" timeout "${LIMIT:-420}" python3 "$speed" "${args[@]}" "${extra[@]}" \
    --output "$out/$run.json" > "$out/$run.log" 2>&1
  code=$?
  echo "== $run: exit $code after $((SECONDS - start)) s (log: $out/$run.log)"
  tail -n 12 "$out/$run.log"
  [ $code -eq 0 ] || status=1
done
exit $status
