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
# The trainings and the evaluations each run as two lanes at once, each process on one
# XLA CPU thread: on 2 cores two single-threaded runs finish more work per second than one
# run on both (measured on 4t4i: 1.08 s a step each, two at once, against 0.72 s alone).
# Each lane's output goes to RUNS_DIR/logs/. Rerunning the script reuses what is
# finished: moma-train resumes or finds a run done, moma-aux finds its stage done.
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
train() {   # train SPEC [moma-train flags...]
  local spec=$1 name=${1/,seed=/_seed}
  shift
  say "train $name"
  moma-train --config "$HERE/repro_small.py:$spec" --workdir "$RUNS/$name" "$@"
}
upcycled() {   # the upcycling controls, all grown from the 1t1i run
  local spec
  for spec in up_4t4i up_4t4i_carry up_4t4i_nonoise up_4t4i_scaled up_4t4i_at100 \
      up_4t4i,seed=1 up_4t4i_at100_nonoise up_4t4i_nonoise,seed=1 up_4t4i_scaled,seed=1 \
      up_4t4i_carry,seed=1; do
    train "$spec" "--config.upcycle.from_workdir=$RUNS/1t1i"
  done
}
per_split() {   # the routing-bias diagnostic: each dataset's validation split routed alone
  local name=$1
  [ -s "$RUNS/$name/eval_split.json" ] && return
  say "per-split evaluation $name"
  moma-eval --workdir "$RUNS/$name" --per_split --json > "$RUNS/$name/eval_split.json.tmp"
  mv "$RUNS/$name/eval_split.json.tmp" "$RUNS/$name/eval_split.json"
}
aux() {   # post-hoc auxiliary routers, calibrated thresholds, causal evaluation
  say "aux $1"
  moma-aux --workdir "$RUNS/$1" --steps "$AUX_STEPS" --calibration_tokens "$CALIBRATION_TOKENS"
}
lanes() {   # lanes NAME 'COMMANDS A' 'COMMANDS B': both at once; fails if either fails
  say "$1: lanes in $RUNS/logs/$1_{a,b}.log"
  bash -c "SECONDS=$SECONDS; set -euo pipefail; $(declare -f say train upcycled per_split aux); $2" \
      > "$RUNS/logs/$1_a.log" 2>&1 &
  local a=$!
  bash -c "SECONDS=$SECONDS; set -euo pipefail; $(declare -f say train upcycled per_split aux); $3" \
      > "$RUNS/logs/$1_b.log" 2>&1 &
  local b=$! status=0
  wait "$a" || { status=$?; echo "lane a of $1 failed: see $RUNS/logs/$1_a.log"; }
  wait "$b" || { status=$?; echo "lane b of $1 failed: see $RUNS/logs/$1_b.log"; }
  grep -h '^== ' "$RUNS/logs/$1_a.log" "$RUNS/logs/$1_b.log" || true
  return "$status"
}
export RUNS HERE AUX_STEPS CALIBRATION_TOKENS

# The datasets and the image tokenizer, built once before two lanes could race to it.
say "data"
moma-data build --config "$HERE/repro_small.py:4t4i"
# 1t1i first in its lane: the upcycled runs grow from it.
lanes train \
  'train 1t1i; upcycled; train dense,seed=1' \
  'for s in 4t4i dense moe_8x mod_4t4i mod_1t1i 4t4i,seed=1 mod_4t4i_aware; do train $s; done'
# mod_4t4i's causal stage (one calibration per MoD and expert stage) is the longest.
lanes evaluate \
  'aux mod_4t4i' \
  'for n in dense 4t4i moe_8x; do per_split $n; done; for n in 1t1i 4t4i moe_8x; do aux $n; done'
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
