"""Fusion weighted by how little each source moves when tuned on the target.

w_s ∝ softmax(-‖θ_s - θ_s^{tuned on t}‖₂ / T), with θ_s^{tuned on t} from the tune-all output
({tuneall_ckpt_path}/{t}/{s}); the ORIGINAL sources θ_s are averaged. --granularity block|layer: one
distance and one softmax per group.

    python unit_model/unit_model_Euclidean.py --delta lora --tasks ALL_TASKS --tem 0.5
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
tuneall_ckpt_path = "runs/tuneall/lora"
save_ckpt_path = "runs/fused/lora/Euclidean"
tem = 1.0  # or "auto": per target, the T whose fused module scores best zero-shot on its dev split
weight_norm = config.DEFAULT_WEIGHT_NORM  # zscore | rank | none (the original: raw scores)
score_space = "task_vector"  # task_vector (LoRA: ΔW per pair) | params (raw factors, the original)
granularity = "model"
lora_combine = config.DEFAULT_LORA_COMBINE
overwrite = False  # True: replace this run's outputs from an earlier run
# -----------------------------------------------------------------------------------------------------
# + the merge knobs (--merge, --lam, --density, ..., --top_k) and --tem auto's (--model, --task_dir, ...)
PARAMS = {**block_params(globals()), **config.MERGE_PARAMS, **config.TARGET_DATA_PARAMS}


def main(argv: list[str] | None = None) -> int:
    args = config.parse_params(PARAMS, argv, __doc__)
    from unit_model.fusion import run_fusion

    return run_fusion("Euclidean", args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
