#!/usr/bin/env bash
# `make demo`: the transfer study on the embedded default in under 10 minutes on 2 CPU cores, then its summary.
# LoRA; three targets from three families, each on the three 16-shot splits of data seeds 13, 42 and 100;
# random initialisation against the plain average, two similarity weightings (Loss, KL) and learned weights,
# with the transferability report. The twenty source modules come ready-made from the committed library
# models/default-sources/lora (scripts/build_default_sources.py: the study's source stage, one module at a time).
# `make study` runs the full comparison (every weighting and operator, six targets, its own source stage).
# Every variable can be overridden from the environment (see scripts/pipeline.sh). Resumable: rerun to continue.
# MODEL=models/default-causal runs the same study on the embedded decoder-only default, with its own library.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:=models/default}"
MODEL="${MODEL%/}"  # models/default-causal/ names the same folder
case "$MODEL" in
  models/default) : "${OUTPUT:=runs/demo}"; : "${SOURCE_LIBRARY:=models/default-sources/lora}" ;;
  models/default-causal) : "${OUTPUT:=runs/demo-causal}"; : "${SOURCE_LIBRARY:=models/default-causal-sources/lora}" ;;
  *) echo "error: MODEL=$MODEL: make demo runs models/default or models/default-causal (their source libraries" \
          "are committed); run scripts/pipeline.sh for another backbone" >&2; exit 2 ;;
esac
: "${TARGETS:=sent_review topic_places nli_entail}"
: "${FUSIONS:=average Loss KL learned GradAlign}"
: "${TRANSFERABILITY:=true}"  # how well each weighting predicts single-source transfer (tune-all, pairs)
export MODEL OUTPUT SOURCE_LIBRARY TARGETS FUSIONS TRANSFERABILITY
start=$(date +%s)
bash scripts/pipeline.sh
echo "demo finished in $(( $(date +%s) - start ))s"
cat "$OUTPUT/results/summary.md"
echo "summary: $OUTPUT/results/summary.md; everything on one page: $OUTPUT/results/index.html"
