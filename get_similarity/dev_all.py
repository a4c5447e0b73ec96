# ruff: noqa: E402
# (the sys.path line below must run before the project imports)
"""Dev-all: score every source module on every target's dev split, zero-shot and after tune-all.

For each target t in --tasks and each source s in --source_tasks (default: --tasks) with s != t:

* ``dev_zero_shot``: t's dev score (generation + t's metric, ``models.evaluate.evaluate``) of s's module as
  it is (``{source_ckpt_path}/{s}``, any form models.run_folders accepts);
* ``dev_after``: the same for the module tune_all.py tuned from s on t (``{tuneall_ckpt_path}/{t}/{s}``),
  or ``-`` where there is none (not tuned yet, or no --tuneall_ckpt_path).

The Performance fusion method reads these dev gains. The backbone is loaded once and modules are swapped
in; every module is checked (method, sizes, backbone, which pair) before the first generation. Writes one
TSV (atomically, at the end) with columns target, source, dev_zero_shot, dev_after; scores are written
in full precision. With --merge, this run's rows replace or join those of an existing --output, under a
file lock, so parallel jobs that each score some pairs share one table (sweep.py devall). What an earlier
run wrote (the table; with --merge, these pairs' rows) is refused before any scoring unless --overwrite.

    python -m get_similarity.dev_all --tasks SAMPLE_TASKS --source_ckpt_path runs/sources/lora \\
        --tuneall_ckpt_path runs/tuneall/lora --output runs/tuneall/lora/dev_all.tsv
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python get_similarity/dev_all.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

from models.pair_settings import DevAllConfig, dev_all_parser
from utils.errors import answer_flags_early, run_cli
from utils.params import config_from


def build_parser() -> argparse.ArgumentParser:
    return dev_all_parser(__doc__)


if __name__ == "__main__":  # --help and a refused flag answer here, before torch and the models load
    answer_flags_early(build_parser)


def main(argv: list[str] | None = None) -> int:
    from models.dev_all import run_dev_all  # after the flags: --help needs no torch

    run_dev_all(config_from(DevAllConfig, build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
