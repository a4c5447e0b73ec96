#!/usr/bin/env bash
# `make demo`: the transfer study on the embedded default (LoRA, every fusion method, 6 targets from
# 3 families, each on the 3 few-shot splits of data seeds 13, 42 and 100,
# leave-one-out over all 20 bundled tasks), then its summary. Resumable: rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT:=runs/demo}"
: "${TRANSFERABILITY:=true}"  # the demo also reports how well each weighting predicts single-source transfer
export OUTPUT TRANSFERABILITY
start=$(date +%s)
bash scripts/pipeline.sh
echo "demo finished in $(( $(date +%s) - start ))s"
cat "$OUTPUT/results/summary.md"
echo "summary: $OUTPUT/results/summary.md; everything on one page: $OUTPUT/results/index.html"
