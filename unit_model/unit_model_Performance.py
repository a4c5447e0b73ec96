"""Fusion weighted by each source's dev gain from tuning on the target.

w_s ∝ softmax(norm(dev_after - dev_zero_shot) / T) from the dev-all table (--devall_tsv). Averages the
original source modules, so a transfer from it sees the target's data only in its own tuning; with
--average_tuned, the sources tuned on the target ({tuneall_ckpt_path}/{t}/{s}), as the original code did:
that arm then has had the target budget twice.

    python unit_model/unit_model_Performance.py --delta lora --tasks ALL_TASKS --tem 0.1
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
devall_tsv = "runs/tuneall/lora/dev_all.tsv"  # written by get_similarity/dev_all.py
average_tuned = False  # True: the original's choice (twice the target budget)
save_ckpt_path = "runs/fused/lora/Performance"
tem = 1.0  # or "auto": per target, the T whose fused module scores best zero-shot on its dev split
weight_norm = config.DEFAULT_WEIGHT_NORM  # zscore | rank | none (the original's raw gains)
lora_combine = config.DEFAULT_LORA_COMBINE
overwrite = False  # True: replace this run's outputs from an earlier run
# -----------------------------------------------------------------------------------------------------
# + the merge knobs (--merge, --lam, --density, ..., --top_k) and --tem auto's (--model, --task_dir, ...)
PARAMS = {**block_params(globals()), **config.MERGE_PARAMS, **config.TARGET_DATA_PARAMS}


def main(argv: list[str] | None = None) -> int:
    args = config.parse_params(PARAMS, argv, __doc__)
    from unit_model.fusion import run_fusion

    return run_fusion("Performance", args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
