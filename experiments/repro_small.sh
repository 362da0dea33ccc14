#!/usr/bin/env bash
# The small-scale reproduction study of docs/REPRODUCTION.md, end to end:
#   bash experiments/repro_small.sh [RUNS_DIR]        (default runs/repro_small)
# Trains every variant of experiments/repro_small.py (the upcycled ones from the 1t1i
# run: the paper's recipe and one control of it each, with a second seed) and a second
# seed of dense, 4t4i and moe_8x, evaluates dense, 4t4i and moe_8x split by split (the
# routing-bias diagnostic), trains post-hoc auxiliary routers, calibrates their
# compute-matched thresholds and evaluates causally 1t1i, 4t4i, moe_8x and mod_4t4i,
# then compares the runs with moma-compare, writes RUNS_DIR/report.md and the figures in
# docs/, and measures the variants' throughput at the study's size
# (RUNS_DIR/throughput.md). Rerunning it reuses what is finished: moma-train resumes or
# finds a run done, moma-aux finds its stage done.
set -euo pipefail
RUNS=${1:-runs/repro_small}
HERE=$(cd "$(dirname "$0")" && pwd)
AUX_STEPS=200
SECONDS=0
train() {   # train SPEC [moma-train flags...]
  local spec=$1 name=${1/,seed=/_seed}
  shift
  echo "== $name ($SECONDS s)"
  moma-train --config "$HERE/repro_small.py:$spec" --workdir "$RUNS/$name" "$@"
}
# The upcycling controls first: their source (1t1i) and yardsticks (4t4i, dense).
for spec in 1t1i 4t4i dense; do
  train "$spec"
done
for spec in up_4t4i up_4t4i_carry up_4t4i_nonoise up_4t4i_scaled up_4t4i_at100 \
    up_4t4i,seed=1 up_4t4i_at100_nonoise up_4t4i_nonoise,seed=1 up_4t4i_scaled,seed=1 \
    up_4t4i_carry,seed=1; do
  train "$spec" "--config.upcycle.from_workdir=$RUNS/1t1i"
done
for spec in moe_8x mod_4t4i mod_1t1i dense,seed=1 4t4i,seed=1 mod_4t4i_aware moe_8x,seed=1; do
  train "$spec"
done
# The per-split diagnostic (each dataset's validation split routed on its own), where the
# third edition shows the routing bias of the second's evaluation.
for name in dense 4t4i moe_8x; do
  if [ ! -s "$RUNS/$name/eval_split.json" ]; then
    echo "== per-split evaluation $name ($SECONDS s)"
    moma-eval --workdir "$RUNS/$name" --per_split --json > "$RUNS/$name/eval_split.json.tmp"
    mv "$RUNS/$name/eval_split.json.tmp" "$RUNS/$name/eval_split.json"
  fi
done
# Causal evaluation of the runs the findings use (measured: 4 to 24 minutes a run).
for name in 1t1i 4t4i moe_8x mod_4t4i; do
  echo "== aux $name ($SECONDS s)"
  moma-aux --workdir "$RUNS/$name" --steps "$AUX_STEPS"
done
echo "== compare ($SECONDS s)"
moma-compare --baseline "$RUNS/dense" --out "$RUNS/savings" \
    --run "$RUNS/1t1i" --run "$RUNS/4t4i" --run "$RUNS/moe_8x" \
    --run "$RUNS/mod_1t1i" --run "$RUNS/mod_4t4i" --run "$RUNS/mod_4t4i_aware" \
    --run "$RUNS/up_4t4i"
python "$HERE/repro_small_report.py" --runs "$RUNS" --figures "$HERE/../docs"
echo "== throughput ($SECONDS s)"
# Re-measured on every run of this script (a benchmark: the numbers vary a little).
python "$HERE/../benchmarks/throughput.py" --seq 256 --batch 16 --buffer_factor 2.0 \
    --steps 5 | tee "$RUNS/throughput.md"
echo "== done in $SECONDS s"
times    # CPU time of this shell and of every command it ran (user, system)
