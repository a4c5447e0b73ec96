"""Fusion with learned weights: searched on the target's few-shot train split (LoraHub's search, exact merges).

For each target, Nevergrad's NGOpt tries ``budget`` weight vectors (one weight per source, per group at block
or layer granularity, each in [-bound, bound]) and keeps the one that minimises the merged module's mean
cross-entropy on the target's train split plus ``l1`` · mean |w|. ``learned_start`` is where it starts: zeros
(LoraHub's), uniform, or the weights of a metric of ``result_tsv`` (e.g. Loss: its softmax weights, then
refined). ``optimizer = "gradient"`` takes ``budget`` Adam steps on the weights through the differentiable
linear merge instead (linear and task_arithmetic only). Only the train split is read. Writes the fused
checkpoints, weights.tsv, heatmap.png and search.tsv / search.png (the objective at every evaluation).

    python unit_model/unit_model_learned.py --delta lora --tasks ALL_TASKS --learned_start Loss
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
save_ckpt_path = "runs/fused/lora/learned"
learned_start = "zeros"  # zeros | uniform | a metric of result_tsv (its softmax weights at tem)
result_tsv = "runs/similarity/lora/result.tsv"  # read only when learned_start is a metric
budget = 40  # evaluations of the objective (LoraHub's)
bound = 1.5  # each weight in [-bound, bound] (LoraHub's)
l1 = 0.05  # objective = train cross-entropy + l1 * mean |w| (LoraHub's)
search_seed = 0
optimizer = "nevergrad"  # nevergrad (LoraHub's NGOpt) | gradient (Adam through the linear merge; budget = steps)
search_lr = 0.05  # gradient only: Adam's step size on the weights
tem = 1.0  # the starting weights' temperature, when they come from a metric
weight_norm = config.DEFAULT_WEIGHT_NORM
granularity = "model"
lora_combine = config.DEFAULT_LORA_COMBINE
overwrite = False  # True: replace this run's outputs from an earlier run
# -----------------------------------------------------------------------------------------------------
# + the merge knobs (--merge, --lam, ...) and the backbone and target files (--model, --task_dir, --k, ...)
PARAMS = {**block_params(globals()), **config.MERGE_PARAMS, **config.TARGET_DATA_PARAMS}


def main(argv: list[str] | None = None) -> int:
    args = config.parse_params(PARAMS, argv, __doc__)
    from unit_model.fusion import run_fusion

    return run_fusion("learned", args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
