#!/usr/bin/env bash
# `make demo`: train and score all three delta methods on one task per family of the bundled suite,
# with the embedded default backbone, then print a table of test scores beside the trivial baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DEMO_DIR:=runs/demo}"
: "${TASKS:=SAMPLE_TASKS}"
export TASKS
mkdir -p "$DEMO_DIR"
for method in adapter lora prefix; do
    start=$(date +%s)
    OUTPUT_DIR="$DEMO_DIR/$method" bash "scripts/$method.sh" 2> "$DEMO_DIR/$method.stderr.log"
    echo "$method: $(( $(date +%s) - start ))s" | tee -a "$DEMO_DIR/timings.txt"
done
.venv/bin/python scripts/summarize_runs.py "$DEMO_DIR/adapter" "$DEMO_DIR/lora" "$DEMO_DIR/prefix" \
    --out "$DEMO_DIR/summary.md"
echo "summary: $DEMO_DIR/summary.md"
