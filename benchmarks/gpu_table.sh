#!/usr/bin/env bash
# The figures of the README's speed table, one `speed.py` run each (our code and the authors'
# PyTorch baseline in the same process) and three `startup.py` runs, on whatever device JAX and
# PyTorch see.
#
#   benchmarks/gpu_table.sh OUT [RUN ...]     RUN: attention teacher student uncached xla remat cold warm sd
#                                                  (default: all, in order) or profile (by name only)
#
#   attention the attention kernels alone on the U-Net's shapes (benchmarks/attention_kernels.py):
#            the fused one checked against XLA's, forward and backward, and both timed; first, as it
#            is quick and a fused kernel that fails or errs there would spoil the runs after it
#   teacher  teacher training step and inference (the config's defaults: bfloat16, fused attention,
#            cached VAE posteriors)
#   student  U-Net alone, student distillation step and student inference
#   uncached teacher training step with the VAE's forward pass in the step (no cached posteriors)
#   xla      teacher training step with XLA's attention instead of the fused kernel
#   remat    teacher training step keeping every intermediate for the backward pass (model.remat=off;
#            the configs' matmuls keeps only the convolutions' and dense layers' outputs)
#   cold     issue 7's startup figure (benchmarks/startup.py): `dpiqa-jax train` on the full-size
#            teacher to the end of its first step, with emptied caches (OUT/start_cache)
#   warm     the same command again, with the caches the cold run left
#   sd       the warm run from a local SD-1.5 folder (model.sd_dir), as a user's reruns read it: random
#            weights of the real size, written to $SD_DIR (default /tmp/dpiqa_sd15) first if missing,
#            and a first run from them (new weights: the VAE's posteriors made) before the timed one
#   profile  ours alone, the training steps (or $PROFILE_JOBS), 3 more steps each under JAX's profiler:
#            where their device time goes, in the log (speed.py --profile; the traces in
#            $PROFILE_DIR, default /tmp/dpiqa_profile, not under OUT: they are large)
#
# Each run writes OUT/RUN.json and OUT/RUN.log, and stops after $LIMIT seconds (default 420) so
# that a run that hangs leaves time for the next. $SPEED_ARGS goes to every speed.py run,
# $STARTUP_ARGS to every startup.py run and $ATTENTION_ARGS to attention_kernels.py, e.g. the CPU check:
#   SPEED_ARGS="--tiny --batch 4 --steps 2 --warmup 1" STARTUP_ARGS="--config configs/demo.py:smoke" \
#     ATTENTION_ARGS="--size 64 --batch 2" benchmarks/gpu_table.sh /tmp/table attention teacher cold warm
set -uo pipefail
out=${1:?usage: benchmarks/gpu_table.sh OUT [attention teacher student uncached xla remat cold warm sd]}
shift
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(attention teacher student uncached xla remat cold warm sd)
here=$(dirname "$0")
repo=$(cd "$here/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # dpiqa_jax from this checkout, installed or not
read -r -a speed_extra <<< "${SPEED_ARGS:-}"
read -r -a startup_extra <<< "${STARTUP_ARGS:-}"
read -r -a attention_extra <<< "${ATTENTION_ARGS:-}"
mkdir -p "$out"
status=0
for run in "${runs[@]}"; do
  speed=(python3 "$here/speed.py" --output "$out/$run.json")
  startup=(python3 "$here/startup.py" "$out/$run.json" --cache "$out/start_cache" --limit $((${LIMIT:-420} - 20))
           "${startup_extra[@]}")
  case $run in
    attention) command=(python3 "$here/attention_kernels.py" --output "$out/$run.json" "${attention_extra[@]}") ;;
    teacher) command=("${speed[@]}" --jobs teacher_train teacher_infer "${speed_extra[@]}") ;;
    student) command=("${speed[@]}" --jobs unet student_distill student_infer "${speed_extra[@]}") ;;
    uncached) command=("${speed[@]}" --jobs teacher_train --cache-posteriors off "${speed_extra[@]}") ;;
    xla) command=("${speed[@]}" --jobs teacher_train --attention xla "${speed_extra[@]}") ;;
    remat) command=("${speed[@]}" --jobs teacher_train --remat off "${speed_extra[@]}") ;;
    profile) read -r -a profiled <<< "${PROFILE_JOBS:-teacher_train student_distill}"
             command=("${speed[@]}" --jobs "${profiled[@]}" --no-baseline --steps 3 --warmup 2
                      --profile "${PROFILE_DIR:-/tmp/dpiqa_profile}" "${speed_extra[@]}") ;;
    cold) command=("${startup[@]}" --cold) ;;
    warm) command=("${startup[@]}") ;;
    sd) command=("${startup[@]}" --sd-dir "${SD_DIR:-/tmp/dpiqa_sd15}" --random-sd --prime) ;;
    *) echo "gpu_table.sh: unknown run '$run' (attention, teacher, student, uncached, xla, remat, cold, warm, sd, profile)" >&2
       exit 2 ;;
  esac
  start=$SECONDS
  env PYTHONUNBUFFERED=1 timeout "${LIMIT:-420}" "${command[@]}" > "$out/$run.log" 2>&1
  code=$?
  echo "== $run: exit $code after $((SECONDS - start)) s (log: $out/$run.log)"
  tail -n "$([ "$run" = attention ] && echo 30 || echo 12)" "$out/$run.log"  # attention: its whole table
  [ $code -eq 0 ] || status=1
done
exit $status
