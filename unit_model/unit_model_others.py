"""Fusion weighted by any zero-shot similarity metric of get_similarity's result.tsv.

w_s ∝ softmax(sign · score / T), sign = +1 for metrics where higher means more similar (LogitsCos) and -1
where lower does (Loss, KL, EL2N, GraNd), as each metric declares in get_similarity/metrics.py.
--metric picks one when the file holds several; --granularity block|layer uses the file's per-group rows,
one softmax per group.

    python unit_model/unit_model_others.py --delta lora --result_tsv runs/similarity/lora/result.tsv --metric KL
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
result_tsv = "runs/similarity/lora/result.tsv"
metric = None  # None: the only metric of result_tsv
granularity = "model"
save_ckpt_path = "runs/fused/lora/others"
tem = 1.0  # or "auto": per target, the T whose fused module scores best zero-shot on its dev split
weight_norm = config.DEFAULT_WEIGHT_NORM  # zscore | rank | none (the original: raw scores)
lora_combine = config.DEFAULT_LORA_COMBINE
overwrite = False  # True: replace this run's outputs from an earlier run
# -----------------------------------------------------------------------------------------------------
# + the merge knobs (--merge, --lam, --density, ..., --top_k) and --tem auto's (--model, --task_dir, ...)
PARAMS = {**block_params(globals()), **config.MERGE_PARAMS, **config.TARGET_DATA_PARAMS}


def main(argv: list[str] | None = None) -> int:
    args = config.parse_params(PARAMS, argv, __doc__)
    from unit_model.fusion import run_fusion

    return run_fusion("others", args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
