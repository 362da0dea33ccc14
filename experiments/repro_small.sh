#!/usr/bin/env bash
# The small-scale reproduction study of docs/REPRODUCTION.md, end to end:
#   bash experiments/repro_small.sh [RUNS_DIR]        (default runs/repro_small)
# Trains every variant of experiments/repro_small.py (the upcycled ones from the 1t1i
# run: the paper's recipe and one control of it each, with a second seed) and a second
# seed of dense and 4t4i; then evaluates dense, 4t4i and moe_8x split by split (the
# routing-bias diagnostic), trains post-hoc auxiliary routers, calibrates their
# compute-matched thresholds and evaluates causally 1t1i, 4t4i, moe_8x and mod_4t4i;
# then compares the runs with moma-compare, writes RUNS_DIR/report.md and the figures in
# docs/, and measures the variants' throughput at the study's size (RUNS_DIR/throughput.md).
#
# The trainings and the evaluations each run two at a time, each process on one XLA CPU
# thread: on 2 cores two single-threaded runs finish more work per second than one run
# on both (measured on 4t4i: 1.08 s a step each, two at once, against 0.72 s alone).
# Jobs are taken longest first; each job's output goes to RUNS_DIR/logs/JOB.log.
# Rerunning the script reuses what is finished: moma-train resumes or finds a run done,
# moma-aux finds its stage done.
set -euo pipefail
RUNS=${1:-runs/repro_small}
HERE=$(cd "$(dirname "$0")" && pwd)
AUX_STEPS=200
CALIBRATION_TOKENS=65536
SECONDS=0
mkdir -p "$RUNS/logs"
XLA_FLAGS_BEFORE=${XLA_FLAGS-}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

say() { echo "== $* ($SECONDS s)"; }
job() {   # job KIND ARG: one training or evaluation, logged to RUNS/logs/
  local kind=$1 arg=$2 name=${2/,seed=/_seed}
  local log="$RUNS/logs/${kind}_$name.log"   # each job is its own bash: $SECONDS is its age
  echo "== $kind $name: started, log $log"
  case $kind in
    train) moma-train --config "$HERE/repro_small.py:$arg" --workdir "$RUNS/$name" ;;
    upcycle) moma-train --config "$HERE/repro_small.py:$arg" --workdir "$RUNS/$name" \
                 "--config.upcycle.from_workdir=$RUNS/1t1i" ;;
    per_split)   # the routing-bias diagnostic: each dataset's validation split alone
      [ -s "$RUNS/$name/eval_split.json" ] || {
        moma-eval --workdir "$RUNS/$name" --per_split --json > "$RUNS/$name/eval_split.json.tmp" &&
        mv "$RUNS/$name/eval_split.json.tmp" "$RUNS/$name/eval_split.json"; } ;;
    aux)   # post-hoc auxiliary routers, calibrated thresholds, causal evaluation
      moma-aux --workdir "$RUNS/$name" --steps "$AUX_STEPS" \
          --calibration_tokens "$CALIBRATION_TOKENS" ;;
  esac > "$log" 2>&1 || { echo "== $kind $name: FAILED after $SECONDS s, see $log"; return 255; }
  echo "== $kind $name: done in $SECONDS s"
}
two_at_a_time() {   # lines 'KIND ARG' on stdin; xargs stops at a job's exit 255
  xargs -P 2 -L 1 bash -c 'job "$@"' _
}
export -f job
export RUNS HERE AUX_STEPS CALIBRATION_TOKENS

# The datasets and the image tokenizer, built once, before two jobs could race to build them.
say "data"
moma-data build --config "$HERE/repro_small.py:4t4i"
# 1t1i first: the upcycled runs grow from it.
printf '%s\n' 'train 1t1i' 'train 4t4i' | two_at_a_time
printf '%s\n' 'train mod_4t4i' 'train mod_4t4i_aware' 'train mod_1t1i' 'train moe_8x' \
    'train dense' 'train 4t4i,seed=1' 'train dense,seed=1' 'upcycle up_4t4i_at100' \
    'upcycle up_4t4i_at100_nonoise' 'upcycle up_4t4i' 'upcycle up_4t4i_carry' \
    'upcycle up_4t4i_nonoise' 'upcycle up_4t4i_scaled' 'upcycle up_4t4i,seed=1' \
    'upcycle up_4t4i_nonoise,seed=1' 'upcycle up_4t4i_scaled,seed=1' \
    'upcycle up_4t4i_carry,seed=1' | two_at_a_time
# mod_4t4i's causal stage (one calibration per MoD and expert stage) is the longest.
printf '%s\n' 'aux mod_4t4i' 'aux 4t4i' 'aux moe_8x' 'aux 1t1i' 'per_split dense' \
    'per_split 4t4i' 'per_split moe_8x' | two_at_a_time
export XLA_FLAGS=$XLA_FLAGS_BEFORE
say "compare"
moma-compare --baseline "$RUNS/dense" --out "$RUNS/savings" \
    --run "$RUNS/1t1i" --run "$RUNS/4t4i" --run "$RUNS/moe_8x" \
    --run "$RUNS/mod_1t1i" --run "$RUNS/mod_4t4i" --run "$RUNS/mod_4t4i_aware" \
    --run "$RUNS/up_4t4i"
python "$HERE/repro_small_report.py" --runs "$RUNS" --figures "$HERE/../docs"
say "throughput"
# Re-measured on every run of this script, alone on the machine, both cores to XLA.
python "$HERE/../benchmarks/throughput.py" --seq 256 --batch 16 --buffer_factor 2.0 \
    --steps 5 | tee "$RUNS/throughput.md"
say "done"
times    # CPU time of this shell and of every command it ran (user, system)
