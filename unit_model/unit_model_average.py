"""Uniform average of the source modules (no scores): the 'average' and 'manual division' baselines.

Sources of a target t: every other task of --tasks (--TASK_LIST all), the tasks of t's own category in
task_list.MANUAL_CATEGORIES (--TASK_LIST manual, or --manual), or the tasks of one named category.
Writes {save_ckpt_path}/without_{t}/, weights.tsv and heatmap.png (see unit_model/fusion.py).

    python unit_model/unit_model_average.py --delta lora --tasks ALL_TASKS --manual
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
TASK_LIST = "all"  # all | manual | a category (sentiment, topic, lookup, entail, extract)
manual = False
source_ckpt_path = "runs/sources/lora"
save_ckpt_path = "runs/fused/lora/average"
tem = 1.0  # recorded only: uniform weights do not depend on it
lora_combine = config.DEFAULT_LORA_COMBINE
overwrite = False  # True: replace this run's outputs from an earlier run
# -----------------------------------------------------------------------------------------------------
PARAMS = {**block_params(globals()), **config.MERGE_PARAMS}  # + --merge, --lam, --density, ..., --top_k


def main(argv: list[str] | None = None) -> int:
    args = config.parse_params(PARAMS, argv, __doc__)
    from unit_model.fusion import run_fusion

    return run_fusion("average", args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
