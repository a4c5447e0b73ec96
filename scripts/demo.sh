#!/usr/bin/env bash
# `make demo`: the transfer study on the embedded default (LoRA, every fusion method, 6 targets from
# 3 families, leave-one-out over all 20 bundled tasks), then its summary. Resumable: rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUTPUT:=runs/demo}"
: "${TRANSFERABILITY:=true}"  # the demo also reports how well each weighting predicts single-source transfer
export OUTPUT TRANSFERABILITY
start=$(date +%s)
bash scripts/pipeline.sh
echo "demo finished in $(( $(date +%s) - start ))s"
cat "$OUTPUT/results/summary.md"
echo "summary: $OUTPUT/results/summary.md (figures and transferability.tsv beside it)"
