"""Tune a delta module (bottleneck adapter, LoRA, prefix or (IA)³) of a frozen T5 on few-shot tasks.

For each task and each (learning rate, batch size) of the sweep: train only the delta parameters
with AdamW and linear warmup/decay, validate by generation + the task's metric every
``--valid_interval`` steps, keep the best module, stop after ``--early_stop`` validations without
gain, then predict on test with the best module (or with ``--test_checkpoint``).

Writes ``{output_dir}/{task}/lr_{lr}_bsz_{bsz}_k_{k}_data_{data_seed}_seed_{seed}_{hash}/`` (log.txt, curve.tsv,
checkpoint/, predictions; the hash covers every other setting) and one ``{output_dir}/result.tsv`` with a row per
run. A run folder appears only once complete, and two runs of different settings never share one.

    python tune.py --do_train --do_predict --tune_method lora --tasks SAMPLE_TASKS --output_dir runs/lora
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from models.tune_flags import config_from_args, tune_parser
from utils.errors import run_cli

if TYPE_CHECKING:
    from models.delta import DeltaConfig

__all__ = ["build_parser", "check_args", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    return tune_parser(__doc__)


def check_args(args: argparse.Namespace) -> DeltaConfig:
    """Validate flags before anything is loaded or written; the delta method they ask for."""
    from models.tuning import check_config

    config = config_from_args(args)
    check_config(config)
    return config.delta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.tuning import run_sweep  # after the flags: --help and a refused flag need no torch

    run_sweep(config_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
