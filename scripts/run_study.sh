#!/usr/bin/env bash
# The committed comparison (results/, leaderboard/): base + the five recipes + IFD's random control on
# SmolLM2-135M-Instruct, 3 training seeds each, the `study` suite. One background job on 2 CPU cores
# (about 1.5 h); rerunning the same command resumes where it stopped (finished runs are not redone).
#
#     bash scripts/run_study.sh [OUTPUT_DIR]          # default runs/study
#     python scripts/collect_results.py runs/study && harness leaderboard --write
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/study}
HARNESS=${HARNESS:-.venv/bin/harness}
GGUF=${GGUF:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}
# 200 Alpaca records, 4 packed rows per step: about 11 optimizer steps per epoch at a learning rate that moves a
# 135M model in that many steps; pure-bf16 training; bf16 evaluation through the scoring engine (about 3x faster
# than fp32 on this CPU; every run is scored the same way, so the paired comparison is unaffected, and the
# precision is recorded per task, which keeps these runs apart from fp32 ones on the leaderboard).
COMMON=(--model smollm2-135m-instruct --set "model_path=$GGUF" --suite study --set data.limit=200
        --set training.precision=bf16 --set eval.precision=bf16 --set training.batch_size=4 --set training.learning_rate=5e-5
        --output "$OUT")
for seed in 0 1 2; do
  "$HARNESS" run --recipe all --seed "$seed" "${COMMON[@]}"
  "$HARNESS" run --recipe ifd --set params.control=random --seed "$seed" "${COMMON[@]}"
done
"$HARNESS" run --recipe base "${COMMON[@]}"   # no training: one seed is the same as three
