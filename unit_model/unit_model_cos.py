"""Fusion weighted by the cosine between the target's few-shot module and each source module.

w_s ∝ softmax(cos(θ_t^few-shot, θ_s) / T), θ_t^few-shot tuned from random init on the target's few-shot
split ({random_tuned_ckpt_path}/{t}). --cos_mode flat: cosine of the flattened modules; per_tensor: the
mean of per-tensor cosines (the original). --granularity block|layer: one cosine and one softmax per group.

    python unit_model/unit_model_cos.py --delta lora --tasks ALL_TASKS --tem 0.05
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python unit_model/...py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unit_model import config  # noqa: E402  (declarations only: --help needs no torch)
from utils.errors import run_cli  # noqa: E402
from utils.params import block_params  # noqa: E402

# ---- parameters (each one can be overridden on the command line as --name value) -------------------
delta = "lora"
tasks = "ALL_TASKS"
targets = None  # None: every task of `tasks`
source_ckpt_path = "runs/sources/lora"
random_tuned_ckpt_path = "runs/random/lora"
save_ckpt_path = "runs/fused/lora/cos"
tem = 1.0  # or "auto": per target, the T whose fused module scores best zero-shot on its dev split
weight_norm = config.DEFAULT_WEIGHT_NORM  # zscore | rank | none (the original: raw scores)
score_space = "task_vector"  # task_vector (LoRA: ΔW per pair) | params (raw factors, the original)
cos_mode = "flat"
granularity = "model"
lora_combine = config.DEFAULT_LORA_COMBINE
overwrite = False  # True: replace this run's outputs from an earlier run
# -----------------------------------------------------------------------------------------------------
# + the merge knobs (--merge, --lam, --density, ..., --top_k) and --tem auto's (--model, --task_dir, ...)
PARAMS = {**block_params(globals()), **config.MERGE_PARAMS, **config.TARGET_DATA_PARAMS}


def main(argv: list[str] | None = None) -> int:
    args = config.parse_params(PARAMS, argv, __doc__)
    from unit_model.fusion import run_fusion

    return run_fusion("cos", args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
