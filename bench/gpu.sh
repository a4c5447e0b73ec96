#!/usr/bin/env bash
# One prepared benchmark for a GPU machine (CUDA): a random t5-base-shaped backbone (no download), training
# examples/s of each delta method with --device cuda --bf16, similarity throughput, grouped training (G LoRA
# modules per forward pass, G = 1 8 32) and peak GPU memory.
# Writes a markdown table to $OUT/gpu.md when OUT is set, else bench/results/gpu.md. About 4 minutes on an H100.
#
#   bash bench/gpu.sh               # on the GPU machine
#   bash bench/gpu.sh --dry_run     # anywhere: every code path on the CPU in seconds (gpu_dry_run.md)
#   PYTHON=/path/to/python bash bench/gpu.sh --bsz 8 --steps 200   # other flags: bench/gpu_bench.py --help
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import torch, transformers, adapters" 2>/dev/null; then
    echo "error: $PY cannot import torch, transformers and adapters (install torch, then pip install -r requirements.txt)" >&2
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
start=$(date +%s)
"$PY" bench/gpu_bench.py --results_dir "${OUT:-bench/results}" "$@"
echo "bench/gpu.sh finished in $(( $(date +%s) - start ))s"
