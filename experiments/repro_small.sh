#!/usr/bin/env bash
# The small-scale reproduction study of docs/REPRODUCTION.md, end to end:
#   bash experiments/repro_small.sh [RUNS_DIR]        (default runs/repro_small)
# Trains every variant of experiments/repro_small.py and a second seed of dense and
# 4t4i, trains post-hoc auxiliary routers and evaluates each sparse run causally, then
# compares them with moma-compare and writes RUNS_DIR/report.md and the figures in
# docs/, and measures the variants' throughput at the study's size
# (RUNS_DIR/throughput.md). Rerunning it reuses what is finished: moma-train resumes or
# finds a run done, moma-aux finds its stage done.
set -euo pipefail
RUNS=${1:-runs/repro_small}
HERE=$(cd "$(dirname "$0")" && pwd)
AUX_STEPS=200
SECONDS=0
for spec in dense 1t1i 4t4i moe_8x mod_1t1i mod_4t4i dense,seed=1 4t4i,seed=1; do
  name=${spec/,seed=/_seed}
  echo "== $name ($SECONDS s)"
  moma-train --config "$HERE/repro_small.py:$spec" --workdir "$RUNS/$name"
  if [[ $name != dense* ]]; then
    moma-aux --workdir "$RUNS/$name" --steps "$AUX_STEPS"
  fi
done
echo "== compare ($SECONDS s)"
moma-compare --baseline "$RUNS/dense" --out "$RUNS/savings" \
    --run "$RUNS/1t1i" --run "$RUNS/4t4i" --run "$RUNS/moe_8x" \
    --run "$RUNS/mod_1t1i" --run "$RUNS/mod_4t4i"
python "$HERE/repro_small_report.py" --runs "$RUNS" --figures "$HERE/../docs"
echo "== throughput ($SECONDS s)"
# Re-measured on every run of this script (a benchmark: the numbers vary a little).
python "$HERE/../benchmarks/throughput.py" --seq 256 --batch 16 --capacity_factor 2.0 \
    --steps 5 | tee "$RUNS/throughput.md"
echo "== done in $SECONDS s"
