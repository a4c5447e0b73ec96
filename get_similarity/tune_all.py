# ruff: noqa: E402
# (the sys.path line below must run before the project imports)
"""Tune-all: tune every source's delta module on every target task, leave-one-out.

For each target t in --tasks and each source s in --source_tasks (default: --tasks) with s != t, the
delta module starts from s's checkpoint (``{source_ckpt_path}/{s}``: a checkpoint folder, a tune.py run
folder or a tune.py task folder) and is tuned on t's few-shot train split for --steps steps. There is no
model selection: the module of the last step is kept, and its dev score on t is recorded. Each result
is a delta checkpoint folder ``{output_dir}/{t}/{s}`` whose meta has task=t, metric, score=dev,
step=steps and extra={source, steps, lr, bsz, dev, warmup_steps, seed, k, data_seed, init}. The
Euclidean fusion method measures how far each source moved; dev_all.py scores the modules.

Training runs tune.py's own loop (``models.trainer.Trainer.train`` with ``save_last``), so a pair's module is
exactly what ``tune.py --train_checkpoint {source} --train_iters N --valid_interval N --early_stop 0
--save_last`` (same lr, bsz, warm-up and seed) saves. The backbone is loaded once for all pairs; every
source checkpoint is checked (found, one method and sizes, this backbone) before the first step.
A pair whose checkpoint exists is skipped, so a rerun resumes where it stopped; --overwrite redoes it.

    python -m get_similarity.tune_all --tasks SAMPLE_TASKS --source_ckpt_path runs/sources/lora \\
        --output_dir runs/tuneall/lora --steps 200 --learning_rate 5e-4 --bsz 8
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python get_similarity/tune_all.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from models.pair_settings import TuneAllConfig, tune_all_parser
from utils.errors import answer_flags_early, run_cli
from utils.params import config_from


def build_parser() -> argparse.ArgumentParser:
    return tune_all_parser(__doc__)


if __name__ == "__main__":  # --help and a refused flag answer here, before torch and the models load
    answer_flags_early(build_parser)


def main(argv: list[str] | None = None) -> int:
    from models.tune_all import run_tune_all  # after the flags: --help needs no torch

    run_tune_all(config_from(TuneAllConfig, build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
